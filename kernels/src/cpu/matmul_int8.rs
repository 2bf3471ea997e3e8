//! The fast precision's matrix multiply: activations quantised per token to 8 bits
//! ([`QuantizedRows`]) times block-quantised weights, as integer dot products per block.
//!
//! [`Precision::Exact`] (the default) is [`super::matmul::matmul`]: float32 activations times
//! the dequantised weights, bit-exact float32 products. [`Precision::Fast`] trades that for
//! speed, as llama.cpp does on CPUs: each block of 32 activations becomes 32 signed bytes and a
//! scale, and a block's dot product is summed in integers. Its error against float32 is
//! measured in `docs/benchmarks.md` and tested in `tests/tests/fast_precision.rs`.
//!
//! # Invariants
//!
//! - Batch invariant, like the exact precision: a row is quantised on its own, and each output
//!   is computed by the same operations whatever the tile or the thread (see `avx2_int8`:
//!   each block's integer sums over its two halves, scaled and accumulated in two floats).
//! - Float32 weight matrices have no integer form: the fast precision multiplies them exactly.
//! - Paths: AVX-512 VNNI (`vnni_int8`, where the processor has it and the AVX-512 path is
//!   allowed), AVX2 (`avx2_int8`) or portable scalar code, which does the AVX2 kernels'
//!   operations one lane at a time. The VNNI kernels only form the exact integer sums
//!   differently, so all three give the same bits.

#[cfg(target_arch = "x86_64")]
use super::avx2_int8 as isa;
use super::matmul::{matmul, row_chunks, tile_rows};
use super::matrix::{block_offset, Matrix, Storage, WeightFormat};
use super::quantized_rows::QuantizedRows;
#[cfg(target_arch = "x86_64")]
use super::vnni_int8::{self as vnni, Vnni};
#[cfg(target_arch = "x86_64")]
use super::Avx2;
use super::{Isa, SendPtr};

/// Which arithmetic the matrix multiplies of a model use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Float32 activations times the exactly dequantised weights: matches a float32 reference
    /// (transformers) up to summation order.
    #[default]
    Exact,
    /// Activations quantised per token to 8 bits per block of 32, integer dot products: faster,
    /// with a small, measured error against float32.
    Fast,
}

impl Precision {
    /// Parse `exact` or `fast` (ASCII case ignored).
    pub fn parse(s: &str) -> Option<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exact" => Some(Precision::Exact),
            "fast" => Some(Precision::Fast),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        }
    }
}

/// `y = x W^T` in the given precision (see [`Precision`]); `scratch` holds the quantised
/// activations of the fast precision between calls, so no call allocates once it has grown.
///
/// # Panics
/// As [`matmul`]: if `x.len() < n * w.cols()` or `y.len() < n * w.rows()`.
pub fn matmul_with(
    precision: Precision,
    x: &[f32],
    n: usize,
    w: &Matrix,
    y: &mut [f32],
    scratch: &mut QuantizedRows,
) {
    if precision == Precision::Exact || w.format == WeightFormat::F32 {
        return matmul(x, n, w, y);
    }
    // `quantize` checks `x` holds `n * cols` values; `matmul_quantized` checks `y`.
    scratch.quantize(x, n, w.cols);
    matmul_quantized(scratch, w, y);
}

