//! Paged attention's inner loops with AVX2 + FMA: one work item is a tile of up to
//! [`TILE_ROWS`] consecutive query rows of one sequence, against one KV head's positions
//! `p0..p1` of one partition (see `attention`).
//!
//! A tile's query heads are its "vectors" `v = r * group + g` (row `r`, head `g` of the KV
//! head's group); vector `v`'s scores are `scores[v * n ..]` (`n = p1 - p0`) and its record
//! (`[m, l, o...]`, `head_dim + 2` floats) is `part[v * (head_dim + 2) ..]`.
//!
//! # Invariants
//!
//! - Same bits as a row alone. A score is one chain of fused multiply-adds over the head
//!   dimensions in order (then one multiply by the scale), the softmax of a vector takes its own
//!   row's positions only (`ends[r]`), and an output of the V sum is one chain of fused
//!   multiply-adds over the row's positions in order, kept in the record between runs of
//!   positions (a store and a load change no bits). The tile only decides how many vectors
//!   share each K and V load: up to 6 vectors at once, in registers.
//! - Element type. The caches hold `f32`, `f16` or 8-bit floats ([`KvElem`]); a value is
//!   converted to `f32` as it is loaded and everything after is the same, so such a cache gives
//!   exactly the `f32` results on its (rounded) values. An 8-bit float loads as its value over
//!   256 (`KvElem::LOAD_SCALE`), and the queries and the softmax weights are multiplied by 256
//!   instead: both are exact powers of two, so every product, and so every rounding, is the
//!   same (the records keep the unscaled softmax statistics; a query element would have to
//!   exceed 2^120 in magnitude for its scaled copy to overflow).
//! - Locality. The K and V of a run (one cache block of the KV head) are loaded from memory
//!   once per tile and reused from L1 by every group of vectors, so a tile of `R` rows reads
//!   the partition's K and V once instead of `R` times. A 4096-token prompt's K and V do not
//!   fit in L2; attention one row at a time is bound by reading them.
//! - Prefetching, which changes no value. An item starts by asking for the K of its first
//!   [`PREFETCH_BLOCKS`] blocks; the first pass over each block's scores asks for the K of the
//!   block [`PREFETCH_BLOCKS`] ahead, a K row per dimension, and before it for the block's own
//!   V, which the V sum reads after the softmax. So the V sum finds V in the cache, and only
//!   an item's first blocks wait on memory.

// Index loops over the const-generic register arrays read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::attention::{for_each_run, k_index, Item, TileRows};
use super::avx2::{exp8, hsum, prefetch_span, tail_mask};
use super::kv_elem::KvElem;

/// Vectors (query heads of the tile) that share one K or V load: 6 x 2 accumulators, with the
/// two K (or V) vectors and a broadcast, take 15 of the 16 vector registers.
pub(crate) const SHARE: usize = 6;

/// Vectors of 8 positions a score pass covers: 16 positions, one block at the default size.
const SCORE_VECS: usize = 2;

