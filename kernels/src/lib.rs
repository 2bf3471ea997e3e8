//! Compute kernels for convoy.
//!
//! `cpu`: multi-threaded kernels over f32 activations. Weight matrices stay in their stored
//! encoding (f32 or GGML Q8_0 / Q4_0 / Q4_1 blocks) and are decoded in registers inside the
//! matrix multiply, so a 4.5-bit model reads 4.5 bits per weight and still computes exactly the
//! float32 products of the dequantised weights.
//!
//! Batch invariance: every output element of every kernel is computed by the same sequence of
//! floating-point operations whatever the batch size or the tile it falls in, so a sequence's
//! logits do not depend on what else shares its forward pass.

pub mod cpu;

pub use cpu::attention::{paged_attention, AttentionSeq, AttentionShape};
pub use cpu::matmul::matmul;
pub use cpu::matrix::{Matrix, MatrixError, WeightFormat};
pub use cpu::ops::{add_bias, add_in_place, rms_norm, rope_half_split, silu_mul};

pub mod cuda;
