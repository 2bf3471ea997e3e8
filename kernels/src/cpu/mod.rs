//! CPU kernels: AVX-512 where the processor has it (detected at run time), portable scalar
//! code everywhere else. Threads come from the spinning kernel pool (`pool`).
//!
//! # Choosing the code path
//!
//! Each public kernel decides once per call, on the calling thread, whether it runs its AVX-512
//! or its scalar code, and carries that decision into every work item it hands to the pool. It
//! takes the scalar code when any of these holds:
//! - the processor lacks one of AVX-512F, AVX2, FMA, F16C ([`has_avx512`]);
//! - the environment variable `CONVOY_FORCE_SCALAR` is set to anything but `""` or `"0"` when
//!   the first kernel runs (read once; [`scalar_forced_by_env`]);
//! - the calling thread is inside `with_kernel_path(KernelPath::Scalar, ..)`
//!   ([`with_kernel_path`]).
//!
//! The last one is per thread, so a test can compute the same kernel both ways side by side
//! without affecting tests that run concurrently on other threads.
//!
//! # Unsafe code
//!
//! The SIMD kernels (`simd`) are `unsafe fn`s: they need the processor features, and they index
//! with raw pointers. The features are proven by an `Avx512` token, which only
//! `Avx512::detect` creates; the indices are proven by checks that each public kernel makes
//! once per call, before any work item starts (see each kernel's `# Panics` or error type).

use std::cell::Cell;
use std::sync::OnceLock;

pub mod attention;
pub mod matmul;
pub mod matrix;
pub mod ops;
pub mod pool;
mod simd;

/// A raw pointer to an output buffer that pool workers write in disjoint parts.
///
/// Invariant (upheld by every user, see each `SAFETY` comment): the buffer it points into is
/// borrowed mutably by the call that created the pointer for as long as any worker uses it
/// (`pool::parallel_for` returns only after every item is done), and no two work items write
/// the same element or read an element another item writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: the pointer is only dereferenced under the invariant above: the pointee outlives every
// work item, and the items' accesses are disjoint, so moving the pointer to a worker thread
// creates no data race.
unsafe impl Send for SendPtr {}
// SAFETY: as above; sharing `&SendPtr` only gives out copies of the pointer, never mutates it.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. Closures call this instead of reading the field, so they capture the whole
    /// (Sync) wrapper rather than the bare (non-Sync) pointer.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether the processor has every feature the AVX-512 kernels use: AVX-512F, AVX2, FMA and
/// F16C. (Whether the kernels use them also depends on [`KernelPath`] and
/// `CONVOY_FORCE_SCALAR`; see [`simd_active`].)
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Proof that the running processor has AVX-512F, AVX2, FMA and F16C: the only way to get one
/// is [`Avx512::detect`], which checks them. An `unsafe fn` of `simd` that needs these features
/// may be called wherever a token is at hand.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512 {
    _detected: (),
}

impl Avx512 {
    /// A token if the processor has the features, else `None`.
    pub(crate) fn detect() -> Option<Avx512> {
        has_avx512().then_some(Avx512 { _detected: () })
    }
}

/// Which code the CPU kernels called from a thread run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelPath {
    /// AVX-512 where the processor has it and `CONVOY_FORCE_SCALAR` is not set; scalar
    /// otherwise.
    #[default]
    Auto,
    /// The portable scalar code, whatever the processor.
    Scalar,
}

thread_local! {
    static PATH: Cell<KernelPath> = const { Cell::new(KernelPath::Auto) };
}

/// Run `f` with every kernel that `f` calls from this thread on `path`; the previous choice is
/// restored afterwards, also if `f` panics. Other threads are unaffected, so tests can compare
/// the SIMD and scalar results of one kernel side by side while other tests run.
///
/// `KernelPath::Auto` inside a `Scalar` scope switches SIMD back on (where available).
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    struct Restore(KernelPath);
    impl Drop for Restore {
        fn drop(&mut self) {
            PATH.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PATH.with(|p| p.replace(path)));
    f()
}

/// Whether `CONVOY_FORCE_SCALAR` forces the scalar kernels: set to anything but `""` or `"0"`.
/// Read once, the first time this is asked (the first kernel call at the latest).
pub fn scalar_forced_by_env() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| {
        std::env::var_os("CONVOY_FORCE_SCALAR").is_some_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether a kernel called from this thread now would run its AVX-512 code.
pub fn simd_active() -> bool {
    simd().is_some()
}

/// The path decision of a kernel called now from this thread: a token when it runs AVX-512.
pub(crate) fn simd() -> Option<Avx512> {
    if scalar_forced_by_env() || PATH.with(Cell::get) == KernelPath::Scalar {
        return None;
    }
    Avx512::detect()
}
