//! AVX2 + FMA micro-kernels, for processors without AVX-512: a tile of `R` weight rows times `T`
//! activation rows for every weight format, the inner loops of paged attention, and the dot
//! product and `axpy` of the per-row ops.
//!
//! # Invariants
//!
//! - Batch invariance. Every matrix-multiply output is one dot product accumulated the same way
//!   whatever `R`, `T` or the tile it falls in: one 8-lane accumulator, fed in column order
//!   (blocks in order, and inside a block the four 8-column parts in order, one fused
//!   multiply-add each), then one fixed horizontal reduction ([`hsum`]). The tile shape only
//!   decides how many accumulators are live at once and how often a decoded block is reused,
//!   never the operations of one output. Likewise an attention score is one chain of fused
//!   multiply-adds over the head dimensions in order (8 positions per vector, whichever lanes),
//!   and an output of the V sum one chain over the partition's positions in order.
//! - Precision. Quantised blocks are decoded straight into registers, exactly as
//!   `matrix::dequantize_row` does (`d * q` for Q8_0, `d * (q - 8)` for Q4_0), except Q4_1,
//!   whose `d * q + m` is one fused multiply-add (as on the AVX-512 path). Activations stay
//!   float32; this path differs from the others only in summation order and fusing.
//! - Safety. Every function here is an `unsafe fn` with two kinds of precondition, spelled out
//!   in its `# Safety` section: the processor features (callers hold a [`super::Avx2`] token,
//!   which proves AVX2, FMA and F16C), and the extent of the memory it reads and writes through
//!   raw pointers or unchecked indexing (callers check the bounds once per kernel call, see
//!   `matmul` and `attention`). Masked loads and stores (`_mm256_mask{load,store}_ps`) access
//!   only the lanes their mask enables (masked-off lanes never fault), so a partial vector at
//!   the end of a row needs only those lanes in bounds.

// Index loops over the const-generic register arrays read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::attention::{for_each_run, for_each_slot, k_index, Item};

/// Mask enabling the first `min(lanes, 8)` lanes of a vector of 8 floats (for
/// `_mm256_maskload_ps` / `_mm256_maskstore_ps`: a lane is enabled by its top bit).
///
/// # Safety
/// The processor supports AVX2.
#[inline(always)]
unsafe fn tail_mask(lanes: usize) -> __m256i {
    let l = lanes.min(8) as i32;
    // SAFETY: AVX2 is all these need, and the caller guarantees it.
    unsafe {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(l),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

/// Sum of the 8 lanes in one fixed order: halves, then pairs, then the last two.
///
/// # Safety
/// The processor supports AVX.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX/SSE register operations only, which the caller guarantees.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// The two f16 values at `p` and `p + 2`, as f32, each broadcast to 8 lanes.
///
/// # Safety
/// The processor supports AVX2 and F16C, and `p` is valid for reads of 4 bytes (no alignment
/// needed).
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (__m256, __m256) {
    // SAFETY: the caller guarantees the features and 4 readable bytes at `p`;
    // `read_unaligned` needs no alignment.
    unsafe {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        (
            _mm256_broadcastss_ps(v),
            _mm256_broadcastss_ps(_mm_shuffle_ps::<1>(v, v)),
        )
    }
}

/// How far ahead of the weight block being multiplied the next bytes are prefetched. A chunk
/// of weight rows is one stream of bytes (rows are stored one after another), and the hardware
/// prefetchers alone leave such a stream well short of the memory bandwidth that a batch-1
/// step is bound by (measured with `examples/matmul_speed.rs` on a 2-core AMD EPYC: the 30 MB
/// output projection of SmolLM2 at one token took 6.5 ms without this and 1.85 ms with it).
const PREFETCH_BYTES: usize = 2048;

/// Ask for the cache line `PREFETCH_BYTES` past `p`.
///
/// # Safety
/// The processor supports SSE (every x86-64 does). `p` need not be valid that far: a prefetch
/// never faults, and `wrapping_add` keeps the address computation itself defined.
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead(p: *const u8) {
    // SAFETY: a prefetch is a hint that reads nothing architecturally and never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8) }
}

/// Decoding of one 32-element block in four parts of 8 floats, straight into registers.
pub(crate) trait Block {
    /// Bytes of one encoded block.
    const BYTES: usize;
    /// What a block's parts are decoded from: its address and its scale(s), broadcast.
    type Head: Copy;
    /// Read the scale(s) of the block at `p`.
    ///
    /// # Safety
    /// The processor supports AVX2, FMA and F16C, and `p` is valid for reads of `Self::BYTES`
    /// bytes (no alignment needed).
    unsafe fn head(p: *const u8) -> Self::Head;
    /// Elements `8 * k .. 8 * k + 8` of the block (`k < 4`).
    ///
    /// # Safety
    /// As [`Block::head`], for the `p` that gave `h`; and `k < 4`.
    unsafe fn part(h: Self::Head, k: usize) -> __m256;
}

/// 8 bytes at `p` (no alignment needed), zero-extended to 8 lanes of i32.
///
/// # Safety
/// The processor supports AVX2, and `p` is valid for reads of 8 bytes.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    // SAFETY: `_mm_loadl_epi64` reads exactly 8 bytes, unaligned; the caller guarantees them
    // and AVX2.
    unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) }
}

