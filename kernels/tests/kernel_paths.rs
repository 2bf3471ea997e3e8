//! Every kernel path the processor has (AVX-512, AVX2 + FMA, portable scalar), side by side in
//! one process: `with_kernel_path` picks the path per calling thread, so these tests race with
//! nothing.
//!
//! What equality holds between the paths:
//! - rope, SiLU gate, residual and bias adds have no SIMD code: bit-identical.
//! - matmul, rms_norm and paged attention differ in summation order only (16 or 8 lanes plus a
//!   fixed horizontal reduction, fused multiply-adds, against one sequential sum; for Q4_1 the
//!   decode `d * q + m` is fused too on the SIMD paths). Each path is checked against an f64
//!   reference within the standard rounding bound of its sums (`n` terms:
//!   `n * EPSILON * sum |terms|`), and the paths against the scalar one within the sum of their
//!   two bounds. Actual differences are a few ulps; a real bug (a wrong row, head or position)
//!   is orders of magnitude larger.
//! - Each path on its own is batch invariant: bit-identical outputs whatever else shares the
//!   batch, and whatever the number of pool threads (checked in child processes, since the
//!   pool's size is fixed when it starts).
//!
//! Paths the processor lacks (or that `CONVOY_FORCE_SCALAR` / `CONVOY_KERNEL_PATH` rule out)
//! are skipped; the tests say on stderr which ones ran.

use convoy_kernels::{
    active_kernel_path, has_avx2, has_avx512, kernel_path_from_env, matmul, paged_attention,
    rms_norm, scalar_forced_by_env, simd_active, with_kernel_path, AttentionSeq, AttentionShape,
    KernelPath, KvElem, Matrix, WeightFormat, F8E4M3,
};
use half::f16;
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

/// The distinct paths this process can run (the scalar one first), each as the `KernelPath`
/// that selects it.
fn paths() -> Vec<KernelPath> {
    let mut out = Vec::new();
    for p in [KernelPath::Scalar, KernelPath::Avx2, KernelPath::Avx512] {
        let active = with_kernel_path(p, active_kernel_path);
        if !out.contains(&active) {
            out.push(active);
        }
    }
    out
}

/// `f` on every path of [`paths`]: `(path, result)`, the scalar one first.
fn every_path<R>(f: impl Fn() -> R) -> Vec<(KernelPath, R)> {
    paths()
        .into_iter()
        .map(|p| (p, with_kernel_path(p, &f)))
        .collect()
}

fn say_which_paths(test: &str) {
    eprintln!("{test}: running the paths {:?}", paths());
}

/// The path `Auto` resolves to here, from the processor and the environment alone.
fn expected_default() -> KernelPath {
    let ceiling = if scalar_forced_by_env() {
        KernelPath::Scalar
    } else {
        kernel_path_from_env()
    };
    let rank = |p: KernelPath| match p {
        KernelPath::Scalar => 0,
        KernelPath::Avx2 => 1,
        KernelPath::Avx512 | KernelPath::Auto => 2,
    };
    if has_avx512() && rank(ceiling) >= 2 {
        KernelPath::Avx512
    } else if has_avx2() && rank(ceiling) >= 1 {
        KernelPath::Avx2
    } else {
        KernelPath::Scalar
    }
}

#[test]
fn the_kernel_path_switch_is_scoped_to_the_calling_thread() {
    let auto = expected_default();
    assert_eq!(active_kernel_path(), auto);
    assert_eq!(simd_active(), auto != KernelPath::Scalar);
    with_kernel_path(KernelPath::Scalar, || {
        assert!(!simd_active());
        assert_eq!(active_kernel_path(), KernelPath::Scalar);
        // Another thread keeps the default.
        assert_eq!(std::thread::spawn(active_kernel_path).join().unwrap(), auto);
        // A nested scope overrides, and restores on the way out.
        with_kernel_path(KernelPath::Auto, || assert_eq!(active_kernel_path(), auto));
        // Avx2 is a ceiling: never above the default, AVX2 itself where the processor has it.
        let avx2 = with_kernel_path(KernelPath::Avx2, active_kernel_path);
        let want = if auto == KernelPath::Scalar {
            KernelPath::Scalar
        } else {
            KernelPath::Avx2
        };
        assert_eq!(avx2, want);
        assert_eq!(
            with_kernel_path(KernelPath::Avx512, active_kernel_path),
            auto
        );
        assert!(!simd_active());
    });
    assert_eq!(active_kernel_path(), auto);
    // Restored after a panic too.
    let r = std::panic::catch_unwind(|| with_kernel_path(KernelPath::Scalar, || panic!("inside")));
    assert!(r.is_err());
    assert_eq!(active_kernel_path(), auto);
}

