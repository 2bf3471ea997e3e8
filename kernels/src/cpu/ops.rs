//! Element-wise and per-row kernels of the decoder: RMSNorm, rotary embedding, SiLU gate,
//! residual and bias adds. Each row is processed independently (batch invariant); rows are
//! spread over threads when there are enough of them to pay for it.

use super::pool::parallel_for;
use super::{Isa, SendPtr};

const PAR_ROWS: usize = 16;

/// Dot product over the first `min(a.len(), b.len())` elements: AVX-512 or AVX2 with a token,
/// else scalar (the three differ only in summation order).
pub(crate) fn dot(simd: Isa, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the `Avx512` token proves the processor features; the slices bound the rest.
        Isa::Avx512(_) => return unsafe { super::simd::x86::dot(a, b) },
        // SAFETY: the `Avx2` token proves the processor features; the slices bound the rest.
        Isa::Avx2(_) => return unsafe { super::avx2::dot(a, b) },
        Isa::Portable => {}
    }
    let _ = simd;
    dot_lanes(a, b)
}

/// Portable dot product in 16 independent lanes (element `i` goes to lane `i % 16`), the lanes
/// summed pairwise in a fixed order, then the tail: the same order for every call of a given
/// length, so results stay batch invariant, and the compiler can keep the lanes in vector
/// registers.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc[0] + tail
}

/// `y += a * x` over the first `min(x.len(), y.len())` elements: AVX-512 or AVX2 (fused
/// multiply-add) with a token, else scalar.
pub(crate) fn axpy(simd: Isa, a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the `Avx512` token proves the processor features; the slices bound the rest.
        Isa::Avx512(_) => return unsafe { super::simd::x86::axpy(a, x, y) },
        // SAFETY: the `Avx2` token proves the processor features; the slices bound the rest.
        Isa::Avx2(_) => return unsafe { super::avx2::axpy(a, x, y) },
        Isa::Portable => {}
    }
    let _ = simd;
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Run `f(i, chunk_i)` over the `width`-sized chunks of `data`, in parallel when there are
/// at least `min_par` of them. A trailing partial chunk is passed too when serial, never in
/// parallel: callers give a `data` that is a whole number of chunks.
///
/// # Panics
/// If `width == 0`, or if `f` panics.
pub(crate) fn chunks_mut_par<F: Fn(usize, &mut [f32]) + Sync>(
    data: &mut [f32],
    width: usize,
    min_par: usize,
    f: F,
) {
    assert!(width > 0, "chunks of zero width");
    let n = data.len() / width;
    if n >= min_par {
        let p = SendPtr(data.as_mut_ptr());
        parallel_for(n, &|i| {
            // SAFETY: `i < n`, so chunk i covers [i*width, (i+1)*width) of `data`: in bounds and
            // disjoint from every other chunk, and `data` stays borrowed mutably (nothing else
            // touches it) until `parallel_for` returns, after every item.
            let chunk = unsafe { std::slice::from_raw_parts_mut(p.get().add(i * width), width) };
            f(i, chunk)
        });
    } else {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

fn rows_mut<F: Fn(usize, &mut [f32]) + Sync>(data: &mut [f32], width: usize, f: F) {
    chunks_mut_par(data, width, PAR_ROWS, f)
}

/// Run `f(i, row_i of a, row_i of b)` over the `rows` rows of width `width` of two buffers, in
/// parallel when there are at least `PAR_ROWS` rows.
///
/// # Panics
/// If `width == 0` or either buffer is shorter than `rows * width` (also when that overflows),
/// or if `f` panics.
fn rows2_mut<F: Fn(usize, &mut [f32], &mut [f32]) + Sync>(
    a: &mut [f32],
    b: &mut [f32],
    rows: usize,
    width: usize,
    f: F,
) {
    assert!(
        width > 0
            && rows
                .checked_mul(width)
                .is_some_and(|n| a.len() >= n && b.len() >= n),
        "rows2_mut: {rows} rows of {width} in buffers of {} and {}",
        a.len(),
        b.len()
    );
    if rows < PAR_ROWS {
        for (i, (ra, rb)) in a
            .chunks_mut(width)
            .zip(b.chunks_mut(width))
            .take(rows)
            .enumerate()
        {
            f(i, ra, rb);
        }
        return;
    }
    let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
    parallel_for(rows, &|i| {
        // SAFETY: `i < rows`, so row `i` covers `[i * width, (i + 1) * width)` of each buffer
        // (asserted long enough): in bounds, disjoint from every other row, and both buffers
        // stay borrowed mutably (nothing else touches them) until `parallel_for` returns,
        // after every item. `a` and `b` are two `&mut` borrows, so they do not overlap.
        let (ra, rb) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.get().add(i * width), width),
                std::slice::from_raw_parts_mut(pb.get().add(i * width), width),
            )
        };
        f(i, ra, rb)
    });
}

