//! The CUDA backend's weights on the device: matrices bf16, row-major `[out][in]`, with QKV and
//! gate/up fused (each part written at its rows' offset of one buffer); norms bf16; the Qwen2
//! QKV bias f32.
//!
//! Two sources give the same bytes: a host [`LlamaModel`] (its f32 or quantised rows rounded to
//! bf16), or the loaded tensors straight (bf16 copied as they are; f16, f32 and quantised GGUF
//! blocks widened to f32 one tensor at a time and rounded to bf16), which never holds the whole
//! model in f32 on the host: an 8B model's bf16 checkpoint uploads from its 16 GB, not 32 GB.

use std::collections::HashMap;

use convoy_kernels::cuda::device::{DeviceError, DeviceLayer};
use convoy_weights::{DType, ModelConfig, Tensor};
use half::bf16;

use crate::model::llama::{LayerNames, LlamaModel, EMBED, FINAL_NORM, LM_HEAD};

/// One layer's weights on the device.
pub(super) struct LayerWeights<B> {
    pub(super) attn_norm: B,
    pub(super) ffn_norm: B,
    pub(super) qkv: B,
    pub(super) qkv_bias: Option<B>,
    pub(super) o: B,
    pub(super) gate_up: B,
    pub(super) down: B,
}

/// Every weight of the model on the device, and the RoPE frequencies the host table needs.
pub(super) struct DeviceWeights<B> {
    pub(super) embed: B,
    pub(super) lm_head: Option<B>,
    pub(super) final_norm: B,
    pub(super) layers: Vec<LayerWeights<B>>,
    pub(super) inv_freq: Vec<f32>,
}

/// Why loaded tensors cannot be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// A tensor the model needs is not there.
    #[error("tensor {name} is missing")]
    Missing {
        /// Its Hugging Face name.
        name: String,
    },
    /// A tensor's shape is not the one the config implies.
    #[error("tensor {name} has shape {shape:?}, expected [{rows}, {cols}]")]
    Shape {
        /// Its Hugging Face name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Rows expected.
        rows: usize,
        /// Columns expected.
        cols: usize,
    },
    /// The device refused an allocation or a copy.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn upload_matrix<D: DeviceLayer>(
    d: &D,
    m: &convoy_kernels::Matrix,
) -> Result<D::Buffer, DeviceError> {
    let cols = m.cols();
    let mut row = vec![0f32; cols];
    let mut out: Vec<bf16> = Vec::with_capacity(m.rows() * cols);
    for r in 0..m.rows() {
        m.row_to_f32(r, &mut row);
        out.extend(row.iter().map(|&x| bf16::from_f32(x)));
    }
    d.upload(&out)
}

