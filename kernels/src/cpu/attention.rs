//! Paged attention on the CPU: queries of a packed batch against keys and values stored in
//! fixed-size blocks, found through each sequence's block table.
//!
//! Cache layout per layer: V is `[num_blocks][block_size][num_kv_heads][head_dim]`; K is the same
//! blocks transposed inside each block, `[num_blocks][num_kv_heads][head_dim][block_size]`, so the
//! positions of one dimension are contiguous and scores are computed 16 positions at a time
//! without horizontal reductions. Token position `p` of a sequence lives in block
//! `block_table[p / block_size]`, slot `p % block_size`.
//!
//! Query `i` of a sequence with `num_queries` new tokens and `context_len` tokens in all sits at
//! position `context_len - num_queries + i` and attends causally to positions `0..=` that.
//!
//! The work item is (tile of up to `TILE_ROWS` (4) consecutive query rows of one sequence, KV
//! head, partition of `PARTITION` (256) context positions): each K and V value it loads serves every
//! query head of the tile that shares the KV head (GQA/MQA). Each item writes, per row and query
//! head, the partition's max score, softmax sum and unnormalised V sum; a second parallel pass
//! combines a row's partitions in order.
//!
//! Invariant (batch invariance, and cached equals recomputed): a row's output depends on its
//! query, its context length and the cache only (whatever the cache's element type: see
//! `kv_elem`). Partition boundaries are multiples of
//! `PARTITION`, whatever the batch, and every kernel computes a row of a tile with the same
//! operations as the row alone (a decode step): the tile only shares loads.

use std::cell::Cell;

use super::kv_elem::KvElem;
use super::ops::axpy;
use super::pool::parallel_for;
use super::{Isa, SendPtr};

/// One sequence of a packed batch, as attention sees it.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSeq<'a> {
    /// Blocks holding the sequence's K/V, in position order.
    pub block_table: &'a [u32],
    /// Row of the sequence's first query in the packed batch.
    pub query_start: usize,
    /// Number of query rows (new tokens this step).
    pub num_queries: usize,
    /// Tokens in the cache after this step's K/V were written (cached prefix + new tokens).
    pub context_len: usize,
}

/// Geometry of the cache and heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

/// Why [`try_paged_attention`] refused its arguments. Nothing is read or written past a check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttentionError {
    /// A dimension of the shape is zero.
    #[error("num_heads, num_kv_heads, head_dim and block_size must be non-zero: {0:?}")]
    ZeroDimension(AttentionShape),
    /// Query heads do not split evenly over the KV heads.
    #[error("num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")]
    HeadsNotGrouped {
        /// Query heads.
        num_heads: usize,
        /// KV heads.
        num_kv_heads: usize,
    },
    /// A row or block size of the shape does not fit in `usize`.
    #[error("the sizes of {0:?} overflow usize")]
    Overflow(AttentionShape),
    /// The output is not a whole number of rows of `num_heads * head_dim` floats.
    #[error("output of {len} floats is not a whole number of rows of {row} floats")]
    OutputLength {
        /// `out.len()`.
        len: usize,
        /// `num_heads * head_dim`.
        row: usize,
    },
    /// The query buffer and the output differ in length.
    #[error("queries ({q_len} floats) and output ({out_len} floats) differ in length")]
    QueryLength {
        /// `q.len()`.
        q_len: usize,
        /// `out.len()`.
        out_len: usize,
    },
    /// The K and V caches are not the same whole number of blocks.
    #[error(
        "K cache ({k_len} floats) and V cache ({v_len} floats) are not the same whole number \
         of blocks of {block_floats} floats"
    )]
    CacheLength {
        /// `k_cache.len()`.
        k_len: usize,
        /// `v_cache.len()`.
        v_len: usize,
        /// `block_size * num_kv_heads * head_dim`.
        block_floats: usize,
    },
    /// A sequence's query rows run past the batch.
    #[error(
        "sequence {seq}: query rows {query_start}..{query_start}+{num_queries} run past the \
         {rows} rows of the batch"
    )]
    QueryRows {
        /// Index of the sequence in `seqs`.
        seq: usize,
        /// Its `query_start`.
        query_start: usize,
        /// Its `num_queries`.
        num_queries: usize,
        /// Rows of the batch (`out.len() / (num_heads * head_dim)`).
        rows: usize,
    },
    /// Two sequences claim the same query row.
    #[error("sequence {seq}: query row {row} already belongs to sequence {other}")]
    SharedRow {
        /// Index of the later sequence in `seqs`.
        seq: usize,
        /// Index of the earlier one.
        other: usize,
        /// The row.
        row: usize,
    },
    /// A sequence has more new tokens than tokens in all.
    #[error("sequence {seq}: {num_queries} queries exceed its context length {context_len}")]
    QueriesExceedContext {
        /// Index of the sequence in `seqs`.
        seq: usize,
        /// Its `num_queries`.
        num_queries: usize,
        /// Its `context_len`.
        context_len: usize,
    },
    /// A block table has fewer blocks than the context length needs.
    #[error(
        "sequence {seq}: block table has {len} blocks, context length {context_len} needs \
         {needed}"
    )]
    BlockTableTooShort {
        /// Index of the sequence in `seqs`.
        seq: usize,
        /// `block_table.len()`.
        len: usize,
        /// Its `context_len`.
        context_len: usize,
        /// `context_len.div_ceil(block_size)`.
        needed: usize,
    },
    /// A block table names a block the cache does not have.
    #[error(
        "sequence {seq}: block table entry {index} is block {block}, out of range for a cache \
         of {num_blocks} blocks"
    )]
    BlockOutOfRange {
        /// Index of the sequence in `seqs`.
        seq: usize,
        /// Position of the entry in the block table.
        index: usize,
        /// The block id.
        block: u32,
        /// Blocks in the cache (`k_cache.len() / (block_size * num_kv_heads * head_dim)`).
        num_blocks: usize,
    },
}

