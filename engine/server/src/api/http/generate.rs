//! One HTTP generation: submit to the engine (the same path as a socket `generate`), then
//! answer with one JSON object or with server-sent events.
//!
//! Invariants:
//! - the engine thread never waits for an HTTP client: the sink only pushes onto an unbounded
//!   queue; once the unread bytes pass `--max-pending-bytes` the request is cancelled with
//!   `slow_consumer` (its final event still goes out);
//! - a client that goes away cancels its request at once: hyper drops the handler (waiting
//!   for a whole answer) or the response body (streaming), and the [`AbortGuard`] they own
//!   aborts the engine request, whose blocks are freed; the sink also reports itself closed,
//!   so a request still queued is dropped before it is scheduled;
//! - every refusal before the first byte is an HTTP status with an OpenAI error body; an
//!   engine failure after the stream started is an `error` event, then `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use convoy_scheduler::{FinishReason, RequestId};

use crate::api::http::errors::{json_response, ApiError};
use crate::api::http::openai::{
    chat_logprobs, completion_logprobs, finish_reason, usage, Endpoint, LogprobToken, LogprobsMode,
    TokenLogprob,
};
use crate::api::http::App;
use crate::api::protocol::GenerateRequest;
use crate::api::translate::{encode_prompt, engine_request};
use convoy_engine::core::{Done, EngineEvent, EventKind, SubmitError};
use convoy_engine::runner::TokenLogprobs;
use convoy_engine::service::{Delivery, EventSink};

/// Bytes an event takes on the wire, roughly (for the slow-consumer limit).
fn event_bytes(ev: &EngineEvent) -> usize {
    match &ev.kind {
        EventKind::Token {
            text,
            token_ids,
            logprobs,
        } => {
            200 + text.len()
                + 8 * token_ids.len()
                + logprobs.as_ref().map_or(0, |l| 64 * (1 + l.top.len()))
        }
        EventKind::Done(d) => 400 + d.text.len() + d.unsent_text.len(),
    }
}

/// Where the engine puts one HTTP request's events.
struct HttpSink {
    tx: UnboundedSender<EngineEvent>,
    pending: Arc<AtomicUsize>,
    limit: usize,
    app: App,
}