thread_local! {
    /// The scaled queries of the last tile on this thread (`KvElem::LOAD_SCALE`), kept for
    /// the next one.
    static SCALED_Q: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// How many cache blocks ahead of the one being read the score loop asks for the K it will
/// read, a K row at a time as it reads the current block's. A sequence's blocks lie anywhere
/// in the cache and a decode step does little arithmetic per byte of K and V, so without this
/// every block starts with a wait on memory (`examples/attention_speed.rs 320 16 16 5 2 30
/// f16` on a 2-core AMD EPYC, 16 decoding sequences through 30 layers' caches: 22-26 ms
/// without, 18-19 ms with).
const PREFETCH_BLOCKS: usize = 2;

/// The block that holds position `p`, if the item reads it (`p < p1`).
#[inline(always)]
pub(crate) fn block_at<E: KvElem>(it: &Item<'_, E>, p: usize) -> Option<usize> {
    (p < it.p1).then(|| it.block_table[p / it.block_size] as usize)
}

/// The block that holds the position [`PREFETCH_BLOCKS`] blocks after the run that starts at
/// `p0 + j`, if the item reads it.
#[inline(always)]
fn block_ahead<E: KvElem>(it: &Item<'_, E>, j: usize) -> Option<usize> {
    block_at(it, it.p0 + j + PREFETCH_BLOCKS * it.block_size)
}

/// Where the item's KV head's K starts in `block` (its `head_dim` rows of `block_size`
/// positions follow), for prefetching: computed with `wrapping_add`, so any block gives a
/// defined pointer.
#[inline(always)]
pub(crate) fn k_block<E: KvElem>(it: &Item<'_, E>, block: usize) -> *const E {
    it.k_cache.as_ptr().wrapping_add(k_index(it, block, 0, 0))
}

/// The two loops of a tile that a vector width implements: the scores and the V sum. [`Ymm`]
/// (AVX2, this module) and `avx512_attention::Zmm` compute the same bits (see the invariants).
pub(crate) trait TileLoops {
    /// The scaled scores of every vector of the tile against every position `p0..p1`; the
    /// contract of [`scores`].
    ///
    /// # Safety
    /// As [`scores`], and the processor supports the implementor's features and `it.head_dim`
    /// is a multiple of its [`TileLoops::DIMS`].
    unsafe fn scores<E: KvElem>(it: &Item<'_, E>, rows: &TileRows, scores: &mut [f32]);

    /// The V sums of `vectors` over the positions `range`; the contract of [`v_sum`].
    ///
    /// # Safety
    /// As [`v_sum`], and as [`TileLoops::scores`] for the features and `head_dim`.
    unsafe fn v_sum<E: KvElem>(
        it: &Item<'_, E>,
        sc: &[f32],
        vectors: std::ops::Range<usize>,
        range: std::ops::Range<usize>,
        part: *mut f32,
    );

    /// What `head_dim` must be a multiple of.
    const DIMS: usize;
}

/// The AVX2 loops: 256-bit vectors, 8 floats.
pub(crate) struct Ymm;

impl TileLoops for Ymm {
    #[inline(always)]
    unsafe fn scores<E: KvElem>(it: &Item<'_, E>, rows: &TileRows, sc: &mut [f32]) {
        // SAFETY: the caller's contract is `scores`'s.
        unsafe { scores(it, rows, sc) }
    }

    #[inline(always)]
    unsafe fn v_sum<E: KvElem>(
        it: &Item<'_, E>,
        sc: &[f32],
        vectors: std::ops::Range<usize>,
        range: std::ops::Range<usize>,
        part: *mut f32,
    ) {
        // SAFETY: the caller's contract is `v_sum`'s.
        unsafe { v_sum(it, sc, vectors, range, part) }
    }

    const DIMS: usize = 8;
}

/// One tile: scores, softmax statistics and the unnormalised V sum of every row, written as the
/// rows' records; the contract of `attention::attend_partition_scalar`, for each row. `L`
/// runs the scores and the V sum; the softmax is this module's, whatever `L`.
///
/// # Safety
/// - The processor supports AVX2, FMA and F16C, and `L`'s features.
/// - `it` satisfies the invariants listed on [`Item`], with `it.q` covering the tile's rows and
///   `it.p1` the largest end; `rows` satisfies the invariants listed on [`TileRows`].
/// - `it.head_dim % L::DIMS == 0`.
/// - `sc_buf.len() >= rows.rows * it.group * (it.p1 - it.p0)` and
///   `part.len() >= rows.rows * it.group * (it.head_dim + 2)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_tile<E: KvElem, L: TileLoops>(
    it: &Item<'_, E>,
    rows: &TileRows,
    sc_buf: &mut [f32],
    part: &mut [f32],
) {
    let hd = it.head_dim;
    debug_assert_eq!(hd % L::DIMS, 0, "the loops' vectors of dimensions");
    let n = it.p1 - it.p0;
    let vecs = rows.rows * it.group;
    // The loads give K and V divided by `LOAD_SCALE`; the queries and the weights take the
    // factor instead (exact powers of two, so the products are the same).
    let mut scaled_q = Vec::new();
    let scaled;
    let it = if E::LOAD_SCALE == 1.0 {
        it
    } else {
        scaled_q = SCALED_Q.take();
        scaled_q.clear();
        scaled_q.extend(it.q.iter().map(|&x| x * E::LOAD_SCALE));
        scaled = Item {
            q: &scaled_q,
            ..*it
        };
        &scaled
    };
    // SAFETY: the features, `head_dim`, `it`, `rows` and the length of `sc_buf` are this
    // function's contract (`it.q` has the same length, scaled or not).
    unsafe { L::scores(it, rows, sc_buf) };
    for v in 0..vecs {
        let len = rows.ends[v / it.group] - it.p0;
        let weights = &mut sc_buf[v * n..v * n + len];
        softmax_stats(weights, &mut part[v * (hd + 2)..(v + 1) * (hd + 2)]);
        if E::LOAD_SCALE != 1.0 {
            for w in weights {
                *w *= E::LOAD_SCALE;
            }
        }
    }
    // Positions every row sees with the whole tile; then each row's own tail alone.
    let common = rows.ends[..rows.rows]
        .iter()
        .copied()
        .min()
        .unwrap_or(it.p0);
    let pp = part.as_mut_ptr();
    // SAFETY: (both calls) the features, `head_dim` and `it` are the caller's; `0..vecs` and
    // the rows' vectors are vectors of the tile; `it.p0 <= common <= ends[r] <= it.p1`;
    // `sc_buf` holds `vecs * n` scores and `part` `vecs * (hd + 2)` floats, borrowed mutably
    // here.
    unsafe {
        L::v_sum(it, sc_buf, 0..vecs, it.p0..common, pp);
        for r in 0..rows.rows {
            if rows.ends[r] > common {
                let own = r * it.group..(r + 1) * it.group;
                L::v_sum(it, sc_buf, own, common..rows.ends[r], pp);
            }
        }
    }
    if E::LOAD_SCALE != 1.0 {
        SCALED_Q.set(scaled_q);
    }
}

/// Scaled scores of every vector of the tile against every position `p0..p1`, from the
/// block-transposed K cache: per run of positions, 16 (two vectors) at a time, up to [`SHARE`]
/// vectors per pass over the head dimensions, each a chain of fused multiply-adds over the
/// dimensions in order.
///
/// # Safety
/// As [`attend_tile`] (without the condition on `part`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores<E: KvElem>(it: &Item<'_, E>, rows: &TileRows, scores: &mut [f32]) {
    let vecs = rows.rows * it.group;
    // The K of the first blocks, which no earlier block asked for.
    let k_bytes = it.head_dim * it.block_size * std::mem::size_of::<E>();
    for j in 0..PREFETCH_BLOCKS {
        if let Some(b) = block_at(it, it.p0 + j * it.block_size) {
            // SAFETY: `prefetch_span` needs SSE only, and any address (it never faults).
            unsafe { prefetch_span(k_block(it, b) as *const u8, k_bytes) };
        }
    }
    for_each_run(it, |j0, block, off, len| {
        // The first group of vectors asks for the K of the block ahead.
        let mut ahead = block_ahead(it, j0).map_or(std::ptr::null(), |b| k_block(it, b));
        // And for the V of this run, which the V sum reads after the softmax.
        let v_now = it
            .v_cache
            .as_ptr()
            .wrapping_add((block * it.block_size + off) * it.kv_stride + it.head_offset);
        let v_bytes = it.head_dim * std::mem::size_of::<E>();
        for s in 0..len {
            // SAFETY: `prefetch_span` needs SSE only, and any address (it never faults).
            unsafe { prefetch_span(v_now.wrapping_add(s * it.kv_stride) as *const u8, v_bytes) };
        }
        let mut v0 = 0;
        while v0 < vecs {
            let h = (vecs - v0).min(SHARE);
            // SAFETY: (every arm) the features, `it`, `rows` and `scores` are this function's
            // contract; `v0 + h <= vecs`; the run is inside `p0..p1` (`for_each_run`).
            unsafe {
                match h {
                    1 => score_run::<E, 1>(it, rows, scores, v0, j0, block, off, len, ahead),
                    2 => score_run::<E, 2>(it, rows, scores, v0, j0, block, off, len, ahead),
                    3 => score_run::<E, 3>(it, rows, scores, v0, j0, block, off, len, ahead),
                    4 => score_run::<E, 4>(it, rows, scores, v0, j0, block, off, len, ahead),
                    5 => score_run::<E, 5>(it, rows, scores, v0, j0, block, off, len, ahead),
                    _ => score_run::<E, 6>(it, rows, scores, v0, j0, block, off, len, ahead),
                }
            }
            ahead = std::ptr::null();
            v0 += h;
        }
    });
}

