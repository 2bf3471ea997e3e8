//! `y = x W^T`: activations `x` (`n x cols`, f32) times a weight [`Matrix`] (`rows x cols`, any
//! [`WeightFormat`]) into `y` (`n x rows`).
//!
//! Work is split over the kernel pool's threads by chunks of weight rows (multiples of 8);
//! inside a chunk the SIMD kernels walk token groups and, for each, tiles of rows, so a chunk of
//! weights stays in cache while every token passes over it, and each quantised block is decoded
//! in registers once per tile, for all the tile's tokens. Each output is one dot product
//! computed identically in every tile shape (see `simd` and `avx2`), so results are batch
//! invariant.
//! - AVX-512 (`simd`): token groups of 8 (then up to 4 for the rest); tiles (rows x tokens)
//!   8 x 1, 4 x (1..=4), 2 x 8, and the smaller ones (2 or 1 rows) that a chunk's last rows
//!   need.
//! - AVX2 + FMA (`avx2`, 16 vector registers): token groups of 8 while the 8 activation rows
//!   fit in L1 (`cols <= 768`), else of up to 4; tiles 4 x (1..=2), 2 x (3..=4), 1 x 8, and the
//!   smaller ones (2 or 1 rows) that a chunk's last rows need.
//!
//! The scalar path (no SIMD, or forced, see [`crate::cpu::KernelPath`]) decodes each row once
//! and sums plain products in fixed lanes: it is batch invariant too, and differs from the SIMD
//! paths only in summation order (and, for Q4_1, in `d * q + m` being fused there).

use super::matrix::{dequantize_row, Matrix, Storage, WeightFormat};
#[cfg(target_arch = "x86_64")]
use super::{Avx2, Avx512};
use super::{Isa, SendPtr};

/// Multiply `n` activation rows `x` by `w^T` into `y`.
///
/// # Panics
/// If `x.len() < n * w.cols()` or `y.len() < n * w.rows()` (also when these products overflow):
/// shapes are the caller's invariant, never user input.
pub fn matmul(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    let fits = |len: usize, per_row: usize| n.checked_mul(per_row).is_some_and(|need| len >= need);
    assert!(
        fits(x.len(), w.cols) && fits(y.len(), w.rows),
        "matmul shape mismatch: {n} rows of x ({} floats) times a {}x{} matrix into {} floats",
        x.len(),
        w.rows,
        w.cols,
        y.len()
    );
    if n == 0 || w.rows == 0 {
        return;
    }
    let (chunk, n_chunks) = row_chunks(w.rows);
    let yp = SendPtr(y.as_mut_ptr());
    let simd = super::simd();
    let body = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(w.rows);
        // SAFETY: `x` holds `n * cols` floats and `y` `n * rows` (asserted above, and `y` stays
        // borrowed mutably until `parallel_for` returns); chunk `c` writes only
        // `y[t * rows + r]` for `r` in `r0..r1`, disjoint from every other chunk's rows.
        unsafe { run_chunk(x, n, w, yp.get(), r0, r1, simd) };
    };
    super::pool::parallel_for(n_chunks, &body);
}

/// How the weight rows are split over the pool: `(rows per chunk, chunks)`, enough chunks to
/// balance the threads (four per thread), each a multiple of 8 rows. Depends on the matrix and
/// the thread count only, never on the batch.
pub(crate) fn row_chunks(rows: usize) -> (usize, usize) {
    let threads = super::pool::num_threads();
    let target = (rows / (threads * 4)).max(8);
    let chunk = target.div_ceil(8) * 8;
    (chunk, rows.div_ceil(chunk))
}

/// Write a tile's outputs: `out[i][j]` (weight row `r + i`, token `t0 + j`) to
/// `y[(t0 + j) * rows + r + i]`.
///
/// # Safety
/// `y` is valid for writes of `(t0 + T) * rows` floats, `r + R <= rows`, and no other thread
/// accesses those `R x T` elements meanwhile.
pub(crate) unsafe fn store_tile<const R: usize, const T: usize>(
    out: &[[f32; T]; R],
    y: *mut f32,
    rows: usize,
    t0: usize,
    r: usize,
) {
    for (i, row) in out.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            // SAFETY: `(t0 + j) * rows + r + i < (t0 + T) * rows` (the contract).
            unsafe { *y.add((t0 + j) * rows + r + i) = v };
        }
    }
}

/// Rows of the next tile: `most` while that many are `left`, else 2, else 1 (the tile shapes
/// every kernel set has).
pub(crate) fn tile_rows(left: usize, most: usize) -> usize {
    if left >= most {
        most
    } else if left >= 2 {
        2
    } else {
        1
    }
}

