//! Device profiles: what one replica is (model shape, KV memory, scheduler defaults) and how
//! long its steps take (a [`CostModel`]).
//!
//! A profile comes from one of three places, all in the same JSON format (docs/planning.md):
//! `convoy-bench calibrate` (step times measured on this machine with the real CPU engine and
//! fitted by least squares, [`fit_linear`]), a roofline for a named GPU and model shape
//! ([`Profile::roofline`]), or a file measured on a GPU by `bench/gpu/check.sh`.
//!
//! Invariants: a loaded profile has at least one KV block of at least one token, positive
//! bandwidth and FLOP rates when it has a roofline, and non-negative cost coefficients (so
//! step times never decrease as a step grows).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::PlanError;
use convoy_engine::sim::{CostModel, Roofline};

/// The format tag every profile carries.
pub const PROFILE_FORMAT: &str = "convoy-profile/1";

/// The shape of a Llama-family model: enough to size weights, KV and arithmetic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// A name for reports.
    pub name: String,
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Output projection shares the embedding.
    pub tied_embeddings: bool,
    /// Longest sequence (prompt + output).
    pub max_model_len: usize,
}

impl ModelShape {
    /// The shape of a parsed `config.json` (or GGUF metadata).
    pub fn from_config(name: &str, c: &convoy_weights::ModelConfig) -> ModelShape {
        ModelShape {
            name: name.to_string(),
            layers: c.num_layers,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            tied_embeddings: c.tie_word_embeddings,
            max_model_len: c.max_position_embeddings,
        }
    }

    /// Read a Hugging Face `config.json`.
    pub fn from_config_file(path: &Path) -> Result<ModelShape, PlanError> {
        let bad = |message: String| PlanError::ModelConfig {
            what: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let c = convoy_weights::ModelConfig::from_hf_json(&v).map_err(|e| bad(e.to_string()))?;
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        Ok(ModelShape::from_config(&name, &c))
    }

    /// A named shape: `llama-3-8b`, `llama-3-70b`, `llama-3.2-1b`, `llama-3.2-3b`,
    /// `mistral-7b`, `qwen2.5-7b`, `smollm2-135m`.
    pub fn named(name: &str) -> Option<ModelShape> {
        let s = |layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied, len| {
            ModelShape {
                name: name.to_string(),
                layers,
                hidden,
                intermediate,
                heads,
                kv_heads,
                head_dim,
                vocab,
                tied_embeddings: tied,
                max_model_len: len,
            }
        };
        Some(match name {
            "llama-3-8b" | "llama-3.1-8b" => s(32, 4096, 14336, 32, 8, 128, 128256, false, 8192),
            "llama-3-70b" | "llama-3.1-70b" => s(80, 8192, 28672, 64, 8, 128, 128256, false, 8192),
            "llama-3.2-1b" => s(16, 2048, 8192, 32, 8, 64, 128256, true, 8192),
            "llama-3.2-3b" => s(28, 3072, 8192, 24, 8, 128, 128256, true, 8192),
            "mistral-7b" => s(32, 4096, 14336, 32, 8, 128, 32768, false, 8192),
            "qwen2.5-7b" => s(28, 3584, 18944, 28, 4, 128, 152064, false, 8192),
            "smollm2-135m" => s(30, 576, 1536, 9, 3, 64, 49152, true, 8192),
            _ => return None,
        })
    }

    /// The names [`ModelShape::named`] knows.
    pub const NAMES: [&'static str; 7] = [
        "llama-3-8b",
        "llama-3-70b",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "mistral-7b",
        "qwen2.5-7b",
        "smollm2-135m",
    ];

    /// Parameters outside the embedding and output projection (attention and MLP).
    pub fn layer_params(&self) -> f64 {
        let q = self.hidden * self.heads * self.head_dim;
        let kv = 2 * self.hidden * self.kv_heads * self.head_dim;
        let o = self.heads * self.head_dim * self.hidden;
        let mlp = 3 * self.hidden * self.intermediate;
        (self.layers * (q + kv + o + mlp + 2 * self.hidden)) as f64
    }

    /// All parameters (embedding counted once when tied).
    pub fn params(&self) -> f64 {
        let emb = (self.vocab * self.hidden) as f64;
        self.layer_params() + emb * if self.tied_embeddings { 1.0 } else { 2.0 }
    }

    /// Bytes of K and V per token, all layers, at `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes
    }
}