/// Scores of vectors `v0 .. v0 + H` at the run's positions `j0 .. j0 + len` (relative to
/// `p0`), stored in `block` from slot `off` on: `H x 2` accumulators per 16 positions.
///
/// # Safety
/// As [`scores`]; `v0 + H <= rows.rows * it.group`; and the run is one that
/// `for_each_run(it, ..)` yields.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn score_run<E: KvElem, const H: usize>(
    it: &Item<'_, E>,
    rows: &TileRows,
    scores: &mut [f32],
    v0: usize,
    j0: usize,
    block: usize,
    off: usize,
    len: usize,
    ahead: *const E,
) {
    const VECS: usize = SCORE_VECS;
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    let q_at: [usize; H] = std::array::from_fn(|h| {
        let v = v0 + h;
        (v / it.group) * rows.q_stride + (v % it.group) * hd
    });
    // SAFETY: AVX only.
    let scale = unsafe { _mm256_set1_ps(it.scale) };
    let mut c = 0;
    while c < len {
        let lanes = (len - c).min(8 * VECS);
        // SAFETY: AVX2 (the caller's). A mask may enable no lane at all: masked loads and
        // stores then access nothing. (All lanes on for a whole run of 16.)
        let masks: [__m256i; VECS] =
            std::array::from_fn(|v| unsafe { tail_mask(lanes.saturating_sub(8 * v)) });
        let full = lanes == 8 * VECS;
        // SAFETY: AVX only.
        let mut acc = [[unsafe { _mm256_setzero_ps() }; VECS]; H];
        let k_row_bytes = it.block_size * std::mem::size_of::<E>();
        // SAFETY: `block < num_blocks` (Item invariant) and `off + c < block_size`, so the
        // K row of dimension `d < head_dim` holds `block_size - off - c` positions from
        // `k_index(.., off + c, d)` on, inside `k_cache`; the loads read `lanes <= len - c` of
        // them (a partial load only its first `lanes - 8 v`), and `off + len <= block_size`.
        // Vector `v < rows * group` is row `r = v / group < rows` and head `g = v % group`, so
        // `q_at + d < (rows - 1) * q_stride + group * head_dim <= q.len()` (TileRows
        // invariant). The pointers step by one K row and one query element per dimension. The
        // prefetches need SSE only and never fault, whatever the address they are given.
        unsafe {
            let kp = it.k_cache.as_ptr().add(k_index(it, block, off + c, 0));
            let qp: [*const f32; H] = std::array::from_fn(|h| it.q.as_ptr().add(q_at[h]));
            // The block ahead's K, one dimension's positions per step, on the first pass only
            // (later passes, and runs with no block ahead, ask again for the rows they read).
            let ask = if !ahead.is_null() && c == 0 {
                ahead as *const u8
            } else {
                kp as *const u8
            };
            // A whole run whose K rows are one line each (the default block size) takes the
            // loop without masks or a prefetch loop: the one a decode step spends its time in.
            if full && k_row_bytes <= 64 {
                dims::<E, H, true>(kp, qp, ask, hd, it.block_size, lanes, &mut acc);
            } else {
                dims::<E, H, false>(kp, qp, ask, hd, it.block_size, lanes, &mut acc);
            }
        }
        for h in 0..H {
            // SAFETY: lanes `(v0 + h) * n + j0 + c ..+ lanes` lie inside the `rows * group * n`
            // scores the caller provides: `j0 + c + lanes <= j0 + len <= n` as the run is
            // inside `p0..p1`; the masks enable exactly those lanes (all of them when `full`);
            // `scores` is borrowed mutably.
            unsafe {
                let out = scores.as_mut_ptr().add((v0 + h) * n + j0 + c);
                for v in 0..VECS {
                    let s = _mm256_mul_ps(acc[h][v], scale);
                    // Masked stores are slow on AMD cores: plain ones for a whole run.
                    if full {
                        _mm256_storeu_ps(out.add(8 * v), s);
                    } else {
                        _mm256_maskstore_ps(out.add(8 * v), masks[v], s);
                    }
                }
            }
        }
        c += lanes;
    }
}

