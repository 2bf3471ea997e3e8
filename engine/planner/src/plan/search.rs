//! The planner's questions: latencies of a given fleet ([`Planner::evaluate`]), the fewest GPUs
//! that meet the SLOs ([`Planner::fewest`], over a small grid of batch settings), and the
//! curve between.
//!
//! The search assumes that a fleet that meets the SLOs keeps meeting them with more replicas
//! (true when per-replica load falls faster than the hit ratio, which only round-robin lowers
//! with N); it brackets the answer by doubling or halving from an analytic guess, then bisects.
//! Every run of one plan uses the same seed (common random numbers), so neighbouring fleet
//! sizes see the same conversations and arrivals.
//!
//! Invariants: the answer meets every SLO in the simulation that decided it; a fleet one
//! smaller failed (or the answer is 1); the same inputs give the same answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::fleet::{
    simulate, summarize, ConversationBook, EarlyStop, FleetConfig, FleetReport, Load,
    ReplicaConfig, Router, WorkloadSummary,
};
use super::profile::Profile;
use super::PlanError;
use crate::workload::{ArrivalProcessKind, Workload, WorkloadKind, WorkloadSpec};
use convoy_engine::sim::StepShape;

/// Latency objectives (any subset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Median time to first token, ms.
    pub ttft_p50_ms: Option<f64>,
    /// 99th percentile time to first token, ms.
    pub ttft_p99_ms: Option<f64>,
    /// 99th percentile time per output token (per-request mean after the first), ms.
    pub tpot_p99_ms: Option<f64>,
    /// 99th percentile end-to-end latency, ms.
    pub e2e_p99_ms: Option<f64>,
}

/// One latency objective of an [`Slo`]: how it is named, its bound, and the figure of a
/// report it bounds.
#[derive(Clone, Copy, Debug)]
pub struct Objective {
    /// For people: `TTFT p99`.
    pub label: &'static str,
    /// For machines: `ttft_p99`.
    pub key: &'static str,
    /// The bound, ms (`None`: not an objective of this SLO).
    pub bound_ms: Option<f64>,
    /// The report's figure, ms.
    pub of: fn(&FleetReport) -> f64,
}

impl Slo {
    /// Its four objectives, in a fixed order, set or not.
    pub fn objectives(&self) -> [Objective; 4] {
        let o = |label, key, bound_ms, of| Objective {
            label,
            key,
            bound_ms,
            of,
        };
        [
            o(
                "TTFT p50",
                "ttft_p50",
                self.ttft_p50_ms,
                |r: &FleetReport| r.ttft_p50_ms,
            ),
            o(
                "TTFT p99",
                "ttft_p99",
                self.ttft_p99_ms,
                |r: &FleetReport| r.ttft_p99_ms,
            ),
            o(
                "TPOT p99",
                "tpot_p99",
                self.tpot_p99_ms,
                |r: &FleetReport| r.tpot_p99_ms,
            ),
            o("e2e p99", "e2e_p99", self.e2e_p99_ms, |r: &FleetReport| {
                r.e2e_p99_ms
            }),
        ]
    }

    /// No objective at all.
    pub fn is_empty(&self) -> bool {
        self.ttft_p50_ms.is_none()
            && self.ttft_p99_ms.is_none()
            && self.tpot_p99_ms.is_none()
            && self.e2e_p99_ms.is_none()
    }

    /// The objectives a report fails, e.g. `ttft_p99 1234 ms > 1000 ms` (empty: it meets
    /// them). An overloaded run fails whatever its percentiles.
    pub fn failures(&self, r: &FleetReport) -> Vec<String> {
        let mut out = Vec::new();
        for o in self.objectives() {
            if let Some(b) = o.bound_ms {
                let got = (o.of)(r);
                // NaN (no samples) fails too.
                if !matches!(
                    got.partial_cmp(&b),
                    Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                ) {
                    out.push(format!("{} {got:.1} ms > {b} ms", o.key));
                }
            }
        }
        if r.overloaded {
            out.push("overloaded (the queue grows without bound)".into());
        } else if r.cannot_keep_up() {
            out.push(format!(
                "overloaded (full batches serve {:.1} of {:.1} messages/s)",
                r.requests_per_s,
                r.nominal_per_s.unwrap_or(0.0)
            ));
        } else if r.stopped_early && out.is_empty() {
            out.push("stopped early: ttft bound certainly broken".into());
        }
        out
    }