/// `y = x W^T` for activations already quantised (`x.rows()` rows of `w.cols()` columns) and a
/// block-quantised `w`; a float32 `w` is multiplied exactly with the activations decoded.
///
/// # Panics
/// If `x.cols() != w.cols()` or `y.len() < x.rows() * w.rows()` (also when that overflows).
pub fn matmul_quantized(x: &QuantizedRows, w: &Matrix, y: &mut [f32]) {
    let n = x.rows;
    assert!(
        x.cols == w.cols && n.checked_mul(w.rows).is_some_and(|need| y.len() >= need),
        "matmul shape mismatch: {n} quantised rows of {} columns times a {}x{} matrix into {} \
         floats",
        x.cols,
        w.rows,
        w.cols,
        y.len()
    );
    if n == 0 || w.rows == 0 {
        return;
    }
    if w.format == WeightFormat::F32 {
        let decoded: Vec<f32> = (0..n).flat_map(|r| x.row_to_f32(r)).collect();
        return matmul(&decoded, n, w, y);
    }
    let Storage::Blocks(bytes) = &w.storage else {
        unreachable!("float32 matrices were multiplied above")
    };
    let (chunk, n_chunks) = row_chunks(w.rows);
    let yp = SendPtr(y.as_mut_ptr());
    let simd = super::simd();
    let body = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(w.rows);
        // SAFETY: `x` is a valid `QuantizedRows` of `n` rows of `w.cols` columns (its
        // invariant, and the assert above), `y` holds `n * rows` floats (asserted, and stays
        // borrowed mutably until `parallel_for` returns); chunk `c` writes only
        // `y[t * rows + r]` for `r` in `r0..r1`, disjoint from every other chunk's rows.
        unsafe { run_chunk(x, w, bytes, yp.get(), r0, r1, simd) };
    };
    super::pool::parallel_for(n_chunks, &body);
}

/// Rows `r0..r1` of the product for all of `x`'s rows; `bytes` are `w`'s blocks.
///
/// # Safety
/// `x.cols == w.cols`, `w` is block-quantised with storage `bytes`, `r0 <= r1 <= w.rows`; `y`
/// is valid for writes of `x.rows * w.rows` floats, and while this runs no other thread
/// accesses `y[t * w.rows + r]` for `r` in `r0..r1`.
unsafe fn run_chunk(
    x: &QuantizedRows,
    w: &Matrix,
    bytes: &[u8],
    y: *mut f32,
    r0: usize,
    r1: usize,
    simd: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if !matches!(simd, Isa::Portable) {
        if let (Isa::Avx512(_), Some(_token)) = (simd, Vnni::detect()) {
            // SAFETY: forwarded from our own contract; the token proves the features.
            return unsafe { simd_chunk::<Vnni>(x, w, bytes, y, r0, r1) };
        }
        if let Some(_token) = Avx2::detect() {
            // SAFETY: as above.
            return unsafe { simd_chunk::<isa::Madd>(x, w, bytes, y, r0, r1) };
        }
    }
    let _ = simd;
    // SAFETY: forwarded from our own contract.
    unsafe { portable_chunk(x, w, bytes, y, r0, r1) }
}

/// One SIMD kernel set of the fast precision: the AVX2 kernels ([`isa::Madd`]) or the AVX-512
/// VNNI ones ([`Vnni`]), which give the same bits.
#[cfg(target_arch = "x86_64")]
trait TileSet {
    /// The set's `tile_token_quads` (see [`isa::tile_token_quads`]).
    ///
    /// # Safety
    /// As the kernel's, and the processor has the set's features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn token_quads<B: isa::IntBlock, const R: usize, const G: usize>(
        w: *const u8,
        row_bytes: usize,
        xq4: *const i8,
        xd4: *const f32,
        xs8: *const f32,
        xn8: *const i32,
        blocks: usize,
        out: &mut [[[f32; 4]; G]; R],
    );

    /// The set's `tile_row_quads` (see [`isa::tile_row_quads`]).
    ///
    /// # Safety
    /// As the kernel's, and the processor has the set's features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_quads<B: isa::IntBlock, const T: usize>(
        w: [*const u8; 4],
        row_bytes: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        blocks: usize,
        out: &mut [[f32; 4]; T],
    );
}

