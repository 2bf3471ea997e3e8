//! AVX2 micro-kernels of the fast precision: block-quantised weight rows times activation rows
//! quantised to 8 bits ([`super::quantized_rows`]), multiplied as bytes, four outputs to a
//! vector; and that quantisation itself ([`quantize_block`], the scalar code's bits). The tile
//! kernels are written once ([`int8_tile_kernels`]) for two sets of byte products: AVX2's
//! ([`Madd`], here) and AVX-512 VNNI's (`vnni_int8`).
//!
//! One weight block of 32 is 32 bytes in a register: nibbles `0..=15` for Q4_0 and Q4_1, signed
//! bytes for Q8_0. `vpmaddubsw` multiplies unsigned bytes by signed bytes and adds neighbouring
//! pairs into 16 bits; `vpmaddwd` by ones adds neighbouring pairs again into 32 bits. Signed
//! Q8_0 weights go through the sign trick: `|w|` times `x` with `w`'s sign. No step can
//! overflow: a Q8_0 pair is at most `2 * 128 * 127 = 32512 < 2^15` (activations never reach
//! -128, see `QuantizedRows`), a nibble pair at most `2 * 15 * 127 = 3810`, so four nibble
//! pairs still add in 16 bits.
//!
//! # Invariants
//!
//! - One arithmetic per output, whatever the kernel. Each output has two float accumulators,
//!   `lo` (elements `0..16` of every block) and `hi` (`16..32`), which sit in lanes `i` and
//!   `4 + i` of a vector holding four outputs. Block by block, in order:
//!   `lo = fma(float(Σ_{j<16} q_w q_x), d_w * d_x, lo)`, then for the Q4 formats
//!   `lo = fma(offset, s_x, lo)` (`value = d_w * q + offset`, `s_x = d_x * Σ q_x`), and
//!   `hi = fma(float(Σ_{16<=j<32} q_w q_x), d_w * d_x, hi)`, then `hi = fma(offset, +0, hi)`.
//!   The output is `lo + hi`. The integer sums are exact; only the scales and the float sums
//!   round.
//! - Batch invariance follows: [`tile_token_quads`] puts four tokens of one weight row in the
//!   lanes and [`tile_row_quads`] four weight rows of one token, and each lane does the
//!   operations above, so a token's outputs are the same bits whichever kernel, tile or thread
//!   computed them (and the portable code in `matmul_int8` does them one lane at a time).
//! - Safety: as in `avx2`; callers hold an `Avx2` token and check the bounds once per call.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::prefetch_tile_step;

/// Decoding of one weight block for the byte dot product.
pub(crate) trait IntBlock {
    /// Bytes of one encoded block.
    const BYTES: usize;
    /// Whether the quants are signed bytes rather than nibbles: `vpmaddubsw` and `vpdpbusd`
    /// take unsigned bytes on one side, so the kernels use the sign trick, or offset the
    /// weights by 128 (see [`ByteDots::OFFSET_SIGNED`]).
    const SIGNED: bool;
    /// Whether the format has block offsets (`value = d * q + offset`, see
    /// `matrix::block_offset`).
    const HAS_OFFSET: bool;
    /// Where a block's offset is derived from: the byte of the f16 it reads (Q4_1's minimum,
    /// Q4_0's scale) and the factor it takes (1 and -8). Unused without `HAS_OFFSET`. (Every
    /// format's scale `d`, `value = d * q` plus the offset, is the f16 in bytes `0..2`.)
    const OFFSET_AT: usize = 0;
    /// See [`IntBlock::OFFSET_AT`].
    const OFFSET_TIMES: f32 = 1.0;
    /// The 32 quants of the block at `p`, in element order.
    ///
    /// # Safety
    /// The processor supports AVX2, and `p` is valid for reads of `Self::BYTES` bytes.
    unsafe fn quants(p: *const u8) -> __m256i;
}