    /// The early stop for a search under these objectives.
    fn early_stop(&self) -> Option<EarlyStop> {
        match (self.ttft_p99_ms, self.ttft_p50_ms) {
            (Some(b), _) => Some(EarlyStop {
                ttft_s: b / 1e3,
                share: 0.01,
            }),
            (None, Some(b)) => Some(EarlyStop {
                ttft_s: b / 1e3,
                share: 0.5,
            }),
            _ => None,
        }
    }

    /// These objectives with the given ones replacing them.
    pub fn relaxed(&self, r: &Slo) -> Slo {
        Slo {
            ttft_p50_ms: r.ttft_p50_ms.or(self.ttft_p50_ms),
            ttft_p99_ms: r.ttft_p99_ms.or(self.ttft_p99_ms),
            tpot_p99_ms: r.tpot_p99_ms.or(self.tpot_p99_ms),
            e2e_p99_ms: r.e2e_p99_ms.or(self.e2e_p99_ms),
        }
    }
}

/// Scheduler settings searched over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BatchConfig {
    /// Requests running at once.
    pub max_running: usize,
    /// Most tokens per step.
    pub max_batched_tokens: usize,
}

/// How the planner simulates.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    /// Router.
    pub router: Router,
    /// Seed of arrivals and routing (the workload's own seed draws the conversations).
    pub seed: u64,
    /// Replicas run in the engine when the fleet is larger (the scale trick).
    pub sample_replicas: usize,
    /// Simulate every replica up to this fleet size.
    pub full_up_to: usize,
    /// Measured requests to aim for (sets the window).
    pub target_requests: usize,
    /// Warm-up override, seconds (default: the 98th percentile of turn offsets, >= 10 s).
    pub warmup_s: Option<f64>,
    /// Window override, seconds.
    pub window_s: Option<f64>,
    /// Shortest and longest automatic window.
    pub window_range_s: (f64, f64),
    /// Simulated part of the warm-up override (default: 1.5 x the cache turnover, >= 10 s).
    pub cache_warmup_s: Option<f64>,
    /// StepPacer target (`None` = off).
    pub step_time_target: Option<Duration>,
    /// Prefix caching.
    pub prefix_caching: bool,
    /// Stop a run as overloaded once a request waited this long, seconds.
    pub overload_wait_s: f64,
    /// Seeds of arrivals and routing the fewest-GPUs answer must meet the SLOs on (the search's
    /// own seed and the next ones); 1 checks only the search's seed.
    pub confirm_seeds: usize,
    /// Relative resolution of the fewest-GPUs answer (0.02: stop bisecting when the bracket
    /// is within 2%, or 1 GPU).
    pub resolution: f64,
    /// Log the steps of a one-replica fleet here (`convoy plan --step-log`).
    pub step_log: Option<std::path::PathBuf>,
    /// Say on stderr how each simulated fleet came out, as it comes (`convoy plan`: the search
    /// takes seconds to minutes).
    pub progress: bool,
}

impl Default for PlanOptions {
    fn default() -> PlanOptions {
        PlanOptions {
            router: Router::Sticky,
            seed: 1,
            sample_replicas: 2,
            full_up_to: 2,
            target_requests: 3000,
            warmup_s: None,
            window_s: None,
            window_range_s: (10.0, 600.0),
            cache_warmup_s: None,
            step_time_target: None,
            prefix_caching: true,
            step_log: None,
            progress: false,
            overload_wait_s: 60.0,
            resolution: 0.02,
            confirm_seeds: 3,
        }
    }
}

/// The answer to "how many GPUs".
#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    /// Fewest replicas meeting the SLOs.
    pub gpus: usize,
    /// The batch settings that reach it.
    pub batch: BatchConfig,
    /// The run that decided it.
    pub report: FleetReport,
    /// Every run of the search, in order: (settings, report, meets).
    pub runs: Vec<(BatchConfig, FleetReport, bool)>,
    /// The answer on each confirming seed, the search's own first: how much the latencies move
    /// with the random draw of arrivals and routing.
    pub seed_reports: Vec<FleetReport>,
    /// Fleet sizes (with the answer's settings) that met the SLOs on the search's seed but
    /// failed on another.
    pub unconfirmed: Vec<usize>,
}