/// `out` (rows x num_heads x head_dim) = softmax(q k^T * scale) v, causal, per sequence; rows
/// that no sequence owns are zeroed. The caches hold `f32` or `f16` values ([`KvElem`]); an
/// `f16` value is converted as it is loaded, so the result is the `f32` computation on the
/// stored values. See [`try_paged_attention`] for what the arguments must
/// satisfy.
///
/// # Panics
/// With the [`AttentionError`]'s message, on any argument [`try_paged_attention`] refuses (a
/// block id outside the cache, a block table shorter than the context, query rows outside
/// `q` / `out`, inconsistent head counts or buffer lengths). Callers that build their batch
/// from untrusted input and want to recover call [`try_paged_attention`] instead.
pub fn paged_attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    shape: AttentionShape,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
) {
    if let Err(e) = try_paged_attention(q, k_cache, v_cache, shape, seqs, out) {
        panic!("paged_attention: {e}");
    }
}

/// [`paged_attention`], with its arguments checked first: on an error nothing is computed and
/// `out` is left as it was.
///
/// The checks, made once per call in `O(seqs + block-table entries + rows)`, are what the inner
/// loops (the SIMD tile loops, AVX2 and AVX-512, which index without bounds checks) rely on:
/// - every dimension of `shape` is non-zero and `num_heads % num_kv_heads == 0`;
/// - `out.len()` is a whole number of rows of `num_heads * head_dim` floats and
///   `q.len() == out.len()`;
/// - `k_cache.len() == v_cache.len()`, a whole number `num_blocks` of blocks of
///   `block_size * num_kv_heads * head_dim` floats;
/// - for each sequence: `query_start + num_queries <= rows`, no row shared with another
///   sequence, `num_queries <= context_len`,
///   `block_table.len() >= context_len.div_ceil(block_size)`, and every entry of
///   `block_table` is `< num_blocks`.
pub fn try_paged_attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    shape: AttentionShape,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
) -> Result<(), AttentionError> {
    let layout = Layout::check(q.len(), k_cache.len(), v_cache.len(), shape, out.len())?;
    layout.check_rows(seqs)?;
    attend(q, k_cache, v_cache, &layout, seqs, out, super::simd());
    Ok(())
}

