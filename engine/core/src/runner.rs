//! Model runners: execute what the scheduler decided. `ModelRunner::execute(&SchedulerOutput)
//! -> ModelOutput`, nothing more: the runner never decides.
//!
//! The step contract: a runner learns of requests only from the step output
//! (`new_requests`, `finished_ids`), returns exactly one token per scheduled request with
//! `sample`, tagged with its id, and fails loudly (panics) when asked to sample a request it
//! was never told of. The scheduler matches tokens by id and refuses any mismatch.
//!
//! [`Runner`] runs the real model on a backend ([`CpuRunner`]: the CPU one) and samples with
//! each request's own parameters and seeded random stream. The simulation runner lives in `sim.rs`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use convoy_scheduler::{
    BlockId, ModelOutput, NewRequestData, RequestId, SampledToken, SamplingSpec, SchedulerOutput,
};

use crate::backend::cpu::CpuBackend;
use crate::backend::{forward, run_begun_pass, Backend, RowDraw};
use crate::forward_batch::ForwardBatch;
use crate::model::llama::LlamaModel;
use crate::sampler::sample;

/// Log-probability of the sampled token and of the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one step produced, beyond the sampled tokens.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    /// Sampled tokens, in scheduled order.
    pub output: ModelOutput,
    /// Log-probabilities for requests that asked for them.
    pub logprobs: HashMap<RequestId, TokenLogprobs>,
    /// Logits kept for requests marked with [`ModelRunner::keep_logits`] (cache verification).
    pub kept_logits: HashMap<RequestId, Vec<f32>>,
}

/// Executes scheduled steps.
pub trait ModelRunner {
    /// Keep the logits of `id`'s row in the next step (for cache verification); called before
    /// `execute`, possibly for a request that step announces.
    fn keep_logits(&mut self, id: RequestId);
    /// Run one step: set up `out.new_requests`, drop `out.finished_ids`, execute the copies and
    /// the forward pass, sample one token per scheduled request with `sample`.
    fn execute(&mut self, out: &SchedulerOutput) -> StepResult;
    /// Whether [`ModelRunner::launch`] returns while the step computes (a GPU's stream, the
    /// paced simulation), so work done between `launch` and `finish` overlaps it. Where it
    /// does not, the engine leaves the whole step to `finish` and does its host work first.
    fn computes_apart(&self) -> bool {
        false
    }
    /// Start the step `out`: a runner whose device computes apart from the host starts it here
    /// and returns at once, so the engine thread does host work while it runs;
    /// [`ModelRunner::finish`] (with the same `out`) waits and returns its result. By default
    /// the whole step runs in `finish`.
    fn launch(&mut self, out: &SchedulerOutput) {
        let _ = out;
    }
    /// The result of the step [`ModelRunner::launch`] started.
    fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
        self.execute(out)
    }
    /// Logits of the last position of `tokens` computed from scratch in `blocks` (after
    /// `copies`); `None` when the runner computes nothing.
    fn recompute_logits(
        &mut self,
        tokens: &[u32],
        blocks: &[BlockId],
        copies: &[convoy_scheduler::BlockCopy],
    ) -> Option<Vec<f32>>;
    /// Time since the runner started: wall clock, or the simulated clock.
    fn now(&self) -> Duration;
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Device KV blocks, where the runner's backend sized them itself (a share of a GPU's
    /// memory); the scheduler then manages that many.
    fn kv_blocks(&self) -> Option<usize> {
        None
    }
}

/// A request's draw: its parameters, its seed and how many tokens it has sampled.
pub struct SamplerState {
    spec: SamplingSpec,
    seed: u64,
    step: u64,
}

impl SamplerState {
    /// State for a request announced by the scheduler; a request without a seed gets one from
    /// the clock and its id.
    pub fn new(n: &NewRequestData) -> SamplerState {
        let seed = n.sampling.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ n.id
        });
        SamplerState {
            spec: n.sampling.clone(),
            seed,
            step: 0,
        }
    }
}

/// Apply a step's announcements to a runner's per-request states.
pub fn track_requests<T>(
    states: &mut HashMap<RequestId, T>,
    out: &SchedulerOutput,
    new: impl Fn(&NewRequestData) -> T,
) {
    for id in &out.finished_ids {
        states.remove(id);
    }
    for n in &out.new_requests {
        states.insert(n.id, new(n));
    }
}

/// The state of a request the step samples; a request never announced is a broken step
/// contract, and the engine stops rather than guess.
pub fn state_of<T>(states: &mut HashMap<RequestId, T>, id: RequestId) -> &mut T {
    states.get_mut(&id).unwrap_or_else(|| {
        panic!("step contract: request {id} is sampled but was never announced to the runner")
    })
}

