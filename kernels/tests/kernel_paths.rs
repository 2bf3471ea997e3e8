//! The AVX-512 kernels against the scalar ones, side by side in one process: `with_kernel_path`
//! picks the path per calling thread, so these tests race with nothing.
//!
//! What equality holds between the paths:
//! - rope, SiLU gate, residual and bias adds have no SIMD code: bit-identical.
//! - matmul, rms_norm and paged attention differ in summation order only (16 lanes plus a fixed
//!   horizontal reduction, fused multiply-adds, against one sequential sum; for Q4_1 the
//!   decode `d * q + m` is fused too). Each path is checked against an f64 reference within
//!   the standard rounding bound of its sums (`n` terms: `n * EPSILON * sum |terms|`), and the
//!   paths against each other within the sum of their two bounds. Actual differences are a few
//!   ulps; a real bug (a wrong row, head or position) is orders of magnitude larger.
//! - Each path on its own is batch invariant: bit-identical outputs whatever else shares the
//!   batch.
//!
//! On a processor without AVX-512 (or with `CONVOY_FORCE_SCALAR` set) both runs are scalar and
//! the comparisons hold trivially; the tests say so on stderr.

use convoy_kernels::{
    has_avx512, matmul, paged_attention, rms_norm, scalar_forced_by_env, simd_active,
    with_kernel_path, AttentionSeq, AttentionShape, KernelPath, Matrix, WeightFormat,
};

struct Lcg(u64);