#[test]
fn kernel_path_names_parse() {
    for (s, p) in [
        ("auto", KernelPath::Auto),
        ("AVX512", KernelPath::Avx512),
        ("avx2", KernelPath::Avx2),
        ("portable", KernelPath::Scalar),
        ("scalar", KernelPath::Scalar),
    ] {
        assert_eq!(KernelPath::parse(s), Some(p), "{s}");
    }
    assert_eq!(KernelPath::parse("sse9"), None);
}

/// The child half of the tests below: runs in a process started with an environment to test.
const CHILD: &str = "CONVOY_KERNELS_TEST_CHILD";

/// Run the test `name` of this binary alone in a child process with `env` set, and assert it
/// passed; returns its stdout.
fn run_child(name: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .env_remove("CONVOY_FORCE_SCALAR")
        .env_remove("CONVOY_KERNEL_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child run {env:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn convoy_force_scalar_env_turns_simd_off_for_the_whole_process() {
    if std::env::var_os(CHILD).is_some() {
        assert!(scalar_forced_by_env());
        assert!(!simd_active());
        for p in [KernelPath::Auto, KernelPath::Avx2, KernelPath::Avx512] {
            assert_eq!(with_kernel_path(p, active_kernel_path), KernelPath::Scalar);
        }
        assert!(!std::thread::spawn(simd_active).join().unwrap());
        return;
    }
    let name = "convoy_force_scalar_env_turns_simd_off_for_the_whole_process";
    run_child(name, &[("CONVOY_FORCE_SCALAR", "1")]);
    // It wins over CONVOY_KERNEL_PATH.
    run_child(
        name,
        &[
            ("CONVOY_FORCE_SCALAR", "1"),
            ("CONVOY_KERNEL_PATH", "avx512"),
        ],
    );
}

#[test]
fn convoy_kernel_path_env_caps_the_path_of_the_whole_process() {
    if let Some(cap) = std::env::var_os("CONVOY_KERNELS_TEST_CAP") {
        let cap = KernelPath::parse(cap.to_str().unwrap()).unwrap();
        assert_eq!(kernel_path_from_env(), cap);
        let want = match cap {
            KernelPath::Scalar => KernelPath::Scalar,
            KernelPath::Avx2 if has_avx2() => KernelPath::Avx2,
            KernelPath::Avx2 => KernelPath::Scalar,
            _ => unreachable!(),
        };
        for p in [KernelPath::Auto, KernelPath::Avx2, KernelPath::Avx512] {
            assert_eq!(with_kernel_path(p, active_kernel_path), want, "{p:?}");
        }
        assert_eq!(std::thread::spawn(active_kernel_path).join().unwrap(), want);
        assert_eq!(
            with_kernel_path(KernelPath::Scalar, active_kernel_path),
            KernelPath::Scalar
        );
        return;
    }
    let name = "convoy_kernel_path_env_caps_the_path_of_the_whole_process";
    for cap in ["portable", "avx2"] {
        run_child(
            name,
            &[
                ("CONVOY_KERNEL_PATH", cap),
                ("CONVOY_KERNELS_TEST_CAP", cap),
            ],
        );
    }
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

/// The formats and shapes the matmul tests run: block counts of 1 to 8 per row, row counts
/// that leave every kind of remainder in the tiles (8, 4, 2 and 1 rows), f32 rows with masked
/// tails of 5 and 3 columns.
fn matmul_cases(rng: &mut Lcg) -> Vec<Matrix> {
    let mut out = Vec::new();
    for format in [
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
    ] {
        for (rows, cols) in [(37, 64), (96, 160), (13, 32), (130, 256), (15, 96)] {
            let cols = match format {
                WeightFormat::F32 if rows == 15 => cols + 3,
                WeightFormat::F32 => cols + 5,
                _ => cols,
            };
            out.push(random_matrix(format, rows, cols, rng));
        }
    }
    out
}

/// `y = x w^T` for `n` tokens of `x`.
fn run_matmul(w: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * w.rows()];
    matmul(&x[..n * w.cols()], n, w, &mut y);
    y
}

#[test]
fn matmul_every_path_matches_f64_for_every_format_and_tile_shape_and_is_batch_invariant() {
    say_which_paths("matmul");
    let mut rng = Lcg(11);
    const MAX_TOKENS: usize = 17;
    for w in matmul_cases(&mut rng) {
        let (rows, cols, format) = (w.rows(), w.cols(), w.format());
        let x = rng.vec(MAX_TOKENS * cols);
        // The exact products and the rounding bound of each output.
        let mut wrow = vec![0f32; cols];
        let mut exact = vec![(0f64, 0f64); MAX_TOKENS * rows];
        for r in 0..rows {
            w.row_to_f32(r, &mut wrow);
            for t in 0..MAX_TOKENS {
                let xt = &x[t * cols..(t + 1) * cols];
                let e: f64 = wrow
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                // Summation bound plus, for Q4_1, one rounding of `d * q + m` per weight
                // (|d * q| + |m| <= |w| + 2 |m| <= |w| + 0.25).
                let mag: f64 = wrow
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| (a.abs() as f64 + 0.25) * b.abs() as f64)
                    .sum();
                exact[t * rows + r] = (e, (cols + 4) as f64 * f32::EPSILON as f64 * mag);
            }
        }
        // Each token alone, on each path.
        let singles = every_path(|| {
            (0..MAX_TOKENS)
                .map(|t| run_matmul(&w, &x[t * cols..], 1))
                .collect::<Vec<_>>()
        });
        // Batches of 1..=9 take every tile shape of every path (8-token tiles and the 4-token
        // ones of AVX-512, 1..=4-token ones of AVX2); 12 and 17 take several tiles in a row.
        for n in (1..=9).chain([12, MAX_TOKENS]) {
            let batch = every_path(|| run_matmul(&w, &x, n));
            let scalar = &batch[0].1;
            for ((path, y), (_, alone)) in batch.iter().zip(&singles) {
                for t in 0..n {
                    let ctx = format!("{path:?} {format:?} {rows}x{cols} n={n} t={t}");
                    for r in 0..rows {
                        let (e, tol) = exact[t * rows + r];
                        let (a, b) = (y[t * rows + r] as f64, scalar[t * rows + r] as f64);
                        assert!((a - e).abs() <= tol, "{ctx} r={r}: {a} vs exact {e}");
                        assert!((a - b).abs() <= 2.0 * tol, "{ctx} r={r}: {a} vs scalar {b}");
                    }
                    // Batch invariance: bit-identical to the token alone.
                    assert_eq!(
                        alone[t],
                        y[t * rows..(t + 1) * rows],
                        "{ctx}: alone vs batch"
                    );
                }
            }
        }
    }
}

