//! `convoy serve`: the Unix-socket daemon. Tokio on the I/O side (one task per connection plus
//! one writer task each, see `connection`), the engine thread on the other, channels between
//! them.
//!
//! Invariants:
//! - on SIGTERM/SIGINT the daemon stops accepting, lets running requests finish within the drain
//!   timeout, cancels the rest (each gets its final event), removes the socket and exits 0; if
//!   the engine thread dies, every client gets an error and the daemon exits non-zero;
//! - connections beyond `max_connections` get one `too_many_connections` line and are closed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::api::connection::serve_connection;
use crate::api::socket::bind_socket;
use crate::api::stats::Latencies;
use crate::api::translate::error_event;
use crate::api::translate::TemplateContext;
use crate::prompt::{RenderLimits, RenderPool, TemplateRegistry, TemplateSet, WorkerCommand};
use convoy_engine::service::EngineHandle;
use convoy_engine::tokenizer::TextCodec;

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
    /// Prompt templates (`--templates DIR`), reloaded on SIGHUP.
    pub templates: Option<PathBuf>,
    /// What bounds one template render (output, memory, time, workers).
    pub render: RenderLimits,
    /// How to start a render worker process; `None` renders templates in the daemon's own
    /// process, where a memory bomb can abort it (for embedding in trusted programs only).
    pub render_worker: Option<WorkerCommand>,
    /// The OpenAI-compatible HTTP listeners and `/metrics` (none by default).
    pub http: crate::api::http::HttpConfig,
}

/// First wait after a failed `accept`, in milliseconds; it grows to ten times this while
/// accepting keeps failing.
const ACCEPT_BACKOFF_MS: u64 = 10;

/// How often the drain says how it goes.
const DRAIN_REPORT_EVERY: Duration = Duration::from_secs(2);

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) engine: EngineHandle,
    pub(crate) codec: TextCodec,
    pub(crate) cfg: ServeConfig,
    /// Engine request ids, unique across connections.
    pub(crate) next_id: AtomicU64,
    /// Open connections.
    pub(crate) connections: AtomicUsize,
    /// Set from SIGTERM on: new `generate` lines are refused.
    pub(crate) draining: AtomicBool,
    /// Set once the engine has stopped and every final event is queued: connections stop
    /// reading, send what they hold and close (an idle client does not hold the exit).
    pub(crate) stopped: tokio::sync::watch::Sender<bool>,
    pub(crate) started: Instant,
    pub(crate) latencies: Latencies,
    /// The prompt templates, when the daemon has a `--templates` directory.
    pub(crate) templates: Option<Arc<TemplateRegistry>>,
    /// The set inline templates render with when there is no `--templates` directory.
    pub(crate) inline_templates: Arc<TemplateSet>,
    /// The render workers (see [`ServeConfig::render_worker`]).
    pub(crate) render_pool: Option<Arc<RenderPool>>,
}

impl Shared {
    /// What a templated prompt renders with now.
    pub(crate) fn template_context(&self) -> TemplateContext {
        match &self.templates {
            Some(registry) => TemplateContext {
                set: registry.current(),
                has_dir: true,
                pool: self.render_pool.clone(),
            },
            None => TemplateContext {
                set: self.inline_templates.clone(),
                has_dir: false,
                pool: self.render_pool.clone(),
            },
        }
    }
}

