//! AVX2 + FMA micro-kernels, for processors without AVX-512: a tile of `R` weight rows times `T`
//! activation rows for every weight format, and the dot product and `axpy` of the per-row ops.
//! (Paged attention's are in `avx2_attention`.)
//!
//! # Invariants
//!
//! - Batch invariance. Every matrix-multiply output is one dot product accumulated the same way
//!   whatever `R`, `T` or the tile it falls in: one 8-lane accumulator, fed in column order
//!   (blocks in order, and inside a block the four 8-column parts in order, one fused
//!   multiply-add each), then one fixed horizontal reduction ([`hsum`]). The tile shape only
//!   decides how many accumulators are live at once and how often a decoded block is reused,
//!   never the operations of one output.
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

/// Mask enabling the first `min(lanes, 8)` lanes of a vector of 8 floats (for
/// `_mm256_maskload_ps` / `_mm256_maskstore_ps`: a lane is enabled by its top bit).
///
/// # Safety
/// The processor supports AVX2.
#[inline(always)]
pub(crate) unsafe fn tail_mask(lanes: usize) -> __m256i {
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

/// The least distance, in bytes, at which a kernel prefetches the weights it will read. A
/// chunk of weight rows is one stream of bytes (rows are stored one after another), and the
/// hardware prefetchers alone leave such a stream well short of the memory bandwidth that a
/// batch-1 step is bound by (measured with `examples/matmul_speed.rs` on a 2-core AMD EPYC:
/// the 30 MB output projection of SmolLM2 at one token took 6.5 ms without prefetching and
/// 1.85 ms with it).
const PREFETCH_BYTES: usize = 2048;

/// Prefetch for a tile of weight rows that a kernel walks block by block, all of its rows in
/// step: the tile is the `tile_bytes` bytes at `tile` (its rows, one after another), and each
/// block step reads `step_bytes` of them (one block of each row), so it is consumed at an
/// even pace but out of address order. This asks for the lines `step_bytes` long at the same
/// pace in address order, at least one whole tile and at least [`PREFETCH_BYTES`] ahead: by
/// the time a kernel starts the next tile, all of its lines have been asked for.
/// (Prefetching [`PREFETCH_BYTES`] past each row's own block instead lands inside the tile
/// being read whenever that is shorter than the tile, and the next tile's later rows are
/// asked for late. Measured with `examples/matmul_speed.rs` on a 2-core AMD EPYC, one token,
/// fast precision: the 576x1536 down projection streamed at 8.8 GB/s that way and 15.1 GB/s
/// this way, the 30 MB output projection took 3.0 ms and 1.5 ms, a whole decode step's
/// matrices 9.7 ms and 7.2 ms.)
///
/// # Safety
/// The processor supports SSE (every x86-64 does). The addresses need not be valid: a
/// prefetch never faults, and `wrapping_add` keeps the address computation itself defined.
#[inline(always)]
pub(crate) unsafe fn prefetch_tile_step(
    tile: *const u8,
    tile_bytes: usize,
    step_bytes: usize,
    step: usize,
) {
    let from = tile.wrapping_add(tile_bytes.max(PREFETCH_BYTES) + step * step_bytes);
    // A line that `prefetch_span` may leave out at the end holds the next step's `from`.
    // SAFETY: a prefetch (see the function).
    unsafe { prefetch_span(from, step_bytes) }
}

/// Ask for the cache lines of the `bytes` bytes at `p`: `bytes.div_ceil(64)` prefetches 64
/// bytes apart from `p`, which touch every line the span touches except perhaps a last one
/// that starts less than 64 bytes before its end (when `p` is not at a line's start). Where
/// `bytes` is a constant, the loop unrolls into as many prefetch instructions; a run-time span
/// of one line (attention's K rows on a partial run, once per dimension) takes one prefetch
/// and no loop.
///
/// # Safety
/// The processor supports SSE (every x86-64 does). The addresses need not be valid: a
/// prefetch never faults, and `wrapping_add` keeps the address computation itself defined.
#[inline(always)]
pub(crate) unsafe fn prefetch_span(p: *const u8, bytes: usize) {
    let lines = bytes.div_ceil(64);
    if lines == 1 {
        // SAFETY: a prefetch is a hint that reads nothing architecturally and never faults.
        return unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
    }
    for k in 0..lines {
        // SAFETY: as above.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * k) as *const i8) };
    }
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
        // SAFETY: a prefetch (see the function).
        unsafe { prefetch_tile_step(w, R * row_bytes, R * B::BYTES, b) };
        for r in 0..R {
            // SAFETY: block `b < cols / 32` of row `r < R` lies inside the bytes the caller
            // guarantees readable; the features are enabled on this function.
            let h = unsafe { B::head(w.add(r * row_bytes + b * B::BYTES)) };
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

/// `e^x` in each lane, within 2 ulp of the correctly rounded result for `x` in
/// `[-87.3, 88.37]`; lanes below that give 0 and lanes above infinity (from about 88.38, where
/// `n` reaches 128, a little before `expf` overflows at 88.72: softmax arguments are `<= 0`,
/// and SiLU's `v / (1 + e^-v)` is then `-0.0` instead of about `-3e-37`). Range reduction
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 split in two parts so `r` is exact to float
/// precision), a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients), then `2^n` put
/// into the exponent bits. `ops::exp_lanewise` does the same operations on one float, and so
/// gives the same bits.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[inline(always)]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register operations of AVX2 and FMA only, which the caller guarantees.
    unsafe {
        use super::ops::{EXP_HI, EXP_LN2, EXP_LO, EXP_POLY};
        let lo = _mm256_set1_ps(EXP_LO);
        let hi = _mm256_set1_ps(EXP_HI);
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n: n + 127 in the exponent field (n is in [-126, 128] after the clamp; 2^128
        // is the bit pattern of infinity).
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let scaled = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
        _mm256_andnot_ps(underflow, scaled)
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` for `i < min(gate.len(), up.len())`, as
/// `ops::silu_one` computes each (`v / (1 + e^-v) * u` with [`exp8`]), eight at a time.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let whole = n / 8 * 8;
    let sign = _mm256_set1_ps(-0.0);
    let one = _mm256_set1_ps(1.0);
    for c in (0..whole).step_by(8) {
        // SAFETY: elements `c..c + 8 <= n` are inside both slices; `gate` is borrowed mutably,
        // so the store races with nothing; the features are enabled on this function.
        unsafe {
            let gp = gate.as_mut_ptr().add(c);
            let v = _mm256_loadu_ps(gp);
            let e = exp8(_mm256_xor_ps(v, sign));
            let g = _mm256_div_ps(v, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp, _mm256_mul_ps(g, _mm256_loadu_ps(up.as_ptr().add(c))));
        }
    }
    for (g, &u) in gate[whole..n].iter_mut().zip(&up[whole..n]) {
        *g = super::ops::silu_one(*g, u);
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
        // SiLU takes positive arguments too: up to 88.3 (infinity from about 88.38).
        let mut x = -87.0f32;
        while x <= 88.3 {
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

    #[test]
    fn exp8_and_its_scalar_twin_give_the_same_bits() {
        if super::super::Avx2::detect().is_none() {
            eprintln!("no AVX2 here: nothing to check");
            return;
        }
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0491).collect();
        xs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -87.34,
            -87.33,
            88.72,
            88.73,
            1e30,
            -1e30,
            0.0,
            -0.0,
            1e-30,
        ]);
        xs.resize(xs.len().div_ceil(8) * 8, 1.0);
        for x in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected above; `got` and `x` hold 8 floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
            for (&x, &g) in x.iter().zip(&got) {
                let want = super::super::ops::exp_lanewise(x);
                assert_eq!(g.to_bits(), want.to_bits(), "exp({x}): {g} vs {want}");
            }
        }
    }
}