/// The geometry of a call, checked against its buffers.
struct Layout {
    shape: AttentionShape,
    /// Query heads per KV head.
    group: usize,
    /// Floats of one query / output row: `num_heads * head_dim`.
    row: usize,
    /// Rows of the batch.
    rows: usize,
    /// Floats of one token's K (or V) in the cache: `num_kv_heads * head_dim`.
    kv_stride: usize,
    /// Blocks in each of the K and V caches.
    num_blocks: usize,
}

impl Layout {
    fn check(
        q_len: usize,
        k_len: usize,
        v_len: usize,
        shape: AttentionShape,
        out_len: usize,
    ) -> Result<Layout, AttentionError> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
        } = shape;
        if num_heads == 0 || num_kv_heads == 0 || head_dim == 0 || block_size == 0 {
            return Err(AttentionError::ZeroDimension(shape));
        }
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(AttentionError::HeadsNotGrouped {
                num_heads,
                num_kv_heads,
            });
        }
        let overflow = || AttentionError::Overflow(shape);
        let row = num_heads.checked_mul(head_dim).ok_or_else(overflow)?;
        let kv_stride = num_kv_heads.checked_mul(head_dim).ok_or_else(overflow)?;
        let block_floats = kv_stride.checked_mul(block_size).ok_or_else(overflow)?;
        if !out_len.is_multiple_of(row) {
            return Err(AttentionError::OutputLength { len: out_len, row });
        }
        if q_len != out_len {
            return Err(AttentionError::QueryLength { q_len, out_len });
        }
        if k_len != v_len || !k_len.is_multiple_of(block_floats) {
            return Err(AttentionError::CacheLength {
                k_len,
                v_len,
                block_floats,
            });
        }
        Ok(Layout {
            shape,
            group: num_heads / num_kv_heads,
            row,
            rows: out_len / row,
            kv_stride,
            num_blocks: k_len / block_floats,
        })
    }

    /// Check every sequence against the layout, and that no two of them claim the same row.
    fn check_rows(&self, seqs: &[AttentionSeq<'_>]) -> Result<(), AttentionError> {
        let block_size = self.shape.block_size;
        // The sequence owning each row, `usize::MAX` for none yet.
        let mut owner = vec![usize::MAX; self.rows];
        for (s, seq) in seqs.iter().enumerate() {
            let end = seq
                .query_start
                .checked_add(seq.num_queries)
                .filter(|&end| end <= self.rows)
                .ok_or(AttentionError::QueryRows {
                    seq: s,
                    query_start: seq.query_start,
                    num_queries: seq.num_queries,
                    rows: self.rows,
                })?;
            if seq.num_queries > seq.context_len {
                return Err(AttentionError::QueriesExceedContext {
                    seq: s,
                    num_queries: seq.num_queries,
                    context_len: seq.context_len,
                });
            }
            let needed = seq.context_len.div_ceil(block_size);
            if seq.block_table.len() < needed {
                return Err(AttentionError::BlockTableTooShort {
                    seq: s,
                    len: seq.block_table.len(),
                    context_len: seq.context_len,
                    needed,
                });
            }
            if let Some((index, &block)) = seq
                .block_table
                .iter()
                .enumerate()
                .find(|&(_, &b)| b as usize >= self.num_blocks)
            {
                return Err(AttentionError::BlockOutOfRange {
                    seq: s,
                    index,
                    block,
                    num_blocks: self.num_blocks,
                });
            }
            for (i, o) in owner[seq.query_start..end].iter_mut().enumerate() {
                if *o != usize::MAX {
                    return Err(AttentionError::SharedRow {
                        seq: s,
                        other: *o,
                        row: seq.query_start + i,
                    });
                }
                *o = s;
            }
        }
        Ok(())
    }
}

