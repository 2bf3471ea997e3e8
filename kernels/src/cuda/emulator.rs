//! The emulated CUDA device (`--device cuda-emulated`): a [`DeviceLayer`] whose memory is host
//! memory and whose kernels are convoy's `.cu` sources compiled for the host (kernels/build.rs),
//! run by the runtime of `emulator/runtime.cpp` with one fiber per CUDA thread, real barrier and
//! warp-shuffle semantics, and the checks a GPU does not report clearly. Slow and exact about
//! behaviour, not about speed.
//!
//! Memory: each allocation is its own mapping, its bytes set to 0xFF when allocated (NaN as f32
//! and as bf16, -1 as an integer: a read of memory nothing wrote shows), its end placed against
//! an inaccessible guard page, so a kernel reading or writing past an allocation's end stops
//! the process with a segmentation fault at once instead of corrupting a neighbour. Indexing
//! past a fixed-size array (`__shared__` or local) is a [`FaultKind::OutOfBounds`] of the launch.
//!
//! Streams: compute-stream work runs synchronously on the calling thread, blocks in order.
//! Copy-stream work is queued and runs as late as CUDA allows: when the compute stream waits
//! for an event recorded after it, or at [`DeviceLayer::synchronize`]. A missing wait of the
//! compute stream for the copy stream shows as stale or overwritten data, as it would on a GPU
//! where the copy lost the race, but every time; a missing wait of the copy stream for the
//! compute stream cannot show (compute work has run when it is issued).
//!
//! Graphs: while the compute stream is captured its launches and GEMMs are recorded, not run;
//! a replay runs the recorded launches with their recorded arguments. Every launch first checks
//! that each address it is given lies in a live allocation of the emulated device, and a replay
//! checks, before running anything, that each address still lies in the very allocation it did
//! when it was recorded (allocations are numbered, so one freed and made again at the same
//! address does not pass): a graph kept across a reallocation is refused
//! ([`DeviceError::Dangling`]).

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;

use parking_lot::Mutex;

use super::device::{
    check_range, DeviceError, DeviceLayer, DeviceMemory, DeviceSlice, FaultKind, Stream,
};
use super::gemm::GemmBf16;
use super::launch::{KernelArg, LaunchConfig};

/// Every live allocation of the emulated device (all instances share the host's memory):
/// start address to length and serial number.
static LIVE: Mutex<BTreeMap<u64, (usize, u64)>> = parking_lot::const_mutex(BTreeMap::new());
/// Serial number of the next allocation.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The serial number of the live allocation each non-null address lies in (or at the end of;
/// the guard page behind every allocation keeps that address out of any other); 0 for null.
fn owners(kernel: &'static str, ptrs: &[u64]) -> Result<Vec<u64>, DeviceError> {
    let live = LIVE.lock();
    ptrs.iter()
        .map(|&ptr| {
            if ptr == 0 {
                return Ok(0);
            }
            match live.range(..=ptr).next_back() {
                Some((&start, &(len, serial))) if ptr <= start + len as u64 => Ok(serial),
                _ => Err(DeviceError::Dangling { kernel, ptr }),
            }
        })
        .collect()
}

#[repr(C)]
struct EmuStatus {
    kind: c_int,
    message: [c_char; 480],
}

extern "C" {
    fn convoy_emu_kernel_count() -> usize;
    fn convoy_emu_kernel_name(i: usize) -> *const c_char;
    fn convoy_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
        arg_sizes: *const usize,
        nargs: usize,
        status: *mut EmuStatus,
    ) -> c_int;
}

