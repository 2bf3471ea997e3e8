//! `convoy serve`: the Unix-socket daemon. Tokio on the I/O side (one task per connection plus
//! one writer task each), the engine thread on the other, channels between them.
//!
//! Invariants:
//! - the engine thread never waits for a client: sinks only push onto a connection's queue; a
//!   connection whose unwritten bytes exceed `max_pending_bytes` has the request that overflowed
//!   it cancelled with `slow_consumer`;
//! - every malformed line gets one `error` line and the connection goes on;
//! - a disconnect cancels every live request of the connection, which frees their KV blocks;
//! - on SIGTERM/SIGINT the daemon stops accepting, lets running requests finish within the drain
//!   timeout, cancels the rest (each gets its final event), removes the socket and exits 0; if
//!   the engine thread dies, every client gets an error and the daemon exits non-zero.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_scheduler::{FinishReason, RequestId};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::api::protocol::{
    parse_line, ClientMessage, GenerateRequest, LogprobOut, Prompt, ProtocolError, ServerEvent,
    TimingOut, UsageOut,
};
use crate::core::{EngineEvent, EngineRequest, EventKind};
use crate::sampler::SamplingParams;
use crate::service::{Delivery, EngineHandle};
use crate::tokenizer::TextCodec;

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Socket file mode (0o600 by default).
    pub socket_mode: u32,
    /// Group to give the socket to (with a mode that lets the group in).
    pub socket_group: Option<String>,
    /// Connections beyond this are refused with an error line.
    pub max_connections: usize,
    /// Lines longer than this are refused.
    pub max_line_bytes: usize,
    /// Unwritten bytes per connection before a request is cancelled as a slow consumer.
    pub max_pending_bytes: usize,
    /// How long running requests may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Longest context of the model, to refuse prompts that cannot fit.
    pub max_context: usize,
}

#[derive(Default)]
struct Latencies {
    ttft_ms: std::collections::VecDeque<f64>,
    total_ms: std::collections::VecDeque<f64>,
}

impl Latencies {
    const KEEP: usize = 10_000;
    fn record(&mut self, t: &TimingOut) {
        if self.ttft_ms.len() == Self::KEEP {
            self.ttft_ms.pop_front();
            self.total_ms.pop_front();
        }
        self.ttft_ms.push_back(t.ttft_ms);
        self.total_ms.push_back(t.total_ms);
    }
}

/// The `p` quantile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(v: Vec<f64>) -> Vec<f64> {
    let mut v = v;
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

struct Shared {
    engine: EngineHandle,
    codec: TextCodec,
    cfg: ServeConfig,
    next_id: AtomicU64,
    connections: AtomicUsize,
    draining: AtomicBool,
    started: Instant,
    latencies: Mutex<Latencies>,
}

/// One connection's outbound queue, shared by the engine thread's sinks.
#[derive(Clone)]
struct Outbox {
    tx: UnboundedSender<String>,
    pending: Arc<AtomicUsize>,
    limit: usize,
}

impl Outbox {
    /// Queue a line unless the client is too far behind (`force` queues anyway).
    fn push(&self, line: String, force: bool) -> Delivery {
        let n = line.len();
        if !force && self.pending.load(Ordering::Relaxed) + n > self.limit {
            return Delivery::TooSlow;
        }
        self.pending.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(line).is_err() {
            return Delivery::Gone;
        }
        Delivery::Delivered
    }

    fn send(&self, ev: ServerEvent) {
        self.push(ev.to_line(), true);
    }
}

