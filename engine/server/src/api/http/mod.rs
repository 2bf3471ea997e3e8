//! The OpenAI-compatible HTTP face of the daemon (docs/http.md) and its Prometheus endpoint
//! (docs/metrics.md), on the daemon's runtime, beside the Unix socket and sharing its engine,
//! validation and error codes.
//!
//! hyper serves each connection (HTTP/1.1) and axum routes the requests. Invariants:
//! - every listener binds before the daemon says it is ready; a non-loopback TCP address is
//!   refused without an API key unless `--insecure-no-auth` is given;
//! - limits: request bodies (`--http-max-body-bytes`, 413), request heads
//!   (`--http-max-header-bytes`, 431), the time to send a request head (`--http-header-timeout`:
//!   a client that started one gets 408 and is closed, an idle keep-alive connection is just
//!   closed), and open HTTP connections (`--http-max-connections`: the next ones get 503);
//! - on drain (SIGTERM) `/health` answers 503 and new generations 503 (`shutting_down`), so a
//!   load balancer stops sending; idle keep-alive connections close and no connection is kept
//!   alive past its current request; requests in flight (streams included) go on to their end
//!   (within `--drain-timeout`), and the daemon waits for them to be written before it exits.

mod args;
mod body;
mod errors;
mod generate;
mod openai;
mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::api::server::Shared;
use crate::api::socket::bind_socket;

pub use args::{model_name_of, HttpArgs, API_KEY_ENV};
pub use errors::{status_for, ApiError};
pub use openai::{parse_request, Endpoint, Parsed};

/// Settings of the HTTP listeners.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// `--http ADDR`: the API (and `/metrics`) over TCP.
    pub listen: Option<SocketAddr>,
    /// `--http-socket PATH`: the API over a Unix socket (same mode and group as `--socket`).
    pub unix_socket: Option<PathBuf>,
    /// `--metrics ADDR`: `/metrics` (and `/health`) alone on another TCP listener.
    pub metrics: Option<SocketAddr>,
    /// Requests must carry `Authorization: Bearer <key>` (all routes but `/health`).
    pub api_key: Option<String>,
    /// Allow a non-loopback TCP listener without a key.
    pub insecure_no_auth: bool,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers); at least 8 KiB.
    pub max_header_bytes: usize,
    /// Longest time to receive a request head.
    pub header_read_timeout: Duration,
    /// Longest time to receive a request body, from the end of its head.
    pub body_read_timeout: Duration,
    /// Most open HTTP connections, all listeners together.
    pub max_connections: usize,
    /// The model name clients give and `/v1/models` lists.
    pub model_name: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            unix_socket: None,
            metrics: None,
            api_key: None,
            insecure_no_auth: false,
            max_body_bytes: 8 << 20,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            model_name: "convoy".into(),
        }
    }
}

/// How long a body must have been arriving before it may be shed for a new connection.
const BODY_SHED_AGE: Duration = Duration::from_secs(1);

/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8192;

impl HttpConfig {
    /// Whether any HTTP listener is configured.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.unix_socket.is_some() || self.metrics.is_some()
    }

    /// Refuse unsafe or impossible settings (before the model loads).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            bail!("the API key is empty");
        }
        if let Some(k) = &self.api_key {
            if k.trim() != k || !k.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("the API key must be printable ASCII without spaces");
            }
        }
        for (flag, addr) in [("--http", self.listen), ("--metrics", self.metrics)] {
            if let Some(a) = addr {
                if !a.ip().is_loopback() && self.api_key.is_none() && !self.insecure_no_auth {
                    bail!(
                        "{flag} {a} is not a loopback address: set an API key (--api-key or \
                         CONVOY_API_KEY) or pass --insecure-no-auth"
                    );
                }
            }
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            bail!("--http-max-header-bytes must be at least {MIN_HEADER_BYTES}");
        }
        if self.max_body_bytes == 0 || self.max_connections == 0 {
            bail!("--http-max-body-bytes and --http-max-connections must be positive");
        }
        if self.header_read_timeout.is_zero() || self.body_read_timeout.is_zero() {
            bail!("--http-header-timeout and --http-body-timeout must be positive");
        }
        Ok(())
    }
}

