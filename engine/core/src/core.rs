//! The engine core: one step is `schedule -> execute -> update`, plus what turns token ids into
//! client events (incremental detokenisation, stop strings, usage and timing) and the cache
//! verification oracle. Single-threaded and synchronous: the daemon runs it on its own thread;
//! `Generator` drives it directly for the CLI and tests.

use std::collections::HashMap;
use std::time::Duration;

use convoy_scheduler::{
    AddError, CacheStats, FinishReason, NewRequest, PrefixMatch, RequestId, RequestOutput,
    Scheduler, SchedulerConfig, SchedulerOutput,
};

use crate::detokenizer::IncrementalDecoder;
use crate::runner::{ModelRunner, TokenLogprobs};
use crate::sampler::{InvalidParameter, Rng, SamplingParams};
use crate::sim::StepShape;
use crate::step_log::{StepLog, StepRecord};
use crate::tokenizer::TextCodec;

/// Mixed into a request id to decide, reproducibly, whether its prefill is verified
/// (the ASCII bytes of "verify").
const VERIFY_SALT: u64 = 0x7665_7269_6679;

/// A request as the engine takes it.
#[derive(Clone, Debug, Default)]
pub struct EngineRequest {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Larger is served first.
    pub priority: i32,
    /// Requests with different salts never share cached K/V.
    pub cache_salt: Option<String>,
    /// Return log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Give up (finish reason `deadline`) this long after arrival.
    pub deadline: Option<Duration>,
    /// Who sent it (a connection id): the waiting queue is shared fairly between owners.
    pub owner: u64,
    /// When the client's request was accepted (wall clock), for a request that waited before
    /// the engine took it (a step in progress, prompt encoding): queueing time, TTFT and the
    /// deadline count from here. `None`: from when the engine takes it (simulated clocks).
    pub accepted: Option<std::time::Instant>,
    /// When the front end handed the request to the engine, its prompt encoded: from
    /// `accepted` to here is [`Timing::admit`] (the wait for the engine's current step that
    /// follows is queueing, not admission). `None`: no admission time.
    pub handed_over: Option<std::time::Instant>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the device tier of the cache.
    pub cached_tokens: usize,
    /// Prompt tokens served from the host tier.
    pub host_cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Latencies of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    /// From acceptance (the daemon read the request) to its handoff to the engine: parsing,
    /// templating, tokenising (zero without both times, see
    /// [`EngineRequest::handed_over`]). Part of `queue`, `ttft` and `total`, which count from
    /// acceptance; the wait for the engine's current step after the handoff is in `queue`.
    pub admit: Duration,
    /// From arrival to first scheduled.
    pub queue: Duration,
    /// From arrival to the first token (zero if none).
    pub ttft: Duration,
    /// From arrival to the end.
    pub total: Duration,
}

/// The end of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// All generated token ids.
    pub output_ids: Vec<u32>,
    /// All generated text (without a stop string).
    pub text: String,
    /// The end of `text` that no token event carried yet (text held back while it could still
    /// become a stop string, when the request ends some other way). Streams send it last.
    pub unsent_text: String,
    /// Token counts.
    pub usage: Usage,
    /// Latencies.
    pub timing: Timing,
}

/// Something a client should hear about.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// New tokens and the text they completed (possibly empty).
    Token {
        /// Text delta.
        text: String,
        /// Token ids.
        token_ids: Vec<u32>,
        /// Log-probabilities, when asked for.
        logprobs: Option<TokenLogprobs>,
    },
    /// The final event.
    Done(Done),
}

/// An event for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineEvent {
    /// The request.
    pub id: RequestId,
    /// What happened.
    pub kind: EventKind,
}

/// Counters since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// The cache manager's counters.
    pub cache: CacheStats,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Prompt tokens served from either cache tier.
    pub cached_prompt_tokens: u64,
    /// Of those, served from the host tier (counted once per request, at admission).
    pub host_cached_prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests finished (any reason).
    pub finished_requests: u64,
    /// Cache-hit prefills recomputed by the verification oracle.
    pub verified_prefills: u64,
    /// Of those, how many gave different logits. Should stay 0 forever.
    pub cache_divergence_total: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Requests preempted for lack of KV blocks.
    pub preemptions: u64,
}

