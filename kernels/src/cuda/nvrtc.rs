//! Compilation of the kernel sources to PTX by NVRTC, through cudarc with the library loaded at
//! run time, so nothing of CUDA is needed to build convoy and a machine without NVRTC gets a
//! clear error instead of a panic (the library is probed before cudarc touches it).
//!
//! The library is looked up by cudarc among `libnvrtc.so`, `libnvrtc.so.13` and its other
//! names on the loader's path (`LD_LIBRARY_PATH`; the test script points it at the
//! `nvidia-cuda-nvrtc` wheel).

/// Why compilation could not happen or failed.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    /// No NVRTC library could be loaded.
    #[error("NVRTC not found on the loader's path; install the nvidia-cuda-nvrtc wheel and add its lib directory to LD_LIBRARY_PATH")]
    NotFound,
    /// NVRTC reported an error; the log explains it.
    #[error("NVRTC {call} failed: {log}")]
    Failed {
        /// The step that failed.
        call: &'static str,
        /// The program log, or NVRTC's error.
        log: String,
    },
}

/// Whether an NVRTC library can be loaded here.
pub fn available() -> bool {
    // SAFETY: the probe only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32), NvrtcError> {
    if !available() {
        return Err(NvrtcError::NotFound);
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is present (probed above); two valid out-pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(NvrtcError::Failed {
            call: "nvrtcVersion",
            log: format!("{r:?}"),
        });
    }
    Ok((a, b))
}

/// Compile CUDA C `source` to PTX for `arch` (`compute_90`, `sm_90`). No global fast-math:
/// kernels ask for the fast intrinsics (`__expf`) where they mean them.
pub fn compile_ptx(source: &str, name: &str, arch: &str) -> Result<String, NvrtcError> {
    if !available() {
        return Err(NvrtcError::NotFound);
    }
    if source.contains('\0') || name.contains('\0') {
        return Err(NvrtcError::Failed {
            call: "source",
            log: "a NUL byte in the source or its name".into(),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        name: Some(name.to_string()),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(NvrtcError::Failed {
            call: "nvrtcCompileProgram",
            log: log.to_string_lossy().into_owned(),
        }),
        Err(other) => Err(NvrtcError::Failed {
            call: "nvrtc",
            log: other.to_string(),
        }),
    }
}
