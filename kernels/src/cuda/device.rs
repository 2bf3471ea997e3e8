//! The lowest layer of the CUDA backend: device memory, copies and kernel launches. Everything
//! above it (launch contracts, and later weight upload, KV layout, sampling) is written once
//! against [`DeviceLayer`]; its implementations are the emulated device
//! ([`super::emulator::EmulatedDevice`], host memory and the `.cu` sources compiled for the
//! host) and, on a machine with a GPU, the driver through cudarc.
//!
//! Invariants: a [`DeviceSlice`] names `bytes` bytes of one live allocation starting at `ptr`;
//! launch contracts check every size they can derive from their scalar arguments against the
//! slices they are given before a launch.
//!
//! Ordering, as CUDA's: work on one [`Stream`] runs in the order it was issued; work on the two
//! streams is ordered only by events ([`DeviceLayer::record`], [`DeviceLayer::wait`]).
//! [`DeviceLayer::write`] and [`DeviceLayer::read`] wait for the compute stream only, so a
//! buffer the copy stream uses is written again only once the compute stream has waited for
//! that copy work. While the compute stream is captured into a graph
//! ([`DeviceLayer::begin_capture`]), its launches and GEMMs are recorded, not run, and
//! allocations, copies and synchronisation are refused.

use super::gemm::GemmBf16;
use super::launch::{KernelArg, LaunchConfig};

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An allocation could not be made.
    #[error("cannot allocate {bytes} bytes of device memory")]
    OutOfMemory {
        /// Bytes asked for.
        bytes: usize,
    },
    /// A copy names bytes outside its allocation.
    #[error("copy of {len} bytes at offset {offset} outside an allocation of {bytes} bytes")]
    CopyOutOfRange {
        /// Offset into the allocation.
        offset: usize,
        /// Bytes copied.
        len: usize,
        /// The allocation's size.
        bytes: usize,
    },
    /// A launch's arguments break its kernel's contract; nothing was launched.
    #[error("{kernel}: {problem}")]
    Contract {
        /// Kernel name.
        kernel: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The operation is not allowed while the compute stream is being captured into a graph
    /// (or a capture was ended or replayed out of turn).
    #[error("{operation}: {problem}")]
    Capture {
        /// What was attempted.
        operation: &'static str,
        /// Why it is refused.
        problem: &'static str,
    },
    /// A launch names memory that is in no live allocation (a graph replayed after a buffer it
    /// recorded was freed); nothing was run.
    #[error("{kernel} is given address {ptr:#x}, which lies in no live allocation")]
    Dangling {
        /// Kernel name.
        kernel: &'static str,
        /// The address.
        ptr: u64,
    },
    /// The emulated device stopped a launch on a fault.
    #[error("{kind:?}: {message}")]
    Fault {
        /// What kind of fault.
        kind: FaultKind,
        /// Where and why, with the block and thread.
        message: String,
    },
}

/// Faults the emulated device detects; mirrored from `emulator/runtime.cpp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No kernel of that name is registered.
    UnknownKernel,
    /// The number of arguments differs from the kernel's parameters.
    ArgumentCount,
    /// An argument's size differs from its parameter's.
    ArgumentSize,
    /// Grid, block or shared memory beyond the device's limits.
    LaunchConfig,
    /// A warp shuffle whose mask names absent or exited lanes, or a lane waiting with another mask.
    Shuffle,
    /// An index outside a fixed-size (`__shared__` or local) array.
    OutOfBounds,
    /// `__trap()`.
    Trap,
    /// Threads of one block wait at different `__syncthreads`.
    DivergentBarrier,
    /// Threads exited while others wait at `__syncthreads`.
    ExitedAtBarrier,
    /// Nothing can run and no barrier or exchange can be released.
    Deadlock,
    /// A code the runtime does not name (a mismatch between the two sides).
    Other(i32),
}

impl FaultKind {
    /// The kind for the runtime's code.
    pub fn from_code(code: i32) -> FaultKind {
        match code {
            1 => FaultKind::UnknownKernel,
            2 => FaultKind::ArgumentCount,
            3 => FaultKind::ArgumentSize,
            4 => FaultKind::LaunchConfig,
            5 => FaultKind::Shuffle,
            6 => FaultKind::OutOfBounds,
            7 => FaultKind::Trap,
            8 => FaultKind::DivergentBarrier,
            9 => FaultKind::ExitedAtBarrier,
            10 => FaultKind::Deadlock,
            other => FaultKind::Other(other),
        }
    }
}