impl EventSink for HttpSink {
    fn send(&mut self, ev: EngineEvent) -> Delivery {
        let n = event_bytes(&ev);
        if let EventKind::Done(d) = &ev.kind {
            self.app.shared.latencies.record(d);
        } else if self.pending.load(Ordering::Relaxed) + n > self.limit {
            return Delivery::TooSlow;
        }
        self.pending.fetch_add(n, Ordering::Relaxed);
        // A failed send means the client left. Not `Gone`: the engine drops the final event of
        // a request cancelled that way, and it would go unrecorded in the latencies and
        // metrics. `is_closed` reports the same client before the next step, and the request
        // is aborted then, with its final event delivered here.
        let _ = self.tx.send(ev);
        Delivery::Delivered
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Aborts the engine request when dropped before its final event (the client left), and
/// counts the HTTP requests in flight (the drain waits for them to be written).
pub(crate) struct AbortGuard {
    app: App,
    rid: RequestId,
    finished: bool,
}

impl AbortGuard {
    fn new(app: App, rid: RequestId) -> AbortGuard {
        app.http.in_flight.fetch_add(1, Ordering::Relaxed);
        AbortGuard {
            app,
            rid,
            finished: false,
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .app
                .shared
                .engine
                .abort(self.rid, FinishReason::Cancelled);
        }
        self.app.http.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request the engine accepted.
pub(crate) struct Submitted {
    rx: UnboundedReceiver<EngineEvent>,
    pending: Arc<AtomicUsize>,
    guard: AbortGuard,
}

impl Submitted {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<EngineEvent>> {
        self.rx.poll_recv(cx).map(|ev| {
            let ev = ev?;
            self.pending.fetch_sub(event_bytes(&ev), Ordering::Relaxed);
            if matches!(ev.kind, EventKind::Done(_)) {
                self.guard.finished = true;
            }
            Some(ev)
        })
    }

    async fn next(&mut self) -> Option<EngineEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

fn submit_refusal(e: &SubmitError) -> ApiError {
    ApiError::new(e.code(), e.to_string())
}

/// Encode the prompt (off the I/O thread) and hand the request to the engine; answers once
/// the engine accepted or refused it.
pub(crate) async fn submit(
    app: &App,
    g: &GenerateRequest,
    owner: u64,
    accepted: std::time::Instant,
) -> Result<Submitted, ApiError> {
    let shared = &app.shared;
    if shared.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            "shutting_down",
            "the daemon is shutting down",
        ));
    }
    let codec = shared.codec.clone();
    let templates = shared.template_context();
    let max_context = shared.cfg.max_context;
    let (prompt, special) = (g.prompt.clone(), g.special_tokens);
    let encoded = tokio::task::spawn_blocking(move || {
        encode_prompt(&codec, &templates, &prompt, special, max_context)
    })
    .await
    .map_err(|_| ApiError::new("invalid_prompt", "encoding the prompt failed"))?
    .map_err(ApiError::from)?;
    let rid = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let req = engine_request(g, encoded.ids, owner, accepted);
    let (tx, rx) = unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let sink = Box::new(HttpSink {
        tx,
        pending: pending.clone(),
        limit: shared.cfg.max_pending_bytes,
        app: app.clone(),
    });
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let reply = Box::new(move |r: Result<(), SubmitError>| {
        let _ = reply_tx.send(r);
    });
    if shared.engine.submit_with(rid, req, sink, reply).is_err() {
        return Err(ApiError::new("engine_error", "the engine has stopped"));
    }
    // From here on a client that leaves cancels the request.
    let guard = AbortGuard::new(app.clone(), rid);
    match reply_rx.await {
        Ok(Ok(())) => Ok(Submitted { rx, pending, guard }),
        Ok(Err(e)) => {
            let mut guard = guard;
            guard.finished = true;
            Err(submit_refusal(&e))
        }
        Err(_) => Err(ApiError::new("engine_error", "the engine has stopped")),
    }
}

/// What every response of one request shares.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub(crate) endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) logprobs: LogprobsMode,
    pub(crate) include_usage: bool,
}

/// Log-probabilities of one token event in OpenAI's terms (token texts decoded).
fn token_logprobs(app: &App, ids: &[u32], lp: Option<TokenLogprobs>) -> Option<TokenLogprob> {
    let lp = lp?;
    let codec = &app.shared.codec;
    let token = |id: u32, logprob: f32| LogprobToken {
        text: codec.decode(&[id]).unwrap_or_default(),
        bytes: codec.token_bytes(id),
        logprob,
    };
    Some(TokenLogprob {
        token: match ids.last() {
            Some(&id) => token(id, lp.logprob),
            None => LogprobToken {
                text: String::new(),
                bytes: Vec::new(),
                logprob: lp.logprob,
            },
        },
        top: lp.top.iter().map(|&(id, l)| token(id, l)).collect(),
    })
}

fn engine_failed() -> ApiError {
    ApiError::new("engine_error", "the engine failed; the daemon is stopping")
}

/// Wait for the whole answer and send it as one JSON object.
pub(crate) async fn complete(app: App, mut sub: Submitted, meta: Meta) -> Response {
    let mut lps = Vec::new();
    let done: Done = loop {
        match sub.next().await {
            Some(EngineEvent {
                kind:
                    EventKind::Token {
                        token_ids,
                        logprobs,
                        ..
                    },
                ..
            }) => {
                if meta.logprobs != LogprobsMode::Off {
                    lps.extend(token_logprobs(&app, &token_ids, logprobs));
                }
            }
            Some(EngineEvent {
                kind: EventKind::Done(d),
                ..
            }) => break d,
            None => return engine_failed().into_response(),
        }
    };
    if done.finish_reason == FinishReason::Error {
        return engine_failed().into_response();
    }
    let logprobs = match meta.logprobs {
        LogprobsMode::Off => Value::Null,
        LogprobsMode::Chat(_) => chat_logprobs(&lps),
        LogprobsMode::Completions(_) => completion_logprobs(&lps, 0),
    };
    let choice = match meta.endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(&done),
        }),
        Endpoint::Completions => json!({
            "index": 0,
            "text": done.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(&done),
        }),
    };
    let object = match meta.endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": meta.id,
            "object": object,
            "created": meta.created,
            "model": meta.model,
            "choices": [choice],
            "usage": usage(&done.usage),
        }),
    )
}