/// Rows `r0..r1` of `y = x W^T` for all `n` tokens.
///
/// # Safety
/// `x.len() >= n * w.cols`; `r0 <= r1 <= w.rows`; `y` is valid for writes of `n * w.rows`
/// floats, and while this runs no other thread reads or writes elements `y[t * w.rows + r]`
/// for `t < n`, `r` in `r0..r1`.
unsafe fn run_chunk(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize, simd: Isa) {
    #[cfg(target_arch = "x86_64")]
    if let Isa::Avx2(token) = simd {
        let cols = w.cols;
        let mut t0 = 0;
        while t0 < n {
            // Up to eight tokens per tile: each weight block is decoded once (into registers)
            // for all of them. The rows per tile keep `rows x tokens <= 8` accumulators, with
            // the decoding, in the 16 vector registers. Eight-token tiles take one row at a
            // time and read the eight activation rows once per weight row, so they are used
            // only while those rows fit in the L1 cache (`cols <= 768`).
            let t = if n - t0 >= 8 && cols <= 768 {
                8
            } else {
                (n - t0).min(4)
            };
            let mut r = r0;
            while r < r1 {
                let left = r1 - r;
                let most = match t {
                    1 | 2 => 4,
                    8 => 1,
                    _ => 2,
                };
                let rr = tile_rows(left, most);
                // SAFETY: `t0 + t <= n` and `r + rr <= r1 <= w.rows`; `x` and `y` are as our
                // own contract says, and the tile writes only rows `r..r + rr` of `y`, which
                // are ours.
                unsafe { tile_dispatch_avx2(token, x, t0, t, w, r, rr, y) };
                r += rr;
            }
            t0 += t;
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Isa::Avx512(token) = simd {
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
                // SAFETY: `t0 + t <= n` and `r + rr <= r1 <= w.rows`; `x` and `y` are as our
                // own contract says, and the tile writes only rows `r..r + rr` of `y`, which
                // are ours.
                unsafe { tile_dispatch(token, x, t0, t, w, r, rr, y) };
                r += rr;
            }
            t0 += t;
        }
        return;
    }
    let _ = simd;
    // SAFETY: forwarded from our own contract.
    unsafe { scalar_chunk(x, n, w, y, r0, r1) };
}

/// The body of one `$R x $T` tile, shared by the AVX-512 and AVX2 dispatchers: the
/// `tile_f32` / `tile_blocks` of the ISA module the call site imports as `isa`, into `y`.
/// Expands inside an `unsafe fn` whose contract is [`tile_dispatch`]'s, with `x` (through
/// `xp`, the offset of token `t0`), `w`, `r`, `t0`, `cols` and `y` as there.
#[cfg(target_arch = "x86_64")]
macro_rules! run_tile {
    ($R:literal, $T:literal, $w:ident, $xp:ident, $r:ident, $t0:ident, $cols:ident, $y:ident) => {{
        let mut out = [[0f32; $T]; $R];
        match &$w.storage {
            Storage::F32(v) => {
                // SAFETY: (this call and the three below) the token proves the features;
                // the `Matrix` invariant makes the storage `rows` whole rows (`rows * cols`
                // floats, or `rows * row_bytes` bytes of `cols / 32` blocks), so rows
                // `r..r + $R` are readable from the offset of row `r`; tokens
                // `t0..t0 + $T` of `x` are readable from `xp` with stride `cols` (our
                // contract).
                unsafe {
                    isa::tile_f32::<$R, $T>(
                        v.as_ptr().add($r * $cols),
                        $cols,
                        $xp,
                        $cols,
                        $cols,
                        &mut out,
                    )
                }
            }
            Storage::Blocks(b) => {
                let rb = $w.row_bytes();
                // SAFETY: `r < rows`, so the offset of row `r` is inside the storage.
                let wp = unsafe { b.as_ptr().add($r * rb) };
                match $w.format {
                    // SAFETY: see the F32 arm.
                    WeightFormat::Q4_1 => unsafe {
                        isa::tile_blocks::<isa::Q41, $R, $T>(wp, rb, $xp, $cols, $cols, &mut out)
                    },
                    // SAFETY: see the F32 arm.
                    WeightFormat::Q4_0 => unsafe {
                        isa::tile_blocks::<isa::Q40, $R, $T>(wp, rb, $xp, $cols, $cols, &mut out)
                    },
                    // SAFETY: see the F32 arm.
                    WeightFormat::Q8_0 => unsafe {
                        isa::tile_blocks::<isa::Q80, $R, $T>(wp, rb, $xp, $cols, $cols, &mut out)
                    },
                    WeightFormat::F32 => unreachable!("f32 matrices use F32 storage"),
                }
            }
        }
        // SAFETY: the tile's outputs are elements of `y` our contract gives to this tile alone.
        unsafe { store_tile(&out, $y, $w.rows, $t0, $r) };
    }};
}

