//! The element type of a paged KV cache: `f32` (the default, exact), `f16` (half the memory
//! and half the bytes a decode step reads, at the rounding of each stored value to 11
//! significant bits) or [`F8E4M3`] (a quarter of `f32`'s bytes, each value rounded to 4
//! significant bits, at most 448 in magnitude).
//!
//! Invariant: attention on an `f16` or `F8E4M3` cache computes exactly what it computes on an
//! `f32` cache holding the same values converted to `f32` (both conversions are exact): every
//! kernel converts a value as it loads it and then runs the `f32` operations. So batch
//! invariance, and cached equals recomputed, hold for every element type.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for super::F8E4M3 {}
}

/// An element type of the KV cache: `f32`, `half::f16` or [`F8E4M3`]. Sealed: the kernels'
/// unsafe loads rely on the three layouts.
pub trait KvElem:
    Copy + Send + Sync + Default + std::fmt::Debug + sealed::Sealed + 'static
{
    /// Bytes of one element.
    const BYTES: usize;
    /// The value as `f32` (exact for every type).
    fn to_f32(self) -> f32;
    /// The nearest representable value (round to nearest, ties to even).
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the elements are `f32` (the kernels that read `f32` only).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// What the vector loads below leave out: they give each value divided by `LOAD_SCALE`
    /// (exactly, a power of two), and the kernels multiply it back into their other operand
    /// (the query, the softmax weights), which gives the same products. 1 except for
    /// [`F8E4M3`], whose values are 256 times the `f16` its load converts.
    const LOAD_SCALE: f32 = 1.0;

    /// Eight elements from `p` as `f32` lanes, each divided by [`KvElem::LOAD_SCALE`].
    ///
    /// # Safety
    /// The processor supports AVX2 and F16C, and `p` is valid for reads of 8 elements (no
    /// alignment needed).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// Sixteen elements from `p` as two vectors of `f32` lanes, divided as in
    /// [`KvElem::load8`]: two `load8`s, or one wider conversion where a type has it.
    ///
    /// # Safety
    /// As [`KvElem::load8`], for 16 elements.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> [__m256; 2] {
        // SAFETY: 16 readable elements at `p` (the caller's).
        unsafe { [Self::load8(p), Self::load8(p.add(8))] }
    }

    /// The first `min(lanes, 8)` elements from `p` in the low lanes (divided as in
    /// [`KvElem::load8`]), zero in the others; reads only those elements (none when
    /// `lanes == 0`).
    ///
    /// # Safety
    /// The processor supports AVX2 and F16C, and `p` is valid for reads of `min(lanes, 8)`
    /// elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_partial(p: *const Self, lanes: usize) -> __m256;

    /// Sixteen elements from `p` as one 512-bit vector of `f32` lanes, divided as in
    /// [`KvElem::load8`]: lane `i` has the value of lane `i % 8` of [`KvElem::load16`]'s
    /// vector `i / 8`, bit for bit.
    ///
    /// # Safety
    /// The processor supports AVX-512F, AVX2 and F16C, and `p` is valid for reads of 16
    /// elements (no alignment needed).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_512(p: *const Self) -> __m512;

    /// The first `min(lanes, 16)` elements from `p` in the low lanes (divided as in
    /// [`KvElem::load8`]), zero in the others; reads only those elements (a masked load, which
    /// does not touch the masked-off ones).
    ///
    /// # Safety
    /// The processor supports AVX-512F, AVX-512BW, AVX-512VL, AVX2 and F16C, and `p` is valid
    /// for reads of `min(lanes, 16)` elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_partial_512(p: *const Self, lanes: usize) -> __m512;
}

