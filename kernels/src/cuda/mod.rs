//! CUDA kernels: `.cu` sources embedded in the binary and compiled at run time by NVRTC for the
//! device's architecture.
//!
//! Status: the kernel sources and their compilation to PTX exist and are checked in CI (through
//! the `nvidia-cuda-nvrtc` wheel); the CUDA runtime side of the backend (device memory, cuBLAS
//! GEMMs, launching these kernels, CUDA graphs, the pinned host tier) is not built yet, so
//! nothing here has run on a GPU.

pub mod nvrtc;

/// One `.cu` source and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name, for error messages.
    pub name: &'static str,
    /// CUDA C source, without the common prelude.
    pub source: &'static str,
    /// `extern "C"` kernel names it must define.
    pub kernels: &'static [&'static str],
}

/// Helpers prepended to every source (bf16 conversion, warp and block reductions).
pub const PRELUDE: &str = include_str!("kernels/common.cuh");

/// Every kernel source of the backend.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "layers.cu",
        source: include_str!("kernels/layers.cu"),
        kernels: &[
            "embedding_bf16",
            "fused_add_rmsnorm",
            "rope_half_split",
            "reshape_and_cache",
            "silu_mul",
            "copy_blocks",
        ],
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        kernels: &["attention_partition", "attention_combine"],
    },
    KernelSource {
        name: "sampling.cu",
        source: include_str!("kernels/sampling.cu"),
        kernels: &["argmax_rows", "gumbel_sample_rows"],
    },
];

/// The full text NVRTC compiles for a source.
pub fn full_source(src: &KernelSource) -> String {
    format!("{PRELUDE}\n{}", src.source)
}
