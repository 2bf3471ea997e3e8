//! Checks of convoy's two guarantees and of agreement with the float32 reference, for any
//! model settings (precision, KV cache element type): the test files for each setting call
//! these and bound the figures.

use convoy_engine::{
    Device, GenerationRequest, Generator, GeneratorConfig, LlamaModel, SamplingParams, TextCodec,
};
use convoy_weights::ChatMessage;

use crate::{first_steps_logits, ids, reference_cases, smollm2_reference};

/// A greedy request for `max_tokens` tokens arriving at `arrival_step`.
pub fn greedy(prompt: Vec<u32>, max_tokens: usize, arrival_step: usize) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: prompt,
        params: SamplingParams {
            max_tokens,
            ..Default::default()
        },
        arrival_step,
        ..Default::default()
    }
}

/// How much work a guarantee check does: the CPU backend runs the full checks; the emulated
/// CUDA backend (its kernels run on CPU fibers, far slower) a smaller share of the same ones.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Requests of the batch-invariance check (at least 2, even below 12).
    pub requests: usize,
    /// Tokens each of them generates.
    pub tokens: usize,
    /// Turns of the reference conversation replayed by the cache check.
    pub turns: usize,
    /// Tokens of each reply in the cache check.
    pub reply_tokens: usize,
    /// Least prompt tokens the later turns of the cache check must be served from cache.
    pub min_cached_tokens: usize,
}

impl Scale {
    /// The full checks.
    pub const FULL: Scale = Scale {
        requests: 12,
        tokens: 20,
        turns: usize::MAX,
        reply_tokens: 24,
        min_cached_tokens: 301,
    };
    /// A share that keeps every property checked (chunked prefills next to decodes, shared
    /// prefixes, later turns served from cache and verified) at a sixth of the work.
    pub const EMULATED: Scale = Scale {
        requests: 4,
        tokens: 10,
        turns: 3,
        reply_tokens: 12,
        min_cached_tokens: 101,
    };
}

/// Batch invariance: twelve requests (the reference prompts, then halves of them: lengths
/// differ and prefixes are shared) run together, chunked next to each other's decodes, give
/// exactly what each gives alone. At a smaller [`Scale`], the first prompts and their halves.
pub fn assert_together_equals_alone(
    device: Device,
    model: &LlamaModel,
    codec: &TextCodec,
    scale: Scale,
) {
    let reference = smollm2_reference();
    let mut prompts: Vec<Vec<u32>> = reference_cases(codec, &reference)
        .into_iter()
        .map(|c| c.prompt_ids)
        .collect();
    let halves: Vec<Vec<u32>> = prompts.iter().map(|p| p[..p.len() / 2].to_vec()).collect();
    if scale.requests >= 12 {
        prompts.extend(halves);
        prompts.truncate(12);
        assert_eq!(prompts.len(), 12);
    } else {
        let k = scale.requests / 2;
        prompts.truncate(k);
        prompts.extend(halves.into_iter().take(k));
    }
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| greedy(p.clone(), scale.tokens, i * 2))
        .collect();
    // No prefix caching: each run alone recomputes everything. Together: at most 24 tokens a
    // step, so prompts are chunked next to other requests' decodes.
    let mut cfg = GeneratorConfig::new(1024, 16);
    cfg.enable_prefix_caching = false;
    cfg.max_batched_tokens = 24;
    let together = Generator::on_device(device, model, codec.clone(), cfg.clone())
        .expect("the device runs the model")
        .run(&requests, |_, _| {})
        .unwrap();
    cfg.max_batched_tokens = 2048;
    let mut alone =
        Generator::on_device(device, model, codec.clone(), cfg).expect("the device runs the model");
    for (i, r) in requests.iter().enumerate() {
        let one = alone
            .run(&[greedy(r.prompt_ids.clone(), scale.tokens, 0)], |_, _| {})
            .unwrap();
        assert_eq!(together[i].output_ids, one[0].output_ids, "request {i}");
    }
}

