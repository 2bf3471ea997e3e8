//! Paged attention's score and V-sum loops on 512-bit vectors (AVX-512F, BW and VL), run by the
//! tile driver of `avx2_attention` ([`TileLoops`]): a vector holds 16 positions of a score pass
//! or 16 dimensions of a V sum, where AVX2's holds 8.
//!
//! # Invariants
//!
//! - The bits of the AVX2 loops. A score lane is the same chain of fused multiply-adds over the
//!   head dimensions in order, from zero, then one multiply by the scale; a V-sum lane is the
//!   same chain over the positions in order, from the record's value. What changes is how many
//!   lanes an instruction has and which independent chains run side by side: a score pass
//!   takes up to [`CHUNKS`] runs of 16 positions at once (a decode step's 3 query heads per KV
//!   head then have 12 chains in flight, not 3 of 16 lanes or 6 of 8), and a V pass 64
//!   dimensions at once. The softmax between them is `avx2_attention`'s. So these tiles give
//!   the AVX2 path's outputs on every cache element type, and its batch invariance.
//! - Safety: callers hold a [`Zmm`] token (the features) and pass items that
//!   `attention::try_paged_attention` checked, as for the AVX2 loops; the loads stay inside
//!   the blocks the item's runs name.
//! - Prefetching, which changes no value: each run asks for the K of the block [`AHEAD`]
//!   blocks on (far enough to cover the runs a pass waits to collect) and for its own V.

// Index loops over the const-generic register arrays read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::attention::{for_each_run, k_index, Item, TileRows};
use super::avx2::prefetch_span;
use super::avx2_attention::{block_at, for_each_v_pass, k_block, v_run_for, Run, TileLoops, SHARE};
use super::kv_elem::{mask16, KvElem};

/// Proof that the running processor has AVX-512F, AVX-512BW and AVX-512VL besides AVX2, FMA
/// and F16C: the only way to get one is [`Zmm::detect`]. It also names the 512-bit
/// [`TileLoops`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Zmm {
    _detected: (),
}

impl Zmm {
    /// A token if the processor has the features, else `None`.
    pub(crate) fn detect() -> Option<Zmm> {
        super::has_avx512_bw_vl().then_some(Zmm { _detected: () })
    }
}

/// Runs of 16 positions one score pass takes at once: with [`SHARE`] vectors, 24 accumulators,
/// four K vectors and a broadcast, 29 of the 32 registers.
const CHUNKS: usize = 4;

/// How many blocks ahead of the run being collected a run asks for K: a pass runs once
/// [`CHUNKS`] runs have been collected, so the K it reads was asked for at least two blocks'
/// work earlier.
const AHEAD: usize = CHUNKS + 2;

/// Up to 16 consecutive positions of one run: their K of dimension 0 at `k` in the K cache
/// (dimension `d` at `k + d * block_size`), their scores from offset `j` of each vector's.
#[derive(Clone, Copy, Default)]
struct Chunk {
    k: usize,
    j: usize,
    lanes: usize,
}

impl TileLoops for Zmm {
    #[inline(always)]
    unsafe fn scores<E: KvElem>(it: &Item<'_, E>, rows: &TileRows, sc: &mut [f32]) {
        // SAFETY: the caller's contract: `scores`'s, with this type's features and
        // `head_dim % 16 == 0`.
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
        // SAFETY: the caller's contract: `v_sum`'s, with this type's features and
        // `head_dim % 16 == 0`.
        unsafe { v_sum(it, sc, vectors, range, part) }
    }

    const DIMS: usize = 16;
}

