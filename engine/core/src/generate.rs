//! Synchronous batched generation: the engine core with a model runner, driven to completion
//! for a list of requests. Behind `convoy generate`, `convoy chat`, the benchmarks and the
//! parity tests. The cache persists across [`Generator::run`] calls, so later turns of a chat
//! hit earlier ones.

use std::collections::HashMap;
use std::time::Duration;

use convoy_scheduler::block_hash::identity_key;
use convoy_scheduler::{
    FinishReason, KeyFn, KvCacheConfig, KvCacheManager, RequestId, SchedulerConfig,
};

use crate::backend::BackendError;
use crate::core::{EngineCore, EngineRequest, EngineStats, EventKind, SubmitError};
use crate::device::Device;
use crate::model::llama::LlamaModel;
use crate::model_weights::ModelWeights;
use crate::runner::{CpuRunner, ModelRunner};
use crate::sampler::SamplingParams;
use crate::tokenizer::TextCodec;

/// One sequence to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Step at which the request joins (0 = from the start), as in a live server.
    pub arrival_step: usize,
    /// Requests with different salts never share cached K/V.
    pub cache_salt: Option<String>,
    /// Larger is served first.
    pub priority: i32,
}

/// What one sequence produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationResult {
    /// Generated token ids (a stop token is included; text after a stop string is not).
    pub output_ids: Vec<u32>,
    /// Generated text, without the stop string that ended it.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens whose K/V were found in the device tier.
    pub cached_tokens: usize,
    /// Prompt tokens whose K/V were brought back from the host tier.
    pub host_cached_tokens: usize,
    /// From joining to the first sampled token.
    pub time_to_first_token: Duration,
    /// From joining to the end.
    pub total_time: Duration,
}

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A request is unusable.
    #[error("request {index}: {reason}")]
    BadRequest {
        /// Index of the request.
        index: usize,
        /// What is wrong.
        reason: SubmitError,
    },
}

/// How the generator's engine is set up.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// Device KV blocks.
    pub num_blocks: usize,
    /// Host-tier KV blocks (0: no host tier).
    pub num_host_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Share prompt prefixes through the cache.
    pub enable_prefix_caching: bool,
    /// Share of cache-hit prefills recomputed without the cache to check it (0..=1).
    pub verify_fraction: f64,
    /// Most tokens in one forward pass (prompts longer than this are chunked).
    pub max_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Size the device KV cache as this share of a GPU's memory once the weights are in
    /// (`--gpu-memory-utilization`); `num_blocks` is then the runner's count.
    pub gpu_memory_utilization: Option<f64>,
    /// Run every pass of a CUDA backend eagerly, with no decode graphs (`--enforce-eager`).
    pub enforce_eager: bool,
    /// Token-to-key map of the cache; the identity except in tests that break it on purpose.
    pub key_fn: KeyFn,
    /// Model identity, part of every cache key.
    pub model_id: String,
}

impl GeneratorConfig {
    /// Prefix caching on, no host tier, no verification, 2048 tokens per step.
    pub fn new(num_blocks: usize, block_size: usize) -> GeneratorConfig {
        GeneratorConfig {
            num_blocks,
            num_host_blocks: 0,
            block_size,
            enable_prefix_caching: true,
            verify_fraction: 0.0,
            max_batched_tokens: 2048,
            max_running: 256,
            gpu_memory_utilization: None,
            enforce_eager: false,
            key_fn: identity_key,
            model_id: String::new(),
        }
    }

    /// The scheduler configuration for a model whose context holds `max_model_len` tokens.
    pub fn scheduler_config(&self, max_model_len: usize) -> SchedulerConfig {
        let mut kv = KvCacheConfig::new(self.block_size, self.num_blocks);
        kv.num_host_blocks = self.num_host_blocks;
        kv.enable_prefix_caching = self.enable_prefix_caching;
        kv.key_fn = self.key_fn;
        kv.model_id = self.model_id.clone();
        let mut cfg = SchedulerConfig::new(kv);
        cfg.max_batched_tokens = self.max_batched_tokens;
        cfg.max_running = self.max_running;
        cfg.max_model_len = max_model_len;
        cfg.max_queued = usize::MAX;
        cfg.max_queued_per_owner = usize::MAX;
        cfg
    }
}

/// The engine core with a model runner, driven synchronously.
pub struct Generator<'m> {
    core: EngineCore<Box<dyn ModelRunner + 'm>>,
    next_id: RequestId,
}