/// Cached equals recomputed: the reference's multi-turn conversations, each turn continued
/// with convoy's own reply, served with prefix caching (and the run-time oracle recomputing
/// every cache-hit prefill) and without it, with blocks of each of `block_sizes` tokens.
pub fn assert_cached_equals_recomputed(
    device: Device,
    model: &LlamaModel,
    codec: &TextCodec,
    block_sizes: &[usize],
    scale: Scale,
) {
    let reference = smollm2_reference();
    for &bs in block_sizes {
        let mut on = GeneratorConfig::new(4096 / bs + 8, bs);
        on.verify_fraction = 1.0;
        let mut off = on.clone();
        off.enable_prefix_caching = false;
        off.verify_fraction = 0.0;
        let mut cached = Generator::on_device(device, model, codec.clone(), on)
            .expect("the device runs the model");
        let mut fresh = Generator::on_device(device, model, codec.clone(), off)
            .expect("the device runs the model");
        let mut served = 0;
        let mut later_turns = 0;
        for conv in reference["multi_turn"].as_array().unwrap() {
            let mut msgs = vec![ChatMessage::new("system", conv["system"].as_str().unwrap())];
            let turns = conv["turns"].as_array().unwrap().iter().take(scale.turns);
            for (t, turn) in turns.enumerate() {
                msgs.push(ChatMessage::new("user", turn["user"].as_str().unwrap()));
                let prompt = codec.encode_chat(&msgs).unwrap();
                let a = cached
                    .run(&[greedy(prompt.clone(), scale.reply_tokens, 0)], |_, _| {})
                    .unwrap()
                    .remove(0);
                let b = fresh
                    .run(&[greedy(prompt, scale.reply_tokens, 0)], |_, _| {})
                    .unwrap()
                    .remove(0);
                assert_eq!(a.output_ids, b.output_ids, "block size {bs}");
                assert_eq!(b.cached_tokens, 0);
                if t > 0 {
                    // The system prompt and the earlier turns at least.
                    assert!(a.cached_tokens > 30, "block size {bs}, turn {t}: {a:?}");
                    later_turns += 1;
                }
                served += a.cached_tokens;
                // The conversation goes on with convoy's own reply, as a chat product would.
                msgs.push(ChatMessage::new("assistant", &a.text));
            }
        }
        let stats = cached.stats();
        assert!(
            later_turns >= 2,
            "block size {bs}: {later_turns} later turns"
        );
        assert!(
            served >= scale.min_cached_tokens,
            "block size {bs}: only {served} tokens cached over {later_turns} later turns"
        );
        assert!(
            stats.verified_prefills >= later_turns as u64,
            "block size {bs}: {stats:?}"
        );
        assert_eq!(stats.cache_divergence_total, 0, "block size {bs}");
    }
}

/// How close a model setting stays to the transformers float32 reference.
#[derive(Clone, Debug, Default)]
pub struct Agreement {
    /// Cases whose greedy output is the reference's token for token.
    pub identical: usize,
    /// Cases compared.
    pub cases: usize,
    /// Greedy steps before each case's first differing token, summed.
    pub same_steps: usize,
    /// Greedy steps of the reference, summed.
    pub total_steps: usize,
    /// The reference's top-1/top-2 margin where a case first differs.
    pub margins_at_divergence: Vec<f64>,
    /// Top-5 logits of the first steps compared.
    pub count: usize,
    /// Their largest absolute error.
    pub worst: f32,
    /// Their mean absolute error.
    pub mean: f64,
    /// First steps whose top-1 token is the reference's.
    pub top1_same: usize,
    /// First steps compared for the top-1 token.
    pub top1_total: usize,
}

/// Bounds an [`Agreement`] must stay within: the limits a test sets, with room over the figures
/// it measured.
#[derive(Clone, Copy, Debug)]
pub struct AgreementBounds {
    /// Largest top-5 logit error allowed (exclusive).
    pub worst: f32,
    /// Mean top-5 logit error allowed (exclusive).
    pub mean: f64,
    /// Least share of first steps whose top-1 token is the reference's.
    pub top1_share: f64,
    /// Least share of the reference's greedy steps before each case's first difference.
    pub steps_share: f64,
    /// Largest reference top-1/top-2 margin allowed where greedy output first differs
    /// (exclusive): the output may move only where the reference was close to a tie.
    pub margin: f64,
}

