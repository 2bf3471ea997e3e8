//! Every CUDA kernel source compiles to PTX through NVRTC for Hopper (sm_90), and defines the
//! kernels the backend will launch. Skipped, saying so, where no NVRTC library is present;
//! with `CONVOY_REQUIRE_NVRTC=1` (set by the test script after installing the wheel) a missing
//! NVRTC is a failure instead, so a syntax error in a kernel never lands.

use convoy_kernels::cuda::{full_source, nvrtc, SOURCES};

#[test]
fn every_kernel_compiles_to_ptx() {
    if !nvrtc::available() {
        assert!(
            std::env::var("CONVOY_REQUIRE_NVRTC").is_err(),
            "CONVOY_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
        );
        eprintln!(
            "skipped: no NVRTC library here (install nvidia-cuda-nvrtc and add its lib directory to LD_LIBRARY_PATH)"
        );
        return;
    }
    eprintln!("NVRTC {:?}", nvrtc::version().unwrap());
    for src in SOURCES {
        let ptx = nvrtc::compile_ptx(&full_source(src), src.name, "compute_90")
            .unwrap_or_else(|e| panic!("{}: {e}", src.name));
        for k in src.kernels {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{}: kernel {k} missing from the PTX",
                src.name
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_reported_with_its_log() {
    if !nvrtc::available() {
        eprintln!("skipped: no NVRTC library here");
        return;
    }
    let err = nvrtc::compile_ptx(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "broken.cu",
        "compute_90",
    )
    .unwrap_err();
    assert!(err.to_string().contains("undefined_thing"), "{err}");
}
