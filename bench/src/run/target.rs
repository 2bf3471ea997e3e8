//! Where requests go: convoy's Unix socket (its JSON-lines protocol) or any OpenAI-compatible
//! HTTP server (streaming chat completions). Both report the same [`TurnOutcome`], timed on
//! this side: send, each token event, the end.
//!
//! A request that fails (an `error` event, an HTTP status, a dropped connection) gives a
//! [`RequestFailure`] with a stable code; it never stops the run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_server::api::protocol::ServerEvent;
use convoy_weights::ChatMessage;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One request as the driver asks for it.
#[derive(Clone, Debug)]
pub struct TurnRequest {
    /// Unique id of the request (conversation id and turn).
    pub id: String,
    /// Conversation id (the routing key).
    pub conversation: String,
    /// The messages.
    pub messages: Vec<ChatMessage>,
    /// Reply budget.
    pub max_tokens: usize,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
    /// Sampling temperature.
    pub temperature: f64,
}

/// What a finished request measured.
#[derive(Clone, Debug, Default)]
pub struct TurnOutcome {
    /// Send to first token.
    pub ttft: Duration,
    /// The engine's own time to first token, from the request's handoff (convoy's socket
    /// reports `ttft_ms` and `admit_ms` in `done`: their difference): what is left of `ttft`
    /// is the edge (framing, templating, tokenising, delivery).
    pub engine_ttft: Option<Duration>,
    /// Gaps between successive token events.
    pub itl: Vec<Duration>,
    /// Send to the end.
    pub e2e: Duration,
    /// The reply's text.
    pub text: String,
    /// Prompt tokens (as the server counted them).
    pub prompt_tokens: usize,
    /// Of those, served from the server's device cache tier.
    pub cached_tokens: usize,
    /// Of those, served from the host tier (convoy's socket only).
    pub host_cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// A request that did not complete.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RequestFailure {
    /// Stable code: the server's error code, `http_<status>`, `disconnected`, `io`, `protocol`.
    pub code: String,
    /// What happened.
    pub message: String,
}

impl RequestFailure {
    fn new(code: impl Into<String>, message: impl Into<String>) -> RequestFailure {
        RequestFailure {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Where requests go.
#[derive(Clone)]
pub enum Target {
    /// convoy's socket.
    Socket(PathBuf),
    /// An OpenAI-compatible server.
    OpenAi(OpenAiTarget),
}

/// An OpenAI-compatible server.
#[derive(Clone)]
pub struct OpenAiTarget {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// Bearer token.
    pub api_key: Option<String>,
    /// The `model` field (empty: the first model `/v1/models` lists, found by `probe`).
    pub model: String,
    client: HttpClient<HttpConnector, Full<Bytes>>,
}

impl OpenAiTarget {
    /// A target on `url` (http only: servers under test listen on loopback).
    pub fn new(url: &str, api_key: Option<String>, model: String) -> anyhow::Result<OpenAiTarget> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") {
            anyhow::bail!("--url must start with http:// (got {url})");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(OpenAiTarget {
            url,
            api_key,
            model,
            client,
        })
    }
}

/// A connection kept for one conversation's turns (the socket target reuses it).
pub struct Session {
    socket: Option<BufReader<UnixStream>>,
}

impl Target {
    /// Check that the server answers, with a clear error when it does not; an OpenAI target
    /// without a model name takes the first one the server lists.
    pub async fn probe(&mut self) -> anyhow::Result<()> {
        match self {
            Target::Socket(path) => {
                let mut s = UnixStream::connect(&*path).await.map_err(|e| {
                    anyhow::anyhow!("cannot connect to the daemon at {}: {e}", path.display())
                })?;
                s.write_all(b"{\"op\":\"health\"}\n").await?;
                let mut r = BufReader::new(s);
                let mut line = String::new();
                tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                    .await
                    .map_err(|_| anyhow::anyhow!("the daemon did not answer `health` in 10 s"))??;
                match serde_json::from_str::<ServerEvent>(&line) {
                    Ok(ServerEvent::Health { status }) if status == "ok" => Ok(()),
                    other => anyhow::bail!("unexpected answer to `health`: {other:?}"),
                }
            }
            Target::OpenAi(t) => {
                let mut req = hyper::Request::get(format!("{}/v1/models", t.url));
                if let Some(k) = &t.api_key {
                    req = req.header("authorization", format!("Bearer {k}"));
                }
                let req = req.body(Full::new(Bytes::new()))?;
                let resp = tokio::time::timeout(Duration::from_secs(10), t.client.request(req))
                    .await
                    .map_err(|_| anyhow::anyhow!("{} did not answer in 10 s", t.url))?
                    .map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", t.url))?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    anyhow::bail!(
                        "GET {}/v1/models answered {status}: {}",
                        t.url,
                        String::from_utf8_lossy(&body)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    );
                }
                if t.model.is_empty() {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    t.model = v["data"][0]["id"]
                        .as_str()
                        .ok_or_else(|| {
                            anyhow::anyhow!("{}/v1/models lists no model: give --model-name", t.url)
                        })?
                        .to_string();
                }
                Ok(())
            }
        }
    }

    /// A new session (no connection is opened until the first request).
    pub fn session(&self) -> Session {
        Session { socket: None }
    }

    /// Send one request and time it.
    pub async fn send(
        &self,
        session: &mut Session,
        req: &TurnRequest,
    ) -> Result<TurnOutcome, RequestFailure> {
        match self {
            Target::Socket(path) => send_socket(path, session, req).await,
            Target::OpenAi(t) => send_openai(t, req).await,
        }
    }
}

fn io_failure(e: std::io::Error) -> RequestFailure {
    RequestFailure::new("io", e.to_string())
}

