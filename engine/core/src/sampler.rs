//! Sampling: greedy, temperature, top-k, top-p, seeded. (Stop ids and `max_tokens` are the
//! scheduler's rules, stop strings the engine core's.)
//!
//! A draw is the Gumbel-max trick keyed by (seed, step, token): token = argmax over the kept
//! tokens of `logit / T + G(seed, step, token)`, with `G = -ln(-ln(u))` and `u` from 53 bits of
//! a fixed hash, never the operating system's randomness. It is the same arithmetic as the CUDA
//! kernel `gumbel_sample_rows` (sampling.cu), so the same seed and the same logits give the same
//! token on every run, machine and backend (up to the last bit of the device's double `log`,
//! which can move a draw only where two perturbed logits tie at f32 precision): an answer
//! sampled on a GPU can be reproduced on a laptop. Top-k and top-p restrict the argmax to their tokens, which samples exactly from the
//! renormalised distribution.

use convoy_scheduler::SamplingSpec;
use rand_core::{RngCore, SeedableRng};

/// `max_tokens` when a request does not say (the socket protocol, HTTP and the CLI agree).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// A sampling parameter out of range; the message names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParameter(pub String);

/// Per-request sampling and stopping parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the random stream; `None` picks one from the clock.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Extra token ids that end generation (the model's EOS ids always do, unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the stop string itself is not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
}

/// Most `stop_token_ids` one request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Check ranges; the message says which parameter is wrong.
    pub fn validate(&self) -> Result<(), InvalidParameter> {
        let bad = |m: String| Err(InvalidParameter(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return bad(format!(
                "stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {}",
                self.stop_token_ids.len()
            ));
        }
        Ok(())
    }

    /// What the runner needs to draw tokens, with `logprobs` alternatives when asked for.
    pub fn spec(&self, logprobs: Option<usize>) -> SamplingSpec {
        SamplingSpec {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            logprobs,
        }
    }
}

/// A seeded random stream (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(rand_xoshiro::SplitMix64);

impl Rng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(rand_xoshiro::SplitMix64::seed_from_u64(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value, the first one on ties (`-0.0` and `0.0` tie), NaN counting as
/// negative infinity: a NaN never wins, and a row with nothing else gives index 0. The CUDA
/// kernels `argmax_rows` and `gumbel_sample_rows` decide the same way. An empty slice gives 0.
///
/// Two passes the compiler vectorises, over a row that stays in cache between them: the
/// largest non-NaN value, then the first index holding it (or, when that is negative infinity,
/// holding it or a NaN). That is the index the one-pass scan "keep the first strictly larger,
/// NaN as negative infinity" finds (tested against it), at a fraction of its time on a
/// 49,152-entry vocabulary.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    if logits.is_empty() {
        return 0;
    }
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // `f32::max` skips a NaN operand.
            *m = m.max(v);
        }
    }
    let largest = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let wins = |v: f32| v == largest || (largest == f32::NEG_INFINITY && v.is_nan());
    logits
        .chunks(LANES)
        .enumerate()
        .find_map(|(c, chunk)| chunk.iter().position(|&v| wins(v)).map(|i| c * LANES + i))
        .unwrap_or(0) as u32
}

