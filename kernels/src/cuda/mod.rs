//! CUDA kernels: `.cu` sources embedded in the binary and compiled at run time by NVRTC for the
//! device's architecture, and compiled at build time for the host as the emulated device.
//!
//! - [`SOURCES`] / [`full_source`]: the text NVRTC compiles (and the emulator, with a shim).
//! - [`gemm`]: cuBLAS's GEMM contract, shared by cuBLAS and the emulator's reference GEMM.
//! - [`launch`]: one typed launch contract per kernel (arguments, grid rule, host-side checks).
//! - [`device`]: the device layer ([`device::DeviceLayer`]): memory, copies, launches.
//! - [`emulator`]: the emulated device, running the same kernels on the CPU with checks.
//! - [`driver`]: the device layer of a real GPU (cudarc: driver, NVRTC, cuBLAS; probed first).
//! - [`nvrtc`]: compilation to PTX for a real GPU.
//! - [`op_cases`]: every operation on seeded inputs, runnable on any device, to compare two.
//!
//! Status: the kernels run and are tested on the emulated device, under the CUDA backend of the
//! engine (`engine/core/src/backend/cuda/`); the driver-backed device layer is built but has
//! not yet run on a GPU (docs/cuda.md).

pub mod device;
pub mod driver;
pub mod emulator;
pub mod gemm;
pub mod launch;
pub mod nvrtc;
pub mod op_cases;
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
            "cast_bf16",
            "gather_rows",
            "add_rows",
            "add_bias_rows",
            "copy_block_list",
        ],
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        kernels: &["attention_partition", "attention_combine"],
    },
    KernelSource {
        name: "attention_mma.cu",
        source: include_str!("kernels/attention_mma.cu"),
        kernels: &["attention_mma"],
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