/// The computation, on arguments that passed `Layout::check` and `Layout::check_rows`.
fn attend<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    layout: &Layout,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
    simd: Isa,
) {
    let &Layout {
        shape:
            AttentionShape {
                num_kv_heads,
                head_dim,
                block_size,
                ..
            },
        group,
        row,
        kv_stride,
        ..
    } = layout;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // The tile kernel runs wherever the processor has AVX2 and the head is whole vectors of 8
    // dimensions: its 512-bit loops (the same bits, see `avx512_attention`) on an AVX-512
    // processor with AVX-512BW and VL and whole vectors of 16 dimensions, its AVX2 loops
    // otherwise. Other head sizes take the scalar partition code (with the path's `axpy`).
    #[cfg(target_arch = "x86_64")]
    let avx2 = match simd {
        Isa::Avx512(_) if head_dim.is_multiple_of(8) => super::Avx2::detect(),
        Isa::Avx2(t) if head_dim.is_multiple_of(8) => Some(t),
        _ => None,
    };
    #[cfg(target_arch = "x86_64")]
    let zmm = match simd {
        Isa::Avx512(_) if avx2.is_some() && head_dim.is_multiple_of(16) => {
            super::avx512_attention::Zmm::detect()
        }
        _ => None,
    };
    // Work items: (tile of up to TILE_ROWS consecutive query rows of one sequence, KV head,
    // context partition); an item holds the rows of its tile that reach into its partition (a
    // suffix of the tile). Partitions depend on each row's context length only, never on the
    // batch or the tile, and every kernel computes a row's records exactly as it would alone,
    // so results stay batch invariant.
    let part_width = group * (head_dim + 2);
    let mut items = Vec::new();
    // Floats of the records of the items so far.
    let mut floats = 0;
    // The order the items run in: the tiles of one sequence, KV head and partition one after
    // the other, so that a core reuses the partition's K and V from its L2 cache across tiles
    // (a long prompt's K and V do not fit in L2). `items` itself stays in (tile, KV head,
    // partition) order for the combine.
    let mut order = Vec::new();
    // (index of the tile's first item, partitions of the tile) for each tile of a sequence.
    let mut tiles = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        // Context length (positions attended to) of the sequence's first query.
        let first_ctx = seq.context_len + 1 - seq.num_queries;
        tiles.clear();
        for i0 in (0..seq.num_queries).step_by(TILE_ROWS) {
            let n = (seq.num_queries - i0).min(TILE_ROWS);
            let tile_ctx = first_ctx + i0;
            let partitions = (tile_ctx + n - 1).div_ceil(PARTITION);
            tiles.push((items.len(), partitions));
            for kvh in 0..num_kv_heads {
                for p in 0..partitions {
                    let p0 = p * PARTITION;
                    // Rows whose context ends at or before p0 are not in this partition.
                    let skip = (p0 + 1).saturating_sub(tile_ctx);
                    items.push(WorkItem {
                        seq: s,
                        row: seq.query_start + i0 + skip,
                        rows: n - skip,
                        ctx: tile_ctx + skip,
                        kvh,
                        p0,
                        at: floats,
                    });
                    floats += (n - skip) * part_width;
                }
            }
        }
        let most = tiles.iter().map(|t| t.1).max().unwrap_or(0);
        for kvh in 0..num_kv_heads {
            for p in 0..most {
                for &(first, partitions) in &tiles {
                    if p < partitions {
                        order.push(first + kvh * partitions + p);
                    }
                }
            }
        }
    }
    // Every record is written before it is read: the buffer of an earlier call is reused as it
    // is (a fresh one of this size would cost page faults on every call).
    let mut partials = PARTIALS.take();
    partials.resize(floats, 0.0);
    let run = |w: &WorkItem, part: &mut [f32]| {
        let ends: [usize; TILE_ROWS] = std::array::from_fn(|r| w.end(r));
        let heads = w.kvh * group * head_dim..(w.kvh + 1) * group * head_dim;
        let single = |r: usize| Item {
            q: &q[(w.row + r) * row..][heads.clone()],
            k_cache,
            v_cache,
            block_table: seqs[w.seq].block_table,
            block_size,
            kv_stride,
            head_offset: w.kvh * head_dim,
            head_dim,
            group,
            p0: w.p0,
            p1: ends[r],
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2.is_some() {
            let tile = Item {
                q: &q[w.row * row + heads.start..(w.row + w.rows - 1) * row + heads.end],
                p1: ends[w.rows - 1],
                ..single(0)
            };
            let rows = TileRows {
                rows: w.rows,
                q_stride: row,
                ends,
            };
            // Every score the tile reads it writes first, so a buffer of an earlier item on this
            // thread serves as it is (a fresh one costs an allocation and a memset per item).
            let mut scores = TILE_SCORES.take();
            scores.resize(scores.len().max(w.rows * group * (tile.p1 - tile.p0)), 0.0);
            // SAFETY: the `Avx2` token proves the processor features; `head_dim % 8 == 0` was
            // checked above. `tile` satisfies the `Item` invariants: the caches are
            // `num_blocks` whole blocks and every block-table entry is below `num_blocks`
            // (`Layout`), the table covers the sequence's `context_len >= p1` positions, `kvh <
            // num_kv_heads` gives `head_offset + head_dim <= kv_stride`. `rows` satisfies the
            // `TileRows` invariants: `1 <= w.rows <= TILE_ROWS`, each end is in
            // `p0 + 1 ..= p1` (`WorkItem::end`, rows of the item reach past `p0`, the last
            // row's end is the largest), and `tile.q` spans `(rows - 1) * row + group *
            // head_dim` floats. `scores` has `rows * group * (p1 - p0)` floats and `part` the
            // item's `rows * group * (head_dim + 2)` floats.
            unsafe {
                // (And with a `Zmm` token, the processor has its features too, and `head_dim %
                // 16 == 0` was checked with it.)
                if zmm.is_some() {
                    super::avx2_attention::attend_tile::<E, super::avx512_attention::Zmm>(
                        &tile,
                        &rows,
                        &mut scores,
                        part,
                    )
                } else {
                    super::avx2_attention::attend_tile::<E, super::avx2_attention::Ymm>(
                        &tile,
                        &rows,
                        &mut scores,
                        part,
                    )
                }
            };
            TILE_SCORES.set(scores);
            return;
        }
        for r in 0..w.rows {
            let item = single(r);
            let part = &mut part[r * part_width..(r + 1) * part_width];
            let mut scores = vec![0f32; group * (item.p1 - item.p0)];
            attend_partition_scalar(&item, &mut scores, part, simd);
        }
    };
    let records = SendPtr(partials.as_mut_ptr());
    parallel_for(order.len(), &|e| {
        let w = &items[order[e]];
        // SAFETY: `order` is a permutation of the item indices (each item is pushed once,
        // under one (KV head, partition, tile)), and the items' records `at ..+ rows *
        // part_width` tile `0..floats`, so this item's are inside `partials` and no other item
        // touches them; `partials` stays borrowed mutably (nothing else accesses it) until
        // `parallel_for` returns.
        let part =
            unsafe { std::slice::from_raw_parts_mut(records.get().add(w.at), w.rows * part_width) };
        run(w, part)
    });
    // Combine the partitions of each (row, KV head), in partition order, one (tile, KV head)
    // per work item. Its items are consecutive, in partition order, the first one at `p0 ==
    // 0` holding every row of the tile; a row is in a prefix of them.
    out.fill(0.0);
    let mut groups = Vec::new();
    for (k, w) in items.iter().enumerate() {
        if w.p0 == 0 {
            groups.push(k..k + 1);
        } else if let Some(g) = groups.last_mut() {
            g.end = k + 1;
        }
    }
    let done = &partials;
    let outputs = SendPtr(out.as_mut_ptr());
    parallel_for(groups.len(), &|i| {
        let group_items = &items[groups[i].clone()];
        let first = &group_items[0];
        for t in first.row..first.row + first.rows {
            // SAFETY: row `t` of the tile and the KV head's query heads: floats `t * row +
            // kvh * group * head_dim ..+ group * head_dim`, inside `out` (`t < rows`, checked
            // by `Layout::check_rows`); no other (tile, KV head) writes them, and `out` stays
            // borrowed mutably until `parallel_for` returns.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    outputs.get().add(t * row + first.kvh * group * head_dim),
                    group * head_dim,
                )
            };
            // Row t's records of head g, in partition order: (m, l, start of the V sum).
            let records = |g: usize| {
                group_items
                    .iter()
                    .take_while(move |w| w.row <= t)
                    .map(move |w| {
                        let at = w.at + (t - w.row) * part_width + g * (head_dim + 2);
                        (done[at], done[at + 1], at + 2)
                    })
            };
            for (g, og) in o.chunks_exact_mut(head_dim).enumerate() {
                let m = records(g).map(|r| r.0).fold(f32::NEG_INFINITY, f32::max);
                let l: f32 = records(g).map(|(mp, lp, _)| (mp - m).exp() * lp).sum();
                for (mp, _, at) in records(g) {
                    let w = (mp - m).exp() / l;
                    axpy(simd, w, &done[at..at + head_dim], og);
                }
            }
        }
    });
    // A huge buffer (a long chunk on a long context) is not worth keeping: its call's
    // attention costs far more than the page faults of a fresh one.
    if partials.len() <= KEEP_PARTIALS {
        PARTIALS.set(partials);
    }
}