impl<'m> Generator<'m> {
    /// A generator on the CPU backend with the given configuration.
    pub fn new(model: &'m LlamaModel, codec: TextCodec, cfg: GeneratorConfig) -> Generator<'m> {
        let runner = CpuRunner::new(model, cfg.num_blocks, cfg.num_host_blocks, cfg.block_size);
        Generator::with_runner(
            Box::new(runner),
            model.config.max_position_embeddings,
            codec,
            &cfg,
        )
    }

    /// A generator on `device`; an error when the device cannot run the model.
    pub fn on_device(
        device: Device,
        model: &'m LlamaModel,
        codec: TextCodec,
        cfg: GeneratorConfig,
    ) -> Result<Generator<'m>, BackendError> {
        let runner = device.runner(model, &cfg)?;
        Ok(Generator::with_runner(
            runner,
            model.config.max_position_embeddings,
            codec,
            &cfg,
        ))
    }

    /// A generator on `device` over loaded weights (tensors are uploaded, and consumed, here);
    /// an error when the device cannot run the model.
    pub fn on_weights(
        device: Device,
        weights: &'m mut ModelWeights,
        codec: TextCodec,
        cfg: GeneratorConfig,
    ) -> Result<Generator<'m>, BackendError> {
        let max_model_len = weights.config().max_position_embeddings;
        let runner = weights.runner(device, &cfg)?;
        Ok(Generator::with_runner(runner, max_model_len, codec, &cfg))
    }

    /// A generator over `runner`, for a model whose context holds `max_model_len` tokens.
    pub fn with_runner(
        runner: Box<dyn ModelRunner + 'm>,
        max_model_len: usize,
        codec: TextCodec,
        cfg: &GeneratorConfig,
    ) -> Generator<'m> {
        let mut cfg = cfg.clone();
        if let Some(n) = runner.kv_blocks() {
            cfg.num_blocks = n;
        }
        let sched = cfg.scheduler_config(max_model_len);
        Generator {
            core: EngineCore::new(sched, runner, codec, cfg.verify_fraction),
            next_id: 0,
        }
    }

    /// Device blocks not held by any sequence (all of them between runs).
    pub fn free_blocks(&self) -> usize {
        self.core.scheduler().kv().device().num_free()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.core.stats()
    }

    /// The cache manager (read-only), for inspection.
    pub fn cache_manager(&self) -> &KvCacheManager {
        self.core.scheduler().kv()
    }

    /// Run all requests to completion. `on_text(index, delta)` receives text as it is decoded.
    pub fn run(
        &mut self,
        requests: &[GenerationRequest],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerationResult>, GenerateError> {
        let base = self.next_id;
        self.next_id += requests.len() as RequestId;
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| requests[i].arrival_step);
        let mut results: HashMap<usize, GenerationResult> = HashMap::new();
        let mut next = 0;
        let mut step = 0;
        while results.len() < requests.len() {
            while next < order.len() && requests[order[next]].arrival_step <= step {
                let i = order[next];
                let r = &requests[i];
                let req = EngineRequest {
                    prompt_ids: r.prompt_ids.clone(),
                    params: r.params.clone(),
                    priority: r.priority,
                    cache_salt: r.cache_salt.clone(),
                    ..Default::default()
                };
                if let Err(e) = self.core.add(base + i as RequestId, req) {
                    // Leave the engine clean: drop what this call admitted.
                    for j in order[..next].iter() {
                        self.core
                            .abort(base + *j as RequestId, FinishReason::Cancelled);
                    }
                    return Err(GenerateError::BadRequest {
                        index: i,
                        reason: e,
                    });
                }
                next += 1;
            }
            for ev in self.core.step() {
                let i = (ev.id - base) as usize;
                match ev.kind {
                    EventKind::Token { text, .. } => {
                        if !text.is_empty() {
                            on_text(i, &text);
                        }
                    }
                    EventKind::Done(d) => {
                        results.insert(
                            i,
                            GenerationResult {
                                output_ids: d.output_ids,
                                text: d.text,
                                finish_reason: d.finish_reason,
                                cached_tokens: d.usage.cached_tokens,
                                host_cached_tokens: d.usage.host_cached_tokens,
                                time_to_first_token: d.timing.ttft,
                                total_time: d.timing.total,
                            },
                        );
                    }
                }
            }
            step += 1;
        }
        // Let finishing requests cache their last token's K/V.
        while self.core.has_work() {
            self.core.step();
        }
        Ok((0..requests.len())
            .map(|i| results.remove(&i).expect("every request finished"))
            .collect())
    }
}
