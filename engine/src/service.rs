//! The engine thread: one thread owns the model, the KV cache and the scheduler; commands come
//! in over a channel; every request's events go out through its own sink. Async I/O (the
//! daemon) lives on the other side of the channel and never blocks this thread: sinks must not
//! block, and a sink that reports its receiver gone gets its request aborted (disconnect).
//!
//! A panic inside a step is caught: every live request receives a final `Error` event and the
//! thread ends, reporting the panic through [`EngineHandle::join`].

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use convoy_scheduler::{FinishReason, RequestId};

use crate::core::{
    Done, EngineCore, EngineEvent, EngineRequest, EngineStats, EventKind, SubmitError,
};
use crate::generate::GeneratorConfig;
use crate::model::llama::LlamaModel;
use crate::runner::CpuRunner;
use crate::tokenizer::TextCodec;

/// What happened to an event handed to a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the client.
    Delivered,
    /// Nobody listens any more (disconnect): the request is cancelled.
    Gone,
    /// The client is too far behind: the request is cancelled with `slow_consumer` (its final
    /// event is still delivered).
    TooSlow,
}

/// Where a request's events go. Called on the engine thread: it must never block.
pub type EventSink = Box<dyn FnMut(EngineEvent) -> Delivery + Send>;

/// Receives the answer to a submission.
pub type SubmitReply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A snapshot of the engine for `stats`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceStats {
    /// Counters.
    pub engine: EngineStats,
    /// Requests waiting.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// Device KV blocks in all.
    pub device_blocks: usize,
    /// Device KV blocks held by requests.
    pub device_blocks_held: usize,
    /// Device KV blocks holding cached contents.
    pub device_blocks_cached: usize,
    /// Host KV blocks in all.
    pub host_blocks: usize,
    /// Host KV blocks holding cached contents.
    pub host_blocks_cached: usize,
    /// Tokens per block.
    pub block_size: usize,
}

enum Command {
    Add {
        id: RequestId,
        req: Box<EngineRequest>,
        sink: EventSink,
        reply: SubmitReply,
    },
    Abort {
        id: RequestId,
        reason: FinishReason,
    },
    Stats {
        reply: Box<dyn FnOnce(ServiceStats) + Send>,
    },
    Shutdown,
}

/// The caller's side of the engine thread.
pub struct EngineHandle {
    tx: Sender<Command>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// The engine thread is gone.
#[derive(Debug, thiserror::Error)]
#[error("the engine thread has stopped")]
pub struct EngineGone;

impl Clone for EngineHandle {
    /// Another sender to the same thread (only the original can [`EngineHandle::join`]).
    fn clone(&self) -> EngineHandle {
        EngineHandle {
            tx: self.tx.clone(),
            thread: None,
        }
    }
}

impl EngineHandle {
    /// Submit a request; its events go to `sink`, and `reply` hears whether it was accepted
    /// (a bad parameter or a full queue is refused there and no event is sent). Never blocks.
    pub fn submit_with(
        &self,
        id: RequestId,
        req: EngineRequest,
        sink: EventSink,
        reply: SubmitReply,
    ) -> Result<(), EngineGone> {
        self.tx
            .send(Command::Add {
                id,
                req: Box::new(req),
                sink,
                reply,
            })
            .map_err(|_| EngineGone)
    }

    /// [`EngineHandle::submit_with`], waiting for the answer.
    pub fn submit(
        &self,
        id: RequestId,
        req: EngineRequest,
        sink: EventSink,
    ) -> Result<Result<(), String>, EngineGone> {
        let (tx, rx) = channel();
        let reply: SubmitReply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.submit_with(id, req, sink, reply)?;
        rx.recv().map_err(|_| EngineGone)
    }

    /// Cancel a request; its sink receives the final event.
    pub fn abort(&self, id: RequestId, reason: FinishReason) -> Result<(), EngineGone> {
        self.tx
            .send(Command::Abort { id, reason })
            .map_err(|_| EngineGone)
    }

    /// A snapshot of the engine, handed to `reply` on the engine thread. Never blocks.
    pub fn stats_with(
        &self,
        reply: Box<dyn FnOnce(ServiceStats) + Send>,
    ) -> Result<(), EngineGone> {
        self.tx
            .send(Command::Stats { reply })
            .map_err(|_| EngineGone)
    }

    /// A snapshot of the engine, waiting for it.
    pub fn stats(&self) -> Result<ServiceStats, EngineGone> {
        let (tx, rx) = channel();
        self.stats_with(Box::new(move |s| {
            let _ = tx.send(s);
        }))?;
        rx.recv().map_err(|_| EngineGone)
    }

