//! One client must never crash, starve or read through the daemon: the cases of an adversarial
//! run against `convoy serve`, each as it came in (socket or HTTP), with other clients served
//! while it happens.
//!
//! Covered here: template memory bombs (inline and named, over both faces), deeply nested YAML,
//! symlinks and file contents in errors, huge error messages, slow request bodies at the
//! connection limit, `Expect: 100-continue` over the body limit, large bodies parsed off the
//! I/O thread, out-of-range floats and duplicate keys over HTTP, unbounded `stop_token_ids`,
//! admission behind a long prompt with arrival stamped at acceptance, and `accept` failing
//! with every file descriptor in use.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use convoy_server::api::client::Client;
use convoy_server::api::protocol::{ServerEvent, MAX_ERROR_MESSAGE_BYTES};
use serde_json::{json, Value};
use support::http::{free_addr, raw_request, read_response, request, Resp};
use support::{smollm2, Daemon};

/// The daemon's answer to a generate request: `Ok(text)` or `Err((code, message))`.
fn generate(c: &mut Client, mut req: Value) -> Result<String, (String, String)> {
    req["op"] = json!("generate");
    req["id"] = json!("adv");
    req.as_object_mut()
        .unwrap()
        .entry("max_tokens")
        .or_insert(json!(1));
    req["stream"] = json!(false);
    match c.generate(&req).expect("the daemon answers") {
        (_, ServerEvent::Done { text, .. }) => Ok(text.unwrap_or_default()),
        (_, ServerEvent::Error { code, message, .. }) => Err((code, message)),
        (_, other) => panic!("{other:?}"),
    }
}

fn post(addr: SocketAddr, body: &Value) -> Resp {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// A directory of templates for the named-template cases.
fn template_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("convoy-adv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ok.yaml.j2"),
        "- name: q\n  content: {{ q | yaml_escape }}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bomb.yaml.j2"),
        "{{ \"a\" | indent(100000000000) }}\n",
    )
    .unwrap();
    dir
}

