//! The backend seam: the forward pass is written once ([`forward`]) against [`Backend`], a set
//! of fused layer operations over named activations ([`Act`]) and weights ([`Weight`]); each
//! backend owns its weights, its KV storage in its own layout and its workspace.
//!
//! - [`cpu::CpuBackend`]: the SIMD CPU kernels over f32 activations and weights in their stored
//!   encoding; K/V in the cache's element type.
//! - [`cuda::CudaBackend`]: the CUDA kernels and cuBLAS's GEMM contract over a
//!   [`convoy_kernels::cuda::device::DeviceLayer`], the same code on a GPU and on the emulated
//!   device (`--device cuda-emulated`); bf16 weights and K/V, f32 activations.
//!
//! Invariants: [`Backend::begin_step`] is called once per forward pass, before any operation,
//! with the batch every operation of that pass receives; an operation reads only activations
//! written earlier in the same pass; [`Backend::read_logits`] or [`Backend::sampled_ids`] (after
//! [`Backend::stage_draws`] before the pass and [`Backend::launch_sample_rows`] after it) ends
//! the pass. Only those two wait for the pass: a device's operations are queued, and the host
//! works while they run.

pub mod cpu;
pub mod cuda;
mod forward;

pub use forward::{forward, run_begun_pass, run_layers};

use convoy_scheduler::BlockCopy;
use convoy_weights::ModelConfig;

use crate::forward_batch::ForwardBatch;

/// An activation buffer of the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The residual stream, `[tokens][hidden]`.
    Residual,
    /// A normalised copy of the residual, `[tokens][hidden]`.
    Normed,
    /// The fused QKV projection, `[tokens][q | k | v]`.
    Qkv,
    /// Attention output, `[tokens][heads * head_dim]`.
    Attn,
    /// Output of the attention or MLP projection, `[tokens][hidden]`.
    Proj,
    /// The fused gate/up projection, `[tokens][gate | up]`.
    GateUp,
    /// The gated MLP activation, `[tokens][intermediate]`.
    Mlp,
    /// The residual rows whose logits are wanted, `[logit rows][hidden]`.
    Last,
    /// Their final norm, `[logit rows][hidden]`.
    LastNormed,
    /// Logits, `[logit rows][vocab]`.
    Logits,
}

impl Act {
    /// Every activation, in `Act as usize` order.
    pub const ALL: [Act; 10] = [
        Act::Residual,
        Act::Normed,
        Act::Qkv,
        Act::Attn,
        Act::Proj,
        Act::GateUp,
        Act::Mlp,
        Act::Last,
        Act::LastNormed,
        Act::Logits,
    ];

    /// Which rows this activation has, and how many values each row holds, for `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (Rows, usize) {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        match self {
            Act::Residual | Act::Normed | Act::Proj => (Rows::Batch, h),
            Act::Qkv => (Rows::Batch, qd + 2 * kvd),
            Act::Attn => (Rows::Batch, qd),
            Act::GateUp => (Rows::Batch, 2 * cfg.intermediate_size),
            Act::Mlp => (Rows::Batch, cfg.intermediate_size),
            Act::Last | Act::LastNormed => (Rows::Logits, h),
            Act::Logits => (Rows::Logits, cfg.vocab_size),
        }
    }
}

/// RoPE's cos and sin at `pos` for each inverse frequency, as every backend computes them
/// (a float32 angle, float32 cos and sin: transformers' arithmetic).
pub fn rope_row(pos: u32, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.iter().zip(cos).zip(sin) {
        let angle = pos as f32 * f;
        *c = angle.cos();
        *s = angle.sin();
    }
}

/// Which rows an operation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Every token of the batch.
    Batch,
    /// The rows whose logits are wanted.
    Logits,
}

/// A weight of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// The final norm.
    FinalNorm,
    /// The output projection (the embedding when tied).
    LmHead,
    /// Layer `l`'s attention norm.
    AttnNorm(usize),
    /// Layer `l`'s MLP norm.
    FfnNorm(usize),
    /// Layer `l`'s fused Q, K, V projection.
    Qkv(usize),
    /// Layer `l`'s fused QKV bias (Qwen2).
    QkvBias(usize),
    /// Layer `l`'s attention output projection.
    O(usize),
    /// Layer `l`'s fused gate and up projection.
    GateUp(usize),
    /// Layer `l`'s down projection.
    Down(usize),
}

/// One logits row's draw on the device: greedy at temperature 0, else the keyed Gumbel-max
/// draw of `crate::sampler::sample` (the same arithmetic on every backend).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDraw {
    /// 0 for greedy.
    pub temperature: f32,
    /// Candidates by logit (0: every token).
    pub top_k: u32,
    /// Share of the candidates' probability kept (1: all).
    pub top_p: f32,
    /// The request's seed.
    pub seed: u64,
    /// Tokens the request has sampled so far.
    pub step: u64,
}

/// Why a backend could not run a model or a step.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot run this model (head dimension, group size, dtype, size).
    #[error("the {backend} backend cannot run this model: {reason}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What it cannot do.
        reason: String,
    },
    /// A call came out of the order the backend's contract sets.
    #[error("the {backend} backend was called out of order: {what}")]
    OutOfOrder {
        /// Backend name.
        backend: &'static str,
        /// What came out of order.
        what: &'static str,
    },
    /// A device operation failed.
    #[error("{backend}: {source}")]
    Device {
        /// Backend name.
        backend: &'static str,
        /// The device's error.
        #[source]
        source: convoy_kernels::cuda::device::DeviceError,
    },
}