    /// Cancel everything and stop the thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// Wait for the thread; `Err` carries a panic message.
    pub fn join(mut self) -> Result<(), String> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the engine thread panicked".into()),
            None => Ok(()),
        }
    }

    /// Whether the thread has ended (always false for a clone).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.is_finished())
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Start the engine thread on the CPU backend.
pub fn spawn_cpu(
    model: LlamaModel,
    codec: TextCodec,
    cfg: GeneratorConfig,
    max_queued: usize,
) -> EngineHandle {
    let (tx, rx) = channel::<Command>();
    // Fault injection for the tests of the failure path: panic inside the step with this number.
    let fault_step = std::env::var("CONVOY_FAULT_PANIC_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let thread = std::thread::Builder::new()
        .name("convoy-engine".into())
        .spawn(move || {
            let runner =
                CpuRunner::new(&model, cfg.num_blocks, cfg.num_host_blocks, cfg.block_size);
            let mut sched = cfg.scheduler_config(model.config.max_position_embeddings);
            sched.max_queued = max_queued;
            let core = EngineCore::new(sched, runner, codec, cfg.verify_fraction);
            run_loop(core, rx, fault_step)
        })
        .expect("spawn the engine thread");
    EngineHandle {
        tx,
        thread: Some(thread),
    }
}

fn stats_of<R: crate::runner::ModelRunner>(core: &EngineCore<R>) -> ServiceStats {
    let s = core.scheduler();
    let kv = s.kv();
    ServiceStats {
        engine: core.stats(),
        waiting: s.num_waiting(),
        running: s.num_running(),
        device_blocks: kv.device().num_blocks(),
        device_blocks_held: kv.num_held_blocks(),
        device_blocks_cached: kv.device().num_cached(),
        host_blocks: kv.host().num_blocks(),
        host_blocks_cached: kv.host().num_cached(),
        block_size: kv.block_size(),
    }
}

/// Hand an event to its sink; returns the request to cancel, and why, when the client cannot
/// take more. A final event always removes the sink.
fn deliver(
    sinks: &mut HashMap<RequestId, EventSink>,
    ev: EngineEvent,
) -> Option<(RequestId, FinishReason)> {
    let id = ev.id;
    let done = matches!(ev.kind, EventKind::Done(_));
    let status = sinks.get_mut(&id).map(|s| s(ev));
    if done {
        sinks.remove(&id);
        return None;
    }
    match status {
        Some(Delivery::Gone) => Some((id, FinishReason::Cancelled)),
        Some(Delivery::TooSlow) => Some((id, FinishReason::SlowConsumer)),
        _ => None,
    }
}

/// The engine thread's loop.
fn run_loop<R: crate::runner::ModelRunner>(
    mut core: EngineCore<R>,
    rx: Receiver<Command>,
    fault_step: Option<u64>,
) -> Result<(), String> {
    let mut sinks: HashMap<RequestId, EventSink> = HashMap::new();
    loop {
        // Take every pending command; block only when there is nothing to compute.
        let mut commands = Vec::new();
        if core.has_work() {
            commands.extend(rx.try_iter());
        } else {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => {
                    commands.push(c);
                    commands.extend(rx.try_iter());
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        for c in commands {
            match c {
                Command::Add {
                    id,
                    req,
                    sink,
                    reply,
                } => match core.add(id, *req) {
                    Ok(()) => {
                        sinks.insert(id, sink);
                        reply(Ok(()));
                    }
                    Err(SubmitError::Invalid(m)) => reply(Err(m)),
                    Err(SubmitError::Refused(r)) => reply(Err(r.to_string())),
                },
                Command::Abort { id, reason } => {
                    if let Some(ev) = core.abort(id, reason) {
                        deliver(&mut sinks, ev);
                    }
                }
                Command::Stats { reply } => reply(stats_of(&core)),
                Command::Shutdown => {
                    let ids: Vec<RequestId> = sinks.keys().copied().collect();
                    for id in ids {
                        if let Some(ev) = core.abort(id, FinishReason::Cancelled) {
                            deliver(&mut sinks, ev);
                        }
                    }
                    return Ok(());
                }
            }
        }
        if !core.has_work() {
            continue;
        }
        let step_no = core.stats().steps;
        let events = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            if fault_step == Some(step_no) {
                panic!("fault injected at step {step_no} (CONVOY_FAULT_PANIC_AT_STEP)");
            }
            core.step()
        })) {
            Ok(events) => events,
            Err(p) => {
                let msg = panic_message(&*p);
                tracing::error!(panic = %msg, "engine step panicked");
                for (id, mut sink) in sinks.drain() {
                    sink(EngineEvent {
                        id,
                        kind: EventKind::Done(Done {
                            finish_reason: FinishReason::Error,
                            output_ids: vec![],
                            text: String::new(),
                            unsent_text: String::new(),
                            usage: Default::default(),
                            timing: Default::default(),
                        }),
                    });
                }
                return Err(format!("engine step panicked: {msg}"));
            }
        };
        let mut cancel = Vec::new();
        for ev in events {
            cancel.extend(deliver(&mut sinks, ev));
        }
        for (id, reason) in cancel {
            // The client went away or fell behind: free its blocks now.
            let last = core.abort(id, reason);
            if let (Some(ev), Some(mut sink)) = (last, sinks.remove(&id)) {
                if reason == FinishReason::SlowConsumer {
                    sink(ev);
                }
            }
        }
    }
}
