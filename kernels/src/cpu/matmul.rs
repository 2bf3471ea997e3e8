//! `y = x W^T`: activations `x` (`n x cols`, f32) times a weight [`Matrix`] (`rows x cols`, any
//! [`WeightFormat`]) into `y` (`n x rows`).
//!
//! Work is split over the kernel pool's threads by chunks of weight rows; inside a chunk the kernel walks
//! token groups of up to 4 and row groups of up to 4 (8 for a single token), so a chunk of
//! weights stays in cache while every token passes over it. Each output is one dot product
//! computed identically in every tile shape (see `simd`), so results are batch invariant.
//! Tiles: 8 rows x 1 token, 4 x (1..4) tokens, 2 x 8 tokens.

use super::matrix::{dequantize_row, Matrix, Storage, WeightFormat};
use super::SendPtr;

/// Multiply `n` activation rows `x` by `w^T` into `y`.
///
/// Panics if `x.len() < n * w.cols()` or `y.len() < n * w.rows()`: shapes are the caller's
/// invariant, never user input.
pub fn matmul(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    assert!(
        x.len() >= n * w.cols && y.len() >= n * w.rows,
        "matmul shape mismatch"
    );
    if n == 0 || w.rows == 0 {
        return;
    }
    let threads = super::pool::num_threads();
    // Enough chunks to balance the threads, each a multiple of 8 rows.
    let target = (w.rows / (threads * 4)).max(8);
    let chunk = target.div_ceil(8) * 8;
    let n_chunks = w.rows.div_ceil(chunk);
    let yp = SendPtr(y.as_mut_ptr());
    let avx = super::has_avx512();
    let body = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(w.rows);
        // SAFETY: chunk `c` writes only y[t * rows + r] for r in r0..r1: disjoint between chunks,
        // and inside the bounds asserted above.
        unsafe { run_chunk(x, n, w, yp.get(), r0, r1, avx) };
    };
    super::pool::parallel_for(n_chunks, &body);
}

/// # Safety
/// `y` must hold `n * w.rows` floats and no other thread may write rows `r0..r1` of it.
unsafe fn run_chunk(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize, avx: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx {
        let mut t0 = 0;
        while t0 < n {
            // Eight tokens per tile when there are that many: each weight block is decoded
            // once for eight tokens (two rows at a time keep the accumulators in registers).
            let t = if n - t0 >= 8 { 8 } else { (n - t0).min(4) };
            let mut r = r0;
            while r < r1 {
                let left = r1 - r;
                let rr = if t == 1 && left >= 8 {
                    8
                } else if t == 8 {
                    if left >= 2 {
                        2
                    } else {
                        1
                    }
                } else if left >= 4 {
                    4
                } else if left >= 2 {
                    2
                } else {
                    1
                };
                tile_dispatch(x, t0, t, w, r, rr, y);
                r += rr;
            }
            t0 += t;
        }
        return;
    }
    let _ = avx;
    scalar_chunk(x, n, w, y, r0, r1);
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_dispatch(
    x: &[f32],
    t0: usize,
    t: usize,
    w: &Matrix,
    r: usize,
    rr: usize,
    y: *mut f32,
) {
    use super::simd::x86::{tile_blocks, tile_f32, Q40, Q41, Q80};
    let xp = x.as_ptr().add(t0 * w.cols);
    let cols = w.cols;
    macro_rules! go {
        ($R:literal, $T:literal) => {{
            let mut out = [[0f32; $T]; $R];
            match &w.storage {
                Storage::F32(v) => {
                    tile_f32::<$R, $T>(v.as_ptr().add(r * cols), cols, xp, cols, cols, &mut out)
                }
                Storage::Blocks(b) => {
                    let rb = w.row_bytes();
                    let wp = b.as_ptr().add(r * rb);
                    match w.format {
                        WeightFormat::Q4_1 => {
                            tile_blocks::<Q41, $R, $T>(wp, rb, xp, cols, cols, &mut out)
                        }
                        WeightFormat::Q4_0 => {
                            tile_blocks::<Q40, $R, $T>(wp, rb, xp, cols, cols, &mut out)
                        }
                        WeightFormat::Q8_0 => {
                            tile_blocks::<Q80, $R, $T>(wp, rb, xp, cols, cols, &mut out)
                        }
                        WeightFormat::F32 => unreachable!("f32 matrices use F32 storage"),
                    }
                }
            }
            for (i, row) in out.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    *y.add((t0 + j) * w.rows + r + i) = *v;
                }
            }
        }};
    }
    match (rr, t) {
        (8, 1) => go!(8, 1),
        (4, 1) => go!(4, 1),
        (2, 1) => go!(2, 1),
        (1, 1) => go!(1, 1),
        (4, 2) => go!(4, 2),
        (2, 2) => go!(2, 2),
        (1, 2) => go!(1, 2),
        (4, 3) => go!(4, 3),
        (2, 3) => go!(2, 3),
        (1, 3) => go!(1, 3),
        (4, 4) => go!(4, 4),
        (2, 4) => go!(2, 4),
        (1, 4) => go!(1, 4),
        (2, 8) => go!(2, 8),
        (1, 8) => go!(1, 8),
        _ => unreachable!("tile shapes are chosen above"),
    }
}

