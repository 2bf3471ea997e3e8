//! The driver-backed [`DeviceLayer`]: a GPU through cudarc (driver API, NVRTC, cuBLAS), every
//! library loaded at run time and probed before cudarc touches it, so a machine without a
//! driver, a GPU or the libraries gets a [`DriverUnavailable`] error, never a panic.
//!
//! Memory is allocated synchronously and filled with `0xFF` bytes, as on the emulated device.
//! Two non-blocking streams: compute (launches, cuBLAS, graph capture and replay) and copy
//! (host-tier copies). Fills, writes and reads go on the compute stream (never the legacy
//! default stream, which non-blocking streams do not wait for) and return once it has run them,
//! so they are ordered after the compute work before them and before every later launch. cuBLAS gets a workspace of
//! its own, so a captured GEMM allocates nothing. The kernels are compiled by NVRTC for the
//! card's architecture when the device opens.
//!
//! Status: built and linked everywhere; it has not yet run on a GPU (no device was lent to
//! the runs that built it). `bench/gpu/check.sh` exercises it on a card.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::cublas::sys as blas;
use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream,
};

use super::device::{
    check_range, DeviceError, DeviceLayer, DeviceMemory, DeviceSlice, FaultKind, Stream,
};
use super::gemm::GemmBf16;
use super::launch::{KernelArg, LaunchConfig};
use super::{full_source, nvrtc, SOURCES};

/// Why the GPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DriverUnavailable {
    /// A CUDA library is not on the loader's path.
    #[error("{library} not found on the loader's path (no NVIDIA driver or CUDA libraries here)")]
    Library {
        /// The library (`libcuda`, `libnvrtc`, `libcublas`).
        library: &'static str,
    },
    /// The driver reports no GPU at that ordinal.
    #[error("the driver sees {count} GPUs, none at ordinal {ordinal}")]
    NoGpu {
        /// Ordinal asked for.
        ordinal: usize,
        /// GPUs present.
        count: i32,
    },
    /// A driver, NVRTC or cuBLAS call failed while opening the device.
    #[error("opening the GPU: {step}: {message}")]
    Open {
        /// What was being done.
        step: &'static str,
        /// The library's error.
        message: String,
    },
}

/// Check, without creating a context, that the libraries load and GPU `ordinal` exists.
pub fn probe(ordinal: usize) -> Result<(), DriverUnavailable> {
    // SAFETY: the probe only tries to open the library by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DriverUnavailable::Library { library: "libcuda" });
    }
    if !nvrtc::available() {
        return Err(DriverUnavailable::Library {
            library: "libnvrtc",
        });
    }
    // SAFETY: the probe only tries to open the library by its candidate names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(DriverUnavailable::Library {
            library: "libcublas",
        });
    }
    result::init().map_err(|e| open_err("cuInit")(e.to_string()))?;
    let count =
        result::device::get_count().map_err(|e| open_err("cuDeviceGetCount")(e.to_string()))?;
    if ordinal >= count.max(0) as usize {
        return Err(DriverUnavailable::NoGpu { ordinal, count });
    }
    Ok(())
}

/// Whether a driver, the libraries and at least one GPU are present.
pub fn gpu_present() -> bool {
    probe(0).is_ok()
}

/// Bytes of cuBLAS's own workspace (cuBLAS asks for up to 32 MiB on Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// A GPU: its context, streams, cuBLAS handle and the kernels compiled for it.
pub struct CudaDriverDevice {
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    capturing: AtomicBool,
    blas: cudarc::cublas::CudaBlas,
    _blas_workspace: DriverBuffer,
    /// Each kernel and the dynamic shared memory a launch of it may ask for.
    functions: HashMap<&'static str, (CudaFunction, u32)>,
    _modules: Vec<Arc<CudaModule>>,
    arch: String,
}

fn open_err(step: &'static str) -> impl Fn(String) -> DriverUnavailable {
    move |message| DriverUnavailable::Open { step, message }
}

