//! The simulated device in real time: [`PacedSimRunner`] runs the simulation runner's cost
//! model on the wall clock, so the daemon (`convoy serve --device sim`) serves at a GPU's
//! cadence on a machine without one. Everything on the host (faces, scheduler, KV-cache
//! manager with prefix sharing and the host tier, detokeniser, stop strings, events, metrics)
//! runs for real; only the forward pass is replaced by a wait.
//!
//! Invariants:
//! - A step takes at least its modelled time: `execute` returns no earlier than the step's
//!   start plus [`CostModel::step_time`]. Host work between steps is not hidden: it delays the
//!   next step, as on a real device without overlap.
//! - Tokens are the simulation runner's: a seeded function of the request's seed (its id when
//!   it has none) and its position, never a stop token, so runs are reproducible.
//! - The clock ([`ModelRunner::now`]) is the wall clock as time since the Unix epoch, so a step
//!   log (`--step-log`) can be lined up with a client's own clock on the same machine.
//! - [`PacedSimRunner::timings`] counts, per step, the host time before it (from the end of the
//!   previous step to the start of this one) and how late the step ended against its modelled
//!   time, for host-overhead studies.

use std::time::{Duration, Instant};

use convoy_scheduler::{BlockCopy, BlockId, RequestId, SchedulerOutput};

use crate::runner::{ModelRunner, StepResult};
use crate::sim::{CostModel, SimRunner};

/// Totals of the steps run so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PacedTimings {
    /// Steps with work.
    pub steps: u64,
    /// Modelled time of those steps.
    pub modelled: Duration,
    /// Host time between steps: from one step's end to the next one's start, summed (idle
    /// waits for requests excluded: only gaps before a step that follows another directly).
    pub host_between: Duration,
    /// Time past the modelled end at which steps returned, summed (sleep overshoot).
    pub overshoot: Duration,
}

/// The simulation runner, paced by the wall clock.
pub struct PacedSimRunner {
    sim: SimRunner,
    started: Instant,
    epoch_at_start: Duration,
    last_end: Option<Instant>,
    timings: PacedTimings,
    /// The launched step: when it started, its modelled time, its result.
    launched: Option<(Instant, Duration, StepResult)>,
}

impl PacedSimRunner {
    /// A runner with `cost` per step over a vocabulary of `vocab` tokens.
    pub fn new(cost: CostModel, vocab: usize) -> PacedSimRunner {
        PacedSimRunner {
            sim: SimRunner::new(cost, vocab),
            started: Instant::now(),
            epoch_at_start: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            last_end: None,
            timings: PacedTimings::default(),
            launched: None,
        }
    }

    /// What the steps have taken so far.
    pub fn timings(&self) -> PacedTimings {
        self.timings
    }
}

/// Gaps longer than this before a step are the engine waiting for work, not host overhead.
const IDLE_GAP: Duration = Duration::from_millis(50);

impl ModelRunner for PacedSimRunner {
    fn keep_logits(&mut self, id: RequestId) {
        self.sim.keep_logits(id);
    }

    fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
        self.launch(out);
        self.finish(out)
    }

    /// The simulated device computes apart from the engine thread, as a GPU does.
    fn computes_apart(&self) -> bool {
        true
    }

    /// The simulated device starts computing: the step is due its modelled time from now.
    fn launch(&mut self, out: &SchedulerOutput) {
        let start = Instant::now();
        let modelled = self.sim.cost().step_time(out);
        let result = self.sim.execute(out);
        self.launched = Some((start, modelled, result));
    }

    fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
        let Some((start, modelled, result)) = self.launched.take() else {
            return self.execute(out);
        };
        if out.scheduled.is_empty() {
            return result;
        }
        if let Some(prev) = self.last_end {
            let gap = start.saturating_duration_since(prev);
            if gap < IDLE_GAP {
                self.timings.host_between += gap;
            }
        }
        let due = start + modelled;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let end = Instant::now();
        self.timings.steps += 1;
        self.timings.modelled += modelled;
        self.timings.overshoot += end.saturating_duration_since(due);
        self.last_end = Some(end);
        result
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
        // Monotonic from the start, anchored to the epoch once.
        self.epoch_at_start + self.started.elapsed()
    }

    fn vocab_size(&self) -> usize {
        self.sim.vocab_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_scheduler::ScheduledRequest;

    #[test]
    fn a_step_takes_its_modelled_time_on_the_wall_clock() {
        let cost = CostModel {
            fixed_s: 0.02,
            ..CostModel::smollm2_cpu()
        };
        let mut r = PacedSimRunner::new(cost, 1000);
        let out = SchedulerOutput {
            scheduled: vec![ScheduledRequest {
                id: 1,
                num_computed_tokens: 0,
                token_ids: vec![5, 6, 7],
                block_table: vec![0],
                sample: true,
            }],
            new_requests: vec![convoy_scheduler::NewRequestData {
                id: 1,
                sampling: Default::default(),
            }],
            num_batched_tokens: 3,
            ..Default::default()
        };
        let modelled = cost.step_time(&out);
        let t = Instant::now();
        let res = r.execute(&out);
        assert!(t.elapsed() >= modelled, "{:?} < {modelled:?}", t.elapsed());
        assert_eq!(res.output.sampled.len(), 1);
        assert_eq!(r.timings().steps, 1);
        assert_eq!(r.timings().modelled, modelled);
        // An empty step takes no time.
        let t = Instant::now();
        r.execute(&SchedulerOutput::default());
        assert!(t.elapsed() < Duration::from_millis(5));
    }
}
