//! One client connection: a reader loop that parses lines and a writer task that drains the
//! connection's outbound queue.
//!
//! Invariants:
//! - the engine thread never waits for this client: its sinks only push onto the queue; once
//!   the unwritten bytes exceed `max_pending_bytes` the request producing the next token is
//!   cancelled with `slow_consumer`, and no further line is read until the client catches up;
//! - every line the daemon cannot accept gets exactly one `error` line and the loop goes on;
//! - a line's lines are handled in order; encoding a prompt runs on the blocking pool, so a
//!   huge prompt delays only its own connection, never the others;
//! - a client that is gone (both directions closed, or a failed write) marks its queue closed:
//!   the engine drops its requests before scheduling them and frees their blocks; a client that
//!   only closed its sending side keeps its streams to the end.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use convoy_scheduler::{FinishReason, RequestId};

use crate::api::framing::{read_line_limited, Line};
use crate::api::protocol::{parse_line, ClientMessage, GenerateRequest, ServerEvent};
use crate::api::server::Shared;
use crate::api::stats;
use crate::api::translate::{encode_prompt, engine_request, error_event, submit_error, wire_event};
use convoy_engine::core::{EngineEvent, EventKind};
use convoy_engine::service::{Delivery, EventSink};

/// One connection's outbound queue, shared with the engine thread's sinks. Events travel as
/// values and are serialised by the connection's writer task, on the I/O side: the engine
/// thread, which hands over an event per running request per step, never formats JSON.
#[derive(Clone)]
struct Outbox {
    /// Each event with the bytes it was counted as in `pending`.
    tx: UnboundedSender<(ServerEvent, usize)>,
    pending: Arc<AtomicUsize>,
    limit: usize,
    /// Set once the client is known to be gone.
    closed: Arc<AtomicBool>,
}

impl Outbox {
    /// Queue an event unless the client is too far behind (`force` queues anyway).
    fn push(&self, ev: ServerEvent, force: bool) -> Delivery {
        let n = wire_bytes(&ev);
        if !force && self.pending.load(Ordering::Relaxed) + n > self.limit {
            return Delivery::TooSlow;
        }
        self.pending.fetch_add(n, Ordering::Relaxed);
        if self.tx.send((ev, n)).is_err() {
            return Delivery::Gone;
        }
        Delivery::Delivered
    }