impl CudaDriverDevice {
    /// Open GPU `ordinal`: probe the libraries, create the context, compile every kernel with
    /// NVRTC for the card's architecture, create the cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<CudaDriverDevice, DriverUnavailable> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| open_err("context")(e.to_string()))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| open_err("compute capability")(e.to_string()))?;
        let arch = format!("sm_{major}{minor}");
        let compute = ctx
            .new_stream()
            .map_err(|e| open_err("cuStreamCreate")(e.to_string()))?;
        let copy = ctx
            .new_stream()
            .map_err(|e| open_err("cuStreamCreate")(e.to_string()))?;
        // Kernels may take dynamic shared memory up to the card's opt-in limit (above the
        // default 48 KB: attention for an MQA group of 32), less their static shared memory.
        let optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| open_err("cuDeviceGetAttribute")(e.to_string()))?;
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for src in SOURCES {
            let ptx = nvrtc::compile_ptx(&full_source(src), src.name, &arch)
                .map_err(|e| open_err("NVRTC")(e.to_string()))?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| open_err("cuModuleLoadData")(format!("{}: {e}", src.name)))?;
            for &k in src.kernels {
                let f = module
                    .load_function(k)
                    .map_err(|e| open_err("cuModuleGetFunction")(format!("{k}: {e}")))?;
                let attr = |e: cudarc::driver::DriverError| {
                    open_err("cuFuncSetAttribute")(format!("{k}: {e}"))
                };
                let fixed = f
                    .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                    .map_err(attr)?;
                let dynamic = (optin - fixed).max(0);
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic,
                )
                .map_err(attr)?;
                functions.insert(k, (f, dynamic as u32));
            }
            modules.push(module);
        }
        let blas = cudarc::cublas::CudaBlas::new(compute.clone())
            .map_err(|e| open_err("cuBLAS")(e.to_string()))?;
        // SAFETY: the context is bound (the streams were just made in it); the size is non-zero.
        let ws = unsafe { result::malloc_sync(CUBLAS_WORKSPACE_BYTES) }
            .map_err(|e| open_err("cuMemAlloc")(e.to_string()))?;
        let workspace = DriverBuffer {
            ptr: ws,
            bytes: CUBLAS_WORKSPACE_BYTES,
            host: std::ptr::null_mut(),
            ctx: ctx.clone(),
        };
        // SAFETY: the handle is live; the workspace is a device allocation of the given size
        // that outlives the handle (both are fields of the device, the workspace dropped after).
        let status = unsafe {
            blas::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, CUBLAS_WORKSPACE_BYTES)
        };
        if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(open_err("cublasSetWorkspace")(format!("{status:?}")));
        }
        Ok(CudaDriverDevice {
            ctx,
            compute,
            copy,
            capturing: AtomicBool::new(false),
            blas,
            _blas_workspace: workspace,
            functions,
            _modules: modules,
            arch,
        })
    }

    /// The architecture the kernels were compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx.bind_to_thread().map_err(driver_fault)
    }

    /// Fill `bytes` bytes at `ptr` with `0xFF` on the compute stream, and wait for it.
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of one live allocation of this context.
    unsafe fn fill(&self, ptr: sys::CUdeviceptr, bytes: usize) -> Result<(), DeviceError> {
        // SAFETY: the caller's promise.
        unsafe { result::memset_d8_async(ptr, 0xFF, bytes, self.compute.cu_stream()) }
            .map_err(driver_fault)?;
        self.compute.synchronize().map_err(driver_fault)
    }

    fn stream(&self, stream: Stream) -> &Arc<CudaStream> {
        match stream {
            Stream::Compute => &self.compute,
            Stream::Copy => &self.copy,
        }
    }

    /// Refuse `operation` while the compute stream is captured (the emulator's rule, so the
    /// backend cannot rely on what only one of them allows).
    fn not_capturing(&self, operation: &'static str) -> Result<(), DeviceError> {
        if self.capturing.load(Ordering::Acquire) {
            return Err(DeviceError::Capture {
                operation,
                problem: "not allowed while the compute stream is captured into a graph",
            });
        }
        Ok(())
    }
}

/// A CUDA event of this device.
pub struct DriverEvent(CudaEvent);

/// An instantiated CUDA graph.
pub struct DriverGraph(CudaGraph);

