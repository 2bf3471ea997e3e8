//! The emulated device's own checks: each rule a kernel can break that a GPU would not report
//! clearly is reported as a typed fault naming where it happened, and the legal warp patterns
//! (shuffles inside one warp's branch, every shuffle flavour) give CUDA's results.

use convoy_kernels::cuda::device::{DeviceError, DeviceLayer, DeviceMemory, FaultKind, Stream};
use convoy_kernels::cuda::emulator::EmulatedDevice;
use convoy_kernels::cuda::launch::{KernelArg, LaunchConfig};

fn run(name: &'static str, threads: u32, args: &[KernelArg]) -> Result<(), DeviceError> {
    let dev = EmulatedDevice::new();
    // SAFETY: every pointer argument below addresses a buffer of this device sized for the
    // check kernel's accesses.
    unsafe {
        dev.launch_raw(
            Stream::Compute,
            name,
            &LaunchConfig::linear(1, threads),
            args,
        )
    }
}

fn fault_of(r: Result<(), DeviceError>) -> (FaultKind, String) {
    match r {
        Err(DeviceError::Fault { kind, message }) => (kind, message),
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn divergent_barriers_are_reported_with_both_sites() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc(64 * 4).unwrap();
    let (kind, msg) = fault_of(run(
        "emu_check_divergent_barrier",
        64,
        &[KernelArg::Ptr(out.slice().ptr)],
    ));
    assert_eq!(kind, FaultKind::DivergentBarrier, "{msg}");
    assert!(
        msg.contains("checks.cu:7") && msg.contains("checks.cu:9"),
        "{msg}"
    );
}

#[test]
fn an_exit_while_others_wait_is_reported() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc(64 * 4).unwrap();
    let (kind, msg) = fault_of(run(
        "emu_check_exit_at_barrier",
        64,
        &[KernelArg::Ptr(out.slice().ptr)],
    ));
    assert_eq!(kind, FaultKind::ExitedAtBarrier, "{msg}");
}

#[test]
fn a_deadlock_is_reported_not_hung() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc(64 * 4).unwrap();
    let (kind, msg) = fault_of(run(
        "emu_check_deadlock",
        64,
        &[KernelArg::Ptr(out.slice().ptr)],
    ));
    assert_eq!(kind, FaultKind::Deadlock, "{msg}");
    assert!(
        msg.contains("thread 0 waits at __syncthreads (checks.cu:24)"),
        "{msg}"
    );
}

#[test]
fn a_shared_array_overflow_is_a_fault_with_file_line_and_index() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc(4).unwrap();
    let ok = run(
        "emu_check_shared_overflow",
        64,
        &[KernelArg::I32(63), KernelArg::Ptr(out.slice().ptr)],
    );
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(dev.download::<f32>(&out).unwrap(), vec![63.0]);
    let (kind, msg) = fault_of(run(
        "emu_check_shared_overflow",
        64,
        &[KernelArg::I32(64), KernelArg::Ptr(out.slice().ptr)],
    ));
    assert_eq!(kind, FaultKind::OutOfBounds, "{msg}");
    assert!(
        msg.contains("checks.cu:36: index 64 out of bounds for type 'float [64]'"),
        "{msg}"
    );
}

#[test]
fn trap_argument_and_limit_errors_are_typed() {
    assert_eq!(fault_of(run("emu_check_trap", 32, &[])).0, FaultKind::Trap);
    assert_eq!(
        fault_of(run("no_such_kernel", 32, &[])).0,
        FaultKind::UnknownKernel
    );
    assert_eq!(
        fault_of(run("emu_check_trap", 32, &[KernelArg::I32(1)])).0,
        FaultKind::ArgumentCount
    );
    // An 8-byte value for an `int` parameter.
    let (kind, msg) = fault_of(run(
        "emu_check_shared_overflow",
        32,
        &[KernelArg::I64(1), KernelArg::Ptr(0)],
    ));
    assert_eq!(kind, FaultKind::ArgumentSize, "{msg}");
    assert_eq!(
        fault_of(run("emu_check_trap", 1025, &[])).0,
        FaultKind::LaunchConfig
    );
}

