//! Batched generation over the paged, prefix-cached KV cache: the loop behind `convoy
//! generate`, `convoy chat` and the parity tests.
//!
//! Each step packs, for every live sequence, the tokens it has not computed yet (a prompt chunk
//! of at most `max_chunk` tokens, or the one token sampled last step) into one forward pass.
//! Sequences are tracked by `num_computed` token counts, not phases, so prefill chunks, prefix
//! hits and decodes mix freely. A new sequence first takes the longest cached prefix of its
//! prompt from the [`KvCacheManager`] (never the last prompt token, whose logits are needed).
//! A finished sequence stays one more step to compute the K/V of its last sampled token, so the
//! next turn of the conversation finds the whole reply in the cache; then its blocks are
//! released to the cache. Requests may join at a later step (`arrival_step`).
//!
//! With `verify_fraction > 0`, a sampled share of the prefills that hit the cache are computed
//! again without it and their logits compared; a mismatch is logged and counted in
//! `cache_divergence_total`.

use std::time::{Duration, Instant};

use convoy_scheduler::block_hash::identity_key;
use convoy_scheduler::{
    BlockCopy, CacheStats, KeyFn, KvCacheConfig, KvCacheManager, PrefixMatch, SeqId,
};

use crate::detokenizer::IncrementalDecoder;
use crate::forward_batch::ForwardBatch;
use crate::kv_cache::KvCache;
use crate::model::llama::LlamaModel;
use crate::sampler::{sample, FinishReason, Rng, SamplingParams};
use crate::tokenizer::TextCodec;

/// One sequence to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Step at which the request joins the batch (0 = from the start).
    pub arrival_step: usize,
    /// Requests with different salts never share cached K/V.
    pub cache_salt: Option<String>,
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
        reason: String,
    },
    /// The KV cache cannot hold the live sequences.
    #[error("the KV cache is too small: {0} (raise --kv-cache-memory)")]
    OutOfBlocks(convoy_scheduler::OutOfBlocks),
}

/// How the generator's cache is set up.
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
    /// Longest prompt chunk one sequence may put into one step.
    pub max_chunk: usize,
    /// Token-to-key map of the cache; the identity except in tests that break it on purpose.
    pub key_fn: KeyFn,
    /// Model identity, part of every cache key.
    pub model_id: String,
}

impl GeneratorConfig {
    /// Prefix caching on, no host tier, no verification, 512-token chunks.
    pub fn new(num_blocks: usize, block_size: usize) -> GeneratorConfig {
        GeneratorConfig {
            num_blocks,
            num_host_blocks: 0,
            block_size,
            enable_prefix_caching: true,
            verify_fraction: 0.0,
            max_chunk: 512,
            key_fn: identity_key,
            model_id: String::new(),
        }
    }
}

/// Counters since the generator was created.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// The cache manager's counters.
    pub cache: CacheStats,
    /// Prompt tokens of all requests.
    pub prompt_tokens: u64,
    /// Prompt tokens served from either cache tier.
    pub cached_prompt_tokens: u64,
    /// Cache-hit prefills recomputed by `verify_fraction`.
    pub verified_prefills: u64,
    /// Of those, how many gave different logits: the cache served something else than the
    /// prompt. Should stay 0 forever.
    pub cache_divergence_total: u64,
}

struct Seq {
    id: SeqId,
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    hit: PrefixMatch,
    rng: Rng,
    decoder: IncrementalDecoder,
    text: String,
    emitted: usize,
    started: Instant,
    first_token: Option<Duration>,
    finished: bool,
}

/// Owns the model's KV cache and its manager and runs batches of requests through them. The
/// cache persists across [`Generator::run`] calls, so later turns of a chat hit earlier ones.
pub struct Generator<'m> {
    model: &'m LlamaModel,
    codec: TextCodec,
    cache: KvCache,
    manager: KvCacheManager,
    cfg: GeneratorConfig,
    next_id: SeqId,
    stats: EngineStats,
}

impl<'m> Generator<'m> {
    /// A generator with the given cache configuration.
    pub fn new(model: &'m LlamaModel, codec: TextCodec, cfg: GeneratorConfig) -> Generator<'m> {
        let mut kv = KvCacheConfig::new(cfg.block_size, cfg.num_blocks);
        kv.num_host_blocks = cfg.num_host_blocks;
        kv.enable_prefix_caching = cfg.enable_prefix_caching;
        kv.key_fn = cfg.key_fn;
        kv.model_id = cfg.model_id.clone();
        Generator {
            model,
            codec,
            cache: model.new_tiered_kv_cache(cfg.num_blocks, cfg.num_host_blocks, cfg.block_size),
            manager: KvCacheManager::new(kv),
            cfg,
            next_id: 0,
            stats: EngineStats::default(),
        }
    }

    /// Device blocks not held by any sequence (all of them between runs).
    pub fn free_blocks(&self) -> usize {
        self.manager.device().num_free()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            cache: self.manager.stats(),
            ..self.stats
        }
    }