/// `avx2_attention::scores` on 512-bit vectors: the scaled scores of every vector of the tile
/// against every position `p0..p1`, each a chain of fused multiply-adds over the dimensions in
/// order. Whole runs of 16 positions wait until [`CHUNKS`] of them can share a pass; a shorter
/// one (a partial block) runs at once with masked loads and stores.
///
/// # Safety
/// The processor supports AVX-512F, BW and VL, AVX2, FMA and F16C; `it` satisfies the
/// invariants listed on [`Item`], with `it.q` covering the tile's rows; `rows` satisfies those
/// on [`TileRows`]; `it.head_dim % 16 == 0`; `scores.len() >= rows.rows * it.group *
/// (it.p1 - it.p0)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scores<E: KvElem>(it: &Item<'_, E>, rows: &TileRows, scores: &mut [f32]) {
    let k_bytes = it.head_dim * it.block_size * E::BYTES;
    let v_bytes = it.head_dim * E::BYTES;
    // The K of the first blocks, which no earlier run asked for.
    for j in 0..AHEAD {
        if let Some(b) = block_at(it, it.p0 + j * it.block_size) {
            // SAFETY: `prefetch_span` needs SSE only, and any address (it never faults).
            unsafe { prefetch_span(k_block(it, b) as *const u8, k_bytes) };
        }
    }
    let mut waiting = [Chunk::default(); CHUNKS];
    let mut n_waiting = 0;
    for_each_run(it, |j0, block, off, len| {
        if let Some(b) = block_at(it, it.p0 + j0 + AHEAD * it.block_size) {
            // SAFETY: as above.
            unsafe { prefetch_span(k_block(it, b) as *const u8, k_bytes) };
        }
        // The V of this run, which the V sum reads after the softmax.
        let v_now = it
            .v_cache
            .as_ptr()
            .wrapping_add((block * it.block_size + off) * it.kv_stride + it.head_offset);
        for s in 0..len {
            // SAFETY: as above.
            unsafe { prefetch_span(v_now.wrapping_add(s * it.kv_stride) as *const u8, v_bytes) };
        }
        let mut c = 0;
        while c < len {
            let lanes = (len - c).min(16);
            let chunk = Chunk {
                k: k_index(it, block, off + c, 0),
                j: j0 + c,
                lanes,
            };
            // SAFETY: (both calls) the features, `it`, `rows`, `head_dim` and `scores` are
            // this function's contract; the chunk's positions are `lanes` consecutive slots
            // `off + c ..` of one block of the run (`off + c + lanes <= off + len <=
            // block_size`), inside `p0..p1` (`for_each_run`).
            unsafe {
                if lanes == 16 {
                    waiting[n_waiting] = chunk;
                    n_waiting += 1;
                    if n_waiting == CHUNKS {
                        pass_vectors::<E, CHUNKS, false>(it, rows, scores, &waiting);
                        n_waiting = 0;
                    }
                } else {
                    pass_vectors::<E, 1, true>(it, rows, scores, &[chunk]);
                }
            }
            c += lanes;
        }
    });
    for chunk in &waiting[..n_waiting] {
        // SAFETY: as above, for a whole chunk collected earlier.
        unsafe { pass_vectors::<E, 1, false>(it, rows, scores, &[*chunk]) };
    }
}

/// The scores of every vector of the tile at the positions of `chunks`, [`SHARE`] vectors per
/// pass. `MASKED`: the chunks may hold fewer than 16 positions (their `lanes`); else each holds
/// 16.
///
/// # Safety
/// As [`scores`]; each chunk is `lanes` consecutive slots of one block of the item, at
/// positions inside `p0..p1`.
#[inline(always)]
unsafe fn pass_vectors<E: KvElem, const B: usize, const MASKED: bool>(
    it: &Item<'_, E>,
    rows: &TileRows,
    scores: &mut [f32],
    chunks: &[Chunk; B],
) {
    let vecs = rows.rows * it.group;
    let mut v0 = 0;
    while v0 < vecs {
        let h = (vecs - v0).min(SHARE);
        // SAFETY: (every arm) the caller's contract, and `v0 + h <= vecs`.
        unsafe {
            match h {
                1 => pass::<E, 1, B, MASKED>(it, rows, scores, v0, chunks),
                2 => pass::<E, 2, B, MASKED>(it, rows, scores, v0, chunks),
                3 => pass::<E, 3, B, MASKED>(it, rows, scores, v0, chunks),
                4 => pass::<E, 4, B, MASKED>(it, rows, scores, v0, chunks),
                5 => pass::<E, 5, B, MASKED>(it, rows, scores, v0, chunks),
                _ => pass::<E, 6, B, MASKED>(it, rows, scores, v0, chunks),
            }
        }
        v0 += h;
    }
}