type LiveMap = Arc<Mutex<HashMap<String, RequestId>>>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn translate(ev: EngineEvent, client_id: &str, stream: bool) -> Option<ServerEvent> {
    match ev.kind {
        EventKind::Token {
            text,
            token_ids,
            logprobs,
        } => stream.then(|| ServerEvent::Token {
            id: client_id.to_string(),
            text,
            token_ids,
            logprobs: logprobs.map(|l| {
                vec![LogprobOut {
                    logprob: l.logprob,
                    top: l.top,
                }]
            }),
        }),
        EventKind::Done(d) => Some(ServerEvent::Done {
            id: client_id.to_string(),
            finish_reason: d.finish_reason.as_str().to_string(),
            text: (!stream).then_some(d.text),
            token_ids: (!stream).then_some(d.output_ids),
            usage: UsageOut {
                prompt_tokens: d.usage.prompt_tokens,
                cached_tokens: d.usage.cached_tokens,
                host_cached_tokens: d.usage.host_cached_tokens,
                completion_tokens: d.usage.completion_tokens,
            },
            timing: TimingOut {
                queue_ms: ms(d.timing.queue),
                ttft_ms: ms(d.timing.ttft),
                total_ms: ms(d.timing.total),
            },
        }),
    }
}

fn error_event(id: Option<String>, code: &str, message: impl Into<String>) -> ServerEvent {
    ServerEvent::Error {
        id,
        code: code.to_string(),
        message: message.into(),
    }
}

impl Shared {
    fn prompt_ids(&self, p: &Prompt) -> Result<Vec<u32>, ProtocolError> {
        use crate::tokenizer::CodecError;
        let ids = match p {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => self.codec.encode(t).map_err(|e| match e {
                CodecError::NoTokenizer => ProtocolError::new("no_tokenizer", e.to_string()),
                other => ProtocolError::new("invalid_prompt", other.to_string()),
            })?,
            Prompt::Messages(m) => self.codec.encode_chat(m).map_err(|e| match e {
                CodecError::NoChatTemplate => ProtocolError::new("no_chat_template", e.to_string()),
                CodecError::NoTokenizer => ProtocolError::new("no_tokenizer", e.to_string()),
                other => ProtocolError::new("template_error", other.to_string()),
            })?,
        };
        if ids.is_empty() {
            return Err(ProtocolError::new(
                "empty_prompt",
                "the prompt encodes to no tokens",
            ));
        }
        if ids.len() >= self.cfg.max_context {
            return Err(ProtocolError::new(
                "prompt_too_long",
                format!(
                    "the prompt has {} tokens; the context holds {}",
                    ids.len(),
                    self.cfg.max_context
                ),
            ));
        }
        Ok(ids)
    }