/// The nibbles of part `k` of a Q4 block whose 16 bytes of nibbles start at `qs`: parts 0 and
/// 1 are the low nibbles of bytes 0..8 and 8..16 (elements 0..16), parts 2 and 3 the high
/// nibbles of the same bytes (elements 16..32).
///
/// # Safety
/// The processor supports AVX2, `qs` is valid for reads of 16 bytes, and `k < 4`.
#[inline(always)]
unsafe fn nibbles(qs: *const u8, k: usize) -> __m256i {
    // SAFETY: `(k & 1) * 8 + 8 <= 16` bytes from `qs` are read, as the caller guarantees.
    unsafe {
        let b = u8x8(qs.add((k & 1) * 8));
        if k < 2 {
            _mm256_and_si256(b, _mm256_set1_epi32(0x0f))
        } else {
            _mm256_srli_epi32::<4>(b)
        }
    }
}

pub(crate) struct Q41;
impl Block for Q41 {
    const BYTES: usize = 20;
    type Head = (*const u8, __m256, __m256);
    #[inline(always)]
    unsafe fn head(p: *const u8) -> Self::Head {
        // SAFETY: the scale and the min are bytes 0..4 of the 20 the caller guarantees.
        let (d, m) = unsafe { f16x2(p) };
        (p, d, m)
    }
    #[inline(always)]
    unsafe fn part((p, d, m): Self::Head, k: usize) -> __m256 {
        // SAFETY: the nibbles are bytes 4..20 of the block the caller guarantees; `k < 4`.
        unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibbles(p.add(4), k)), d, m) }
    }
}

pub(crate) struct Q40;
impl Block for Q40 {
    const BYTES: usize = 18;
    type Head = (*const u8, __m256);
    #[inline(always)]
    unsafe fn head(p: *const u8) -> Self::Head {
        // SAFETY: `f16x2` reads bytes 0..4 (the scale and the first nibbles) of the 18 the
        // caller guarantees.
        let (d, _) = unsafe { f16x2(p) };
        (p, d)
    }
    #[inline(always)]
    unsafe fn part((p, d): Self::Head, k: usize) -> __m256 {
        // SAFETY: the nibbles are bytes 2..18 of the block the caller guarantees; `k < 4`.
        unsafe {
            let q = _mm256_sub_epi32(nibbles(p.add(2), k), _mm256_set1_epi32(8));
            _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
        }
    }
}

