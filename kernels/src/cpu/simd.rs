//! AVX-512 micro-kernels: a tile of `R` weight rows times `T` activation rows, each output a
//! dot product over all columns.
//!
//! Every output is accumulated the same way (16 lanes, blocks in column order, then one fixed
//! horizontal reduction), independent of `R`, `T` and of which tile it falls in: this is what
//! makes the matrix multiply batch invariant. Quantised blocks are decoded in registers.

#![allow(clippy::missing_safety_doc)]
// Index loops over the const-generic register arrays read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Decoding of one 32-element block into two registers of 16 floats.
    pub(crate) trait Block {
        const BYTES: usize;
        unsafe fn decode(p: *const u8) -> (__m512, __m512);
    }

    #[inline(always)]
    unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
    }

    pub(crate) struct Q41;
    impl Block for Q41 {
        const BYTES: usize = 20;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
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

    pub(crate) struct Q40;
    impl Block for Q40 {
        const BYTES: usize = 18;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
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

    pub(crate) struct Q80;
    impl Block for Q80 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn decode(p: *const u8) -> (__m512, __m512) {
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

    /// `out[r][t] = dot(row r of w, x row t)` for a block-quantised matrix.
    /// `w` points at the first row, rows `row_bytes` apart; `x` rows are `x_stride` floats apart.
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
            let mut wl = [_mm512_setzero_ps(); R];
            let mut wh = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let (l, h) = B::decode(w.add(r * row_bytes + b * B::BYTES));
                wl[r] = l;
                wh[r] = h;
            }
            for t in 0..T {
                let xp = x.add(t * x_stride + b * 32);
                let xl = _mm512_loadu_ps(xp);
                let xh = _mm512_loadu_ps(xp.add(16));
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

    /// `out[r][t] = dot(row r of w, x row t)` for an f32 matrix with rows `w_stride` apart.
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
        let full = cols / 16;
        let rem = cols % 16;
        for c in 0..full + (rem > 0) as usize {
            let mask: __mmask16 = if c < full {
                0xffff
            } else {
                (1u32 << rem) as u16 - 1
            };
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = _mm512_maskz_loadu_ps(mask, w.add(r * w_stride + c * 16));
            }
            for t in 0..T {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(t * x_stride + c * 16));
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

    /// Dot product of two f32 slices of equal length, in the same lane order as the tiles.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm512_setzero_ps();
        let full = n / 16;
        let rem = n % 16;
        for c in 0..full + (rem > 0) as usize {
            let mask: __mmask16 = if c < full {
                0xffff
            } else {
                (1u32 << rem) as u16 - 1
            };
            let av = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(c * 16));
            let bv = _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c * 16));
            acc = _mm512_fmadd_ps(av, bv, acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `y += a * x` over f32 slices.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm512_set1_ps(a);
        let full = n / 16;
        let rem = n % 16;
        for c in 0..full + (rem > 0) as usize {
            let mask: __mmask16 = if c < full {
                0xffff
            } else {
                (1u32 << rem) as u16 - 1
            };
            let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c * 16));
            let yp = y.as_mut_ptr().add(c * 16);
            let yv = _mm512_maskz_loadu_ps(mask, yp);
            _mm512_mask_storeu_ps(yp, mask, _mm512_fmadd_ps(av, xv, yv));
        }
    }

    /// Scaled scores of every query head of the group against every position of the
    /// partition, from the block-transposed K cache: 16 positions per vector, one FMA per
    /// dimension and query head, each K value loaded once for up to 8 query heads.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn scores(it: &super::super::attention::Item<'_>, scores: &mut [f32]) {
        use super::super::attention::{for_each_run, k_index};
        let hd = it.head_dim;
        let n = it.p1 - it.p0;
        let scale = _mm512_set1_ps(it.scale);
        for_each_run(it, |j0, block, off, len| {
            let mut c = 0;
            while c < len {
                let lanes = (len - c).min(16);
                let mask: __mmask16 = if lanes == 16 {
                    0xffff
                } else {
                    (1u32 << lanes) as u16 - 1
                };
                let mut g0 = 0;
                while g0 < it.group {
                    let gs = (it.group - g0).min(8);
                    let mut acc = [_mm512_setzero_ps(); 8];
                    for d in 0..hd {
                        let k = _mm512_maskz_loadu_ps(
                            mask,
                            it.k_cache.as_ptr().add(k_index(it, block, off + c, d)),
                        );
                        for g in 0..gs {
                            let q = _mm512_set1_ps(*it.q.get_unchecked((g0 + g) * hd + d));
                            acc[g] = _mm512_fmadd_ps(q, k, acc[g]);
                        }
                    }
                    for g in 0..gs {
                        let out = scores.as_mut_ptr().add((g0 + g) * n + j0 + c);
                        _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(acc[g], scale));
                    }
                    g0 += gs;
                }
                c += lanes;
            }
        });
    }

    /// One attention partition with AVX-512 (`head_dim % 16 == 0`, `head_dim <= 256`); the
    /// contract is `attention::attend_partition_scalar`'s. The weighted V sum of each query head
    /// is kept in registers across all positions instead of going through memory.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn attend_partition(
        it: &super::super::attention::Item<'_>,
        sc_buf: &mut [f32],
        part: &mut [f32],
    ) {
        use super::super::attention::{for_each_slot, softmax_stats};
        let hd = it.head_dim;
        let chunks = hd / 16;
        let n = it.p1 - it.p0;
        scores(it, sc_buf);
        softmax_stats(it, sc_buf, part);
        for g in 0..it.group {
            let mut acc = [_mm512_setzero_ps(); 16];
            let sc = &sc_buf[g * n..(g + 1) * n];
            for_each_slot(it, |j, slot| {
                let vp = it
                    .v_cache
                    .as_ptr()
                    .add(slot * it.kv_stride + it.head_offset);
                let w = _mm512_set1_ps(*sc.get_unchecked(j));
                for c in 0..chunks {
                    acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp.add(c * 16)), acc[c]);
                }
            });
            let out = part.as_mut_ptr().add(g * (hd + 2) + 2);
            for c in 0..chunks {
                _mm512_storeu_ps(out.add(c * 16), acc[c]);
            }
        }
    }
}