impl HttpConfig {
    /// Check, before the model loads, that every TCP address can be bound and every Unix
    /// socket path can be made (the listeners bind for real later).
    pub fn preflight(&self) -> anyhow::Result<()> {
        for (flag, addr) in [("--http", self.listen), ("--metrics", self.metrics)] {
            if let Some(a) = addr {
                // Port 0 picks a port at bind time: nothing to check but the address.
                std::net::TcpListener::bind(a).with_context(|| format!("{flag} {a}"))?;
            }
        }
        if let Some(p) = &self.unix_socket {
            crate::api::socket::preflight_socket(p, None)
                .with_context(|| format!("--http-socket {}", p.display()))?;
        }
        Ok(())
    }
}

/// What the HTTP side shares.
pub(crate) struct HttpShared {
    pub(crate) cfg: HttpConfig,
    pub(crate) key: Option<String>,
    /// Open HTTP connections.
    pub(crate) connections: AtomicUsize,
    /// Generation requests accepted and not yet answered in full.
    pub(crate) in_flight: AtomicUsize,
    next_connection: AtomicU64,
    pub(crate) next_response: AtomicU64,
    /// Unix time of the start (`/v1/models`' `created`).
    pub(crate) created: u64,
    /// Makes response ids differ between runs.
    pub(crate) id_base: u64,
    /// Request bodies being received, oldest first (shed at the connection limit).
    pub(crate) bodies: body::BodiesInFlight,
}

/// The state of every route.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    pub(crate) http: Arc<HttpShared>,
}

/// The HTTP connection a request came on (its fair-queuing owner without `user`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnId(pub(crate) u64);

/// hyper's view of a router: the connection id goes into each request; the future is boxed
/// so the connection can be polled without shutting its socket down.
#[derive(Clone)]
struct Svc {
    router: Router,
    conn: u64,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Svc {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnId(self.conn));
        let mut router = self.router.clone();
        Box::pin(async move {
            tower_service::Service::<Request<Incoming>>::call(&mut router, req).await
        })
    }
}

/// The running HTTP listeners.
pub(crate) struct HttpServer {
    app: App,
    unix_socket: Option<PathBuf>,
}

/// Bind the configured listeners and serve them on the current runtime until the drain.
pub(crate) async fn start(shared: Arc<Shared>) -> anyhow::Result<Option<HttpServer>> {
    let cfg = shared.cfg.http.clone();
    if !cfg.enabled() {
        return Ok(None);
    }
    cfg.validate()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let app = App {
        shared: shared.clone(),
        http: Arc::new(HttpShared {
            key: cfg.api_key.clone(),
            cfg: cfg.clone(),
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            next_connection: AtomicU64::new(1),
            next_response: AtomicU64::new(0),
            created: now.as_secs(),
            id_base: (now.as_nanos() as u64) & 0xffff_ffff,
            bodies: body::BodiesInFlight::default(),
        }),
    };
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut listeners: Vec<(Listener, Router)> = Vec::new();
    if let Some(addr) = cfg.listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--http {addr}"))?;
        let bound = l.local_addr()?;
        tracing::info!(%bound, "http listening");
        eprintln!("convoy: http on {bound}");
        listeners.push((Listener::Tcp(l), routes::api_router(app.clone())));
    }
    if let Some(addr) = cfg.metrics {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics {addr}"))?;
        let bound = l.local_addr()?;
        tracing::info!(%bound, "metrics listening");
        eprintln!("convoy: metrics on {bound}");
        listeners.push((Listener::Tcp(l), routes::metrics_router(app.clone())));
    }
    if let Some(path) = &cfg.unix_socket {
        let l = bind_socket(
            path,
            shared.cfg.socket_mode,
            shared.cfg.socket_group.as_deref(),
        )
        .with_context(|| format!("--http-socket {}", path.display()))?;
        eprintln!("convoy: http on unix:{}", path.display());
        listeners.push((Listener::Unix(l), routes::api_router(app.clone())));
    }
    for (listener, router) in listeners {
        tokio::spawn(accept_loop(app.clone(), listener, router, drain_rx.clone()));
    }
    // Tell listeners and connections when the daemon starts draining.
    let watched = shared.clone();
    tokio::spawn(async move {
        while !watched.draining.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = drain_tx.send(true);
    });
    Ok(Some(HttpServer {
        app,
        unix_socket: cfg.unix_socket.clone(),
    }))
}