impl<B> DeviceWeights<B> {
    /// Upload a host model's weights.
    pub(super) fn from_model<D: DeviceLayer<Buffer = B>>(
        d: &D,
        model: &LlamaModel,
    ) -> Result<DeviceWeights<B>, DeviceError> {
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            layers.push(LayerWeights {
                attn_norm: d.upload(&to_bf16(&layer.attn_norm))?,
                ffn_norm: d.upload(&to_bf16(&layer.ffn_norm))?,
                qkv: upload_matrix(d, &layer.qkv)?,
                qkv_bias: match &layer.qkv_bias {
                    Some(b) => Some(d.upload(b)?),
                    None => None,
                },
                o: upload_matrix(d, &layer.o)?,
                gate_up: upload_matrix(d, &layer.gate_up)?,
                down: upload_matrix(d, &layer.down)?,
            });
        }
        Ok(DeviceWeights {
            embed: upload_matrix(d, &model.embed)?,
            lm_head: match &model.lm_head {
                Some(m) => Some(upload_matrix(d, m)?),
                None => None,
            },
            final_norm: d.upload(&to_bf16(&model.norm))?,
            layers,
            inv_freq: model.inv_freq.clone(),
        })
    }

    /// Upload loaded tensors (consumed one by one, so each is freed once it is on the device).
    pub(super) fn from_tensors<D: DeviceLayer<Buffer = B>>(
        d: &D,
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<DeviceWeights<B>, WeightError> {
        // Nothing goes to the device from a checkpoint that lacks a tensor or has one of the
        // wrong shape.
        check_tensors(cfg, &tensors)?;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let take = |tensors: &mut HashMap<String, Tensor>, name: &str| {
            tensors.remove(name).ok_or_else(|| WeightError::Missing {
                name: name.to_string(),
            })
        };
        // Matrices made of parts stacked by rows, each `[rows][cols]`.
        let stacked = |d: &D, parts: Vec<(Tensor, usize)>, cols: usize| -> Result<B, WeightError> {
            let rows: usize = parts.iter().map(|(_, r)| r).sum();
            let mut buf = d.alloc(rows * cols * 2)?;
            let mut offset = 0;
            for (t, r) in parts {
                let values = matrix_bf16(&t, r, cols)?;
                d.write(
                    &mut buf,
                    offset,
                    convoy_kernels::cuda::device::as_bytes(&values),
                )?;
                offset += values.len() * 2;
            }
            Ok(buf)
        };
        let vector = |d: &D, t: Tensor, len: usize| -> Result<B, WeightError> {
            Ok(d.upload(&matrix_bf16(&t, 1, len)?)?)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let n = LayerNames::of(l);
            let qkv = vec![
                (take(&mut tensors, &n.q)?, qd),
                (take(&mut tensors, &n.k)?, kvd),
                (take(&mut tensors, &n.v)?, kvd),
            ];
            let qkv_bias = if cfg.architecture.has_qkv_bias() {
                let mut b = Vec::with_capacity(qd + 2 * kvd);
                for (name, len) in n.qkv_bias.iter().zip([qd, kvd, kvd]) {
                    let t = take(&mut tensors, name)?;
                    check_shape(&t, 1, len)?;
                    b.extend(t.to_f32());
                }
                Some(d.upload(&b)?)
            } else {
                None
            };
            let gate_up = vec![
                (take(&mut tensors, &n.gate)?, inter),
                (take(&mut tensors, &n.up)?, inter),
            ];
            layers.push(LayerWeights {
                attn_norm: vector(d, take(&mut tensors, &n.attn_norm)?, h)?,
                ffn_norm: vector(d, take(&mut tensors, &n.ffn_norm)?, h)?,
                qkv: stacked(d, qkv, h)?,
                qkv_bias,
                o: stacked(d, vec![(take(&mut tensors, &n.o)?, h)], qd)?,
                gate_up: stacked(d, gate_up, h)?,
                down: stacked(d, vec![(take(&mut tensors, &n.down)?, h)], inter)?,
            });
        }
        let embed = stacked(d, vec![(take(&mut tensors, EMBED)?, cfg.vocab_size)], h)?;
        let lm_head = match tensors.remove(LM_HEAD) {
            Some(t) if !cfg.tie_word_embeddings => Some(stacked(d, vec![(t, cfg.vocab_size)], h)?),
            _ => None,
        };
        let final_norm = vector(d, take(&mut tensors, FINAL_NORM)?, h)?;
        Ok(DeviceWeights {
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq: cfg.rope_inv_freq(),
        })
    }
}

/// Every tensor the CUDA backend uploads for `cfg`, with its `[rows, cols]` (vectors: one row),
/// by Hugging Face name; `LM_HEAD` only where the embedding is not tied.
fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let mut out = Vec::new();
    for l in 0..cfg.num_layers {
        let n = LayerNames::of(l);
        out.extend([
            (n.q.clone(), qd, h),
            (n.k.clone(), kvd, h),
            (n.v.clone(), kvd, h),
            (n.o.clone(), h, qd),
            (n.gate.clone(), inter, h),
            (n.up.clone(), inter, h),
            (n.down.clone(), h, inter),
            (n.attn_norm.clone(), 1, h),
            (n.ffn_norm.clone(), 1, h),
        ]);
        if cfg.architecture.has_qkv_bias() {
            for (name, len) in n.qkv_bias.iter().zip([qd, kvd, kvd]) {
                out.push((name.clone(), 1, len));
            }
        }
    }
    out.push((EMBED.to_string(), cfg.vocab_size, h));
    out.push((FINAL_NORM.to_string(), 1, h));
    out
}

/// Check that `tensors` hold every tensor the CUDA backend needs for `cfg`, each of the shape
/// the config implies (and a separate LM head, where there is one, too), before anything is
/// uploaded: a broken checkpoint is refused where it is loaded, not on the engine thread.
pub fn check_tensors(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), WeightError> {
    for (name, rows, cols) in expected_tensors(cfg) {
        let t = tensors.get(&name).ok_or(WeightError::Missing { name })?;
        check_shape(t, rows, cols)?;
    }
    match tensors.get(LM_HEAD) {
        Some(t) if !cfg.tie_word_embeddings => check_shape(t, cfg.vocab_size, cfg.hidden_size),
        _ => Ok(()),
    }
}

fn check_shape(t: &Tensor, rows: usize, cols: usize) -> Result<(), WeightError> {
    if t.rows() != rows || t.cols() != cols {
        return Err(WeightError::Shape {
            name: t.name.clone(),
            shape: t.shape.clone(),
            rows,
            cols,
        });
    }
    Ok(())
}

/// A `[rows][cols]` tensor as bf16: bf16 bytes as they are, every other type through f32.
fn matrix_bf16(t: &Tensor, rows: usize, cols: usize) -> Result<Vec<bf16>, WeightError> {
    check_shape(t, rows, cols)?;
    Ok(match t.dtype {
        DType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        _ => to_bf16(&t.to_f32()),
    })
}
