//! The engine thread: one thread owns the model, the KV cache and the scheduler; commands come
//! in over a crossbeam channel; every request's events go out through its own sink. Async I/O
//! (the daemon) lives on the other side of the channel and never blocks this thread: sinks must
//! not block, and a sink that reports its receiver gone gets its request aborted (disconnect).
//!
//! Invariants:
//! - while there is work, pending commands are taken between steps (an abort or a cancel takes
//!   effect before the next step); with no work the thread sleeps in `select!` until a command
//!   or shutdown arrives, never polling;
//! - before each step, requests whose sink reports its client closed are aborted, so a request
//!   of a connection that is already gone is never scheduled;
//! - a panic inside a step is caught: every live request receives a final `Error` event and the
//!   thread ends, reporting the panic through [`EngineHandle::join`].

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use convoy_scheduler::{FinishReason, RequestId};

use crate::core::{
    Done, EngineCore, EngineEvent, EngineRequest, EngineStats, EventKind, SubmitError,
};
use crate::device::Device;
use crate::generate::GeneratorConfig;
use crate::model::llama::LlamaModel;
use crate::model_weights::ModelWeights;
use crate::runner::{CpuRunner, ModelRunner};
use crate::step_log::StepLog;
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
pub trait EventSink: Send {
    /// Hand an event over.
    fn send(&mut self, ev: EngineEvent) -> Delivery;
    /// Whether the client is known to be gone; checked before every step, so the request is
    /// dropped before it is scheduled (or computed any further).
    fn is_closed(&self) -> bool {
        false
    }
}

impl<F: FnMut(EngineEvent) -> Delivery + Send> EventSink for F {
    fn send(&mut self, ev: EngineEvent) -> Delivery {
        self(ev)
    }
}

/// A boxed sink.
pub type BoxedSink = Box<dyn EventSink>;

/// Receives the answer to a submission.
pub type SubmitReply = Box<dyn FnOnce(Result<(), SubmitError>) + Send>;

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

/// Limits of the engine thread beyond the generator's configuration.
#[derive(Debug)]
pub struct ServiceConfig {
    /// Most requests waiting; more are refused with `queue_full`.
    pub max_queued: usize,
    /// Most requests one owner (connection) may have waiting.
    pub max_queued_per_owner: usize,
    /// Target duration of a step that carries decodes (prefill chunks are sized to it).
    pub step_time_target: Option<Duration>,
    /// Log every step's shape and times here (`convoy serve --step-log`).
    pub step_log: Option<StepLog>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_queued: 4096,
            max_queued_per_owner: 4096,
            step_time_target: None,
            step_log: None,
        }
    }
}

enum Command {
    Add {
        id: RequestId,
        req: Box<EngineRequest>,
        sink: BoxedSink,
        reply: SubmitReply,
    },
    Abort {
        id: RequestId,
        reason: FinishReason,
    },
    Stats {
        reply: Box<dyn FnOnce(ServiceStats) + Send>,
    },
}

/// The caller's side of the engine thread.
pub struct EngineHandle {
    tx: Sender<Command>,
    shutdown: Sender<()>,
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
            shutdown: self.shutdown.clone(),
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
        sink: BoxedSink,
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
        sink: BoxedSink,
    ) -> Result<Result<(), SubmitError>, EngineGone> {
        let (tx, rx) = bounded(1);
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
        let (tx, rx) = bounded(1);
        self.stats_with(Box::new(move |s| {
            let _ = tx.send(s);
        }))?;
        rx.recv().map_err(|_| EngineGone)
    }

    /// Cancel everything and stop the thread (after the commands already sent).
    pub fn shutdown(&self) {
        let _ = self.shutdown.try_send(());
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
    service: ServiceConfig,
) -> EngineHandle {
    spawn_thread(move |channels| {
        let runner = CpuRunner::new(&model, cfg.num_blocks, cfg.num_host_blocks, cfg.block_size);
        let max_len = model.config.max_position_embeddings;
        run_engine(runner, max_len, codec, &cfg, service, channels)
    })
}