    fn send(&self, ev: ServerEvent) {
        self.push(ev, true);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// The connection's live requests: the client's id to the engine's.
type LiveMap = Arc<Mutex<HashMap<String, RequestId>>>;

/// Where one request's engine events go: translated onto the connection's queue.
struct RequestSink {
    out: Outbox,
    live: LiveMap,
    client_id: String,
    stream: bool,
    shared: Arc<Shared>,
    /// For a templated prompt, the parts truncation cut (reported in `done`).
    truncated_parts: Option<Vec<String>>,
}

impl EventSink for RequestSink {
    fn send(&mut self, ev: EngineEvent) -> Delivery {
        let EventKind::Done(d) = &ev.kind else {
            return match wire_event(ev, &self.client_id, self.stream) {
                Some(se) => self.out.push(se, false),
                None => Delivery::Delivered,
            };
        };
        // The final event: text held back for stop strings goes first, then `done`.
        if self.stream && !d.unsent_text.is_empty() {
            let tail = ServerEvent::Token {
                id: self.client_id.clone(),
                text: d.unsent_text.clone(),
                token_ids: vec![],
                logprobs: None,
            };
            self.out.push(tail, true);
        }
        self.shared.latencies.record(d);
        self.live.lock().remove(&self.client_id);
        let failed = d.finish_reason == FinishReason::Error;
        let Some(mut se) = wire_event(ev, &self.client_id, self.stream) else {
            return Delivery::Delivered;
        };
        if let ServerEvent::Done {
            truncated_parts, ..
        } = &mut se
        {
            *truncated_parts = self.truncated_parts.take();
        }
        let delivery = self.out.push(se, true);
        if failed {
            self.out.send(error_event(
                Some(self.client_id.clone()),
                "engine_error",
                "the engine failed; the daemon is stopping",
            ));
        }
        delivery
    }

    fn is_closed(&self) -> bool {
        self.out.is_closed()
    }
}

/// Whether the peer closed both directions (not only its sending side).
fn peer_hung_up(stream: &impl AsFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

struct Connection {
    shared: Arc<Shared>,
    id: u64,
    out: Outbox,
    live: LiveMap,
}

impl Connection {
    async fn generate(&self, g: GenerateRequest, accepted: Instant, peer: BorrowedFd<'_>) {
        if self.shared.draining.load(Ordering::Relaxed) {
            self.out.send(error_event(
                Some(g.id),
                "shutting_down",
                "the daemon is shutting down",
            ));
            return;
        }
        if self.live.lock().contains_key(&g.id) {
            self.out.send(error_event(
                Some(g.id),
                "duplicate_id",
                "a request with this id is still live on this connection",
            ));
            return;
        }
        // Tokenising and rendering can take seconds for a huge prompt: off the I/O thread.
        let codec = self.shared.codec.clone();
        let templates = self.shared.template_context();
        let max_context = self.shared.cfg.max_context;
        let (prompt, special) = (g.prompt.clone(), g.special_tokens);
        let encoded = tokio::task::spawn_blocking(move || {
            encode_prompt(&codec, &templates, &prompt, special, max_context)
        })
        .await;
        let encoded = match encoded {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                self.out
                    .send(ServerEvent::from_error(e.with_id(Some(g.id))));
                return;
            }
            Err(_) => {
                self.out.send(error_event(
                    Some(g.id),
                    "invalid_prompt",
                    "encoding the prompt failed",
                ));
                return;
            }
        };
        if self.gone(peer) {
            return; // the client left while its prompt was encoded
        }
        let rid = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(g.id.clone(), rid);
        let req = engine_request(&g, encoded.ids, self.id, accepted);
        let sink = Box::new(RequestSink {
            out: self.out.clone(),
            live: self.live.clone(),
            client_id: g.id.clone(),
            stream: g.stream,
            shared: self.shared.clone(),
            truncated_parts: encoded.truncated_parts,
        });
        let (reply_out, reply_live, client_id) = (self.out.clone(), self.live.clone(), g.id);
        let reply = Box::new(move |r: Result<(), convoy_engine::core::SubmitError>| {
            if let Err(e) = r {
                reply_live.lock().remove(&client_id);
                reply_out.send(submit_error(&client_id, &e));
            }
        });
        if self
            .shared
            .engine
            .submit_with(rid, req, sink, reply)
            .is_err()
        {
            self.out
                .send(error_event(None, "engine_error", "the engine has stopped"));
        }
    }

    fn cancel(&self, id: String) {
        let rid = self.live.lock().get(&id).copied();
        match rid {
            Some(rid) => {
                let _ = self.shared.engine.abort(rid, FinishReason::Cancelled);
            }
            None => self.out.send(error_event(
                Some(id),
                "unknown_id",
                "no live request with this id on this connection",
            )),
        }
    }

    fn stats(&self) {
        let out = self.out.clone();
        let shared = self.shared.clone();
        let sent = self.shared.engine.stats_with(Box::new(move |s| {
            let report = stats::report(
                &s,
                shared.latencies.report(),
                shared.connections.load(Ordering::Relaxed),
                shared.started.elapsed().as_secs_f64(),
            );
            out.send(ServerEvent::Stats {
                stats: Box::new(report),
            });
        }));
        if sent.is_err() {
            self.out
                .send(error_event(None, "engine_error", "the engine has stopped"));
        }
    }

    async fn tokenize(&self, text: String, special_tokens: bool) {
        let codec = self.shared.codec.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            if special_tokens {
                codec.encode_with_special_tokens(&text)
            } else {
                codec.encode(&text)
            }
        })
        .await;
        match encoded {
            Ok(Ok(ids)) => self.out.send(ServerEvent::Tokenize { ids }),
            Ok(Err(e)) => self.out.send(error_event(None, e.code(), e.to_string())),
            Err(_) => self
                .out
                .send(error_event(None, "invalid_prompt", "tokenizing failed")),
        }
    }

    async fn handle(&self, line: &[u8], peer: BorrowedFd<'_>) {
        let accepted = Instant::now();
        // A long line (up to --max-line-bytes) takes long to parse: off the I/O thread, which
        // serves every other connection.
        let parsed = if line.len() > PARSE_INLINE_BYTES {
            let owned = line.to_vec();
            tokio::task::spawn_blocking(move || parse_line(&owned))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::api::protocol::ProtocolError::new(
                        "invalid_json",
                        "parsing the line failed",
                    ))
                })
        } else {
            parse_line(line)
        };
        match parsed {
            Err(e) => self.out.send(ServerEvent::from_error(e)),
            Ok(ClientMessage::Generate(g)) => self.generate(*g, accepted, peer).await,
            Ok(ClientMessage::Cancel { id }) => self.cancel(id),
            Ok(ClientMessage::Stats) => self.stats(),
            Ok(ClientMessage::Health) => {
                let status = if self.shared.draining.load(Ordering::Relaxed) {
                    "draining"
                } else {
                    "ok"
                };
                self.out.send(ServerEvent::Health {
                    status: status.into(),
                });
            }
            Ok(ClientMessage::Tokenize {
                text,
                special_tokens,
            }) => self.tokenize(text, special_tokens).await,
        }
    }

    /// Whether the client on socket `peer` is gone (marks the queue closed when it just found
    /// out).
    fn gone(&self, peer: BorrowedFd<'_>) -> bool {
        if !self.out.is_closed() && peer_hung_up(&peer) {
            self.out.closed.store(true, Ordering::Relaxed);
        }
        self.out.is_closed()
    }

    /// Cancel every live request of the connection.
    fn abort_all(&self) {
        let ids: Vec<RequestId> = self.live.lock().values().copied().collect();
        for rid in ids {
            let _ = self.shared.engine.abort(rid, FinishReason::Cancelled);
        }
    }
}

