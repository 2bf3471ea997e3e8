//! Quick throughput probe of the quantised matmul: GB/s of weights read at n tokens.
//! `cargo run --release -p convoy-kernels --example matmul_speed`
use convoy_kernels::{matmul, Matrix, WeightFormat};
use std::time::Instant;

fn main() {
    for (rows, cols, label) in [
        (1536usize, 576usize, "in-cache 1536x576"),
        (49152, 576, "streaming 49152x576"),
    ] {
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let nb = rows * cols / 32;
            let mut bytes = vec![0u8; nb * format.block_bytes()];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            for blk in bytes.chunks_mut(format.block_bytes()) {
                blk[0] = 0;
                blk[1] = 0x20;
            }
            let w = Matrix::from_blocks(format, rows, cols, bytes).unwrap();
            for n in [1usize, 4, 16] {
                let x: Vec<f32> = (0..n * cols).map(|i| (i % 13) as f32 * 0.1).collect();
                let mut y = vec![0f32; n * rows];
                let reps = (200_000_000 / w.size_bytes()).max(3);
                matmul(&x, n, &w, &mut y);
                let t = Instant::now();
                for _ in 0..reps {
                    matmul(&x, n, &w, &mut y);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{label} {format:?} n={n}: {:.2} GB/s weights, {:.1} GFLOP/s",
                    w.size_bytes() as f64 / s / 1e9,
                    2.0 * (rows * cols * n) as f64 / s / 1e9
                );
            }
        }
    }
}
