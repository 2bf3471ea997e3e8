//! AVX2 micro-kernels of the fast precision: a tile of `R` block-quantised weight rows times
//! `T` activation rows quantised to 8 bits ([`super::quantized_rows`]), multiplied as bytes.
//!
//! One weight block of 32 is 32 bytes in a register: nibbles `0..=15` for Q4_0 and Q4_1, signed
//! bytes for Q8_0. `vpmaddubsw` multiplies unsigned bytes by signed bytes and adds neighbouring
//! pairs into 16 bits; `vpmaddwd` by ones adds neighbouring pairs again, giving 8 lanes of 32-bit
//! sums, lane `j` over elements `4j..4j+4`. Signed Q8_0 weights go through the sign trick:
//! `|w|` times `x` with `w`'s sign. No step can overflow: a pair is at most
//! `2 * 128 * 127 = 32512 < 2^15` (activations never reach -128, see `QuantizedRows`).
//!
//! # Invariants
//!
//! - Batch invariance. An output is one 8-lane float accumulator, fed once per block in block
//!   order (`acc = fma(float(lanes), d_w * d_x, acc)`), then [`hsum`]. The tile shape decides
//!   only how many outputs are live at once. The Q4 formats' offset terms follow as one dot
//!   product of the row's block offsets (read from the block headers, see [`block_offsets`])
//!   and the activations' block sums, in a second 8-lane accumulator.
//! - Precision. The integer sums are exact; only the scales and the float sums round.
//! - Safety: as in `avx2`; callers hold an `Avx2` token and check the bounds once per call.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::{hsum, prefetch_ahead, tail_mask};

/// Decoding of one weight block for the byte dot product.
pub(crate) trait IntBlock {
    /// Bytes of one encoded block.
    const BYTES: usize;
    /// Whether the quants are signed bytes (the sign trick is needed) rather than nibbles.
    const SIGNED: bool;
    /// Whether the format has block offsets (`value = d * q + offset`, see
    /// `Matrix::block_offsets`).
    const HAS_OFFSET: bool;
    /// The 32 quants of the block at `p`, in element order.
    ///
    /// # Safety
    /// The processor supports AVX2, and `p` is valid for reads of `Self::BYTES` bytes.
    unsafe fn quants(p: *const u8) -> __m256i;
    /// The scale `d` of the block at `p` (`value = d * q`, plus the offset the caller adds for
    /// the Q4 formats), broadcast to 8 lanes.
    ///
    /// # Safety
    /// As [`IntBlock::quants`], and the processor supports F16C.
    unsafe fn scale(p: *const u8) -> __m256;
    /// Where a block's offset is derived from: the byte of the f16 it reads (Q4_1's minimum,
    /// Q4_0's scale) and the factor it takes (1 and -8). Unused without `HAS_OFFSET`.
    const OFFSET_AT: usize = 0;
    /// See [`IntBlock::OFFSET_AT`].
    const OFFSET_TIMES: f32 = 1.0;
}

/// The offsets of blocks `0..lanes` (`1 <= lanes <= 8`) of the blocks from `p` (`B::BYTES` apart)
/// in lanes `0..lanes`, `+0.0` in the others: exactly `matrix::block_offset` of each block.
/// They are read from the block headers the tile has just streamed, so the offsets cost no
/// memory traffic of their own.
///
/// # Safety
/// The processor supports AVX2 and F16C, `B::HAS_OFFSET`, `1 <= lanes <= 8`, and the first
/// `lanes` blocks from `p` are readable.
#[inline(always)]
unsafe fn block_offsets<B: IntBlock>(p: *const u8, lanes: usize) -> __m256 {
    // The f16 of block `i` into lane `i` for `i < lanes` (lanes past `lanes` stay zero), one
    // register insert each: an `_mm_set_epi16` of the values, or a buffer in memory (which
    // stalls on store forwarding), made the fast precision's batch-1 tiles a quarter to a third
    // slower in cache.
    macro_rules! insert_lanes {
        ($h:ident, $($i:literal)*) => {
            $(
                if $i < lanes {
                    // SAFETY: block `$i < lanes` is readable (caller), and its f16 lies inside
                    // it; the features are the caller's.
                    $h = unsafe {
                        let v = std::ptr::read_unaligned(
                            p.add($i * B::BYTES + B::OFFSET_AT) as *const u16,
                        );
                        _mm_insert_epi16::<$i>($h, v as i32)
                    };
                }
            )*
        };
    }
    // SAFETY: SSE2 (caller).
    let mut h = unsafe { _mm_setzero_si128() };
    insert_lanes!(h, 0 1 2 3 4 5 6 7);
    // SAFETY: AVX2 and F16C (caller). The product can be -0.0 in a lane past `lanes`; the mask
    // makes those lanes +0.0, as a masked load would.
    unsafe {
        let mut v = _mm256_cvtph_ps(h);
        if B::OFFSET_TIMES != 1.0 {
            v = _mm256_mul_ps(v, _mm256_set1_ps(B::OFFSET_TIMES));
        }
        if lanes < 8 {
            v = _mm256_and_ps(v, _mm256_castsi256_ps(tail_mask(lanes)));
        }
        v
    }
}

/// The f16 value at `p` as f32, broadcast to 8 lanes.
///
/// # Safety
/// The processor supports AVX2 and F16C, and `p` is valid for reads of 2 bytes.
#[inline(always)]
unsafe fn f16_broadcast(p: *const u8) -> __m256 {
    // SAFETY: 2 readable bytes at `p` (caller), read unaligned; the features are the caller's.
    unsafe {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }
}

