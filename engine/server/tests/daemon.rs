//! End to end: the real `convoy serve` binary, talked to over its Unix socket.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use convoy_server::api::client::Client;
use convoy_server::api::protocol::ServerEvent;
use serde_json::json;
use support::{held_blocks, model, poll, smollm2, wait_for_zero_held, Daemon};

#[test]
fn streamed_multi_turn_chat_reports_cached_tokens_and_socket_is_private() {
    let d = Daemon::start("chat", &smollm2(), &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let mut c = d.client();
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful pirate."})];
    for (turn, user) in [
        "Hello! Who are you?",
        "Where is your ship?",
        "What do you eat?",
    ]
    .iter()
    .enumerate()
    {
        messages.push(json!({"role": "user", "content": user}));
        let (tokens, done) = c.generate(&json!({"op": "generate", "id": format!("t{turn}"), "messages": messages, "max_tokens": 16})).unwrap();
        let ServerEvent::Done {
            usage,
            finish_reason,
            ..
        } = done
        else {
            panic!("{done:?}")
        };
        assert!(finish_reason == "stop" || finish_reason == "length");
        let reply: String = tokens
            .iter()
            .map(|t| {
                if let ServerEvent::Token { text, .. } = t {
                    text.clone()
                } else {
                    String::new()
                }
            })
            .collect();
        assert_eq!(tokens.len(), usage.completion_tokens);
        if turn == 0 {
            assert_eq!(usage.cached_tokens, 0);
        } else {
            // The whole previous conversation is served from cache (the new user message and
            // the last prompt token are computed).
            assert!(
                usage.cached_tokens * 10 >= usage.prompt_tokens * 6,
                "turn {turn}: {usage:?}"
            );
        }
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    // The last turn caches its final token one step after its `done`; then nothing is held.
    wait_for_zero_held(&mut c);
}

#[test]
fn cancel_and_disconnect_mid_stream_free_every_block() {
    let d = Daemon::start("cancel", &smollm2(), &[]);
    let mut c = d.client();
    c.send(&json!({"op": "generate", "id": "long", "prompt": "Once upon a time", "max_tokens": 100000, "ignore_eos": true})).unwrap();
    for _ in 0..3 {
        assert!(matches!(c.recv().unwrap(), Some(ServerEvent::Token { .. })));
    }
    c.send(&json!({"op": "cancel", "id": "long"})).unwrap();
    loop {
        match c.recv().unwrap().unwrap() {
            ServerEvent::Done { finish_reason, .. } => {
                assert_eq!(finish_reason, "cancelled");
                break;
            }
            ServerEvent::Token { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    wait_for_zero_held(&mut c);

    // Disconnect mid-stream.
    let mut gone = d.client();
    gone.send(&json!({"op": "generate", "id": "x", "prompt": "The sea", "max_tokens": 100000, "ignore_eos": true})).unwrap();
    gone.recv().unwrap();
    assert!(held_blocks(&mut c) > 0);
    drop(gone);
    wait_for_zero_held(&mut c);
    // Unknown ids are refused.
    c.send(&json!({"op": "cancel", "id": "nope"})).unwrap();
    assert!(
        matches!(c.recv().unwrap(), Some(ServerEvent::Error { code, .. }) if code == "unknown_id")
    );
}

#[test]
fn malformed_lines_each_get_their_error_code_and_the_daemon_goes_on() {
    let d = Daemon::start("malformed", &smollm2(), &["--max-line-bytes", "65536"]);
    let mut c = d.client();
    let long = format!(
        "{{\"op\":\"tokenize\",\"text\":\"{}\"}}",
        "a".repeat(70_000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe\xfd".to_vec(), "invalid_utf8"),
        (b"{\"op\":\"health\"\xc3}".to_vec(), "invalid_utf8"),
        (b"{not json".to_vec(), "invalid_json"),
        (b"{\"op\":\"health\"".to_vec(), "invalid_json"),
        (b"nul".to_vec(), "invalid_json"),
        (b"[1,2,3]".to_vec(), "not_an_object"),
        (b"\"generate\"".to_vec(), "not_an_object"),
        (b"42".to_vec(), "not_an_object"),
        (b"{}".to_vec(), "missing_op"),
        (b"{\"id\":\"a\",\"prompt\":\"x\"}".to_vec(), "missing_op"),
        (b"{\"op\":\"fly\"}".to_vec(), "unknown_op"),
        (
            b"{\"op\":\"GENERATE\",\"id\":\"a\",\"prompt\":\"x\"}".to_vec(),
            "unknown_op",
        ),
        (b"{\"op\":7}".to_vec(), "invalid_type"),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"colour\":\"red\"}".to_vec(),
            "unknown_field",
        ),
        (b"{\"op\":\"health\",\"extra\":1}".to_vec(), "unknown_field"),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":5}".to_vec(),
            "invalid_type",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"max_tokens\":\"ten\"}".to_vec(),
            "invalid_type",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"max_tokens\":-1}".to_vec(),
            "invalid_type",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt_ids\":[1,\"two\"]}".to_vec(),
            "invalid_type",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"messages\":[{\"role\":\"user\"}]}".to_vec(),
            "missing_field",
        ),
        (
            b"{\"op\":\"generate\",\"id\":5,\"prompt\":\"x\"}".to_vec(),
            "invalid_type",
        ),
        (
            b"{\"op\":\"generate\",\"prompt\":\"x\"}".to_vec(),
            "missing_field",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\"}".to_vec(),
            "missing_prompt",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"prompt_ids\":[1]}".to_vec(),
            "conflicting_prompt",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"\"}".to_vec(),
            "empty_prompt",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt_ids\":[]}".to_vec(),
            "empty_prompt",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"max_tokens\":0}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"temperature\":-1}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"top_p\":0}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"logprobs\":99}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"stop\":[\"\"]}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"\",\"prompt\":\"x\"}".to_vec(),
            "invalid_parameter",
        ),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt_ids\":[99999999]}".to_vec(),
            "token_out_of_range",
        ),
        (
            format!(
                "{{\"op\":\"generate\",\"id\":\"a\",\"prompt_ids\":[{}]}}",
                vec!["1"; 40_000].join(",")
            )
            .into_bytes(),
            "line_too_long",
        ),
        (long.into_bytes(), "line_too_long"),
        (
            b"{\"op\":\"generate\",\"id\":\"a\",\"prompt\":\"x\",\"logprobs\":2,\"stream\":false}"
                .to_vec(),
            "invalid_parameter",
        ),
        (b"{\"op\":\"cancel\"}".to_vec(), "missing_field"),
        (
            b"{\"op\":\"tokenize\",\"text\":[1]}".to_vec(),
            "invalid_type",
        ),
    ];
    assert!(cases.len() >= 30);
    for (line, code) in &cases {
        let mut l = line.clone();
        l.push(b'\n');
        c.send_raw(&l).unwrap();
        match c.recv().unwrap() {
            Some(ServerEvent::Error { code: got, .. }) => {
                assert_eq!(got, *code, "line {:?}", String::from_utf8_lossy(line))
            }
            other => panic!("line {:?}: {other:?}", String::from_utf8_lossy(line)),
        }
    }
    // A prompt longer than the context.
    let (_, ev) = c
        .generate(&json!({"op": "generate", "id": "big", "prompt_ids": vec![1; 9000]}))
        .unwrap();
    assert!(
        matches!(ev, ServerEvent::Error { ref code, .. } if code == "prompt_too_long"),
        "{ev:?}"
    );
    // Duplicate live id.
    c.send(&json!({"op": "generate", "id": "dup", "prompt": "Hi", "max_tokens": 100000, "ignore_eos": true})).unwrap();
    c.send(&json!({"op": "generate", "id": "dup", "prompt": "Hi"}))
        .unwrap();
    loop {
        match c.recv().unwrap().unwrap() {
            ServerEvent::Error { code, .. } => {
                assert_eq!(code, "duplicate_id");
                break;
            }
            ServerEvent::Token { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    c.send(&json!({"op": "cancel", "id": "dup"})).unwrap();
    // Still serving, on this connection and on a new one.
    let (_, done) = c.generate(&json!({"op": "generate", "id": "ok", "prompt": "The capital of France is", "max_tokens": 2})).unwrap();
    assert!(matches!(done, ServerEvent::Done { .. }), "{done:?}");
    let (_, done) = d
        .client()
        .generate(&json!({"op": "generate", "id": "ok2", "prompt": "Hello", "max_tokens": 2}))
        .unwrap();
    assert!(matches!(done, ServerEvent::Done { .. }));
}

#[test]
fn a_thousand_concurrent_streaming_connections() {
    convoy_server::api::raise_fd_limit();
    let d = Daemon::start("thousand", &model("glassllm"), &["--max-running", "256"]);
    let mut clients: Vec<Client> = (0..1000).map(|_| d.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&json!({"op": "generate", "id": format!("r{i}"), "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true})).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut tokens = 0;
        loop {
            match c.recv().unwrap().expect("event") {
                ServerEvent::Token { .. } => tokens += 1,
                ServerEvent::Done {
                    finish_reason,
                    usage,
                    ..
                } => {
                    assert_eq!(
                        (finish_reason.as_str(), usage.completion_tokens, tokens),
                        ("length", 4, 4),
                        "connection {i}"
                    );
                    break;
                }
                other => panic!("connection {i}: {other:?}"),
            }
        }
    }
    let mut c = d.client();
    assert_eq!(c.stats().unwrap().finished_requests, 1000);
    // A request still holds its blocks for the one step after its `done` that computes the
    // K/V of its last token (so the reply is cached): wait for that step.
    wait_for_zero_held(&mut c);
}

/// A client holding an idle connection open does not hold the daemon's exit: once the engine
/// has stopped, the daemon closes the connection (the client reads its end) and exits.
#[test]
fn an_idle_connection_is_closed_at_shutdown_not_waited_for() {
    use std::io::Read;
    let dir = std::env::temp_dir().join(format!("convoy-idle-exit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("convoy.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(["serve", "--model", smollm2().to_str().unwrap()])
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--kv-cache-memory",
            "64MiB",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut idle = poll("the daemon to come up", 60, || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });
    // The connection is accepted (a health check on another answers after it).
    let mut c = poll("a second connection", 60, || Client::connect(&socket).ok());
    c.send(&json!({"op": "health"})).unwrap();
    c.recv().unwrap();
    drop(c);
    {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    }
    idle.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // The idle one, and perhaps the health check's if its hang-up is not seen yet.
    assert!(stderr.contains("open connection(s)"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_drains_and_removes_the_socket_and_a_live_socket_is_not_taken_over() {
    let mut d = Daemon::start("sigterm", &smollm2(), &["--drain-timeout", "1"]);
    // A second daemon refuses the live socket.
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args([
            "serve",
            "--model",
            smollm2().to_str().unwrap(),
            "--socket",
            d.socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by a live daemon"));
    // One short request finishes during the drain; one endless one is cancelled at its end.
    let mut short = d.client();
    let mut endless = d.client();
    endless.send(&json!({"op": "generate", "id": "e", "prompt": "Tell me", "max_tokens": 1000000, "ignore_eos": true})).unwrap();
    endless.recv().unwrap();
    short.send(&json!({"op": "generate", "id": "s", "prompt": "Hi", "max_tokens": 3, "ignore_eos": true})).unwrap();
    // Wait until the short request is running, so the signal cannot overtake its line.
    let mut short_events = vec![short.recv().unwrap().expect("first event")];
    let status = d.sigterm();
    assert_eq!(status.code(), Some(0));
    assert!(!d.socket.exists(), "socket removed");
    let mut last = None;
    while let Ok(Some(ev)) = endless.recv() {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(ServerEvent::Done { ref finish_reason, .. }) if finish_reason == "cancelled"),
        "{last:?}"
    );
    while let Ok(Some(ev)) = short.recv() {
        short_events.push(ev);
    }
    let last = short_events.pop();
    assert!(
        matches!(last, Some(ServerEvent::Done { ref finish_reason, .. }) if finish_reason == "length"),
        "{last:?}"
    );
    // A stale socket file (nobody listening) is replaced.
    let stale = d.socket.clone();
    std::os::unix::net::UnixListener::bind(&stale).unwrap();
    let d2 = Daemon {
        child: Command::new(env!("CARGO_BIN_EXE_convoy"))
            .args([
                "serve",
                "--model",
                smollm2().to_str().unwrap(),
                "--socket",
                stale.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        socket: stale,
    };
    poll("the daemon to replace the stale socket", 60, || {
        Client::connect(&d2.socket)
            .ok()
            .and_then(|mut c| c.stats().ok())
    });
}

#[test]
fn a_client_that_stops_reading_is_cancelled_as_slow_consumer_and_extra_connections_are_refused() {
    // A tiny random-weight model with a long context decodes fast enough to flood a socket.
    let dir = std::env::temp_dir().join(format!("convoy-slow-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1000000});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let d = Daemon::start(
        "slow",
        &dir,
        &[
            "--load-format",
            "dummy",
            "--dummy-dtype",
            "f32",
            "--max-pending-bytes",
            "16KiB",
            "--max-connections",
            "3",
        ],
    );
    let mut slow = d.client();
    slow.send(&json!({"op": "generate", "id": "flood", "prompt_ids": [1, 2, 3], "max_tokens": 1000000, "ignore_eos": true})).unwrap();
    // Do not read while the socket buffer and the 16 KiB queue fill up; others are still served.
    let mut other = d.client();
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    loop {
        let (_, done) = other.generate(&json!({"op": "generate", "id": "meanwhile", "prompt_ids": [5, 6], "max_tokens": 2})).unwrap();
        assert!(matches!(done, ServerEvent::Done { .. }), "{done:?}");
        let s = other.stats().unwrap();
        if s.running == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the slow stream was never cut: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = loop {
        match slow
            .recv()
            .unwrap()
            .expect("the stream ends with its done event")
        {
            ServerEvent::Token { .. } => {}
            ev => break ev,
        }
    };
    assert!(
        matches!(last, ServerEvent::Done { ref finish_reason, .. } if finish_reason == "slow_consumer"),
        "{last:?}"
    );
    wait_for_zero_held(&mut other);
    // Two connections are open; the third is allowed, the fourth refused with an error line.
    let _third = d.client();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = d.client();
    match fourth.recv().unwrap() {
        Some(ServerEvent::Error { code, .. }) => assert_eq!(code, "too_many_connections"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_engine_panic_reaches_every_client_and_the_daemon_exits_non_zero() {
    let mut d = Daemon::start_with_env(
        "panic",
        &smollm2(),
        &[],
        &[("CONVOY_FAULT_PANIC_AT_STEP", "5")],
    );
    let mut clients: Vec<Client> = (0..3).map(|_| d.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&json!({"op": "generate", "id": format!("p{i}"), "prompt": "Tell me a story", "max_tokens": 1000, "ignore_eos": true})).unwrap();
    }
    for c in clients.iter_mut() {
        let mut saw_done_error = false;
        let mut saw_error_event = false;
        while let Ok(Some(ev)) = c.recv() {
            match ev {
                ServerEvent::Done { finish_reason, .. } => {
                    saw_done_error = finish_reason == "error"
                }
                ServerEvent::Error { code, .. } => saw_error_event = code == "engine_error",
                _ => {}
            }
            if saw_done_error && saw_error_event {
                break;
            }
        }
        assert!(
            saw_done_error && saw_error_event,
            "every client hears of the failure"
        );
    }
    let status = d.wait_exit("the daemon to exit after an engine panic", 30);
    assert_eq!(status.code(), Some(2));
    assert!(!d.socket.exists(), "socket removed");
}

#[test]
fn a_client_that_only_closes_its_sending_side_still_gets_its_stream() {
    use std::io::{Read, Write};
    let d = Daemon::start("halfclose", &smollm2(), &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"{\"op\":\"generate\",\"id\":\"h\",\"prompt\":\"The capital of France is\",\"max_tokens\":3,\"ignore_eos\":true}\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let last: ServerEvent = serde_json::from_str(all.lines().last().expect("events")).unwrap();
    assert!(
        matches!(last, ServerEvent::Done { ref finish_reason, usage, .. } if finish_reason == "length" && usage.completion_tokens == 3),
        "{all}"
    );
}

#[test]
fn socket_mode_and_group_can_be_widened() {
    use std::os::unix::fs::MetadataExt;
    // The group that owns this test's temp dir is one the daemon can give the socket to.
    let gid = std::fs::metadata(std::env::temp_dir()).unwrap().gid();
    let d = Daemon::start(
        "group",
        &smollm2(),
        &["--socket-mode", "0660", "--socket-group", &gid.to_string()],
    );
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    // A name that is no group is a clear startup error.
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args([
            "serve",
            "--model",
            smollm2().to_str().unwrap(),
            "--socket",
            "/tmp/convoy-nogroup.sock",
            "--socket-group",
            "no-such-group-x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new("/tmp/convoy-nogroup.sock").exists(),
        "no socket left behind"
    );
}