    fn generate(self: &Arc<Self>, g: GenerateRequest, out: &Outbox, live: &LiveMap) {
        let client_id = g.id.clone();
        if self.draining.load(Ordering::Relaxed) {
            out.send(error_event(
                Some(client_id),
                "shutting_down",
                "the daemon is shutting down",
            ));
            return;
        }
        let ids = match self.prompt_ids(&g.prompt) {
            Ok(ids) => ids,
            Err(e) => {
                out.send(ServerEvent::from_error(ProtocolError {
                    id: Some(client_id),
                    ..e
                }));
                return;
            }
        };
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
            if l.contains_key(&client_id) {
                drop(l);
                out.send(error_event(
                    Some(client_id),
                    "duplicate_id",
                    "a request with this id is still live on this connection",
                ));
                return;
            }
            l.insert(client_id.clone(), rid);
        }
        let req = EngineRequest {
            prompt_ids: ids,
            params: SamplingParams {
                temperature: g.temperature,
                top_k: g.top_k,
                top_p: g.top_p,
                seed: g.seed,
                max_tokens: g.max_tokens,
                stop_token_ids: g.stop_token_ids,
                stop: g.stop,
                ignore_eos: g.ignore_eos,
            },
            priority: g.priority,
            cache_salt: g.cache_salt,
            logprobs: g.logprobs,
            deadline: g.deadline_ms.map(Duration::from_millis),
        };
        let stream = g.stream;
        let sink_out = out.clone();
        let sink_live = live.clone();
        let sink_id = client_id.clone();
        let shared = self.clone();
        let sink = Box::new(move |ev: EngineEvent| {
            let done = matches!(ev.kind, EventKind::Done(_));
            if let EventKind::Done(d) = &ev.kind {
                if stream && !d.unsent_text.is_empty() {
                    let tail = ServerEvent::Token {
                        id: sink_id.clone(),
                        text: d.unsent_text.clone(),
                        token_ids: vec![],
                        logprobs: None,
                    };
                    sink_out.push(tail.to_line(), true);
                }
            }
            let Some(se) = translate(ev, &sink_id, stream) else {
                return Delivery::Delivered;
            };
            if done {
                if let ServerEvent::Done { timing, .. } = &se {
                    shared
                        .latencies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(timing);
                }
                sink_live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&sink_id);
                let failed = matches!(&se, ServerEvent::Done { finish_reason, .. } if finish_reason == "error");
                let delivery = sink_out.push(se.to_line(), true);
                if failed {
                    sink_out.send(error_event(
                        Some(sink_id.clone()),
                        "engine_error",
                        "the engine failed; the daemon is stopping",
                    ));
                }
                return delivery;
            }
            sink_out.push(se.to_line(), false)
        });
        let reply_out = out.clone();
        let reply_live = live.clone();
        let reply = Box::new(move |r: Result<(), String>| {
            if let Err(msg) = r {
                reply_live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&client_id);
                let code = if msg.contains("queue is full") {
                    "queue_full"
                } else if msg.contains("context holds") || msg.contains("KV blocks") {
                    "prompt_too_long"
                } else if msg.contains("vocabulary") {
                    "token_out_of_range"
                } else {
                    "invalid_parameter"
                };
                reply_out.send(error_event(Some(client_id), code, msg));
            }
        });
        if self.engine.submit_with(rid, req, sink, reply).is_err() {
            out.send(error_event(
                Some(g.id),
                "engine_error",
                "the engine has stopped",
            ));
        }
    }

    fn stats(&self, reply_to: &Outbox) {
        let out = reply_to.clone();
        let uptime = self.started.elapsed().as_secs_f64();
        let connections = self.connections.load(Ordering::Relaxed);
        // Copy under the lock (the engine thread records into it), sort outside it.
        let (ttft, total) = {
            let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
            (
                l.ttft_ms.iter().copied().collect::<Vec<_>>(),
                l.total_ms.iter().copied().collect::<Vec<_>>(),
            )
        };
        let (ttft, total) = (sorted(ttft), sorted(total));
        let (p50, p90, p99, t50, t99) = (
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.9),
            percentile(&ttft, 0.99),
            percentile(&total, 0.5),
            percentile(&total, 0.99),
        );
        let sent = self.engine.stats_with(Box::new(move |s| {
            let e = s.engine;
            let prompt = e.prompt_tokens.max(1) as f64;
            let v = json!({
                "queue": s.waiting,
                "running": s.running,
                "connections": connections,
                "kv": {
                    "block_size": s.block_size,
                    "device_blocks": s.device_blocks,
                    "device_blocks_held": s.device_blocks_held,
                    "device_blocks_cached": s.device_blocks_cached,
                    "host_blocks": s.host_blocks,
                    "host_blocks_cached": s.host_blocks_cached,
                    "device_usage": s.device_blocks_held as f64 / s.device_blocks.max(1) as f64,
                },
                "cache": {
                    "prompt_tokens": e.prompt_tokens,
                    "cached_prompt_tokens": e.cached_prompt_tokens,
                    "hit_ratio": e.cached_prompt_tokens as f64 / prompt,
                    "device_hit_ratio": (e.cached_prompt_tokens - e.host_cached_prompt_tokens) as f64 / prompt,
                    "host_hit_ratio": e.host_cached_prompt_tokens as f64 / prompt,
                    "swapped_out_blocks": e.cache.swapped_out_blocks,
                    "swapped_in_blocks": e.cache.swapped_in_blocks,
                },
                "generated_tokens": e.generated_tokens,
                "generated_tokens_per_s": e.generated_tokens as f64 / uptime.max(1e-9),
                "finished_requests": e.finished_requests,
                "preemptions": e.preemptions,
                "latency_ms": {"ttft_p50": p50, "ttft_p90": p90, "ttft_p99": p99, "total_p50": t50, "total_p99": t99},
                "verified_prefills": e.verified_prefills,
                "cache_divergence_total": e.cache_divergence_total,
                "uptime_s": uptime,
            });
            let stats: Map<String, Value> = match v {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            out.send(ServerEvent::Stats { stats });
        }));
        if sent.is_err() {
            reply_to.send(error_event(None, "engine_error", "the engine has stopped"));
        }
    }
}