/// `rms_norm` of `x` (rows of `weight.len()`).
fn run_rms_norm(x: &[f32], weight: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    rms_norm(x, weight, 1e-5, &mut out);
    out
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
            let all = every_path(|| run_rms_norm(&x, &weight));
            let scalar = &all[0].1;
            for (path, y) in &all {
                for (i, (&a, &b)) in y.iter().zip(scalar).enumerate() {
                    // Both mean squares are sums of `d` positive terms: relative error below
                    // d * EPSILON / 2 each; the square root halves it, a few roundings follow.
                    let tol = (d + 8) as f32 * f32::EPSILON * b.abs();
                    assert!(
                        (a - b).abs() <= tol,
                        "{path:?} d={d} i={i}: {a} vs scalar {b}"
                    );
                }
                for t in [0, rows / 2, rows - 1] {
                    let alone =
                        with_kernel_path(*path, || run_rms_norm(&x[t * d..(t + 1) * d], &weight));
                    assert_eq!(alone, y[t * d..(t + 1) * d], "{path:?} d={d} t={t}");
                }
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
    let all = every_path(|| {
        let mut y = x.clone();
        convoy_kernels::rope_half_split(&mut y, hd, heads, &cos, &sin);
        convoy_kernels::silu_mul(&mut y, &up);
        convoy_kernels::add_bias(&mut y, &bias);
        convoy_kernels::add_in_place(&mut y, &x);
        y
    });
    for (path, y) in &all {
        assert_eq!(y, &all[0].1, "{path:?}");
    }
    // The SiLU gate's exponential is vector code with a scalar twin of the same operations:
    // still the same bits on every path, over its clamps (|v| past 87) and a tail of 5.
    let gate: Vec<f32> = (0..8197).map(|i| (i as f32 - 4098.0) * 0.05).collect();
    let up = rng.vec(gate.len());
    let all = every_path(|| {
        let mut y = gate.clone();
        convoy_kernels::silu_mul(&mut y, &up);
        y
    });
    for (path, y) in &all {
        let same = y
            .iter()
            .zip(&all[0].1)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{path:?}: silu_mul differs from the scalar path");
    }
    // And it is SiLU: against f64 within a few float roundings.
    for ((&g, &u), &y) in gate.iter().zip(&up).zip(&all[0].1) {
        let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
        assert!(
            (y as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
            "silu({g}) * {u} = {y}, want {want}"
        );
    }
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
    /// A decode past one 256-position partition, a chunked prefill on a cached prefix, a
    /// chunk whose rows end on both sides of a partition boundary (positions 491..530: the
    /// first rows see two partitions, the last three) and a prefill from scratch, on blocks
    /// scattered over the cache.
    fn new(shape: AttentionShape, rng: &mut Lcg) -> Case {
        let bs = shape.block_size;
        let specs = [(300usize, 1usize), (40, 7), (530, 40), (5, 5)];
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
        self.run_on(&self.k, &self.v)
    }

    /// The batch on caches `k` and `v` (of `self.k`'s and `self.v`'s shape) instead of its own.
    fn run_on<E: KvElem>(&self, k: &[E], v: &[E]) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.q.len()];
        paged_attention(&self.q, k, v, self.shape, &self.attention_seqs(), &mut out);
        out
    }

    /// Sequence `s` alone, in a batch of its own rows.
    fn run_alone(&self, s: usize) -> Vec<f32> {
        self.run_alone_on(s, &self.k, &self.v)
    }

    /// [`Case::run_alone`] on caches `k` and `v` instead of its own.
    fn run_alone_on<E: KvElem>(&self, s: usize, k: &[E], v: &[E]) -> Vec<f32> {
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
        paged_attention(&self.q[rows], k, v, self.shape, &alone, &mut out);
        out
    }

    /// Query `i` of sequence `s` alone: one query row on the context it sees (as if it were
    /// decoded on its own after the earlier positions were cached).
    fn run_one_row(&self, s: usize, i: usize) -> Vec<f32> {
        let row = self.shape.num_heads * self.shape.head_dim;
        let seq = &self.seqs[s];
        let at = (seq.query_start + i) * row;
        let one = [AttentionSeq {
            block_table: &seq.table,
            query_start: 0,
            num_queries: 1,
            context_len: seq.context_len - seq.num_queries + i + 1,
        }];
        let mut out = vec![f32::NAN; row];
        paged_attention(
            &self.q[at..at + row],
            &self.k,
            &self.v,
            self.shape,
            &one,
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

/// (query heads, KV heads, head_dim, block_size) of the attention tests.
///
/// The tile kernel (head_dim a multiple of 8; a tile's rows times its group of query heads, in
/// passes of 6): groups 1, 4, 8, 12 and 16. Its 512-bit loops (AVX-512 path, head_dim a
/// multiple of 16): V sums of 64 dimensions (64, 128) and of 16 (32); score passes of four
/// whole runs of 16 positions (blocks of 16), of runs cut into a whole 16 and a masked rest
/// (blocks of 24 and 32, whose whole chunks also start inside a block) and of masked runs only
/// (blocks of 8 and 5). Its AVX2 loops only: head_dim 24 and 40 (3 and 5 vectors) and 136
/// (64 + 64 + 8 dimensions of the V sum). head_dim 12 runs the scalar partition code on every
/// path (with the path's `axpy`).
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 14] = [
    (4, 4, 64, 16),
    (8, 2, 64, 16),
    (8, 1, 32, 16),
    (12, 1, 64, 16),
    (24, 2, 64, 8),
    (16, 1, 128, 16),
    (32, 2, 64, 16),
    (12, 1, 24, 5),
    (6, 3, 40, 16),
    (2, 1, 136, 16),
    (4, 2, 12, 4),
    (8, 2, 64, 32),
    (8, 2, 64, 24),
    (12, 1, 32, 5),
];

fn attention_shape(
    (num_heads, num_kv_heads, head_dim, block_size): (usize, usize, usize, usize),
) -> AttentionShape {
    AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    }
}

#[test]
fn paged_attention_every_path_matches_f64_including_gqa_groups_above_8() {
    say_which_paths("paged_attention");
    let mut rng = Lcg(3);
    for dims in ATTENTION_SHAPES {
        let shape = attention_shape(dims);
        let AttentionShape {
            num_heads,
            head_dim,
            ..
        } = shape;
        let case = Case::new(shape, &mut rng);
        let all = every_path(|| case.run());
        let scalar = &all[0].1;
        let exact = case.reference();
        assert_tile_loops_agree(&all, shape, "f32 cache");
        // q, k, v in [-1, 1): a score sums head_dim products of magnitude <= 1 and is scaled
        // by 1/sqrt(head_dim), so each path's score is within
        // delta = (head_dim + 2) * EPSILON * sqrt(head_dim) of the exact one; the softmax
        // weights then move by a relative 2 * delta at most, and the weighted sum of V (|v| <=
        // 1) over a partition of at most 256 positions adds 2 * (256 + 16) * EPSILON.
        let delta = (head_dim + 2) as f64 * f32::EPSILON as f64 * (head_dim as f64).sqrt();
        let tol = 2.0 * delta + 2.0 * 272.0 * f32::EPSILON as f64;
        let row = num_heads * head_dim;
        for (path, y) in &all {
            for (i, ((&a, &b), &e)) in y.iter().zip(scalar).zip(&exact).enumerate() {
                let (a, b) = (a as f64, b as f64);
                let ctx = format!("{path:?} {shape:?} element {i} (row {})", i / row);
                assert!((a - e).abs() <= tol, "{ctx}: {a} vs exact {e}");
                assert!((a - b).abs() <= 2.0 * tol, "{ctx}: {a} vs scalar {b}");
            }
            // Each path is batch invariant on its own: every sequence alone gives the same bits.
            for (s, seq) in case.seqs.iter().enumerate() {
                let rows = seq.query_start * row..(seq.query_start + seq.num_queries) * row;
                let alone = with_kernel_path(*path, || case.run_alone(s));
                assert_eq!(alone, y[rows], "{path:?} {shape:?} sequence {s} alone");
                // And every row of a chunk (computed in tiles of several rows) is the row
                // computed alone, as a decode step on the cached positions before it would.
                for i in 0..seq.num_queries {
                    let one = with_kernel_path(*path, || case.run_one_row(s, i));
                    let at = (seq.query_start + i) * row;
                    assert_eq!(
                        one,
                        y[at..at + row],
                        "{path:?} {shape:?} sequence {s} row {i}"
                    );
                }
            }
            assert_eq!(case.rows * row, y.len());
        }
        assert!(case.num_blocks > 0);
    }
}

#[test]
fn paged_attention_on_an_f16_cache_is_f32_attention_on_the_rounded_values() {
    attention_on_rounded_values::<f16>("f16", 31);
}

#[test]
fn paged_attention_on_an_fp8_cache_is_f32_attention_on_the_rounded_values() {
    attention_on_rounded_values::<F8E4M3>("fp8_e4m3", 37);
}

/// Attention on a cache of `E` gives, on every path, the bits of f32 attention on the values
/// rounded to `E`, and each sequence alone the same bits.
fn attention_on_rounded_values<E: KvElem>(name: &str, seed: u64) {
    say_which_paths(&format!("paged_attention ({name} cache)"));
    let mut rng = Lcg(seed);
    for dims in ATTENTION_SHAPES {
        let shape = attention_shape(dims);
        let case = Case::new(shape, &mut rng);
        let (kc, vc): (Vec<E>, Vec<E>) = (
            case.k.iter().map(|&x| E::from_f32(x)).collect(),
            case.v.iter().map(|&x| E::from_f32(x)).collect(),
        );
        let rounded = Case {
            k: kc.iter().map(|x| x.to_f32()).collect(),
            v: vc.iter().map(|x| x.to_f32()).collect(),
            ..case
        };
        let all = every_path(|| rounded.run_on(&kc, &vc));
        assert_tile_loops_agree(&all, shape, &format!("{name} cache"));
        for (path, y) in all {
            let want = with_kernel_path(path, || rounded.run());
            assert_eq!(
                y, want,
                "{path:?} {shape:?}: {name} cache vs f32 rounded values"
            );
            // So it is batch invariant too: each sequence alone gives the same bits.
            let row = shape.num_heads * shape.head_dim;
            for (s, seq) in rounded.seqs.iter().enumerate() {
                let rows = seq.query_start * row..(seq.query_start + seq.num_queries) * row;
                let alone = with_kernel_path(path, || rounded.run_alone_on(s, &kc, &vc));
                assert_eq!(
                    alone, y[rows],
                    "{path:?} {shape:?} sequence {s} alone ({name})"
                );
            }
        }
    }
}

/// The tile kernel's 512-bit loops give the bits of its AVX2 loops: where this process runs
/// both paths and the tiles take the shape (head_dim a multiple of 8 on both; the AVX-512
/// path's loops need 16, else it runs the AVX2 ones too), their outputs in `all` (from
/// [`every_path`]) are compared bit for bit (so `-0.0` differs from `0.0`).
fn assert_tile_loops_agree(all: &[(KernelPath, Vec<f32>)], shape: AttentionShape, what: &str) {
    let on = |p: KernelPath| all.iter().find(|(q, _)| *q == p).map(|(_, y)| y);
    if let (Some(avx512), Some(avx2)) = (on(KernelPath::Avx512), on(KernelPath::Avx2)) {
        if shape.head_dim.is_multiple_of(8) {
            let same = avx512.len() == avx2.len()
                && avx512
                    .iter()
                    .zip(avx2)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{shape:?}, {what}: AVX-512 tiles vs AVX2 tiles");
        }
    }
}

/// FNV-1a over the bits of some floats.
fn digest(h: &mut u64, v: &[f32]) {
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            *h = (*h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
}

#[test]
fn outputs_do_not_depend_on_the_number_of_pool_threads() {
    if let Some(threads) = std::env::var_os("CONVOY_KERNELS_TEST_THREADS") {
        // The child: a pool of `threads`, every kernel on every path, digests on stdout.
        let threads: usize = threads.to_str().unwrap().parse().unwrap();
        assert!(convoy_kernels::cpu::pool::set_num_threads(threads));
        assert_eq!(convoy_kernels::cpu::pool::num_threads(), threads);
        let mut rng = Lcg(23);
        let mats = matmul_cases(&mut rng);
        let xs: Vec<Vec<f32>> = mats.iter().map(|w| rng.vec(17 * w.cols())).collect();
        let cases: Vec<Case> = ATTENTION_SHAPES
            .iter()
            .map(|&d| Case::new(attention_shape(d), &mut rng))
            .collect();
        let norm_x = rng.vec(40 * 576);
        let norm_w = rng.vec(576);
        for path in paths() {
            let mut h = 0xcbf29ce484222325u64;
            with_kernel_path(path, || {
                for (w, x) in mats.iter().zip(&xs) {
                    for n in [1, 3, 4, 9, 17] {
                        digest(&mut h, &run_matmul(w, x, n));
                    }
                }
                for case in &cases {
                    digest(&mut h, &case.run());
                }
                digest(&mut h, &run_rms_norm(&norm_x, &norm_w));
            });
            println!("DIGEST {path:?} {h:016x}");
        }
        return;
    }
    let name = "outputs_do_not_depend_on_the_number_of_pool_threads";
    let digests: Vec<(usize, Vec<String>)> = [1, 2, 3, 5]
        .into_iter()
        .map(|threads| {
            let out = run_child(
                name,
                &[("CONVOY_KERNELS_TEST_THREADS", &threads.to_string())],
            );
            // (libtest prints the test's name on the line of its first output.)
            let lines = out
                .lines()
                .filter_map(|l| l.find("DIGEST ").map(|i| l[i..].to_string()))
                .collect();
            (threads, lines)
        })
        .collect();
    eprintln!("pool threads: digests {digests:?}");
    assert_eq!(digests[0].1.len(), paths().len(), "one digest per path");
    for (threads, d) in &digests {
        assert_eq!(d, &digests[0].1, "{threads} threads vs 1");
    }
}
