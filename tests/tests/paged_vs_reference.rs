//! The paged, batched forward pass against a plain unbatched reference written here with
//! simple loops and contiguous K/V, on dummy-weight models with 1 KV head (MQA) and 4 KV heads
//! (GQA), over mixed batches: prefill chunks next to decodes, block boundaries crossed, block
//! tables out of order.

use std::collections::HashMap;

use convoy_engine::{ForwardBatch, LlamaModel};
use convoy_weights::{dummy, Architecture, DType, LoadedModel, ModelConfig, RopeScaling, Tensor};

fn config(num_heads: usize, num_kv_heads: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 256,
        hidden_size: 128,
        intermediate_size: 96,
        num_layers: 2,
        num_heads,
        num_kv_heads,
        head_dim: 128 / num_heads,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 512,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn mat(t: &HashMap<String, Tensor>, name: &str) -> (Vec<f32>, usize) {
    let t = &t[name];
    (t.to_f32(), t.cols())
}

fn matvec(w: &(Vec<f32>, usize), x: &[f32]) -> Vec<f32> {
    let cols = w.1;
    w.0.chunks(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

fn rope(x: &mut [f32], hd: usize, pos: usize, inv_freq: &[f32]) {
    for head in x.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let a = pos as f32 * inv_freq[i];
            let (c, s) = (a.cos(), a.sin());
            let (x1, x2) = (head[i], head[i + hd / 2]);
            head[i] = x1 * c - x2 * s;
            head[i + hd / 2] = x2 * c + x1 * s;
        }
    }
}

/// Logits at every position of `tokens`, one sequence, contiguous K/V, no batching.
fn reference(cfg: &ModelConfig, t: &HashMap<String, Tensor>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let g = cfg.num_heads / cfg.num_kv_heads;
    let inv_freq = cfg.rope_inv_freq();
    let embed = mat(t, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&id| embed.0[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        let an = t[&format!("{p}input_layernorm.weight")].to_f32();
        let fnorm = t[&format!("{p}post_attention_layernorm.weight")].to_f32();
        let (wq, wk, wv, wo) = (
            mat(t, &format!("{p}self_attn.q_proj.weight")),
            mat(t, &format!("{p}self_attn.k_proj.weight")),
            mat(t, &format!("{p}self_attn.v_proj.weight")),
            mat(t, &format!("{p}self_attn.o_proj.weight")),
        );
        let (wg, wu, wd) = (
            mat(t, &format!("{p}mlp.gate_proj.weight")),
            mat(t, &format!("{p}mlp.up_proj.weight")),
            mat(t, &format!("{p}mlp.down_proj.weight")),
        );
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms(x, &an, cfg.rms_norm_eps);
            let mut q = matvec(&wq, &n);
            let mut k = matvec(&wk, &n);
            let mut v = matvec(&wv, &n);
            if cfg.architecture.has_qkv_bias() {
                for (x, b) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                    let bias = t[&format!("{p}self_attn.{b}_proj.bias")].to_f32();
                    x.iter_mut().zip(&bias).for_each(|(x, b)| *x += b);
                }
            }
            rope(&mut q, hd, pos, &inv_freq);
            rope(&mut k, hd, pos, &inv_freq);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f32; cfg.num_heads * hd];
            for head in 0..cfg.num_heads {
                let kvh = head / g;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += w / sum * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n = rms(x, &fnorm, cfg.rms_norm_eps);
            let gate = matvec(&wg, &n);
            let up = matvec(&wu, &n);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&wd, &act);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let norm = t["model.norm.weight"].to_f32();
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        mat(t, "lm_head.weight")
    };
    xs.iter()
        .map(|x| matvec(&head, &rms(x, &norm, cfg.rms_norm_eps)))
        .collect()
}

fn check(num_heads: usize, num_kv_heads: usize, dtype: DType) {
    check_config(config(num_heads, num_kv_heads), dtype)
}

fn check_config(cfg: ModelConfig, dtype: DType) {
    let num_kv_heads = cfg.num_kv_heads;
    let tensors = dummy::tensors(&cfg, dtype, 11);
    let model = LlamaModel::new(LoadedModel {
        name: "dummy".into(),
        config: cfg.clone(),
        tensors: tensors.clone(),
        tokenizer: None,
        chat_template: None,
    })
    .unwrap();
    let seqs: Vec<Vec<u32>> = vec![
        (0..13).map(|i| (i * 17 + 3) % 256).collect(),
        (0..9).map(|i| (i * 29 + 1) % 256).collect(),
        (0..6).map(|i| (i * 7 + 100) % 256).collect(),
    ];
    let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| reference(&cfg, &tensors, s)).collect();
    let bs = 4;
    // Interleaved, out-of-order block tables.
    let tables: Vec<Vec<u32>> = vec![vec![9, 2, 14, 5], vec![0, 11, 7], vec![13, 3]];
    let mut cache = model.new_kv_cache(16, bs);
    // (sequence, start, end) per step: prefill chunks crossing block boundaries next to decodes.
    let plan: Vec<Vec<(usize, usize, usize)>> = vec![
        vec![(0, 0, 6), (1, 0, 9)],
        vec![(0, 6, 11), (1, 9, 9), (2, 0, 5)],
        vec![(0, 11, 12), (2, 5, 6)],
        vec![(0, 12, 13)],
    ];
    let vocab = cfg.vocab_size;
    let mut compared = 0;
    for step in plan {
        let mut batch = ForwardBatch::default();
        let mut rows = Vec::new();
        for &(s, a, b) in &step {
            if a == b {
                continue;
            }
            let start = batch.num_tokens();
            batch.push_seq(&seqs[s][a..b], a, &tables[s], bs, false);
            rows.extend((a..b).map(|p| (s, p, start + p - a)));
        }
        batch.logits_rows = (0..batch.num_tokens()).collect();
        let logits = model.forward(&batch, &mut cache);
        for (s, p, row) in rows {
            for v in 0..vocab {
                let (got, w) = (logits[row * vocab + v], want[s][p][v]);
                assert!(
                    (got - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "kv={num_kv_heads} seq {s} pos {p} tok {v}: {got} vs {w}"
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 13 + 9 + 6);
}

#[test]
fn mqa_one_kv_head_f32() {
    check(4, 1, DType::F32);
}

#[test]
fn gqa_four_kv_heads_q4_1() {
    check(8, 4, DType::Q4_1);
}

#[test]
fn mha_q8_0() {
    check(4, 4, DType::Q8_0);
}

#[test]
fn qwen2_biases_and_a_separate_output_projection() {
    let cfg = ModelConfig {
        architecture: Architecture::Qwen2,
        tie_word_embeddings: false,
        ..config(4, 2)
    };
    check_config(cfg, DType::Q8_0);
}