/// A GPU's peak figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Name.
    pub name: String,
    /// HBM bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dense bf16 tensor-core rate, FLOP/s.
    pub bf16_flops: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
}

impl GpuSpec {
    /// `h100` (SXM, 80 GB HBM3), `h200` (141 GB HBM3e), `a100` (SXM, 80 GB): vendor datasheet
    /// figures (dense, no sparsity).
    pub fn named(name: &str) -> Option<GpuSpec> {
        let g = |bw: f64, tf: f64, gb: f64| GpuSpec {
            name: name.to_string(),
            bandwidth: bw * 1e12,
            bf16_flops: tf * 1e12,
            memory_bytes: gb * 1e9,
        };
        Some(match name {
            "h100" => g(3.35, 989.0, 80.0),
            "h200" => g(4.8, 989.0, 141.0),
            "a100" => g(2.039, 312.0, 80.0),
            _ => return None,
        })
    }
}

/// How many tokens the model's tokenizer and chat template make of what `convoy-bench run`
/// sends (`workload::synthetic_text` in ChatML-style messages), so the simulated prompts are as
/// long as the real ones. A workload spec counts text in words; the defaults (1 token per word,
/// no tag, a 3-token assistant header, no default system prompt) are the spec's nominal counts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextCounts {
    /// Tokens per word of synthetic text (punctuation included).
    pub tokens_per_word: f64,
    /// Tokens of the `[conversation.turn] ` tag in front of each user message.
    pub user_tag_tokens: f64,
    /// Tokens of the header that opens the assistant's reply (`<|im_start|>assistant\n`: 4 with
    /// SmolLM2, whose tokenizer splits "assistant" in two).
    #[serde(default = "default_assistant_header")]
    pub assistant_header_tokens: u32,
    /// Tokens of the system message the template adds to a conversation that has none
    /// (SmolLM2's: 19, framing included), the same in every such conversation.
    #[serde(default)]
    pub default_system_tokens: u32,
}

fn default_assistant_header() -> u32 {
    3
}

impl Default for TextCounts {
    fn default() -> TextCounts {
        TextCounts {
            tokens_per_word: 1.0,
            user_tag_tokens: 0.0,
            assistant_header_tokens: default_assistant_header(),
            default_system_tokens: 0,
        }
    }
}

impl TextCounts {
    /// Tokens of `words` words of synthetic text.
    pub fn tokens(&self, words: u32) -> u32 {
        (words as f64 * self.tokens_per_word).round() as u32
    }
}

/// Memory of one replica's KV cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvMemory {
    /// Bytes of the device tier.
    pub kv_cache_bytes: u64,
    /// Bytes of the host tier (0: none).
    pub host_cache_bytes: u64,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of K and V per token, all layers.
    pub kv_bytes_per_token: u64,
}

impl KvMemory {
    /// Device blocks.
    pub fn num_blocks(&self) -> usize {
        (self.kv_cache_bytes / (self.kv_bytes_per_token * self.block_size as u64).max(1)) as usize
    }

    /// Host blocks.
    pub fn num_host_blocks(&self) -> usize {
        (self.host_cache_bytes / (self.kv_bytes_per_token * self.block_size as u64).max(1)) as usize
    }
}