#[test]
fn shuffles_and_block_reductions_give_cudas_results() {
    let dev = EmulatedDevice::new();
    let threads = 128usize;
    let out = dev.alloc(threads * 5 * 4).unwrap();
    run(
        "emu_check_shuffles",
        threads as u32,
        &[KernelArg::Ptr(out.slice().ptr)],
    )
    .unwrap();
    let got: Vec<i32> = dev.download(&out).unwrap();
    let total: i32 = (0..threads as i32).sum();
    for t in 0..threads {
        let lane = t % 32;
        let warp_base = t - lane;
        let r = &got[t * 5..t * 5 + 5];
        assert_eq!(r[0], (warp_base + (lane ^ 5)) as i32, "xor, thread {t}");
        let down = if lane % 16 == 15 { t } else { t + 1 };
        assert_eq!(r[1], down as i32, "down width 16, thread {t}");
        let up = if lane == 0 { t } else { t - 1 };
        assert_eq!(r[2], up as i32, "up, thread {t}");
        assert_eq!(r[3], (warp_base + 3) as i32, "broadcast, thread {t}");
        assert_eq!(r[4], total, "block sum, thread {t}");
    }
}

#[test]
fn disjoint_masks_and_segment_rules_follow_cuda() {
    let dev = EmulatedDevice::new();
    let threads = 64usize;
    let out = dev.alloc(threads * 2 * 4).unwrap();
    run(
        "emu_check_disjoint_masks",
        threads as u32,
        &[KernelArg::Ptr(out.slice().ptr)],
    )
    .unwrap();
    let got: Vec<i32> = dev.download(&out).unwrap();
    for t in 0..threads {
        assert_eq!(got[2 * t], (t ^ 1) as i32, "half-warp exchange, thread {t}");
        let cross = if t % 32 >= 16 { t - 16 } else { t };
        assert_eq!(
            got[2 * t + 1],
            cross as i32,
            "xor across segments, thread {t}"
        );
    }
}

/// The emulator's model of the tensor-core MMA follows the PTX ISA's fragment tables: a kernel
/// that loads A and B element by element by those tables gets A x B + C, exactly (small
/// integers, exact in bf16 and f32).
#[test]
fn the_mma_model_follows_the_ptx_fragment_layout() {
    use half::bf16;
    let dev = EmulatedDevice::new();
    let a: Vec<f32> = (0..256)
        .map(|i| ((i * 5 + i / 16) % 7) as f32 - 3.0)
        .collect();
    let b: Vec<f32> = (0..128)
        .map(|i| ((i * 3 + i / 8) % 5) as f32 - 2.0)
        .collect();
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let (ab, bb) = (
        dev.upload(&to_bf16(&a)).unwrap(),
        dev.upload(&to_bf16(&b)).unwrap(),
    );
    let d = dev.alloc(128 * 4).unwrap();
    let args = [
        KernelArg::Ptr(ab.slice().ptr),
        KernelArg::Ptr(bb.slice().ptr),
        KernelArg::Ptr(d.slice().ptr),
    ];
    run("emu_check_mma_layout", 32, &args).unwrap();
    let got: Vec<f32> = dev.download(&d).unwrap();
    for row in 0..16 {
        for col in 0..8 {
            let want: f32 = 0.5
                + (0..16)
                    .map(|k| a[row * 16 + k] * b[k * 8 + col])
                    .sum::<f32>();
            assert_eq!(got[row * 8 + col], want, "d[{row}][{col}]");
        }
    }
    // mma.sync is .aligned: a warp of 16 threads cannot run it.
    let (kind, msg) = fault_of(run("emu_check_mma_layout", 16, &args));
    assert_eq!(kind, FaultKind::Shuffle, "{msg}");
    assert!(msg.contains("names lane 16, absent"), "{msg}");
}

#[test]
fn half_a_warp_at_an_mma_and_half_at_a_shuffle_is_reported() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc(32 * 4).unwrap();
    // Whichever half holds lane 0.
    for mma_first in [1, 0] {
        let (kind, msg) = fault_of(run(
            "emu_check_mma_divergent",
            32,
            &[KernelArg::Ptr(out.slice().ptr), KernelArg::I32(mma_first)],
        ));
        assert_eq!(kind, FaultKind::Shuffle, "{msg}");
        assert!(msg.contains("different warp-collective"), "{msg}");
    }
}