// SAFETY: a graph is used by one thread at a time (the engine thread that owns the backend
// holding it); CUDA requires only that calls on one graph are not concurrent, which `&`/`&mut`
// access through its single owner guarantees.
unsafe impl Send for DriverGraph {}

fn driver_fault(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Fault {
        kind: FaultKind::Other(-1),
        message: e.to_string(),
    }
}

/// An allocation of GPU memory (or of pinned, mapped host memory), freed when dropped.
pub struct DriverBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    /// The host address of a pinned allocation; null for device memory.
    host: *mut c_void,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer owns its allocation exclusively (the host pointer is never dereferenced
// on the host, only freed); the context is thread-safe.
unsafe impl Send for DriverBuffer {}

impl DeviceMemory for DriverBuffer {
    fn slice(&self) -> DeviceSlice {
        DeviceSlice {
            ptr: self.ptr,
            bytes: self.bytes,
        }
    }
}

impl Drop for DriverBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            if self.host.is_null() {
                // SAFETY: the pointer came from `malloc_sync` in this context and is freed once.
                let _ = unsafe { result::free_sync(self.ptr) };
            } else {
                // SAFETY: the pointer came from `malloc_host` in this context and is freed once.
                let _ = unsafe { result::free_host(self.host) };
            }
        }
    }
}