    /// The cache manager (read-only), for inspection.
    pub fn cache_manager(&self) -> &KvCacheManager {
        &self.manager
    }

    /// Set the longest prompt chunk per sequence and step.
    pub fn set_max_chunk(&mut self, max_chunk: usize) {
        self.cfg.max_chunk = max_chunk.max(1);
    }

    fn validate(&self, requests: &[GenerationRequest]) -> Result<(), GenerateError> {
        let max_ctx = self.model.config.max_position_embeddings;
        for (index, r) in requests.iter().enumerate() {
            let bad = |reason: String| GenerateError::BadRequest { index, reason };
            if r.prompt_ids.is_empty() {
                return Err(bad("the prompt is empty".into()));
            }
            if let Some(&id) = r
                .prompt_ids
                .iter()
                .find(|&&id| id as usize >= self.model.config.vocab_size)
            {
                return Err(bad(format!("token id {id} is outside the vocabulary")));
            }
            if r.prompt_ids.len() >= max_ctx {
                return Err(bad(format!(
                    "the prompt has {} tokens; the context holds {max_ctx}",
                    r.prompt_ids.len()
                )));
            }
            r.params.validate().map_err(bad)?;
        }
        Ok(())
    }

    /// Recompute `prompt` without the cache and compare its last logits with `cached`.
    fn verify(&mut self, index: usize, prompt: &[u32], cached: &[f32]) {
        let id = self.next_id;
        self.next_id += 1;
        let mut copies = Vec::new();
        self.manager.begin(id, prompt, None, 0, &mut copies);
        if self
            .manager
            .allocate(id, prompt.len(), &mut copies)
            .is_err()
        {
            tracing::debug!(
                request = index,
                "cache verification skipped: no free blocks"
            );
            self.manager.discard(id);
            self.cache.apply(&copies);
            return;
        }
        self.cache.apply(&copies);
        let mut batch = ForwardBatch::default();
        batch.push_seq(
            prompt,
            0,
            self.manager.block_table(id),
            self.cfg.block_size,
            true,
        );
        let fresh = self.model.forward(&batch, &mut self.cache);
        self.manager.discard(id);
        self.stats.verified_prefills += 1;
        let worst = fresh
            .iter()
            .zip(cached)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        if worst.is_nan() || worst > 1e-4 {
            self.stats.cache_divergence_total += 1;
            tracing::error!(
                request = index,
                worst_relative_error = worst,
                "cached prefill diverges from recomputation"
            );
        }
    }

    fn should_verify(&self, id: SeqId) -> bool {
        if self.cfg.verify_fraction <= 0.0 {
            return false;
        }
        let mut r = Rng::new(id ^ 0x7665_7269_6679);
        r.uniform() < self.cfg.verify_fraction
    }