/// A workload, a profile and options: the planner.
pub struct Planner {
    /// The replica.
    pub profile: Profile,
    /// Options.
    pub opts: PlanOptions,
    /// Offered load.
    pub load: Load,
    /// Messages per second (whole fleet; `None` for closed loops and traces).
    pub messages_per_s: Option<f64>,
    /// Workload figures.
    pub summary: WorkloadSummary,
    book: Arc<ConversationBook>,
    cache: HashMap<(usize, BatchConfig, u64), (u64, FleetReport)>,
    /// The run settings of each fleet size and batch setting, fixed by its first run (its
    /// warm-up, window and latency hint): every later run of it (another seed, with or without
    /// an early stop) simulates the same timeline.
    configs: HashMap<(usize, BatchConfig), FleetConfig>,
    /// Measured (TTFT, TPOT) p50 of finished runs, by fleet size and settings.
    hints: Vec<(usize, BatchConfig, (f64, f64))>,
    /// Runs made so far.
    pub runs: usize,
}

impl Planner {
    /// A planner for `spec` at `messages_per_s` (default: the spec's arrival process).
    pub fn new(
        spec: WorkloadSpec,
        messages_per_s: Option<f64>,
        profile: Profile,
        opts: PlanOptions,
    ) -> Result<Planner, PlanError> {
        profile.validate().map_err(|m| PlanError::ProfileInvalid {
            path: profile.name.clone(),
            message: m,
        })?;
        if let Some(r) = messages_per_s {
            if !(r.is_finite() && r > 0.0) {
                return Err(PlanError::invalid("--rate", "must be > 0 messages/s"));
            }
        }
        if opts.sample_replicas == 0 || opts.target_requests == 0 {
            return Err(PlanError::invalid(
                "--sample-replicas/--requests",
                "must be at least 1",
            ));
        }
        let trace = spec.kind == WorkloadKind::Trace;
        let arrival = spec.arrival.clone();
        let workload = Arc::new(Workload::new(spec)?);
        let book = Arc::new(ConversationBook::new(
            workload,
            profile.model.vocab,
            profile.text,
        ));
        let summary = summarize(&book, 2000);
        // The mean of the drawn conversations (the spec's own mean_turns() rounds).
        let mean_turns = summary.mean_turns;
        let (load, mps) = if trace {
            if messages_per_s.is_some() {
                return Err(PlanError::invalid(
                    "--rate",
                    "a trace plays at its own timestamps (scale them with trace.time_scale)",
                ));
            }
            (Load::Trace, None)
        } else if let Some(r) = messages_per_s {
            let cv = if arrival.process == ArrivalProcessKind::Gamma {
                arrival.cv
            } else {
                1.0
            };
            (
                Load::Open {
                    conversations_per_s: r / mean_turns,
                    cv,
                },
                Some(r),
            )
        } else {
            match arrival.process {
                ArrivalProcessKind::Closed => (
                    Load::Closed {
                        concurrency: arrival.concurrency,
                    },
                    None,
                ),
                p => (
                    Load::Open {
                        conversations_per_s: arrival.rate,
                        cv: if p == ArrivalProcessKind::Gamma {
                            arrival.cv
                        } else {
                            1.0
                        },
                    },
                    Some(arrival.rate * mean_turns),
                ),
            }
        };
        Ok(Planner {
            profile,
            opts,
            load,
            messages_per_s: mps,
            summary,
            book,
            cache: HashMap::new(),
            hints: Vec::new(),
            configs: HashMap::new(),
            runs: 0,
        })
    }

