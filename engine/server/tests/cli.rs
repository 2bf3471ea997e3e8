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
    // `convoy tokenize` of `text` in `format`: its output, once it succeeded.
    let tokenize = |text: &str, format: &str| {
        let (code, out, err) = convoy(&[
            "tokenize",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text,
            "--format",
            format,
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(
        tokenize("Hello, world!", "json").trim(),
        r#"{"ids":[19556,28,905,17],"token_bytes":[[72,101,108,108,111],[44],[32,119,111,114,108,100],[33]],"tokens":["Hello",","," world","!"]}"#
    );
    // A token that holds part of a character has no text of its own, only bytes.
    let v: serde_json::Value = serde_json::from_str(&tokenize("Hi 👍", "json")).unwrap();
    assert_eq!(v["tokens"], serde_json::json!(["Hi", null, null, null]));
    // The text format: the ids, then each token's text (escaped bytes for part of a character).
    let out = tokenize("Hi 👍", "text");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "26843,15107,235,231");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["26843", "\"Hi\""]
    );
    assert_eq!(lines[2].trim(), r#"15107  b" \xf0\x9f""#);
}

#[test]
fn the_default_model_is_found_from_any_directory_and_a_gguf_directory_is_a_model() {
    // From a directory unrelated to the checkout, no --model: the checkout's model is found.
    let elsewhere = scratch("elsewhere");
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(["tokenize", "--text", "Hello", "--format", "json"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A directory holding one .gguf file is that model.
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .canonicalize()
        .unwrap();
    let one = scratch("one-gguf");
    std::os::unix::fs::symlink(&real, one.join("model.gguf")).unwrap();
    let (code, out, err) = convoy(&["tokenize", "--model", one.to_str().unwrap(), "--text", "Hi"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    // Two are ambiguous, none is an error: each says so.
    std::os::unix::fs::symlink(&real, one.join("other.gguf")).unwrap();
    let (code, _, err) = convoy(&["tokenize", "--model", one.to_str().unwrap(), "--text", "Hi"]);
    one_error_line(
        code,
        &err,
        "holds 2 .gguf files: name one (model.gguf, other.gguf)",
    );
    let (code, _, err) = convoy(&[
        "tokenize",
        "--model",
        elsewhere.to_str().unwrap(),
        "--text",
        "Hi",
    ]);
    one_error_line(code, &err, "no config.json and no .gguf file");
}

#[test]
fn a_binary_outside_the_checkout_names_every_way_to_its_model() {
    // A copy of the binary away from its checkout, run from an unrelated directory: the
    // default model is nowhere it looks, and the error names each way to give it.
    let away = scratch("away");
    let bin = away.join("convoy");
    std::fs::copy(env!("CARGO_BIN_EXE_convoy"), &bin).unwrap();
    let run = |models_dir: Option<&Path>| {
        let mut cmd = Command::new(&bin);
        cmd.args(["tokenize", "--text", "Hi"])
            .current_dir(&away)
            .env_remove("CONVOY_MODELS_DIR");
        if let Some(d) = models_dir {
            cmd.env("CONVOY_MODELS_DIR", d);
        }
        // A process another test thread forks while the copy is open for writing holds it
        // open a moment: executing it then fails with ETXTBSY; try again.
        let out = (0..50)
            .find_map(|_| match cmd.output() {
                Err(e) if e.raw_os_error() == Some(26) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    None
                }
                r => Some(r.unwrap()),
            })
            .expect("the copied binary runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(None);
    one_error_line(
        code,
        &err,
        "no --model given and the default model is not in any of:",
    );
    for way in ["scripts/fetch_models.sh", "CONVOY_MODELS_DIR", "--model"] {
        assert!(err.contains(way), "{way}: {err}");
    }
    // CONVOY_MODELS_DIR at the checkout's models/ is the way the message gives.
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let (code, err) = run(Some(&models));
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&away);
}

#[test]
fn generate_chat_validates_as_the_daemon_does() {
    let d = scratch("chat-validation");
    for (chat, needle) in [
        (
            r#"[{"role":"human","content":"hi"}]"#,
            "messages[0].role \"human\" is not one of system, user, assistant (invalid_parameter)",
        ),
        (
            "[]",
            "messages is an empty list: give at least one message (empty_prompt)",
        ),
        (
            r#"[{"role":"user","content":"a","content":"b"}]"#,
            "(duplicate_key)",
        ),
        (r#"{"role":"user"}"#, "(invalid_type)"),
    ] {
        let f = d.join("chat.json");
        std::fs::write(&f, chat).unwrap();
        let (code, _, err) = convoy(&[
            "generate",
            "--chat",
            f.to_str().unwrap(),
            "--max-tokens",
            "1",
        ]);
        one_error_line(code, &err, needle);
    }
}

/// Exit code and stderr of `convoy serve` with `extra`, expected to stop at once.
fn serve_refused(extra: &[&str]) -> (i32, String) {
    let started = std::time::Instant::now();
    let (code, _, err) = convoy(&[&["serve"], extra].concat());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "refused before the model loads"
    );
    (code, err)
}

#[test]
fn serve_checks_its_socket_and_addresses_before_loading_the_model() {
    // A socket in a missing directory names the directory, not an internal file.
    let (code, err) = serve_refused(&["--socket", "/nonexistent-dir/convoy.sock"]);
    one_error_line(
        code,
        &err,
        "cannot create the socket /nonexistent-dir/convoy.sock: the directory /nonexistent-dir does not exist",
    );
    // A busy port is found before the model loads (a big model takes minutes).
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let d = scratch("serve-preflight");
    let sock = d.join("s.sock");
    let (code, err) = serve_refused(&["--socket", sock.to_str().unwrap(), "--http", &addr]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("--http {addr}")), "{err}");
    // Host names resolve; a name that does not is a clear error from the argument parser.
    let (code, err) = serve_refused(&[
        "--socket",
        sock.to_str().unwrap(),
        "--http",
        "no-such-host.invalid:80",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no-such-host.invalid:80"), "{err}");
    let port = busy.local_addr().unwrap().port();
    drop(busy);
    let (code, err) = serve_refused(&[
        "--socket",
        "/nonexistent-dir/convoy.sock",
        "--http",
        &format!("localhost:{port}"),
    ]);
    // localhost resolved: the refusal is the socket's, which comes first.
    one_error_line(code, &err, "the directory /nonexistent-dir does not exist");
}

#[test]
fn a_chat_without_a_chat_template_names_the_flag_that_gives_one() {
    let d = scratch("glass-chat");
    let f = d.join("chat.json");
    std::fs::write(&f, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let glass = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/glassllm");
    let (code, _, err) = convoy(&[
        "generate",
        "--model",
        glass.to_str().unwrap(),
        "--chat",
        f.to_str().unwrap(),
    ]);
    one_error_line(code, &err, "--chat-template");
    // `convoy chat` says so before its banner and first prompt (with stdin left open).
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(["chat", "--model", glass.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .output()
        .expect("convoy runs");
    let err = String::from_utf8_lossy(&out.stderr);
    one_error_line(out.status.code().unwrap_or(-1), &err, "`convoy chat` needs");
}

/// Without a GPU, `--device cuda` is one clear line and exit code 1 (the libraries are probed
/// before cudarc touches them: no panic); the CUDA backend's limits are refused at load.
#[test]
fn device_choices_fail_with_one_line() {
    let have_gpu = convoy_kernels::cuda::driver::gpu_present();
    if !have_gpu {
        let (code, _, err) = convoy(&["generate", "--device", "cuda", "--prompt", "x"]);
        one_error_line(code, &err, "--device cuda: ");
    }
    let (code, _, err) = convoy(&["generate", "--device", "gpu", "--prompt", "x"]);
    one_error_line(
        code,
        &err,
        "--device must be cpu, cuda, cuda-emulated, sim or auto",
    );
    let (code, _, err) = convoy(&[
        "generate",
        "--device",
        "cuda-emulated",
        "--precision",
        "fast",
        "--prompt",
        "x",
    ]);
    one_error_line(code, &err, "--precision fast is the CPU backend's");
    let (code, _, err) = convoy(&[
        "generate",
        "--device",
        "cuda-emulated",
        "--gpu-memory-utilization",
        "0.9",
        "--prompt",
        "x",
    ]);
    one_error_line(
        code,
        &err,
        "--gpu-memory-utilization shares out a GPU's memory",
    );
    let (code, _, err) = convoy(&["generate", "--enforce-eager", "--prompt", "x"]);
    one_error_line(
        code,
        &err,
        "--enforce-eager turns off the CUDA backend's graphs",
    );
}

/// A checkpoint the CUDA backend cannot take (a tensor missing, one of the wrong shape) is
/// refused where it is loaded, in one line naming the tensor, before any upload or engine
/// thread: glassllm with one tensor renamed in its safetensors header, and one transposed.
#[test]
fn a_broken_checkpoint_is_refused_at_load_on_the_cuda_backend() {
    let glass = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/glassllm");
    let file = std::fs::read(glass.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(file[8..8 + header_len].to_vec()).unwrap();
    let cases = [
        // Same length, so the header's size and every offset stay as they are.
        (
            "missing",
            header.replace(
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weigxx",
            ),
            "model.layers.0.mlp.up_proj.weight is missing",
        ),
        (
            "shape",
            transpose_in_header(&header, "model.layers.0.mlp.down_proj.weight"),
            "model.layers.0.mlp.down_proj.weight has shape",
        ),
    ];
    for (name, broken, want) in cases {
        assert_eq!(broken.len(), header.len());
        assert_ne!(broken, header, "{name}: the header changed");
        let d = scratch(&format!("broken-{name}"));
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(glass.join(f), d.join(f)).unwrap();
        }
        let mut bytes = file[..8].to_vec();
        bytes.extend_from_slice(broken.as_bytes());
        bytes.extend_from_slice(&file[8 + header_len..]);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        let (code, _, err) = convoy(&[
            "generate",
            "--device",
            "cuda-emulated",
            "--kv-cache-memory",
            "4MiB",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
        ]);
        one_error_line(code, &err, want);
        assert!(
            err.contains("cannot run on --device cuda-emulated"),
            "{err}"
        );
    }
}

/// `header` with the two dimensions of tensor `name`'s shape swapped.
fn transpose_in_header(header: &str, name: &str) -> String {
    let at = header.find(&format!("\"{name}\"")).unwrap();
    let shape_at = at + header[at..].find("\"shape\":[").unwrap() + "\"shape\":[".len();
    let end = shape_at + header[shape_at..].find(']').unwrap();
    let dims: Vec<&str> = header[shape_at..end].split(',').collect();
    assert_eq!(dims.len(), 2, "{name} is a matrix");
    format!(
        "{}{},{}{}",
        &header[..shape_at],
        dims[1],
        dims[0],
        &header[end..]
    )
}