/// Block offsets from `v`, each block's f16 at byte `OFFSET_AT` (its scale when that is 0):
/// `v` times `OFFSET_TIMES`, exactly `matrix::block_offset`.
///
/// # Safety
/// The processor supports AVX.
#[inline(always)]
pub(crate) unsafe fn offsets_from<B: IntBlock>(v: __m256) -> __m256 {
    if B::OFFSET_TIMES == 1.0 {
        v
    } else {
        // SAFETY: a register operation of AVX (caller).
        unsafe { _mm256_mul_ps(v, _mm256_set1_ps(B::OFFSET_TIMES)) }
    }
}

/// The f16 values at `p[i] + at` for `i < 4`, as f32, in lanes `i` and `4 + i`.
///
/// # Safety
/// The processor supports AVX2 and F16C, and every `p[i] + at` is valid for reads of 2 bytes.
#[inline(always)]
pub(crate) unsafe fn f16_quad_twice(p: [*const u8; 4], at: usize) -> __m256 {
    // SAFETY: each f16 is readable (caller), read unaligned, one register insert each (a
    // buffer in memory stalls on store forwarding); the features are the caller's.
    unsafe {
        let mut h = _mm_setzero_si128();
        macro_rules! insert_lanes {
            ($($i:literal)*) => {
                $(
                    let v = std::ptr::read_unaligned(p[$i].add(at) as *const u16);
                    h = _mm_insert_epi16::<$i>(h, v as i32);
                )*
            };
        }
        insert_lanes!(0 1 2 3);
        let v = _mm_cvtph_ps(h);
        _mm256_set_m128(v, v)
    }
}

/// The f16 value at `p` as f32, broadcast to 8 lanes.
///
/// # Safety
/// The processor supports AVX2 and F16C, and `p` is valid for reads of 2 bytes.
#[inline(always)]
pub(crate) unsafe fn f16_broadcast(p: *const u8) -> __m256 {
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
}

/// The products of a weight vector `w` (`abs` its absolute values for Q8_0, else `w` again)
/// and an activation vector, added in neighbouring pairs by `vpmaddubsw`: left in 16 bits for
/// the nibble formats, added again into 32 bits for Q8_0 (whose pairs reach 32512, so they
/// cannot be added further in 16 bits), `x` taking `w`'s signs.
///
/// # Safety
/// The processor supports AVX2; the activations lie in `-127..=127`.
#[inline(always)]
unsafe fn products<B: IntBlock>(w: __m256i, abs: __m256i, x: __m256i) -> __m256i {
    // SAFETY: register operations of AVX2 (caller).
    unsafe {
        if B::SIGNED {
            _mm256_madd_epi16(
                _mm256_maddubs_epi16(abs, _mm256_sign_epi8(x, w)),
                _mm256_set1_epi16(1),
            )
        } else {
            _mm256_maddubs_epi16(w, x)
        }
    }
}

/// How a kernel forms the exact integer sums of a block's byte products: with AVX2's
/// `vpmaddubsw` ([`Madd`]) or with AVX-512 VNNI's `vpdpbusd` ([`super::vnni_int8::Vnni`]).
/// Both give the same integers (exact sums, whatever the order), so the same outputs.
pub(crate) trait ByteDots {
    /// The integer dot products of four (weight block, activation block) pairs, split in
    /// halves: lane `i` is pair `i`'s sum over elements `0..16`, lane `4 + i` over `16..32`.
    ///
    /// # Safety
    /// The processor supports the implementation's features (AVX2 for [`Madd`]); the
    /// activations lie in `-127..=127`.
    unsafe fn quad_sums<B: IntBlock>(w: [__m256i; 4], x: __m256i) -> __m256i;

