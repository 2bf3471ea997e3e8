//! The simulation backend: the real scheduler and engine core driven by a runner that computes
//! nothing and advances a virtual clock by a cost model, so policies can be studied at scales
//! this machine cannot run (and the capacity planner can build on it).
//!
//! Step time = `fixed + tokens x per_token + kv_tokens x per_kv_token`, where `tokens` are the
//! batched tokens and `kv_tokens` the context read by attention. Sampled tokens are a seeded
//! function of the request and position, never a stop token unless `eos` is set.

use std::collections::HashMap;
use std::time::Duration;

use convoy_scheduler::{BlockCopy, BlockId, ModelOutput, RequestId, SampledToken, SchedulerOutput};

use crate::runner::{state_of, track_requests, ModelRunner, StepResult};
use crate::sampler::Rng;

/// Cost of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Per step, whatever it holds (reading the weights once).
    pub fixed: Duration,
    /// Per batched token (the matrix multiplies).
    pub per_token: Duration,
    /// Per token of context read by attention, summed over the batch.
    pub per_kv_token: Duration,
}

impl CostModel {
    /// Rough figures of SmolLM2 Q4_1 on this project's 2-core CPU (docs/benchmarks.md):
    /// ~7.5 ms per decode step, ~1 ms per prefill token, attention ~2 us per context token.
    pub fn smollm2_cpu() -> CostModel {
        CostModel {
            fixed: Duration::from_micros(7500),
            per_token: Duration::from_micros(1000),
            per_kv_token: Duration::from_nanos(2000),
        }
    }

    /// Time of one step.
    pub fn step_time(&self, out: &SchedulerOutput) -> Duration {
        if out.scheduled.is_empty() {
            return Duration::ZERO;
        }
        let kv: usize = out
            .scheduled
            .iter()
            .map(|s| s.num_computed_tokens + s.token_ids.len())
            .sum();
        self.fixed + self.per_token * out.num_batched_tokens as u32 + self.per_kv_token * kv as u32
    }
}

/// A runner that only advances a clock.
pub struct SimRunner {
    cost: CostModel,
    clock: Duration,
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
            clock: Duration::ZERO,
            vocab,
            eos: None,
            rngs: HashMap::new(),
        }
    }
}

impl ModelRunner for SimRunner {
    fn keep_logits(&mut self, _id: RequestId) {}

    fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
        track_requests(&mut self.rngs, out, |n| {
            Rng::new(n.sampling.seed.unwrap_or(n.id))
        });
        self.clock += self.cost.step_time(out);
        let mut sampled = Vec::new();
        // Ordinary tokens are drawn above the first few ids (where special tokens usually sit).
        let first = (self.vocab / 2).min(100) as u32;
        for s in out.scheduled.iter().filter(|s| s.sample) {
            let rng = state_of(&mut self.rngs, s.id);
            let token = match self.eos {
                Some((eos, p)) if rng.uniform() < p => eos,
                _ => first + (rng.uniform() * (self.vocab as u32 - first) as f64) as u32,
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
        self.clock
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
