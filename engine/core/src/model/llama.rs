//! A Llama-family model's weights on the host, and its forward pass on the CPU backend (the
//! pass itself is `backend::forward`, written once for every backend).
//!
//! Per layer: RMSNorm, one fused QKV multiply (+ biases for Qwen2), half-split RoPE, K/V written
//! to the cache by slot mapping, paged attention, output projection, residual; RMSNorm, one
//! fused gate/up multiply, SiLU gate, down projection, residual. Logits are computed only for
//! `ForwardBatch::logits_rows`. Weights stay in their stored format (f32 or GGML blocks); the
//! matrix multiplies run in the model's [`Precision`] (exact float32 activations, or fast 8-bit ones).

use std::collections::HashMap;

use convoy_kernels::{Matrix, Precision, WeightFormat};
use convoy_weights::{DType, LoadedModel, ModelConfig, Tensor};

use crate::backend::cpu::CpuBackend;
use crate::backend::forward;
use crate::forward_batch::ForwardBatch;
use crate::kv_cache::{KvCache, KvCacheDtype};

/// Why a model could not be built from loaded tensors.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor is missing or malformed.
    #[error("tensor {0}: {1}")]
    Tensor(String, String),
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) ffn_norm: Vec<f32>,
    /// Q, K and V projections stacked: rows `[q | k | v]`.
    pub(crate) qkv: Matrix,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    pub(crate) o: Matrix,
    /// Gate and up projections stacked: rows `[gate | up]`.
    pub(crate) gate_up: Matrix,
    pub(crate) down: Matrix,
}

/// A loaded Llama-family model, ready to run.
pub struct LlamaModel {
    /// The model's shape.
    pub config: ModelConfig,
    pub(crate) embed: Matrix,
    pub(crate) lm_head: Option<Matrix>,
    pub(crate) norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) precision: Precision,
    kv_cache_dtype: KvCacheDtype,
}

/// Hugging Face names of the tensors outside the layers.
pub(crate) const EMBED: &str = "model.embed_tokens.weight";
/// The output projection (absent or ignored when the embedding is tied).
pub(crate) const LM_HEAD: &str = "lm_head.weight";
/// The final norm.
pub(crate) const FINAL_NORM: &str = "model.norm.weight";

/// Hugging Face names of one layer's tensors: every backend's weights come from these.
pub(crate) struct LayerNames {
    pub(crate) q: String,
    pub(crate) k: String,
    pub(crate) v: String,
    /// Qwen2's Q, K and V biases.
    pub(crate) qkv_bias: [String; 3],
    pub(crate) o: String,
    pub(crate) gate: String,
    pub(crate) up: String,
    pub(crate) down: String,
    pub(crate) attn_norm: String,
    pub(crate) ffn_norm: String,
}

impl LayerNames {
    /// The names of layer `l`'s tensors.
    pub(crate) fn of(l: usize) -> LayerNames {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        LayerNames {
            q: p("self_attn.q_proj.weight"),
            k: p("self_attn.k_proj.weight"),
            v: p("self_attn.v_proj.weight"),
            qkv_bias: [
                p("self_attn.q_proj.bias"),
                p("self_attn.k_proj.bias"),
                p("self_attn.v_proj.bias"),
            ],
            o: p("self_attn.o_proj.weight"),
            gate: p("mlp.gate_proj.weight"),
            up: p("mlp.up_proj.weight"),
            down: p("mlp.down_proj.weight"),
            attn_norm: p("input_layernorm.weight"),
            ffn_norm: p("post_attention_layernorm.weight"),
        }
    }
}

