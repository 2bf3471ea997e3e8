//! End to end: the real `convoy serve --http`, talked to over TCP (and a Unix socket) with a
//! small HTTP/1.1 client written on std sockets, so each test controls exactly what is sent
//! (bytes one at a time, a hang-up mid-stream).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::http::{free_addr, raw_request, read_response, request, Resp};
use support::{poll, smollm2, wait_for_zero_held, Daemon};

fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: &Value) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    request(addr, "POST", path, &headers, body.to_string().as_bytes())
}

/// The `data:` payloads of a server-sent event stream.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn bad_input_gets_its_status_and_error_body_and_the_daemon_keeps_serving() {
    let addr = free_addr();
    let a = addr.to_string();
    let d = Daemon::start(
        "http-errors",
        &smollm2(),
        &[
            "--http",
            &a,
            "--api-key",
            "sk-test",
            "--http-max-body-bytes",
            "64KiB",
            "--http-header-timeout",
            "2",
        ],
    );
    let key = Some("sk-test");
    // Authentication: missing, wrong, and a health probe that needs none.
    let r = post(addr, "/v1/chat/completions", None, &chat("Hi", 2));
    r.error(401, "missing_api_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    post(
        addr,
        "/v1/chat/completions",
        Some("sk-wrong"),
        &chat("Hi", 2),
    )
    .error(401, "invalid_api_key");
    post(addr, "/v1/chat/completions", Some("sk-tes"), &chat("Hi", 2))
        .error(401, "invalid_api_key");
    request(addr, "GET", "/metrics", &[], b"").error(401, "missing_api_key");
    let h = request(addr, "GET", "/health", &[], b"");
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    // Malformed JSON, wrong types, out of range, unsupported values.
    let auth = [("authorization", "Bearer sk-test")];
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &auth,
        b"{\"messages\": [",
    )
    .error(400, "invalid_json");
    let r = post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}),
    );
    r.error(400, "invalid_type");
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"messages": "hello"}),
    )
    .error(400, "invalid_type");
    post(addr, "/v1/chat/completions", key, &json!([1, 2])).error(400, "not_an_object");
    let r = post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
    );
    r.error(400, "invalid_parameter");
    assert_eq!(r.json()["error"]["param"], "n");
    post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}),
    )
    .error(400, "invalid_parameter");
    post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"messages": [{"role": "tool", "content": "x"}]}),
    )
    .error(400, "invalid_parameter");
    post(
        addr,
        "/v1/completions",
        key,
        &json!({"prompt": [999999999]}),
    )
    .error(400, "token_out_of_range");
    post(
        addr,
        "/v1/completions",
        key,
        &json!({"prompt": "hello ".repeat(9000)}),
    )
    .error(400, "prompt_too_long");
    post(
        addr,
        "/v1/chat/completions",
        key,
        &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
    )
    .error(404, "model_not_found");
    // Oversized body: announced by content-length, and sent chunked without one.
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    post(addr, "/v1/chat/completions", key, &big).error(413, "body_too_large");
    let mut s = TcpStream::connect(addr).unwrap();
    let head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer sk-test\r\ntransfer-encoding: chunked\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    for _ in 0..4 {
        let chunk = vec![b' '; 30_000];
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break; // the server answered and closed
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    read_response(s).error(413, "body_too_large");
    // Unknown routes and methods.
    request(addr, "GET", "/v1/nope", &auth, b"").error(404, "not_found");
    request(addr, "GET", "/v1/chat/completions", &auth, b"").error(405, "method_not_allowed");
    // A head over the limit is refused by hyper itself.
    let huge = "a".repeat(70_000);
    let r = request(addr, "GET", "/health", &[("x-filler", &huge)], b"");
    assert_eq!(r.status, 431);

    // A client that sends its head one byte a second is cut off with 408 after the header
    // timeout (2 s), while another client is served meanwhile.
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let t = Instant::now();
        for b in b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\n\r\n" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            if t.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        let r = read_response(s);
        (r.status, r.json(), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let m = request(addr, "GET", "/v1/models", &auth, b"");
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let (status, body, took) = slow.join().unwrap();
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(took < Duration::from_secs(6), "{took:?}");

    // After all that the daemon still answers.
    let r = post(addr, "/v1/chat/completions", key, &chat("Hello!", 4));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    drop(d);
}

#[test]
fn chat_and_completions_stream_report_usage_and_a_hang_up_frees_blocks() {
    let addr = free_addr();
    let a = addr.to_string();
    let dir = std::env::temp_dir().join(format!("convoy-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let http_sock = dir.join("http.sock");
    let _ = std::fs::remove_file(&http_sock);
    let mut d = Daemon::start(
        "http-chat",
        &smollm2(),
        &["--http", &a, "--http-socket", http_sock.to_str().unwrap()],
    );
    let mut c = d.client();

    // Whole answer, then the same conversation streamed: the same greedy text, usage last,
    // and the prompt served from the cache.
    let r = post(
        addr,
        "/v1/chat/completions",
        None,
        &chat("Name three colors.", 12),
    );
    assert_eq!(r.status, 200);
    let whole = r.json();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let mut body = chat("Name three colors.", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(addr, "/v1/chat/completions", None, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = sse_events(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"],
        "{events:?}"
    );
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached < prompt, "{usage}");
    assert!(chunks[1..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    // Completions with log-probabilities, over the Unix socket.
    let mut s = UnixStream::connect(&http_sock).unwrap();
    let body = json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2});
    s.write_all(&raw_request(
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    ))
    .unwrap();
    let r = read_response(s);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{v}");
    let joined: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());

    // A client that hangs up mid-stream cancels its request and frees its blocks.
    let mut s = TcpStream::connect(addr).unwrap();
    let long = json!({"prompt": "Once upon a time", "max_tokens": 100000, "ignore_eos": true, "stream": true});
    s.write_all(&raw_request(
        "POST",
        "/v1/completions",
        &[],
        long.to_string().as_bytes(),
    ))
    .unwrap();
    let mut r = BufReader::new(s);
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0);
        if line.contains("\"text\"") {
            seen += 1;
        }
    }
    assert!(support::held_blocks(&mut c) > 0);
    drop(r);
    wait_for_zero_held(&mut c);
    // The same for a client waiting for a whole answer.
    let mut s = TcpStream::connect(addr).unwrap();
    let long = json!({"prompt": "Once upon a time", "max_tokens": 100000, "ignore_eos": true});
    s.write_all(&raw_request(
        "POST",
        "/v1/completions",
        &[],
        long.to_string().as_bytes(),
    ))
    .unwrap();
    poll("the request to run", 30, || {
        (c.stats().unwrap().running == 1).then_some(())
    });
    drop(s);
    wait_for_zero_held(&mut c);

    // Metrics: the counters moved; the cancelled requests are counted.
    let m = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("convoy:generation_tokens_total{") >= 27.0);
    assert!(value("convoy:prefix_cache_hits_total{model_name=\"SmolLM2-135M-Instruct.Q4_1\",tier=\"device\"}") >= cached as f64);
    assert_eq!(value("convoy:request_finished_total{model_name=\"SmolLM2-135M-Instruct.Q4_1\",finished_reason=\"cancelled\"}"), 2.0);
    assert!(value("convoy:time_to_first_token_seconds_count{") >= 3.0);
    assert_eq!(value("convoy:num_requests_running{"), 0.0);

    // Drain: a stream in flight goes on to its end, /health says 503 and new work is refused.
    // The stream is long enough (seconds even with fast kernels) that the drain is still
    // waiting on it while the test asks.
    let mut s = TcpStream::connect(addr).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true, "stream": true});
    s.write_all(&raw_request(
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    ))
    .unwrap();
    let mut r = BufReader::new(s);
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGTERM).unwrap();
    let h = poll("/health to say draining", 10, || {
        let h = request(addr, "GET", "/health", &[], b"");
        (h.status == 503).then_some(h)
    });
    h.error(503, "shutting_down");
    post(addr, "/v1/chat/completions", None, &chat("Hi", 2)).error(503, "shutting_down");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let status = d.wait_exit("the daemon to stop", 60);
    assert!(status.success(), "{status}");
    assert!(!http_sock.exists(), "the HTTP socket is removed");
}

#[test]
fn refuses_an_open_address_without_a_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args([
            "serve",
            "--model",
            smollm2().to_str().unwrap(),
            "--http",
            "0.0.0.0:0",
        ])
        .env_remove("CONVOY_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-auth"), "{err}");
}
