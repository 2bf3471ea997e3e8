//! Random weights in the real shapes of any config, for benchmarks (`--load-format dummy`).
//!
//! Values are small and centred so activations stay finite through many layers; the stream is
//! seeded, so the same config and seed give the same model.

use std::collections::HashMap;

use half::{bf16, f16};

use crate::{DType, ModelConfig, Tensor};

/// The seeded stream (SplitMix64, the same generator as the engine's sampler).
struct SplitMix(rand_xoshiro::SplitMix64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        rand_core::RngCore::next_u64(&mut self.0)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn random_bytes(rng: &mut SplitMix, dtype: DType, n: usize, scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(dtype.bytes_for(n).unwrap_or(0));
    match dtype {
        DType::F32 => (0..n).for_each(|_| out.extend((rng.unit() * scale).to_le_bytes())),
        DType::F16 => {
            (0..n).for_each(|_| out.extend(f16::from_f32(rng.unit() * scale).to_le_bytes()))
        }
        DType::BF16 => {
            (0..n).for_each(|_| out.extend(bf16::from_f32(rng.unit() * scale).to_le_bytes()))
        }
        DType::Q8_0 => {
            for _ in 0..n / 32 {
                out.extend(f16::from_f32(scale / 127.0).to_le_bytes());
                (0..32).for_each(|_| out.push(rng.next() as u8));
            }
        }
        DType::Q4_0 => {
            for _ in 0..n / 32 {
                out.extend(f16::from_f32(scale / 8.0).to_le_bytes());
                (0..16).for_each(|_| out.push(rng.next() as u8));
            }
        }
        DType::Q4_1 => {
            for _ in 0..n / 32 {
                out.extend(f16::from_f32(scale / 7.5).to_le_bytes());
                out.extend(f16::from_f32(-scale).to_le_bytes());
                (0..16).for_each(|_| out.push(rng.next() as u8));
            }
        }
    }
    out
}

/// All tensors of a Llama-shaped model with random values; norms are ones.
/// Quantised `dtype`s apply to matrices whose rows are whole blocks; the rest are f32.
pub fn tensors(cfg: &ModelConfig, dtype: DType, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = SplitMix(rand_core::SeedableRng::seed_from_u64(
        seed ^ 0x636f_6e76_6f79,
    ));
    let mut out = HashMap::new();
    let matrix = |rng: &mut SplitMix,
                  name: String,
                  rows: usize,
                  cols: usize,
                  scale: f32,
                  out: &mut HashMap<String, Tensor>| {
        let dt = if cols.is_multiple_of(dtype.block_len()) {
            dtype
        } else {
            DType::F32
        };
        let data = random_bytes(rng, dt, rows * cols, scale);
        if let Ok(t) = Tensor::new(name.clone(), vec![rows, cols], dt, data) {
            out.insert(name, t);
        }
    };
    let h = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let s_in = 1.0 / (h as f32).sqrt();
    matrix(
        &mut rng,
        "model.embed_tokens.weight".into(),
        cfg.vocab_size,
        h,
        1.0,
        &mut out,
    );
    if !cfg.tie_word_embeddings {
        matrix(
            &mut rng,
            "lm_head.weight".into(),
            cfg.vocab_size,
            h,
            s_in,
            &mut out,
        );
    }
    let ones = |name: String, n: usize| {
        let data: Vec<u8> = (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        (
            name.clone(),
            Tensor {
                name,
                shape: vec![n],
                dtype: DType::F32,
                data,
            },
        )
    };
    let (k, v) = ones("model.norm.weight".into(), h);
    out.insert(k, v);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        for (n, rows, cols, scale) in [
            ("self_attn.q_proj.weight", q, h, s_in),
            ("self_attn.k_proj.weight", kv, h, s_in),
            ("self_attn.v_proj.weight", kv, h, s_in),
            ("self_attn.o_proj.weight", h, q, 1.0 / (q as f32).sqrt()),
            ("mlp.gate_proj.weight", cfg.intermediate_size, h, s_in),
            ("mlp.up_proj.weight", cfg.intermediate_size, h, s_in),
            (
                "mlp.down_proj.weight",
                h,
                cfg.intermediate_size,
                1.0 / (cfg.intermediate_size as f32).sqrt(),
            ),
        ] {
            matrix(&mut rng, format!("{p}{n}"), rows, cols, scale, &mut out);
        }
        if cfg.architecture.has_qkv_bias() {
            for (n, len) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                let name = format!("{p}self_attn.{n}.bias");
                let data = random_bytes(&mut rng, DType::F32, len, 0.1);
                out.insert(
                    name.clone(),
                    Tensor {
                        name,
                        shape: vec![len],
                        dtype: DType::F32,
                        data,
                    },
                );
            }
        }
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            let (k, v) = ones(format!("{p}{n}"), h);
            out.insert(k, v);
        }
    }
    out
}