/// The score accumulators of [`score_run`] over every dimension: `acc[h][v]` (positions
/// `8 v ..` of the run's pass) gains `q_h[d] * k_d` for `d` in `0..hd`, in order. K row `d`
/// starts `d * block_size` elements after `kp`, query `h`'s element `d` at `qp[h] + d`; each
/// step asks for the line(s) `d * block_size` elements after `ask` (same stride as K).
/// `WHOLE`: all `8 * SCORE_VECS` positions are read with plain loads (one
/// [`KvElem::load16`]) and a row is at most one line, so a step is that load, `H` broadcasts,
/// `2 H` fused multiply-adds and one prefetch.
///
/// # Safety
/// The processor supports AVX2, FMA and F16C; for every `d < hd`, `kp + d * block_size` is
/// valid for reads of `min(lanes, 8 * SCORE_VECS)` elements (all of them when `WHOLE`) and
/// `qp[h] + d` of one float.
#[inline(always)]
unsafe fn dims<E: KvElem, const H: usize, const WHOLE: bool>(
    kp: *const E,
    qp: [*const f32; H],
    ask: *const u8,
    hd: usize,
    block_size: usize,
    lanes: usize,
    acc: &mut [[__m256; SCORE_VECS]; H],
) {
    let row_bytes = block_size * std::mem::size_of::<E>();
    // The prefetch address is K's plus a fixed distance, so one pointer steps for both.
    let ask_from_k = (ask as usize).wrapping_sub(kp as usize);
    let mut kp = kp;
    // SAFETY: the loads read K rows `d < hd` and query elements `d`, which the caller
    // guarantees readable; a prefetch needs SSE only and never faults, whatever the address.
    unsafe {
        for d in 0..hd {
            let ask = (kp as *const u8).wrapping_add(ask_from_k);
            let k: [__m256; SCORE_VECS] = if WHOLE {
                _mm_prefetch::<_MM_HINT_T0>(ask as *const i8);
                E::load16(kp)
            } else {
                prefetch_span(ask, row_bytes);
                std::array::from_fn(|v| E::load_partial(kp.add(8 * v), lanes.saturating_sub(8 * v)))
            };
            for h in 0..H {
                let q = _mm256_broadcast_ss(&*qp[h].add(d));
                for v in 0..SCORE_VECS {
                    acc[h][v] = _mm256_fmadd_ps(q, k[v], acc[h][v]);
                }
            }
            kp = kp.wrapping_add(block_size);
        }
    }
}