/// Scores of vectors `v0 .. v0 + H` at the positions of `B` chunks: `H x B` accumulators, one
/// K load per chunk and dimension shared by the `H` vectors.
///
/// # Safety
/// As [`pass_vectors`], and `v0 + H <= rows.rows * it.group`.
#[inline(always)]
unsafe fn pass<E: KvElem, const H: usize, const B: usize, const MASKED: bool>(
    it: &Item<'_, E>,
    rows: &TileRows,
    scores: &mut [f32],
    v0: usize,
    chunks: &[Chunk; B],
) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    let q_at: [usize; H] = std::array::from_fn(|h| {
        let v = v0 + h;
        (v / it.group) * rows.q_stride + (v % it.group) * hd
    });
    // SAFETY: (the whole body) AVX-512F, BW, VL, AVX2 and F16C are the caller's. Chunk `b`
    // starts at `k_index(.., block, s, 0)` for a slot `s` of a block in range with `s + lanes
    // <= block_size`, so the `lanes` elements of its K row `d < head_dim`, `d * block_size`
    // further, lie inside that block's rows of the KV head, inside `k_cache` (Item
    // invariants); the loads read those only (all 16 unless `MASKED`). Vector `v < rows *
    // group` is row `v / group < rows` and head `v % group`, so `q_at + d < (rows - 1) *
    // q_stride + group * head_dim <= q.len()` (TileRows invariant). A store writes lanes
    // `(v0 + h) * n + j ..+ lanes` of `scores`, inside its `rows * group * n` floats as
    // `j + lanes <= n`; the masks enable exactly those lanes. `scores` is borrowed mutably.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); B]; H];
        let qp: [*const f32; H] = std::array::from_fn(|h| it.q.as_ptr().add(q_at[h]));
        let mut kp: [*const E; B] = std::array::from_fn(|b| it.k_cache.as_ptr().add(chunks[b].k));
        for d in 0..hd {
            let k: [__m512; B] = std::array::from_fn(|b| {
                if MASKED {
                    E::load_partial_512(kp[b], chunks[b].lanes)
                } else {
                    E::load16_512(kp[b])
                }
            });
            for h in 0..H {
                let q = _mm512_set1_ps(*qp[h].add(d));
                for b in 0..B {
                    acc[h][b] = _mm512_fmadd_ps(q, k[b], acc[h][b]);
                }
            }
            for b in 0..B {
                kp[b] = kp[b].wrapping_add(it.block_size);
            }
        }
        let scale = _mm512_set1_ps(it.scale);
        for h in 0..H {
            for b in 0..B {
                let s = _mm512_mul_ps(acc[h][b], scale);
                let out = scores.as_mut_ptr().add((v0 + h) * n + chunks[b].j);
                if MASKED {
                    _mm512_mask_storeu_ps(out, mask16(chunks[b].lanes), s);
                } else {
                    _mm512_storeu_ps(out, s);
                }
            }
        }
    }
}