async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<bool>> {
    // Returns Some(true) for a complete line within the limit, Some(false) for an over-long line
    // (discarded up to its newline), None at end of input.
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() && !too_long {
                None
            } else {
                Some(!too_long)
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i)),
            None => (available, None),
        };
        if !too_long {
            if buf.len() + chunk.len() > limit {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        match found {
            Some(i) => {
                r.consume(i + 1);
                return Ok(Some(!too_long));
            }
            None => {
                let n = available.len();
                r.consume(n);
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = unbounded_channel::<String>();
    let pending = Arc::new(AtomicUsize::new(0));
    let out = Outbox {
        tx,
        pending: pending.clone(),
        limit: shared.cfg.max_pending_bytes,
    };
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            let n = line.len();
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            pending.fetch_sub(n, Ordering::Relaxed);
        }
        let _ = write.shutdown().await;
    });
    let live: LiveMap = Arc::new(Mutex::new(HashMap::new()));
    let mut reader = BufReader::with_capacity(2048, read);
    let mut buf = Vec::new();
    loop {
        // Back-pressure: while this client has not read what it was sent, read nothing more
        // from it, so replies it keeps asking for cannot pile up in memory.
        while out.pending.load(Ordering::Relaxed) > out.limit {
            if out.tx.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let line = match read_line_limited(&mut reader, &mut buf, shared.cfg.max_line_bytes).await {
            Ok(Some(true)) => &buf,
            Ok(Some(false)) => {
                out.send(error_event(
                    None,
                    "line_too_long",
                    format!("lines are limited to {} bytes", shared.cfg.max_line_bytes),
                ));
                continue;
            }
            Ok(None) | Err(_) => break,
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match parse_line(line) {
            Err(e) => out.send(ServerEvent::from_error(e)),
            Ok(ClientMessage::Generate(g)) => shared.generate(*g, &out, &live),
            Ok(ClientMessage::Cancel { id }) => {
                let rid = live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .copied();
                match rid {
                    Some(rid) => {
                        let _ = shared.engine.abort(rid, FinishReason::Cancelled);
                    }
                    None => out.send(error_event(
                        Some(id),
                        "unknown_id",
                        "no live request with this id on this connection",
                    )),
                }
            }
            Ok(ClientMessage::Stats) => shared.stats(&out),
            Ok(ClientMessage::Health) => {
                let status = if shared.draining.load(Ordering::Relaxed) {
                    "draining"
                } else {
                    "ok"
                };
                out.send(ServerEvent::Health {
                    status: status.into(),
                });
            }
            Ok(ClientMessage::Tokenize { text }) => match shared.codec.encode(&text) {
                Ok(ids) => out.send(ServerEvent::Tokenize { ids }),
                Err(e) => out.send(error_event(None, "no_tokenizer", e.to_string())),
            },
        }
    }
    // End of input. A client that only closed its sending side (a script piping a request into
    // the socket) still gets its streams to the end; one that is gone makes the writer fail,
    // which cancels its requests through their sinks. Whatever is still live is then cancelled.
    while !live.lock().unwrap_or_else(|e| e.into_inner()).is_empty() && !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids: Vec<RequestId> = live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .collect();
    for rid in ids {
        let _ = shared.engine.abort(rid, FinishReason::Cancelled);
    }
    drop(out);
    let _ = writer.await;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
}

fn prepare_socket(cfg: &ServeConfig) -> anyhow::Result<UnixListener> {
    use anyhow::{bail, Context};
    if cfg.socket.exists() {
        if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
            bail!(
                "{} is in use by a live daemon; refusing to start",
                cfg.socket.display()
            );
        }
        std::fs::remove_file(&cfg.socket)
            .with_context(|| format!("removing stale socket {}", cfg.socket.display()))?;
        tracing::info!(socket = %cfg.socket.display(), "removed a stale socket");
    }
    // Create the socket file with no access for others from the start, then set the mode.
    // SAFETY: umask(2) only swaps the process's file creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&cfg.socket);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(previous) };
    let listener = bound.with_context(|| format!("binding {}", cfg.socket.display()))?;
    let access = || -> anyhow::Result<()> {
        std::fs::set_permissions(
            &cfg.socket,
            std::fs::Permissions::from_mode(cfg.socket_mode),
        )?;
        if let Some(group) = &cfg.socket_group {
            let gid = group_id(group).with_context(|| format!("unknown group {group:?}"))?;
            std::os::unix::fs::chown(&cfg.socket, None, Some(gid))?;
        }
        Ok(())
    };
    if let Err(e) = access() {
        // Leave no socket behind that nobody serves.
        let _ = std::fs::remove_file(&cfg.socket);
        return Err(e);
    }
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.split(':');
        (parts.next()? == name)
            .then(|| parts.nth(1)?.parse().ok())
            .flatten()
    })
}