/// Portable path: decode each row once, then plain dot products.
unsafe fn scalar_chunk(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize) {
    let cols = w.cols;
    let mut row = vec![0f32; cols];
    for r in r0..r1 {
        let wr: &[f32] = match &w.storage {
            Storage::F32(v) => &v[r * cols..(r + 1) * cols],
            Storage::Blocks(b) => {
                let rb = w.row_bytes();
                dequantize_row(w.format, &b[r * rb..(r + 1) * rb], &mut row);
                &row
            }
        };
        for t in 0..n {
            let xr = &x[t * cols..(t + 1) * cols];
            let s: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum();
            *y.add(t * w.rows + r) = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn byte(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 56) as u8
        }
    }

    fn random_matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut Lcg) -> Matrix {
        if format == WeightFormat::F32 {
            return Matrix::from_f32(rows, cols, (0..rows * cols).map(|_| rng.next()).collect())
                .unwrap();
        }
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / 32 {
            let scale = half::f16::from_f32(0.01 + rng.next().abs() * 0.05).to_le_bytes();
            bytes.extend(scale);
            let rest = format.block_bytes() - 2;
            if format == WeightFormat::Q4_1 {
                bytes.extend(half::f16::from_f32(rng.next() * 0.1).to_le_bytes());
                (0..rest - 2).for_each(|_| bytes.push(rng.byte()));
            } else {
                (0..rest).for_each(|_| bytes.push(rng.byte()));
            }
        }
        Matrix::from_blocks(format, rows, cols, bytes).unwrap()
    }

    fn reference(x: &[f32], n: usize, w: &Matrix) -> Vec<f64> {
        let mut out = vec![0f64; n * w.rows];
        let mut row = vec![0f32; w.cols];
        for r in 0..w.rows {
            w.row_to_f32(r, &mut row);
            for t in 0..n {
                out[t * w.rows + r] = (0..w.cols)
                    .map(|k| row[k] as f64 * x[t * w.cols + k] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn every_format_matches_f64_reference_and_is_batch_invariant() {
        let mut rng = Lcg(7);
        for format in [
            WeightFormat::F32,
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4_1,
        ] {
            for (rows, cols) in [(37, 64), (96, 160), (13, 32)] {
                let cols = if format == WeightFormat::F32 {
                    cols + 5
                } else {
                    cols
                };
                let w = random_matrix(format, rows, cols, &mut rng);
                for n in [1, 2, 3, 5, 9] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.next()).collect();
                    let mut y = vec![0f32; n * rows];
                    matmul(&x, n, &w, &mut y);
                    let want = reference(&x, n, &w);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{format:?} {a} vs {b}"
                        );
                    }
                    // Each token alone gives bit-identical outputs.
                    for t in 0..n {
                        let mut y1 = vec![0f32; rows];
                        matmul(&x[t * cols..(t + 1) * cols], 1, &w, &mut y1);
                        assert_eq!(
                            &y[t * rows..(t + 1) * rows],
                            &y1[..],
                            "{format:?} n={n} t={t}"
                        );
                    }
                }
            }
        }
    }
}
