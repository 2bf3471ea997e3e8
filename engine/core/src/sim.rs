//! The simulation backend: the real scheduler and engine core driven by a runner that computes
//! nothing and advances a virtual clock by a cost model, so policies can be studied at scales
//! this machine cannot run; the capacity planner (`convoy_planner::plan`) builds fleets of these.
//!
//! Step time ([`CostModel::time`]) = `fixed + prefill tokens x prefill_token + decode sequences
//! x decode_token + context tokens read x kv_token + attention pairs x attention_pair + copied
//! slots x copy_token`, plus, when the model has a [`Roofline`], `max(bytes moved / bandwidth,
//! flops / peak)`. The linear terms describe a compute-bound CPU (fitted by `convoy-bench
//! calibrate`), the roofline a GPU (weights read once per step, KV read per sequence).
//!
//! Invariants: the clock only moves forward (by a step's cost, or to a later time through a
//! [`SimClock`] handle while the engine is idle); sampled tokens are a seeded function of the
//! request's seed (its id when it has none) and its position, the same on every replica
//! ([`sim_reply_ids`] reproduces them without running anything), and never a stop token unless
//! `eos` is set.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy_scheduler::{BlockCopy, BlockId, ModelOutput, RequestId, SampledToken, SchedulerOutput};
use serde::{Deserialize, Serialize};

use crate::runner::{state_of, track_requests, ModelRunner, StepResult};
use crate::sampler::Rng;

/// What one step holds, as far as its cost is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepShape {
    /// Tokens of prompt chunks (sequences with more than one new token, or one that does not
    /// sample).
    pub prefill_tokens: usize,
    /// Sequences decoding one token.
    pub decode_seqs: usize,
    /// Context read by attention: the sum over sequences of their length after the step.
    pub kv_tokens: usize,
    /// (query, key) pairs attention scores: for a sequence with `c` cached and `n` new tokens,
    /// `n c + n (n + 1) / 2`.
    pub attention_pairs: u64,
    /// Rows sampled (logits computed).
    pub sampled: usize,
    /// Slots copied between blocks or tiers before the step.
    pub copied_slots: usize,
}

impl StepShape {
    /// The shape of a scheduled step.
    pub fn of(out: &SchedulerOutput) -> StepShape {
        let mut s = StepShape {
            copied_slots: out.copies.iter().map(|c| c.num_slots).sum(),
            ..StepShape::default()
        };
        for r in &out.scheduled {
            let n = r.token_ids.len();
            let c = r.num_computed_tokens;
            if n == 1 && r.sample {
                s.decode_seqs += 1;
            } else {
                s.prefill_tokens += n;
            }
            s.kv_tokens += c + n;
            s.attention_pairs += (n * c + n * (n + 1) / 2) as u64;
            s.sampled += r.sample as usize;
        }
        s
    }

    /// Tokens in the forward pass.
    pub fn tokens(&self) -> usize {
        self.prefill_tokens + self.decode_seqs
    }
}

/// A roofline term: a step takes as long as its memory traffic or its arithmetic, whichever
/// is longer, at effective (peak x efficiency) rates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    /// Bytes read once per step whatever it holds (the weights).
    pub weight_bytes: f64,
    /// Bytes of K and V per token of context (all layers), read by attention and written for
    /// each new token.
    pub kv_bytes_per_token: f64,
    /// Floating-point operations per batched token in the matrix multiplies (about 2 x the
    /// parameters outside the output projection).
    pub flops_per_token: f64,
    /// Operations of the output projection per sampled row (2 x hidden x vocabulary).
    pub flops_per_sampled: f64,
    /// Operations per attention (query, key) pair (4 x layers x heads x head dim).
    pub flops_per_attention_pair: f64,
    /// Effective memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Effective arithmetic rate, FLOP/s.
    pub flops: f64,
}

impl Roofline {
    /// Seconds of a step: `max(memory, compute)`.
    pub fn time(&self, s: &StepShape) -> f64 {
        if s.tokens() == 0 {
            return 0.0;
        }
        let bytes = self.weight_bytes + (s.kv_tokens + s.tokens()) as f64 * self.kv_bytes_per_token;
        let flops = s.tokens() as f64 * self.flops_per_token
            + s.sampled as f64 * self.flops_per_sampled
            + s.attention_pairs as f64 * self.flops_per_attention_pair;
        (bytes / self.bandwidth).max(flops / self.flops)
    }
}