/// A range of device memory: an address and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlice {
    /// Device address of the first byte.
    pub ptr: u64,
    /// Length in bytes.
    pub bytes: usize,
}

impl DeviceSlice {
    /// The null slice, for optional pointer arguments (`delta` of `fused_add_rmsnorm`).
    pub const NULL: DeviceSlice = DeviceSlice { ptr: 0, bytes: 0 };

    /// Whether this is [`DeviceSlice::NULL`].
    pub fn is_null(&self) -> bool {
        self.ptr == 0
    }
}

/// Check that `len` bytes at `offset` lie inside an allocation of `bytes` bytes.
pub fn check_range(offset: usize, len: usize, bytes: usize) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= bytes => Ok(()),
        _ => Err(DeviceError::CopyOutOfRange { offset, len, bytes }),
    }
}

/// A device allocation, freed when dropped.
pub trait DeviceMemory {
    /// The whole allocation.
    fn slice(&self) -> DeviceSlice;
}

/// Values that may be copied to and from the device as raw bytes: plain numbers with no
/// padding and every bit pattern valid.
pub trait DeviceScalar: Copy + Default + sealed::Sealed + 'static {}
mod sealed {
    pub trait Sealed {}
}
macro_rules! device_scalar {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl DeviceScalar for $t {})*};
}
device_scalar!(f32, f64, i32, u32, i64, u64, u16, u8, half::bf16, half::f16);

/// View scalars as bytes.
pub fn as_bytes<T: DeviceScalar>(v: &[T]) -> &[u8] {
    // SAFETY: `DeviceScalar` types are plain numbers without padding; the view covers exactly
    // the slice's memory and borrows it.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// View scalars as mutable bytes.
pub fn as_bytes_mut<T: DeviceScalar>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every bit pattern is a valid `DeviceScalar`, so any bytes
    // written through the view leave valid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A queue of device work: the compute stream runs the forward pass (and is what graphs
/// capture); the copy stream moves KV blocks to and from the host tier alongside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Kernels and GEMMs of the forward pass.
    Compute,
    /// Copies between the device and its host tier.
    Copy,
}

/// Device memory, copies and launches: what differs between a GPU and the emulator.
pub trait DeviceLayer {
    /// An allocation of this device.
    type Buffer: DeviceMemory;
    /// A point in one stream's work, which the other stream can wait for.
    type Event;
    /// A recording of the compute stream's launches, replayed as one unit (a CUDA graph).
    type Graph;

    /// Name for messages (`cuda-emulated`, `cuda`).
    fn name(&self) -> &'static str;

    /// Allocate `bytes` bytes (uninitialised on a GPU; NaN bytes on the emulator).
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer, DeviceError>;

    /// Allocate `bytes` bytes of host memory the device reads and writes directly (pinned and
    /// mapped on a GPU: the KV cache's host tier, which kernels copy over the bus); on the
    /// emulated device, as [`DeviceLayer::alloc`].
    fn alloc_host(&self, bytes: usize) -> Result<Self::Buffer, DeviceError> {
        self.alloc(bytes)
    }

    /// Whether the device runs tensor-core MMAs on bf16 (`mma.sync` m16n8k16: sm_80 and later;
    /// the emulated device models the instruction), which the tensor-core attention kernel needs.
    fn tensor_cores(&self) -> bool {
        true
    }

    /// The device's (free, total) memory in bytes, where it has a fixed memory to share out
    /// (a GPU); `None` on the emulated device, whose memory is the host's.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// Whether launched work runs apart from the calling thread (a GPU's streams), so the host
    /// can work while it runs; the emulated device runs each launch on the calling thread.
    fn runs_apart(&self) -> bool {
        false
    }

    /// Copy `src` into `dst` at byte `offset`.
    fn write(&self, dst: &mut Self::Buffer, offset: usize, src: &[u8]) -> Result<(), DeviceError>;

