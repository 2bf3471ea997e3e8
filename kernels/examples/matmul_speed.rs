//! Matrix multiply speed of the two precisions side by side on a SmolLM2-shaped Q4_1 / Q8_0
//! matrix: `cargo run --release -p convoy-kernels --example matmul_speed`. The last lines take
//! one token through 48 different copies of a matrix in turn (more bytes than the caches
//! hold), as a batch-1 decode step does through the layers: that is bound by reading the
//! weights from memory, reported in GB/s. The very last line takes one token through every
//! matrix of SmolLM2-135M (30 layers of QKV, O, gate/up and down in Q4_1, then the Q8_0 output
//! projection: 92 MB), the matrix multiplies of one batch-1 decode step.

use std::time::Instant;

use convoy_kernels::{matmul_with, Matrix, Precision, QuantizedRows, WeightFormat};

fn random_blocks(format: WeightFormat, rows: usize, cols: usize, seed: &mut u64) -> Matrix {
    let mut bytes = Vec::with_capacity(rows * cols / 32 * format.block_bytes());
    for _ in 0..rows * cols / 32 {
        bytes.extend(half::f16::from_f32(0.02).to_le_bytes());
        for _ in 2..format.block_bytes() {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            bytes.push((*seed >> 56) as u8);
        }
    }
    Matrix::from_blocks(format, rows, cols, bytes).expect("sizes match")
}

fn main() {
    let mut seed = 1u64;
    for (name, format, rows, cols) in [
        ("gate_up 3072x576 Q4_1", WeightFormat::Q4_1, 3072, 576),
        ("down 576x1536 Q4_1", WeightFormat::Q4_1, 576, 1536),
        ("lm_head 49152x576 Q8_0", WeightFormat::Q8_0, 49152, 576),
    ] {
        let w = random_blocks(format, rows, cols, &mut seed);
        for n in [1usize, 16, 128] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
                .collect();
            let mut y = vec![0f32; n * rows];
            let mut scratch = QuantizedRows::default();
            let mut line = format!("{name:>24} n={n:>3}:");
            for p in [Precision::Exact, Precision::Fast] {
                let reps = (2_000_000_000 / (rows * cols * n)).clamp(3, 2000);
                matmul_with(p, &x, n, &w, &mut y, &mut scratch);
                let t = Instant::now();
                for _ in 0..reps {
                    matmul_with(p, &x, n, &w, &mut y, &mut scratch);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let gmacs = (rows * cols * n) as f64 / s / 1e9;
                line += &format!("  {} {:>8.1} us ({gmacs:>5.1} GMAC/s)", p.as_str(), s * 1e6);
            }
            println!("{line}");
        }
    }
    // Batch-1 decode streams every layer's weights from memory once per token.
    for (name, format, rows, cols) in [
        ("gate_up 3072x576 Q4_1", WeightFormat::Q4_1, 3072, 576),
        ("down 576x1536 Q4_1", WeightFormat::Q4_1, 576, 1536),
    ] {
        let copies: Vec<Matrix> = (0..48)
            .map(|_| random_blocks(format, rows, cols, &mut seed))
            .collect();
        let bytes = rows * cols / 32 * format.block_bytes();
        let x: Vec<f32> = (0..cols).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let mut y = vec![0f32; rows];
        let mut scratch = QuantizedRows::default();
        let mut line = format!("{name:>24} x48 from memory, n=1:");
        for p in [Precision::Exact, Precision::Fast] {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for w in &copies {
                    matmul_with(p, &x, 1, w, &mut y, &mut scratch);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gbs = (bytes * copies.len()) as f64 / best / 1e9;
            line += &format!(
                "  {} {:>6.1} us each ({gbs:>5.1} GB/s)",
                p.as_str(),
                best * 1e6 / 48.0
            );
        }
        println!("{line}");
    }
    // One batch-1 decode step's matrix multiplies, every matrix different (30 layers + output).
    let mut model: Vec<Matrix> = Vec::new();
    for _ in 0..30 {
        for (rows, cols) in [(960, 576), (576, 576), (3072, 576), (576, 1536)] {
            model.push(random_blocks(WeightFormat::Q4_1, rows, cols, &mut seed));
        }
    }
    model.push(random_blocks(WeightFormat::Q8_0, 49152, 576, &mut seed));
    let bytes: usize = model.iter().map(Matrix::size_bytes).sum();
    let x: Vec<f32> = (0..1536).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let mut y = vec![0f32; 49152];
    let mut scratch = QuantizedRows::default();
    let mut line = format!("{:>24} one decode step, n=1:", "SmolLM2 matrices");
    for p in [Precision::Exact, Precision::Fast] {
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let t = Instant::now();
                for w in &model {
                    matmul_with(p, &x[..w.cols()], 1, w, &mut y, &mut scratch);
                }
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        line += &format!(
            "  {} {:>5.2} ms ({:>5.1} GB/s; best {:.2})",
            p.as_str(),
            med * 1e3,
            bytes as f64 / med / 1e9,
            times[0] * 1e3
        );
    }
    println!("{line}");
}
