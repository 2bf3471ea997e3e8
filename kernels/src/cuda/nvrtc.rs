//! A minimal NVRTC binding loaded at run time with `dlopen`, so nothing of CUDA is needed to
//! build convoy, and a machine without NVRTC gets a clear error instead of a panic.
//!
//! The library is looked up as `$CONVOY_NVRTC_LIB` if set, else `libnvrtc.so.13`,
//! `libnvrtc.so.12`, `libnvrtc.so` on the loader's path.
//!
//! Trust boundary: the functions are called with the C signatures of nvrtc.h (CUDA 12 and 13),
//! which nothing at run time can verify; a library under one of those names (or named by
//! `CONVOY_NVRTC_LIB`) must be NVRTC. Handles are never closed, so the function pointers stay
//! valid for the life of the process. Texts NVRTC returns are read from buffers of the size it
//! reported, up to the first NUL or the end of the buffer, whichever comes first.

use std::ffi::{c_char, c_int, c_void, CString};

/// Why compilation could not happen or failed.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    /// No NVRTC library could be loaded.
    #[error(
        "NVRTC not found (tried {0}); install the nvidia-cuda-nvrtc wheel or set CONVOY_NVRTC_LIB"
    )]
    NotFound(String),
    /// A symbol is missing from the library.
    #[error("NVRTC lacks {0}")]
    MissingSymbol(&'static str),
    /// NVRTC reported an error; the log explains it.
    #[error("NVRTC {call} failed with code {code}: {log}")]
    Failed {
        /// The call.
        call: &'static str,
        /// nvrtcResult.
        code: c_int,
        /// The program log, if any.
        log: String,
    },
}

type Program = *mut c_void;

type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type TextFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

struct Api {
    create: CreateFn,
    compile: CompileFn,
    ptx_size: SizeFn,
    ptx: TextFn,
    log_size: SizeFn,
    log: TextFn,
    destroy: DestroyFn,
    version: VersionFn,
}

fn candidates() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("CONVOY_NVRTC_LIB") {
        v.push(p);
    }
    v.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    v
}

fn load() -> Result<Api, NvrtcError> {
    let tried = candidates();
    let mut handle = std::ptr::null_mut();
    for name in &tried {
        let Ok(c) = CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: dlopen with a valid C string; a null result is handled below.
        handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
    }
    if handle.is_null() {
        return Err(NvrtcError::NotFound(tried.join(", ")));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr() as *const c_char) };
            if p.is_null() {
                return Err(NvrtcError::MissingSymbol($name));
            }
            // SAFETY: the symbol is NVRTC's function of this name, whose C signature `$ty`
            // spells out (nvrtc.h, CUDA 12 and 13).
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Ok(Api {
        create: sym!("nvrtcCreateProgram", CreateFn),
        compile: sym!("nvrtcCompileProgram", CompileFn),
        ptx_size: sym!("nvrtcGetPTXSize", SizeFn),
        ptx: sym!("nvrtcGetPTX", TextFn),
        log_size: sym!("nvrtcGetProgramLogSize", SizeFn),
        log: sym!("nvrtcGetProgramLog", TextFn),
        destroy: sym!("nvrtcDestroyProgram", DestroyFn),
        version: sym!("nvrtcVersion", VersionFn),
    })
}

/// Whether an NVRTC library can be loaded here.
pub fn available() -> bool {
    load().is_ok()
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32), NvrtcError> {
    let api = load()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: two valid out-pointers.
    let r = unsafe { (api.version)(&mut a, &mut b) };
    if r != 0 {
        return Err(NvrtcError::Failed {
            call: "nvrtcVersion",
            code: r,
            log: String::new(),
        });
    }
    Ok((a, b))
}

/// Compile CUDA C `source` to PTX for `arch` (e.g. `compute_90`).
pub fn compile_ptx(source: &str, name: &str, arch: &str) -> Result<String, NvrtcError> {
    let api = load()?;
    let src = CString::new(source).map_err(|_| NvrtcError::Failed {
        call: "source",
        code: -1,
        log: "NUL in source".into(),
    })?;
    let cname = CString::new(name).map_err(|_| NvrtcError::Failed {
        call: "name",
        code: -1,
        log: "NUL in name".into(),
    })?;
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: valid pointers; zero headers.
    let r = unsafe {
        (api.create)(
            &mut prog,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(NvrtcError::Failed {
            call: "nvrtcCreateProgram",
            code: r,
            log: String::new(),
        });
    }
    let opts: Vec<CString> = [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
        .into_iter()
        .filter_map(|o| CString::new(o).ok())
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `prog` was created above; the option array outlives the call.
    let r = unsafe { (api.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let result = if r != 0 {
        Err(NvrtcError::Failed {
            call: "nvrtcCompileProgram",
            code: r,
            log: program_text(prog, api.log_size, api.log),
        })
    } else {
        Ok(program_text(prog, api.ptx_size, api.ptx))
    };
    // SAFETY: destroys the program created above, once.
    unsafe { (api.destroy)(&mut prog) };
    result
}

/// A live program's log or PTX: `size` reports its bytes (final NUL included), `text` writes
/// them. Empty if NVRTC reports an error.
fn program_text(prog: Program, size: SizeFn, text: TextFn) -> String {
    let mut n = 0usize;
    // SAFETY: `prog` is a live program (created and not yet destroyed by `compile_ptx`) and
    // `n` a valid out-pointer, as nvrtcGet*Size takes them.
    if unsafe { size(prog, &mut n) } != 0 || n == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; n];
    // SAFETY: the same live program; NVRTC writes the `n` bytes it just reported, and `buf`
    // holds `n` bytes.
    if unsafe { text(prog, buf.as_mut_ptr() as *mut c_char) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
