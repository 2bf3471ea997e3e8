//! The element type of a paged KV cache: `f32` (the default, exact) or `f16` (half the memory
//! and half the bytes a decode step reads, at the rounding of each stored value to 11
//! significant bits).
//!
//! Invariant: attention on an `f16` cache computes exactly what it computes on an `f32` cache
//! holding the same values converted to `f32` (`f16 -> f32` is exact): every kernel converts a
//! value as it loads it and then runs the `f32` operations. So batch invariance, and cached
//! equals recomputed, hold for either element type.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An element type of the KV cache: `f32` or `half::f16`. Sealed: the kernels' unsafe loads
/// rely on the two layouts.
pub trait KvElem:
    Copy + Send + Sync + Default + std::fmt::Debug + sealed::Sealed + 'static
{
    /// Bytes of one element.
    const BYTES: usize;
    /// The value as `f32` (exact for both types).
    fn to_f32(self) -> f32;
    /// The nearest representable value (round to nearest, ties to even).
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the elements are `f32` (the kernels that read `f32` only).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// Eight elements from `p` as `f32` lanes.
    ///
    /// # Safety
    /// The processor supports AVX2 and F16C, and `p` is valid for reads of 8 elements (no
    /// alignment needed).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// The first `min(lanes, 8)` elements from `p` in the low lanes, zero in the others; reads
    /// only those elements (none when `lanes == 0`).
    ///
    /// # Safety
    /// The processor supports AVX2 and F16C, and `p` is valid for reads of `min(lanes, 8)`
    /// elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_partial(p: *const Self, lanes: usize) -> __m256;
}

impl KvElem for f32 {
    const BYTES: usize = 4;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: 8 readable floats at `p` and AVX (the caller's).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial(p: *const Self, lanes: usize) -> __m256 {
        // SAFETY: the mask enables the first `min(lanes, 8)` lanes, which the caller
        // guarantees readable; masked-off lanes are not accessed.
        unsafe { _mm256_maskload_ps(p, super::avx2::tail_mask(lanes)) }
    }
}

impl KvElem for f16 {
    const BYTES: usize = 2;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: 16 readable bytes at `p` (8 elements) and F16C (the caller's); `f16` is a
        // plain 16-bit value.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial(p: *const Self, lanes: usize) -> __m256 {
        let mut bits = [0u16; 8];
        for (i, b) in bits.iter_mut().enumerate().take(lanes.min(8)) {
            // SAFETY: element `i < min(lanes, 8)` is readable (the caller's).
            *b = unsafe { (*p.add(i)).to_bits() };
        }
        // SAFETY: `bits` is 16 readable bytes; F16C (the caller's). Zero bits are +0.0.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i)) }
    }
}