/// Most bytes gathered into one write of a connection's queued events.
const WRITE_BATCH_BYTES: usize = 64 << 10;

/// Append `ev` as one JSON line.
fn write_line(buf: &mut Vec<u8>, ev: &ServerEvent) {
    if serde_json::to_writer(&mut *buf, ev).is_err() {
        buf.extend_from_slice(
            b"{\"event\":\"error\",\"code\":\"internal\",\"message\":\"serialisation failed\"}",
        );
    }
    buf.push(b'\n');
}

/// About the bytes an event takes on the wire, for the slow-consumer limit (counted when the
/// event is queued, before it is serialised): its text and ids plus a fixed envelope.
fn wire_bytes(ev: &ServerEvent) -> usize {
    const ENVELOPE: usize = 96;
    match ev {
        ServerEvent::Token {
            id,
            text,
            token_ids,
            logprobs,
        } => {
            ENVELOPE
                + id.len()
                + text.len() * 2
                + token_ids.len() * 8
                + logprobs.as_ref().map_or(0, |l| {
                    l.len() * 40 + l.iter().map(|x| x.top.len() * 24).sum::<usize>()
                })
        }
        ServerEvent::Done {
            id,
            text,
            token_ids,
            ..
        } => {
            4 * ENVELOPE
                + id.len()
                + text.as_ref().map_or(0, |t| t.len() * 2)
                + token_ids.as_ref().map_or(0, |t| t.len() * 8)
        }
        _ => 4 * ENVELOPE,
    }
}

/// Lines up to this size are parsed on the I/O thread; longer ones on a blocking thread.
const PARSE_INLINE_BYTES: usize = 64 << 10;

/// Serve one client until it leaves.
pub async fn serve_connection(shared: Arc<Shared>, stream: UnixStream, id: u64) {
    // One file descriptor per client: the hang-up check polls the read half's socket rather
    // than a duplicate (a duplicate per connection halves the clients an open-file limit holds).
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = unbounded_channel::<(ServerEvent, usize)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let out = Outbox {
        tx,
        pending: pending.clone(),
        limit: shared.cfg.max_pending_bytes,
        closed: closed.clone(),
    };
    let writer = tokio::spawn(async move {
        // Allocated on the first write: an idle connection holds no batch buffer.
        let mut buf = Vec::new();
        while let Some((ev, n)) = rx.recv().await {
            // Serialise here, and everything else already queued with it: one write.
            buf.clear();
            write_line(&mut buf, &ev);
            let mut counted = n;
            while buf.len() < WRITE_BATCH_BYTES {
                let Ok((ev, n)) = rx.try_recv() else { break };
                write_line(&mut buf, &ev);
                counted += n;
            }
            if write.write_all(&buf).await.is_err() {
                closed.store(true, Ordering::Relaxed);
                break;
            }
            pending.fetch_sub(counted, Ordering::Relaxed);
        }
        let _ = write.shutdown().await;
    });
    let conn = Connection {
        shared: shared.clone(),
        id,
        out,
        live: Arc::new(Mutex::new(HashMap::new())),
    };
    let mut reader = BufReader::with_capacity(2048, read);
    let mut buf = Vec::new();
    let mut stopped = shared.stopped.subscribe();
    loop {
        // Back-pressure: while this client has not read what it was sent, read nothing more
        // from it, so replies it keeps asking for cannot pile up in memory.
        while conn.out.pending.load(Ordering::Relaxed) > conn.out.limit
            && !conn.out.is_closed()
            && !*stopped.borrow()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The daemon has stopped: read no more (a line cut off here was sent too late).
        let line = tokio::select! {
            line = read_line_limited(&mut reader, &mut buf, shared.cfg.max_line_bytes) => line,
            _ = stopped.wait_for(|s| *s) => break,
        };
        match line {
            Ok(Line::Complete) => conn.handle(&buf, reader.get_ref().as_ref().as_fd()).await,
            Ok(Line::TooLong) => conn.out.send(error_event(
                None,
                "line_too_long",
                format!("lines are limited to {} bytes", shared.cfg.max_line_bytes),
            )),
            Ok(Line::End) | Err(_) => break,
        }
    }
    // End of input. A client that closed both directions is gone: its requests are dropped now
    // (the engine skips them before scheduling). One that only closed its sending side still
    // gets its streams to the end, unless a write fails, which also marks it gone.
    if conn.gone(reader.get_ref().as_ref().as_fd()) {
        conn.abort_all();
    }
    while !conn.live.lock().is_empty() && !writer.is_finished() && !conn.out.is_closed() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.abort_all();
    drop(conn);
    let _ = writer.await;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
}