/// Start the engine thread on `device`. The runner is built on the engine thread (it owns the
/// device's memory); a device that cannot run the model ends the thread with the reason,
/// which [`EngineHandle::join`] returns.
pub fn spawn_on(
    device: Device,
    mut weights: ModelWeights,
    codec: TextCodec,
    cfg: GeneratorConfig,
    service: ServiceConfig,
) -> EngineHandle {
    spawn_thread(move |channels| {
        let max_len = weights.config().max_position_embeddings;
        let runner = weights.runner(device, &cfg).map_err(|e| e.to_string())?;
        run_engine(runner, max_len, codec, &cfg, service, channels)
    })
}

/// Start the engine thread with the paced simulation runner (`convoy serve --device sim`): the
/// host side at a device's cadence, over a vocabulary of `vocab` tokens, no model computed.
pub fn spawn_paced_sim(
    cost: crate::sim::CostModel,
    vocab: usize,
    max_model_len: usize,
    codec: TextCodec,
    cfg: GeneratorConfig,
    service: ServiceConfig,
) -> EngineHandle {
    spawn_thread(move |channels| {
        let runner = crate::paced_sim::PacedSimRunner::new(cost, vocab);
        run_engine(runner, max_model_len, codec, &cfg, service, channels)
    })
}

/// The engine thread's ends of its channels, and the step at which to inject a panic.
struct Channels {
    commands: Receiver<Command>,
    shutdown: Receiver<()>,
    fault_step: Option<u64>,
}