/// The key of a request's draw at `step` (its tokens sampled so far), as the CUDA kernel
/// forms it.
pub fn gumbel_key(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(step)
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Gumbel noise of vocabulary entry `token` under `key`: `u` uniform in (0, 1) from 53 bits
/// (never 0 or 1, so the noise is finite), `-ln(-ln(u))` in double, rounded to f32.
pub fn gumbel_noise(key: u64, token: u32) -> f32 {
    let u = ((mix64(key ^ ((token as u64) << 20)) >> 11) as f64 + 0.5)
        * (1.0 / 9_007_199_254_740_992.0);
    (-(-u.ln()).ln()) as f32
}

/// The key of `v` in the candidate order of top-k and top-p (the kernel's `order_key`): monotone
/// in the logit, NaN as -inf, -0 as +0.
pub fn order_key(v: f32) -> u32 {
    let v = if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == 0.0 {
        0.0
    } else {
        v
    };
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Draw one token from `logits` under `params` for a request seeded with `seed`, at its
/// `step`-th sampled token.
pub fn sample(logits: &[f32], params: &SamplingSpec, seed: u64, step: u64) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let t = params.temperature;
    let key = gumbel_key(seed, step);
    // The perturbed logit, as the kernel computes it (f32 division and addition; NaN never wins).
    let perturbed = |i: u32| {
        let v = logits[i as usize];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v / t + gumbel_noise(key, i)
        }
    };
    let best_of = |candidates: &mut dyn Iterator<Item = u32>| {
        let mut best = (0u32, f32::NEG_INFINITY);
        let mut first = true;
        for i in candidates {
            let v = perturbed(i);
            if first || v > best.1 || (v == best.1 && i < best.0) {
                best = (i, v);
                first = false;
            }
        }
        best.0
    };
    if params.top_k == 0 && params.top_p >= 1.0 {
        return best_of(&mut (0..logits.len() as u32));
    }
    // Candidates in the device's order: larger logit first (NaN as -inf, -0 as +0), then lower
    // index.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        order_key(logits[*b as usize])
            .cmp(&order_key(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let k = if params.top_k == 0 {
        idx.len()
    } else {
        params.top_k.min(idx.len())
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0] as usize];
    if params.top_p < 1.0 && max > f32::NEG_INFINITY {
        // The shortest prefix holding top_p of the candidates' probability (exp((logit - max)
        // / T) in double, NaN as 0), at least one candidate.
        let inv_t = 1.0 / t as f64;
        let prob = |i: u32| {
            let v = logits[i as usize];
            if v.is_nan() {
                0.0
            } else {
                ((v as f64 - max as f64) * inv_t).exp()
            }
        };
        let target = params.top_p as f64 * idx.iter().map(|&i| prob(i)).sum::<f64>();
        let mut cum = 0.0;
        let mut keep = idx.len();
        for (n, &i) in idx.iter().enumerate() {
            cum += prob(i);
            if cum >= target {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    best_of(&mut idx.into_iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        // Against the one-pass scan: ties, signed zeros, NaNs first, inside and last, all
        // negative rows, and lengths around the lane count.
        let scan = |l: &[f32]| {
            let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if key(v) > key(l[best]) {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = Rng::new(3);
        for len in [0usize, 1, 2, 15, 16, 17, 33, 100, 49152] {
            for case in 0..8 {
                let mut l: Vec<f32> = (0..len)
                    .map(|_| match case {
                        0 => (rng.uniform() * 8.0 - 4.0) as f32,
                        1 => ((rng.uniform() * 4.0) as i32) as f32,
                        2 => -(rng.uniform() as f32) - 1.0,
                        _ => [0.0, -0.0, 1.0, -1.0][(rng.uniform() * 4.0) as usize],
                    })
                    .collect();
                if len > 0 && case >= 4 {
                    let at = [0, len / 2, len - 1, (len * 3) / 4][case - 4];
                    l[at] = f32::NAN;
                }
                assert_eq!(argmax(&l), scan(&l), "len {len} case {case}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingSpec {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &p, 1, 0), argmax(&logits));
        let p = SamplingSpec {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            ..Default::default()
        };
        let a: Vec<u32> = (0..50).map(|s| sample(&logits, &p, 42, s)).collect();
        let b: Vec<u32> = (0..50).map(|s| sample(&logits, &p, 42, s)).collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "sampling at temperature 0.8 should vary"
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token has almost all the mass: top_p = 0.5 must always return it.
        let mut logits = vec![0f32; 10];
        logits[7] = 10.0;
        let p = SamplingSpec {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        assert!((0..100).all(|s| sample(&logits, &p, 3, s) == 7));
    }

    #[test]
    fn draws_follow_the_distribution_and_never_take_a_far_token() {
        // p(i) proportional to i + 1 over 8 tokens: 40,000 draws, chi-square with 7 degrees
        // of freedom below its 0.001 quantile (24.3).
        let logits: Vec<f32> = (1..=8).map(|i| (i as f32).ln()).collect();
        let p = SamplingSpec {
            temperature: 1.0,
            ..Default::default()
        };
        let mut counts = [0usize; 8];
        for seed in 0..400u64 {
            for step in 0..100 {
                counts[sample(&logits, &p, seed, step) as usize] += 1;
            }
        }
        let chi2: f64 = (0..8)
            .map(|i| {
                let e = 40_000.0 * (i + 1) as f64 / 36.0;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 24.3, "chi-square {chi2}, counts {counts:?}");
        // A token 30 logits behind at a 128k vocabulary never wins (u is never 1).
        let mut far = vec![0f32; 128_256];
        far[0] = 30.0;
        assert!((0..200).all(|s| sample(&far, &p, 9, s) == 0));
    }
}