struct Live {
    params: SamplingParams,
    decoder: IncrementalDecoder,
    text: String,
    emitted: usize,
    output_ids: Vec<u32>,
    prompt_len: usize,
    hit: PrefixMatch,
    arrived: Duration,
    /// From acceptance to the handoff ([`Timing::admit`]).
    admit: Duration,
    scheduled: Option<Duration>,
    first_token: Option<Duration>,
    deadline: Option<Duration>,
}

/// Why a request was refused. [`SubmitError::code`] is the protocol's error code: the kind
/// travels typed from the scheduler to the wire, never through a message's wording.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// A sampling parameter is out of range.
    #[error(transparent)]
    InvalidParameter(#[from] InvalidParameter),
    /// A prompt token id is not in the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The scheduler refused it.
    #[error(transparent)]
    Refused(#[from] AddError),
}

impl SubmitError {
    /// The protocol's error code (docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::InvalidParameter(_) => "invalid_parameter",
            SubmitError::TokenOutOfRange { .. } => "token_out_of_range",
            SubmitError::Refused(e) => e.code(),
        }
    }
}

/// Keeps steps that carry decodes near a target duration: learns the cost of a batched token
/// from measured steps and turns the target into a token budget for the scheduler.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepPacer {
    target: Duration,
    /// Smoothed seconds per batched token (None until a step with enough tokens ran).
    per_token: Option<f64>,
}

impl StepPacer {
    /// Steps with fewer tokens say little about the cost of a token (fixed costs dominate).
    const MIN_TOKENS: usize = 32;

    fn observe(&mut self, tokens: usize, took: Duration) {
        if tokens < Self::MIN_TOKENS {
            return;
        }
        let sample = took.as_secs_f64() / tokens as f64;
        self.per_token = Some(match self.per_token {
            Some(p) => 0.8 * p + 0.2 * sample,
            None => sample,
        });
    }

    /// Tokens per step before any step was measured: small enough not to stall decodes on
    /// a slow device, large enough to measure the cost of a token from.
    const FIRST_BUDGET: usize = 256;

    fn budget(&self) -> usize {
        self.per_token.map_or(Self::FIRST_BUDGET, |p| {
            (self.target.as_secs_f64() / p.max(1e-9)).clamp(1.0, 1e9) as usize
        })
    }
}

/// The engine core over a runner.
pub struct EngineCore<R: ModelRunner> {
    scheduler: Scheduler,
    runner: R,
    codec: TextCodec,
    live: HashMap<RequestId, Live>,
    verify_fraction: f64,
    /// Ids for scratch recomputations of the cache oracle: counting down from the top of the
    /// id space, far from the ids callers choose (which count up from 0).
    next_scratch: RequestId,
    stats: EngineStats,
    pacer: Option<StepPacer>,
    step_log: Option<StepLog>,
    /// The last step's scheduler output and results, kept for their buffers.
    step_out: SchedulerOutput,
    step_results: Vec<RequestOutput>,
    /// The step begun by [`EngineCore::begin_step`] and not yet ended: when it started (runner
    /// clock) and when its scheduling ended (its launch, on a runner that computes apart).
    in_flight: Option<(Duration, Duration)>,
}

impl<R: ModelRunner> EngineCore<R> {
    /// An idle engine.
    pub fn new(
        cfg: SchedulerConfig,
        runner: R,
        codec: TextCodec,
        verify_fraction: f64,
    ) -> EngineCore<R> {
        EngineCore {
            scheduler: Scheduler::new(cfg),
            runner,
            codec,
            live: HashMap::new(),
            verify_fraction,
            next_scratch: RequestId::MAX,
            stats: EngineStats::default(),
            pacer: None,
            step_log: None,
            step_out: SchedulerOutput::default(),
            step_results: Vec::new(),
            in_flight: None,
        }
    }