/// Adds to the V sums of `vectors` (in their records in `part`) the positions `range` of the
/// partition, weighted by `sc`: per run of positions, 16 dimensions and up to [`SHARE`] vectors
/// at a time, the accumulators loaded from and stored back to the records, so each output stays
/// one chain of fused multiply-adds over the positions in order.
///
/// # Safety
/// The processor supports AVX2, FMA and F16C; `it` satisfies the invariants listed on [`Item`];
/// `it.head_dim % 8 == 0`; `vectors.end <= sc.len() / (it.p1 - it.p0)`;
/// `it.p0 <= range.start <= range.end <= it.p1`; `part` is valid for reads and writes of
/// `vectors.end * (it.head_dim + 2)` floats that nothing else accesses meanwhile.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn v_sum<E: KvElem>(
    it: &Item<'_, E>,
    sc: &[f32],
    vectors: std::ops::Range<usize>,
    range: std::ops::Range<usize>,
    part: *mut f32,
) {
    let n = it.p1 - it.p0;
    for_each_v_pass(it, vectors, range, 16, 8, |at, h, wide| {
        // SAFETY: (every arm) the features and `it` are the caller's; the pass is one that
        // `for_each_v_pass` yields: `at.v0 + h <= vectors.end`, `at.d0 + 16 <= hd` when
        // `wide` (two vectors) and `at.d0 + 8 <= hd` otherwise (`hd % 8 == 0`, one vector),
        // and the run's slots are `at.len` consecutive slots of one block in range, at
        // positions `at.j ..+ at.len <= n` of the scores.
        unsafe { v_run_for!(h, wide, 2, v_run(it, sc, n, at, part)) }
    });
}