/// `out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight` for each row of width `weight.len()`.
///
/// The mean square is a dot product: AVX-512, AVX2 and scalar results differ by summation order
/// only.
///
/// # Panics
/// If `weight` is empty, `x.len()` is not a multiple of `weight.len()`, or `out` is shorter
/// than `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && out.len() >= x.len(),
        "rms_norm: {} inputs, {} weights, {} outputs",
        x.len(),
        d,
        out.len()
    );
    let simd = super::simd();
    rows_mut(&mut out[..x.len()], d, |i, o| {
        norm_row(simd, &x[i * d..(i + 1) * d], weight, eps, o)
    });
}

/// One row of [`rms_norm`]: `o = x / sqrt(mean(x^2) + eps) * weight` (the mean square a dot
/// product on `simd`'s path).
fn norm_row(simd: Isa, x: &[f32], weight: &[f32], eps: f32, o: &mut [f32]) {
    let inv = 1.0 / (dot(simd, x, x) / weight.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// The residual add and the next RMSNorm in one pass over the rows: `x[i] += delta[i]`, then
/// `out[i]` = [`rms_norm`] of the new `x[i]`, row by row (width `weight.len()`), in parallel
/// when there are enough rows. The same values as [`add_in_place`] followed by [`rms_norm`].
///
/// # Panics
/// If `weight` is empty, `x.len()` is not a multiple of `weight.len()`, or `delta` or `out` is
/// shorter than `x`.
pub fn add_rms_norm(x: &mut [f32], delta: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && out.len() >= x.len() && delta.len() >= x.len(),
        "add_rms_norm: {} inputs, {} deltas, {} weights, {} outputs",
        x.len(),
        delta.len(),
        d,
        out.len()
    );
    let simd = super::simd();
    let rows = x.len() / d;
    rows2_mut(x, out, rows, d, |i, xr, o| {
        xr.iter_mut()
            .zip(&delta[i * d..(i + 1) * d])
            .for_each(|(a, b)| *a += b);
        norm_row(simd, xr, weight, eps, o)
    });
}

/// Rotate each head of each row in place, Hugging Face "rotate_half" layout: element `i` pairs
/// with `i + head_dim/2`. `cos` and `sin` hold `head_dim/2` values per row.
///
/// # Panics
/// If `head_dim` is zero or odd, `heads` is zero, `x.len()` is not a multiple of
/// `heads * head_dim`, or `cos` / `sin` hold fewer than `head_dim / 2` values per row of `x`.
pub fn rope_half_split(x: &mut [f32], head_dim: usize, heads: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let width = heads.checked_mul(head_dim).unwrap_or(0);
    assert!(
        width > 0 && head_dim.is_multiple_of(2) && x.len().is_multiple_of(width),
        "rope_half_split: {} values, {heads} heads of {head_dim}",
        x.len()
    );
    let rows = x.len() / width;
    assert!(
        cos.len() >= rows * half && sin.len() >= rows * half,
        "rope_half_split: {rows} rows need {} cos and sin values, got {} and {}",
        rows * half,
        cos.len(),
        sin.len()
    );
    rows_mut(x, width, |t, row| {
        let c = &cos[t * half..(t + 1) * half];
        let s = &sin[t * half..(t + 1) * half];
        for head in row.chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    });
}

/// `gate[i] = silu(gate[i]) * up[i]`.
///
/// # Panics
/// If `up` is shorter than `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert!(
        up.len() >= gate.len(),
        "silu_mul: {} gates, {} ups",
        gate.len(),
        up.len()
    );
    #[cfg(target_arch = "x86_64")]
    let avx2 = super::Avx2::detect().filter(|_| !matches!(super::simd(), Isa::Portable));
    const CHUNK: usize = 4096;
    let run = |g: &mut [f32], u: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if avx2.is_some() {
            // SAFETY: the token proves AVX2 and FMA.
            return unsafe { super::avx2::silu_mul(g, u) };
        }
        g.iter_mut().zip(u).for_each(|(g, &u)| *g = silu_one(*g, u));
    };
    let whole = gate.len() / CHUNK * CHUNK;
    let (head, tail) = gate.split_at_mut(whole);
    chunks_mut_par(head, CHUNK, 4, |i, g| run(g, &up[i * CHUNK..]));
    run(tail, &up[whole..]);
}