/// The real model on a backend: runs the forward pass written once in [`crate::backend`] and
/// samples each request's row on the host with its own parameters and seeded stream.
pub struct Runner<B: Backend> {
    backend: B,
    samplers: HashMap<RequestId, SamplerState>,
    /// Requests whose next sampled logits row is kept (cache verification).
    keep: HashSet<RequestId>,
    /// The logits of the last step, kept for the next one to write over (a fresh buffer of
    /// 16 rows of a 49k vocabulary is 3 MiB to zero every step).
    logits: Vec<f32>,
    /// The step between [`ModelRunner::launch`] and [`ModelRunner::finish`].
    pending: PendingStep,
    started: Instant,
}

/// What [`ModelRunner::finish`] needs of the step [`ModelRunner::launch`] started.
#[derive(Default)]
struct PendingStep {
    /// Whether a step was launched and not finished.
    launched: bool,
    /// The request of each logits row, in row order.
    rows: Vec<RequestId>,
    /// Whether the backend draws the tokens on its device (else the host samples the logits).
    on_device: bool,
}

/// The real model on the CPU backend.
pub type CpuRunner<'m> = Runner<CpuBackend<'m>>;

impl<'m> Runner<CpuBackend<'m>> {
    /// A CPU runner with KV storage for `num_blocks` device and `num_host_blocks` host blocks.
    pub fn new(
        model: &'m LlamaModel,
        num_blocks: usize,
        num_host_blocks: usize,
        block_size: usize,
    ) -> CpuRunner<'m> {
        let cache = model.new_tiered_kv_cache(num_blocks, num_host_blocks, block_size);
        Runner::with_backend(CpuBackend::new(model, cache))
    }
}