/// Cost of one step (seconds per unit; see the module header for the formula).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Per step, whatever it holds (launches, reading the weights on a CPU).
    pub fixed_s: f64,
    /// Per prompt token in the batch.
    pub prefill_token_s: f64,
    /// Per decoding sequence (one token; includes its sampled row).
    pub decode_token_s: f64,
    /// Per token of context read by attention, summed over the batch.
    #[serde(default)]
    pub kv_token_s: f64,
    /// Per attention (query, key) pair.
    #[serde(default)]
    pub attention_pair_s: f64,
    /// Per slot copied between blocks or tiers (swap to or from the host tier).
    #[serde(default)]
    pub copy_token_s: f64,
    /// A roofline term added to the linear ones (GPU profiles).
    #[serde(default)]
    pub roofline: Option<Roofline>,
    /// Per request, seconds spent outside engine steps: from the client's send to the engine
    /// seeing the request (framing, templating, tokenising) plus the first token's way back.
    /// Not part of any step; the fleet simulation delays each request's arrival by it.
    #[serde(default)]
    pub request_edge_s: f64,
    /// Per request and per other request running on its replica when its first token is out,
    /// seconds added to its delivery: the part of the edge that grows with load (each running
    /// stream's tokens pass through the daemon's I/O thread and the client, which share the
    /// CPU with the engine). Fitted by `convoy-bench calibrate` from runs at several loads; 0 on
    /// a GPU replica, whose host cores are not busy computing.
    #[serde(default)]
    pub request_edge_per_running_s: f64,
}

impl CostModel {
    /// Rough figures of SmolLM2 Q4_1 on this project's 2-core CPU (docs/benchmarks.md):
    /// ~7.5 ms per decode step, ~1 ms per batched token, attention ~2 us per context token.
    pub fn smollm2_cpu() -> CostModel {
        CostModel {
            fixed_s: 7.5e-3,
            prefill_token_s: 1e-3,
            decode_token_s: 1e-3,
            kv_token_s: 2e-6,
            attention_pair_s: 0.0,
            copy_token_s: 0.0,
            roofline: None,
            request_edge_s: 0.0,
            request_edge_per_running_s: 0.0,
        }
    }

    /// The same model with every step `factor` times as long (linear terms multiplied, the
    /// roofline's rates divided); the per-request edge, which is not a step, is kept. What a
    /// planner asks to see how its answer moves when the device is slower (or faster) than
    /// profiled.
    pub fn scaled(&self, factor: f64) -> CostModel {
        CostModel {
            fixed_s: self.fixed_s * factor,
            prefill_token_s: self.prefill_token_s * factor,
            decode_token_s: self.decode_token_s * factor,
            kv_token_s: self.kv_token_s * factor,
            attention_pair_s: self.attention_pair_s * factor,
            copy_token_s: self.copy_token_s * factor,
            roofline: self.roofline.map(|r| Roofline {
                bandwidth: r.bandwidth / factor,
                flops: r.flops / factor,
                ..r
            }),
            request_edge_s: self.request_edge_s,
            request_edge_per_running_s: self.request_edge_per_running_s,
        }
    }

    /// Seconds of a step of this shape (0 for an empty step).
    pub fn time(&self, s: &StepShape) -> f64 {
        if s.tokens() == 0 && s.copied_slots == 0 {
            return 0.0;
        }
        self.fixed_s
            + s.prefill_tokens as f64 * self.prefill_token_s
            + s.decode_seqs as f64 * self.decode_token_s
            + s.kv_tokens as f64 * self.kv_token_s
            + s.attention_pairs as f64 * self.attention_pair_s
            + s.copied_slots as f64 * self.copy_token_s
            + self.roofline.map_or(0.0, |r| r.time(s))
    }

    /// Time of one step.
    pub fn step_time(&self, out: &SchedulerOutput) -> Duration {
        if out.scheduled.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.time(&StepShape::of(out)).max(0.0))
    }
}

/// A shared handle on a simulator's clock: lets a fleet move an idle replica's clock forward
/// to the time a request reaches it (the engine itself only has read access to its runner).
#[derive(Clone, Debug, Default)]
pub struct SimClock(Arc<AtomicU64>);

impl SimClock {
    /// The time.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    /// Move the clock to `t` if it is earlier (never backwards).
    pub fn advance_to(&self, t: Duration) {
        self.0.fetch_max(t.as_nanos() as u64, Ordering::Relaxed);
    }

    fn add(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The first id ordinary simulated tokens are drawn from (special tokens usually sit below).
fn first_ordinary(vocab: usize) -> u32 {
    (vocab / 2).min(100) as u32
}

fn draw(rng: &mut Rng, vocab: usize) -> u32 {
    let first = first_ordinary(vocab);
    first + (rng.uniform() * (vocab as u32 - first) as f64) as u32
}

/// The first `n` tokens a [`SimRunner`] (without `eos`) samples for a request with this seed:
/// what a reply is, without simulating it.
pub fn sim_reply_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| draw(&mut rng, vocab)).collect()
}

