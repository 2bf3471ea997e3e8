//! CPU kernels in three sets, chosen at run time: AVX-512 (`simd`), AVX2 + FMA (`avx2`), and
//! portable scalar code everywhere else. The fast precision's integer kernels on the AVX-512
//! path use AVX-512 VNNI where the processor has it (`vnni_int8`, the same bits as their AVX2
//! form `avx2_int8`), and attention's tiles use 512-bit loops where it has AVX-512BW and VL
//! (`avx512_attention`, the same bits as their AVX2 form `avx2_attention`). Threads come from
//! the spinning kernel pool (`pool`).
//!
//! # Choosing the code path
//!
//! Each public kernel decides once per call, on the calling thread, which set it runs, and
//! carries that decision into every work item it hands to the pool. The paths are ranked
//! portable < AVX2 < AVX-512; a kernel runs the highest one that is at most each of:
//! - what the processor has: AVX-512 needs AVX-512F, AVX2, FMA and F16C ([`has_avx512`]), AVX2
//!   needs AVX2, FMA and F16C ([`has_avx2`]);
//! - the process-wide ceiling of the environment (read once, when the first kernel runs):
//!   `CONVOY_FORCE_SCALAR` set to anything but `""` or `"0"` means portable
//!   ([`scalar_forced_by_env`]); otherwise `CONVOY_KERNEL_PATH=avx512|avx2|portable|auto`
//!   ([`kernel_path_from_env`]; `scalar` is accepted for `portable`);
//! - the calling thread's choice, `with_kernel_path(KernelPath::.., ..)` ([`with_kernel_path`],
//!   `Auto` by default, which is no limit).
//!
//! The last one is per thread, so a test can compute the same kernel on every path side by side
//! without affecting tests that run concurrently on other threads. [`active_kernel_path`] says
//! which path a kernel called now would run.
//!
//! Every path is batch invariant on its own (each output element is computed by the same
//! sequence of floating-point operations whatever the batch, tile or thread count); the paths
//! differ from each other in summation order (and fused multiply-adds) only.
//!
//! # Unsafe code
//!
//! The SIMD kernels (`simd`, `avx2` and the modules above) are `unsafe fn`s: they need the
//! processor features, and they index with raw pointers. The features are proven by a token
//! (`Avx512`, `Avx2`, `Vnni`, `Zmm`), which only its `detect` creates after checking them; the
//! indices are proven by checks that each
//! public kernel makes once per call, before any work item starts (see each kernel's `# Panics`
//! or error type).

use std::cell::Cell;
use std::sync::OnceLock;

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_attention;
#[cfg(target_arch = "x86_64")]
mod avx2_int8;
#[cfg(target_arch = "x86_64")]
mod avx512_attention;
pub mod kv_elem;
pub mod matmul;
pub mod matmul_int8;
pub mod matrix;
pub mod ops;
pub mod pool;
pub mod quantized_rows;
mod simd;
#[cfg(target_arch = "x86_64")]
mod vnni_int8;

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
/// F16C. (Whether the kernels use them also depends on [`KernelPath`] and the environment; see
/// [`active_kernel_path`].)
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the processor has what the fast precision's AVX-512 VNNI kernels use: the AVX-512
/// kernels' features ([`has_avx512`]) and AVX-512VL and AVX-512 VNNI (Intel since Cascade
/// Lake, AMD since Zen 4). They run where the AVX-512 path is allowed (see the module docs).
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512()
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the processor has what the AVX-512 attention tiles use: the AVX-512 kernels'
/// features ([`has_avx512`]) and AVX-512BW and AVX-512VL (every AVX-512 processor since
/// Skylake-SP and Zen 4), for their masked 8- and 16-bit loads.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_bw_vl() -> bool {
    has_avx512()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Whether the processor has every feature the AVX2 kernels use: AVX2, FMA and F16C.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
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

/// Proof that the running processor has AVX2, FMA and F16C: the only way to get one is
/// [`Avx2::detect`], which checks them. An `unsafe fn` of `avx2` that needs these features may
/// be called wherever a token is at hand.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2 {
    _detected: (),
}