    /// The same sums for one weight block and four tokens' activations laid out as
    /// `QuantizedRows::q4` interleaves them (`x[k]` holds elements `4k..4k + 4` and
    /// `16 + 4k..16 + 4k + 4` of the four tokens). `wk[k]` is the weight block spread to match
    /// (`vpshufd` of dword `k` in each half), `wa[k]` its absolute values for Q8_0 (else the
    /// same). Each vector's 32-bit lanes then belong to one token and half, so no horizontal
    /// adds are needed.
    ///
    /// Where [`ByteDots::OFFSET_SIGNED`], Q8_0's `wk` instead holds the weights plus 128 as
    /// unsigned bytes (`wa` is not read) and `init` the activations' half-block sums times
    /// -128 (`QuantizedRows::n8`), which the sums start from: `Σ (w + 128) x - 128 Σ x` is
    /// `Σ w x`, the same integers. Otherwise `init` is zero.
    ///
    /// # Safety
    /// As [`ByteDots::quad_sums`].
    unsafe fn interleaved_sums<B: IntBlock>(
        wk: &[__m256i; 4],
        wa: &[__m256i; 4],
        x: [__m256i; 4],
        init: __m256i,
    ) -> __m256i;

    /// Whether [`ByteDots::interleaved_sums`] takes Q8_0's weights offset by 128 rather than
    /// their absolute values and signs: one exclusive-or per weight block instead of a sign
    /// operation per weight vector and group of tokens. Only where byte products are summed
    /// straight into 32 bits (`vpdpbusd`): `vpmaddubsw` would saturate pairs of
    /// `255 * 127` in 16 bits.
    const OFFSET_SIGNED: bool;
}

/// The AVX2 byte products: `vpmaddubsw`, then `vpmaddwd` by ones (see the module docs).
pub(crate) struct Madd;

impl ByteDots for Madd {
    const OFFSET_SIGNED: bool = false;

    /// The nibble formats add in 16 bits as far as they can: two `vphaddw` rounds (sums of 8
    /// elements, at most 15240) stay below `2^15`, and one `vpmaddwd` by ones finishes in 32
    /// bits. Q8_0 goes to 32 bits first and adds with `vphaddd`. Both are exact.
    #[inline(always)]
    unsafe fn quad_sums<B: IntBlock>(w: [__m256i; 4], x: __m256i) -> __m256i {
        // SAFETY: register operations of AVX2 (caller).
        unsafe {
            let ones = _mm256_set1_epi16(1);
            // No closures or array maps here: they would be compiled without the caller's
            // target features and turn every intrinsic into a call.
            let mut m = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let abs = if B::SIGNED {
                    _mm256_sign_epi8(w[k], w[k])
                } else {
                    w[k]
                };
                m[k] = products::<B>(w[k], abs, x);
            }
            if B::SIGNED {
                _mm256_hadd_epi32(_mm256_hadd_epi32(m[0], m[1]), _mm256_hadd_epi32(m[2], m[3]))
            } else {
                let h =
                    _mm256_hadd_epi16(_mm256_hadd_epi16(m[0], m[1]), _mm256_hadd_epi16(m[2], m[3]));
                _mm256_madd_epi16(h, ones)
            }
        }
    }

    /// Four `vpmaddubsw` and a `vpmaddwd` for the nibble formats. (`init` is zero here.)
    #[inline(always)]
    unsafe fn interleaved_sums<B: IntBlock>(
        wk: &[__m256i; 4],
        wa: &[__m256i; 4],
        x: [__m256i; 4],
        _init: __m256i,
    ) -> __m256i {
        // SAFETY: register operations of AVX2 (caller).
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut m = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                m[k] = products::<B>(wk[k], wa[k], x[k]);
            }
            if B::SIGNED {
                _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]))
            } else {
                // Pairs are at most 3810: four of them add in 16 bits.
                _mm256_madd_epi16(
                    _mm256_add_epi16(_mm256_add_epi16(m[0], m[1]), _mm256_add_epi16(m[2], m[3])),
                    ones,
                )
            }
        }
    }
}

/// Lanes `i` and `4 + i` of `v` added, for `i < 4`: each output's `lo + hi`.
///
/// # Safety
/// The processor supports AVX.
#[inline(always)]
pub(crate) unsafe fn fold_halves(v: __m256) -> [f32; 4] {
    // SAFETY: register operations of AVX (caller); `__m128` and `[f32; 4]` have the same size
    // and every bit pattern is valid for both.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        std::mem::transmute::<__m128, [f32; 4]>(s)
    }
}