/// Scheduler settings a replica runs with unless the planner searches over them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaDefaults {
    /// Requests running at once (`convoy serve --max-running`).
    pub max_running: usize,
    /// Most tokens in one step (`--max-batched-tokens`).
    pub max_batched_tokens: usize,
    /// Step time target in ms (`--step-time-target-ms`; 0 = off).
    pub step_time_target_ms: f64,
}

impl Default for ReplicaDefaults {
    /// `convoy serve`'s defaults.
    fn default() -> ReplicaDefaults {
        ReplicaDefaults {
            max_running: 256,
            max_batched_tokens: 2048,
            step_time_target_ms: 250.0,
        }
    }
}

/// How well a fitted cost model reproduces its measurements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitQuality {
    /// Measurements.
    pub samples: usize,
    /// Root mean square of `(predicted - measured) / measured`.
    pub rms_relative_error: f64,
    /// Largest `|predicted - measured| / measured`.
    pub max_relative_error: f64,
}

/// One replica: model, memory, defaults and step cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// [`PROFILE_FORMAT`].
    pub format: String,
    /// A name for reports.
    pub name: String,
    /// `calibrate`, `roofline` or `measured`.
    pub source: String,
    /// The model.
    pub model: ModelShape,
    /// The KV cache.
    pub memory: KvMemory,
    /// How the model's tokenizer counts the load generator's synthetic text.
    #[serde(default)]
    pub text: TextCounts,
    /// Scheduler defaults.
    #[serde(default)]
    pub defaults: ReplicaDefaults,
    /// Step cost.
    pub cost: CostModel,
    /// Fit quality (calibrated profiles).
    #[serde(default)]
    pub fit: Option<FitQuality>,
    /// Free text: machine, date, assumptions.
    #[serde(default)]
    pub notes: String,
}

/// Settings of a roofline profile.
#[derive(Clone, Debug, PartialEq)]
pub struct RooflineOptions {
    /// Share of peak bandwidth and FLOP/s reached (0..=1).
    pub efficiency: f64,
    /// Fixed seconds per step (launches, scheduling, sampling).
    pub step_overhead_s: f64,
    /// Bytes per weight (2 = bf16).
    pub weight_bytes: f64,
    /// Bytes per KV element (2 = bf16).
    pub kv_dtype_bytes: usize,
    /// Share of device memory the engine may use (weights + KV + activations).
    pub memory_utilization: f64,
    /// Bytes kept for activations and workspace.
    pub activation_reserve_bytes: f64,
    /// Host tier bytes.
    pub host_cache_bytes: u64,
    /// Host-device copy bandwidth, bytes/s (swaps to and from the host tier).
    pub pcie_bandwidth: f64,
    /// Tokens per block.
    pub block_size: usize,
}

impl Default for RooflineOptions {
    fn default() -> RooflineOptions {
        RooflineOptions {
            efficiency: 0.7,
            step_overhead_s: 0.5e-3,
            weight_bytes: 2.0,
            kv_dtype_bytes: 2,
            memory_utilization: 0.9,
            activation_reserve_bytes: 4e9,
            host_cache_bytes: 64 << 30,
            pcie_bandwidth: 25e9,
            block_size: 16,
        }
    }
}