/// The largest partition buffer (floats) kept for the next call: 64 MiB.
const KEEP_PARTIALS: usize = 16 << 20;

thread_local! {
    /// The partition records of the last call on this thread, kept for the next one.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The scores buffer of the last SIMD tile on this thread (at most `TILE_ROWS * group *
    /// PARTITION` floats), kept for the next one.
    static TILE_SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Context positions per work item.
const PARTITION: usize = 256;

/// Query rows per work item (consecutive rows of one sequence): each K and V value an item
/// loads serves `TILE_ROWS * group` query heads.
pub(crate) const TILE_ROWS: usize = 4;

/// A tile of `rows` consecutive query rows of one sequence, one KV head, one partition.
struct WorkItem {
    seq: usize,
    /// Batch row of the first query of the item.
    row: usize,
    /// Query rows in the item, `1..=TILE_ROWS`.
    rows: usize,
    /// Context length of the first row (the next rows see one more position each).
    ctx: usize,
    kvh: usize,
    p0: usize,
    /// Offset of the item's records (`rows * group * (head_dim + 2)` floats) in the partials.
    at: usize,
}

impl WorkItem {
    /// End of row `r`'s positions in the partition (`p0 + 1 ..= p0 + PARTITION` for a row of
    /// the item); 0 past the item's rows.
    fn end(&self, r: usize) -> usize {
        if r < self.rows {
            (self.ctx + r).min(self.p0 + PARTITION)
        } else {
            0
        }
    }
}

/// The query rows of a tile, for the SIMD tile kernel (`avx2_attention::attend_tile`): the
/// tile's [`Item`] has `q` from the first row's first query head of the group on, and `p1` the
/// largest end.
///
/// Invariants: `1 <= rows <= TILE_ROWS`; `p0 < ends[r] <= p1` for `r < rows`; and
/// `q.len() >= (rows - 1) * q_stride + group * head_dim`.
pub(crate) struct TileRows {
    /// Rows in the tile.
    pub rows: usize,
    /// Floats from one row's queries to the next's.
    pub q_stride: usize,
    /// End of each row's positions (its own `p1`).
    pub ends: [usize; TILE_ROWS],
}

/// One (query row, KV head, partition `p0..p1`) work item.
///
/// Invariants (established by [`try_paged_attention`]'s checks; the safe code here indexes
/// with bounds checks anyway, the tile loops of `avx2_attention` and `avx512_attention` rely
/// on them):
/// - `block_size`, `head_dim` and `group` are non-zero and `p0 < p1`;
/// - `k_cache` and `v_cache` each hold `num_blocks * block_size * kv_stride` floats or more,
///   for some `num_blocks`;
/// - `block_table` has at least `p1.div_ceil(block_size)` entries and each of them is
///   `< num_blocks`, so every slot the partition visits is `< num_blocks * block_size`;
/// - `head_offset + head_dim <= kv_stride`;
/// - `q.len() >= group * head_dim`.
#[derive(Clone, Copy)]
pub(crate) struct Item<'a, E: KvElem = f32> {
    pub q: &'a [f32],
    pub k_cache: &'a [E],
    pub v_cache: &'a [E],
    pub block_table: &'a [u32],
    pub block_size: usize,
    pub kv_stride: usize,
    pub head_offset: usize,
    pub head_dim: usize,
    pub group: usize,
    pub p0: usize,
    pub p1: usize,
    pub scale: f32,
}