/// Start the engine thread running `body`.
fn spawn_thread(
    body: impl FnOnce(Channels) -> Result<(), String> + Send + 'static,
) -> EngineHandle {
    let (tx, rx) = unbounded::<Command>();
    let (shutdown, shutdown_rx) = bounded::<()>(1);
    // Fault injection for the tests of the failure path: panic inside the step with this number.
    let fault_step = std::env::var("CONVOY_FAULT_PANIC_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let thread = std::thread::Builder::new()
        .name("convoy-engine".into())
        .spawn(move || {
            body(Channels {
                commands: rx,
                shutdown: shutdown_rx,
                fault_step,
            })
        })
        .expect("spawn the engine thread");
    EngineHandle {
        tx,
        shutdown,
        thread: Some(thread),
    }
}

/// The engine loop over `runner`, on the engine thread.
fn run_engine<R: ModelRunner>(
    runner: R,
    max_model_len: usize,
    codec: TextCodec,
    cfg: &GeneratorConfig,
    service: ServiceConfig,
    channels: Channels,
) -> Result<(), String> {
    let mut cfg = cfg.clone();
    if let Some(n) = runner.kv_blocks() {
        cfg.num_blocks = n;
    }
    let mut sched = cfg.scheduler_config(max_model_len);
    sched.max_queued = service.max_queued;
    sched.max_queued_per_owner = service.max_queued_per_owner;
    let mut core = EngineCore::new(sched, runner, codec, cfg.verify_fraction);
    core.set_step_time_target(service.step_time_target);
    core.set_step_log(service.step_log);
    EngineLoop {
        core,
        sinks: HashMap::new(),
    }
    .run(channels.commands, channels.shutdown, channels.fault_step)
}

fn stats_of<R: ModelRunner>(core: &EngineCore<R>) -> ServiceStats {
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

/// What the loop does after a command.
enum Flow {
    Continue,
    Stop,
}

struct EngineLoop<R: ModelRunner> {
    core: EngineCore<R>,
    sinks: HashMap<RequestId, BoxedSink>,
}

impl<R: ModelRunner> EngineLoop<R> {
    /// Hand an event to its sink; returns the request to cancel, and why, when the client
    /// cannot take more. A final event always removes the sink.
    fn deliver(&mut self, ev: EngineEvent) -> Option<(RequestId, FinishReason)> {
        let id = ev.id;
        let done = matches!(ev.kind, EventKind::Done(_));
        let status = self.sinks.get_mut(&id).map(|s| s.send(ev));
        if done {
            self.sinks.remove(&id);
            return None;
        }
        match status {
            Some(Delivery::Gone) => Some((id, FinishReason::Cancelled)),
            Some(Delivery::TooSlow) => Some((id, FinishReason::SlowConsumer)),
            _ => None,
        }
    }

    /// End a request now and give its final event to its sink.
    fn abort(&mut self, id: RequestId, reason: FinishReason) {
        if let Some(ev) = self.core.abort(id, reason) {
            self.deliver(ev);
        }
    }

    fn handle(&mut self, c: Command) -> Flow {
        match c {
            Command::Add {
                id,
                req,
                sink,
                reply,
            } => match self.core.add(id, *req) {
                Ok(()) => {
                    self.sinks.insert(id, sink);
                    reply(Ok(()));
                }
                Err(e) => reply(Err(e)),
            },
            Command::Abort { id, reason } => self.abort(id, reason),
            Command::Stats { reply } => reply(stats_of(&self.core)),
        }
        Flow::Continue
    }

    fn shut_down(&mut self) {
        let ids: Vec<RequestId> = self.sinks.keys().copied().collect();
        for id in ids {
            self.abort(id, FinishReason::Cancelled);
        }
    }

    /// Deliver `events` in order, then end the requests whose clients could not take them.
    fn deliver_all(&mut self, events: Vec<EngineEvent>) {
        let mut cancel = Vec::new();
        for ev in events {
            cancel.extend(self.deliver(ev));
        }
        for (id, reason) in cancel {
            // The client went away or fell behind: free its blocks now. The final event still
            // goes to the sink (a slow client reads it; for a gone one the sink only records the
            // request's end).
            self.abort(id, reason);
        }
    }

    /// Run `f` on the engine; a panic ends every stream with an error and the engine.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut EngineCore<R>) -> T) -> Result<T, String> {
        let core = &mut self.core;
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(core))) {
            Ok(v) => Ok(v),
            Err(p) => {
                let msg = panic_message(&*p);
                tracing::error!(panic = %msg, "engine step panicked");
                for (id, mut sink) in self.sinks.drain() {
                    sink.send(EngineEvent {
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
                Err(format!("engine step panicked: {msg}"))
            }
        }
    }

    /// The engine thread's loop. A step's events are delivered between the next step's
    /// scheduling and its result: on a runner that computes apart (a GPU) while that step runs,
    /// on one that computes on this thread (the CPU) before it does; anything that acts on
    /// requests (commands, shutdown, closed clients, an idle wait) first
    /// delivers every event produced so far, so a client always sees its tokens before its end.
    fn run(
        mut self,
        rx: Receiver<Command>,
        shutdown: Receiver<()>,
        fault_step: Option<u64>,
    ) -> Result<(), String> {
        let mut pending: Vec<EngineEvent> = Vec::new();
        loop {
            // With nothing to compute, sleep until a command or shutdown arrives.
            if !self.core.has_work() {
                self.deliver_all(std::mem::take(&mut pending));
                let flow = select! {
                    recv(rx) -> c => match c {
                        Ok(c) => self.handle(c),
                        Err(_) => Flow::Stop,
                    },
                    recv(shutdown) -> _ => Flow::Stop,
                };
                if let Flow::Stop = flow {
                    while let Ok(c) = rx.try_recv() {
                        self.handle(c);
                    }
                    self.shut_down();
                    return Ok(());
                }
            }
            // Everything already sent is applied before the next step. A new request touches no
            // pending event (unless its id is one of theirs); an abort or a stats report acts on
            // or reports requests whose events must have gone out first.
            while let Ok(c) = rx.try_recv() {
                let independent = match &c {
                    Command::Add { id, .. } => pending.iter().all(|e| e.id != *id),
                    _ => false,
                };
                if !independent {
                    self.deliver_all(std::mem::take(&mut pending));
                }
                self.handle(c);
            }
            if shutdown.try_recv().is_ok() {
                self.deliver_all(std::mem::take(&mut pending));
                self.shut_down();
                return Ok(());
            }
            // Clients known to be gone: drop their requests before they are scheduled.
            let closed: Vec<RequestId> = self
                .sinks
                .iter()
                .filter(|(_, s)| s.is_closed())
                .map(|(&id, _)| id)
                .collect();
            if !closed.is_empty() {
                self.deliver_all(std::mem::take(&mut pending));
                for id in closed {
                    self.abort(id, FinishReason::Cancelled);
                }
            }
            if !self.core.has_work() {
                continue;
            }
            let step_no = self.core.stats().steps;
            let early = self.guarded(|core| {
                if fault_step == Some(step_no) {
                    panic!("fault injected at step {step_no} (CONVOY_FAULT_PANIC_AT_STEP)");
                }
                core.begin_step()
            })?;
            // The step is scheduled (and, on a runner that computes apart, running); the last
            // step's events go out now. A client that cannot take them is ended once the step
            // is back (no request changes while it is in flight).
            let mut cancel = Vec::new();
            for ev in pending.drain(..).chain(early) {
                cancel.extend(self.deliver(ev));
            }
            pending = self.guarded(|core| core.end_step())?;
            if !cancel.is_empty() {
                self.deliver_all(std::mem::take(&mut pending));
                for (id, reason) in cancel {
                    self.abort(id, reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{EngineRequest, EventKind};
    use crate::runner::StepResult;
    use crate::sampler::SamplingParams;
    use crate::sim::{CostModel, SimRunner};
    use convoy_scheduler::{BlockCopy, BlockId, SchedulerOutput};

    /// A runner that computes on the engine thread, as the CPU runner does, in `launch` when
    /// launched and in `finish` otherwise; one step that computes something per permit from
    /// `gate`: a step waiting for its permit is a step still computing.
    struct GatedRunner {
        sim: SimRunner,
        gate: Receiver<()>,
        launched: Option<StepResult>,
    }

    impl ModelRunner for GatedRunner {
        fn keep_logits(&mut self, id: RequestId) {
            self.sim.keep_logits(id);
        }
        fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
            if !out.scheduled.is_empty() {
                self.gate.recv().expect("the test holds the gate");
            }
            self.sim.execute(out)
        }
        fn launch(&mut self, out: &SchedulerOutput) {
            self.launched = Some(self.execute(out));
        }
        fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
            match self.launched.take() {
                Some(result) => result,
                None => self.execute(out),
            }
        }
        fn recompute_logits(
            &mut self,
            tokens: &[u32],
            blocks: &[BlockId],
            copies: &[BlockCopy],
        ) -> Option<Vec<f32>> {
            self.sim.recompute_logits(tokens, blocks, copies)
        }
        fn now(&self) -> Duration {
            self.sim.now()
        }
        fn vocab_size(&self) -> usize {
            self.sim.vocab_size()
        }
    }

    #[test]
    fn a_step_computed_on_the_engine_thread_does_not_hold_back_the_last_steps_tokens() {
        let (permit, gate) = unbounded();
        let engine = spawn_thread(move |channels| {
            let runner = GatedRunner {
                sim: SimRunner::new(CostModel::smollm2_cpu(), 512),
                gate,
                launched: None,
            };
            let codec = TextCodec::without_tokenizer(vec![]);
            let cfg = GeneratorConfig::new(64, 16);
            run_engine(
                runner,
                4096,
                codec,
                &cfg,
                ServiceConfig::default(),
                channels,
            )
        });
        let (tx, events) = unbounded();
        let sink: BoxedSink = Box::new(move |ev: EngineEvent| {
            if tx.send(ev).is_ok() {
                Delivery::Delivered
            } else {
                Delivery::Gone
            }
        });
        let req = EngineRequest {
            prompt_ids: vec![1, 2, 3, 4, 5],
            params: SamplingParams {
                max_tokens: 3,
                ignore_eos: true,
                ..Default::default()
            },
            ..Default::default()
        };
        engine.submit(1, req, sink).unwrap().unwrap();
        // One permit: the prefill step runs and samples the first token; the next step then
        // waits for its permit, so it is still computing when the first token must go out.
        permit.send(()).unwrap();
        let first = events
            .recv_timeout(Duration::from_secs(30))
            .expect("the first token arrives while the next step computes");
        assert!(matches!(first.kind, EventKind::Token { .. }), "{first:?}");
        assert!(events.try_recv().is_err(), "only one step has run");
        // Two more sampling steps, and the step that writes the last token's K/V (a later
        // turn reuses the reply too) without sampling.
        for _ in 0..3 {
            permit.send(()).unwrap();
        }
        let mut tokens = 1;
        loop {
            let ev = events.recv_timeout(Duration::from_secs(30)).expect("event");
            match ev.kind {
                EventKind::Token { .. } => tokens += 1,
                EventKind::Done(d) => {
                    assert_eq!(d.usage.completion_tokens, 3);
                    break;
                }
            }
        }
        assert_eq!(tokens, 3);
        drop(permit);
        engine.shutdown();
        engine.join().unwrap();
    }
}