/// A runner that only advances a clock.
pub struct SimRunner {
    cost: CostModel,
    clock: SimClock,
    vocab: usize,
    /// `(token, probability)`: sample this stop token with the given probability per step.
    pub eos: Option<(u32, f64)>,
    rngs: HashMap<RequestId, Rng>,
}

impl SimRunner {
    /// A simulator with a cost model and a vocabulary size.
    pub fn new(cost: CostModel, vocab: usize) -> SimRunner {
        SimRunner {
            cost,
            clock: SimClock::default(),
            vocab,
            eos: None,
            rngs: HashMap::new(),
        }
    }

    /// A handle on the clock (to move an idle simulator to a later time).
    pub fn clock(&self) -> SimClock {
        self.clock.clone()
    }

    /// The cost model.
    pub fn cost(&self) -> &CostModel {
        &self.cost
    }
}

impl ModelRunner for SimRunner {
    fn keep_logits(&mut self, _id: RequestId) {}

    fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
        track_requests(&mut self.rngs, out, |n| {
            Rng::new(n.sampling.seed.unwrap_or(n.id))
        });
        self.clock.add(self.cost.step_time(out));
        let mut sampled = Vec::new();
        for s in out.scheduled.iter().filter(|s| s.sample) {
            let rng = state_of(&mut self.rngs, s.id);
            let token = match self.eos {
                Some((eos, p)) if rng.uniform() < p => eos,
                _ => draw(rng, self.vocab),
            };
            sampled.push(SampledToken { id: s.id, token });
        }
        StepResult {
            output: ModelOutput { sampled },
            ..Default::default()
        }
    }

    fn recompute_logits(
        &mut self,
        _tokens: &[u32],
        _blocks: &[BlockId],
        _copies: &[BlockCopy],
    ) -> Option<Vec<f32>> {
        None
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_scheduler::ScheduledRequest;

    fn req(c: usize, n: usize, sample: bool) -> ScheduledRequest {
        ScheduledRequest {
            id: 0,
            num_computed_tokens: c,
            token_ids: vec![1; n],
            block_table: vec![],
            sample,
        }
    }

    #[test]
    fn shapes_and_costs() {
        let out = SchedulerOutput {
            scheduled: vec![req(100, 1, true), req(0, 10, false), req(50, 4, true)],
            num_batched_tokens: 15,
            ..Default::default()
        };
        let s = StepShape::of(&out);
        assert_eq!(s.decode_seqs, 1);
        assert_eq!(s.prefill_tokens, 14);
        assert_eq!(s.kv_tokens, 101 + 10 + 54);
        assert_eq!(s.attention_pairs, 101 + 55 + (200 + 10));
        assert_eq!(s.sampled, 2);
        let c = CostModel::smollm2_cpu();
        let t = c.time(&s);
        assert!((t - (7.5e-3 + 15e-3 + 165.0 * 2e-6)).abs() < 1e-12);
        assert_eq!(c.time(&StepShape::default()), 0.0);
        // The roofline: a decode step of a big model is bound by reading the weights.
        let r = Roofline {
            weight_bytes: 16e9,
            kv_bytes_per_token: 131072.0,
            flops_per_token: 14e9,
            flops_per_sampled: 1e9,
            flops_per_attention_pair: 5e5,
            bandwidth: 3e12,
            flops: 6e14,
        };
        let d = StepShape {
            decode_seqs: 1,
            kv_tokens: 1000,
            attention_pairs: 1000,
            sampled: 1,
            ..Default::default()
        };
        assert!((r.time(&d) - (16e9 + 1001.0 * 131072.0) / 3e12).abs() < 1e-12);
        // Scaled: every step of every shape takes the factor times as long, the edge stays.
        let both = CostModel {
            roofline: Some(r),
            request_edge_s: 0.004,
            ..c
        };
        let slower = both.scaled(1.1);
        for shape in [s, d] {
            assert!((slower.time(&shape) - 1.1 * both.time(&shape)).abs() < 1e-12);
        }
        assert_eq!(slower.request_edge_s, 0.004);
    }

    #[test]
    fn replies_are_reproducible() {
        let ids = sim_reply_ids(42, 5, 1000);
        assert_eq!(ids, sim_reply_ids(42, 5, 1000));
        assert!(ids.iter().all(|&t| (100..1000).contains(&t)));
        let clock = SimClock::default();
        clock.advance_to(Duration::from_secs(2));
        clock.advance_to(Duration::from_secs(1));
        assert_eq!(clock.now(), Duration::from_secs(2));
    }
}