pub(crate) struct Q80;
impl Block for Q80 {
    const BYTES: usize = 34;
    type Head = (*const u8, __m256);
    #[inline(always)]
    unsafe fn head(p: *const u8) -> Self::Head {
        // SAFETY: `f16x2` reads bytes 0..4 of the 34 the caller guarantees.
        let (d, _) = unsafe { f16x2(p) };
        (p, d)
    }
    #[inline(always)]
    unsafe fn part((p, d): Self::Head, k: usize) -> __m256 {
        // SAFETY: the quants of part `k < 4` are bytes `2 + 8k .. 10 + 8k <= 34` of the block
        // the caller guarantees.
        unsafe {
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i));
            _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
        }
    }
}

/// `out[r][t] = dot(row r of w, x row t)` over the first `cols / 32 * 32` columns of a
/// block-quantised matrix. `w` points at the first row, rows `row_bytes` apart; `x` rows are
/// `x_stride` floats apart.
///
/// # Safety
/// - The processor supports AVX2, FMA and F16C.
/// - For every `r < R`, `w + r * row_bytes` is valid for reads of `cols / 32 * B::BYTES` bytes.
/// - For every `t < T`, `x + t * x_stride` is valid for reads of `cols / 32 * 32` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_blocks<B: Block, const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const f32,
    x_stride: usize,
    cols: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..cols / 32 {
        for r in 0..R {
            // SAFETY: block `b < cols / 32` of row `r < R` lies inside the bytes the caller
            // guarantees readable; the features are enabled on this function.
            let h = unsafe {
                let p = w.add(r * row_bytes + b * B::BYTES);
                prefetch_ahead(p);
                B::head(p)
            };
            for k in 0..4 {
                // SAFETY: as above, and `k < 4`.
                let wk = unsafe { B::part(h, k) };
                for t in 0..T {
                    // SAFETY: floats `b * 32 + 8k ..+ 8` of row `t < T` of `x` are readable:
                    // `b * 32 + 32 <= cols / 32 * 32`, as the caller guarantees.
                    let xv = unsafe { _mm256_loadu_ps(x.add(t * x_stride + b * 32 + k * 8)) };
                    acc[r][t] = _mm256_fmadd_ps(wk, xv, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the features are enabled on this function.
            out[r][t] = unsafe { hsum(acc[r][t]) };
        }
    }
}

/// `out[r][t] = dot(row r of w, x row t)` over `cols` columns of an f32 matrix with rows
/// `w_stride` floats apart; `x` rows are `x_stride` floats apart.
///
/// # Safety
/// - The processor supports AVX2 and FMA.
/// - For every `r < R`, `w + r * w_stride` is valid for reads of `cols` floats.
/// - For every `t < T`, `x + t * x_stride` is valid for reads of `cols` floats.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_f32<const R: usize, const T: usize>(
    w: *const f32,
    w_stride: usize,
    x: *const f32,
    x_stride: usize,
    cols: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let whole = cols / 8;
    for c in 0..whole {
        for r in 0..R {
            // SAFETY: floats `c * 8 ..+ 8 <= cols` of row `r` are readable (caller).
            let wv = unsafe { _mm256_loadu_ps(w.add(r * w_stride + c * 8)) };
            for t in 0..T {
                // SAFETY: as above, for row `t` of `x`.
                let xv = unsafe { _mm256_loadu_ps(x.add(t * x_stride + c * 8)) };
                acc[r][t] = _mm256_fmadd_ps(wv, xv, acc[r][t]);
            }
        }
    }
    if cols > whole * 8 {
        // SAFETY: AVX2 is enabled on this function.
        let mask = unsafe { tail_mask(cols - whole * 8) };
        for r in 0..R {
            // SAFETY: the mask enables lanes `whole * 8 .. cols` of row `r`, which the caller
            // guarantees readable; masked-off lanes are not accessed.
            let wv = unsafe { _mm256_maskload_ps(w.add(r * w_stride + whole * 8), mask) };
            for t in 0..T {
                // SAFETY: as above, for row `t` of `x`.
                let xv = unsafe { _mm256_maskload_ps(x.add(t * x_stride + whole * 8), mask) };
                acc[r][t] = _mm256_fmadd_ps(wv, xv, acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the features are enabled on this function.
            out[r][t] = unsafe { hsum(acc[r][t]) };
        }
    }
}

/// Dot product over the first `min(a.len(), b.len())` elements: one 8-lane accumulator, a
/// masked last vector, then [`hsum`].
///
/// # Safety
/// The processor supports AVX2 and FMA. (Bounds come from the slices.)
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let whole = n / 8;
    for c in 0..whole {
        // SAFETY: elements `c * 8 ..+ 8 <= n` are inside both slices.
        let (av, bv) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(c * 8)),
                _mm256_loadu_ps(b.as_ptr().add(c * 8)),
            )
        };
        acc = _mm256_fmadd_ps(av, bv, acc);
    }
    if n > whole * 8 {
        // SAFETY: the mask enables elements `whole * 8 .. n`, inside both slices; masked-off
        // lanes are not accessed.
        let (av, bv) = unsafe {
            let mask = tail_mask(n - whole * 8);
            (
                _mm256_maskload_ps(a.as_ptr().add(whole * 8), mask),
                _mm256_maskload_ps(b.as_ptr().add(whole * 8), mask),
            )
        };
        acc = _mm256_fmadd_ps(av, bv, acc);
    }
    // SAFETY: the features are enabled on this function.
    unsafe { hsum(acc) }
}

