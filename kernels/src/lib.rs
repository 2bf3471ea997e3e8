//! Compute kernels for convoy.
//!
//! `cpu`: multi-threaded kernels over f32 activations. Weight matrices stay in their stored
//! encoding (f32 or GGML Q8_0 / Q4_0 / Q4_1 blocks) and are decoded in registers inside the
//! matrix multiply, so a 4.5-bit model reads 4.5 bits per weight and still computes exactly the
//! float32 products of the dequantised weights.
//!
//! Safety: every public function is safe for any input: the shapes and indices the unchecked
//! SIMD loops rely on are checked once per call, and a bad argument is a panic (documented
//! under `# Panics`) or an error (`try_paged_attention`), never an out-of-bounds access.
//!
//! Code paths: AVX-512 where the processor has it, else AVX2 + FMA where it has those, scalar
//! otherwise; `CONVOY_FORCE_SCALAR=1`, `CONVOY_KERNEL_PATH=avx512|avx2|portable` or
//! [`with_kernel_path`] limit the choice (see [`cpu`]).
//!
//! Batch invariance: every output element of every kernel is computed by the same sequence of
//! floating-point operations whatever the batch size or the tile it falls in, so a sequence's
//! logits do not depend on what else shares its forward pass.

pub mod cpu;

pub use cpu::attention::{
    paged_attention, try_paged_attention, AttentionError, AttentionSeq, AttentionShape,
};
pub use cpu::kv_elem::{KvElem, F8E4M3};
pub use cpu::matmul::matmul;
pub use cpu::matmul_int8::{matmul_quantized, matmul_with, Precision};
pub use cpu::matrix::{Matrix, MatrixError, WeightFormat};
pub use cpu::ops::{
    add_bias, add_in_place, add_rms_norm, rms_norm, rope_half_split, silu_mul, silu_mul_rows,
};
pub use cpu::quantized_rows::QuantizedRows;
pub use cpu::{
    active_kernel_path, has_avx2, has_avx512, has_avx512_vnni, kernel_path_from_env,
    scalar_forced_by_env, simd_active, with_kernel_path, KernelPath,
};

pub mod cuda;