impl Agreement {
    /// Assert that these figures stay within `bounds` (and that enough logits were compared:
    /// 5 for each of 8 steps of 7 cases at least).
    pub fn assert_within(&self, bounds: &AgreementBounds) {
        assert!(
            self.count >= 5 * 8 * 7,
            "compared only {} logits",
            self.count
        );
        assert!(
            self.worst < bounds.worst,
            "largest top-5 logit error {}",
            self.worst
        );
        assert!(
            self.mean < bounds.mean,
            "mean top-5 logit error {}",
            self.mean
        );
        assert!(
            self.top1_same as f64 >= bounds.top1_share * self.top1_total as f64,
            "top-1 the same at only {} of {} steps",
            self.top1_same,
            self.top1_total
        );
        assert!(
            self.same_steps as f64 >= bounds.steps_share * self.total_steps as f64,
            "only {} of {} greedy steps before the first difference",
            self.same_steps,
            self.total_steps
        );
        for m in &self.margins_at_divergence {
            assert!(
                *m < bounds.margin,
                "greedy output differs where the margin was {m}"
            );
        }
    }
}

/// Measure [`Agreement`] against the reference (greedy tokens of every case, and the top-5
/// logits of the first steps of the cases that have them), printing the figures under `label`
/// (docs/benchmarks.md quotes them).
pub fn measure_agreement(
    device: Device,
    model: &LlamaModel,
    codec: &TextCodec,
    label: &str,
) -> Agreement {
    let reference = smollm2_reference();
    let cases = reference_cases(codec, &reference);
    let max_new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let requests: Vec<GenerationRequest> = cases
        .iter()
        .map(|c| greedy(c.prompt_ids.clone(), max_new, 0))
        .collect();
    let mut g = Generator::on_device(device, model, codec.clone(), GeneratorConfig::new(2048, 16))
        .expect("the device runs the model");
    let results = g.run(&requests, |_, _| {}).unwrap();
    let mut a = Agreement {
        cases: cases.len(),
        ..Agreement::default()
    };
    for (case, r) in cases.iter().zip(&results) {
        let n = case.output_ids.len().min(r.output_ids.len());
        let first_diff = (0..n)
            .find(|&i| case.output_ids[i] != r.output_ids[i])
            .unwrap_or(n);
        a.same_steps += first_diff;
        a.total_steps += case.output_ids.len();
        if first_diff == case.output_ids.len() {
            a.identical += 1;
        } else if let Some(m) = case.margins.as_ref().and_then(|m| m.get(first_diff)) {
            a.margins_at_divergence.push(m.as_f64().unwrap());
        }
    }
    eprintln!(
        "{label}, greedy: {} of {} cases token for token; {} of {} steps before the first \
         difference; reference top-1/top-2 margins where they first differ: {:?}",
        a.identical, a.cases, a.same_steps, a.total_steps, a.margins_at_divergence
    );
    let mut sum = 0f64;
    for case in cases.iter().filter(|c| c.top5.is_some()) {
        let steps = case.top5.as_ref().unwrap().as_array().unwrap();
        for (step, logits) in steps.iter().zip(first_steps_logits(device, model, case)) {
            let top_ids = ids(&step["ids"]);
            for (id, want) in top_ids.iter().zip(step["logits"].as_array().unwrap()) {
                let err = (logits[*id as usize] - want.as_f64().unwrap() as f32).abs();
                a.worst = a.worst.max(err);
                sum += err as f64;
                a.count += 1;
            }
            let argmax = (0..logits.len())
                .max_by(|&x, &y| logits[x].total_cmp(&logits[y]))
                .unwrap() as u32;
            a.top1_same += usize::from(argmax == top_ids[0]);
            a.top1_total += 1;
        }
    }
    a.mean = sum / a.count.max(1) as f64;
    eprintln!(
        "{label}, top-5 logits of the first steps: {} compared, largest absolute error {:.4}, \
         mean {:.4}; top-1 the same at {} of {} steps",
        a.count, a.worst, a.mean, a.top1_same, a.top1_total
    );
    a
}