/// `y += a * x` over the first `min(x.len(), y.len())` elements (fused multiply-adds).
///
/// # Safety
/// The processor supports AVX2 and FMA. (Bounds come from the slices.)
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let av = _mm256_set1_ps(a);
    let whole = n / 8;
    for c in 0..whole {
        // SAFETY: elements `c * 8 ..+ 8 <= n` are inside both slices; `y` is borrowed
        // mutably, so the store races with nothing.
        unsafe {
            let yp = y.as_mut_ptr().add(c * 8);
            let xv = _mm256_loadu_ps(x.as_ptr().add(c * 8));
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(yp)));
        }
    }
    if n > whole * 8 {
        // SAFETY: the mask enables elements `whole * 8 .. n`, inside both slices; masked-off
        // lanes are neither read nor written.
        unsafe {
            let mask = tail_mask(n - whole * 8);
            let yp = y.as_mut_ptr().add(whole * 8);
            let xv = _mm256_maskload_ps(x.as_ptr().add(whole * 8), mask);
            let yv = _mm256_maskload_ps(yp, mask);
            _mm256_maskstore_ps(yp, mask, _mm256_fmadd_ps(av, xv, yv));
        }
    }
}

/// Scaled scores of every query head of the group against every position of the partition,
/// from the block-transposed K cache: 16 positions (two vectors) per pass, one fused
/// multiply-add per dimension, query head and vector, each K value loaded once for up to 3
/// query heads (larger groups take several passes of 3). Every score is one chain of fused
/// multiply-adds over the dimensions in order, whatever lanes it falls in.
///
/// # Safety
/// The processor supports AVX2 and FMA; `it` satisfies the invariants listed on [`Item`]; and
/// `scores.len() >= it.group * (it.p1 - it.p0)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores(it: &Item<'_>, scores: &mut [f32]) {
    let mut g0 = 0;
    while g0 < it.group {
        let gs = (it.group - g0).min(3);
        // SAFETY: (every arm) the features, `it` and `scores` are this function's contract;
        // `g0 + gs <= group`.
        unsafe {
            match gs {
                1 => score_heads::<1>(it, scores, g0),
                2 => score_heads::<2>(it, scores, g0),
                _ => score_heads::<3>(it, scores, g0),
            }
        }
        g0 += gs;
    }
}

