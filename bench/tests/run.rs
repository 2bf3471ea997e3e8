//! `convoy-bench run` end to end against a daemon it spawns (the 0.85M-parameter glassllm
//! model, so it takes seconds): the report validates against docs/bench-report.schema.json,
//! the plots are SVG files, the same seed gives the same requests (greedy replies, so the
//! same prompts turn after turn), and bad input gives clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_convoy-bench"));
    c.current_dir(root());
    c
}

fn convoy() -> PathBuf {
    // The workspace's convoy binary sits beside convoy-bench.
    Path::new(env!("CARGO_BIN_EXE_convoy-bench")).with_file_name("convoy")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn spawn_run(dir: &Path, name: &str, daemon_flags: &[&str]) -> serde_json::Value {
    let report = dir.join(format!("{name}.json"));
    let plots = dir.join(format!("{name}-plots"));
    let out = bench()
        .args(["run", "--workload", "bench/workloads/smoke.toml", "--spawn"])
        .arg("--convoy")
        .arg(convoy())
        .args(["--model", "models/glassllm", "--conversations", "6"])
        .args([
            "--duration-s",
            "60",
            "--slo-ttft-ms",
            "60000",
            "--no-progress",
        ])
        .arg("--report")
        .arg(&report)
        .arg("--plot-dir")
        .arg(&plots)
        .args(["--", "--chat-template", "bench/workloads/compact.jinja"])
        .args(daemon_flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for heading in ["TTFT p50/p99", "TPOT", "E2E", "goodput", "hit2+"] {
        assert!(t.contains(heading), "table lacks {heading}: {t}");
    }
    // Every column is explained, and the table fits 100 columns.
    assert!(t.contains("hit2+: share of prompt tokens"), "{t}");
    let header = t.lines().find(|l| l.contains("TTFT p50/p99")).unwrap();
    assert!(header.len() <= 100, "{} columns: {header}", header.len());
    for f in ["latency.svg", "goodput.svg"] {
        let svg = std::fs::read_to_string(plots.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{f}");
    }
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

#[test]
fn spawned_run_reports_validate_and_repeat() {
    if !root().join("models/glassllm/model.safetensors").exists() {
        panic!("models/glassllm is missing: run scripts/fetch_models.sh");
    }
    let dir = std::env::temp_dir().join(format!("convoy-bench-run-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docs/bench-report.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let steps = dir.join("steps.jsonl");
    let a = spawn_run(&dir, "a", &["--step-log", steps.to_str().unwrap()]);
    let errors: Vec<String> = validator.iter_errors(&a).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "schema errors: {errors:#?}");
    let run = &a["runs"][0];
    // 6 conversations of 3 turns, all completed, through one daemon.
    assert_eq!(run["requests"]["completed"], 18, "{run:#}");
    assert_eq!(run["requests"]["failed"], 0);
    assert_eq!(run["by_turn"].as_array().unwrap().len(), 3);
    assert!(run["latency_ms"]["ttft"]["p50"].as_f64().unwrap() > 0.0);
    // The daemon's own TTFT comes with every request, and never exceeds the client's.
    assert_eq!(run["latency_ms"]["engine_ttft"]["count"], 18);
    assert_eq!(run["latency_ms"]["edge"]["count"], 18);
    assert!(
        run["latency_ms"]["engine_ttft"]["max"].as_f64().unwrap()
            <= run["latency_ms"]["ttft"]["max"].as_f64().unwrap() + 1.0
    );
    assert_eq!(run["goodput"]["fraction"], 1.0);
    // Later turns re-send the history: the cache serves most of it.
    assert!(
        run["cache"]["later_turn_hit_ratio"].as_f64().unwrap() > 0.4,
        "{run:#}"
    );
    // The same seed, a fresh daemon: the same requests, so the same prompt lengths per turn.
    let b = spawn_run(&dir, "b", &[]);
    let prompts = |r: &serde_json::Value| -> Vec<f64> {
        r["runs"][0]["by_turn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["mean_prompt_tokens"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(prompts(&a), prompts(&b));
    assert_eq!(
        a["runs"][0]["cache"]["prompt_tokens"],
        b["runs"][0]["cache"]["prompt_tokens"]
    );
    // The daemon logged its steps; a profile fitted from them loads in the planner.
    let lines = std::fs::read_to_string(&steps).unwrap();
    let logged: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(logged.len() >= 18, "{} steps", logged.len());
    let prefilled: u64 = logged
        .iter()
        .map(|s| s["prefill_tokens"].as_u64().unwrap())
        .sum();
    let decoded: u64 = logged
        .iter()
        .map(|s| s["decode_seqs"].as_u64().unwrap())
        .sum();
    // 18 replies of 4 tokens: the first of each comes from a prompt step, the other 3 from
    // one-token steps (a prompt whose last chunk is one token counts as a decode too).
    assert!((18 * 3..=18 * 4).contains(&decoded), "{decoded}: {lines}");
    assert!(prefilled > 0);
    assert!(logged
        .iter()
        .all(|s| s["execute_s"].as_f64().unwrap() <= s["step_s"].as_f64().unwrap()));
    let profile = dir.join("profile.json");
    let out = bench()
        .args(["calibrate", "--model", "models/glassllm", "--from-steps"])
        .arg(&steps)
        .arg("--out")
        .arg(&profile)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("decode-only steps"), "{}", text(&out));
    let p = convoy_planner::plan::profile::Profile::load(&profile).unwrap();
    assert!(p.notes.contains("--from-steps"), "{}", p.notes);
    assert!(p.cost.fixed_s + p.cost.decode_token_s > 0.0, "{:?}", p.cost);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = std::env::temp_dir().join(format!("convoy-bench-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "unknown.toml",
            "kind = \"chat\"\nturns_typo = 3\n",
            "workload_syntax",
        ),
        ("kind.toml", "kind = \"bogus\"\n", "workload_syntax"),
        (
            "range.toml",
            "kind = \"chat\"\n[chat]\nturns = { dist = \"uniform\", min = 5, max = 2 }\n",
            "chat.turns",
        ),
        (
            "rate.toml",
            "kind = \"random\"\n[arrival]\nrate = 0\n",
            "arrival.rate",
        ),
        ("trace.toml", "kind = \"trace\"\n", "trace.path"),
    ];
    for (name, body, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let out = bench()
            .args(["run", "--socket", "/nonexistent.sock", "--workload"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(text(&out).contains(want), "{name}: {}", text(&out));
    }
    // A trace with a bad line names the line.
    let trace = dir.join("t.jsonl");
    std::fs::write(
        &trace,
        "{\"t\":0,\"conversation\":\"a\",\"prompt\":\"hi\"}\n{\"t\":-1}\n",
    )
    .unwrap();
    let spec = dir.join("trace-ok.toml");
    std::fs::write(&spec, "kind = \"trace\"\n[trace]\npath = \"t.jsonl\"\n").unwrap();
    let out = bench()
        .args(["run", "--socket", "/nonexistent.sock", "--workload"])
        .arg(&spec)
        .output()
        .unwrap();
    assert!(text(&out).contains("t.jsonl:2"), "{}", text(&out));
    // An unreachable daemon and an unreachable server.
    let out = bench()
        .args(["run", "--workload", "bench/workloads/smoke.toml"])
        .args(["--socket", "/nonexistent/convoy.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot connect to the daemon"),
        "{}",
        text(&out)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = bench()
        .args([
            "run",
            "--workload",
            "bench/workloads/smoke.toml",
            "--target",
            "openai",
        ])
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot reach"), "{}", text(&out));
    // Sweeps need an open process.
    let out = bench()
        .args([
            "run",
            "--workload",
            "bench/workloads/smoke.toml",
            "--socket",
            "/x",
        ])
        .args(["--sweep", "1,2"])
        .output()
        .unwrap();
    assert!(
        text(&out).contains("--sweep needs an open arrival process"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run in which every request fails (glassllm served without a chat template) writes its
/// report but fails, saying why and what to give the daemon.
#[test]
fn a_run_that_completes_nothing_fails_and_names_the_cause() {
    let dir = std::env::temp_dir().join(format!("convoy-bench-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("r.json");
    let out = bench()
        .args(["run", "--workload", "bench/workloads/smoke.toml", "--spawn"])
        .arg("--convoy")
        .arg(convoy())
        .args([
            "--model",
            "models/glassllm",
            "--duration-s",
            "2",
            "--no-progress",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("completed no request"), "{t}");
    assert!(
        t.contains("--chat-template bench/workloads/compact.jinja"),
        "{t}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["runs"][0]["requests"]["errors"]["no_chat_template"].as_u64() > Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Calibrating while other processes take the CPU warns loudly: the step times it measures,
/// and a profile made of them, would be wrong.
#[test]
fn calibrate_warns_when_another_process_takes_the_cpu() {
    // One busy process per core.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut busy: Vec<std::process::Child> = (0..cores)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let out_file =
        std::env::temp_dir().join(format!("convoy-busy-profile-{}.json", std::process::id()));
    let out = bench()
        .args([
            "calibrate",
            "--reps",
            "1",
            "--decode-batch",
            "1,4",
            "--context",
            "128",
            "--prefill",
            "32,128",
            "--out",
        ])
        .arg(&out_file)
        .output()
        .unwrap();
    for b in &mut busy {
        let _ = b.kill();
        let _ = b.wait();
    }
    let _ = std::fs::remove_file(&out_file);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING: the measuring threads had") && stderr.contains("another process"),
        "{stderr}"
    );
}