impl Profile {
    /// A roofline profile of `model` on `gpu`: step time `overhead + max(bytes / (bandwidth x
    /// efficiency), flops / (peak x efficiency))`; KV memory = device memory x utilisation -
    /// weights - activation reserve.
    pub fn roofline(
        gpu: &GpuSpec,
        model: &ModelShape,
        o: &RooflineOptions,
    ) -> Result<Profile, PlanError> {
        if !(o.efficiency > 0.0 && o.efficiency <= 1.0) {
            return Err(PlanError::invalid("--efficiency", "must be in (0, 1]"));
        }
        let weights = model.params() * o.weight_bytes;
        let usable = gpu.memory_bytes * o.memory_utilization - o.activation_reserve_bytes;
        let kv_bytes = usable - weights;
        let kv_per_token = model.kv_bytes_per_token(o.kv_dtype_bytes);
        if kv_bytes < (kv_per_token * o.block_size * 64) as f64 {
            return Err(PlanError::WeightsDoNotFit {
                model: model.name.clone(),
                gpu: gpu.name.clone(),
                weight_gb: weights / 1e9,
                usable_gb: usable / 1e9,
            });
        }
        let out_proj = (model.hidden * model.vocab) as f64;
        let roofline = Roofline {
            weight_bytes: weights,
            kv_bytes_per_token: kv_per_token as f64,
            flops_per_token: 2.0 * model.layer_params(),
            flops_per_sampled: 2.0 * out_proj,
            flops_per_attention_pair: 4.0 * (model.layers * model.heads * model.head_dim) as f64,
            bandwidth: gpu.bandwidth * o.efficiency,
            flops: gpu.bf16_flops * o.efficiency,
        };
        Ok(Profile {
            format: PROFILE_FORMAT.into(),
            name: format!("{} on {} (roofline)", model.name, gpu.name),
            source: "roofline".into(),
            model: model.clone(),
            memory: KvMemory {
                kv_cache_bytes: kv_bytes as u64,
                host_cache_bytes: o.host_cache_bytes,
                block_size: o.block_size,
                kv_bytes_per_token: kv_per_token as u64,
            },
            text: Default::default(),
            defaults: ReplicaDefaults {
                max_running: 256,
                max_batched_tokens: 8192,
                step_time_target_ms: 0.0,
            },
            cost: CostModel {
                fixed_s: o.step_overhead_s,
                prefill_token_s: 0.0,
                decode_token_s: 0.0,
                kv_token_s: 0.0,
                attention_pair_s: 0.0,
                copy_token_s: kv_per_token as f64 / o.pcie_bandwidth,
                roofline: Some(roofline),
                request_edge_s: 0.0,
                request_edge_per_running_s: 0.0,
            },
            fit: None,
            notes: format!(
                "roofline: {:.2} TB/s x {:.2}, {:.0} TFLOP/s bf16 x {:.2}, {:.0} GB x {:.2} - {:.1} GB weights - {:.1} GB reserve = {:.1} GB KV; {:.2} ms per step overhead",
                gpu.bandwidth / 1e12,
                o.efficiency,
                gpu.bf16_flops / 1e12,
                o.efficiency,
                gpu.memory_bytes / 1e9,
                o.memory_utilization,
                weights / 1e9,
                o.activation_reserve_bytes / 1e9,
                kv_bytes / 1e9,
                o.step_overhead_s * 1e3
            ),
        })
    }

    /// Read and check a profile file.
    pub fn load(path: &Path) -> Result<Profile, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::ProfileUnreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| PlanError::ProfileInvalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        p.validate().map_err(|message| PlanError::ProfileInvalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok(p)
    }

    /// Write the profile as pretty JSON.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a profile serialises");
        std::fs::write(path, text + "\n")
    }

    /// Check the invariants of the module header.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != PROFILE_FORMAT {
            return Err(format!(
                "format is {:?}, expected {PROFILE_FORMAT:?}",
                self.format
            ));
        }
        if self.memory.block_size == 0 || self.memory.num_blocks() == 0 {
            return Err("memory holds no KV block".into());
        }
        let c = &self.cost;
        let coefs = [
            ("fixed_s", c.fixed_s),
            ("prefill_token_s", c.prefill_token_s),
            ("decode_token_s", c.decode_token_s),
            ("kv_token_s", c.kv_token_s),
            ("attention_pair_s", c.attention_pair_s),
            ("copy_token_s", c.copy_token_s),
            ("request_edge_s", c.request_edge_s),
            ("request_edge_per_running_s", c.request_edge_per_running_s),
        ];
        for (name, v) in coefs {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("cost.{name} must be a number >= 0, got {v}"));
            }
        }
        if let Some(r) = &c.roofline {
            if !(r.bandwidth > 0.0 && r.flops > 0.0) {
                return Err("cost.roofline: bandwidth and flops must be > 0".into());
            }
        }
        let t = &self.text;
        if !(t.tokens_per_word.is_finite()
            && (0.1..=20.0).contains(&t.tokens_per_word)
            && t.user_tag_tokens.is_finite()
            && (0.0..=1000.0).contains(&t.user_tag_tokens)
            && (2..=64).contains(&t.assistant_header_tokens)
            && t.default_system_tokens <= 4096)
        {
            return Err(
                "text: tokens_per_word must be in 0.1..=20, user_tag_tokens in 0..=1000, \
                 assistant_header_tokens in 2..=64 and default_system_tokens at most 4096"
                    .into(),
            );
        }
        if self.model.vocab < 200 || self.model.max_model_len == 0 {
            return Err("model: vocab must be >= 200 and max_model_len > 0".into());
        }
        if self.defaults.max_running == 0 || self.defaults.max_batched_tokens == 0 {
            return Err("defaults: max_running and max_batched_tokens must be >= 1".into());
        }
        Ok(())
    }
}

