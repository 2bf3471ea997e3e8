//! AVX-512 VNNI micro-kernels of the fast precision: the kernels of `avx2_int8` with each
//! block's byte products summed by `vpdpbusd` (unsigned bytes times signed bytes, four
//! products added into each 32-bit lane in one instruction) on 256-bit vectors
//! (AVX-512VL), where AVX2 needs `vpmaddubsw`, adds in 16 bits and a `vpmaddwd` by ones.
//!
//! # Invariants
//!
//! - The same outputs, bit for bit, as the AVX2 kernels and the portable code: the integer
//!   sums are exact in any order (a lane adds at most 16 products of at most `255 * 127` in
//!   magnitude, Q8_0's weights offset by 128, to a start of at most `16 * 128 * 127`: far
//!   inside 32 bits), and everything after them (scales, offsets, the two float accumulators per
//!   output) is the AVX2 kernels' code, instantiated by `avx2_int8::int8_tile_kernels`. Batch
//!   invariance carries over: which path runs depends on the processor and the kernel path,
//!   never on the batch.
//! - Safety: as in `avx2_int8`; callers hold a `Vnni` token and check the bounds once per
//!   call.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::prefetch_tile_step;
use super::avx2_int8::{
    f16_broadcast, f16_quad_twice, fold_halves, int8_tile_kernels, offsets_from, ByteDots, IntBlock,
};

/// Proof that the running processor has AVX-512F, AVX-512VL and AVX-512 VNNI besides AVX2,
/// FMA and F16C: the only way to get one is [`Vnni::detect`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vnni {
    _detected: (),
}

impl Vnni {
    /// A token if the processor has the features, else `None`.
    pub(crate) fn detect() -> Option<Vnni> {
        super::has_avx512_vnni().then_some(Vnni { _detected: () })
    }
}

/// `w` times `x` summed in fours into `acc`'s 32-bit lanes (`w` unsigned, `x` signed); for
/// Q8_0's signed weights, `w`'s absolute values (`abs`) times `x` with `w`'s signs.
///
/// # Safety
/// The processor supports AVX-512VL and AVX-512 VNNI (and AVX2 for `vpsignb`).
#[inline(always)]
unsafe fn dot_add<B: IntBlock>(acc: __m256i, w: __m256i, abs: __m256i, x: __m256i) -> __m256i {
    // SAFETY: register operations of the caller's features.
    unsafe {
        if B::SIGNED {
            _mm256_dpbusd_epi32(acc, abs, _mm256_sign_epi8(x, w))
        } else {
            _mm256_dpbusd_epi32(acc, w, x)
        }
    }
}

impl ByteDots for Vnni {
    /// Four `vpdpbusd` give each pair's sums of four, and two rounds of `vphaddd` the halves.
    #[inline(always)]
    unsafe fn quad_sums<B: IntBlock>(w: [__m256i; 4], x: __m256i) -> __m256i {
        // SAFETY: register operations of the caller's features.
        unsafe {
            let zero = _mm256_setzero_si256();
            let mut m = [zero; 4];
            for k in 0..4 {
                let abs = if B::SIGNED {
                    _mm256_sign_epi8(w[k], w[k])
                } else {
                    w[k]
                };
                m[k] = dot_add::<B>(zero, w[k], abs, x);
            }
            _mm256_hadd_epi32(_mm256_hadd_epi32(m[0], m[1]), _mm256_hadd_epi32(m[2], m[3]))
        }
    }

    /// Four `vpdpbusd` in two chains of two and one add: measured faster than one chain of
    /// four (`matmul_speed`, 128 tokens), whose latency the other groups did not hide. Every
    /// format's weights come as unsigned bytes here (Q8_0's offset by 128, see
    /// `OFFSET_SIGNED`), so each product is one plain `vpdpbusd`; the first chain starts from
    /// `init`.
    #[inline(always)]
    unsafe fn interleaved_sums<B: IntBlock>(
        wk: &[__m256i; 4],
        _wa: &[__m256i; 4],
        x: [__m256i; 4],
        init: __m256i,
    ) -> __m256i {
        // SAFETY: register operations of the caller's features.
        unsafe {
            let zero = _mm256_setzero_si256();
            let a = _mm256_dpbusd_epi32(init, wk[0], x[0]);
            let b = _mm256_dpbusd_epi32(zero, wk[2], x[2]);
            let a = _mm256_dpbusd_epi32(a, wk[1], x[1]);
            let b = _mm256_dpbusd_epi32(b, wk[3], x[3]);
            _mm256_add_epi32(a, b)
        }
    }

    const OFFSET_SIGNED: bool = true;
}

int8_tile_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", Vnni);