/// The two tile kernels of one kernel set, compiled with that set's processor features
/// (`$features`, a `target_feature` list) and byte products (`$dots`, a [`ByteDots`]): the
/// AVX2 set below and the AVX-512 VNNI set in `vnni_int8`. Generic code cannot carry target
/// features, and the byte products must be inlined into a function that has them, so the
/// kernels are written once here and instantiated per set.
macro_rules! int8_tile_kernels {
    ($features:literal, $dots:ty) => {
        /// `out[r][g][i]` = weight row `r` times token `4g + i`, four tokens in the lanes of each
        /// accumulator (see the module's invariants). The activations come interleaved
        /// (`QuantizedRows::q4`) and the weight block is spread to match with one in-lane shuffle
        /// per vector, shared by all of the groups: a group of four tokens then costs about what
        /// one token costs in [`tile_row_quads`].
        ///
        /// Weight row `r` starts at `w + r * row_bytes`; group `g`'s interleaved quants are at
        /// `xq4 + g * blocks * 128`, its scales at `xd4 + g * blocks * 4`, its block sums at
        /// `xs8 + g * blocks * 8` and its half-block sums times -128 at `xn8 + g * blocks * 8`
        /// (`QuantizedRows::d4`, `s8` and `n8`; the last read for Q8_0 by a set with
        /// [`ByteDots::OFFSET_SIGNED`] only).
        ///
        /// # Safety
        /// - The processor has the kernel set's features (AVX2, FMA and F16C, and for the VNNI
        ///   set AVX-512F, AVX-512VL and AVX-512 VNNI).
        /// - For every `r < R`, `w + r * row_bytes` is valid for reads of `blocks * B::BYTES`
        ///   bytes; for every `g < G`, `xq4 + g * blocks * 128` for reads of `blocks * 128` bytes
        ///   of activations in `-127..=127`, `xd4 + g * blocks * 4` for reads of `blocks * 4`
        ///   floats, `xs8 + g * blocks * 8` of `blocks * 8` and `xn8 + g * blocks * 8` of
        ///   `blocks * 8` integers.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn tile_token_quads<B: IntBlock, const R: usize, const G: usize>(
            w: *const u8,
            row_bytes: usize,
            xq4: *const i8,
            xd4: *const f32,
            xs8: *const f32,
            xn8: *const i32,
            blocks: usize,
            out: &mut [[[f32; 4]; G]; R],
        ) {
            // Q8_0's weights offset by 128 instead of taken apart into signs and magnitudes.
            let offset = B::SIGNED && <$dots as ByteDots>::OFFSET_SIGNED;
            let mut acc = [[_mm256_setzero_ps(); G]; R];
            for b in 0..blocks {
                // SAFETY: a prefetch (see the function).
                unsafe { prefetch_tile_step(w, R * row_bytes, R * B::BYTES, b) };
                for r in 0..R {
                    // SAFETY: block `b < blocks` of row `r < R` is readable (caller); the features
                    // are enabled on this function.
                    let (p, wq, dw) = unsafe {
                        let p = w.add(r * row_bytes + b * B::BYTES);
                        (p, B::quants(p), f16_broadcast(p))
                    };
                    // Flipping a signed byte's top bit adds 128 to it, as an unsigned byte.
                    let wq = if offset {
                        _mm256_xor_si256(wq, _mm256_set1_epi8(i8::MIN))
                    } else {
                        wq
                    };
                    // Vector `k`: the block's elements `4k..4k + 4` in every lane of the low half,
                    // `16 + 4k..` in the high half, as the activations are interleaved.
                    let wk = [
                        _mm256_shuffle_epi32::<0x00>(wq),
                        _mm256_shuffle_epi32::<0x55>(wq),
                        _mm256_shuffle_epi32::<0xaa>(wq),
                        _mm256_shuffle_epi32::<0xff>(wq),
                    ];
                    let mut wa = wk;
                    if B::SIGNED && !offset {
                        for v in &mut wa {
                            *v = _mm256_sign_epi8(*v, *v);
                        }
                    }
                    let o = if !B::HAS_OFFSET {
                        _mm256_setzero_ps()
                    } else if B::OFFSET_AT == 0 {
                        // SAFETY: the features are enabled on this function.
                        unsafe { offsets_from::<B>(dw) }
                    } else {
                        // SAFETY: as above; the offset's f16 lies inside the block.
                        unsafe { offsets_from::<B>(f16_broadcast(p.add(B::OFFSET_AT))) }
                    };
                    for g in 0..G {
                        let at = g * blocks + b;
                        // SAFETY: block `b` of group `g < G`, its four scales and its eight sums
                        // are readable (caller).
                        let (x, dx, sx) = unsafe {
                            let p = xq4.add(at * 128) as *const __m256i;
                            (
                                [
                                    _mm256_loadu_si256(p),
                                    _mm256_loadu_si256(p.add(1)),
                                    _mm256_loadu_si256(p.add(2)),
                                    _mm256_loadu_si256(p.add(3)),
                                ],
                                {
                                    // An unaligned load: `d4` is only 4-byte aligned.
                                    let d = _mm_loadu_ps(xd4.add(at * 4));
                                    _mm256_set_m128(d, d)
                                },
                                _mm256_loadu_ps(xs8.add(at * 8)),
                            )
                        };
                        let init = if offset {
                            // SAFETY: group `g`'s eight sums of block `b` are readable
                            // (caller).
                            unsafe { _mm256_loadu_si256(xn8.add(at * 8) as *const __m256i) }
                        } else {
                            _mm256_setzero_si256()
                        };
                        let sums =
                            // SAFETY: the set's features are enabled on this function; the
                            // activations are in range (caller); the weights are offset and
                            // `init` holds the sums exactly when the set takes them so.
                            unsafe {
                                <$dots as ByteDots>::interleaved_sums::<B>(&wk, &wa, x, init)
                            };
                        let mut a = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(sums),
                            _mm256_mul_ps(dw, dx),
                            acc[r][g],
                        );
                        if B::HAS_OFFSET {
                            // `sx` is zero in the high half.
                            a = _mm256_fmadd_ps(o, sx, a);
                        }
                        acc[r][g] = a;
                    }
                }
            }
            for r in 0..R {
                for g in 0..G {
                    // SAFETY: the features are enabled on this function.
                    out[r][g] = unsafe { fold_halves(acc[r][g]) };
                }
            }
        }

        /// `out[t][i]` = weight row `w[i]` times token `t`, with the four rows in the lanes of each
        /// accumulator instead of four tokens (see the module's invariants): the shape for fewer
        /// than four tokens, and so for batch-1 decode.
        ///
        /// Token `t`'s quants are at `xq + t * blocks * 32`, its scales at `xd + t * blocks` and
        /// its block sums at `xs + t * blocks`. The rows are usually `row_bytes` apart from `w[0]`
        /// (what is prefetched assumes so; a last quad short of rows repeats one, which reads the
        /// same).
        ///
        /// # Safety
        /// - The processor has the kernel set's features (AVX2, FMA and F16C, and for the VNNI
        ///   set AVX-512F, AVX-512VL and AVX-512 VNNI).
        /// - Every `w[i]` is valid for reads of `blocks * B::BYTES` bytes; for every `t < T`,
        ///   `xq + t * blocks * 32` for reads of `blocks * 32` bytes of activations in
        ///   `-127..=127`, and `xd + t * blocks` and `xs + t * blocks` for reads of `blocks`
        ///   floats.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn tile_row_quads<B: IntBlock, const T: usize>(
            w: [*const u8; 4],
            row_bytes: usize,
            xq: *const i8,
            xd: *const f32,
            xs: *const f32,
            blocks: usize,
            out: &mut [[f32; 4]; T],
        ) {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..blocks {
                // SAFETY: block `b < blocks` of each row is readable (caller); the features are
                // enabled on this function.
                let (wq, dw, o) = unsafe {
                    let p = [
                        w[0].add(b * B::BYTES),
                        w[1].add(b * B::BYTES),
                        w[2].add(b * B::BYTES),
                        w[3].add(b * B::BYTES),
                    ];
                    prefetch_tile_step(w[0], 4 * row_bytes, 4 * B::BYTES, b);
                    let dw = f16_quad_twice(p, 0);
                    let o = if !B::HAS_OFFSET {
                        _mm256_setzero_ps()
                    } else if B::OFFSET_AT == 0 {
                        offsets_from::<B>(dw)
                    } else {
                        offsets_from::<B>(f16_quad_twice(p, B::OFFSET_AT))
                    };
                    let wq = [
                        B::quants(p[0]),
                        B::quants(p[1]),
                        B::quants(p[2]),
                        B::quants(p[3]),
                    ];
                    (wq, dw, o)
                };
                for t in 0..T {
                    let at = t * blocks + b;
                    // SAFETY: block `b` of token `t < T`, its scale and its sum are readable
                    // (caller).
                    let (x, dx, sx) = unsafe {
                        (
                            _mm256_loadu_si256(xq.add(at * 32) as *const __m256i),
                            _mm256_broadcast_ss(&*xd.add(at)),
                            _mm256_broadcast_ss(&*xs.add(at)),
                        )
                    };
                    // SAFETY: the set's features are enabled on this function; the activations
                    // are in range (caller).
                    let sums = unsafe { <$dots as ByteDots>::quad_sums::<B>(wq, x) };
                    let mut a =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, dx), acc[t]);
                    if B::HAS_OFFSET {
                        // The sum in the low half only, as `tile_token_quads` has it.
                        a = _mm256_fmadd_ps(o, _mm256_blend_ps::<0x0f>(_mm256_setzero_ps(), sx), a);
                    }
                    acc[t] = a;
                }
            }
            for t in 0..T {
                // SAFETY: the features are enabled on this function.
                out[t] = unsafe { fold_halves(acc[t]) };
            }
        }
    };
}
pub(crate) use int8_tile_kernels;

