//! CPU kernels: AVX-512 where the processor has it (detected at run time), portable scalar
//! code everywhere else. Threads come from the spinning kernel pool (`pool`).

pub mod attention;
pub mod matmul;
pub mod matrix;
pub mod ops;
pub mod pool;
mod simd;

/// A raw pointer that may cross threads: each thread writes a disjoint range through it.
/// Read it through [`SendPtr::get`] so closures capture the whole (Sync) wrapper.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output ranges to pool workers; see each use.
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is never mutated.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

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