/// The scores of query heads `g0 .. g0 + H` (see [`scores`]): `H x 2` accumulators, which a
/// constant `H` keeps in registers (with the two masks, two K vectors and a query broadcast:
/// 11 of the 16 vector registers for `H = 3`).
///
/// # Safety
/// As [`scores`], and `g0 + H <= it.group`.
#[inline(always)]
unsafe fn score_heads<const H: usize>(it: &Item<'_>, scores: &mut [f32], g0: usize) {
    // Positions are contiguous only inside a block (16 slots by default): two vectors.
    const VECS: usize = 2;
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    // SAFETY: AVX only.
    let scale = unsafe { _mm256_set1_ps(it.scale) };
    for_each_run(it, |j0, block, off, len| {
        let mut c = 0;
        while c < len {
            let lanes = (len - c).min(8 * VECS);
            // SAFETY: AVX2 (the caller's). A mask may enable no lane at all: masked loads
            // and stores then access nothing. (All lanes on for a whole run of 16.)
            let masks: [__m256i; VECS] =
                std::array::from_fn(|v| unsafe { tail_mask(lanes.saturating_sub(8 * v)) });
            let full = lanes == 8 * VECS;
            // SAFETY: AVX only.
            let mut acc = [[unsafe { _mm256_setzero_ps() }; VECS]; H];
            for d in 0..hd {
                // SAFETY: `block < num_blocks` (Item invariant) and `d < head_dim`, so
                // `k_index(.., off + c, d)` starts a run of `block_size - off - c` positions of
                // one K row inside `k_cache`; the masks enable `lanes <= len - c` of them, and
                // `off + len <= block_size`. `(g0 + g) * hd + d < group * head_dim <= q.len()`
                // (Item invariant), since `g0 + g < group` and `d < hd`.
                unsafe {
                    let kp = it.k_cache.as_ptr().add(k_index(it, block, off + c, d));
                    // A whole run takes plain loads (masked ones are slower on some cores).
                    let k: [__m256; VECS] = if full {
                        std::array::from_fn(|v| _mm256_loadu_ps(kp.add(8 * v)))
                    } else {
                        std::array::from_fn(|v| _mm256_maskload_ps(kp.add(8 * v), masks[v]))
                    };
                    for g in 0..H {
                        let q = _mm256_set1_ps(*it.q.get_unchecked((g0 + g) * hd + d));
                        for v in 0..VECS {
                            acc[g][v] = _mm256_fmadd_ps(q, k[v], acc[g][v]);
                        }
                    }
                }
            }
            for g in 0..H {
                // SAFETY: lanes `(g0 + g) * n + j0 + c ..+ lanes` lie inside the `group * n`
                // scores the caller provides: `j0 + c + lanes <= j0 + len <= n` as
                // `for_each_run` covers `0..n`; the masks enable exactly those lanes; `scores`
                // is borrowed mutably.
                unsafe {
                    let out = scores.as_mut_ptr().add((g0 + g) * n + j0 + c);
                    for v in 0..VECS {
                        _mm256_maskstore_ps(
                            out.add(8 * v),
                            masks[v],
                            _mm256_mul_ps(acc[g][v], scale),
                        );
                    }
                }
            }
            c += lanes;
        }
    });
}