int8_tile_kernels!("avx2,fma,f16c", Madd);

/// One block of 32 activations quantised to bytes, in registers: the same bits as
/// `quantized_rows::quantize_block` (`q = round(x * (1 / d))` ties to even, clamped to
/// `-127..=127`, `d = max|x| / 127`; a NaN product gives 0, as Rust's cast does), and the
/// same `(d, Σq)`. The largest magnitude skips NaN lanes as `f32::max` does (`vmaxps` returns
/// its second operand when either is NaN, so the running maximum goes second), and is exact
/// in any order.
///
/// # Safety
/// The processor supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_block(xs: &[f32; 32], qs: &mut [i8; 32]) -> (f32, i32) {
    let xp = xs.as_ptr();
    // SAFETY: floats `8k..8k + 8 <= 32` of `xs`, read unaligned.
    let v: [__m256; 4] = unsafe {
        [
            _mm256_loadu_ps(xp),
            _mm256_loadu_ps(xp.add(8)),
            _mm256_loadu_ps(xp.add(16)),
            _mm256_loadu_ps(xp.add(24)),
        ]
    };
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for x in v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, x), m);
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut ints = [_mm256_setzero_si256(); 4];
    let mut sum = _mm256_setzero_si256();
    for k in 0..4 {
        let x = _mm256_mul_ps(v[k], inv);
        // NaN (a NaN input, or infinity times a zero `inv`) to 0.
        let x = _mm256_and_ps(x, _mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        // Whole numbers in -127..=127: the conversion is exact.
        ints[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        sum = _mm256_add_epi32(sum, ints[k]);
    }
    // `vpackssdw` and `vpacksswb` work within 128-bit lanes: dword `i` of the result holds
    // elements `4j..4j + 4` of vector `i % 4` (`j = i / 4`), which the permutation puts in order.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: the 32 bytes of `qs`, written unaligned.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered) };
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (d, _mm_cvtsi128_si32(s))
}