    /// The same planner (workload, load, options) on a device whose every step takes `factor`
    /// times as long as the profile says ([`CostModel::scaled`]): how far the answer moves when
    /// the profile is off. Starts with no runs of its own. `factor` must be finite and `> 0`
    /// (`invalid_argument` otherwise).
    ///
    /// [`CostModel::scaled`]: convoy_engine::sim::CostModel::scaled
    pub fn with_cost_factor(&self, factor: f64) -> Result<Planner, PlanError> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(PlanError::invalid(
                "cost factor",
                format!("must be a number > 0, got {factor}"),
            ));
        }
        let mut profile = self.profile.clone();
        profile.cost = profile.cost.scaled(factor);
        Ok(Planner {
            profile,
            opts: PlanOptions {
                step_log: None,
                ..self.opts.clone()
            },
            load: self.load,
            messages_per_s: self.messages_per_s,
            summary: self.summary.clone(),
            book: Arc::clone(&self.book),
            cache: HashMap::new(),
            configs: HashMap::new(),
            hints: Vec::new(),
            runs: 0,
        })
    }

    /// The profile's default batch settings.
    pub fn default_batch(&self) -> BatchConfig {
        BatchConfig {
            max_running: self.profile.defaults.max_running,
            max_batched_tokens: self.profile.defaults.max_batched_tokens,
        }
    }

    fn replica(&self, b: BatchConfig) -> ReplicaConfig {
        let m = &self.profile.memory;
        ReplicaConfig {
            max_running: b.max_running,
            max_batched_tokens: b.max_batched_tokens,
            step_time_target: self.opts.step_time_target,
            num_blocks: m.num_blocks(),
            num_host_blocks: m.num_host_blocks(),
            block_size: m.block_size,
            max_model_len: self.profile.model.max_model_len,
            prefix_caching: self.opts.prefix_caching,
        }
    }

    /// Expected (TTFT, TPOT) of a fleet of `n`: the nearest measured run with the same
    /// settings, else the nearest with any, else the cost model's guess (a full batch of
    /// decodes, a 100-token prefill).
    pub fn latency_hint(&self, n: usize, b: BatchConfig) -> (f64, f64) {
        let dist = |m: usize| (m as f64 / n as f64).ln().abs();
        let near = |same: bool| {
            self.hints
                .iter()
                .filter(|h| !same || h.1 == b)
                .min_by(|x, y| dist(x.0).total_cmp(&dist(y.0)))
                .map(|h| h.2)
        };
        near(true).or_else(|| near(false)).unwrap_or_else(|| {
            let (step, prefill) = self.step_guess(b);
            (step + prefill, step)
        })
    }

    /// Seconds of a full decode step and of one message's uncached prefill (cost model only).
    fn step_guess(&self, b: BatchConfig) -> (f64, f64) {
        let s = &self.summary;
        let ctx = s.mean_system_tokens
            + s.mean_turns * (s.mean_user_tokens + s.mean_max_tokens + 10.0) / 2.0;
        let batch = b.max_running;
        let cost = &self.profile.cost;
        let step = cost.time(&StepShape {
            decode_seqs: batch,
            kv_tokens: (batch as f64 * ctx) as usize,
            attention_pairs: (batch as f64 * ctx) as u64,
            sampled: batch,
            ..Default::default()
        });
        let new_tokens = (s.mean_user_tokens + 15.0) as usize;
        let prefill = cost.time(&StepShape {
            prefill_tokens: new_tokens,
            kv_tokens: ctx as usize,
            attention_pairs: (new_tokens as f64 * ctx) as u64,
            sampled: 1,
            ..Default::default()
        }) - cost.fixed_s;
        (step, prefill.max(0.0))
    }

    /// The automatic warm-up when replies take `(ttft, tpot)` seconds: 99.9% of the turns start
    /// within it (the conversation population has reached its steady mix), at least 10 s.
    fn warmup_at(&self, (ttft, tpot): (f64, f64)) -> f64 {
        self.summary.turn_offset_s(0.999, ttft, tpot).max(10.0)
    }

    /// The run settings of a fleet of `n`: warm-up from the workload's turn timing at the
    /// expected latencies; window sized for `target_requests` measured requests on the
    /// simulated replicas; the simulated part of the warm-up long enough for the cache to turn
    /// over (1.5 x its capacity over the new tokens per second), capped at the longest gap a
    /// conversation's KV must survive (p99 think + reply) + 10 s, at least 10 s.
    pub fn fleet_config(&self, n: usize, b: BatchConfig, early: Option<EarlyStop>) -> FleetConfig {
        let n = n.max(1);
        let k = if n <= self.opts.full_up_to {
            n
        } else {
            self.opts.sample_replicas.min(n)
        };
        let hint = self.latency_hint(n, b);
        let warmup = self.opts.warmup_s.unwrap_or_else(|| self.warmup_at(hint));
        let per_replica = self.messages_per_s.map(|r| r / n as f64);
        let window = self.opts.window_s.unwrap_or_else(|| {
            let (lo, hi) = self.opts.window_range_s;
            match per_replica {
                Some(r) => (self.opts.target_requests as f64 / (r * k as f64)).clamp(lo, hi),
                None => lo.max(60.0).min(hi),
            }
        });
        let cache_warmup = self.opts.cache_warmup_s.unwrap_or_else(|| {
            let m = &self.profile.memory;
            let capacity = ((m.num_blocks() + m.num_host_blocks()) * m.block_size) as f64;
            let new_per_msg = self.summary.mean_user_tokens + self.summary.mean_max_tokens + 10.0;
            let horizon = self.summary.reuse_gap_p99_s(hint.0, hint.1) + 10.0;
            match per_replica {
                Some(r) => (1.5 * capacity / (r * new_per_msg)).min(horizon).max(10.0),
                None => warmup,
            }
        });
        FleetConfig {
            replicas: n,
            router: self.opts.router,
            replica: self.replica(b),
            cost: self.profile.cost,
            vocab: self.profile.model.vocab,
            load: self.load,
            seed: self.opts.seed,
            simulated: k,
            warmup_s: warmup,
            window_s: window,
            sim_start_s: (warmup - cache_warmup).max(0.0),
            overload_wait_s: self.opts.overload_wait_s,
            early_stop: early,
            latency_hint: hint,
            step_log: if n == 1 {
                self.opts.step_log.clone()
            } else {
                None
            },
        }
    }

    /// Simulate a fleet of `n` with batch settings `b` (full statistics, no early stop).
    pub fn evaluate(&mut self, n: usize, b: BatchConfig) -> FleetReport {
        self.run(n, b, None)
    }

    fn run(&mut self, n: usize, b: BatchConfig, early: Option<EarlyStop>) -> FleetReport {
        self.run_seeded(n, b, early, self.opts.seed)
    }

    /// A run with arrivals and routing drawn from `seed`.
    fn run_seeded(
        &mut self,
        n: usize,
        b: BatchConfig,
        early: Option<EarlyStop>,
        seed: u64,
    ) -> FleetReport {
        let key = early.map_or(0, |e| e.ttft_s.to_bits() ^ e.share.to_bits().rotate_left(1));
        // A run that did not stop early answers for any early stop (and for none).
        if let Some((k, r)) = self.cache.get(&(n, b, seed)) {
            if !r.stopped_early || *k == key {
                return r.clone();
            }
        }
        let fixed = self.configs.get(&(n, b)).cloned();
        let first_run = fixed.is_none();
        let mut cfg = fixed.unwrap_or_else(|| self.fleet_config(n, b, early));
        cfg.seed = seed;
        cfg.early_stop = early;
        let mut r = simulate(&cfg, &self.book);
        self.runs += 1;
        // The warm-up came from expected latencies; a fleet near its knee replies slower, its
        // conversations take longer to reach their steady mix, and a short warm-up would measure
        // it under a lighter load than it gets. The first run of a fleet runs again with the
        // warm-up its own latencies ask (those of the requests that finished, if it stopped
        // early), and every later run of that fleet keeps it.
        if first_run {
            let measured = (r.ttft_p50_ms / 1e3, r.tpot_p50_ms / 1e3);
            let needed = if self.opts.warmup_s.is_none()
                && !r.overloaded
                && measured.0.is_finite()
                && measured.1.is_finite()
            {
                self.warmup_at(measured)
            } else {
                0.0
            };
            if needed > cfg.warmup_s * 1.1 {
                if self.opts.progress {
                    eprintln!(
                        "  simulated {n} GPUs (seed {seed}): replies slower than its warm-up assumed (TTFT p50 {:.0} ms, TPOT p50 {:.0} ms); again with a {needed:.0} s warm-up",
                        r.ttft_p50_ms,
                        r.tpot_p50_ms
                    );
                }
                lengthen_warmup(&mut cfg, needed);
                r = simulate(&cfg, &self.book);
                self.runs += 1;
            }
            self.configs.insert((n, b), cfg);
        }
        r.nominal_per_s = self.messages_per_s;
        if self.opts.progress {
            // A run stopped early or overloaded may have too few finished requests for a p99.
            let ttft = match (r.stopped_early, early, r.ttft_p99_ms.is_finite()) {
                (true, Some(e), _) => format!(
                    "stopped early: TTFT p{:.0} certainly over {:.0} ms",
                    100.0 * (1.0 - e.share),
                    e.ttft_s * 1e3
                ),
                (_, _, true) => format!("TTFT p99 {:.0} ms", r.ttft_p99_ms),
                _ => "TTFT p99 unknown (too few requests finished)".to_string(),
            };
            eprintln!(
                "  simulated {n} GPUs (max_running {}, max_batched_tokens {}, seed {seed}): {ttft}{} in {:.1} s",
                b.max_running,
                b.max_batched_tokens,
                if r.cannot_keep_up() { ", overloaded" } else { "" },
                r.sim_wall_s
            );
        }
        tracing::info!(
            gpus = n,
            max_running = b.max_running,
            tokens = b.max_batched_tokens,
            ttft_p99_ms = r.ttft_p99_ms,
            wall_s = r.sim_wall_s,
            "fleet run"
        );
        if !r.cannot_keep_up() && !r.stopped_early && r.unfinished == 0 && r.requests > 0 {
            self.hints
                .push((n, b, (r.ttft_p50_ms / 1e3, r.tpot_p50_ms / 1e3)));
        }
        self.cache.insert((n, b, seed), (key, r.clone()));
        r
    }

    /// The reports of a fleet on each confirming seed (the search's own first), or the report
    /// of the first seed that fails `slo`.
    fn confirmed(
        &mut self,
        n: usize,
        b: BatchConfig,
        early: Option<EarlyStop>,
        slo: &Slo,
    ) -> Result<Vec<FleetReport>, Box<FleetReport>> {
        let mut reports = Vec::new();
        for i in 0..self.opts.confirm_seeds.max(1) as u64 {
            let r = self.run_seeded(n, b, early, self.opts.seed.wrapping_add(i));
            if !slo.failures(&r).is_empty() {
                return Err(Box::new(r));
            }
            reports.push(r);
        }
        Ok(reports)
    }

    /// A first guess of the fleet size: the messages per second one replica can serve at a
    /// full batch of decodes plus each message's uncached prompt, at 80% utilisation.
    pub fn guess(&self, b: BatchConfig) -> usize {
        let Some(rate) = self.messages_per_s else {
            return 1;
        };
        let (step, prefill) = self.step_guess(b);
        let per_msg = self.summary.mean_max_tokens * step / b.max_running as f64 + prefill;
        let capacity = 0.8 / per_msg.max(1e-9);
        ((rate / capacity).ceil() as usize).max(1)
    }

    /// Whether a bracket `(lo fails, hi meets)` is as tight as the resolution asks.
    fn tight(&self, lo: usize, hi: usize) -> bool {
        hi - lo <= ((hi as f64 * self.opts.resolution) as usize).max(1)
    }

    /// The largest fleet below `n` worth trying (one resolution step down).
    fn below(&self, n: usize) -> usize {
        n.saturating_sub(((n as f64 * self.opts.resolution) as usize).max(1))
    }

    /// The fewest GPUs meeting `slo`, over the batch settings in `grid`, up to `max_gpus`.
    pub fn fewest(
        &mut self,
        slo: &Slo,
        grid: &[BatchConfig],
        max_gpus: usize,
    ) -> Result<SearchResult, PlanError> {
        self.fewest_from(slo, grid, max_gpus, None)
    }

    /// [`Planner::fewest`], bracketing the first setting's answer from `start` GPUs instead of
    /// the analytic guess (a known answer nearby: the same question with another profile).
    pub fn fewest_from(
        &mut self,
        slo: &Slo,
        grid: &[BatchConfig],
        max_gpus: usize,
        start: Option<usize>,
    ) -> Result<SearchResult, PlanError> {
        if slo.is_empty() {
            return Err(PlanError::NoSlo);
        }
        let early = slo.early_stop();
        let mut runs: Vec<(BatchConfig, FleetReport, bool)> = Vec::new();
        let mut best: Option<(usize, BatchConfig, Vec<FleetReport>, Vec<usize>)> = None;
        let mut closest: Option<FleetReport> = None;
        let mut unconfirmed_failure: Option<FleetReport> = None;
        let mut check = |p: &mut Planner, n: usize, b: BatchConfig| -> bool {
            let r = p.run(n, b, early);
            let ok = slo.failures(&r).is_empty();
            if n == max_gpus && !ok {
                let better = closest.as_ref().is_none_or(|c| {
                    (slo.failures(&r).len(), r.ttft_p99_ms) < (slo.failures(c).len(), c.ttft_p99_ms)
                });
                if better {
                    closest = Some(r.clone());
                }
            }
            runs.push((b, r, ok));
            ok
        };
        for &b in grid {
            let limit = best.as_ref().map_or(max_gpus, |x| self.below(x.0));
            if limit == 0 {
                break;
            }
            // Bracket: `lo` fails (0 = nothing smaller to try), `hi` meets.
            let (mut lo, mut hi);
            if best.is_some() {
                if !check(self, limit, b) {
                    continue;
                }
                hi = limit;
                lo = 0;
                let mut g = (limit / 2).max(1);
                while g < hi {
                    if check(self, g, b) {
                        hi = g;
                        g = (g / 2).max(1);
                        if hi == 1 {
                            break;
                        }
                    } else {
                        lo = g;
                        break;
                    }
                }
            } else {
                let g = start.unwrap_or_else(|| self.guess(b)).clamp(1, limit);
                if check(self, g, b) {
                    hi = g;
                    lo = 0;
                    let mut d = g;
                    while d > 1 {
                        d = ((d as f64 / 1.5) as usize).max(1);
                        if check(self, d, b) {
                            hi = d;
                        } else {
                            lo = d;
                            break;
                        }
                    }
                } else {
                    lo = g;
                    let mut u = g;
                    loop {
                        if u >= limit {
                            hi = 0;
                            break;
                        }
                        // Grow by what the failed run served of what was offered (at least
                        // 10%, at most 2x).
                        let r = self.run(u, b, early);
                        let f =
                            (r.offered_per_s / r.requests_per_s.max(1e-9) * 1.05).clamp(1.1, 2.0);
                        u = ((u as f64 * f).ceil() as usize).min(limit);
                        if check(self, u, b) {
                            hi = u;
                            break;
                        }
                        lo = u;
                    }
                    if hi == 0 {
                        continue;
                    }
                }
            }
            while !self.tight(lo, hi) {
                let mid = lo + (hi - lo) / 2;
                if check(self, mid, b) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            // The answer must meet the SLOs on every confirming seed too. Where one fails, the
            // answer sits in the noise of the draw: step up by the resolution (stopping at
            // `limit`, which is tried itself) until every seed agrees.
            let up = |p: &Planner, n: usize| {
                (n + ((n as f64 * p.opts.resolution) as usize).max(1)).min(limit)
            };
            let mut unconfirmed = Vec::new();
            let seed_reports = loop {
                match self.confirmed(hi, b, early, slo) {
                    Ok(reports) => break Some(reports),
                    Err(failing) => unconfirmed_failure = Some(*failing),
                }
                unconfirmed.push(hi);
                if hi >= limit {
                    break None;
                }
                hi = up(self, hi);
                while hi < limit && !check(self, hi, b) {
                    hi = up(self, hi);
                }
                if hi == limit && !check(self, hi, b) {
                    break None;
                }
            };
            let Some(seed_reports) = seed_reports else {
                continue;
            };
            if best.as_ref().is_none_or(|x| hi < x.0) {
                best = Some((hi, b, seed_reports, unconfirmed));
            }
        }
        match best {
            Some((gpus, batch, seed_reports, unconfirmed)) => Ok(SearchResult {
                gpus,
                batch,
                report: seed_reports[0].clone(),
                runs,
                seed_reports,
                unconfirmed,
            }),
            None => {
                // The closest fleet that failed: at the limit, or on a confirming seed.
                let best = closest
                    .or(unconfirmed_failure)
                    .or_else(|| runs.last().map(|r| r.1.clone()))
                    .unwrap_or_default();
                Err(PlanError::Unreachable {
                    max_gpus,
                    failing: slo.failures(&best),
                    best: Box::new(best),
                })
            }
        }
    }
}

/// Set `cfg`'s warm-up to `warmup_s` (no shorter than it is), keeping the simulated part's length.
fn lengthen_warmup(cfg: &mut FleetConfig, warmup_s: f64) {
    let w = warmup_s.max(cfg.warmup_s);
    cfg.sim_start_s += w - cfg.warmup_s;
    cfg.warmup_s = w;
}