fn take(tensors: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor, ModelError> {
    tensors
        .remove(name)
        .ok_or_else(|| ModelError::Tensor(name.to_string(), "missing".into()))
}

fn vector(t: Tensor, len: usize) -> Result<Vec<f32>, ModelError> {
    if t.numel() != len {
        let got = t.numel();
        return Err(ModelError::Tensor(
            t.name,
            format!("{got} values, expected {len}"),
        ));
    }
    Ok(t.to_f32())
}

fn matrix(t: Tensor, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
    if t.rows() != rows || t.cols() != cols {
        let shape = format!("{:?}", t.shape);
        return Err(ModelError::Tensor(
            t.name,
            format!("shape {shape}, expected [{rows}, {cols}]"),
        ));
    }
    let format = match t.dtype {
        DType::Q4_0 => Some(WeightFormat::Q4_0),
        DType::Q4_1 => Some(WeightFormat::Q4_1),
        DType::Q8_0 => Some(WeightFormat::Q8_0),
        DType::F32 | DType::F16 | DType::BF16 => None,
    };
    let name = t.name.clone();
    let m = match format {
        Some(f) => Matrix::from_blocks(f, rows, cols, t.data),
        None => Matrix::from_f32(rows, cols, t.to_f32()),
    };
    m.map_err(|e| ModelError::Tensor(name, e.to_string()))
}

/// Bring matrices to one format so they can be stacked: when they differ, all become f32.
fn stack(parts: Vec<Matrix>, name: &str) -> Result<Matrix, ModelError> {
    let same = parts.iter().all(|m| m.format() == parts[0].format());
    let parts: Vec<Matrix> = if same {
        parts
    } else {
        parts
            .into_iter()
            .map(|m| {
                let mut data = vec![0f32; m.rows() * m.cols()];
                for r in 0..m.rows() {
                    m.row_to_f32(r, &mut data[r * m.cols()..(r + 1) * m.cols()]);
                }
                Matrix::from_f32(m.rows(), m.cols(), data).expect("sizes match by construction")
            })
            .collect()
    };
    let refs: Vec<&Matrix> = parts.iter().collect();
    Matrix::concat_rows(&refs).map_err(|e| ModelError::Tensor(name.to_string(), e.to_string()))
}

impl LlamaModel {
    /// Build the model from loaded tensors (consumed).
    pub fn new(loaded: LoadedModel) -> Result<LlamaModel, ModelError> {
        let cfg = loaded.config;
        let mut t = loaded.tensors;
        let h = cfg.hidden_size;
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let embed = matrix(take(&mut t, EMBED)?, cfg.vocab_size, h)?;
        let lm_head = match t.remove(LM_HEAD) {
            Some(w) if !cfg.tie_word_embeddings => Some(matrix(w, cfg.vocab_size, h)?),
            _ => None,
        };
        let norm = vector(take(&mut t, FINAL_NORM)?, h)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let n = LayerNames::of(l);
            let mut get = |name: &str| take(&mut t, name);
            let q = matrix(get(&n.q)?, qd, h)?;
            let kk = matrix(get(&n.k)?, kvd, h)?;
            let v = matrix(get(&n.v)?, kvd, h)?;
            let qkv_bias = if cfg.architecture.has_qkv_bias() {
                let mut b = vector(get(&n.qkv_bias[0])?, qd)?;
                b.extend(vector(get(&n.qkv_bias[1])?, kvd)?);
                b.extend(vector(get(&n.qkv_bias[2])?, kvd)?);
                Some(b)
            } else {
                None
            };
            let o = matrix(get(&n.o)?, h, qd)?;
            let gate = matrix(get(&n.gate)?, cfg.intermediate_size, h)?;
            let up = matrix(get(&n.up)?, cfg.intermediate_size, h)?;
            let down = matrix(get(&n.down)?, h, cfg.intermediate_size)?;
            layers.push(Layer {
                attn_norm: vector(get(&n.attn_norm)?, h)?,
                ffn_norm: vector(get(&n.ffn_norm)?, h)?,
                qkv: stack(vec![q, kk, v], &format!("model.layers.{l}.qkv"))?,
                qkv_bias,
                o,
                gate_up: stack(vec![gate, up], &format!("model.layers.{l}.gate_up"))?,
                down,
            });
        }
        let inv_freq = cfg.rope_inv_freq();
        Ok(LlamaModel {
            config: cfg,
            embed,
            lm_head,
            norm,
            layers,
            inv_freq,
            precision: Precision::Exact,
            kv_cache_dtype: KvCacheDtype::F32,
        })
    }

    /// The arithmetic of the matrix multiplies (see [`Precision`]): `Exact` unless set.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Choose the arithmetic of the matrix multiplies. Set it before the model computes any
    /// K/V that a cache keeps: cached K/V of one precision must not be reused in the other.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The element type of the KV caches this model makes (see [`KvCacheDtype`]): `F32`
    /// unless set.
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.kv_cache_dtype
    }

    /// Choose the element type of the KV caches [`LlamaModel::new_kv_cache`] and
    /// [`LlamaModel::new_tiered_kv_cache`] make from now on.
    pub fn set_kv_cache_dtype(&mut self, dtype: KvCacheDtype) {
        self.kv_cache_dtype = dtype;
    }

    /// Bytes of weights read by one forward pass.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_bytes() + l.o.size_bytes() + l.gate_up.size_bytes() + l.down.size_bytes()
            })
            .sum();
        layers + self.lm_head.as_ref().unwrap_or(&self.embed).size_bytes()
    }

    /// A KV cache shaped for this model, without a host tier.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache {
        self.new_tiered_kv_cache(num_blocks, 0, block_size)
    }

    /// A KV cache shaped for this model with a host tier of `num_host_blocks`.
    pub fn new_tiered_kv_cache(
        &self,
        num_blocks: usize,
        num_host_blocks: usize,
        block_size: usize,
    ) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.num_layers,
            num_blocks,
            num_host_blocks,
            block_size,
            c.num_kv_heads,
            c.head_dim,
            self.kv_cache_dtype,
        )
    }

    /// Run one forward pass; returns logits (`logits_rows.len() x vocab_size`).
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Vec<f32> {
        let mut logits = Vec::new();
        self.forward_into(batch, cache, &mut logits);
        logits
    }

    /// [`LlamaModel::forward`] into `logits`, which ends up `logits_rows.len() x vocab_size`
    /// long. Every value is written over, so a buffer kept from an earlier step saves zeroing a
    /// fresh one (only what it grows by is zeroed first).
    pub fn forward_into(&self, batch: &ForwardBatch, cache: &mut KvCache, logits: &mut Vec<f32>) {
        let mut backend = CpuBackend::new(self, cache);
        backend.lend_logits(std::mem::take(logits));
        forward(&mut backend, batch, logits).expect("the CPU backend has no failing operation");
    }
}