/// Dimensions `d0 .. d0 + 8 * C` of the unnormalised `sum_j sc[j] v_j` of query heads
/// `g0 .. g0 + H` over the partition, kept in `H x C` registers across all positions (each V
/// vector is loaded once for the `H` heads), stored at `part`'s records of those heads. Every
/// output is one chain of fused multiply-adds over the positions in order, whatever `H` and
/// `C`.
///
/// # Safety
/// The processor supports AVX2 and FMA; `it` satisfies the invariants listed on [`Item`];
/// `g0 + H <= it.group`; `d0 + 8 * C <= it.head_dim`; `sc.len() >= it.group * (it.p1 -
/// it.p0)`; `part` is valid for writes of `it.group * (it.head_dim + 2)` floats that nothing
/// else accesses meanwhile.
#[inline(always)]
unsafe fn vsum<const H: usize, const C: usize>(
    it: &Item<'_>,
    sc: &[f32],
    g0: usize,
    d0: usize,
    part: *mut f32,
) {
    let n = it.p1 - it.p0;
    let hd = it.head_dim;
    // SAFETY: AVX only.
    let mut acc = [[unsafe { _mm256_setzero_ps() }; C]; H];
    for_each_slot(it, |j, slot| {
        // SAFETY: `slot < num_blocks * block_size` (Item invariant: `for_each_slot` yields
        // slots of blocks in range) and `head_offset + d0 + 8 * C <= head_offset + hd <=
        // kv_stride`, so floats `slot * kv_stride + head_offset + d0 ..+ 8 * C` are inside
        // `v_cache`; `(g0 + h) * n + j < group * n <= sc.len()` as `j < n`.
        unsafe {
            let vp = it
                .v_cache
                .as_ptr()
                .add(slot * it.kv_stride + it.head_offset + d0);
            // The weights of the H heads, then one V vector at a time: H x C accumulators +
            // H weights + 1 vector = 16 registers for H = 3, C = 4.
            let w: [__m256; H] =
                std::array::from_fn(|h| _mm256_set1_ps(*sc.get_unchecked((g0 + h) * n + j)));
            for c in 0..C {
                let v = _mm256_loadu_ps(vp.add(c * 8));
                for h in 0..H {
                    acc[h][c] = _mm256_fmadd_ps(w[h], v, acc[h][c]);
                }
            }
        }
    });
    for h in 0..H {
        for c in 0..C {
            // SAFETY: head `g0 + h`'s record is floats `(g0 + h) * (hd + 2) ..+ hd + 2` of
            // `part`; its V sum starts at offset 2, and `d0 + c * 8 + 8 <= hd`.
            unsafe { _mm256_storeu_ps(part.add((g0 + h) * (hd + 2) + 2 + d0 + c * 8), acc[h][c]) };
        }
    }
}

/// `e^x` in each lane, within 2 ulp of the correctly rounded result for `x` in
/// `[-87.3, 88.7]`; lanes below that give 0 (the softmax only takes `e^(s - max)`, so its
/// arguments are `<= 0`). Range reduction `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 split
/// in two parts so `r` is exact to float precision), a degree-6 polynomial for `e^r`
/// (Cephes' `expf` coefficients), then `2^n` put into the exponent bits.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register operations of AVX2 and FMA only, which the caller guarantees.
    unsafe {
        let lo = _mm256_set1_ps(-87.336_55);
        let hi = _mm256_set1_ps(88.722_83);
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n: n + 127 in the exponent field (n is in [-126, 128] after the clamp; 2^128
        // overflows to infinity as expf does).
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let scaled = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
        _mm256_andnot_ps(underflow, scaled)
    }
}