/// `$run::<E, H, C>(args)` for a V-sum pass of `$h` vectors (`1..=SHARE`; more run as
/// [`SHARE`]): `C` is `$wide` vectors of dimensions when `$is_wide`, else 1. The monomorphised
/// loops of both widths are chosen by this one table.
macro_rules! v_run_for {
    ($h:expr, $is_wide:expr, $wide:literal, $run:ident($($arg:expr),*)) => {
        match ($h, $is_wide) {
            (1, true) => $run::<E, 1, $wide>($($arg),*),
            (2, true) => $run::<E, 2, $wide>($($arg),*),
            (3, true) => $run::<E, 3, $wide>($($arg),*),
            (4, true) => $run::<E, 4, $wide>($($arg),*),
            (5, true) => $run::<E, 5, $wide>($($arg),*),
            (_, true) => $run::<E, 6, $wide>($($arg),*),
            (1, false) => $run::<E, 1, 1>($($arg),*),
            (2, false) => $run::<E, 2, 1>($($arg),*),
            (3, false) => $run::<E, 3, 1>($($arg),*),
            (4, false) => $run::<E, 4, 1>($($arg),*),
            (5, false) => $run::<E, 5, 1>($($arg),*),
            (_, false) => $run::<E, 6, 1>($($arg),*),
        }
    };
}
pub(crate) use v_run_for;

/// The passes of a V sum over the positions `range` (inside `p0..p1`), in the order that keeps
/// each output one chain over the positions: for each run of positions inside one block, each
/// group of up to [`SHARE`] of `vectors`, and each span of dimensions (`wide` while that many
/// remain, else `narrow`), `f(run, vectors in the group, whether the span is wide)`. `Run::j`
/// is the run's offset in the item's scores.
#[inline(always)]
pub(crate) fn for_each_v_pass<E: KvElem>(
    it: &Item<'_, E>,
    vectors: std::ops::Range<usize>,
    range: std::ops::Range<usize>,
    wide: usize,
    narrow: usize,
    mut f: impl FnMut(&Run, usize, bool),
) {
    if range.is_empty() {
        return;
    }
    let sub = Item {
        p0: range.start,
        p1: range.end,
        ..*it
    };
    // Offset of the sub-range's positions in the scores.
    let skip = range.start - it.p0;
    for_each_run(&sub, |j0, block, off, len| {
        let mut v0 = vectors.start;
        while v0 < vectors.end {
            let h = (vectors.end - v0).min(SHARE);
            let mut d0 = 0;
            while d0 < it.head_dim {
                let is_wide = it.head_dim - d0 >= wide;
                let at = Run {
                    j: skip + j0,
                    slot: block * it.block_size + off,
                    len,
                    v0,
                    d0,
                };
                f(&at, h, is_wide);
                d0 += if is_wide { wide } else { narrow };
            }
            v0 += h;
        }
    });
}

/// Where one [`v_run`] works: positions `j .. j + len` of the scores, stored in the
/// consecutive cache slots `slot ..`, for vectors `v0 ..` and dimensions `d0 ..`.
pub(crate) struct Run {
    pub j: usize,
    pub slot: usize,
    pub len: usize,
    pub v0: usize,
    pub d0: usize,
}