/// The mask of the first `min(lanes, 16)` lanes of a 512-bit vector of floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn mask16(lanes: usize) -> __mmask16 {
    if lanes >= 16 {
        0xffff
    } else {
        (1u16 << lanes) - 1
    }
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_512(p: *const Self) -> __m512 {
        // SAFETY: 16 readable floats at `p` and AVX-512F (the caller's).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial_512(p: *const Self, lanes: usize) -> __m512 {
        // SAFETY: AVX-512F (the caller's); the masked load reads only the first
        // `min(lanes, 16)` floats, which are readable (the caller's).
        unsafe { _mm512_maskz_loadu_ps(mask16(lanes), p) }
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
        // SAFETY: F16C (the caller's); element `i < min(lanes, 8)` is readable (the caller's).
        unsafe { f16_partial(lanes, |i| (*p.add(i)).to_bits()) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_512(p: *const Self) -> __m512 {
        // SAFETY: 32 readable bytes at `p` (16 elements) and AVX-512F (the caller's).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial_512(p: *const Self, lanes: usize) -> __m512 {
        // SAFETY: AVX-512F, BW and VL (the caller's); the masked load reads only the first
        // `min(lanes, 16)` 16-bit elements, which are readable (the caller's), and zeroes the
        // others (+0.0).
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(lanes), p as *const i16)) }
    }
}

/// An 8-bit float with a sign, 4 exponent bits and 3 mantissa bits (OCP FP8 "E4M3FN", the
/// format of vLLM's `fp8` KV cache), stored without a scale: 4 significant bits, normal values
/// from 2^-6 to 448 and subnormals down to 2^-9. [`KvElem::from_f32`] rounds to nearest, ties
/// to even, saturates at ±448 (infinities included) and keeps NaN as NaN (`0x7f`/`0xff`, its
/// only encoding).
///
/// A value is the `f16` whose bits are the sign, then the 7 other bits shifted to bits 7..13,
/// times 256 (the exponent biases differ by 8), for normals and subnormals alike: so the AVX2
/// load is a byte widening, two integer operations and `vcvtph2ps`, all exact, and the kernels
/// put the factor 256 on the other operand ([`KvElem::LOAD_SCALE`]). The one exception is NaN,
/// which that load reads as 480 / 256 (the portable code as NaN): a K or V value is NaN only
/// once the hidden state is, which makes the logits NaN whatever attention returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct F8E4M3(pub u8);

impl F8E4M3 {
    /// The largest finite value.
    pub const MAX: f32 = 448.0;

    /// The `f16` bits whose value times 256 is this value (NaN excepted).
    fn f16_bits(self) -> u16 {
        let b = self.0 as u16;
        ((b & 0x80) << 8) | ((b & 0x7f) << 7)
    }
}