/// Implements [`TileSet`] by the kernels of module `$m`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_set {
    ($set:ty, $m:ident) => {
        impl TileSet for $set {
            #[inline(always)]
            unsafe fn token_quads<B: isa::IntBlock, const R: usize, const G: usize>(
                w: *const u8,
                row_bytes: usize,
                xq4: *const i8,
                xd4: *const f32,
                xs8: *const f32,
                xn8: *const i32,
                blocks: usize,
                out: &mut [[[f32; 4]; G]; R],
            ) {
                // SAFETY: forwarded (the trait's contract).
                unsafe {
                    $m::tile_token_quads::<B, R, G>(w, row_bytes, xq4, xd4, xs8, xn8, blocks, out)
                }
            }

            #[inline(always)]
            unsafe fn row_quads<B: isa::IntBlock, const T: usize>(
                w: [*const u8; 4],
                row_bytes: usize,
                xq: *const i8,
                xd: *const f32,
                xs: *const f32,
                blocks: usize,
                out: &mut [[f32; 4]; T],
            ) {
                // SAFETY: forwarded (the trait's contract).
                unsafe { $m::tile_row_quads::<B, T>(w, row_bytes, xq, xd, xs, blocks, out) }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
tile_set!(isa::Madd, isa);
#[cfg(target_arch = "x86_64")]
tile_set!(Vnni, vnni);

/// Rows `r0..r1` of the product on a SIMD path (kernel set `K`), for every block format.
///
/// # Safety
/// As [`run_chunk`], and the processor has `K`'s features.
#[cfg(target_arch = "x86_64")]
unsafe fn simd_chunk<K: TileSet>(
    x: &QuantizedRows,
    w: &Matrix,
    bytes: &[u8],
    y: *mut f32,
    r0: usize,
    r1: usize,
) {
    match w.format {
        // SAFETY: forwarded; the format names the block type of `bytes`.
        WeightFormat::Q4_1 => unsafe { chunk_of::<isa::Q41, K>(x, w, bytes, y, r0, r1) },
        // SAFETY: as above.
        WeightFormat::Q4_0 => unsafe { chunk_of::<isa::Q40, K>(x, w, bytes, y, r0, r1) },
        // SAFETY: as above.
        WeightFormat::Q8_0 => unsafe { chunk_of::<isa::Q80, K>(x, w, bytes, y, r0, r1) },
        WeightFormat::F32 => unreachable!("float32 matrices are multiplied exactly"),
    }
}

/// Rows `r0..r1` of the product for the block type `B` of `w` with kernel set `K`: whole
/// groups of four tokens with the tokens in the lanes ([`isa::tile_token_quads`]), sixteen at a
/// time while there are as many, then eight, then four; the last `n % 4` tokens with four
/// weight rows in the lanes ([`isa::tile_row_quads`]). Both do the same operations for each
/// output, so a token's outputs do not depend on which of them it went through (batch
/// invariance).
///
/// # Safety
/// As [`run_chunk`], `w`'s blocks are `B`'s, and the processor has `K`'s features.
#[cfg(target_arch = "x86_64")]
unsafe fn chunk_of<B: isa::IntBlock, K: TileSet>(
    x: &QuantizedRows,
    w: &Matrix,
    bytes: &[u8],
    y: *mut f32,
    r0: usize,
    r1: usize,
) {
    let n = x.rows;
    let blocks = w.cols / 32;
    let rb = w.row_bytes();
    let rows = w.rows;
    // Every pointer below is to a row `< r1 <= w.rows` of `bytes` or to a token `< n` (a group
    // `< n / 4`) of `x`: whole rows of their buffers by the `Matrix` and `QuantizedRows`
    // invariants, with `x.cols == w.cols` (our contract).
    let row = |r: usize| bytes[r * rb..].as_ptr();
    let full = n / 4 * 4;
    let mut t0 = 0;
    while t0 < full {
        let groups = match full - t0 {
            16.. => 4,
            8.. => 2,
            _ => 1,
        };
        let g0 = t0 / 4;
        let (xq4, xd4, xs8, xn8) = (
            x.q4[g0 * blocks * 128..].as_ptr(),
            x.d4[g0 * blocks * 4..].as_ptr(),
            x.s8[g0 * blocks * 8..].as_ptr(),
            x.n8[g0 * blocks * 8..].as_ptr(),
        );
        // The outputs of a strip of up to `STRIP` rows, per token, written to `y` a token's
        // run of rows at a time: one row's 16 outputs go to 16 different lines of `y`, and
        // stored one by one they stall on those lines (the output projection's `y` is 3 MB at
        // 16 tokens).
        const STRIP: usize = 16;
        // Per token of the pass (at most four groups of four), its outputs for the strip.
        let mut strip = [[0f32; STRIP]; 4 * 4];
        let mut s0 = r0;
        while s0 < r1 {
            let s1 = (s0 + STRIP).min(r1);
            let mut r = s0;
            while r < s1 {
                // Several groups take one row at a time (the four spread weight vectors and one
                // accumulator per group fill the registers), as does Q8_0 (which also keeps the
                // weights' absolute values); a single group takes up to four rows.
                let rr = if B::SIGNED || groups > 1 {
                    1
                } else {
                    tile_rows(s1 - r, 4)
                };
                macro_rules! go {
                    ($R:literal, $G:literal) => {{
                        let mut out = [[[0f32; 4]; $G]; $R];
                        // SAFETY: rows `r..r + $R <= s1 <= r1` and groups `g0..g0 + $G <= n / 4`
                        // (see above); the features are our contract's.
                        unsafe {
                            K::token_quads::<B, $R, $G>(
                                row(r),
                                rb,
                                xq4,
                                xd4,
                                xs8,
                                xn8,
                                blocks,
                                &mut out,
                            )
                        };
                        for (i, out) in out.iter().enumerate() {
                            for (j, &v) in out.iter().flatten().enumerate() {
                                strip[j][r - s0 + i] = v;
                            }
                        }
                    }};
                }
                match (rr, groups) {
                    (4, 1) => go!(4, 1),
                    (2, 1) => go!(2, 1),
                    (1, 1) => go!(1, 1),
                    (1, 2) => go!(1, 2),
                    (1, 4) => go!(1, 4),
                    _ => unreachable!("tile shapes are chosen just above"),
                }
                r += rr;
            }
            for (j, outs) in strip.iter().enumerate().take(4 * groups) {
                // SAFETY: rows `s0..s1` are in `r0..r1`, ours (contract); token `t0 + j < n`;
                // `strip` is a local array, not part of `y`. A whole strip is one fixed-size
                // copy (two vector stores, where a copy of run-time length calls `memcpy`).
                unsafe {
                    let to = y.add((t0 + j) * rows + s0);
                    if s1 - s0 == STRIP {
                        std::ptr::write_unaligned(to as *mut [f32; STRIP], *outs);
                    } else {
                        std::ptr::copy_nonoverlapping(outs.as_ptr(), to, s1 - s0);
                    }
                }
            }
            s0 = s1;
        }
        t0 += 4 * groups;
    }
    // The last `n % 4` tokens, four weight rows at a time (a last quad short of rows repeats
    // its last row in the spare lanes and discards them).
    let left = n - full;
    if left == 0 {
        return;
    }
    let (xq, xd, xs) = (
        x.q[full * w.cols..].as_ptr(),
        x.d[full * blocks..].as_ptr(),
        x.s[full * blocks..].as_ptr(),
    );
    let mut r = r0;
    while r < r1 {
        let real = (r1 - r).min(4);
        let ws: [*const u8; 4] = std::array::from_fn(|i| row(r + i.min(real - 1)));
        macro_rules! go {
            ($T:literal) => {{
                let mut out = [[0f32; 4]; $T];
                // SAFETY: whole rows `< r1` and tokens `full..n` (see above); the features
                // are our contract's.
                unsafe { K::row_quads::<B, $T>(ws, rb, xq, xd, xs, blocks, &mut out) };
                for (t, out) in out.iter().enumerate() {
                    for (i, &v) in out.iter().enumerate().take(real) {
                        // SAFETY: row `r + i < r1` is ours (contract); token `full + t < n`.
                        unsafe { *y.add((full + t) * rows + r + i) = v };
                    }
                }
            }};
        }
        match left {
            1 => go!(1),
            2 => go!(2),
            _ => go!(3),
        }
        r += real;
    }
}

/// One weight block as integers: its 32 quants in element order and its scale (`value =
/// d * q`, plus the Q4 formats' offset, added separately); the scalar reference of the AVX2
/// decoding.
fn int_block(format: WeightFormat, blk: &[u8], q: &mut [i32; 32]) -> f32 {
    let f16 = |at: usize| half::f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
    let nibbles = |q: &mut [i32; 32], qs: &[u8]| {
        for j in 0..16 {
            q[j] = (qs[j] & 0x0f) as i32;
            q[j + 16] = (qs[j] >> 4) as i32;
        }
    };
    match format {
        WeightFormat::Q8_0 => {
            for (q, &b) in q.iter_mut().zip(&blk[2..34]) {
                *q = b as i8 as i32;
            }
            f16(0)
        }
        // The nibbles follow the scale (Q4_0) or the scale and the offset (Q4_1).
        WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
            nibbles(q, &blk[blk.len() - 16..]);
            f16(0)
        }
        WeightFormat::F32 => unreachable!("float32 matrices are multiplied exactly"),
    }
}

/// Portable path: the AVX2 kernels' operations one lane at a time (see `avx2_int8`), so it
/// gives the same bits. Per output and block, in order: `lo = fma(float(Σ_{j<16} q_w q_x),
/// d_w * d_x, lo)`, then `lo = fma(offset, s_x, lo)` for the formats with offsets; `hi` the
/// same over elements `16..32`, with `fma(offset, 0, hi)`. The output is `lo + hi`.
///
/// # Safety
/// As [`run_chunk`] (every read is bounds-checked; only the writes to `y` are raw).
unsafe fn portable_chunk(
    x: &QuantizedRows,
    w: &Matrix,
    bytes: &[u8],
    y: *mut f32,
    r0: usize,
    r1: usize,
) {
    let n = x.rows;
    let blocks = w.cols / 32;
    let rb = w.row_bytes();
    let bb = w.format.block_bytes();
    let mut halves = vec![[0f32; 2]; n];
    let mut q = [0i32; 32];
    for r in r0..r1 {
        halves.fill([0.0; 2]);
        for (b, blk) in bytes[r * rb..(r + 1) * rb].chunks_exact(bb).enumerate() {
            let d = int_block(w.format, blk, &mut q);
            let offset = block_offset(w.format, blk);
            for (t, [lo, hi]) in halves.iter_mut().enumerate() {
                let at = t * blocks + b;
                let xq = &x.q[at * 32..at * 32 + 32];
                let dot = |from: usize| -> f32 {
                    let sum: i32 = q[from..from + 16]
                        .iter()
                        .zip(&xq[from..from + 16])
                        .map(|(&a, &b)| a * b as i32)
                        .sum();
                    sum as f32
                };
                let scale = d * x.d[at];
                *lo = dot(0).mul_add(scale, *lo);
                *hi = dot(16).mul_add(scale, *hi);
                if let Some(o) = offset {
                    *lo = o.mul_add(x.s[at], *lo);
                    *hi = o.mul_add(0.0, *hi);
                }
            }
        }
        for (t, [lo, hi]) in halves.iter().enumerate() {
            // SAFETY: `t * rows + r < n * rows`, an element our contract gives to this chunk.
            unsafe { *y.add(t * w.rows + r) = lo + hi };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{with_kernel_path, KernelPath};

    struct Lcg(u64);
    impl Lcg {
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0
        }
        fn float(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn random_matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut Lcg) -> Matrix {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / 32 {
            bytes.extend(half::f16::from_f32(0.01 + rng.float().abs() * 0.05).to_le_bytes());
            let mut rest = format.block_bytes() - 2;
            if format == WeightFormat::Q4_1 {
                bytes.extend(half::f16::from_f32(rng.float() * 0.1).to_le_bytes());
                rest -= 2;
            }
            for _ in 0..rest {
                // Q8_0 quants include -128, which GGML never writes but a file may hold.
                bytes.push((rng.next_u64() >> 56) as u8);
            }
        }
        Matrix::from_blocks(format, rows, cols, bytes).unwrap()
    }

    /// The exact product of the dequantised weights and the *quantised* activations, in f64.
    fn reference(x: &QuantizedRows, w: &Matrix) -> Vec<f64> {
        let mut out = vec![0f64; x.rows * w.rows];
        let mut row = vec![0f32; w.cols];
        for r in 0..w.rows {
            w.row_to_f32(r, &mut row);
            for t in 0..x.rows {
                let xr = x.row_to_f32(t);
                out[t * w.rows + r] = row
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_f64_product_gives_the_same_bits_and_is_batch_invariant() {
        let mut rng = Lcg(11);
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q4_1] {
            // 1, 2 and 5 blocks a row (offsets in one partial vector), 8 (one whole vector) and
            // 18 (two whole vectors and a partial one); row counts that leave 1, 2 or 3 rows
            // over from the four-row tiles.
            for (rows, cols) in [(37, 64), (96, 160), (13, 32), (8, 256), (21, 576)] {
                let w = random_matrix(format, rows, cols, &mut rng);
                // Token counts through every tile: 1-3 tokens (rows in the lanes), one, two and
                // four groups of four (tokens in the lanes), and groups with 1-3 left over.
                for n in [1, 2, 3, 4, 5, 8, 9, 12, 16, 19, 23, 30] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.float() * 3.0).collect();
                    let mut xq = QuantizedRows::default();
                    xq.quantize(&x, n, cols);
                    let want = reference(&xq, &w);
                    let mut by_path = Vec::new();
                    // Auto is the VNNI kernels where the processor has them.
                    for path in [KernelPath::Auto, KernelPath::Avx2, KernelPath::Scalar] {
                        with_kernel_path(path, || {
                            let mut y = vec![0f32; n * rows];
                            matmul_quantized(&xq, &w, &mut y);
                            for (a, b) in y.iter().zip(&want) {
                                assert!(
                                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                                    "{format:?} {path:?} {a} vs {b}"
                                );
                            }
                            // Each token alone, through the public entry, gives bit-identical
                            // outputs.
                            let mut scratch = QuantizedRows::default();
                            for t in 0..n {
                                let mut y1 = vec![0f32; rows];
                                matmul_with(
                                    Precision::Fast,
                                    &x[t * cols..(t + 1) * cols],
                                    1,
                                    &w,
                                    &mut y1,
                                    &mut scratch,
                                );
                                assert_eq!(
                                    &y[t * rows..(t + 1) * rows],
                                    &y1[..],
                                    "{format:?} {path:?} n={n} t={t}"
                                );
                            }
                            by_path.push(y);
                        });
                    }
                    // The SIMD kernels and the portable code do the same operations.
                    assert_eq!(by_path[0], by_path[2], "{format:?} {rows}x{cols} n={n}");
                    assert_eq!(by_path[1], by_path[2], "{format:?} {rows}x{cols} n={n}");
                }
            }
        }
    }

    #[test]
    fn fast_stays_close_to_exact_and_exact_is_untouched() {
        let mut rng = Lcg(5);
        let (rows, cols, n) = (64, 576, 4);
        let w = random_matrix(WeightFormat::Q4_1, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.float()).collect();
        let mut exact = vec![0f32; n * rows];
        matmul(&x, n, &w, &mut exact);
        let mut scratch = QuantizedRows::default();
        let mut same = vec![0f32; n * rows];
        matmul_with(Precision::Exact, &x, n, &w, &mut same, &mut scratch);
        assert_eq!(exact, same, "the exact precision is the float32 multiply");
        let mut fast = vec![0f32; n * rows];
        matmul_with(Precision::Fast, &x, n, &w, &mut fast, &mut scratch);
        // 8-bit activations: an error of about 0.4% of the output's scale.
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = exact
            .iter()
            .zip(&fast)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst > 0.0 && worst < 0.02 * scale, "{worst} of {scale}");
        // A float32 matrix is multiplied exactly in the fast precision too.
        let wf =
            Matrix::from_f32(rows, cols, (0..rows * cols).map(|_| rng.float()).collect()).unwrap();
        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        matmul(&x, n, &wf, &mut a);
        matmul_with(Precision::Fast, &x, n, &wf, &mut b, &mut scratch);
        assert_eq!(a, b);
    }

    #[test]
    fn precision_names_round_trip() {
        for p in [Precision::Exact, Precision::Fast] {
            assert_eq!(Precision::parse(p.as_str()), Some(p));
        }
        assert_eq!(Precision::parse(" FAST "), Some(Precision::Fast));
        assert_eq!(Precision::parse("int8"), None);
        assert_eq!(Precision::default(), Precision::Exact);
    }
}