/// Dimensions `d0 .. d0 + 8 * C` of the V sums of vectors `v0 .. v0 + H` over one run:
/// `H x C` accumulators, loaded from the records and stored back.
///
/// # Safety
/// As [`v_sum`], for the run `at` it describes: `at.slot + at.len` slots inside the V cache,
/// `at.j + at.len <= n`, `at.v0 + H` vectors and `at.d0 + 8 * C <= head_dim`.
#[inline(always)]
unsafe fn v_run<E: KvElem, const H: usize, const C: usize>(
    it: &Item<'_, E>,
    sc: &[f32],
    n: usize,
    at: &Run,
    part: *mut f32,
) {
    let hd = it.head_dim;
    let o_at = |h: usize, c: usize| (at.v0 + h) * (hd + 2) + 2 + at.d0 + c * 8;
    let mut acc: [[__m256; C]; H] = std::array::from_fn(|h| {
        std::array::from_fn(|c| {
            // SAFETY: record `v0 + h` is floats `(v0 + h) * (hd + 2) ..+ hd + 2` of `part`,
            // its V sum starts at offset 2, and `d0 + 8 * C <= hd` (the caller's).
            unsafe { _mm256_loadu_ps(part.add(o_at(h, c))) }
        })
    });
    // SAFETY: slot `at.slot + s` for `s < at.len` is inside the V cache and `head_offset + d0 +
    // 8 * C <= head_offset + hd <= kv_stride` (Item invariant), so floats `(at.slot + s) *
    // kv_stride + head_offset + d0 ..+ 8 * C` are inside `v_cache`; `(v0 + h) * n + j + s <
    // vectors.end * n <= sc.len()` as `j + s < n` (the caller's). The pointers step by whole
    // slots and positions only while `s < at.len`.
    unsafe {
        let mut vp = it
            .v_cache
            .as_ptr()
            .add(at.slot * it.kv_stride + it.head_offset + at.d0);
        let wp: [*const f32; H] = std::array::from_fn(|h| sc.as_ptr().add((at.v0 + h) * n + at.j));
        for s in 0..at.len {
            let v: [__m256; C] = if C == 2 {
                let pair = E::load16(vp);
                std::array::from_fn(|c| pair[c])
            } else {
                std::array::from_fn(|c| E::load8(vp.add(c * 8)))
            };
            for h in 0..H {
                let w = _mm256_broadcast_ss(&*wp[h].add(s));
                for c in 0..C {
                    acc[h][c] = _mm256_fmadd_ps(w, v[c], acc[h][c]);
                }
            }
            vp = vp.wrapping_add(it.kv_stride);
        }
    }
    for h in 0..H {
        for c in 0..C {
            // SAFETY: as the loads above; `part` is not otherwise accessed meanwhile.
            unsafe { _mm256_storeu_ps(part.add(o_at(h, c)), acc[h][c]) };
        }
    }
}

/// One vector's softmax over its positions: the max score `m`, `l = sum exp(s - m)`, and the
/// scores replaced by `exp(s - m)`; writes `[m, l, 0...]` to its record. The contract of
/// `attention::softmax_stats` for one head, with [`exp8`] for the exponentials and the sum kept
/// in 8 lanes (one fixed order: results depend on these scores only).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn softmax_stats(sc: &mut [f32], record: &mut [f32]) {
    let n = sc.len();
    let whole = n / 8;
    // The max in 8 lanes (the max is exact, so the order does not matter).
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in 0..whole {
        // SAFETY: `c * 8 + 8 <= n == sc.len()`.
        mv = _mm256_max_ps(mv, unsafe { _mm256_loadu_ps(sc.as_ptr().add(c * 8)) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
    let m = lanes
        .iter()
        .chain(&sc[whole * 8..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    for c in 0..whole {
        // SAFETY: `c * 8 + 8 <= n == sc.len()`; `sc` is borrowed mutably.
        unsafe {
            let p = sc.as_mut_ptr().add(c * 8);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    if n > whole * 8 {
        // SAFETY: the mask enables lanes `whole * 8 .. n` only, inside `sc`; masked-off lanes
        // are neither read nor written, and are zeroed before the sum.
        unsafe {
            let mask = tail_mask(n - whole * 8);
            let p = sc.as_mut_ptr().add(whole * 8);
            let e = exp8(_mm256_sub_ps(_mm256_maskload_ps(p, mask), mv));
            let e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
            _mm256_maskstore_ps(p, mask, e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    record[0] = m;
    // SAFETY: AVX is enabled on this function.
    record[1] = unsafe { hsum(acc) };
    record[2..].fill(0.0);
}
