//! The CPU backend: the SIMD kernels of `convoy-kernels` over f32 activations, weights in their
//! stored encoding (f32 or GGML blocks, decoded in registers), K/V in the cache's element type.
//!
//! Invariant: the same operations in the same order as the CPU forward pass has always run, so
//! its logits are bitwise those of every earlier version (the transformers parity tests pin
//! them). The workspace is allocated per pass (zeroed pages from the allocator); the logits
//! buffer is kept between passes and only what it grows by is zeroed.

use std::borrow::BorrowMut;

use convoy_kernels::{self as k, AttentionSeq, AttentionShape, Matrix, QuantizedRows};
use convoy_scheduler::BlockCopy;
use convoy_weights::ModelConfig;

use super::{rope_row, Act, Backend, BackendError, Rows, Weight};
use crate::forward_batch::ForwardBatch;
use crate::kv_cache::{KvCache, KvLayer};
use crate::model::llama::LlamaModel;

const ACTS: usize = 10;

fn slot(a: Act) -> usize {
    a as usize
}

/// The CPU backend over a model's weights and a KV cache (owned, or borrowed as `&mut`).
pub struct CpuBackend<'m, C: BorrowMut<KvCache> = KvCache> {
    model: &'m LlamaModel,
    cache: C,
    acts: [Vec<f32>; ACTS],
    /// q, k and v split out of the QKV rows (the CPU kernels take dense rows).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// RoPE rows of the batch's positions.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Quantised activations, reused by every matrix multiply of the pass.
    xq: QuantizedRows,
    tokens: usize,
    logit_rows: usize,
}

impl<'m, C: BorrowMut<KvCache>> CpuBackend<'m, C> {
    /// A backend running `model` over `cache`.
    pub fn new(model: &'m LlamaModel, cache: C) -> CpuBackend<'m, C> {
        CpuBackend {
            model,
            cache,
            acts: Default::default(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            cos: Vec::new(),
            sin: Vec::new(),
            xq: QuantizedRows::default(),
            tokens: 0,
            logit_rows: 0,
        }
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        self.cache.borrow()
    }

    /// Use `logits` as the buffer the next pass writes its logits into.
    pub fn lend_logits(&mut self, logits: Vec<f32>) {
        self.acts[slot(Act::Logits)] = logits;
    }

    fn rows(&self, rows: Rows) -> usize {
        match rows {
            Rows::Batch => self.tokens,
            Rows::Logits => self.logit_rows,
        }
    }

    fn matrix(&self, w: Weight) -> &'m Matrix {
        let m = self.model;
        match w {
            Weight::LmHead => m.lm_head.as_ref().unwrap_or(&m.embed),
            Weight::Qkv(l) => &m.layers[l].qkv,
            Weight::O(l) => &m.layers[l].o,
            Weight::GateUp(l) => &m.layers[l].gate_up,
            Weight::Down(l) => &m.layers[l].down,
            other => panic!("{other:?} is not a matrix"),
        }
    }

    fn vector(&self, w: Weight) -> &'m [f32] {
        let m = self.model;
        match w {
            Weight::FinalNorm => &m.norm,
            Weight::AttnNorm(l) => &m.layers[l].attn_norm,
            Weight::FfnNorm(l) => &m.layers[l].ffn_norm,
            Weight::QkvBias(l) => m.layers[l].qkv_bias.as_deref().expect("a QKV bias"),
            other => panic!("{other:?} is not a vector"),
        }
    }
}