/// The names of every kernel the emulator can launch.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the runtime's registry is built once and never changes; names are static
    // NUL-terminated strings and indices below the count are valid.
    unsafe {
        (0..convoy_emu_kernel_count())
            .map(|i| {
                CStr::from_ptr(convoy_emu_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// One unit of device work: a kernel launch or a GEMM, with its arguments by value.
#[derive(Clone, Debug)]
enum Op {
    Launch {
        name: &'static str,
        config: LaunchConfig,
        args: Vec<KernelArg>,
    },
    Gemm(GemmBf16),
}

impl Op {
    /// The kernel's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Op::Launch { name, .. } => name,
            Op::Gemm(_) => "cublasGemmEx",
        }
    }

    /// Every address the operation is given.
    fn ptrs(&self) -> Vec<u64> {
        match self {
            Op::Launch { args, .. } => args
                .iter()
                .filter_map(|a| match a {
                    KernelArg::Ptr(p) => Some(*p),
                    _ => None,
                })
                .collect(),
            Op::Gemm(g) => vec![g.a.ptr, g.b.ptr, g.c.ptr],
        }
    }

    /// The operation with the allocations its addresses lie in now, for a graph.
    fn record(self) -> Result<(Op, Vec<u64>), DeviceError> {
        let serials = owners(self.name(), &self.ptrs())?;
        Ok((self, serials))
    }
}

/// Work not yet run: the copy stream's queue and the graph being captured.
#[derive(Debug, Default)]
struct Queues {
    /// Copy-stream work issued and not yet run, oldest first, with its issue number.
    copy: VecDeque<(u64, Op)>,
    /// Copy-stream operations issued so far.
    copy_issued: u64,
    /// The compute stream's recording, while it is captured: each operation with the serial
    /// numbers of the allocations its addresses lay in.
    capture: Option<Vec<(Op, Vec<u64>)>>,
    /// Compute work (launches, GEMMs, replays) issued that nothing has waited for yet.
    compute_pending: bool,
    /// Times the host waited for compute work it had issued (see [`EmulatedDevice::host_waits`]).
    host_waits: u64,
}

/// The emulated device. Clones share its streams.
#[derive(Debug, Default, Clone)]
pub struct EmulatedDevice {
    queues: Arc<Mutex<Queues>>,
    /// Reports no tensor cores (as a card before sm_80), so the backend takes its fallbacks.
    no_tensor_cores: bool,
}

/// A point in one stream of the emulated device.
#[derive(Clone, Copy, Debug)]
pub struct EmulatedEvent {
    stream: Stream,
    /// Copy-stream operations issued before it (for the copy stream).
    issued: u64,
}

/// A graph of the emulated device: the recorded launches and GEMMs.
#[derive(Debug)]
pub struct EmulatedGraph {
    ops: Vec<(Op, Vec<u64>)>,
}

impl EmulatedGraph {
    /// Launches and GEMMs recorded.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl EmulatedDevice {
    /// A new emulated device.
    pub fn new() -> EmulatedDevice {
        EmulatedDevice::default()
    }

    /// A new emulated device that reports no tensor cores, as a card before sm_80 would: the
    /// CUDA backend then runs attention on its CUDA-core kernel.
    pub fn without_tensor_cores() -> EmulatedDevice {
        EmulatedDevice {
            no_tensor_cores: true,
            ..EmulatedDevice::default()
        }
    }

    /// Refuse `operation` while the compute stream is captured.
    fn not_capturing(&self, operation: &'static str) -> Result<(), DeviceError> {
        if self.queues.lock().capture.is_some() {
            return Err(DeviceError::Capture {
                operation,
                problem: "not allowed while the compute stream is captured into a graph",
            });
        }
        Ok(())
    }

    /// Run queued copy-stream work issued before `issued` operations (all of it for `None`).
    /// A fault ends the run and discards the rest of that work, as a fault leaves a CUDA
    /// context unusable.
    fn drain_copies(&self, issued: Option<u64>) -> Result<(), DeviceError> {
        let ready: Vec<Op> = {
            let mut q = self.queues.lock();
            let mut ready = Vec::new();
            while q
                .copy
                .front()
                .is_some_and(|(n, _)| issued.is_none_or(|i| *n < i))
            {
                ready.push(q.copy.pop_front().expect("a queued operation").1);
            }
            ready
        };
        for op in &ready {
            // SAFETY: queued by `launch_raw`, whose caller promised the memory and indices.
            unsafe { execute(op) }?;
        }
        Ok(())
    }

    /// Copy-stream operations issued and not yet run.
    pub fn queued_copies(&self) -> usize {
        self.queues.lock().copy.len()
    }

    /// Times the host waited for compute work it had issued: a write, a read or a
    /// synchronisation after launches, GEMMs or graph replays nothing had waited for yet. The
    /// emulator computes as work is issued, but the driver layer's `write`, `read` and
    /// `synchronize` wait for the compute stream to drain, so each of these is where a GPU
    /// stops the host until the work before it is done.
    pub fn host_waits(&self) -> u64 {
        self.queues.lock().host_waits
    }

    /// Note compute work issued (not captured).
    fn issued_compute(&self) {
        self.queues.lock().compute_pending = true;
    }

    /// Note that the host waits here for the compute stream, as the driver layer does.
    fn host_waits_for_compute(&self) {
        let mut q = self.queues.lock();
        if std::mem::take(&mut q.compute_pending) {
            q.host_waits += 1;
        }
    }
}

/// Run one operation now.
///
/// # Safety
/// As [`DeviceLayer::launch_raw`] and [`DeviceLayer::gemm_bf16`].
unsafe fn execute(op: &Op) -> Result<(), DeviceError> {
    match op {
        Op::Launch { name, config, args } => {
            owners(name, &op.ptrs())?;
            // SAFETY: the caller's promise; every address is in a live allocation.
            unsafe { launch_now(name, config, args) }
        }
        Op::Gemm(g) => {
            g.check().map_err(|problem| DeviceError::Contract {
                kernel: "cublasGemmEx",
                problem,
            })?;
            owners("cublasGemmEx", &op.ptrs())?;
            // SAFETY: the caller promises the slices are live allocations of this device
            // (host memory here); `check` proved every element the GEMM touches lies inside
            // them.
            unsafe { reference_gemm(g) };
            Ok(())
        }
    }
}

/// An allocation of the emulated device: its own mapping, ending at a guard page.
#[derive(Debug)]
pub struct EmulatedBuffer {
    map: *mut u8,
    map_len: usize,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer owns its mapping exclusively; moving it between threads moves that
// ownership.
unsafe impl Send for EmulatedBuffer {}

impl EmulatedBuffer {
    fn new(bytes: usize) -> Result<EmulatedBuffer, DeviceError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let oom = DeviceError::OutOfMemory { bytes };
        let data_pages = bytes
            .checked_add(page - 1)
            .ok_or(DeviceError::OutOfMemory { bytes })?
            / page;
        let map_len = (data_pages + 1) * page;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(oom);
        }
        let map = map.cast::<u8>();
        let guard = data_pages * page;
        // SAFETY: the last page lies inside the mapping just made.
        if unsafe { libc::mprotect(map.add(guard).cast(), page, libc::PROT_NONE) } != 0 {
            // SAFETY: unmapping the mapping made above, once.
            unsafe { libc::munmap(map.cast(), map_len) };
            return Err(oom);
        }
        // The data ends at the guard page; its start keeps 16-byte alignment, so up to 15
        // bytes between the end and the guard are not caught.
        let start = (guard - bytes) & !15;
        // SAFETY: `start + bytes <= guard`, inside the readable part of the mapping.
        let ptr = unsafe { map.add(start) };
        // SAFETY: `bytes` bytes from `ptr` lie in the mapping's readable part.
        unsafe { std::ptr::write_bytes(ptr, 0xFF, bytes) };
        let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LIVE.lock().insert(ptr as u64, (bytes, serial));
        Ok(EmulatedBuffer {
            map,
            map_len,
            ptr,
            bytes,
        })
    }
}

impl Drop for EmulatedBuffer {
    fn drop(&mut self) {
        LIVE.lock().remove(&(self.ptr as u64));
        // SAFETY: the mapping was made by `new` and is unmapped once, here.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

impl DeviceMemory for EmulatedBuffer {
    fn slice(&self) -> DeviceSlice {
        DeviceSlice {
            ptr: self.ptr as u64,
            bytes: self.bytes,
        }
    }
}

impl DeviceLayer for EmulatedDevice {
    type Buffer = EmulatedBuffer;
    type Event = EmulatedEvent;
    type Graph = EmulatedGraph;

    fn name(&self) -> &'static str {
        "cuda-emulated"
    }

    fn tensor_cores(&self) -> bool {
        !self.no_tensor_cores
    }

    fn alloc(&self, bytes: usize) -> Result<EmulatedBuffer, DeviceError> {
        self.not_capturing("alloc")?;
        EmulatedBuffer::new(bytes.max(1))
    }

    fn write(
        &self,
        dst: &mut EmulatedBuffer,
        offset: usize,
        src: &[u8],
    ) -> Result<(), DeviceError> {
        self.not_capturing("write")?;
        check_range(offset, src.len(), dst.bytes)?;
        self.host_waits_for_compute();
        // SAFETY: the range was checked to lie inside the allocation, which `dst` borrows
        // mutably; `src` is a distinct host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr.add(offset), src.len()) };
        Ok(())
    }

    fn read(&self, src: &EmulatedBuffer, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.not_capturing("read")?;
        check_range(offset, dst.len(), src.bytes)?;
        self.host_waits_for_compute();
        // SAFETY: the range was checked to lie inside the allocation; `dst` is a distinct
        // host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn launch_raw(
        &self,
        stream: Stream,
        name: &'static str,
        config: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        let op = Op::Launch {
            name,
            config: *config,
            args: args.to_vec(),
        };
        {
            let mut q = self.queues.lock();
            match stream {
                Stream::Copy => {
                    let n = q.copy_issued;
                    q.copy.push_back((n, op));
                    q.copy_issued += 1;
                    return Ok(());
                }
                Stream::Compute => {
                    if let Some(rec) = q.capture.as_mut() {
                        rec.push(op.record()?);
                        return Ok(());
                    }
                    q.compute_pending = true;
                }
            }
        }
        // SAFETY: the caller's promise, passed on.
        unsafe { execute(&op) }
    }

    unsafe fn gemm_bf16(&self, g: &GemmBf16) -> Result<(), DeviceError> {
        g.check().map_err(|problem| DeviceError::Contract {
            kernel: "cublasGemmEx",
            problem,
        })?;
        if let Some(rec) = self.queues.lock().capture.as_mut() {
            rec.push(Op::Gemm(*g).record()?);
            return Ok(());
        }
        self.issued_compute();
        // SAFETY: the caller's promise, passed on.
        unsafe { execute(&Op::Gemm(*g)) }
    }

    fn record(&self, stream: Stream) -> Result<EmulatedEvent, DeviceError> {
        self.not_capturing("record")?;
        Ok(EmulatedEvent {
            stream,
            issued: self.queues.lock().copy_issued,
        })
    }

    fn wait(&self, stream: Stream, event: &EmulatedEvent) -> Result<(), DeviceError> {
        self.not_capturing("wait")?;
        // Compute-stream work has run when it was issued, and copy-stream work runs in issue
        // order: only the compute stream waiting for the copy stream has work to run.
        if stream == Stream::Compute && event.stream == Stream::Copy {
            self.drain_copies(Some(event.issued))?;
        }
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), DeviceError> {
        let mut q = self.queues.lock();
        if q.capture.is_some() {
            return Err(DeviceError::Capture {
                operation: "begin_capture",
                problem: "the compute stream is already being captured",
            });
        }
        q.capture = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<EmulatedGraph, DeviceError> {
        match self.queues.lock().capture.take() {
            Some(ops) => Ok(EmulatedGraph { ops }),
            None => Err(DeviceError::Capture {
                operation: "end_capture",
                problem: "no capture was begun",
            }),
        }
    }

    unsafe fn replay(&self, graph: &EmulatedGraph) -> Result<(), DeviceError> {
        self.not_capturing("replay")?;
        self.issued_compute();
        // Every address must still lie in the allocation it lay in when it was recorded;
        // checked for the whole graph before any of it runs.
        for (op, serials) in &graph.ops {
            let ptrs = op.ptrs();
            let now = owners(op.name(), &ptrs)?;
            if let Some(i) = (0..ptrs.len()).find(|&i| now[i] != serials[i]) {
                return Err(DeviceError::Dangling {
                    kernel: op.name(),
                    ptr: ptrs[i],
                });
            }
        }
        for (op, _) in &graph.ops {
            // SAFETY: the caller's promise for the recorded launches, whose allocations were
            // just checked to be the ones they were recorded with.
            unsafe { execute(op) }?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.not_capturing("synchronize")?;
        self.host_waits_for_compute();
        self.drain_copies(None)
    }
}

/// Launch a kernel through the runtime now, on the calling thread.
///
/// # Safety
/// As [`DeviceLayer::launch_raw`].
unsafe fn launch_now(
    name: &'static str,
    config: &LaunchConfig,
    args: &[KernelArg],
) -> Result<(), DeviceError> {
    let mut values: Vec<[u8; 8]> = Vec::with_capacity(args.len());
    let mut sizes: Vec<usize> = Vec::with_capacity(args.len());
    for a in args {
        let (bytes, n) = a.bytes();
        values.push(bytes);
        sizes.push(n);
    }
    let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
    let cname = CString::new(name).map_err(|_| DeviceError::Fault {
        kind: FaultKind::UnknownKernel,
        message: format!("kernel name {name:?} holds a NUL"),
    })?;
    let mut status = EmuStatus {
        kind: 0,
        message: [0; 480],
    };
    // SAFETY: every array outlives the call and has `args.len()` entries (grid and block
    // 3); each argument pointer addresses 8 bytes, of which the runtime reads the size
    // given, after checking it against the kernel's parameter. The memory the kernel
    // touches through pointer arguments is the caller's promise (this function's
    // `# Safety`).
    let code = unsafe {
        convoy_emu_launch(
            cname.as_ptr(),
            config.grid.as_ptr(),
            config.block.as_ptr(),
            config.shared_bytes,
            pointers.as_mut_ptr(),
            sizes.as_ptr(),
            args.len(),
            &mut status,
        )
    };
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the runtime writes a NUL-terminated message into the 480-byte buffer
    // (snprintf), and the buffer starts zeroed.
    let message = unsafe { CStr::from_ptr(status.message.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err(DeviceError::Fault {
        kind: FaultKind::from_code(code),
        message,
    })
}

/// The emulator's cuBLAS: f32 accumulation (eight interleaved partial sums over k, then
/// summed); op(B) widened to f32 once; each row of op(A) widened once and dotted with every
/// column; rows of C in chunks on the CPU kernels' thread pool.
///
/// # Safety
/// `g` passed [`GemmBf16::check`] and its slices are live host allocations; C does not
/// overlap A or B.
unsafe fn reference_gemm(g: &GemmBf16) {
    let (a, b, c) = (g.a.ptr as usize, g.b.ptr as usize, g.c.ptr as usize);
    let widen = |dst: &mut [f32], src: &[u16]| {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s as u32) << 16);
        }
    };
    // op(B) as n rows of k floats.
    let mut bt = vec![0f32; g.n * g.k];
    for j in 0..g.n {
        let row = &mut bt[j * g.k..(j + 1) * g.k];
        if g.transb {
            for (p, v) in row.iter_mut().enumerate() {
                // SAFETY: (j, p) of op(B) = B[j + p * ldb], inside B's checked span.
                *v =
                    f32::from_bits((unsafe { *(b as *const u16).add(j + p * g.ldb) } as u32) << 16);
            }
        } else {
            // SAFETY: column j of B is k contiguous values at j * ldb, inside B's checked span.
            let col = unsafe { std::slice::from_raw_parts((b as *const u16).add(j * g.ldb), g.k) };
            widen(row, col);
        }
    }
    let bt = &bt;
    const CHUNK: usize = 32;
    let body = move |chunk: usize| {
        let mut row = vec![0f32; g.k];
        for i in chunk * CHUNK..((chunk + 1) * CHUNK).min(g.m) {
            if g.transa {
                // SAFETY: row i of op(A) is column i of A: k contiguous values at i * lda,
                // inside A's checked span.
                let src =
                    unsafe { std::slice::from_raw_parts((a as *const u16).add(i * g.lda), g.k) };
                widen(&mut row, src);
            } else {
                for (p, v) in row.iter_mut().enumerate() {
                    // SAFETY: (i, p) of op(A) = A[i + p * lda], inside A's checked span.
                    *v = f32::from_bits(
                        (unsafe { *(a as *const u16).add(i + p * g.lda) } as u32) << 16,
                    );
                }
            }
            for j in 0..g.n {
                let col = &bt[j * g.k..(j + 1) * g.k];
                let mut acc = [0f32; 8];
                let (rc, rt) = row.split_at(g.k / 8 * 8);
                let (cc, ct) = col.split_at(g.k / 8 * 8);
                for (x8, y8) in rc.chunks_exact(8).zip(cc.chunks_exact(8)) {
                    for l in 0..8 {
                        acc[l] += x8[l] * y8[l];
                    }
                }
                for (l, (x, y)) in rt.iter().zip(ct).enumerate() {
                    acc[l] += x * y;
                }
                let dot = acc.iter().sum::<f32>();
                // SAFETY: (i, j) lies in C's checked span; each chunk writes its own rows of
                // C, so no two threads write one element, and C overlaps neither A nor B.
                unsafe {
                    let out = (c as *mut f32).add(i + j * g.ldc);
                    let old = if g.beta == 0.0 { 0.0 } else { g.beta * *out };
                    *out = g.alpha * dot + old;
                }
            }
        }
    };
    crate::cpu::pool::parallel_for(g.m.div_ceil(CHUNK), &body);
}