/// Visit the positions `p0..p1` as runs inside one block each: `f(j, block, offset, len)`
/// covers positions `p0 + j .. p0 + j + len`, stored in `block` from slot `offset` on.
#[inline(always)]
pub(crate) fn for_each_run<E: KvElem>(
    it: &Item<'_, E>,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let mut j = it.p0;
    while j < it.p1 {
        let off = j % it.block_size;
        let n = (it.block_size - off).min(it.p1 - j);
        f(
            j - it.p0,
            it.block_table[j / it.block_size] as usize,
            off,
            n,
        );
        j += n;
    }
}

/// Visit the cache slots of positions `p0..p1` in order, one division per block.
#[inline(always)]
pub(crate) fn for_each_slot<E: KvElem>(it: &Item<'_, E>, mut f: impl FnMut(usize, usize)) {
    for_each_run(it, |j, block, off, n| {
        for s in 0..n {
            f(j + s, block * it.block_size + off + s);
        }
    });
}

/// Index in the K cache of dimension `d` of the item's KV head at slot `off` of `block`.
/// K is stored transposed inside each block (`[block][kv_head][head_dim][block_size]`), so the
/// positions of one dimension are contiguous and a score computation runs along them.
#[inline(always)]
pub(crate) fn k_index<E: KvElem>(it: &Item<'_, E>, block: usize, off: usize, d: usize) -> usize {
    (block * it.kv_stride + it.head_offset + d) * it.block_size + off
}