impl<C: BorrowMut<KvCache>> Backend for CpuBackend<'_, C> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn block_size(&self) -> usize {
        self.cache.borrow().block_size
    }

    fn apply_copies(&mut self, copies: &[BlockCopy]) -> Result<(), BackendError> {
        self.cache.borrow_mut().apply(copies);
        Ok(())
    }

    fn begin_step(&mut self, batch: &ForwardBatch) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let n = batch.num_tokens();
        let m = batch.logits_rows.len();
        let hd = cfg.head_dim;
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let half = hd / 2;
        self.tokens = n;
        self.logit_rows = m;
        for a in Act::ALL {
            let (rows, width) = a.shape(cfg);
            let len = width * if rows == Rows::Batch { n } else { m };
            if a == Act::Logits {
                // Kept between passes: only what it grows by is zeroed.
                self.acts[slot(a)].resize(len, 0.0);
            } else {
                self.acts[slot(a)] = vec![0f32; len];
            }
        }
        self.q = vec![0f32; n * qd];
        self.k = vec![0f32; n * kvd];
        self.v = vec![0f32; n * kvd];
        self.cos = vec![0f32; n * half];
        self.sin = vec![0f32; n * half];
        for (t, &pos) in batch.positions.iter().enumerate() {
            let rows = t * half..(t + 1) * half;
            rope_row(
                pos,
                &self.model.inv_freq,
                &mut self.cos[rows.clone()],
                &mut self.sin[rows],
            );
        }
        Ok(())
    }

    fn embed(&mut self, batch: &ForwardBatch, out: Act) -> Result<(), BackendError> {
        let h = self.model.config.hidden_size;
        let x = &mut self.acts[slot(out)];
        for (t, &id) in batch.input_ids.iter().enumerate() {
            self.model
                .embed
                .row_to_f32(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        Ok(())
    }

    fn rms_norm(&mut self, x: Act, w: Weight, out: Act, _rows: Rows) -> Result<(), BackendError> {
        let eps = self.model.config.rms_norm_eps;
        let w = self.vector(w);
        let mut o = std::mem::take(&mut self.acts[slot(out)]);
        k::rms_norm(&self.acts[slot(x)], w, eps, &mut o);
        self.acts[slot(out)] = o;
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: Act,
        delta: Act,
        w: Weight,
        out: Act,
    ) -> Result<(), BackendError> {
        let eps = self.model.config.rms_norm_eps;
        let w = self.vector(w);
        let mut r = std::mem::take(&mut self.acts[slot(residual)]);
        let mut o = std::mem::take(&mut self.acts[slot(out)]);
        k::add_rms_norm(&mut r, &self.acts[slot(delta)], w, eps, &mut o);
        self.acts[slot(residual)] = r;
        self.acts[slot(out)] = o;
        Ok(())
    }

    fn add(&mut self, residual: Act, delta: Act) -> Result<(), BackendError> {
        let mut r = std::mem::take(&mut self.acts[slot(residual)]);
        k::add_in_place(&mut r, &self.acts[slot(delta)]);
        self.acts[slot(residual)] = r;
        Ok(())
    }

    fn linear(&mut self, x: Act, w: Weight, out: Act, rows: Rows) -> Result<(), BackendError> {
        let n = self.rows(rows);
        let m = self.matrix(w);
        let mut o = std::mem::take(&mut self.acts[slot(out)]);
        k::matmul_with(
            self.model.precision,
            &self.acts[slot(x)],
            n,
            m,
            &mut o,
            &mut self.xq,
        );
        self.acts[slot(out)] = o;
        Ok(())
    }

    fn add_bias(&mut self, x: Act, bias: Weight) -> Result<(), BackendError> {
        let b = self.vector(bias);
        k::add_bias(&mut self.acts[slot(x)], b);
        Ok(())
    }

    fn rope(&mut self, _batch: &ForwardBatch, qkv: Act) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let hd = cfg.head_dim;
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let width = qd + 2 * kvd;
        let rows = &self.acts[slot(qkv)];
        for t in 0..self.tokens {
            let row = &rows[t * width..(t + 1) * width];
            self.q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
            self.k[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
            self.v[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
        }
        k::rope_half_split(&mut self.q, hd, cfg.num_heads, &self.cos, &self.sin);
        k::rope_half_split(&mut self.k, hd, cfg.num_kv_heads, &self.cos, &self.sin);
        Ok(())
    }

    fn write_kv(
        &mut self,
        batch: &ForwardBatch,
        layer: usize,
        _qkv: Act,
    ) -> Result<(), BackendError> {
        self.cache
            .borrow_mut()
            .write(layer, &batch.slot_mapping, &self.k, &self.v);
        Ok(())
    }

    fn attention(
        &mut self,
        batch: &ForwardBatch,
        layer: usize,
        _qkv: Act,
        out: Act,
    ) -> Result<(), BackendError> {
        let cfg = &self.model.config;
        let cache = self.cache.borrow();
        let seqs: Vec<AttentionSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| AttentionSeq {
                block_table: &s.block_table,
                query_start: s.query_start,
                num_queries: s.num_queries,
                context_len: s.context_len,
            })
            .collect();
        let shape = AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size: cache.block_size,
        };
        let attn = &mut self.acts[slot(out)];
        match cache.layer(layer) {
            KvLayer::F32 { k: kc, v: vc } => {
                k::paged_attention(&self.q, kc, vc, shape, &seqs, attn)
            }
            KvLayer::F16 { k: kc, v: vc } => {
                k::paged_attention(&self.q, kc, vc, shape, &seqs, attn)
            }
            KvLayer::Fp8E4m3 { k: kc, v: vc } => {
                k::paged_attention(&self.q, kc, vc, shape, &seqs, attn)
            }
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: Act, out: Act) -> Result<(), BackendError> {
        let inter = self.model.config.intermediate_size;
        let mut o = std::mem::take(&mut self.acts[slot(out)]);
        k::silu_mul_rows(&self.acts[slot(gate_up)], inter, &mut o);
        self.acts[slot(out)] = o;
        Ok(())
    }

    fn gather_logit_rows(
        &mut self,
        batch: &ForwardBatch,
        x: Act,
        out: Act,
    ) -> Result<(), BackendError> {
        let h = self.model.config.hidden_size;
        let mut o = std::mem::take(&mut self.acts[slot(out)]);
        let src = &self.acts[slot(x)];
        for (i, &r) in batch.logits_rows.iter().enumerate() {
            o[i * h..(i + 1) * h].copy_from_slice(&src[r * h..(r + 1) * h]);
        }
        self.acts[slot(out)] = o;
        Ok(())
    }

    fn read_logits(&mut self, logits: &mut Vec<f32>) -> Result<(), BackendError> {
        // The caller's old buffer becomes the next pass's: neither is zeroed again.
        std::mem::swap(logits, &mut self.acts[slot(Act::Logits)]);
        Ok(())
    }
}
