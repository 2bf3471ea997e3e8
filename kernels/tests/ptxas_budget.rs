//! Every kernel, compiled by NVRTC to PTX for sm_80 (A100) and sm_90 (H100/H200) and assembled
//! by `ptxas -v`, stays within its resource budget: no stack frame, no spills, registers and
//! static shared memory at most the stated figures (so every launch's block fits on an SM with
//! room for more than one block). `ptxas` comes from the `nvidia-cuda-nvcc` wheel
//! (`CONVOY_PTXAS`, else `ptxas` on the path); skipped, saying so, where there is none, and a
//! failure where `CONVOY_REQUIRE_PTXAS=1` (the test script sets it).

use std::process::Command;

use convoy_kernels::cuda::{full_source, nvrtc, SOURCES};

/// Registers per thread and static shared memory per block each kernel may use.
const BUDGETS: &[(&str, u32, u32)] = &[
    ("embedding_bf16", 32, 0),
    ("fused_add_rmsnorm", 32, 128),
    ("rope_half_split", 40, 0),
    ("reshape_and_cache", 32, 0),
    ("silu_mul", 32, 0),
    ("copy_blocks", 32, 0),
    ("cast_bf16", 32, 0),
    ("gather_rows", 32, 0),
    ("add_rows", 32, 0),
    ("add_bias_rows", 32, 0),
    ("copy_block_list", 32, 0),
    ("attention_partition", 48, 0),
    ("attention_combine", 48, 0),
    ("attention_mma", 168, 0),
    ("argmax_rows", 32, 256),
    ("gumbel_sample_rows", 48, 768),
];

#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    shared: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parse `ptxas -v` output into each kernel's usage.
fn parse(report: &str) -> Vec<(String, Usage)> {
    let mut out: Vec<(String, Usage)> = Vec::new();
    for line in report.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            let name = rest[..rest.find('\'').unwrap_or(rest.len())].to_string();
            out.push((name, Usage::default()));
            continue;
        }
        let Some((_, u)) = out.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            u.stack = number_before(line, "bytes stack frame").unwrap_or(u32::MAX);
            u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u32::MAX);
            u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u32::MAX);
        }
        if line.contains("Used") && line.contains("registers") {
            u.registers = number_before(line, "registers").unwrap_or(u32::MAX);
            u.shared = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

fn ptxas() -> Option<String> {
    if let Ok(p) = std::env::var("CONVOY_PTXAS") {
        return Some(p);
    }
    Command::new("ptxas")
        .arg("--version")
        .output()
        .ok()
        .map(|_| "ptxas".to_string())
}

#[test]
fn every_kernel_fits_its_register_and_shared_memory_budget_without_spills() {
    let required = std::env::var("CONVOY_REQUIRE_PTXAS").is_ok();
    let (Some(ptxas), true) = (ptxas(), nvrtc::available()) else {
        assert!(
            !required,
            "CONVOY_REQUIRE_PTXAS is set but ptxas or NVRTC is missing"
        );
        eprintln!(
            "skipped: no ptxas or NVRTC here (install nvidia-cuda-nvcc and nvidia-cuda-nvrtc)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("convoy-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for arch in ["80", "90"] {
        for src in SOURCES {
            let ptx = nvrtc::compile_ptx(&full_source(src), src.name, &format!("compute_{arch}"))
                .unwrap_or_else(|e| panic!("{}: {e}", src.name));
            let file = dir.join(format!("{}.sm_{arch}.ptx", src.name));
            std::fs::write(&file, ptx).unwrap();
            let run = Command::new(&ptxas)
                .args(["-v", &format!("-arch=sm_{arch}"), "-o", "/dev/null"])
                .arg(&file)
                .output()
                .expect("ptxas runs");
            let report = String::from_utf8_lossy(&run.stderr).into_owned()
                + &String::from_utf8_lossy(&run.stdout);
            assert!(run.status.success(), "ptxas on {}: {report}", src.name);
            for (name, u) in parse(&report) {
                let &(_, regs, smem) = BUDGETS
                    .iter()
                    .find(|b| b.0 == name)
                    .unwrap_or_else(|| panic!("{name} has no budget in this test"));
                eprintln!("sm_{arch} {name}: {u:?}");
                assert_eq!(
                    (u.stack, u.spill_stores, u.spill_loads),
                    (0, 0, 0),
                    "sm_{arch} {name} spills: {u:?}"
                );
                assert!(
                    u.registers <= regs,
                    "sm_{arch} {name}: {} registers, budget {regs}",
                    u.registers
                );
                assert!(
                    u.shared <= smem,
                    "sm_{arch} {name}: {} bytes of shared memory, budget {smem}",
                    u.shared
                );
                checked += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        checked,
        2 * BUDGETS.len(),
        "every kernel was assembled for both architectures"
    );
}