/// The body of a streamed answer: engine events turned into `data:` lines as hyper asks for
/// more, so an unread stream holds its events in the queue (and the slow-consumer limit
/// applies). Dropping it (the client left) aborts the request.
struct SseBody {
    app: App,
    sub: Submitted,
    meta: Meta,
    out: VecDeque<Bytes>,
    /// Bytes of the tokens sent so far (completions' `text_offset`).
    sent_text: usize,
    ended: bool,
}

impl SseBody {
    fn data(&mut self, v: &Value) {
        self.out.push_back(Bytes::from(format!("data: {v}\n\n")));
    }

    /// One chunk with a text delta and optional log-probabilities or finish reason.
    fn chunk(&mut self, text: Option<&str>, lp: Option<&TokenLogprob>, finish: Option<&str>) {
        let lps: Vec<TokenLogprob> = lp.into_iter().cloned().collect();
        let choice = match self.meta.endpoint {
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": if lps.is_empty() { Value::Null } else { chat_logprobs(&lps) },
                    "finish_reason": finish,
                })
            }
            Endpoint::Completions => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": if lps.is_empty() { Value::Null } else { completion_logprobs(&lps, self.sent_text) },
                "finish_reason": finish,
            }),
        };
        // Offsets count the tokens' real bytes (a character split across tokens is held back
        // from `text` until it is whole, but its bytes belong to the tokens that carry them).
        self.sent_text += match lp {
            Some(l) => l.token.bytes.len(),
            None => text.map_or(0, str::len),
        };
        let chunk = self.envelope(vec![choice]);
        self.data(&chunk);
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        let object = match self.meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut v = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        });
        if self.meta.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn first(&mut self) {
        if self.meta.endpoint == Endpoint::Chat {
            let choice = json!({
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            });
            let v = self.envelope(vec![choice]);
            self.data(&v);
        }
    }

    fn on_event(&mut self, ev: EngineEvent) {
        match ev.kind {
            EventKind::Token {
                text,
                token_ids,
                logprobs,
            } => {
                let lp = match self.meta.logprobs {
                    LogprobsMode::Off => None,
                    _ => token_logprobs(&self.app, &token_ids, logprobs),
                };
                if !text.is_empty() || lp.is_some() {
                    self.chunk(Some(&text), lp.as_ref(), None);
                }
            }
            EventKind::Done(d) => {
                if !d.unsent_text.is_empty() {
                    self.chunk(Some(&d.unsent_text), None, None);
                }
                if d.finish_reason == FinishReason::Error {
                    self.data(&engine_failed().body());
                } else {
                    self.chunk(None, None, Some(finish_reason(&d)));
                    if self.meta.include_usage {
                        let mut v = self.envelope(vec![]);
                        v["usage"] = usage(&d.usage);
                        self.data(&v);
                    }
                }
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.ended = true;
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        // Take every event that is ready, then send what they made in one frame.
        while !this.ended {
            match this.sub.poll_event(cx) {
                Poll::Ready(Some(ev)) => this.on_event(ev),
                Poll::Ready(None) => {
                    // The engine dropped the sink without a final event: it stopped.
                    this.data(&engine_failed().body());
                    this.finish();
                }
                Poll::Pending => break,
            }
        }
        if this.out.is_empty() {
            return if this.ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        let mut buf = Vec::new();
        for b in this.out.drain(..) {
            buf.extend_from_slice(&b);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty()
    }
}

/// Answer with server-sent events.
pub(crate) fn stream(app: App, sub: Submitted, meta: Meta) -> Response {
    let mut body = SseBody {
        app,
        sub,
        meta,
        out: VecDeque::new(),
        sent_text: 0,
        ended: false,
    };
    body.first();
    let mut r = Response::new(Body::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