/// Run the daemon until a signal (exit code 0) or an engine failure (non-zero).
pub fn serve(engine: EngineHandle, codec: TextCodec, cfg: ServeConfig) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let templates = match &cfg.templates {
            Some(dir) => {
                let registry = TemplateRegistry::load(dir, cfg.render.max_output_bytes)
                    .map_err(|e| anyhow::anyhow!("--templates {}: {e}", dir.display()))?;
                tracing::info!(templates = registry.current().names().len(), dir = %dir.display(), "templates loaded");
                Some(Arc::new(registry))
            }
            None => None,
        };
        let socket = cfg.socket.clone();
        let mut inline_templates = TemplateSet::new();
        inline_templates.set_max_output_bytes(cfg.render.max_output_bytes);
        let render_pool = cfg
            .render_worker
            .clone()
            .map(|command| Arc::new(RenderPool::new(command, cfg.render.clone())));
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            codec,
            cfg,
            next_id: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stopped: tokio::sync::watch::Sender::new(false),
            started: Instant::now(),
            latencies: Latencies::default(),
            templates,
            inline_templates: Arc::new(inline_templates),
            render_pool,
        });
        // The HTTP listeners bind first: clients take a connectable socket to mean the whole
        // daemon is up.
        let http = crate::api::http::start(shared.clone()).await?;
        let listener = match bind_socket(
            &shared.cfg.socket,
            shared.cfg.socket_mode,
            shared.cfg.socket_group.as_deref(),
        ) {
            Ok(l) => l,
            Err(e) => {
                if let Some(h) = http {
                    h.finish(Instant::now()).await;
                }
                return Err(e);
            }
        };
        tracing::info!(socket = %socket.display(), "ready");
        eprintln!("convoy: ready on {}", socket.display());
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut next_connection = 0u64;
        let mut accept_failures = 0u64;
        let failed = loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => {
                            accept_failures = 0;
                            stream
                        }
                        Err(e) => {
                            // Out of file descriptors (EMFILE, ENFILE) or memory: retrying at
                            // once would spin a core. Back off, and say so once per episode.
                            if accept_failures == 0 {
                                tracing::warn!(error = %e, "accepting a socket connection failed; backing off");
                            }
                            accept_failures += 1;
                            let wait = ACCEPT_BACKOFF_MS.saturating_mul(accept_failures.min(10));
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            continue;
                        }
                    };
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
                    next_connection += 1;
                    tokio::spawn(serve_connection(shared.clone(), stream, next_connection));
                }
                _ = sighup.recv() => {
                    if let Some(registry) = shared.templates.clone() {
                        // Reading and compiling templates is file I/O: off the I/O thread.
                        let reloaded = tokio::task::spawn_blocking(move || registry.reload()).await;
                        match reloaded {
                            Ok(Ok(n)) => tracing::info!(templates = n, "templates reloaded"),
                            Ok(Err(e)) => tracing::error!(error = %e, "template reload failed; keeping the previous templates"),
                            Err(e) => tracing::error!(error = %e, "template reload failed; keeping the previous templates"),
                        }
                    }
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
            if let Some(h) = http {
                h.finish(Instant::now()).await;
            }
            return Ok(2);
        }
        // Drain: no new work, let running requests finish, then cancel the rest.
        shared.draining.store(true, Ordering::Relaxed);
        tracing::info!(timeout_s = shared.cfg.drain_timeout.as_secs_f64(), "draining");
        let drain_started = Instant::now();
        let deadline = drain_started + shared.cfg.drain_timeout;
        // Say what the drain waits for, and how it goes every few seconds: a stop that takes
        // half a minute is not silent.
        let mut next_report = drain_started;
        while Instant::now() < deadline {
            // Ask without blocking the I/O thread: writers keep flushing while we wait.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let asked = shared.engine.stats_with(Box::new(move |s| {
                let _ = tx.send(s);
            }));
            match (asked, rx.await) {
                (Ok(()), Ok(s)) if s.running + s.waiting == 0 => break,
                (Ok(()), Ok(s)) => {
                    if Instant::now() >= next_report {
                        eprintln!(
                            "convoy: draining: {} running, {} waiting; cancelling what is left in {:.0} s",
                            s.running,
                            s.waiting,
                            deadline.saturating_duration_since(Instant::now()).as_secs_f64()
                        );
                        next_report += DRAIN_REPORT_EVERY;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => break,
            }
        }
        engine.shutdown();
        let result = engine.join();
        // Every final event is queued: connections send theirs and close, idle ones too
        // (counted first: once told, they close on other threads at once).
        let open = shared.connections.load(Ordering::Relaxed);
        shared.stopped.send_replace(true);
        if open > 0 {
            eprintln!("convoy: closing {open} open connection(s)");
        }
        // Give connection writers a moment to flush the final events.
        let flush_until = Instant::now() + Duration::from_secs(2);
        while shared.connections.load(Ordering::Relaxed) > 0 && Instant::now() < flush_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(h) = http {
            h.finish(flush_until).await;
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!("stopped");
        eprintln!(
            "convoy: stopped after a {:.1} s drain",
            drain_started.elapsed().as_secs_f64()
        );
        Ok(if result.is_ok() { 0 } else { 2 })
    })
}