/// Scaled scores `q_g . k_j` for every query head `g` of the group and position `j` of the
/// partition (portable version; the tile kernels' loops are the fast ones).
pub(crate) fn raw_scores<E: KvElem>(it: &Item<'_, E>, scores: &mut [f32]) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    for_each_run(it, |j0, block, off, len| {
        for g in 0..it.group {
            let q = &it.q[g * hd..(g + 1) * hd];
            // K is transposed inside a block, so the run's positions are contiguous for each
            // dimension: accumulate along positions (each score still sums over d in order).
            let out = &mut scores[g * n + j0..g * n + j0 + len];
            out.fill(0.0);
            for (d, &qd) in q.iter().enumerate() {
                let k = &it.k_cache[k_index(it, block, off, d)..][..len];
                for (o, &kv) in out.iter_mut().zip(k) {
                    *o += qd * kv.to_f32();
                }
            }
            for o in out.iter_mut() {
                *o *= it.scale;
            }
        }
    });
}

/// Turn scores into `exp(s - m)` in place per query head and write `m` and
/// `l = sum exp(s - m)` as the first two values of each head's `[m, l, o...]` record, `o` zeroed.
pub(crate) fn softmax_stats<E: KvElem>(it: &Item<'_, E>, scores: &mut [f32], part: &mut [f32]) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    for g in 0..it.group {
        let sc = &mut scores[g * n..(g + 1) * n];
        let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0f32;
        for v in sc.iter_mut() {
            *v = (*v - m).exp();
            l += *v;
        }
        let head = &mut part[g * (hd + 2)..(g + 1) * (hd + 2)];
        head[0] = m;
        head[1] = l;
        head[2..].fill(0.0);
    }
}

/// For each query head of the group: max score `m`, `l = sum exp(s - m)` and the unnormalised
/// `sum exp(s - m) v` over the partition, written as `[m, l, o...]` per head. Each K and V
/// value is read once for the whole group. `simd` picks the `axpy` of the V sum.
pub(crate) fn attend_partition_scalar<E: KvElem>(
    it: &Item<'_, E>,
    scores: &mut [f32],
    part: &mut [f32],
    simd: Isa,
) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    raw_scores(it, scores);
    softmax_stats(it, scores, part);
    // A V row converted to f32 when the cache holds another type.
    let mut converted = vec![
        0f32;
        if E::as_f32(it.v_cache).is_some() {
            0
        } else {
            hd
        }
    ];
    for_each_slot(it, |j, slot| {
        let stored = &it.v_cache[slot * it.kv_stride + it.head_offset..][..hd];
        let vp = match E::as_f32(stored) {
            Some(v) => v,
            None => {
                for (c, &e) in converted.iter_mut().zip(stored) {
                    *c = e.to_f32();
                }
                &converted[..]
            }
        };
        for g in 0..it.group {
            axpy(
                simd,
                scores[g * n + j],
                vp,
                &mut part[g * (hd + 2) + 2..(g + 1) * (hd + 2)],
            );
        }
    });
}