/// A long stream on its own connection, read to its end on a thread.
fn background_stream(socket: &Path) -> std::thread::JoinHandle<String> {
    let mut c = Client::connect(socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    std::thread::spawn(move || {
        let req = json!({"op":"generate","id":"bystander","prompt":"Once upon a time","max_tokens":64,"ignore_eos":true});
        match c.generate(&req).unwrap() {
            (_, ServerEvent::Done { finish_reason, .. }) => finish_reason,
            (_, other) => panic!("the bystander's stream broke: {other:?}"),
        }
    })
}

#[test]
fn template_bombs_are_an_error_to_their_request_alone() {
    let dir = template_dir("bombs");
    let http = free_addr();
    let d = Daemon::start(
        "adv-bombs",
        &smollm2(),
        &[
            "--templates",
            dir.to_str().unwrap(),
            "--template-timeout",
            "3",
            "--template-memory",
            "512MiB",
            "--http",
            &http.to_string(),
        ],
    );
    let bystander = background_stream(&d.socket);
    let mut c = d.client();
    let bombs = [
        r#"{{ "a" | indent(100000000000) }}"#,
        r#"{{ "%100000000000d" | format(1) }}"#,
        r#"{{ "{:>100000000000}".format("a") }}"#,
        r#"{{ [1] * 100000000000 }}"#,
        r#"{% for i in range(80) %}{{ "a"*100000000 }}{% endfor %}"#,
        r#"{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d("ab", 40) }}"#,
        r#"{{ range(100000) | join("x"*30) }}"#,
        // Nested YAML, rendered and written out in full.
        "{{ \"- \" * 100000 }}x\n",
    ];
    let written_out = format!("{}x\n", "- ".repeat(50_000));
    for bomb in bombs.iter().copied().chain([written_out.as_str()]) {
        let started = Instant::now();
        let (code, message) =
            generate(&mut c, json!({"template_yaml": bomb})).expect_err("a bomb must fail");
        assert_eq!(code, "template_error", "{bomb:.60}: {message}");
        assert!(
            message.len() <= MAX_ERROR_MESSAGE_BYTES,
            "{bomb:.60}: a {}-byte error",
            message.len()
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{bomb:.60} took {:?}",
            started.elapsed()
        );
        // The daemon is alive and serves this very connection.
        assert!(
            generate(&mut c, json!({"prompt": "Hi"})).is_ok(),
            "after {bomb:.60}"
        );
    }
    // A named template that bombs, over the socket and over HTTP.
    let (code, _) = generate(&mut c, json!({"template": "bomb"})).unwrap_err();
    assert_eq!(code, "template_error");
    post(http, &json!({"template": "bomb", "max_tokens": 1})).error(400, "template_error");
    post(http, &json!({"template_yaml": bombs[0], "max_tokens": 1})).error(400, "template_error");
    // The named set still renders.
    assert!(generate(
        &mut c,
        json!({"template": "ok", "variables": {"q": "What is two and two?"}})
    )
    .is_ok());
    assert_eq!(
        bystander.join().unwrap(),
        "length",
        "the bystander finished"
    );
    // Unknown names are not a directory listing.
    let (code, message) = generate(&mut c, json!({"template": "nope"})).unwrap_err();
    assert_eq!(code, "unknown_template");
    assert!(
        !message.contains("ok") && !message.contains("bomb"),
        "{message}"
    );
}

#[test]
fn symlinked_templates_are_refused_and_errors_carry_no_file_contents() {
    // A symlink in --templates: the daemon refuses to start, naming the link.
    let dir = template_dir("symlink");
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "root:x:0:0:TOPSECRET\n").unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("leak.j2")).unwrap();
    let socket = dir.join("s.sock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(["serve", "--model", smollm2().to_str().unwrap()])
        .args(["--socket", socket.to_str().unwrap()])
        .args(["--templates", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("leak.j2") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert!(!stderr.contains("TOPSECRET"), "{stderr}");
    // Without the link: an include of a name that is not a template reads no file, and a named
    // template's failing line is not quoted back.
    std::fs::remove_file(dir.join("leak.j2")).unwrap();
    std::fs::write(
        dir.join("broken.yaml.j2"),
        "- name: q\n  content: {{ TOPSECRET_VARIABLE }}\n",
    )
    .unwrap();
    let d = Daemon::start(
        "adv-symlink",
        &smollm2(),
        &["--templates", dir.to_str().unwrap()],
    );
    let mut c = d.client();
    for req in [
        json!({"template_yaml": "{% include 'secret.txt' %}"}),
        json!({"template_yaml": "{% include '../secret' %}"}),
        json!({"template": "broken"}),
    ] {
        let (code, message) = generate(&mut c, req.clone()).unwrap_err();
        assert_eq!(code, "template_error", "{req}: {message}");
        assert!(!message.contains("TOPSECRET"), "{req}: {message}");
    }
}

/// Bytes a raw connection receives within `wait` (until it closes).
fn read_for(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn slow_bodies_share_their_own_budget_and_big_ones_are_refused_before_100_continue() {
    let http = free_addr();
    let _d = Daemon::start(
        "adv-bodies",
        &smollm2(),
        &[
            "--http",
            &http.to_string(),
            "--http-max-connections",
            "4",
            "--http-body-timeout",
            "4",
            "--http-max-body-bytes",
            "1MiB",
        ],
    );
    // Three connections send a head and 12 bytes of a 1,000-byte body, then go quiet; a fourth
    // does the same with a chunk size of 2^60. The daemon is at its limit.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(http).unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"messages\":").unwrap();
        slow.push(s);
    }
    let mut chunked = TcpStream::connect(http).unwrap();
    chunked
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1000000000000000\r\n{\"mess")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Everyone else is still served: the oldest slow body makes room.
    let started = Instant::now();
    let r = post(
        http,
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Every slow body ends within its time limit, with 408 (or closed to make room).
    for mut s in slow.into_iter().chain([chunked]) {
        let got = read_for(&mut s, Duration::from_secs(8));
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    // Expect: 100-continue with a body over the limit: 413 at once, never 100 Continue.
    let mut s = TcpStream::connect(http).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\nexpect: 100-continue\r\n\r\n").unwrap();
    let got = read_for(&mut s, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

#[test]
fn large_bodies_are_parsed_off_the_io_thread_and_http_validates_as_the_socket_does() {
    let http = free_addr();
    let d = Daemon::start("adv-parse", &smollm2(), &["--http", &http.to_string()]);
    // A 7.5 MB chat body of 250,000 messages, parsed while another client pings.
    let messages: Vec<Value> = (0..250_000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let big = json!({"messages": messages, "max_tokens": 1}).to_string();
    let sender = std::thread::spawn(move || {
        let mut s = TcpStream::connect(http).unwrap();
        s.write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            big.as_bytes(),
        ))
        .unwrap();
        read_response(s).status
    });
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while !sender.is_finished() && started.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        assert_eq!(request(http, "GET", "/health", &[], b"").status, 200);
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sender.join().unwrap(),
        400,
        "250,000 messages exceed the context"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a health probe waited {slowest:?} behind a large body"
    );
    // Out-of-range floats are refused, not turned into defaults.
    for (field, v) in [
        ("temperature", 1e39),
        ("temperature", -1e39),
        ("top_p", 1e39),
        ("top_p", -1e39),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        body[field] = json!(v);
        post(http, &body).error(400, "invalid_parameter");
    }
    // Duplicate keys: one rule for both faces.
    let dup = br#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1,"max_tokens":2}"#;
    request(
        http,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        dup,
    )
    .error(400, "duplicate_key");
    // A million stop ids: refused on both faces.
    let ids: Vec<u32> = (0..1_000_000).collect();
    post(
        http,
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stop_token_ids": ids}),
    )
    .error(400, "invalid_parameter");
    let mut c = d.client();
    let (code, _) = generate(&mut c, json!({"prompt": "Hi", "stop_token_ids": ids})).unwrap_err();
    assert_eq!(code, "invalid_parameter");
    // A long socket line is parsed off the I/O thread too: the connection still works after.
    let long = "word ".repeat(1_500_000);
    let (code, _) = generate(&mut c, json!({"prompt": long})).unwrap_err();
    assert_eq!(code, "prompt_too_long");
}

#[test]
fn a_newcomer_is_admitted_during_a_long_prefill_and_its_wait_is_reported() {
    let d = Daemon::start(
        "adv-admission",
        &smollm2(),
        &[
            "--step-time-target-ms",
            "100",
            "--kv-cache-memory",
            "512MiB",
        ],
    );
    let mut long = d.client();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(500);
    long.send(&json!({"op":"generate","id":"long","prompt":prompt,"max_tokens":1,"stream":false}))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut short = d.client();
    let sent = Instant::now();
    short
        .send(&json!({"op":"generate","id":"short","prompt":"Hi","max_tokens":1,"stream":false}))
        .unwrap();
    let ttft_ms = match short.recv().unwrap() {
        Some(ServerEvent::Done { timing, .. }) => timing.ttft_ms,
        other => panic!("{other:?}"),
    };
    let short_done = Instant::now();
    let long_timing = match long.recv().unwrap() {
        Some(ServerEvent::Done { timing, .. }) => timing,
        other => panic!("{other:?}"),
    };
    // Tokenising 4,500 words took the long prompt a while before the engine saw it: `admit_ms`
    // says how long, and each later figure includes the ones before it.
    let t = long_timing;
    assert!(
        t.admit_ms > 0.0
            && t.admit_ms <= t.queue_ms
            && t.queue_ms <= t.ttft_ms
            && t.ttft_ms <= t.total_ms,
        "{t:?}"
    );
    // The long prompt was still being computed when the newcomer finished: it did not wait
    // for it (before, both finished in the step that ended the long prefill).
    let after = short_done.elapsed();
    assert!(
        after > Duration::from_millis(200),
        "the long prompt finished {after:?} after the newcomer"
    );
    // Its reported wait counts from when the daemon accepted it: at least half of what the
    // client saw (the rest is the socket and the client).
    let waited = short_done.duration_since(sent);
    assert!(
        ttft_ms >= waited.as_secs_f64() * 1e3 * 0.5,
        "reported {ttft_ms} ms, the client waited {waited:?}"
    );
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off() {
    let dir = std::env::temp_dir().join(format!("convoy-adv-{}-emfile", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    // A hard limit of 64 descriptors the daemon cannot raise.
    let child = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_convoy"))
        .args(["serve", "--model", smollm2().to_str().unwrap()])
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--kv-cache-memory",
            "64MiB",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    support::poll("the daemon to come up", 60, || {
        Client::connect(&socket).ok()
    });
    // Hold every descriptor the daemon has left, and more.
    let held: Vec<_> = (0..80)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(child.0.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(child.0.id()) - before;
    assert!(
        used < 0.5,
        "the daemon burnt {used:.2} s of CPU in 2 s at EMFILE"
    );
    // Once descriptors free up, clients are served again. Until the daemon has seen the held
    // connections close it still counts them, and a newcomer gets `too_many_connections`
    // (and the connection closed): that, and only that, is worth another try.
    drop(held);
    let req =
        json!({"op": "generate", "id": "adv", "prompt": "Hi", "max_tokens": 1, "stream": false});
    support::poll("a request served after EMFILE", 30, || {
        let mut c = Client::connect(&socket).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        match c.generate(&req).ok()? {
            (_, ServerEvent::Done { .. }) => Some(()),
            (_, ServerEvent::Error { code, .. }) if code == "too_many_connections" => None,
            (_, other) => panic!("{other:?}"),
        }
    });
    drop(child);
}
