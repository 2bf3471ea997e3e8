//! Activation rows quantised to 8 bits for the integer matrix multiply of the fast precision
//! ([`super::matmul_int8`]).
//!
//! Each row (token) is cut into blocks of 32 columns, and each block is stored as 32 signed
//! bytes `q` in `-127..=127` with one float scale `d = max|x| / 127`, so `x ≈ d * q` (GGML's
//! Q8_1 scheme). The block also keeps `s = d * Σq`, which the Q4 formats' offset term needs.
//!
//! # Invariants
//!
//! - A row's quantisation depends on that row alone (never on the batch): the fast precision
//!   stays batch invariant because of it.
//! - `q.len() == rows * cols`, `d.len() == s.len() == rows * cols / 32`, `cols % 32 == 0`, and
//!   every `q` lies in `-127..=127` (never -128, so the sign trick of the AVX2 kernel cannot
//!   overflow). The copies by whole groups of four rows hold `q4.len() == rows / 4 * cols * 4`,
//!   `d4.len() == rows / 4 * (cols / 32) * 4` and `s8.len() == n8.len() == rows / 4 *
//!   (cols / 32) * 8` (the last `rows % 4` rows have none: the kernels that read them take
//!   whole groups only).
//!   The fields are private to the crate, so every value satisfies this.

/// `rows` activation rows of `cols` columns, each block of 32 quantised to signed bytes.
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Quantised values, row-major.
    pub(crate) q: Vec<i8>,
    /// One scale per block, `rows * cols / 32`, row-major.
    pub(crate) d: Vec<f32>,
    /// `d * Σq` per block.
    pub(crate) s: Vec<f32>,
    /// The scales again, by whole groups of four rows: block `b` of rows `4g..4g + 4` at
    /// `d4[(g * blocks_per_row + b) * 4..][..4]`. The integer kernel with the tokens in the
    /// lanes reads the four in one load (`avx2_int8::tile_token_quads`).
    pub(crate) d4: Vec<f32>,
    /// The sums `s` again, by whole groups of four rows as `d4`, each four followed by four
    /// zeros: block `b` of rows `4g..4g + 4` at `s8[(g * blocks_per_row + b) * 8..][..4]`.
    pub(crate) s8: Vec<f32>,
    /// The quants again, interleaved by whole groups of four rows for the same kernel: block
    /// `b` of rows `4g..4g + 4` is 128 bytes at `q4[(g * blocks_per_row + b) * 128..]`, four
    /// vectors of 32; vector `k` holds elements `4k..4k + 4` of the four rows in its first 16
    /// bytes and elements `16 + 4k..16 + 4k + 4` in its last 16.
    pub(crate) q4: Vec<i8>,
    /// The quants' sums over each half of a block times -128, by whole groups of four rows in
    /// the lanes of the integer sums of `q4` (a row's first half, elements `0..16`, in lane
    /// `i` for row `4g + i`, its second half in lane `4 + i`): block `b` of rows `4g..4g + 4`
    /// at `n8[(g * blocks_per_row + b) * 8..][..8]`. The VNNI kernels start Q8_0's sums from
    /// them, having offset the signed weights by 128 (`avx2_int8::ByteDots::OFFSET_SIGNED`).
    pub(crate) n8: Vec<i32>,
}