/// Run the daemon until a signal (exit code 0) or an engine failure (non-zero).
pub fn serve(engine: EngineHandle, codec: TextCodec, cfg: ServeConfig) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = prepare_socket(&cfg)?;
        let socket = cfg.socket.clone();
        let watcher = engine.clone();
        let shared = Arc::new(Shared {
            engine: watcher,
            codec,
            cfg,
            next_id: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            latencies: Mutex::new(Latencies::default()),
        });
        tracing::info!(socket = %socket.display(), "ready");
        eprintln!("convoy: ready on {}", socket.display());
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let failed = loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    if shared.connections.load(Ordering::Relaxed) >= shared.cfg.max_connections {
                        let line = error_event(None, "too_many_connections", format!("the daemon holds {} connections", shared.cfg.max_connections)).to_line();
                        tokio::spawn(async move {
                            let mut s = stream;
                            let _ = s.write_all(line.as_bytes()).await;
                            let _ = s.shutdown().await;
                        });
                        continue;
                    }
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(shared.clone(), stream));
                }
                _ = sigterm.recv() => break false,
                _ = sigint.recv() => break false,
                _ = tick.tick() => {
                    if engine.is_finished() {
                        break true;
                    }
                }
            }
        };
        drop(listener);
        if failed {
            let reason = engine.join().err().unwrap_or_else(|| "the engine stopped".into());
            tracing::error!(%reason, "engine thread failed");
            eprintln!("convoy: engine failed: {reason}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = std::fs::remove_file(&socket);
            return Ok(2);
        }
        // Drain: no new work, let running requests finish, then cancel the rest.
        shared.draining.store(true, Ordering::Relaxed);
        tracing::info!(timeout_s = shared.cfg.drain_timeout.as_secs_f64(), "draining");
        let deadline = Instant::now() + shared.cfg.drain_timeout;
        while Instant::now() < deadline {
            // Ask without blocking the I/O thread: writers keep flushing while we wait.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let asked = shared.engine.stats_with(Box::new(move |s| {
                let _ = tx.send(s);
            }));
            match (asked, rx.await) {
                (Ok(()), Ok(s)) if s.running + s.waiting == 0 => break,
                (Ok(()), Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        engine.shutdown();
        let result = engine.join();
        // Give connection writers a moment to flush the final events.
        let flush_until = Instant::now() + Duration::from_secs(2);
        while shared.connections.load(Ordering::Relaxed) > 0 && Instant::now() < flush_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!("stopped");
        Ok(if result.is_ok() { 0 } else { 2 })
    })
}

/// Allow as many open files as the hard limit permits (thousands of client connections).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass; failure is harmless.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