    /// Log every step's shape and times to `log` (`convoy serve --step-log`).
    pub fn set_step_log(&mut self, log: Option<StepLog>) {
        self.step_log = log;
    }

    /// Size prefill chunks so that a step carrying decodes takes about `target` (learnt from
    /// measured step times); `None` uses only the scheduler's token limit.
    pub fn set_step_time_target(&mut self, target: Option<Duration>) {
        self.pacer = target.map(|target| StepPacer {
            target,
            per_token: None,
        });
        self.scheduler
            .set_step_token_budget(self.pacer.as_ref().map(StepPacer::budget));
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The runner (read-only).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The text codec.
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            cache: self.scheduler.kv().stats(),
            preemptions: self.scheduler.num_preemptions(),
            ..self.stats
        }
    }

    /// Whether any request is live.
    pub fn has_work(&self) -> bool {
        !self.scheduler.is_idle()
    }

    /// Requests whose stream is still open.
    pub fn num_live(&self) -> usize {
        self.live.len()
    }

    /// The engine clock (wall or simulated).
    pub fn now(&self) -> Duration {
        self.runner.now()
    }

    /// Admit a request under a caller-chosen id (unique among live requests).
    pub fn add(&mut self, id: RequestId, req: EngineRequest) -> Result<(), SubmitError> {
        req.params.validate()?;
        let vocab = self.runner.vocab_size();
        if let Some(&token) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::TokenOutOfRange { token, vocab });
        }
        let mut stop = req.params.stop_token_ids.clone();
        if !req.params.ignore_eos {
            stop.extend(self.codec.eos_token_ids.iter().copied());
        }
        self.scheduler.add(NewRequest {
            id,
            prompt: req.prompt_ids.clone(),
            max_tokens: req.params.max_tokens,
            stop_token_ids: stop,
            priority: req.priority,
            cache_salt: req.cache_salt.clone(),
            owner: req.owner,
            sampling: req.params.spec(req.logprobs),
        })?;
        self.stats.prompt_tokens += req.prompt_ids.len() as u64;
        let now = self.runner.now();
        let arrived = match req.accepted {
            Some(at) => now.saturating_sub(at.elapsed()),
            None => now,
        };
        let admit = match (req.accepted, req.handed_over) {
            (Some(accepted), Some(handed)) => handed.saturating_duration_since(accepted),
            _ => Duration::ZERO,
        };
        self.live.insert(
            id,
            Live {
                params: req.params,
                decoder: IncrementalDecoder::new(),
                text: String::new(),
                emitted: 0,
                output_ids: Vec::new(),
                prompt_len: req.prompt_ids.len(),
                hit: PrefixMatch::default(),
                arrived,
                admit,
                scheduled: None,
                first_token: None,
                deadline: req.deadline.map(|d| arrived + d),
            },
        );
        Ok(())
    }

    fn done_event(&mut self, id: RequestId, reason: FinishReason) -> Option<EngineEvent> {
        let l = self.live.remove(&id)?;
        self.stats.finished_requests += 1;
        let now = self.runner.now();
        Some(EngineEvent {
            id,
            kind: EventKind::Done(Done {
                finish_reason: reason,
                usage: Usage {
                    prompt_tokens: l.prompt_len,
                    cached_tokens: l.hit.device_tokens,
                    host_cached_tokens: l.hit.host_tokens,
                    completion_tokens: l.output_ids.len(),
                },
                timing: Timing {
                    admit: l.admit,
                    queue: l.scheduled.unwrap_or(now) - l.arrived,
                    ttft: l.first_token.map(|t| t - l.arrived).unwrap_or_default(),
                    total: now - l.arrived,
                },
                output_ids: l.output_ids,
                unsent_text: l.text.get(l.emitted..).unwrap_or_default().to_string(),
                text: l.text,
            }),
        })
    }

    /// End a request now (cancel, disconnect, deadline, slow consumer); its blocks are freed
    /// at once. Returns its final event, or `None` if it was not live.
    pub fn abort(&mut self, id: RequestId, reason: FinishReason) -> Option<EngineEvent> {
        self.scheduler.abort(id);
        self.done_event(id, reason)
    }

    fn should_verify(&self, id: RequestId) -> bool {
        self.verify_fraction > 0.0 && Rng::new(id ^ VERIFY_SALT).uniform() < self.verify_fraction
    }

    fn verify(&mut self, id: RequestId, cached: &[f32]) {
        let Some(r) = self.scheduler.request(id) else {
            return;
        };
        let prompt = r.tokens[..r.prompt_len].to_vec();
        let scratch = self.next_scratch;
        self.next_scratch -= 1;
        let Some((blocks, copies)) = self.scheduler.reserve_scratch(scratch, &prompt) else {
            tracing::debug!(request = id, "cache verification skipped: no free blocks");
            return;
        };
        let fresh = self.runner.recompute_logits(&prompt, &blocks, &copies);
        self.scheduler.release_scratch(scratch);
        let Some(fresh) = fresh else { return };
        self.stats.verified_prefills += 1;
        let worst = fresh
            .iter()
            .zip(cached)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        if worst.is_nan() || worst > 1e-4 {
            self.stats.cache_divergence_total += 1;
            tracing::error!(
                request = id,
                worst_relative_error = worst,
                "cached prefill diverges from recomputation"
            );
        }
    }

    /// Run one step; returns the events it produced.
    pub fn step(&mut self) -> Vec<EngineEvent> {
        let mut events = self.begin_step();
        events.extend(self.end_step());
        events
    }

    /// The first half of a step: schedule it and, on a runner that computes apart from this
    /// thread, launch it, so the caller's host work (delivering the last step's events)
    /// overlaps it; returns the events scheduling produced (requests that ended).
    /// [`EngineCore::end_step`] must follow before anything else changes the engine's requests.
    ///
    /// A runner that computes on this thread (the CPU) runs the whole step in `end_step`:
    /// launched here, it would hold the last step's tokens back from their clients for the
    /// length of this one.
    pub fn begin_step(&mut self) -> Vec<EngineEvent> {
        assert!(
            self.in_flight.is_none(),
            "begin_step while a step is in flight"
        );
        let mut events = Vec::new();
        let now = self.runner.now();
        let step_started = now;
        let expired: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, l)| l.deadline.is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            events.extend(self.abort(id, FinishReason::Deadline));
        }
        // The step's output and results reuse last step's buffers (a steady step allocates
        // nothing in the scheduler).
        let mut out = std::mem::take(&mut self.step_out);
        self.scheduler.schedule_into(&mut out);
        let started = self.runner.now();
        self.stats.steps += 1;
        for &(id, reason) in &out.ended {
            events.extend(self.done_event(id, reason));
        }
        for s in &out.scheduled {
            if let Some(l) = self.live.get_mut(&s.id) {
                l.scheduled.get_or_insert(now);
            }
        }
        for s in out.scheduled.iter().filter(|s| s.sample) {
            let first = self.scheduler.request(s.id).is_some_and(|r| {
                r.num_output_tokens() == 0 && r.first_hit.is_some_and(|h| h.total() > 0)
            });
            if first && self.should_verify(s.id) {
                self.runner.keep_logits(s.id);
            }
        }
        if self.runner.computes_apart() {
            self.runner.launch(&out);
        }
        self.step_out = out;
        self.in_flight = Some((step_started, started));
        events
    }

    /// The second half of a step begun by [`EngineCore::begin_step`]: wait for the runner's
    /// result and apply it; returns the step's token and end events (none without a step in
    /// flight).
    pub fn end_step(&mut self) -> Vec<EngineEvent> {
        let Some((step_started, started)) = self.in_flight.take() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        let out = std::mem::take(&mut self.step_out);
        // A step left to `finish` starts computing now, after the host work done meanwhile.
        let computing_since = if self.runner.computes_apart() {
            started
        } else {
            self.runner.now()
        };
        let result = self.runner.finish(&out);
        let now = self.runner.now();
        let executed = now.saturating_sub(computing_since);
        if let Some(p) = &mut self.pacer {
            p.observe(out.num_batched_tokens, executed);
            self.scheduler.set_step_token_budget(Some(p.budget()));
        }
        for (id, logits) in &result.kept_logits {
            self.verify(*id, logits);
        }
        // A runner that answers for the wrong requests would hand tokens to the wrong
        // conversation: stop the engine (every stream gets an error) rather than go on.
        let mut outputs = std::mem::take(&mut self.step_results);
        self.scheduler
            .update_from_output_into(&out, &result.output, &mut outputs)
            .unwrap_or_else(|e| panic!("step contract broken: {e}"));
        let now = self.runner.now();
        for o in outputs.drain(..) {
            let Some(l) = self.live.get_mut(&o.id) else {
                continue;
            };
            if let Some(hit) = o.prefix_hit {
                l.hit = hit;
                self.stats.cached_prompt_tokens += hit.total() as u64;
                self.stats.host_cached_prompt_tokens += hit.host_tokens as u64;
            }
            l.first_token.get_or_insert(now);
            let mut finished = o.finished;
            let tok = o.new_token;
            l.output_ids.push(tok);
            self.stats.generated_tokens += 1;
            let delta = self.codec.decode_step(&mut l.decoder, tok);
            l.text.push_str(&delta);
            // A stop string wins even when the same token also hit max_tokens or EOS.
            if let Some(pos) = l
                .params
                .stop
                .iter()
                .filter_map(|st| l.text.find(st.as_str()))
                .min()
            {
                l.text.truncate(pos);
                l.emitted = l.emitted.min(pos);
                finished = Some(FinishReason::Stop);
                self.scheduler.finish(o.id, FinishReason::Stop);
            }
            // Hold back text that could still become a stop string.
            let hold = if finished.is_some() {
                0
            } else {
                l.params
                    .stop
                    .iter()
                    .map(|st| st.len().saturating_sub(1))
                    .max()
                    .unwrap_or(0)
            };
            let mut upto = l.text.len().saturating_sub(hold).max(l.emitted);
            while !l.text.is_char_boundary(upto) {
                upto -= 1;
            }
            let text = l.text[l.emitted..upto].to_string();
            l.emitted = upto;
            events.push(EngineEvent {
                id: o.id,
                kind: EventKind::Token {
                    text,
                    token_ids: vec![o.new_token],
                    logprobs: result.logprobs.get(&o.id).cloned(),
                },
            });
            if let Some(reason) = finished {
                events.extend(self.done_event(o.id, reason));
            }
        }
        if let Some(log) = &mut self.step_log {
            if !out.scheduled.is_empty() {
                let total = self.runner.now().saturating_sub(step_started);
                // When the runner started computing: `at_s + execute_s` is when it finished.
                log.write(&StepRecord::new(
                    computing_since.as_secs_f64(),
                    &StepShape::of(&out),
                    executed.as_secs_f64(),
                    total.as_secs_f64(),
                ));
            }
        }
        self.step_out = out;
        self.step_results = outputs;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_turns_a_target_step_time_into_a_token_budget() {
        let mut p = StepPacer {
            target: Duration::from_millis(200),
            per_token: None,
        };
        assert_eq!(p.budget(), StepPacer::FIRST_BUDGET);
        // Short steps say nothing about a token's cost.
        p.observe(4, Duration::from_millis(50));
        assert_eq!(p.per_token, None);
        // 256 tokens in 1.28 s: 5 ms a token, so 40 tokens fit in 200 ms.
        p.observe(256, Duration::from_millis(1280));
        assert_eq!(p.budget(), 40);
        // The estimate moves a fifth of the way towards each new measurement.
        p.observe(100, Duration::from_millis(100));
        let per_token = 0.8 * 0.005 + 0.2 * 0.001;
        assert!((p.per_token.unwrap() - per_token).abs() < 1e-12);
        assert_eq!(p.budget(), (0.2 / per_token) as usize);
    }
}