    /// Copy bytes of `src` from byte `offset` into `dst`.
    fn read(&self, src: &Self::Buffer, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError>;

    /// Launch kernel `name` with `args` on `stream`, as `cuLaunchKernel` does.
    ///
    /// # Safety
    /// Every pointer argument must address live memory of this device large enough for every
    /// access the kernel makes with these arguments and the device data they index (block
    /// tables, slot mappings, token ids). Launch contracts ([`super::launch::KernelLaunch`])
    /// check the sizes that follow from scalar arguments; the indices held in device memory are
    /// the caller's to keep in range.
    unsafe fn launch_raw(
        &self,
        stream: Stream,
        name: &'static str,
        config: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<(), DeviceError>;

    /// Mark the work issued to `stream` so far.
    fn record(&self, stream: Stream) -> Result<Self::Event, DeviceError>;

    /// Make work issued to `stream` from now on wait until `event`'s work has run.
    fn wait(&self, stream: Stream, event: &Self::Event) -> Result<(), DeviceError>;

    /// Start recording the compute stream: its launches and GEMMs are recorded, not run, until
    /// [`DeviceLayer::end_capture`].
    fn begin_capture(&self) -> Result<(), DeviceError>;

    /// Stop recording and return the graph of what was recorded.
    fn end_capture(&self) -> Result<Self::Graph, DeviceError>;

    /// Run a recorded graph on the compute stream, with the arguments it was recorded with.
    ///
    /// # Safety
    /// As [`DeviceLayer::launch_raw`] for every recorded launch: the allocations it recorded must
    /// still be live (the emulated device checks and refuses a graph naming freed memory), and
    /// the indices held in device memory in range at the time of the replay.
    unsafe fn replay(&self, graph: &Self::Graph) -> Result<(), DeviceError>;

    /// `C = alpha * op(A) * op(B) + beta * C` on the compute stream, under cuBLAS's contract
    /// (bf16 A and B, f32 C and accumulation); refused, as cuBLAS refuses it, when
    /// [`GemmBf16::check`] fails.
    ///
    /// # Safety
    /// The slices must name live memory of this device.
    unsafe fn gemm_bf16(&self, gemm: &GemmBf16) -> Result<(), DeviceError>;

    /// Wait for every launch and copy issued so far, on both streams.
    fn synchronize(&self) -> Result<(), DeviceError>;

    /// Allocate and fill a buffer with `data`.
    fn upload<T: DeviceScalar>(&self, data: &[T]) -> Result<Self::Buffer, DeviceError> {
        let mut buf = self.alloc(std::mem::size_of_val(data).max(1))?;
        self.write(&mut buf, 0, as_bytes(data))?;
        Ok(buf)
    }

    /// Read a whole buffer as `T`s (its size rounded down to whole values).
    fn download<T: DeviceScalar>(&self, src: &Self::Buffer) -> Result<Vec<T>, DeviceError> {
        let n = src.slice().bytes / std::mem::size_of::<T>();
        let mut out = vec![T::default(); n];
        self.read(src, 0, as_bytes_mut(&mut out))?;
        Ok(out)
    }
}

/// Check a contract and launch it on the compute stream.
///
/// # Safety
/// As [`DeviceLayer::launch_raw`]: the slices must name live memory of `device`, and the
/// indices the kernel reads from device memory must be in range.
pub unsafe fn launch<D: DeviceLayer + ?Sized, K: super::launch::KernelLaunch>(
    device: &D,
    kernel: &K,
) -> Result<(), DeviceError> {
    // SAFETY: the caller's promise, passed on.
    unsafe { launch_on(device, Stream::Compute, kernel) }
}

/// Check a contract and launch it on `stream`.
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_on<D: DeviceLayer + ?Sized, K: super::launch::KernelLaunch>(
    device: &D,
    stream: Stream,
    kernel: &K,
) -> Result<(), DeviceError> {
    let config = kernel.config().map_err(|problem| DeviceError::Contract {
        kernel: K::NAME,
        problem,
    })?;
    let args = kernel.args();
    // SAFETY: the caller's promise, with the sizes the contract could derive checked above.
    unsafe { device.launch_raw(stream, K::NAME, &config, &args) }
}