/// Fused layer operations of a Llama-family decoder, the KV storage they use, and the copies
/// the scheduler orders between its blocks.
pub trait Backend {
    /// Name for messages (`cpu`, `cuda`, `cuda-emulated`).
    fn name(&self) -> &'static str;
    /// The model's shape.
    fn config(&self) -> &ModelConfig;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// Copy KV blocks between and within tiers (all layers, K and V), in order.
    fn apply_copies(&mut self, copies: &[BlockCopy]) -> Result<(), BackendError>;
    /// Prepare a forward pass over `batch`: size the workspace, turn the batch into the
    /// backend's step metadata (positions, slots, block tables, RoPE rows) once.
    fn begin_step(&mut self, batch: &ForwardBatch) -> Result<(), BackendError>;
    /// Run the operations of the pass begun by [`Backend::begin_step`] (`pass`); a backend
    /// that records passes may replay its recording of an earlier pass of the same shape
    /// instead (the CUDA backend's decode graphs). The default runs `pass`.
    fn run_pass(
        &mut self,
        pass: &mut dyn FnMut(&mut Self) -> Result<(), BackendError>,
    ) -> Result<(), BackendError>
    where
        Self: Sized,
    {
        pass(self)
    }
    /// `out = embedding rows of the batch's tokens`.
    fn embed(&mut self, batch: &ForwardBatch, out: Act) -> Result<(), BackendError>;
    /// `out = rmsnorm(x) * w`.
    fn rms_norm(&mut self, x: Act, w: Weight, out: Act, rows: Rows) -> Result<(), BackendError>;
    /// `residual += delta; out = rmsnorm(residual) * w`.
    fn add_rms_norm(
        &mut self,
        residual: Act,
        delta: Act,
        w: Weight,
        out: Act,
    ) -> Result<(), BackendError>;
    /// `residual += delta`.
    fn add(&mut self, residual: Act, delta: Act) -> Result<(), BackendError>;
    /// `out = x . w^T`.
    fn linear(&mut self, x: Act, w: Weight, out: Act, rows: Rows) -> Result<(), BackendError>;
    /// `x += bias` on every row.
    fn add_bias(&mut self, x: Act, bias: Weight) -> Result<(), BackendError>;
    /// RoPE in place on the q and k parts of the fused QKV rows, at the batch's positions.
    fn rope(&mut self, batch: &ForwardBatch, qkv: Act) -> Result<(), BackendError>;
    /// Write the k and v parts of the QKV rows to layer `layer`'s cache at the batch's slots.
    fn write_kv(
        &mut self,
        batch: &ForwardBatch,
        layer: usize,
        qkv: Act,
    ) -> Result<(), BackendError>;
    /// Paged attention of the q parts of the QKV rows over layer `layer`'s cache.
    fn attention(
        &mut self,
        batch: &ForwardBatch,
        layer: usize,
        qkv: Act,
        out: Act,
    ) -> Result<(), BackendError>;
    /// `out = silu(gate) * up`.
    fn silu_mul(&mut self, gate_up: Act, out: Act) -> Result<(), BackendError>;
    /// `out = the rows of x whose logits are wanted`.
    fn gather_logit_rows(
        &mut self,
        batch: &ForwardBatch,
        x: Act,
        out: Act,
    ) -> Result<(), BackendError>;
    /// Hand the pass's logits (`[logit rows][vocab]`) to the host, in `logits`.
    fn read_logits(&mut self, logits: &mut Vec<f32>) -> Result<(), BackendError>;
    /// Device KV blocks, where the backend sized them itself (a share of a GPU's memory).
    fn kv_blocks(&self) -> Option<usize> {
        None
    }
    /// Whether a pass runs apart from the calling thread (a GPU's stream): the operations
    /// above then only queue it. Where it runs on the calling thread (the CPU, the emulated
    /// device), the operations return once it has run.
    fn computes_apart(&self) -> bool {
        false
    }
    /// Upload the draws (one per logits row) of the pass about to run, before it runs, so
    /// only token ids cross back; `false` where the backend samples on the host (the caller
    /// then reads the logits). Uploads before the pass wait for nothing on a device whose
    /// stream is idle; after it, they would wait for the whole pass.
    fn stage_draws(&mut self, draws: &[RowDraw]) -> Result<bool, BackendError> {
        let _ = draws;
        Ok(false)
    }
    /// Start the draws [`Backend::stage_draws`] uploaded over the logits of the pass just run
    /// (one per logits row); [`Backend::sampled_ids`] waits for the ids.
    fn launch_sample_rows(&mut self) -> Result<(), BackendError> {
        Err(BackendError::OutOfOrder {
            backend: self.name(),
            what: "a device draw launched, but this backend samples on the host",
        })
    }
    /// The token ids the draw started by [`Backend::launch_sample_rows`] gave, one per row, in
    /// `ids`; waits for the device.
    fn sampled_ids(&mut self, ids: &mut Vec<u32>) -> Result<(), BackendError> {
        let _ = ids;
        Err(BackendError::OutOfOrder {
            backend: self.name(),
            what: "token ids asked for, but this backend samples on the host",
        })
    }
}