impl<B: Backend> Runner<B> {
    /// A runner over `backend`.
    pub fn with_backend(backend: B) -> Runner<B> {
        Runner {
            backend,
            samplers: HashMap::new(),
            keep: HashSet::new(),
            logits: Vec::new(),
            pending: PendingStep::default(),
            started: Instant::now(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn forward(&mut self, batch: &ForwardBatch, logits: &mut Vec<f32>) {
        // A device that fails mid-step leaves its KV state unknown: the engine stops loudly.
        if let Err(e) = forward(&mut self.backend, batch, logits) {
            panic!("forward pass failed: {e}");
        }
    }

    /// The device draws of the launched step's rows, one per row; `None` when a row needs its
    /// logits on the host (logprobs, kept logits) or no row samples.
    fn device_draws(&mut self) -> Option<Vec<RowDraw>> {
        if self.pending.rows.is_empty() {
            return None;
        }
        let mut draws = Vec::with_capacity(self.pending.rows.len());
        for &id in &self.pending.rows {
            let st = state_of(&mut self.samplers, id);
            if st.spec.logprobs.is_some() || self.keep.contains(&id) {
                return None;
            }
            draws.push(RowDraw {
                temperature: if st.spec.is_greedy() {
                    0.0
                } else {
                    st.spec.temperature
                },
                top_k: st.spec.top_k.min(u32::MAX as usize) as u32,
                top_p: st.spec.top_p,
                seed: st.seed,
                step: st.step,
            });
        }
        Some(draws)
    }

    fn copy_blocks(&mut self, copies: &[convoy_scheduler::BlockCopy]) {
        if let Err(e) = self.backend.apply_copies(copies) {
            panic!("KV block copies failed: {e}");
        }
    }
}

/// Log-softmax statistics of a logits row: the sampled token's log-probability and the top `n`.
pub fn logprobs_of(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by);
    TokenLogprobs {
        logprob: logits[token as usize] - lse,
        top: idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect(),
    }
}

impl<B: Backend> ModelRunner for Runner<B> {
    fn keep_logits(&mut self, id: RequestId) {
        // Possibly before the step that announces the request: kept apart from its state.
        self.keep.insert(id);
    }

    fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
        self.launch(out);
        self.finish(out)
    }

    fn computes_apart(&self) -> bool {
        self.backend.computes_apart()
    }

    fn launch(&mut self, out: &SchedulerOutput) {
        debug_assert!(
            !self.pending.launched,
            "a step launched before the last one finished"
        );
        track_requests(&mut self.samplers, out, SamplerState::new);
        self.pending.rows.clear();
        self.pending.on_device = false;
        self.pending.launched = true;
        if out.scheduled.is_empty() {
            self.copy_blocks(&out.copies);
            return;
        }
        let bs = self.backend.block_size();
        let mut batch = ForwardBatch::default();
        for s in &out.scheduled {
            if batch.push_seq(
                &s.token_ids,
                s.num_computed_tokens,
                &s.block_table,
                bs,
                s.sample,
            ) {
                self.pending.rows.push(s.id);
            }
        }
        // Where no row asks for its logits (logprobs, kept logits), a backend that samples on
        // its device returns only the token ids; the draw is the same keyed Gumbel-max over the
        // same top-k and top-p candidates as the host's, so the tokens are the same (up to the
        // rounding of a top-p mass that lands on its target, docs/cuda.md). The draws go up
        // before the pass is queued, so nothing after it waits for it.
        if let Some(draws) = self.device_draws() {
            self.pending.on_device = match self.backend.stage_draws(&draws) {
                Ok(on_device) => on_device,
                Err(e) => panic!("sampling failed: {e}"),
            };
        }
        // Every upload of the step (draws, metadata) goes before any of its device work (the
        // block copies, then the pass), so none of them waits for that work on a GPU.
        if let Err(e) = self.backend.begin_step(&batch) {
            panic!("forward pass failed: {e}");
        }
        self.copy_blocks(&out.copies);
        if let Err(e) = run_begun_pass(&mut self.backend, &batch) {
            panic!("forward pass failed: {e}");
        }
        if self.pending.on_device {
            if let Err(e) = self.backend.launch_sample_rows() {
                panic!("sampling failed: {e}");
            }
        }
    }

    fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
        if !self.pending.launched {
            self.launch(out);
        }
        self.pending.launched = false;
        let mut result = StepResult::default();
        if out.scheduled.is_empty() {
            return result;
        }
        let rows = std::mem::take(&mut self.pending.rows);
        if self.pending.on_device {
            let mut ids = Vec::with_capacity(rows.len());
            if let Err(e) = self.backend.sampled_ids(&mut ids) {
                panic!("sampling failed: {e}");
            }
            for (&id, token) in rows.iter().zip(ids) {
                state_of(&mut self.samplers, id).step += 1;
                result.output.sampled.push(SampledToken { id, token });
            }
        } else {
            let mut logits = std::mem::take(&mut self.logits);
            if let Err(e) = self.backend.read_logits(&mut logits) {
                panic!("reading logits failed: {e}");
            }
            let vocab = self.backend.config().vocab_size;
            for (row, &id) in rows.iter().enumerate() {
                let l = &logits[row * vocab..(row + 1) * vocab];
                let st = state_of(&mut self.samplers, id);
                let token = sample(l, &st.spec, st.seed, st.step);
                st.step += 1;
                if let Some(n) = st.spec.logprobs {
                    result.logprobs.insert(id, logprobs_of(l, token, n));
                }
                if self.keep.contains(&id) {
                    result.kept_logits.insert(id, l.to_vec());
                }
                result.output.sampled.push(SampledToken { id, token });
            }
            self.logits = logits;
        }
        // A mark is for the step that follows it only.
        self.keep.clear();
        self.pending.rows = rows;
        result
    }

    fn recompute_logits(
        &mut self,
        tokens: &[u32],
        blocks: &[BlockId],
        copies: &[convoy_scheduler::BlockCopy],
    ) -> Option<Vec<f32>> {
        self.copy_blocks(copies);
        let mut batch = ForwardBatch::default();
        batch.push_seq(tokens, 0, blocks, self.backend.block_size(), true);
        let mut logits = Vec::new();
        self.forward(&batch, &mut logits);
        Some(logits)
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn vocab_size(&self) -> usize {
        self.backend.config().vocab_size
    }

    fn kv_blocks(&self) -> Option<usize> {
        self.backend.kv_blocks()
    }
}

impl<R: ModelRunner + ?Sized> ModelRunner for Box<R> {
    fn keep_logits(&mut self, id: RequestId) {
        (**self).keep_logits(id)
    }
    fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
        (**self).execute(out)
    }
    fn computes_apart(&self) -> bool {
        (**self).computes_apart()
    }
    fn launch(&mut self, out: &SchedulerOutput) {
        (**self).launch(out)
    }
    fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
        (**self).finish(out)
    }
    fn recompute_logits(
        &mut self,
        tokens: &[u32],
        blocks: &[BlockId],
        copies: &[convoy_scheduler::BlockCopy],
    ) -> Option<Vec<f32>> {
        (**self).recompute_logits(tokens, blocks, copies)
    }
    fn now(&self) -> Duration {
        (**self).now()
    }
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn kv_blocks(&self) -> Option<usize> {
        (**self).kv_blocks()
    }
}
