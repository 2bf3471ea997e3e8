//! AVX-512 micro-kernels: a tile of `R` weight rows times `T` activation rows, each output a
//! dot product over all columns; `dot` and `axpy`. (Paged attention's AVX-512 loops are in
//! `avx512_attention`.)
//!
//! Every output is accumulated the same way (16 lanes, blocks in column order, then one fixed
//! horizontal reduction), independent of `R`, `T` and of which tile it falls in: this is what
//! makes the matrix multiply batch invariant. Quantised blocks are decoded in registers.
//!
//! Every function here is an `unsafe fn` with two kinds of precondition, spelled out in its
//! `# Safety` section: the processor features (callers hold a [`super::Avx512`] token), and the
//! extent of the memory it reads and writes through raw pointers or unchecked indexing (callers
//! check the bounds once per kernel call, see `matmul` and `attention`). Masked loads and stores
//! (`_mm512_mask*_ps`) access only the lanes their mask enables, so a partial vector at the end
//! of a row needs only those lanes in bounds.

// Index loops over the const-generic register arrays read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Mask enabling the first `min(lanes, 16)` lanes of a vector of 16 floats.
    use super::super::kv_elem::mask16 as tail_mask;

    /// Decoding of one 32-element block into two registers of 16 floats.
    pub(crate) trait Block {
        /// Bytes of one encoded block.
        const BYTES: usize;
        /// The 32 values of the block at `p`, elements 0..16 and 16..32.
        ///
        /// # Safety
        /// The processor supports AVX-512F, AVX2 and F16C, and `p` is valid for reads of
        /// `Self::BYTES` bytes (no alignment needed).
        unsafe fn decode(p: *const u8) -> (__m512, __m512);
    }

    /// The two f16 values at `p` and `p + 2`, as f32.
    ///
    /// # Safety
    /// The processor supports F16C, and `p` is valid for reads of 4 bytes (no alignment needed).
    #[inline(always)]
    unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        // SAFETY: the caller guarantees F16C (which implies the SSE2 used here) and 4 readable
        // bytes at `p`; `read_unaligned` needs no alignment.
        unsafe {
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
        }
    }

    pub(crate) struct Q41;
    impl Block for Q41 {
        const BYTES: usize = 20;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
            // SAFETY: the caller guarantees the features and 20 readable bytes at `p`: the
            // scale and min are bytes 0..4, the 16 bytes of nibbles are bytes 4..20.
            unsafe {
                let (d, m) = f16x2(p);
                let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
                let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                (_mm512_fmadd_ps(lo, d, m), _mm512_fmadd_ps(hi, d, m))
            }
        }
    }

    pub(crate) struct Q40;
    impl Block for Q40 {
        const BYTES: usize = 18;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
            // SAFETY: the caller guarantees the features and 18 readable bytes at `p`: `f16x2`
            // reads bytes 0..4 (the scale and the first nibbles), the nibbles are bytes 2..18.
            unsafe {
                let (d, _) = f16x2(p);
                let d = _mm512_set1_ps(d);
                let qs = _mm_loadu_si128(p.add(2) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let eight = _mm512_set1_epi32(8);
                let lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)), eight);
                let hi = _mm512_sub_epi32(
                    _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(qs), mask)),
                    eight,
                );
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                )
            }
        }
    }

    pub(crate) struct Q80;
    impl Block for Q80 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
            // SAFETY: the caller guarantees the features and 34 readable bytes at `p`: `f16x2`
            // reads bytes 0..4, the 32 quants are bytes 2..34.
            unsafe {
                let (d, _) = f16x2(p);
                let d = _mm512_set1_ps(d);
                let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(q));
                let hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q));
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                )
            }
        }
    }

    /// `out[r][t] = dot(row r of w, x row t)` over the first `cols / 32 * 32` columns of a
    /// block-quantised matrix. `w` points at the first row, rows `row_bytes` apart; `x` rows
    /// are `x_stride` floats apart. Each block step asks for the lines of the next tile's
    /// weights (`avx2::prefetch_tile_step`, as the AVX2 tiles do): without that, batch-1
    /// decode waited on memory and ran at half the AVX2 kernels' speed on a Zen 4.
    ///
    /// # Safety
    /// - The processor supports AVX-512F, AVX2, FMA and F16C.
    /// - For every `r < R`, `w + r * row_bytes` is valid for reads of `cols / 32 * B::BYTES`
    ///   bytes.
    /// - For every `t < T`, `x + t * x_stride` is valid for reads of `cols / 32 * 32` floats.
    #[target_feature(enable = "avx512f,f16c,avx2,fma")]
    pub(crate) unsafe fn tile_blocks<B: Block, const R: usize, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        x: *const f32,
        x_stride: usize,
        cols: usize,
        out: &mut [[f32; T]; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for b in 0..cols / 32 {
            // SAFETY: a prefetch (see the function).
            unsafe { crate::cpu::avx2::prefetch_tile_step(w, R * row_bytes, R * B::BYTES, b) };
            let mut wl = [_mm512_setzero_ps(); R];
            let mut wh = [_mm512_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: block `b < cols / 32` of row `r < R` lies inside the bytes the caller
                // guarantees readable; the features are enabled on this function.
                let (l, h) = unsafe { B::decode(w.add(r * row_bytes + b * B::BYTES)) };
                wl[r] = l;
                wh[r] = h;
            }
            for t in 0..T {
                // SAFETY: floats `b * 32 .. b * 32 + 32` of row `t < T` of `x` are readable:
                // `b * 32 + 32 <= cols / 32 * 32`, as the caller guarantees.
                let (xl, xh) = unsafe {
                    let xp = x.add(t * x_stride + b * 32);
                    (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
                };
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(wl[r], xl, acc[r][t]);
                    acc[r][t] = _mm512_fmadd_ps(wh[r], xh, acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
    }

    /// `out[r][t] = dot(row r of w, x row t)` over `cols` columns of an f32 matrix with rows
    /// `w_stride` floats apart; `x` rows are `x_stride` floats apart.
    ///
    /// # Safety
    /// - The processor supports AVX-512F, AVX2 and FMA.
    /// - For every `r < R`, `w + r * w_stride` is valid for reads of `cols` floats.
    /// - For every `t < T`, `x + t * x_stride` is valid for reads of `cols` floats.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn tile_f32<const R: usize, const T: usize>(
        w: *const f32,
        w_stride: usize,
        x: *const f32,
        x_stride: usize,
        cols: usize,
        out: &mut [[f32; T]; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for c in 0..cols.div_ceil(16) {
            let mask = tail_mask(cols - c * 16);
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: the mask enables lanes `c * 16 .. min(c * 16 + 16, cols)` of row `r`,
                // which the caller guarantees readable; `c * 16 < cols` keeps the address in
                // the row.
                wv[r] = unsafe { _mm512_maskz_loadu_ps(mask, w.add(r * w_stride + c * 16)) };
            }
            for t in 0..T {
                // SAFETY: as above, for row `t` of `x`.
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(t * x_stride + c * 16)) };
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
    }

    /// Dot product over the first `min(a.len(), b.len())` elements, in the same lane order as
    /// the tiles.
    ///
    /// # Safety
    /// The processor supports AVX-512F, AVX2 and FMA. (Bounds come from the slices.)
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm512_setzero_ps();
        for c in 0..n.div_ceil(16) {
            let mask = tail_mask(n - c * 16);
            // SAFETY: the mask enables elements `c * 16 .. min(c * 16 + 16, n)`, inside both
            // slices since `n` is the shorter length.
            let (av, bv) = unsafe {
                (
                    _mm512_maskz_loadu_ps(mask, a.as_ptr().add(c * 16)),
                    _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c * 16)),
                )
            };
            acc = _mm512_fmadd_ps(av, bv, acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `y += a * x` over the first `min(x.len(), y.len())` elements.
    ///
    /// # Safety
    /// The processor supports AVX-512F, AVX2 and FMA. (Bounds come from the slices.)
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm512_set1_ps(a);
        for c in 0..n.div_ceil(16) {
            let mask = tail_mask(n - c * 16);
            // SAFETY: the mask enables elements `c * 16 .. min(c * 16 + 16, n)`, inside both
            // slices since `n` is the shorter length; `y` is borrowed mutably, so the store
            // races with nothing.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c * 16));
                let yp = y.as_mut_ptr().add(c * 16);
                let yv = _mm512_maskz_loadu_ps(mask, yp);
                _mm512_mask_storeu_ps(yp, mask, _mm512_fmadd_ps(av, xv, yv));
            }
        }
    }
}
