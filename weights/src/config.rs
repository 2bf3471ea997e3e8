//! Model hyper-parameters, from a Hugging Face `config.json` or from GGUF metadata.
//!
//! Invariants checked by [`ModelConfig::validate`]: every size is positive, the query heads
//! split evenly over the KV heads (MHA, GQA and MQA alike) and the head dimension is even.

use serde_json::Value;

use crate::{Result, WeightsError};

/// The decoder family; they differ only in details the forward pass reads from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 and 3, SmolLM2 and other Llama-shaped models.
    Llama,
    /// Mistral (Llama-shaped; sliding windows are not used by convoy).
    Mistral,
    /// Qwen2: Llama-shaped with biases on the query, key and value projections.
    Qwen2,
}

impl Architecture {
    /// Parse a Hugging Face `architectures` entry, `model_type`, or GGUF `general.architecture`.
    pub fn parse(name: &str) -> Result<Architecture> {
        match name {
            "LlamaForCausalLM" | "llama" | "smollm2" => Ok(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Architecture::Qwen2),
            other => Err(WeightsError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// Whether the query, key and value projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2)
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Overall scale factor.
        factor: f32,
        /// Wavelengths longer than `original_max_position / low_freq_factor` are divided by `factor`.
        low_freq_factor: f32,
        /// Wavelengths shorter than `original_max_position / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// Context length of pre-training.
        original_max_position: f32,
    },
    /// Per-frequency divisors stored in a GGUF file (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (1 = MQA, fewer than `num_heads` = GQA).
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether the output projection is the token embedding.
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens: generation stops on any of them.
    pub eos_token_ids: Vec<u32>,
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| WeightsError::InvalidConfig(format!("missing field {key:?}")))
}

fn usize_field(v: &Value, key: &str) -> Result<usize> {
    field(v, key)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| WeightsError::InvalidConfig(format!("{key:?} must be a positive integer")))
}

fn f32_or(v: &Value, key: &str, default: f32) -> Result<f32> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| WeightsError::InvalidConfig(format!("{key:?} must be a number"))),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` document.
    pub fn from_hf_json(v: &Value) -> Result<ModelConfig> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|a| a.as_str()))
            .ok_or_else(|| {
                WeightsError::InvalidConfig("missing \"architectures\" and \"model_type\"".into())
            })?;
        let architecture = Architecture::parse(arch_name)?;
        let hidden_size = usize_field(v, "hidden_size")?;
        let num_heads = usize_field(v, "num_attention_heads")?;
        let num_kv_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => usize_field(v, "num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_heads.max(1),
            Some(_) => usize_field(v, "head_dim")?,
        };
        let rope_scaling = match v.get("rope_scaling") {
            Some(s @ Value::Object(_)) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
                    "llama3" => RopeScaling::Llama3 {
                        factor: f32_or(s, "factor", 8.0)?,
                        low_freq_factor: f32_or(s, "low_freq_factor", 1.0)?,
                        high_freq_factor: f32_or(s, "high_freq_factor", 4.0)?,
                        original_max_position: f32_or(
                            s,
                            "original_max_position_embeddings",
                            8192.0,
                        )?,
                    },
                    "default" | "" => RopeScaling::None,
                    other => {
                        return Err(WeightsError::InvalidConfig(format!(
                            "unsupported rope_scaling type {other:?}"
                        )))
                    }
                }
            }
            _ => RopeScaling::None,
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: usize_field(v, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size")?,
            num_layers: usize_field(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f32_or(v, "rope_theta", 10000.0)?,
            rope_scaling,
            rms_norm_eps: f32_or(v, "rms_norm_eps", 1e-6)?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(4096) as usize,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the invariants stated in the module header.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(WeightsError::InvalidConfig(format!(
                    "{name} must be positive"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(WeightsError::InvalidConfig(format!(
                "{} query heads do not split evenly over {} KV heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(WeightsError::InvalidConfig(
                "head_dim must be even for RoPE".into(),
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(WeightsError::InvalidConfig(
                "rope_theta must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Rotary inverse frequencies, `head_dim / 2` of them, computed in f32 exactly as
    /// Hugging Face transformers does so that logits agree with it.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        let base: Vec<f32> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Factors(f) => base
                .iter()
                .zip(f.iter().chain(std::iter::repeat(&1.0)))
                .map(|(b, f)| b / f)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Bytes of K and V for one token in one layer, at `dtype_bytes` per element.
    pub fn kv_bytes_per_token_per_layer(&self, dtype_bytes: usize) -> usize {
        2 * self.num_kv_heads * self.head_dim * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_is_a_clear_error() {
        let v = serde_json::json!({"architectures": ["GPTBigCodeForCausalLM"]});
        let err = ModelConfig::from_hf_json(&v).unwrap_err();
        assert!(
            matches!(err, WeightsError::UnsupportedArchitecture(ref a) if a == "GPTBigCodeForCausalLM")
        );
    }

    #[test]
    fn gqa_heads_must_divide() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
            "hidden_size": 12, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 3, "num_key_value_heads": 2});
        assert!(matches!(
            ModelConfig::from_hf_json(&v),
            Err(WeightsError::InvalidConfig(_))
        ));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
            "hidden_size": 256, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let cfg = ModelConfig::from_hf_json(&v).unwrap();
        let plain = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        let scaled = cfg.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert_eq!(scaled[last], plain[last] / 8.0);
    }
}