/// Non-negative least squares on relative error: coefficients `c >= 0` minimising
/// `sum ((x . c - y) / t)^2` over rows `(x, y)` with `y > 0`, where `t` is the fit's own time
/// for the row (iteratively reweighted: the first pass divides by `y`, later ones by the last
/// pass's `x . c`, until the coefficients settle). Dividing by the measurement itself would weigh a row that ran slow less
/// than one that ran fast, and fit noisy times low on average (12% low for times spread
/// +-30%); the simulation adds the fitted times up, so their sum must match. A coefficient the
/// unconstrained fit makes negative is dropped (fixed at 0) and the rest refitted (a small
/// active set, exact for the handful of features a step-time model has). Returns the
/// coefficients and the fit's quality (relative to the measurements).
pub fn fit_linear(rows: &[(Vec<f64>, f64)]) -> Option<(Vec<f64>, FitQuality)> {
    /// At most this many reweighting passes after the first; they stop once no coefficient
    /// moves by more than `SETTLED` of itself.
    const PASSES: usize = 50;
    const SETTLED: f64 = 1e-9;
    let predict = |x: &[f64], c: &[f64]| x.iter().zip(c).map(|(a, b)| a * b).sum::<f64>();
    let mut scale: Vec<f64> = rows.iter().map(|(_, y)| *y).collect();
    let mut c = fit_scaled(rows, &scale)?;
    for _ in 0..PASSES {
        // A row the fit gives (almost) no time keeps a quarter of its measurement as its
        // scale, so it cannot take over the fit.
        scale = rows
            .iter()
            .map(|(x, y)| predict(x, &c).max(0.25 * y))
            .collect();
        let next = fit_scaled(rows, &scale)?;
        let settled = next
            .iter()
            .zip(&c)
            .all(|(a, b)| (a - b).abs() <= SETTLED * a.abs().max(b.abs()));
        c = next;
        if settled {
            break;
        }
    }
    let errs: Vec<f64> = rows.iter().map(|(x, y)| (predict(x, &c) - y) / y).collect();
    let q = FitQuality {
        samples: rows.len(),
        rms_relative_error: (errs.iter().map(|e| e * e).sum::<f64>() / errs.len() as f64).sqrt(),
        max_relative_error: errs.iter().map(|e| e.abs()).fold(0.0, f64::max),
    };
    Some((c, q))
}