impl DeviceLayer for CudaDriverDevice {
    type Buffer = DriverBuffer;
    type Event = DriverEvent;
    type Graph = DriverGraph;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, bytes: usize) -> Result<DriverBuffer, DeviceError> {
        self.not_capturing("alloc")?;
        let bytes = bytes.max(1);
        self.bind()?;
        // SAFETY: the context is bound to this thread; the size is non-zero.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|_| DeviceError::OutOfMemory { bytes })?;
        let buf = DriverBuffer {
            ptr,
            bytes,
            host: std::ptr::null_mut(),
            ctx: self.ctx.clone(),
        };
        // SAFETY: the allocation just made holds `bytes` bytes.
        unsafe { self.fill(ptr, bytes) }?;
        Ok(buf)
    }

    fn tensor_cores(&self) -> bool {
        // "sm_80" and later.
        self.arch
            .strip_prefix("sm_")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|v| v >= 80)
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        result::mem_get_info().ok()
    }

    fn runs_apart(&self) -> bool {
        true
    }

    fn alloc_host(&self, bytes: usize) -> Result<DriverBuffer, DeviceError> {
        self.not_capturing("alloc_host")?;
        let bytes = bytes.max(1);
        self.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is bound to this thread; the size is non-zero.
        let host = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|_| DeviceError::OutOfMemory { bytes })?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live mapped pinned allocation; `ptr` is a valid out-pointer.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut ptr, host, 0) };
        let buf = DriverBuffer {
            ptr,
            bytes,
            host,
            ctx: self.ctx.clone(),
        };
        if mapped != sys::CUresult::CUDA_SUCCESS {
            return Err(driver_fault(format!(
                "cuMemHostGetDevicePointer: {mapped:?}"
            )));
        }
        // SAFETY: the mapping holds `bytes` bytes, addressed by the device pointer.
        unsafe { self.fill(ptr, bytes) }?;
        Ok(buf)
    }

    fn write(&self, dst: &mut DriverBuffer, offset: usize, src: &[u8]) -> Result<(), DeviceError> {
        self.not_capturing("write")?;
        check_range(offset, src.len(), dst.bytes)?;
        self.bind()?;
        // SAFETY: the destination range lies inside the allocation (checked above); `src`
        // outlives the copy, which has run when the stream synchronises below.
        unsafe {
            result::memcpy_htod_async(dst.ptr + offset as u64, src, self.compute.cu_stream())
        }
        .map_err(driver_fault)?;
        self.compute.synchronize().map_err(driver_fault)
    }

    fn read(&self, src: &DriverBuffer, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.not_capturing("read")?;
        check_range(offset, dst.len(), src.bytes)?;
        self.bind()?;
        // SAFETY: the source range lies inside the allocation (checked above); `dst` outlives
        // the copy, which has run when the stream synchronises below.
        unsafe {
            result::memcpy_dtoh_async(dst, src.ptr + offset as u64, self.compute.cu_stream())
        }
        .map_err(driver_fault)?;
        self.compute.synchronize().map_err(driver_fault)
    }

    unsafe fn launch_raw(
        &self,
        stream: Stream,
        name: &'static str,
        config: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        let (f, max_shared) = self.functions.get(name).ok_or_else(|| DeviceError::Fault {
            kind: FaultKind::UnknownKernel,
            message: format!("no kernel named {name}"),
        })?;
        if config.shared_bytes > *max_shared {
            return Err(DeviceError::Fault {
                kind: FaultKind::LaunchConfig,
                message: format!(
                    "{name}: {} bytes of dynamic shared memory, above the {max_shared} this card allows it",
                    config.shared_bytes
                ),
            });
        }
        self.bind()?;
        let mut values: Vec<[u8; 8]> = args.iter().map(|a| a.bytes().0).collect();
        let mut params: Vec<*mut c_void> =
            values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let g = config.grid;
        let b = config.block;
        // SAFETY: `f` is a kernel of this context's modules; `params` points at one value per
        // parameter, in order, each holding the parameter's C type (the launch contracts and
        // the emulator's signature checks keep them in step); the memory the pointers name is
        // the caller's promise.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (g[0], g[1], g[2]),
                (b[0], b[1], b[2]),
                config.shared_bytes,
                self.stream(stream).cu_stream(),
                &mut params,
            )
        }
        .map_err(driver_fault)
    }

    unsafe fn gemm_bf16(&self, g: &GemmBf16) -> Result<(), DeviceError> {
        g.check().map_err(|problem| DeviceError::Contract {
            kernel: "cublasGemmEx",
            problem,
        })?;
        self.bind()?;
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: `check` proved every element the GEMM touches lies inside the slices, which
        // the caller promises are live allocations of this device; alpha and beta are f32 on
        // the host, as CUBLAS_COMPUTE_32F with the default pointer mode reads them.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(g.transa),
                op(g.transb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                g.a.ptr as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                g.lda as i32,
                g.b.ptr as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                g.ldb as i32,
                (&beta as *const f32).cast(),
                g.c.ptr as *mut c_void,
                blas::cudaDataType::CUDA_R_32F,
                g.ldc as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(driver_fault)
    }

    fn record(&self, stream: Stream) -> Result<DriverEvent, DeviceError> {
        self.not_capturing("record")?;
        self.stream(stream)
            .record_event(None)
            .map(DriverEvent)
            .map_err(driver_fault)
    }

    fn wait(&self, stream: Stream, event: &DriverEvent) -> Result<(), DeviceError> {
        self.not_capturing("wait")?;
        self.stream(stream).wait(&event.0).map_err(driver_fault)
    }

    fn begin_capture(&self) -> Result<(), DeviceError> {
        if self.capturing.swap(true, Ordering::AcqRel) {
            return Err(DeviceError::Capture {
                operation: "begin_capture",
                problem: "the compute stream is already being captured",
            });
        }
        let begun = self
            .compute
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_fault);
        if begun.is_err() {
            self.capturing.store(false, Ordering::Release);
        }
        begun
    }

    fn end_capture(&self) -> Result<DriverGraph, DeviceError> {
        if !self.capturing.swap(false, Ordering::AcqRel) {
            return Err(DeviceError::Capture {
                operation: "end_capture",
                problem: "no capture was begun",
            });
        }
        let graph = self
            .compute
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(driver_fault)?;
        graph.map(DriverGraph).ok_or(DeviceError::Capture {
            operation: "end_capture",
            problem: "the capture recorded no graph",
        })
    }

    unsafe fn replay(&self, graph: &DriverGraph) -> Result<(), DeviceError> {
        self.not_capturing("replay")?;
        graph.0.launch().map_err(driver_fault)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.not_capturing("synchronize")?;
        self.bind()?;
        self.compute.synchronize().map_err(driver_fault)?;
        self.copy.synchronize().map_err(driver_fault)
    }
}
