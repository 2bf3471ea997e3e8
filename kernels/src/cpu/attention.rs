//! Paged attention on the CPU: queries of a packed batch against keys and values stored in
//! fixed-size blocks, found through each sequence's block table.
//!
//! Cache layout per layer: V is `[num_blocks][block_size][num_kv_heads][head_dim]`; K is the same
//! blocks transposed inside each block, `[num_blocks][num_kv_heads][head_dim][block_size]`, so the
//! positions of one dimension are contiguous and scores are computed 16 positions at a time
//! without horizontal reductions. Token position `p` of a sequence lives in block
//! `block_table[p / block_size]`, slot `p % block_size`.
//!
//! The work item is one (query token, KV head): the K and V rows of that head
//! are loaded once for all query heads that share it (GQA/MQA). Query `i` of a sequence with
//! `num_queries` new tokens and `context_len` tokens in all sits at position
//! `context_len - num_queries + i` and attends causally to positions `0..=` that.

use super::ops::{axpy, chunks_mut_par};

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
#[derive(Clone, Copy, Debug)]
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

/// `out` (rows x num_heads x head_dim) = softmax(q k^T * scale) v, causal, per sequence.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    shape: AttentionShape,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row = num_heads * head_dim;
    // (sequence, query index) for each packed row.
    let mut owner = vec![(usize::MAX, 0usize); out.len() / row];
    for (s, seq) in seqs.iter().enumerate() {
        for i in 0..seq.num_queries {
            owner[seq.query_start + i] = (s, i);
        }
    }
    let kv_stride = num_kv_heads * head_dim;
    let avx = super::has_avx512() && head_dim % 16 == 0 && head_dim <= 256;
    // Work items: (row, KV head, context partition). Partitions depend on the context length
    // only, never on the batch, so results stay batch invariant.
    let mut items = Vec::new();
    for (t, &(s, i)) in owner.iter().enumerate() {
        if s == usize::MAX {
            continue;
        }
        let seq = &seqs[s];
        let ctx = seq.context_len - seq.num_queries + i + 1;
        for kvh in 0..num_kv_heads {
            for p0 in (0..ctx).step_by(PARTITION) {
                items.push(WorkItem {
                    row: t,
                    seq: s,
                    kvh,
                    p0,
                    p1: (p0 + PARTITION).min(ctx),
                });
            }
        }
    }
    let part_width = group * (head_dim + 2);
    let mut partials = vec![0f32; items.len() * part_width];
    let run = |w: &WorkItem, part: &mut [f32]| {
        let item = Item {
            q: &q[w.row * row + w.kvh * group * head_dim
                ..w.row * row + (w.kvh + 1) * group * head_dim],
            k_cache,
            v_cache,
            block_table: seqs[w.seq].block_table,
            block_size,
            kv_stride,
            head_offset: w.kvh * head_dim,
            head_dim,
            group,
            p0: w.p0,
            p1: w.p1,
            scale,
        };
        let mut scores = vec![0f32; group * (w.p1 - w.p0)];
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: AVX-512 support and head_dim % 16 == 0 were checked above.
            unsafe { super::simd::x86::attend_partition(&item, &mut scores, part) };
            return;
        }
        attend_partition_scalar(&item, &mut scores, part);
    };
    chunks_mut_par(&mut partials, part_width, 2, |k, part| run(&items[k], part));
    // Combine the partitions of each (row, KV head), in partition order.
    out.fill(0.0);
    let mut k = 0;
    while k < items.len() {
        let first = &items[k];
        let mut end = k + 1;
        while end < items.len() && items[end].row == first.row && items[end].kvh == first.kvh {
            end += 1;
        }
        let o = &mut out[first.row * row + first.kvh * group * head_dim..][..group * head_dim];
        for g in 0..group {
            let stats = |p: usize| {
                let base = p * part_width + g * (head_dim + 2);
                (partials[base], partials[base + 1], base + 2)
            };
            let m = (k..end)
                .map(|p| stats(p).0)
                .fold(f32::NEG_INFINITY, f32::max);
            let l: f32 = (k..end)
                .map(|p| {
                    let (mp, lp, _) = stats(p);
                    (mp - m).exp() * lp
                })
                .sum();
            let og = &mut o[g * head_dim..(g + 1) * head_dim];
            for p in k..end {
                let (mp, _, at) = stats(p);
                let w = (mp - m).exp() / l;
                axpy(w, &partials[at..at + head_dim], og);
            }
        }
        k = end;
    }
}

/// Context positions per work item.
const PARTITION: usize = 256;

struct WorkItem {
    row: usize,
    seq: usize,
    kvh: usize,
    p0: usize,
    p1: usize,
}

/// One (query row, KV head, partition `p0..p1`) work item.
pub(crate) struct Item<'a> {
    pub q: &'a [f32],
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
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
pub(crate) fn for_each_run(it: &Item<'_>, mut f: impl FnMut(usize, usize, usize, usize)) {
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
pub(crate) fn for_each_slot(it: &Item<'_>, mut f: impl FnMut(usize, usize)) {
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
pub(crate) fn k_index(it: &Item<'_>, block: usize, off: usize, d: usize) -> usize {
    (block * it.kv_stride + it.head_offset + d) * it.block_size + off
}

/// Scaled scores `q_g . k_j` for every query head `g` of the group and position `j` of the
/// partition (portable version; `simd::x86::scores` is the fast one).
pub(crate) fn raw_scores(it: &Item<'_>, scores: &mut [f32]) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    for_each_run(it, |j0, block, off, len| {
        for g in 0..it.group {
            let q = &it.q[g * hd..(g + 1) * hd];
            for t in 0..len {
                let s: f32 = (0..hd)
                    .map(|d| q[d] * it.k_cache[k_index(it, block, off + t, d)])
                    .sum();
                scores[g * n + j0 + t] = s * it.scale;
            }
        }
    });
}

/// Turn scores into `exp(s - m)` in place per query head and write `m` and
/// `l = sum exp(s - m)` as the first two values of each head's `[m, l, o...]` record, `o` zeroed.
pub(crate) fn softmax_stats(it: &Item<'_>, scores: &mut [f32], part: &mut [f32]) {
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
/// value is read once for the whole group.
pub(crate) fn attend_partition_scalar(it: &Item<'_>, scores: &mut [f32], part: &mut [f32]) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    raw_scores(it, scores);
    softmax_stats(it, scores, part);
    for_each_slot(it, |j, slot| {
        let vp = &it.v_cache[slot * it.kv_stride + it.head_offset..][..hd];
        for g in 0..it.group {
            axpy(
                scores[g * n + j],
                vp,
                &mut part[g * (hd + 2) + 2..(g + 1) * (hd + 2)],
            );
        }
    });
}