/// One tile: rows `r..r + rr` of `w` times tokens `t0..t0 + t` of `x`, into `y`.
///
/// # Safety
/// `(rr, t)` is one of the shapes matched below; `t0 + t` tokens fit in `x`
/// (`x.len() >= (t0 + t) * w.cols`); `r + rr <= w.rows`; `y` is valid for writes of
/// `(t0 + t) * w.rows` floats and no other thread accesses `y[(t0 + j) * w.rows + r + i]`
/// (`j < t`, `i < rr`) meanwhile. (The `Avx512` token covers the processor features.)
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(
    _token: Avx512,
    x: &[f32],
    t0: usize,
    t: usize,
    w: &Matrix,
    r: usize,
    rr: usize,
    y: *mut f32,
) {
    use super::simd::x86 as isa;
    let cols = w.cols;
    // SAFETY: `t0 * cols <= x.len()` by our contract, so the offset stays inside `x`.
    let xp = unsafe { x.as_ptr().add(t0 * cols) };
    macro_rules! go {
        ($R:literal, $T:literal) => {
            run_tile!($R, $T, w, xp, r, t0, cols, y)
        };
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

/// One AVX2 tile: rows `r..r + rr` of `w` times tokens `t0..t0 + t` of `x`, into `y`.
///
/// # Safety
/// As [`tile_dispatch`]: `(rr, t)` is one of the shapes matched below; `t0 + t` tokens fit in
/// `x`; `r + rr <= w.rows`; `y` is valid for writes of `(t0 + t) * w.rows` floats and no other
/// thread accesses `y[(t0 + j) * w.rows + r + i]` (`j < t`, `i < rr`) meanwhile. (The `Avx2`
/// token covers the processor features.)
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch_avx2(
    _token: Avx2,
    x: &[f32],
    t0: usize,
    t: usize,
    w: &Matrix,
    r: usize,
    rr: usize,
    y: *mut f32,
) {
    use super::avx2 as isa;
    let cols = w.cols;
    // SAFETY: `t0 * cols <= x.len()` by our contract, so the offset stays inside `x`.
    let xp = unsafe { x.as_ptr().add(t0 * cols) };
    macro_rules! go {
        ($R:literal, $T:literal) => {
            run_tile!($R, $T, w, xp, r, t0, cols, y)
        };
    }
    match (rr, t) {
        (8, 1) => go!(8, 1),
        (4, 1) => go!(4, 1),
        (2, 1) => go!(2, 1),
        (1, 1) => go!(1, 1),
        (4, 2) => go!(4, 2),
        (2, 2) => go!(2, 2),
        (1, 2) => go!(1, 2),
        (2, 3) => go!(2, 3),
        (1, 3) => go!(1, 3),
        (2, 4) => go!(2, 4),
        (1, 4) => go!(1, 4),
        (1, 8) => go!(1, 8),
        _ => unreachable!("tile shapes are chosen in run_chunk"),
    }
}

/// Portable path: decode each row once, then dot products in fixed lanes
/// ([`super::ops::dot_lanes`]). On a processor with AVX2 and FMA the same code is compiled for
/// those features (the compiler keeps the lanes in vector registers; it never fuses a multiply
/// and an add, so the results are bit for bit the portable ones).
///
/// # Safety
/// As [`run_chunk`]: `x.len() >= n * w.cols`, `r0 <= r1 <= w.rows`, and `y` is valid for
/// writes of `n * w.rows` floats of which `y[t * w.rows + r]` (`t < n`, `r` in `r0..r1`) are
/// accessed by no other thread meanwhile. (`x` and the weights are read with bounds checks.)
unsafe fn scalar_chunk(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the processor has the features the function is compiled for; the rest of
        // the contract is ours, passed on unchanged.
        return unsafe { portable_chunk_avx2(x, n, w, y, r0, r1) };
    }
    // SAFETY: our contract, passed on unchanged.
    unsafe { portable_chunk(x, n, w, y, r0, r1) }
}

/// [`portable_chunk`] compiled for AVX2 and FMA.
///
/// # Safety
/// The processor supports AVX2 and FMA, and the contract of [`scalar_chunk`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_chunk_avx2(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize) {
    // SAFETY: the contract of `scalar_chunk`, passed on unchanged.
    unsafe { portable_chunk(x, n, w, y, r0, r1) }
}

/// The portable chunk itself (inlined into each compiled variant).
///
/// # Safety
/// As [`scalar_chunk`].
#[inline(always)]
unsafe fn portable_chunk(x: &[f32], n: usize, w: &Matrix, y: *mut f32, r0: usize, r1: usize) {
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
            let s = super::ops::dot_lanes(wr, xr);
            // SAFETY: `t * rows + r < n * rows`, an element our contract gives to this chunk.
            unsafe { *y.add(t * w.rows + r) = s };
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