impl Avx2 {
    /// A token if the processor has the features, else `None`.
    pub(crate) fn detect() -> Option<Avx2> {
        has_avx2().then_some(Avx2 { _detected: () })
    }
}

/// Which code the CPU kernels called from a thread run: an upper limit, lowered further by what
/// the processor has and by the environment (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelPath {
    /// No limit: the best path the processor and the environment allow.
    #[default]
    Auto,
    /// The portable scalar code, whatever the processor.
    Scalar,
    /// At most the AVX2 + FMA kernels (portable code where the processor lacks them).
    Avx2,
    /// At most the AVX-512 kernels: the same as `Auto`, named for symmetry.
    Avx512,
}

impl KernelPath {
    /// Rank for the "at most" comparison: portable < AVX2 < AVX-512.
    fn rank(self) -> u8 {
        match self {
            KernelPath::Scalar => 0,
            KernelPath::Avx2 => 1,
            KernelPath::Avx512 | KernelPath::Auto => 2,
        }
    }

    /// Parse a `CONVOY_KERNEL_PATH` value: `auto`, `avx512`, `avx2`, `portable` or `scalar`
    /// (ASCII case ignored).
    pub fn parse(s: &str) -> Option<KernelPath> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Some(KernelPath::Auto),
            "avx512" | "avx-512" => Some(KernelPath::Avx512),
            "avx2" => Some(KernelPath::Avx2),
            "portable" | "scalar" => Some(KernelPath::Scalar),
            _ => None,
        }
    }
}

thread_local! {
    static PATH: Cell<KernelPath> = const { Cell::new(KernelPath::Auto) };
}

/// Run `f` with every kernel that `f` calls from this thread on at most `path`; the previous
/// choice is restored afterwards, also if `f` panics. Other threads are unaffected, so tests can
/// compare the results of one kernel on every path side by side while other tests run.
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

/// The process-wide ceiling set by the environment: `Scalar` when `CONVOY_FORCE_SCALAR` is set
/// (see [`scalar_forced_by_env`]), else the value of `CONVOY_KERNEL_PATH` (`Auto` when unset;
/// an unknown value is reported on stderr once and ignored). Read once.
pub fn kernel_path_from_env() -> KernelPath {
    static PATH_ENV: OnceLock<KernelPath> = OnceLock::new();
    if scalar_forced_by_env() {
        return KernelPath::Scalar;
    }
    *PATH_ENV.get_or_init(|| match std::env::var("CONVOY_KERNEL_PATH") {
        Err(_) => KernelPath::Auto,
        Ok(v) => KernelPath::parse(&v).unwrap_or_else(|| {
            eprintln!(
                "convoy-kernels: ignoring CONVOY_KERNEL_PATH={v:?} \
                 (expected auto, avx512, avx2 or portable)"
            );
            KernelPath::Auto
        }),
    })
}

/// The path a kernel called now from this thread runs: `Avx512`, `Avx2` or `Scalar` (never
/// `Auto`).
pub fn active_kernel_path() -> KernelPath {
    match simd() {
        Isa::Avx512(_) => KernelPath::Avx512,
        Isa::Avx2(_) => KernelPath::Avx2,
        Isa::Portable => KernelPath::Scalar,
    }
}

/// Whether a kernel called from this thread now would run SIMD code (AVX-512 or AVX2) rather
/// than the portable code.
pub fn simd_active() -> bool {
    !matches!(simd(), Isa::Portable)
}

/// The path decision of a kernel, with the token proving the features of its SIMD path.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Isa {
    /// The AVX-512 kernels (`simd`).
    Avx512(Avx512),
    /// The AVX2 + FMA kernels (`avx2`).
    Avx2(Avx2),
    /// The portable code.
    Portable,
}

/// The path decision of a kernel called now from this thread.
pub(crate) fn simd() -> Isa {
    let limit = PATH
        .with(Cell::get)
        .rank()
        .min(kernel_path_from_env().rank());
    if limit >= 2 {
        if let Some(t) = Avx512::detect() {
            return Isa::Avx512(t);
        }
    }
    if limit >= 1 {
        if let Some(t) = Avx2::detect() {
            return Isa::Avx2(t);
        }
    }
    Isa::Portable
}
