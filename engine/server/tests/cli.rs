//! The `convoy` binary: bad files give one clear error line and exit code 1; generate and
//! tokenize produce the documented JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

fn convoy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(args)
        .output()
        .expect("convoy runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("convoy-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn one_error_line(code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 1, "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{needle:?} not in {stderr:?}"
    );
}

fn write_config(dir: &Path, arch: &str) {
    let cfg = serde_json::json!({"architectures": [arch], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let d = scratch("trunc");
    write_config(&d, "LlamaForCausalLM");
    let header =
        br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[64,32],"data_offsets":[0,8192]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend(vec![0u8; 100]); // far less than the 8192 bytes promised
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    let (code, _, err) = convoy(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    one_error_line(code, &err, "truncated");
}

#[test]
fn gguf_with_bad_magic_is_a_clear_error() {
    let d = scratch("magic");
    let f = d.join("model.gguf");
    std::fs::write(&f, b"GGUX\x03\x00\x00\x00 and then nothing useful").unwrap();
    let (code, _, err) = convoy(&[
        "generate",
        "--model",
        f.to_str().unwrap(),
        "--prompt-ids",
        "1",
    ]);
    one_error_line(code, &err, "bad magic");
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let d = scratch("arch");
    write_config(&d, "MambaForCausalLM");
    let (code, _, err) = convoy(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt-ids",
        "1",
    ]);
    one_error_line(code, &err, "unsupported architecture \"MambaForCausalLM\"");
}

#[test]
fn missing_model_is_a_clear_error() {
    let (code, _, err) = convoy(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt-ids",
        "1",
    ]);
    one_error_line(code, &err, "no model at /nonexistent/model.gguf");
}

#[test]
fn dummy_model_generates_json_with_the_documented_fields() {
    let d = scratch("dummy");
    write_config(&d, "LlamaForCausalLM");
    let args = [
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--load-format",
        "dummy",
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--format",
        "json",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ];
    let (code, out, err) = convoy(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 5);
    assert!(v["prompt_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["text"].is_string());
    // Same seed, same output.
    let (_, out2, _) = convoy(&args);
    let v2: serde_json::Value = serde_json::from_str(out2.trim()).unwrap();
    assert_eq!(v["output_ids"], v2["output_ids"]);
}

#[test]
fn the_fast_precision_runs_from_the_command_line_and_a_bad_one_is_a_clear_error() {
    generate_with_option_runs_and_refuses("precision", "--precision", "fast", "int4", |err| {
        one_error_line(1, err, "--precision must be exact or fast, got \"int4\"")
    });
}

#[test]
fn an_f16_kv_cache_runs_from_the_command_line_and_a_bad_dtype_is_a_clear_error() {
    generate_with_option_runs_and_refuses("kv_dtype", "--kv-cache-dtype", "f16", "bf16", |err| {
        one_error_line(
            1,
            err,
            "--kv-cache-dtype: unknown KV cache dtype \"bf16\": use f32, f16 or fp8_e4m3",
        )
    });
}

#[test]
fn an_fp8_kv_cache_runs_from_the_command_line_and_e5m2_is_a_clear_error() {
    generate_with_option_runs_and_refuses(
        "kv_fp8",
        "--kv-cache-dtype",
        "fp8_e4m3",
        "fp8_e5m2",
        |err| {
            one_error_line(
                1,
                err,
                "--kv-cache-dtype: unknown KV cache dtype \"fp8_e5m2\": use f32, f16 or fp8_e4m3",
            )
        },
    );
}

/// `convoy generate` on a dummy model with `option good` generates 4 tokens; with `option
/// bad` it exits 1 and `check_error` gets its stderr.
fn generate_with_option_runs_and_refuses(
    scratch_name: &str,
    option: &str,
    good: &str,
    bad: &str,
    check_error: impl Fn(&str),
) {
    let d = scratch(scratch_name);
    write_config(&d, "LlamaForCausalLM");
    let model = d.to_str().unwrap();
    let run = |value: &str| {
        convoy(&[
            "generate",
            "--model",
            model,
            "--load-format",
            "dummy",
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--format",
            "json",
            option,
            value,
        ])
    };
    let (code, out, err) = run(good);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 4);
    let (code, _, err) = run(bad);
    assert_eq!(code, 1, "exit code; stderr: {err}");
    check_error(&err);
}

#[test]
fn tokenize_prints_ids_as_json() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run scripts/fetch_models.sh");
    let (code, out, err) = convoy(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "Hello, world!",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), r#"{"ids":[19556,28,905,17]}"#);
}
