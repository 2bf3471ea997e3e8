//! Times `matmul` on every kernel path the processor has, on random weights of the shapes of
//! SmolLM2-135M's layers (Q4_1 by default), at a few batch sizes: the best of several runs, as
//! weights per second. `cargo run --release -p convoy-kernels --example matmul_paths --
//! [format] [reps] [batches]`, format one of f32, q8_0, q4_0, q4_1 (default q4_1), batches
//! comma-separated (default 1,4,16). `CONVOY_KERNEL_PATH` limits the paths run.

use std::time::Instant;

use convoy_kernels::{active_kernel_path, with_kernel_path, KernelPath, Matrix, WeightFormat};

fn main() {
    let mut args = std::env::args().skip(1);
    let format = match args.next().as_deref().unwrap_or("q4_1") {
        "f32" => WeightFormat::F32,
        "q8_0" => WeightFormat::Q8_0,
        "q4_0" => WeightFormat::Q4_0,
        _ => WeightFormat::Q4_1,
    };
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let batches: Vec<usize> = args
        .next()
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    // q/k/v stacked, o, gate+up stacked, down: one layer of SmolLM2-135M.
    let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    let mats: Vec<Matrix> = shapes
        .iter()
        .map(|&(rows, cols)| {
            if format == WeightFormat::F32 {
                let v = (0..rows * cols)
                    .map(|_| next() as f32 / u32::MAX as f32 - 0.5)
                    .collect();
                return Matrix::from_f32(rows, cols, v).unwrap();
            }
            let bb = format.block_bytes();
            let mut bytes = Vec::with_capacity(rows * cols / 32 * bb);
            for _ in 0..rows * cols / 32 {
                bytes.extend(half::f16::from_f32(0.01).to_le_bytes());
                for _ in 2..bb {
                    bytes.push(next() as u8);
                }
            }
            Matrix::from_blocks(format, rows, cols, bytes).unwrap()
        })
        .collect();
    let weights: usize = shapes.iter().map(|(r, c)| r * c).sum();
    println!("{format:?}, one layer of SmolLM2-135M ({weights} weights), best of {reps}");
    for path in [KernelPath::Scalar, KernelPath::Avx2, KernelPath::Avx512] {
        with_kernel_path(path, || {
            if active_kernel_path() != path {
                return;
            }
            for &n in &batches {
                let xs: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|m| (0..n * m.cols()).map(|i| (i % 7) as f32 * 0.1).collect())
                    .collect();
                let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows()]).collect();
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    for ((m, x), y) in mats.iter().zip(&xs).zip(&mut ys) {
                        convoy_kernels::matmul(x, n, m, y);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{path:?} n={n:>2}: {:8.1} us/layer, {:6.2} G weight-token products/s",
                    best * 1e6,
                    (weights * n) as f64 / best / 1e9
                );
            }
        });
    }
}
