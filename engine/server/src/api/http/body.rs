//! Reading a request body within its limits, and parsing it off the I/O thread.
//!
//! Invariants:
//! - A body announced larger than `--http-max-body-bytes` (`Content-Length`) is refused with
//!   413 before a byte of it is read, so `Expect: 100-continue` gets 413, never `100 Continue`
//!   (hyper sends that only when the body is first read). A chunked body is cut off at the
//!   limit as it arrives.
//! - A body must arrive within `--http-body-timeout` of the request head (408, connection
//!   closed): a client that stops mid-body holds its connection for that long at most.
//! - While the daemon is at `--http-max-connections`, each new connection closes the body that
//!   has been arriving longest (at least a second): slow bodies share their own budget instead
//!   of locking everyone else out.
//! - Bodies over [`PARSE_INLINE_BYTES`] are parsed on a blocking thread, never on the I/O
//!   thread that serves every other connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use http_body::Body as _;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::api::http::errors::ApiError;

/// Bodies up to this size are parsed where they were read; larger ones on a blocking thread.
pub(crate) const PARSE_INLINE_BYTES: usize = 64 << 10;

/// The request bodies being received, by the order they started in.
#[derive(Default)]
pub(crate) struct BodiesInFlight {
    inner: Mutex<BodiesState>,
}

#[derive(Default)]
struct BodiesState {
    next: u64,
    /// Start order -> (when it started, how to close it).
    open: BTreeMap<u64, (Instant, Arc<Notify>)>,
}

impl BodiesInFlight {
    fn register(&self) -> (u64, Arc<Notify>) {
        let mut s = self.inner.lock();
        let seq = s.next;
        s.next += 1;
        let shed = Arc::new(Notify::new());
        s.open.insert(seq, (Instant::now(), shed.clone()));
        (seq, shed)
    }

    fn remove(&self, seq: u64) {
        self.inner.lock().open.remove(&seq);
    }

    /// Close the body that started first, if it has been arriving at least `min_age`.
    /// Returns whether one was closed.
    pub(crate) fn shed_oldest(&self, min_age: Duration) -> bool {
        let mut s = self.inner.lock();
        let Some((&seq, (started, _))) = s.open.iter().next() else {
            return false;
        };
        if started.elapsed() < min_age {
            return false;
        }
        if let Some((_, shed)) = s.open.remove(&seq) {
            shed.notify_one();
        }
        true
    }
}

/// Removes a body from [`BodiesInFlight`] however its read ends.
struct Registered<'a> {
    bodies: &'a BodiesInFlight,
    seq: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.bodies.remove(self.seq);
    }
}

/// Why a body could not be read, as the client hears it.
fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        "body_too_large",
        format!("request bodies are limited to {limit} bytes"),
    )
}

/// Read the whole body of a request whose head is `headers`, within `limit` bytes and
/// `timeout`, or until the connection limit sheds it.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
    bodies: &BodiesInFlight,
) -> Result<Bytes, ApiError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let (seq, shed) = bodies.register();
    let _registered = Registered { bodies, seq };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = body;
    let mut data = Vec::with_capacity(announced.unwrap_or(0).min(limit as u64) as usize);
    loop {
        let frame = tokio::select! {
            f = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)) => f,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ApiError::new(
                    "request_timeout",
                    format!("the request body took longer than {:.0} s to arrive", timeout.as_secs_f64()),
                ));
            }
            _ = shed.notified() => {
                return Err(ApiError::new(
                    "request_timeout",
                    "the request body was too slow while the daemon was at its connection limit",
                ));
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                return Err(ApiError::new(
                    "invalid_body",
                    format!("reading the body failed: {e}"),
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    if data.len() + chunk.len() > limit {
                        return Err(too_large(limit));
                    }
                    data.extend_from_slice(&chunk);
                }
            }
        }
    }
    Ok(Bytes::from(data))
}

/// Run `parse` on `body`: here when it is small, else on a blocking thread (a panic there is
/// the request's error, not the daemon's).
pub(crate) async fn parse_off_io<T: Send + 'static>(
    body: Bytes,
    parse: impl FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if body.len() <= PARSE_INLINE_BYTES {
        return parse(&body);
    }
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .unwrap_or_else(|_| Err(ApiError::new("invalid_body", "reading the request failed")))
}