/// For each query head of the group: the partition's max score `m`, `l = sum exp(s - m)`,
/// and the scores replaced by `exp(s - m)`; writes `[m, l, 0...]` to the head's record in
/// `part`. Same contract as `attention::softmax_stats`, with [`exp8`] for the exponentials and
/// the sum kept in 8 lanes (one fixed order per partition: results depend on the partition's
/// scores only).
///
/// # Safety
/// The processor supports AVX2 and FMA; `scores.len() >= it.group * (it.p1 - it.p0)` and
/// `part.len() >= it.group * (it.head_dim + 2)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_stats8(it: &Item<'_>, scores: &mut [f32], part: &mut [f32]) {
    let hd = it.head_dim;
    let n = it.p1 - it.p0;
    let whole = n / 8;
    for g in 0..it.group {
        let sc = &mut scores[g * n..(g + 1) * n];
        let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
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
            // SAFETY: the mask enables lanes `whole * 8 .. n` only, inside `sc`; masked-off
            // lanes are neither read nor written, and are zeroed before the sum.
            unsafe {
                let mask = tail_mask(n - whole * 8);
                let p = sc.as_mut_ptr().add(whole * 8);
                let e = exp8(_mm256_sub_ps(_mm256_maskload_ps(p, mask), mv));
                let e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
                _mm256_maskstore_ps(p, mask, e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let head = &mut part[g * (hd + 2)..(g + 1) * (hd + 2)];
        head[0] = m;
        // SAFETY: AVX is enabled on this function.
        head[1] = unsafe { hsum(acc) };
        head[2..].fill(0.0);
    }
}

/// One attention partition with AVX2; the contract is `attention::attend_partition_scalar`'s.
/// The weighted V sum of each query head is kept in registers, 64 dimensions (8 vectors) at a
/// time, across all positions.
///
/// # Safety
/// - The processor supports AVX2 and FMA.
/// - `it` satisfies the invariants listed on [`Item`].
/// - `it.head_dim % 8 == 0`.
/// - `sc_buf.len() >= it.group * (it.p1 - it.p0)` and
///   `part.len() >= it.group * (it.head_dim + 2)`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn attend_partition(it: &Item<'_>, sc_buf: &mut [f32], part: &mut [f32]) {
    let hd = it.head_dim;
    // SAFETY: the features, `it` and the length of `sc_buf` are as `scores` requires, by this
    // function's own contract.
    unsafe { scores(it, sc_buf) };
    // SAFETY: the features and the lengths of `sc_buf` and `part` are this function's own
    // contract.
    unsafe { softmax_stats8(it, sc_buf, part) };
    // Heads in groups of up to 3 and dimensions 32 at a time: 12 accumulators, and each V
    // vector loaded once per group of heads.
    let pp = part.as_mut_ptr();
    let mut g0 = 0;
    while g0 < it.group {
        let heads = (it.group - g0).min(3);
        let mut d0 = 0;
        while d0 < hd {
            let vecs = ((hd - d0) / 8).min(4);
            // SAFETY: (every arm) the features and `it` are the caller's; `g0 + heads <=
            // group`; `hd % 8 == 0`, so `d0 + 8 * vecs <= hd`; `sc_buf` holds `group * n`
            // scores and `part` `group * (hd + 2)` floats (this function's contract), and
            // `part` is borrowed mutably here.
            unsafe {
                match (heads, vecs) {
                    (1, 1) => vsum::<1, 1>(it, sc_buf, g0, d0, pp),
                    (1, 2) => vsum::<1, 2>(it, sc_buf, g0, d0, pp),
                    (1, 3) => vsum::<1, 3>(it, sc_buf, g0, d0, pp),
                    (1, _) => vsum::<1, 4>(it, sc_buf, g0, d0, pp),
                    (2, 1) => vsum::<2, 1>(it, sc_buf, g0, d0, pp),
                    (2, 2) => vsum::<2, 2>(it, sc_buf, g0, d0, pp),
                    (2, 3) => vsum::<2, 3>(it, sc_buf, g0, d0, pp),
                    (2, _) => vsum::<2, 4>(it, sc_buf, g0, d0, pp),
                    (_, 1) => vsum::<3, 1>(it, sc_buf, g0, d0, pp),
                    (_, 2) => vsum::<3, 2>(it, sc_buf, g0, d0, pp),
                    (_, 3) => vsum::<3, 3>(it, sc_buf, g0, d0, pp),
                    (_, _) => vsum::<3, 4>(it, sc_buf, g0, d0, pp),
                }
            }
            d0 += 8 * vecs;
        }
        g0 += heads;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp8_is_within_2_ulp_of_the_rounded_exponential_and_underflows_to_zero() {
        if super::super::Avx2::detect().is_none() {
            eprintln!("no AVX2 here: nothing to check");
            return;
        }
        let mut worst = 0;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let xs = [
                x,
                x * 0.5,
                x * 0.25,
                x * 0.125,
                x * 1e-2,
                x * 1e-4,
                x * 1e-7,
                0.0,
            ];
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected above; `got` holds 8 floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (x as f64).exp() as f32;
                worst = worst.max(ulps(g, want));
                assert!(ulps(g, want) <= 2, "exp({x}) = {g}, want {want}");
            }
            x += 0.0137;
        }
        eprintln!("exp8: worst error {worst} ulp");
        let xs = [
            -88.0f32,
            -100.0,
            -1e30,
            f32::NEG_INFINITY,
            -87.5,
            -90.0,
            -200.0,
            -1e4,
        ];
        let mut got = [1f32; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
        assert_eq!(got, [0.0; 8], "below -87.34 the softmax weight is 0");
    }
}