impl Lcg {
    fn step(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        ((self.step() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn byte(&mut self) -> u8 {
        (self.step() >> 56) as u8
    }
    fn below(&mut self, n: usize) -> usize {
        (self.step() >> 33) as usize % n
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// `f` on the default path (AVX-512 where available) and on the scalar path.
fn both<R>(f: impl Fn() -> R) -> (R, R) {
    (
        with_kernel_path(KernelPath::Auto, &f),
        with_kernel_path(KernelPath::Scalar, &f),
    )
}

fn say_which_paths(test: &str) {
    let simd = with_kernel_path(KernelPath::Auto, simd_active);
    eprintln!(
        "{test}: comparing {} against scalar",
        if simd {
            "AVX-512"
        } else {
            "scalar (no AVX-512 here, or CONVOY_FORCE_SCALAR set)"
        }
    );
}

#[test]
fn the_kernel_path_switch_is_scoped_to_the_calling_thread() {
    let auto = has_avx512() && !scalar_forced_by_env();
    assert_eq!(simd_active(), auto);
    with_kernel_path(KernelPath::Scalar, || {
        assert!(!simd_active());
        // Another thread keeps the default.
        assert_eq!(std::thread::spawn(simd_active).join().unwrap(), auto);
        // A nested scope overrides, and restores on the way out.
        with_kernel_path(KernelPath::Auto, || assert_eq!(simd_active(), auto));
        assert!(!simd_active());
    });
    assert_eq!(simd_active(), auto);
    // Restored after a panic too.
    let r = std::panic::catch_unwind(|| with_kernel_path(KernelPath::Scalar, || panic!("inside")));
    assert!(r.is_err());
    assert_eq!(simd_active(), auto);
}

/// The child half of the test below: runs in a process started with `CONVOY_FORCE_SCALAR=1`.
const CHILD: &str = "CONVOY_KERNELS_TEST_CHILD";

#[test]
fn convoy_force_scalar_env_turns_simd_off_for_the_whole_process() {
    if std::env::var_os(CHILD).is_some() {
        assert!(scalar_forced_by_env());
        assert!(!simd_active());
        assert!(!with_kernel_path(KernelPath::Auto, simd_active));
        assert!(!std::thread::spawn(simd_active).join().unwrap());
        return;
    }
    let name = "convoy_force_scalar_env_turns_simd_off_for_the_whole_process";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1"])
        .env("CONVOY_FORCE_SCALAR", "1")
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut Lcg) -> Matrix {
    if format == WeightFormat::F32 {
        return Matrix::from_f32(rows, cols, rng.vec(rows * cols)).unwrap();
    }
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / 32 {
        bytes.extend(half::f16::from_f32(0.01 + rng.next().abs() * 0.05).to_le_bytes());
        let rest = format.block_bytes() - 2;
        if format == WeightFormat::Q4_1 {
            // The min, |m| <= 0.1.
            bytes.extend(half::f16::from_f32(rng.next() * 0.1).to_le_bytes());
            (0..rest - 2).for_each(|_| bytes.push(rng.byte()));
        } else {
            (0..rest).for_each(|_| bytes.push(rng.byte()));
        }
    }
    Matrix::from_blocks(format, rows, cols, bytes).unwrap()
}

#[test]
fn matmul_simd_and_scalar_agree_for_every_format_and_tile_shape() {
    say_which_paths("matmul");
    let mut rng = Lcg(11);
    for format in [
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
    ] {
        for (rows, cols) in [(37, 64), (96, 160), (13, 32), (130, 256)] {
            // f32 rows that are not a whole number of vectors exercise the masked tail.
            let cols = if format == WeightFormat::F32 {
                cols + 5
            } else {
                cols
            };
            let w = random_matrix(format, rows, cols, &mut rng);
            let mut wrow = vec![0f32; cols];
            // 8 and 17 tokens take the 8-token tiles, the others the 4-token ones.
            for n in [1, 2, 3, 5, 8, 17] {
                let x = rng.vec(n * cols);
                let run = |x: &[f32], n: usize| {
                    let mut y = vec![0f32; n * rows];
                    matmul(x, n, &w, &mut y);
                    y
                };
                let (simd, scalar) = both(|| run(&x, n));
                for r in 0..rows {
                    w.row_to_f32(r, &mut wrow);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let exact: f64 = wrow
                            .iter()
                            .zip(xt)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        // Summation bound plus, for Q4_1, one rounding of `d * q + m` per
                        // weight (|d * q| + |m| <= |w| + 2 |m| <= |w| + 0.25).
                        let mag: f64 = wrow
                            .iter()
                            .zip(xt)
                            .map(|(&a, &b)| (a.abs() as f64 + 0.25) * b.abs() as f64)
                            .sum();
                        let tol = (cols + 4) as f64 * f32::EPSILON as f64 * mag;
                        let (a, b) = (simd[t * rows + r] as f64, scalar[t * rows + r] as f64);
                        let ctx = format!("{format:?} {rows}x{cols} n={n} t={t} r={r}");
                        assert!((a - exact).abs() <= tol, "{ctx}: SIMD {a} vs exact {exact}");
                        assert!(
                            (b - exact).abs() <= tol,
                            "{ctx}: scalar {b} vs exact {exact}"
                        );
                        assert!((a - b).abs() <= tol, "{ctx}: SIMD {a} vs scalar {b}");
                    }
                }
                // Each path is batch invariant on its own.
                for t in [0, n / 2, n - 1] {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let (simd1, scalar1) = both(|| run(xt, 1));
                    let ctx = format!("{format:?} {rows}x{cols} n={n} t={t}");
                    assert_eq!(simd1, simd[t * rows..(t + 1) * rows], "SIMD {ctx}");
                    assert_eq!(scalar1, scalar[t * rows..(t + 1) * rows], "scalar {ctx}");
                }
            }
        }
    }
}

#[test]
fn rms_norm_and_the_other_ops_agree_between_paths() {
    say_which_paths("rms_norm");
    let mut rng = Lcg(5);
    // 40 rows go through the pool (16 rows or more), 3 rows stay on the caller.
    for d in [7, 16, 64, 100, 576] {
        for rows in [3, 40] {
            let x = rng.vec(rows * d);
            let weight = rng.vec(d);
            let run = |x: &[f32]| {
                let mut out = vec![0f32; x.len()];
                rms_norm(x, &weight, 1e-5, &mut out);
                out
            };
            let (simd, scalar) = both(|| run(&x));
            for (i, (&a, &b)) in simd.iter().zip(&scalar).enumerate() {
                // Both mean squares are sums of `d` positive terms: relative error below
                // d * EPSILON / 2 each; the square root halves it, a few roundings follow.
                let tol = (d + 8) as f32 * f32::EPSILON * b.abs();
                assert!((a - b).abs() <= tol, "d={d} i={i}: SIMD {a} vs scalar {b}");
            }
            for t in [0, rows - 1] {
                let (simd1, scalar1) = both(|| run(&x[t * d..(t + 1) * d]));
                assert_eq!(simd1, simd[t * d..(t + 1) * d], "SIMD d={d} t={t}");
                assert_eq!(scalar1, scalar[t * d..(t + 1) * d], "scalar d={d} t={t}");
            }
        }
    }
    // No SIMD code in these: the paths are bit-identical.
    let (heads, hd, rows) = (3, 8, 20);
    let x = rng.vec(rows * heads * hd);
    let cos = rng.vec(rows * hd / 2);
    let sin = rng.vec(rows * hd / 2);
    let up = rng.vec(x.len());
    let bias = rng.vec(heads * hd);
    let (simd, scalar) = both(|| {
        let mut y = x.clone();
        convoy_kernels::rope_half_split(&mut y, hd, heads, &cos, &sin);
        convoy_kernels::silu_mul(&mut y, &up);
        convoy_kernels::add_bias(&mut y, &bias);
        convoy_kernels::add_in_place(&mut y, &x);
        y
    });
    assert_eq!(simd, scalar);
}

/// One sequence of an attention test: where its queries sit and what it has cached.
struct Seq {
    table: Vec<u32>,
    query_start: usize,
    num_queries: usize,
    context_len: usize,
}

struct Case {
    shape: AttentionShape,
    num_blocks: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    seqs: Vec<Seq>,
    rows: usize,
}

impl Case {
    /// A decode past one 256-position partition, a chunked prefill on a cached prefix and a
    /// prefill from scratch, on blocks scattered over the cache.
    fn new(shape: AttentionShape, rng: &mut Lcg) -> Case {
        let bs = shape.block_size;
        let specs = [(300usize, 1usize), (40, 7), (5, 5)];
        let needed: usize = specs.iter().map(|&(ctx, _)| ctx.div_ceil(bs)).sum();
        let num_blocks = needed + 3;
        // A random permutation of the blocks, dealt out in order.
        let mut perm: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut next_block = perm.into_iter();
        let mut rows = 0;
        let seqs: Vec<Seq> = specs
            .iter()
            .map(|&(context_len, num_queries)| {
                let seq = Seq {
                    table: next_block.by_ref().take(context_len.div_ceil(bs)).collect(),
                    query_start: rows,
                    num_queries,
                    context_len,
                };
                rows += num_queries;
                seq
            })
            .collect();
        let cache = num_blocks * bs * shape.num_kv_heads * shape.head_dim;
        Case {
            shape,
            num_blocks,
            q: rng.vec(rows * shape.num_heads * shape.head_dim),
            k: rng.vec(cache),
            v: rng.vec(cache),
            seqs,
            rows,
        }
    }

    fn attention_seqs(&self) -> Vec<AttentionSeq<'_>> {
        self.seqs
            .iter()
            .map(|s| AttentionSeq {
                block_table: &s.table,
                query_start: s.query_start,
                num_queries: s.num_queries,
                context_len: s.context_len,
            })
            .collect()
    }

    fn run(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.q.len()];
        paged_attention(
            &self.q,
            &self.k,
            &self.v,
            self.shape,
            &self.attention_seqs(),
            &mut out,
        );
        out
    }

    /// Sequence `s` alone, in a batch of its own rows.
    fn run_alone(&self, s: usize) -> Vec<f32> {
        let row = self.shape.num_heads * self.shape.head_dim;
        let seq = &self.seqs[s];
        let rows = seq.query_start * row..(seq.query_start + seq.num_queries) * row;
        let alone = [AttentionSeq {
            block_table: &seq.table,
            query_start: 0,
            num_queries: seq.num_queries,
            context_len: seq.context_len,
        }];
        let mut out = vec![f32::NAN; rows.len()];
        paged_attention(
            &self.q[rows],
            &self.k,
            &self.v,
            self.shape,
            &alone,
            &mut out,
        );
        out
    }

    /// Softmax attention in f64, straight from the definition and the cache layout.
    fn reference(&self) -> Vec<f64> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim: hd,
            block_size: bs,
        } = self.shape;
        let group = num_heads / num_kv_heads;
        let kv_stride = num_kv_heads * hd;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; self.q.len()];
        for seq in &self.seqs {
            for i in 0..seq.num_queries {
                let row = seq.query_start + i;
                let positions = seq.context_len - seq.num_queries + i + 1;
                for h in 0..num_heads {
                    let kvh = h / group;
                    let q = &self.q[(row * num_heads + h) * hd..][..hd];
                    let slot = |p: usize| (seq.table[p / bs] as usize, p % bs);
                    let scores: Vec<f64> = (0..positions)
                        .map(|p| {
                            let (b, off) = slot(p);
                            (0..hd)
                                .map(|d| {
                                    let k = self.k[((b * kv_stride) + kvh * hd + d) * bs + off];
                                    q[d] as f64 * k as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    let o = &mut out[(row * num_heads + h) * hd..][..hd];
                    for (p, s) in scores.iter().enumerate() {
                        let (b, off) = slot(p);
                        let v = &self.v[(b * bs + off) * kv_stride + kvh * hd..][..hd];
                        let w = (s - m).exp() / l;
                        for d in 0..hd {
                            o[d] += w * v[d] as f64;
                        }
                    }
                }
            }
        }
        out
    }
}

#[test]
fn paged_attention_simd_and_scalar_agree_including_gqa_groups_above_8() {
    say_which_paths("paged_attention");
    let mut rng = Lcg(3);
    // (query heads, KV heads, head_dim, block_size): groups 1, 4, 8, 12 and 16 on the AVX-512
    // kernel (head_dim a multiple of 16, at most 256), which takes groups above 8 in passes of
    // 8; head_dim 24 runs the scalar partition code on both paths.
    for (num_heads, num_kv_heads, head_dim, block_size) in [
        (4, 4, 64, 16),
        (8, 2, 64, 16),
        (8, 1, 32, 16),
        (12, 1, 64, 16),
        (24, 2, 64, 8),
        (16, 1, 128, 16),
        (32, 2, 64, 16),
        (12, 1, 24, 5),
    ] {
        let shape = AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
        };
        let case = Case::new(shape, &mut rng);
        let (simd, scalar) = both(|| case.run());
        let exact = case.reference();
        // q, k, v in [-1, 1): a score sums head_dim products of magnitude <= 1 and is scaled
        // by 1/sqrt(head_dim), so each path's score is within
        // delta = (head_dim + 2) * EPSILON * sqrt(head_dim) of the exact one; the softmax
        // weights then move by a relative 2 * delta at most, and the weighted sum of V (|v| <=
        // 1) over a partition of at most 256 positions adds 2 * (256 + 16) * EPSILON.
        let delta = (head_dim + 2) as f64 * f32::EPSILON as f64 * (head_dim as f64).sqrt();
        let tol = 2.0 * delta + 2.0 * 272.0 * f32::EPSILON as f64;
        for (i, ((&a, &b), &e)) in simd.iter().zip(&scalar).zip(&exact).enumerate() {
            let (a, b) = (a as f64, b as f64);
            let ctx = format!("{shape:?} element {i} (row {})", i / (num_heads * head_dim));
            assert!((a - e).abs() <= tol, "{ctx}: SIMD {a} vs exact {e}");
            assert!((b - e).abs() <= tol, "{ctx}: scalar {b} vs exact {e}");
            assert!((a - b).abs() <= 2.0 * tol, "{ctx}: SIMD {a} vs scalar {b}");
        }
        // Each path is batch invariant on its own: every sequence alone gives the same bits.
        let row = num_heads * head_dim;
        for (s, seq) in case.seqs.iter().enumerate() {
            let rows = seq.query_start * row..(seq.query_start + seq.num_queries) * row;
            let (simd1, scalar1) = both(|| case.run_alone(s));
            assert_eq!(
                simd1,
                simd[rows.clone()],
                "SIMD {shape:?} sequence {s} alone"
            );
            assert_eq!(scalar1, scalar[rows], "scalar {shape:?} sequence {s} alone");
        }
        assert_eq!(case.rows * row, simd.len());
        assert!(case.num_blocks > 0);
    }
}