impl HttpServer {
    /// After the engine stopped: wait (until `deadline`) for the answers in flight to be
    /// written, then remove the Unix socket.
    pub(crate) async fn finish(self, deadline: Instant) {
        while self.app.http.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(p) = &self.unix_socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Decrements the open-connection count when a connection ends.
struct Counted(Arc<HttpShared>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept until the daemon exits. During the drain connections are still accepted, so
/// `/health` can say 503 and new generations are refused with 503 (`shutting_down`), but
/// none is kept alive past its current request.
async fn accept_loop(app: App, listener: Listener, router: Router, drain: watch::Receiver<bool>) {
    let busy = routes::busy_router(app.http.cfg.max_connections);
    loop {
        let Some(io) = accept(&listener).await else {
            // Out of file descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let http = app.http.clone();
        let open = http.connections.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(http.clone());
        // At the limit, the connection whose body has been arriving longest makes room: slow
        // bodies compete with one another, not with everyone.
        let over = open >= http.cfg.max_connections && !http.bodies.shed_oldest(BODY_SHED_AGE);
        if open >= http.cfg.max_connections && !over {
            tracing::warn!("at the HTTP connection limit: closed the slowest request body");
        }
        let conn = http.next_connection.fetch_add(1, Ordering::Relaxed);
        let svc = Svc {
            router: if over { busy.clone() } else { router.clone() },
            conn,
        };
        let cfg = http.cfg.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _counted = counted;
            match io {
                Io::Tcp(s) => drive(s, svc, &cfg, !over, drain).await,
                Io::Unix(s) => drive(s, svc, &cfg, !over, drain).await,
            }
        });
    }
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> Option<Io> {
    match l {
        Listener::Tcp(l) => l.accept().await.ok().map(|(s, _)| {
            let _ = s.set_nodelay(true);
            Io::Tcp(s)
        }),
        Listener::Unix(l) => l.accept().await.ok().map(|(s, _)| Io::Unix(s)),
    }
}

/// The body of the 408 sent to a client too slow to send its request head.
fn timeout_response() -> Vec<u8> {
    let body = ApiError::new(
        "request_timeout",
        "the request head took too long to arrive",
    )
    .body()
    .to_string();
    let mut r = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// Serve one connection until it ends, the client is too slow, or the drain closes it.
async fn drive<I>(
    io: I,
    svc: Svc,
    cfg: &HttpConfig,
    keep_alive: bool,
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_header_size(cfg.max_header_bytes)
        .keep_alive(keep_alive && !*drain.borrow());
    let mut conn = builder.serve_connection(TokioIo::new(io), svc);
    // A connection accepted during the drain serves one request (keep-alive off above); one
    // open when the drain starts finishes its request in flight, or closes if idle.
    let mut draining = *drain.borrow();
    let result = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            _ = drain.changed(), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    if let Err(e) = result {
        // A client that began a request head and did not finish it in time hears why; an
        // idle keep-alive connection that timed out is closed without a word.
        if e.is_timeout() && !parts.read_buf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&timeout_response()))
                .await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}