impl KvElem for F8E4M3 {
    const BYTES: usize = 1;
    const LOAD_SCALE: f32 = 256.0;
    fn to_f32(self) -> f32 {
        if self.0 & 0x7f == 0x7f {
            return f32::NAN;
        }
        f16::from_bits(self.f16_bits()).to_f32() * 256.0
    }
    fn from_f32(x: f32) -> Self {
        let sign = ((x.to_bits() >> 24) & 0x80) as u8;
        if x.is_nan() {
            return F8E4M3(sign | 0x7f);
        }
        let a = x.abs().min(F8E4M3::MAX);
        // Below the smallest normal (2^-6) the values are the multiples of 2^-9 (subnormals,
        // and 2^-6 itself as 8): the scaling is exact, so this is one rounding.
        if a < 2f32.powi(-6) {
            return F8E4M3(sign | (a * 512.0).round_ties_even() as u8);
        }
        // Round the f32 mantissa to 3 bits, ties to even (a carry moves into the exponent;
        // `a <= 448` keeps the result at most 448).
        let b = a.to_bits();
        let r = (b + 0x0007_ffff + ((b >> 20) & 1)) & !0x000f_ffff;
        let exp = (r >> 23) as i32 - 127;
        F8E4M3(sign | (((exp + 7) as u8) << 3) | ((r >> 20) & 7) as u8)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: 8 readable bytes at `p` (8 elements), AVX2 and F16C (the caller's).
        unsafe { _mm256_cvtph_ps(f16_lanes(p)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> [__m256; 2] {
        // SAFETY: 16 readable bytes at `p` (16 elements), AVX2 and F16C (the caller's): the
        // bytes sign-extended to 16 bits as in `f16_lanes`, one vector for all 16.
        unsafe {
            let h = f16_lanes16(_mm_loadu_si128(p as *const __m128i));
            [
                _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
            ]
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial(p: *const Self, lanes: usize) -> __m256 {
        // SAFETY: F16C (the caller's); element `i < min(lanes, 8)` is readable (the caller's).
        unsafe { f16_partial(lanes, |i| (*p.add(i)).f16_bits()) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_512(p: *const Self) -> __m512 {
        // SAFETY: 16 readable bytes at `p` (16 elements), AVX-512F, AVX2 and F16C (the
        // caller's): the bytes widened as in `load16`, converted in one vector.
        unsafe { _mm512_cvtph_ps(f16_lanes16(_mm_loadu_si128(p as *const __m128i))) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_partial_512(p: *const Self, lanes: usize) -> __m512 {
        // SAFETY: AVX-512F, BW and VL, AVX2 and F16C (the caller's); the masked load reads only
        // the first `min(lanes, 16)` bytes, which are readable (the caller's), and zeroes the
        // others (a zero byte is +0.0).
        unsafe {
            let bytes = _mm_maskz_loadu_epi8(mask16(lanes), p as *const i8);
            _mm512_cvtph_ps(f16_lanes16(bytes))
        }
    }
}

/// `f16_lanes` for 16 bytes at once: each byte's `F8E4M3::f16_bits` in a 16-bit lane.
///
/// # Safety
/// The processor supports AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_lanes16(bytes: __m128i) -> __m256i {
    // SAFETY: register operations of AVX2 (the caller's).
    unsafe {
        let w = _mm256_cvtepi8_epi16(bytes);
        _mm256_and_si256(_mm256_slli_epi16::<7>(w), _mm256_set1_epi16(!0x4000))
    }
}

/// The f16 values whose bits `bits_of(i)` gives for lanes `i < min(lanes, 8)`, as `f32`
/// lanes, zero in the others (zero bits are +0.0): the partial load of both 16-bit-based
/// types.
///
/// # Safety
/// The processor supports F16C, and `bits_of(i)` is safe to call for every `i < min(lanes,
/// 8)` (it is given no other).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_partial(lanes: usize, bits_of: impl Fn(usize) -> u16) -> __m256 {
    let mut bits = [0u16; 8];
    for (i, b) in bits.iter_mut().enumerate().take(lanes.min(8)) {
        *b = bits_of(i);
    }
    // SAFETY: `bits` is 16 readable bytes; F16C (the caller's).
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i)) }
}

/// The `F8E4M3::f16_bits` of the 8 bytes at `p`, as 16-bit lanes: each byte sign-extended to
/// 16 bits and shifted left by 7 puts the sign on bits 15 and 14 and the other 7 bits on bits
/// 7..13; clearing bit 14 leaves the f16.
///
/// # Safety
/// The processor supports AVX2 (SSE4.1 here), and `p` is valid for reads of 8 bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_lanes(p: *const F8E4M3) -> __m128i {
    // SAFETY: 8 readable bytes at `p` (the caller's); register operations.
    unsafe {
        let w = _mm_cvtepi8_epi16(_mm_loadl_epi64(p as *const __m128i));
        _mm_and_si128(_mm_slli_epi16::<7>(w), _mm_set1_epi16(!0x4000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finite E4M3 values, with their bytes.
    fn finite() -> Vec<(f32, u8)> {
        (0..=255u8)
            .map(|b| (F8E4M3(b).to_f32(), b))
            .filter(|(x, _)| x.is_finite())
            .collect()
    }

    /// The nearest finite E4M3 value by brute force (ties to the even mantissa), saturating.
    fn nearest(x: f32) -> f32 {
        let x = x.clamp(-F8E4M3::MAX, F8E4M3::MAX);
        let mut best = (f32::INFINITY, 0u8, 0f32);
        for (v, b) in finite() {
            let d = (v - x).abs();
            if d < best.0 || (d == best.0 && b & 1 == 0 && best.1 & 1 == 1) {
                best = (d, b, v);
            }
        }
        best.2
    }

    #[test]
    fn every_byte_converts_exactly_and_back() {
        assert_eq!(finite().len(), 254, "two NaN encodings, no infinities");
        for b in 0..=255u8 {
            let x = F8E4M3(b).to_f32();
            if x.is_nan() {
                assert_eq!(b & 0x7f, 0x7f);
                assert!(F8E4M3::from_f32(x).to_f32().is_nan());
            } else if x == 0.0 {
                assert_eq!(F8E4M3::from_f32(x).to_f32().to_bits(), x.to_bits());
            } else {
                assert_eq!(F8E4M3::from_f32(x), F8E4M3(b), "byte {b:#04x} ({x})");
            }
        }
        assert_eq!(F8E4M3(0x7e).to_f32(), 448.0);
        assert_eq!(F8E4M3(0x01).to_f32(), 2f32.powi(-9));
    }

    #[test]
    fn rounding_is_to_the_nearest_value_ties_to_even_and_saturates() {
        let mut values: Vec<f32> = Vec::new();
        let mut seed = 1u64;
        for _ in 0..20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let e = ((seed >> 33) % 24) as i32 - 13;
            let m = 1.0 + ((seed >> 8) & 0xffff) as f32 / 65536.0;
            let s = if seed >> 63 == 1 { -1.0 } else { 1.0 };
            values.push(s * m * 2f32.powi(e));
        }
        // Every midpoint between neighbours (the ties), and values past the largest.
        let mut sorted: Vec<f32> = finite().iter().map(|p| p.0).collect();
        sorted.sort_by(f32::total_cmp);
        for w in sorted.windows(2) {
            values.push((w[0] + w[1]) / 2.0);
        }
        values.extend([
            464.0,
            480.0,
            1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-9,
            -1e-9,
        ]);
        for x in values {
            assert_eq!(F8E4M3::from_f32(x).to_f32(), nearest(x), "{x}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_loads_give_the_values_of_every_finite_byte() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
            return;
        }
        // Every byte but the two NaNs (which the vector loads read as 480, see `F8E4M3`), over
        // `LOAD_SCALE`; the partial loads take the first 5 (AVX2) or 11 (AVX-512) of a chunk.
        let value = |b: F8E4M3| {
            if b.0 & 0x7f == 0x7f {
                f32::NAN
            } else {
                b.to_f32() / F8E4M3::LOAD_SCALE
            }
        };
        let same = |got: f32, want: f32| want.is_nan() || got.to_bits() == want.to_bits();
        let wide = super::super::has_avx512_bw_vl();
        let bytes: Vec<F8E4M3> = (0..=255u8).map(F8E4M3).collect();
        for chunk in bytes.chunks(16) {
            let mut got = [0f32; 16];
            let mut part = [0f32; 8];
            // SAFETY: AVX2 and F16C were detected; `chunk` holds 16 elements, `got` 16 floats
            // and `part` 8.
            unsafe {
                let [lo, hi] = F8E4M3::load16(chunk.as_ptr());
                _mm256_storeu_ps(got.as_mut_ptr(), lo);
                _mm256_storeu_ps(got.as_mut_ptr().add(8), hi);
                _mm256_storeu_ps(part.as_mut_ptr(), F8E4M3::load_partial(chunk.as_ptr(), 5));
            }
            for (i, &b) in chunk.iter().enumerate() {
                assert!(same(got[i], value(b)), "byte {:#04x}: {}", b.0, got[i]);
                let want_part = if i < 5 { value(b) } else { 0.0 };
                if i < 8 {
                    assert!(same(part[i], want_part), "partial, byte {:#04x}", b.0);
                }
            }
            if wide {
                let (mut whole, mut masked) = ([0f32; 16], [0f32; 16]);
                // SAFETY: AVX-512F, BW and VL (with AVX2 and F16C) were detected; `chunk`
                // holds 16 elements, `whole` and `masked` 16 floats.
                unsafe {
                    _mm512_storeu_ps(whole.as_mut_ptr(), F8E4M3::load16_512(chunk.as_ptr()));
                    _mm512_storeu_ps(
                        masked.as_mut_ptr(),
                        F8E4M3::load_partial_512(chunk.as_ptr(), 11),
                    );
                }
                for i in 0..16 {
                    assert_eq!(
                        whole[i].to_bits(),
                        got[i].to_bits(),
                        "512-bit load, lane {i}"
                    );
                    let want = if i < 11 { got[i].to_bits() } else { 0 };
                    assert_eq!(masked[i].to_bits(), want, "512-bit partial load, lane {i}");
                }
            }
        }
    }
}