/// `avx2_attention::v_sum` on 512-bit vectors: adds to the V sums of `vectors` (in their
/// records in `part`) the positions `range` of the partition, weighted by `sc`; per run of
/// positions, 64 dimensions (16 where fewer remain) and up to [`SHARE`] vectors at a time, so
/// each output stays one chain of fused multiply-adds over the positions in order.
///
/// # Safety
/// The processor supports AVX-512F, BW and VL, AVX2, FMA and F16C; `it` satisfies the
/// invariants listed on [`Item`]; `it.head_dim % 16 == 0`; `vectors.end <= sc.len() /
/// (it.p1 - it.p0)`; `it.p0 <= range.start <= range.end <= it.p1`; `part` is valid for reads
/// and writes of `vectors.end * (it.head_dim + 2)` floats that nothing else accesses meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn v_sum<E: KvElem>(
    it: &Item<'_, E>,
    sc: &[f32],
    vectors: std::ops::Range<usize>,
    range: std::ops::Range<usize>,
    part: *mut f32,
) {
    let n = it.p1 - it.p0;
    for_each_v_pass(it, vectors, range, 64, 16, |at, h, wide| {
        // SAFETY: (every arm) the features and `it` are the caller's; the pass is one that
        // `for_each_v_pass` yields: `at.v0 + h <= vectors.end`, `at.d0 + 64 <= hd` when
        // `wide` (four vectors) and `at.d0 + 16 <= hd` otherwise (`hd % 16 == 0`, one
        // vector), and the run's slots are `at.len` consecutive slots of one block in range,
        // at positions `at.j ..+ at.len <= n` of the scores.
        unsafe { v_run_for!(h, wide, 4, v_run(it, sc, n, at, part)) }
    });
}

/// Dimensions `d0 .. d0 + 16 * C` of the V sums of vectors `v0 .. v0 + H` over one run:
/// `H x C` accumulators, loaded from the records and stored back.
///
/// # Safety
/// As [`v_sum`], for the run `at` it describes: `at.slot + at.len` slots inside the V cache,
/// `at.j + at.len <= n`, `at.v0 + H` vectors and `at.d0 + 16 * C <= head_dim`.
#[inline(always)]
unsafe fn v_run<E: KvElem, const H: usize, const C: usize>(
    it: &Item<'_, E>,
    sc: &[f32],
    n: usize,
    at: &Run,
    part: *mut f32,
) {
    let hd = it.head_dim;
    let o_at = |h: usize, c: usize| (at.v0 + h) * (hd + 2) + 2 + at.d0 + c * 16;
    // SAFETY: (the whole body) AVX-512F, AVX2 and F16C are the caller's. Record `v0 + h` is
    // floats `(v0 + h) * (hd + 2) ..+ hd + 2` of `part`, its V sum starts at offset 2, and
    // `d0 + 16 * C <= hd`. Slot `at.slot + s` for `s < at.len` is inside the V cache and
    // `head_offset + d0 + 16 * C <= head_offset + hd <= kv_stride` (Item invariant), so
    // elements `(at.slot + s) * kv_stride + head_offset + d0 ..+ 16 * C` are inside
    // `v_cache`; `(v0 + h) * n + j + s < vectors.end * n <= sc.len()` as `j + s < n`. The
    // pointers step by whole slots and positions only while `s < at.len`. `part` is not
    // otherwise accessed meanwhile.
    unsafe {
        let mut acc: [[__m512; C]; H] =
            std::array::from_fn(|h| std::array::from_fn(|c| _mm512_loadu_ps(part.add(o_at(h, c)))));
        let mut vp = it
            .v_cache
            .as_ptr()
            .add(at.slot * it.kv_stride + it.head_offset + at.d0);
        let wp: [*const f32; H] = std::array::from_fn(|h| sc.as_ptr().add((at.v0 + h) * n + at.j));
        for s in 0..at.len {
            let v: [__m512; C] = std::array::from_fn(|c| E::load16_512(vp.add(c * 16)));
            for h in 0..H {
                let w = _mm512_set1_ps(*wp[h].add(s));
                for c in 0..C {
                    acc[h][c] = _mm512_fmadd_ps(w, v[c], acc[h][c]);
                }
            }
            vp = vp.wrapping_add(it.kv_stride);
        }
        for h in 0..H {
            for c in 0..C {
                _mm512_storeu_ps(part.add(o_at(h, c)), acc[h][c]);
            }
        }
    }
}
