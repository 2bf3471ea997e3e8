//! Batched generation over the paged KV cache: the loop behind `convoy generate`, `convoy chat`
//! and the parity tests.
//!
//! Each step packs, for every live sequence, the tokens it has not computed yet (a prompt chunk
//! of at most `max_chunk` tokens, or the one token sampled last step) into one forward pass.
//! Sequences are tracked by `num_computed` token counts, not phases, so prefill chunks and
//! decodes mix freely. KV blocks come from a [`BlockPool`] as a sequence grows and go back when
//! it ends. Requests may join at a later step (`arrival_step`), as in a live server.

use std::time::{Duration, Instant};

use convoy_scheduler::{BlockId, BlockPool};

use crate::detokenizer::IncrementalDecoder;
use crate::forward_batch::ForwardBatch;
use crate::kv_cache::KvCache;
use crate::model::llama::LlamaModel;
use crate::sampler::{sample, FinishReason, Rng, SamplingParams};
use crate::tokenizer::TextCodec;

/// One sequence to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Step at which the request joins the batch (0 = from the start).
    pub arrival_step: usize,
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
    #[error("the KV cache is too small: {needed} more blocks needed, {free} free (raise --kv-cache-memory)")]
    OutOfBlocks {
        /// Blocks still needed.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
}

struct Seq {
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    blocks: Vec<BlockId>,
    rng: Rng,
    decoder: IncrementalDecoder,
    text: String,
    emitted: usize,
    started: Instant,
    first_token: Option<Duration>,
}

/// Owns the model's KV cache and block pool and runs batches of requests through them.
pub struct Generator<'m> {
    model: &'m LlamaModel,
    codec: TextCodec,
    cache: KvCache,
    pool: BlockPool,
    /// Longest prompt chunk one sequence may put into one step.
    pub max_chunk: usize,
}

impl<'m> Generator<'m> {
    /// A generator with `num_blocks` KV blocks of `block_size` tokens.
    pub fn new(
        model: &'m LlamaModel,
        codec: TextCodec,
        num_blocks: usize,
        block_size: usize,
    ) -> Generator<'m> {
        Generator {
            model,
            codec,
            cache: model.new_kv_cache(num_blocks, block_size),
            pool: BlockPool::new(num_blocks),
            max_chunk: 512,
        }
    }

    /// Free KV blocks (all of them once a run has ended).
    pub fn free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Run all requests to completion. `on_text(index, delta)` receives text as it is decoded.
    pub fn run(
        &mut self,
        requests: &[GenerationRequest],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerationResult>, GenerateError> {
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
        let bs = self.cache.block_size;
        let mut results: Vec<Option<GenerationResult>> = vec![None; requests.len()];
        let mut live: Vec<Seq> = Vec::new();
        let mut next = 0;
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| requests[i].arrival_step);
        let mut step = 0;
        let outcome = loop {
            while next < order.len() && requests[order[next]].arrival_step <= step {
                let i = order[next];
                let r = &requests[i];
                let seed = r.params.seed.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0)
                });
                live.push(Seq {
                    index: i,
                    tokens: r.prompt_ids.clone(),
                    prompt_len: r.prompt_ids.len(),
                    num_computed: 0,
                    blocks: Vec::new(),
                    rng: Rng::new(seed),
                    decoder: IncrementalDecoder::new(),
                    text: String::new(),
                    emitted: 0,
                    started: Instant::now(),
                    first_token: None,
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
            let mut sampled_seqs = Vec::new();
            let mut failure = None;
            for (si, s) in live.iter_mut().enumerate() {
                let end = s.tokens.len().min(s.num_computed + self.max_chunk);
                let need = end.div_ceil(bs).saturating_sub(s.blocks.len());
                if need > 0 {
                    match self.pool.allocate(need) {
                        Some(b) => s.blocks.extend(b),
                        None => {
                            failure = Some(GenerateError::OutOfBlocks {
                                needed: need,
                                free: self.pool.num_free(),
                            });
                            break;
                        }
                    }
                }
                let want = end == s.tokens.len();
                batch.push_seq(
                    &s.tokens[s.num_computed..end],
                    s.num_computed,
                    &s.blocks,
                    bs,
                    want,
                );
                if want {
                    sampled_seqs.push(si);
                }
            }
            if let Some(f) = failure {
                break Err(f);
            }
            let logits = self.model.forward(&batch, &mut self.cache);
            for s in live.iter_mut() {
                s.num_computed = s.tokens.len().min(s.num_computed + self.max_chunk);
            }
            let vocab = self.model.config.vocab_size;
            let mut done = Vec::new();
            for (row, &si) in sampled_seqs.iter().enumerate() {
                let s = &mut live[si];
                let params = &requests[s.index].params;
                let tok = sample(&logits[row * vocab..(row + 1) * vocab], params, &mut s.rng);
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
                    done.push((si, reason));
                }
            }
            for &(si, reason) in done.iter().rev() {
                let s = live.swap_remove(si);
                self.pool.free(s.blocks.iter().copied());
                results[s.index] = Some(GenerationResult {
                    output_ids: s.tokens[s.prompt_len..].to_vec(),
                    text: s.text,
                    finish_reason: reason,
                    time_to_first_token: s.first_token.unwrap_or_default(),
                    total_time: s.started.elapsed(),
                });
            }
            step += 1;
        };
        for s in live.drain(..) {
            self.pool.free(s.blocks.iter().copied());
        }
        outcome?;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request finishes before the loop ends"))
            .collect())
    }
}