/// The 32 nibbles of the 16 bytes at `qs` in element order: low nibbles (elements 0..16), then
/// high nibbles (16..32).
///
/// # Safety
/// The processor supports AVX2, and `qs` is valid for reads of 16 bytes.
#[inline(always)]
unsafe fn nibbles32(qs: *const u8) -> __m256i {
    // SAFETY: `_mm_loadu_si128` reads the 16 bytes the caller guarantees, unaligned.
    unsafe {
        let lo = _mm_loadu_si128(qs as *const __m128i);
        let hi = _mm_srli_epi16::<4>(lo);
        _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0f))
    }
}

pub(crate) struct Q41;
impl IntBlock for Q41 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const HAS_OFFSET: bool = true;
    const OFFSET_AT: usize = 2;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        // SAFETY: the nibbles are bytes 4..20 of the block (caller).
        unsafe { nibbles32(p.add(4)) }
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> __m256 {
        // SAFETY: the scale is bytes 0..2 (caller).
        unsafe { f16_broadcast(p) }
    }
}

pub(crate) struct Q40;
impl IntBlock for Q40 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    const HAS_OFFSET: bool = true;
    const OFFSET_TIMES: f32 = -8.0;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        // SAFETY: the nibbles are bytes 2..18 of the block (caller).
        unsafe { nibbles32(p.add(2)) }
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> __m256 {
        // SAFETY: the scale is bytes 0..2 (caller).
        unsafe { f16_broadcast(p) }
    }
}

pub(crate) struct Q80;
impl IntBlock for Q80 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const HAS_OFFSET: bool = false;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        // SAFETY: the quants are bytes 2..34 of the block (caller).
        unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> __m256 {
        // SAFETY: the scale is bytes 0..2 (caller).
        unsafe { f16_broadcast(p) }
    }
}

/// `out[r][t]` = row `r` of the weights times activation row `t`, over `blocks` blocks:
/// `hsum(Σ_b d_w * d_x * Σ q_w q_x) + hsum(Σ_b offset_b * s_b)` (the second sum only for
/// formats with offsets: 8 blocks per vector, in block order, then the last `blocks % 8` in
/// a vector whose other lanes are zero).
///
/// Weight row `r` starts at `w + r * row_bytes`; activation row `t` has its quants at
/// `xq + t * blocks * 32` and its block scales and sums at `xd + t * blocks` and
/// `xs + t * blocks`.
///
/// # Safety
/// - The processor supports AVX2, FMA and F16C.
/// - For every `r < R`, `w + r * row_bytes` is valid for reads of `blocks * B::BYTES` bytes.
/// - For every `t < T`, `xq + t * blocks * 32` is valid for reads of `blocks * 32` bytes, and
///   `xd + t * blocks` and `xs + t * blocks` for reads of `blocks` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_int8<B: IntBlock, const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    blocks: usize,
    out: &mut [[f32; T]; R],
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..blocks {
        for r in 0..R {
            // SAFETY: block `b < blocks` of row `r < R` is readable (caller); the features
            // are enabled on this function.
            let (wq, dw) = unsafe {
                let p = w.add(r * row_bytes + b * B::BYTES);
                prefetch_ahead(p);
                (B::quants(p), B::scale(p))
            };
            let wa = if B::SIGNED {
                _mm256_sign_epi8(wq, wq)
            } else {
                wq
            };
            for t in 0..T {
                let at = t * blocks + b;
                // SAFETY: block `b` of activation row `t < T` and its scale are readable
                // (caller).
                let (xv, dx) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(at * 32) as *const __m256i),
                        _mm256_broadcast_ss(&*xd.add(at)),
                    )
                };
                let xv = if B::SIGNED {
                    _mm256_sign_epi8(xv, wq)
                } else {
                    xv
                };
                let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones);
                acc[r][t] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_mul_ps(dw, dx), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the features are enabled on this function.
            out[r][t] = unsafe { hsum(acc[r][t]) };
        }
    }
    if B::HAS_OFFSET {
        // `Σ_b offset_b * s_b` per output, the offsets decoded from the block headers (8
        // blocks a vector) once for all of the tile's tokens.
        let mut sums = [[_mm256_setzero_ps(); T]; R];
        let mut b = 0;
        while b < blocks {
            let lanes = (blocks - b).min(8);
            // SAFETY: AVX2 is enabled on this function.
            let mask = unsafe { tail_mask(lanes) };
            for r in 0..R {
                // SAFETY: blocks `b..b + lanes <= blocks` of row `r < R` are readable
                // (caller); the features are enabled on this function.
                let o = unsafe { block_offsets::<B>(w.add(r * row_bytes + b * B::BYTES), lanes) };
                for t in 0..T {
                    // SAFETY: sums `b..b + lanes <= blocks` of row `t < T` are readable
                    // (caller); a masked load touches only the enabled lanes.
                    let s = unsafe {
                        let at = xs.add(t * blocks + b);
                        if lanes == 8 {
                            _mm256_loadu_ps(at)
                        } else {
                            _mm256_maskload_ps(at, mask)
                        }
                    };
                    sums[r][t] = _mm256_fmadd_ps(o, s, sums[r][t]);
                }
            }
            b += lanes;
        }
        for r in 0..R {
            for t in 0..T {
                // SAFETY: the features are enabled on this function.
                out[r][t] += unsafe { hsum(sums[r][t]) };
            }
        }
    }
}