impl QuantizedRows {
    /// Quantise the first `rows * cols` values of `x` (`rows` rows of `cols`), reusing this
    /// value's buffers. Whole groups of four rows are quantised and interleaved on the kernel
    /// pool's threads when there are at least [`PAR_ROWS`] rows; each row's bytes depend on
    /// that row alone either way.
    ///
    /// # Panics
    /// If `cols` is not a multiple of 32 or `x` holds fewer than `rows * cols` values (shapes
    /// are the caller's invariant, never user input).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(32) && rows.checked_mul(cols).is_some_and(|n| x.len() >= n),
            "quantising {rows} rows of {cols} columns from {} values",
            x.len()
        );
        let per_row = cols / 32;
        let groups = rows / 4;
        self.rows = rows;
        self.cols = cols;
        self.q.resize(rows * cols, 0);
        self.d.resize(rows * per_row, 0.0);
        self.s.resize(rows * per_row, 0.0);
        // The interleaved copies are overwritten in full (the sums' second fours stay zero).
        self.d4.clear();
        self.d4.resize(groups * per_row * 4, 0.0);
        self.s8.clear();
        self.s8.resize(groups * per_row * 8, 0.0);
        self.q4.clear();
        self.q4.resize(groups * per_row * 128, 0);
        self.n8.clear();
        self.n8.resize(groups * per_row * 8, 0);
        if cols == 0 || rows == 0 {
            return;
        }
        let avx2 = super::has_avx2();
        // One item per group of four rows (its rows and its interleaved copy), then one for
        // the rows left over; each holds the disjoint parts of the buffers it writes, behind
        // an uncontended lock so that the pool's threads can take them by index.
        let mut items: Vec<parking_lot::Mutex<Group<'_>>> = Vec::with_capacity(groups + 1);
        let mut q = self.q.chunks_mut(4 * cols);
        let mut d = self.d.chunks_mut(4 * per_row);
        let mut s = self.s.chunks_mut(4 * per_row);
        let mut inter = self
            .q4
            .chunks_mut(per_row * 128)
            .zip(self.d4.chunks_mut(per_row * 4))
            .zip(self.s8.chunks_mut(per_row * 8))
            .zip(self.n8.chunks_mut(per_row * 8));
        for (i, x) in x[..rows * cols].chunks(4 * cols).enumerate() {
            let (Some(q), Some(d), Some(s)) = (q.next(), d.next(), s.next()) else {
                unreachable!("the buffers hold `rows` rows")
            };
            let interleaved = (i < groups)
                .then(|| inter.next())
                .flatten()
                .map(|(((q4, d4), s8), n8)| Interleaved { q4, d4, s8, n8 });
            items.push(parking_lot::Mutex::new(Group {
                x,
                q,
                d,
                s,
                interleaved,
            }));
        }
        let run = |i: usize| items[i].lock().fill(per_row, avx2);
        if rows >= PAR_ROWS {
            super::pool::parallel_for(items.len(), &run);
        } else {
            (0..items.len()).for_each(run);
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` decoded back to floats (`d * q`), for tests and error measurements.
    ///
    /// # Panics
    /// If `r >= rows`.
    pub fn row_to_f32(&self, r: usize) -> Vec<f32> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let per_row = self.cols / 32;
        self.q[r * self.cols..(r + 1) * self.cols]
            .chunks_exact(32)
            .enumerate()
            .flat_map(|(b, qs)| {
                let d = self.d[r * per_row + b];
                qs.iter().map(move |&q| d * q as f32)
            })
            .collect()
    }
}

/// Rows from this many on are quantised on the kernel pool's threads.
const PAR_ROWS: usize = 16;

/// The part of a [`QuantizedRows`] that one group of (at most) four rows fills: their floats,
/// their quants, scales and sums, and for a whole group its interleaved copies.
struct Group<'a> {
    x: &'a [f32],
    q: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    interleaved: Option<Interleaved<'a>>,
}

/// A whole group's parts of the interleaved copies (see [`QuantizedRows`]'s fields).
struct Interleaved<'a> {
    q4: &'a mut [i8],
    d4: &'a mut [f32],
    s8: &'a mut [f32],
    n8: &'a mut [i32],
}

impl Group<'_> {
    /// Quantise the rows block by block (in AVX2 registers when `avx2` says the processor has
    /// it: `avx2_int8::quantize_block`, the same bits as [`quantize_block`]), then copy them
    /// interleaved for a whole group.
    fn fill(&mut self, per_row: usize, avx2: bool) {
        for (b, (xs, qs)) in self
            .x
            .chunks_exact(32)
            .zip(self.q.chunks_exact_mut(32))
            .enumerate()
        {
            #[cfg(target_arch = "x86_64")]
            let (d, sum) = if avx2 {
                let (xs, qs) = (
                    xs.try_into().expect("chunks of 32"),
                    qs.try_into().expect("chunks of 32"),
                );
                // SAFETY: the processor supports AVX2 (`has_avx2`, the caller's `avx2`).
                unsafe { super::avx2_int8::quantize_block(xs, qs) }
            } else {
                quantize_block(xs, qs)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = {
                let _ = avx2;
                quantize_block(xs, qs)
            };
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
        let Some(Interleaved { q4, d4, s8, n8 }) = &mut self.interleaved else {
            return;
        };
        for i in 0..4 {
            for b in 0..per_row {
                let at = i * per_row + b;
                d4[b * 4 + i] = self.d[at];
                s8[b * 8 + i] = self.s[at];
                let src = &self.q[at * 32..at * 32 + 32];
                for (half, qs) in src.chunks_exact(16).enumerate() {
                    n8[b * 8 + half * 4 + i] = -128 * qs.iter().map(|&q| q as i32).sum::<i32>();
                }
                let dst = &mut q4[b * 128..][..128];
                for (c, four) in src.chunks_exact(4).enumerate() {
                    let (k, half) = (c % 4, c / 4);
                    dst[k * 32 + half * 16 + i * 4..][..4].copy_from_slice(four);
                }
            }
        }
    }
}

/// One block: `q = round(x * (1 / d))` (ties to even, clamped to `-127..=127`) with
/// `d = max|x| / 127` (all zero when the block is). Returns `(d, Σq)`. A NaN or infinite
/// input gives some finite bytes (Rust's float-to-int casts saturate), never undefined
/// behaviour; the model's outputs are then meaningless anyway.
#[inline(always)]
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        *q = r;
        sum += r as i32;
    }
    (d, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_rows_round_trip_within_half_a_step_and_keep_their_sums() {
        let cols = 64;
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut q = QuantizedRows::default();
        q.quantize(&x, 3, cols);
        for r in 0..3 {
            let back = q.row_to_f32(r);
            for (b, (got, want)) in back
                .chunks(32)
                .zip(x[r * cols..(r + 1) * cols].chunks(32))
                .enumerate()
            {
                let d = q.d[r * 2 + b];
                let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!((d * 127.0 - amax).abs() <= 1e-6 * amax);
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() <= 0.5 * d * 1.0001, "{g} vs {w}");
                }
                let sum: i32 = q.q[(r * 2 + b) * 32..(r * 2 + b + 1) * 32]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(q.s[r * 2 + b], d * sum as f32);
            }
        }
        // A zero block stays zero; the extremes map to ±127, never -128.
        let mut z = vec![0f32; 32];
        z[3] = -2.0;
        z[4] = 2.0;
        q.quantize(&z, 1, 32);
        assert_eq!(q.q[3], -127);
        assert_eq!(q.q[4], 127);
        q.quantize(&[0.0; 32], 1, 32);
        assert!(q.q.iter().all(|&v| v == 0) && q.d[0] == 0.0);
        // Row 1 alone quantises exactly as in the batch (batch invariance).
        let mut all = QuantizedRows::default();
        all.quantize(&x, 3, cols);
        let mut one = QuantizedRows::default();
        one.quantize(&x[cols..2 * cols], 1, cols);
        assert_eq!(&all.q[cols..2 * cols], &one.q[..]);
        assert_eq!(&all.d[2..4], &one.d[..]);
    }

    /// The AVX2 path gives the scalar bits, whatever the values: plain ones, exact ties,
    /// special values sprinkled in, and blocks of nothing else.
    #[test]
    fn avx2_quantisation_gives_the_scalar_bits() {
        #[cfg(target_arch = "x86_64")]
        if super::super::has_avx2() {
            let special = [
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -0.0,
                0.0,
                f32::MIN_POSITIVE / 3.0,
                f32::MAX,
                -f32::MAX,
                1e-30,
                -1e-30,
            ];
            let mut seed = 5u64;
            for case in 0..400 {
                let block: [f32; 32] = std::array::from_fn(|i| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    match case % 4 {
                        // Plain values; then quarters with a largest magnitude of 63.5, so
                        // the step is 0.5 and odd quarters are ties; then a sprinkling of
                        // special values; then blocks of special values and zeros only.
                        0 => r * 10.0,
                        1 if i == 0 => 63.5,
                        1 => (r * 254.0).round() * 0.25,
                        2 if (seed >> 20).is_multiple_of(5) => special[(seed >> 8) as usize % 10],
                        2 => r,
                        _ => special[(case / 4 + i) % 10] * ((seed >> 30) % 2) as f32,
                    }
                });
                let (mut want, mut got) = ([0i8; 32], [0i8; 32]);
                let w = quantize_block(&block, &mut want);
                // SAFETY: AVX2 is present (checked above).
                let g = unsafe { super::super::avx2_int8::quantize_block(&block, &mut got) };
                assert_eq!(want, got, "quants of {block:?}");
                assert_eq!(
                    (w.0.to_bits(), w.1),
                    (g.0.to_bits(), g.1),
                    "scale of {block:?}"
                );
                assert!(got.iter().all(|&q| q != -128));
            }
        }
    }
}