/// Non-negative least squares of `sum ((x . c - y) / scale)^2` (see [`fit_linear`]).
fn fit_scaled(rows: &[(Vec<f64>, f64)], scale: &[f64]) -> Option<Vec<f64>> {
    let k = rows.first()?.0.len();
    let mut active: Vec<bool> = vec![true; k];
    loop {
        let idx: Vec<usize> = (0..k).filter(|&j| active[j]).collect();
        let m = idx.len();
        let mut a = vec![vec![0.0f64; m + 1]; m];
        for ((x, y), t) in rows.iter().zip(scale) {
            let w = 1.0 / t.max(1e-12);
            for (p, &i) in idx.iter().enumerate() {
                for (q, &j) in idx.iter().enumerate() {
                    a[p][q] += x[i] * w * x[j] * w;
                }
                a[p][m] += x[i] * w * y * w;
            }
        }
        let sol = solve(a)?;
        let mut c = vec![0.0; k];
        for (p, &i) in idx.iter().enumerate() {
            c[i] = sol[p];
        }
        match idx
            .iter()
            .copied()
            .filter(|&i| c[i] < 0.0)
            .min_by(|&a, &b| c[a].total_cmp(&c[b]))
        {
            Some(worst) => active[worst] = false,
            None => return Some(c),
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        for row in 0..n {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col].clone();
                for (x, p) in a[row][col..=n].iter_mut().zip(&pivot_row[col..=n]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_8b_on_h100() {
        let m = ModelShape::named("llama-3-8b").unwrap();
        assert!((m.params() / 1e9 - 8.03).abs() < 0.05, "{}", m.params());
        assert_eq!(m.kv_bytes_per_token(2), 131072);
        let p = Profile::roofline(
            &GpuSpec::named("h100").unwrap(),
            &m,
            &RooflineOptions::default(),
        )
        .unwrap();
        // 80 x 0.9 - 4 - 16.06 = ~51.9 GB of KV: ~396k tokens.
        let tokens = p.memory.num_blocks() * p.memory.block_size;
        assert!((380_000..410_000).contains(&tokens), "{tokens}");
        p.validate().unwrap();
        let big = ModelShape::named("llama-3-70b").unwrap();
        let err = Profile::roofline(
            &GpuSpec::named("h100").unwrap(),
            &big,
            &RooflineOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.code(), "weights_do_not_fit");
    }

    #[test]
    fn least_squares_recovers_coefficients() {
        let truth = [0.005, 0.001, 0.0004, 2e-6];
        let rows: Vec<(Vec<f64>, f64)> = (0..20)
            .map(|i| {
                let x = vec![
                    1.0,
                    (i * 37 % 300) as f64,
                    (i * 7 % 40) as f64,
                    (i * 997 % 9000) as f64,
                ];
                let y = x.iter().zip(&truth).map(|(a, b)| a * b).sum::<f64>();
                (x, y)
            })
            .collect();
        let (c, q) = fit_linear(&rows).unwrap();
        for (a, b) in c.iter().zip(&truth) {
            assert!((a - b).abs() < 1e-9 * b.max(1.0), "{c:?}");
        }
        assert!(q.max_relative_error < 1e-9);
    }

    #[test]
    fn noisy_times_are_fitted_right_on_average() {
        // Each shape measured three times, around its time by a spread that differs from shape
        // to shape (+-30% on small ones, +-10% on large ones): weighting a row by its own
        // measurement fits them low; the total must come out right.
        let truth = [0.005, 0.001];
        let rows: Vec<(Vec<f64>, f64)> = (1..=200)
            .flat_map(|n| {
                let x = vec![1.0, n as f64];
                let t = 0.005 + 0.001 * n as f64;
                let s = if n < 100 { 0.3 } else { 0.1 };
                [1.0 - s, 1.0, 1.0 + s].map(|f| (x.clone(), t * f))
            })
            .collect();
        let (c, _) = fit_linear(&rows).unwrap();
        let total = |c: &[f64]| {
            rows.iter()
                .map(|(x, _)| x[0] * c[0] + x[1] * c[1])
                .sum::<f64>()
        };
        let measured: f64 = rows.iter().map(|(_, y)| y).sum();
        assert!((total(&c) / measured - 1.0).abs() < 0.01, "{c:?}");
        assert!((total(&truth) / measured - 1.0).abs() < 1e-9);
    }
}