    /// Run all requests to completion. `on_text(index, delta)` receives text as it is decoded.
    pub fn run(
        &mut self,
        requests: &[GenerationRequest],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerationResult>, GenerateError> {
        self.validate(requests)?;
        let max_ctx = self.model.config.max_position_embeddings;
        let bs = self.cfg.block_size;
        let mut results: Vec<Option<GenerationResult>> = vec![None; requests.len()];
        let mut live: Vec<Seq> = Vec::new();
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| requests[i].arrival_step);
        let mut next = 0;
        let mut step = 0;
        let mut copies: Vec<BlockCopy> = Vec::new();
        let outcome = loop {
            while next < order.len() && requests[order[next]].arrival_step <= step {
                let i = order[next];
                let r = &requests[i];
                let id = self.next_id;
                self.next_id += 1;
                let hit = self.manager.begin(
                    id,
                    &r.prompt_ids,
                    r.cache_salt.as_deref(),
                    r.prompt_ids.len() - 1,
                    &mut copies,
                );
                self.stats.prompt_tokens += r.prompt_ids.len() as u64;
                self.stats.cached_prompt_tokens += hit.total() as u64;
                let seed = r.params.seed.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0)
                });
                live.push(Seq {
                    id,
                    index: i,
                    tokens: r.prompt_ids.clone(),
                    prompt_len: r.prompt_ids.len(),
                    num_computed: hit.total(),
                    hit,
                    rng: Rng::new(seed),
                    decoder: IncrementalDecoder::new(),
                    text: String::new(),
                    emitted: 0,
                    started: Instant::now(),
                    first_token: None,
                    finished: false,
                });
                next += 1;
            }
            if live.is_empty() {
                if next == order.len() {
                    break Ok(());
                }
                step += 1;
                continue;
            }
            let mut batch = ForwardBatch::default();
            let mut sampled = Vec::new();
            let mut failure = None;
            let mut ends = Vec::with_capacity(live.len());
            for (si, s) in live.iter().enumerate() {
                let end = s.tokens.len().min(s.num_computed + self.cfg.max_chunk);
                if let Err(e) = self.manager.allocate(s.id, end, &mut copies) {
                    failure = Some(GenerateError::OutOfBlocks(e));
                    break;
                }
                let want = end == s.tokens.len() && !s.finished;
                batch.push_seq(
                    &s.tokens[s.num_computed..end],
                    s.num_computed,
                    self.manager.block_table(s.id),
                    bs,
                    want,
                );
                if want {
                    sampled.push(si);
                }
                ends.push(end);
            }
            if let Some(f) = failure {
                break Err(f);
            }
            self.cache.apply(&copies);
            copies.clear();
            let logits = self.model.forward(&batch, &mut self.cache);
            for (s, &end) in live.iter_mut().zip(&ends) {
                s.num_computed = end;
                self.manager.commit(s.id, &s.tokens, end);
            }
            // Sequences that finished last step have now computed their last token: release.
            let mut k = 0;
            while k < live.len() {
                if live[k].finished {
                    let s = live.remove(k);
                    self.manager.free(s.id, &s.tokens, s.num_computed);
                    sampled.iter_mut().for_each(|si| {
                        if *si > k {
                            *si -= 1;
                        }
                    });
                } else {
                    k += 1;
                }
            }
            let vocab = self.model.config.vocab_size;
            for (row, &si) in sampled.iter().enumerate() {
                let row_logits = &logits[row * vocab..(row + 1) * vocab];
                let first = live[si].first_token.is_none();
                if first && live[si].hit.total() > 0 && self.should_verify(live[si].id) {
                    let prompt = live[si].tokens[..live[si].prompt_len].to_vec();
                    let index = live[si].index;
                    self.verify(index, &prompt, row_logits);
                }
                let s = &mut live[si];
                let params = &requests[s.index].params;
                let tok = sample(row_logits, params, &mut s.rng);
                s.tokens.push(tok);
                s.first_token.get_or_insert_with(|| s.started.elapsed());
                if let Some(t) = self.codec.tokenizer() {
                    let delta = s.decoder.push(t, tok);
                    s.text.push_str(&delta);
                }
                let n_out = s.tokens.len() - s.prompt_len;
                let mut finish = None;
                if (!params.ignore_eos && self.codec.eos_token_ids.contains(&tok))
                    || params.stop_token_ids.contains(&tok)
                {
                    finish = Some(FinishReason::Stop);
                }
                if finish.is_none() {
                    if let Some(pos) = params
                        .stop
                        .iter()
                        .filter_map(|st| s.text.find(st.as_str()))
                        .min()
                    {
                        s.text.truncate(pos);
                        finish = Some(FinishReason::Stop);
                    }
                }
                if finish.is_none() && (n_out >= params.max_tokens || s.tokens.len() >= max_ctx) {
                    finish = Some(FinishReason::Length);
                }
                // Hold back text that could still become a stop string.
                let hold = if finish.is_some() {
                    0
                } else {
                    params
                        .stop
                        .iter()
                        .map(|st| st.len().saturating_sub(1))
                        .max()
                        .unwrap_or(0)
                };
                let mut upto = s.text.len().saturating_sub(hold).max(s.emitted);
                while !s.text.is_char_boundary(upto) {
                    upto -= 1;
                }
                if upto > s.emitted {
                    on_text(s.index, &s.text[s.emitted..upto]);
                    s.emitted = upto;
                }
                if let Some(reason) = finish {
                    s.finished = true;
                    results[s.index] = Some(GenerationResult {
                        output_ids: s.tokens[s.prompt_len..].to_vec(),
                        text: s.text.clone(),
                        finish_reason: reason,
                        cached_tokens: s.hit.device_tokens,
                        host_cached_tokens: s.hit.host_tokens,
                        time_to_first_token: s.first_token.unwrap_or_default(),
                        total_time: s.started.elapsed(),
                    });
                }
            }
            step += 1;
        };
        for s in live.drain(..) {
            if s.finished {
                self.manager.free(s.id, &s.tokens, s.num_computed);
            } else {
                self.manager.discard(s.id);
            }
        }
        outcome?;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request finishes before the loop ends"))
            .collect())
    }
}