async fn send_socket(
    path: &PathBuf,
    session: &mut Session,
    req: &TurnRequest,
) -> Result<TurnOutcome, RequestFailure> {
    if session.socket.is_none() {
        let s = UnixStream::connect(path).await.map_err(io_failure)?;
        session.socket = Some(BufReader::new(s));
    }
    let Some(conn) = session.socket.as_mut() else {
        return Err(RequestFailure::new("io", "no connection"));
    };
    let mut line = serde_json::to_string(&json!({
        "op": "generate",
        "id": req.id,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "ignore_eos": req.ignore_eos,
        "temperature": req.temperature,
        "stream": true,
    }))
    .map_err(|e| RequestFailure::new("protocol", e.to_string()))?;
    line.push('\n');
    let sent = Instant::now();
    let result = async {
        conn.get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(io_failure)?;
        let mut out = TurnOutcome::default();
        let mut last: Option<Instant> = None;
        let mut buf = String::new();
        loop {
            buf.clear();
            if conn.read_line(&mut buf).await.map_err(io_failure)? == 0 {
                return Err(RequestFailure::new(
                    "disconnected",
                    "the daemon closed the connection",
                ));
            }
            let ev: ServerEvent = serde_json::from_str(&buf)
                .map_err(|e| RequestFailure::new("protocol", format!("{e}: {buf}")))?;
            match ev {
                ServerEvent::Token { id, text, .. } if id == req.id => {
                    let now = Instant::now();
                    match last {
                        None => out.ttft = now - sent,
                        Some(prev) => out.itl.push(now - prev),
                    }
                    last = Some(now);
                    out.text.push_str(&text);
                }
                ServerEvent::Done {
                    id,
                    finish_reason,
                    usage,
                    timing,
                    ..
                } if id == req.id => {
                    out.e2e = sent.elapsed();
                    // From the handoff to the engine: the daemon's TTFT counts from reading
                    // the line, before templating and tokenising (`admit_ms`).
                    let engine_ms = timing.ttft_ms - timing.admit_ms;
                    out.engine_ttft = (engine_ms.is_finite() && engine_ms >= 0.0)
                        .then(|| Duration::from_secs_f64(engine_ms / 1e3));
                    if last.is_none() {
                        out.ttft = out.e2e;
                    }
                    if finish_reason == "error" {
                        return Err(RequestFailure::new("engine_error", "finish_reason error"));
                    }
                    out.prompt_tokens = usage.prompt_tokens;
                    out.cached_tokens = usage.cached_tokens;
                    out.host_cached_tokens = usage.host_cached_tokens;
                    out.completion_tokens = usage.completion_tokens;
                    return Ok(out);
                }
                ServerEvent::Error { code, message, .. } => {
                    return Err(RequestFailure::new(code, message));
                }
                _ => {}
            }
        }
    }
    .await;
    if result.is_err() {
        // The connection's state is unknown after a failure: the next turn opens a new one.
        session.socket = None;
    }
    result
}

async fn send_openai(t: &OpenAiTarget, req: &TurnRequest) -> Result<TurnOutcome, RequestFailure> {
    let body = json!({
        "model": t.model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": req.conversation,
        "ignore_eos": req.ignore_eos,
    });
    let mut builder = hyper::Request::post(format!("{}/v1/chat/completions", t.url))
        .header("content-type", "application/json")
        .header("x-session-id", &req.conversation);
    if let Some(k) = &t.api_key {
        builder = builder.header("authorization", format!("Bearer {k}"));
    }
    let http_req = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| RequestFailure::new("protocol", e.to_string()))?;
    let sent = Instant::now();
    let resp = t
        .client
        .request(http_req)
        .await
        .map_err(|e| RequestFailure::new("disconnected", e.to_string()))?;
    let status = resp.status();
    let body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        return Err(RequestFailure::new(
            format!("http_{}", status.as_u16()),
            message,
        ));
    }
    let mut out = TurnOutcome::default();
    let mut last: Option<Instant> = None;
    let mut finished = false;
    // Server-sent events, parsed by eventsource-stream (multi-line data, comments, CRLF).
    let mut events = body.into_data_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| match e {
            EventStreamError::Transport(e) => RequestFailure::new("disconnected", e.to_string()),
            other => RequestFailure::new("protocol", other.to_string()),
        })?;
        let payload = event.data.as_str();
        if payload == "[DONE]" {
            finished = true;
            continue;
        }
        let v: Value = serde_json::from_str(payload)
            .map_err(|e| RequestFailure::new("protocol", format!("{e}: {payload}")))?;
        if let Some(err) = v.get("error") {
            return Err(RequestFailure::new(
                err["code"].as_str().unwrap_or("stream_error").to_string(),
                err["message"].as_str().unwrap_or("").to_string(),
            ));
        }
        let delta = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !delta.is_empty() {
            let now = Instant::now();
            match last {
                None => out.ttft = now - sent,
                Some(prev) => out.itl.push(now - prev),
            }
            last = Some(now);
            out.text.push_str(delta);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |x: &Value| x.as_u64().unwrap_or(0) as usize;
            out.prompt_tokens = n(&u["prompt_tokens"]);
            out.completion_tokens = n(&u["completion_tokens"]);
            out.cached_tokens = n(&u["prompt_tokens_details"]["cached_tokens"]);
            // llama-server reports its prompt-cache reuse in `timings.cache_n`.
            if out.cached_tokens == 0 {
                out.cached_tokens = n(&v["timings"]["cache_n"]);
            }
        }
    }
    if !finished {
        return Err(RequestFailure::new(
            "disconnected",
            "the stream ended before [DONE]",
        ));
    }
    out.e2e = sent.elapsed();
    if last.is_none() {
        out.ttft = out.e2e;
    }
    Ok(out)
}
