//! CPU kernels: AVX-512 where the processor has it (detected at run time), portable scalar
//! code everywhere else. Threads come from the global rayon pool.

pub mod attention;
pub mod matmul;
pub mod matrix;
pub mod ops;
mod simd;

/// A raw pointer that may cross threads: each thread writes a disjoint range through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output ranges to rayon workers; see each use.
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is never mutated.
unsafe impl Sync for SendPtr {}

/// Whether the AVX-512 kernels may run on this processor.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