/// The gated activation of a fused gate/up projection: for each row `i` of `gate_up` (the
/// gate's `width` values, then the up projection's `width`), `out[i] = silu(gate) * up`, with
/// the same operations (so the same bits) as [`silu_mul`], rows in parallel when there are
/// enough of them.
///
/// # Panics
/// If `width == 0`, `gate_up.len()` is not a multiple of `2 * width`, or `out` holds fewer than
/// `gate_up.len() / 2` values.
pub fn silu_mul_rows(gate_up: &[f32], width: usize, out: &mut [f32]) {
    assert!(
        width > 0 && gate_up.len().is_multiple_of(2 * width) && out.len() >= gate_up.len() / 2,
        "silu_mul_rows: {} gate/up values of rows of 2 x {width}, {} outputs",
        gate_up.len(),
        out.len()
    );
    let rows = gate_up.len() / (2 * width);
    rows_mut(&mut out[..rows * width], width, |i, o| {
        let row = &gate_up[i * 2 * width..(i + 1) * 2 * width];
        o.copy_from_slice(&row[..width]);
        // One row is below `silu_mul`'s parallel chunk size, so this runs on this thread.
        silu_mul(o, &row[width..]);
    });
}

/// `silu(v) * u = v / (1 + e^-v) * u`, with [`exp_lanewise`]: one element of [`silu_mul`], the
/// same bits on every path.
#[inline(always)]
pub(crate) fn silu_one(v: f32, u: f32) -> f32 {
    v / (1.0 + exp_lanewise(-v)) * u
}

/// The clamp of [`exp_lanewise`] and `avx2::exp8`: below `EXP_LO` the result is 0; `EXP_HI`
/// is where `expf` overflows.
pub(crate) const EXP_LO: f32 = -87.336_55;
/// See [`EXP_LO`].
pub(crate) const EXP_HI: f32 = 88.722_83;
/// `ln 2` in two parts, so that `x - n ln 2` is exact to float precision.
pub(crate) const EXP_LN2: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];
/// Cephes' `expf` polynomial for `e^r`, highest degree first (Horner's rule from here, then
/// `p r^2 + r + 1`).
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` by the operations `avx2::exp8` does in each lane (the same bits; within 2 ulp of the
/// rounded exponential on `[-87.3, 88.37]`, 0 below, infinity from about 88.38): the clamp, `n =
/// round(x log2 e)`, `r = x - n ln 2` in two parts, Cephes' degree-6 polynomial, `2^n` in the
/// exponent bits. A library `exp` rounds differently, and the vector code cannot call it.
#[inline(always)]
pub(crate) fn exp_lanewise(x: f32) -> f32 {
    let underflow = x < EXP_LO;
    // `max` then `min` as `vmaxps` / `vminps` with the bound second: a NaN becomes `EXP_LO`.
    let x = if x > EXP_LO { x } else { EXP_LO };
    let x = if x < EXP_HI { x } else { EXP_HI };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(EXP_LN2[0], x);
    let r = (-n).mul_add(EXP_LN2[1], r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    let scaled = e * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        scaled
    }
}

/// `acc[i] += x[i]` over the first `min(acc.len(), x.len())` elements.
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// Add `bias` to every row of `x` (row width `bias.len()`; a trailing partial row gets the
/// first part of `bias`).
///
/// # Panics
/// If `bias` is empty.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    assert!(!bias.is_empty(), "add_bias: empty bias");
    for row in x.chunks_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.25, 2.0];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 16.0) / 4.0;
        assert!((out[2] - 3.0 / (ms + 1e-5f32).sqrt() * 2.0).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rope_half_split(&mut x, 4, 1, &c, &s);
        // pair (x0, x2) rotated by 90 degrees, pair (x1, x3) unchanged.
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    fn wave(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * k).sin() * 3.0).collect()
    }

    #[test]
    fn fused_row_ops_give_the_bits_of_their_parts_serial_and_parallel() {
        // 3 rows run on the calling thread, 40 across the pool; 576 and 1536 are SmolLM2's
        // widths, 8 a partial vector.
        for rows in [3, 40] {
            for width in [8, 576, 1536] {
                let w = wave(width, 0.37);
                let delta = wave(rows * width, 0.11);
                let mut x = wave(rows * width, 0.23);
                let mut want_x = x.clone();
                add_in_place(&mut want_x, &delta);
                let mut want = vec![0f32; rows * width];
                rms_norm(&want_x, &w, 1e-5, &mut want);
                let mut got = vec![0f32; rows * width];
                add_rms_norm(&mut x, &delta, &w, 1e-5, &mut got);
                assert_eq!(x, want_x, "{rows}x{width}");
                assert_eq!(got, want, "{rows}x{width}");

                let gate_up = wave(rows * 2 * width, 0.05);
                let mut want = vec![0f32; rows * width];
                for (r, o) in want.chunks_mut(width).enumerate() {
                    let row = &gate_up[r * 2 * width..(r + 1) * 2 * width];
                    o.copy_from_slice(&row[..width]);
                    silu_mul(o, &row[width..]);
                }
                let mut got = vec![0f32; rows * width];
                silu_mul_rows(&gate_up, width, &mut got);
                assert_eq!(got, want, "{rows}x{width}");
            }
        }
    }
}
