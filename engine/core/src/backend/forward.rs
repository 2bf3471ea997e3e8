//! The Llama-family forward pass, once, for every backend.
//!
//! Per layer: (attention norm, fused with the previous layer's residual add) one fused QKV
//! projection (+ bias for Qwen2), RoPE, K/V written by slot mapping, paged attention, output
//! projection, residual add fused with the MLP norm, one fused gate/up projection, SiLU gate,
//! down projection. Logits only for `ForwardBatch::logits_rows`: those residual rows are
//! gathered before the final norm and the output projection.

use convoy_weights::ModelConfig;

use super::{Act, Backend, BackendError, Rows, Weight};
use crate::forward_batch::ForwardBatch;

/// Run one forward pass of `batch` on `b`; `logits` ends up `logits_rows.len() x vocab`.
pub fn forward<B: Backend>(
    b: &mut B,
    batch: &ForwardBatch,
    logits: &mut Vec<f32>,
) -> Result<(), BackendError> {
    run_layers(b, batch)?;
    b.read_logits(logits)
}

/// Run one forward pass of `batch` on `b`, leaving the logits on the backend (for
/// [`Backend::launch_sample_rows`] or [`Backend::read_logits`]).
pub fn run_layers<B: Backend>(b: &mut B, batch: &ForwardBatch) -> Result<(), BackendError> {
    b.begin_step(batch)?;
    run_begun_pass(b, batch)
}

/// Run the layers of the pass [`Backend::begin_step`] prepared for `batch`. Between the two a
/// caller may queue work the pass must follow (the step's block copies), after the step's
/// uploads, which on a GPU would otherwise wait for that work.
pub fn run_begun_pass<B: Backend>(b: &mut B, batch: &ForwardBatch) -> Result<(), BackendError> {
    b.run_pass(&mut |b| layers(b, batch))
}

/// The operations of one pass, after `begin_step`.
pub(crate) fn layers<B: Backend>(b: &mut B, batch: &ForwardBatch) -> Result<(), BackendError> {
    let cfg: &ModelConfig = b.config();
    let (layers, bias) = (cfg.num_layers, cfg.architecture.has_qkv_bias());
    b.embed(batch, Act::Residual)?;
    if layers > 0 {
        b.rms_norm(Act::Residual, Weight::AttnNorm(0), Act::Normed, Rows::Batch)?;
    }
    for l in 0..layers {
        // `Normed` holds this layer's attention norm of the residual.
        b.linear(Act::Normed, Weight::Qkv(l), Act::Qkv, Rows::Batch)?;
        if bias {
            b.add_bias(Act::Qkv, Weight::QkvBias(l))?;
        }
        b.rope(batch, Act::Qkv)?;
        b.write_kv(batch, l, Act::Qkv)?;
        b.attention(batch, l, Act::Qkv, Act::Attn)?;
        b.linear(Act::Attn, Weight::O(l), Act::Proj, Rows::Batch)?;
        b.add_rms_norm(Act::Residual, Act::Proj, Weight::FfnNorm(l), Act::Normed)?;
        b.linear(Act::Normed, Weight::GateUp(l), Act::GateUp, Rows::Batch)?;
        b.silu_mul(Act::GateUp, Act::Mlp)?;
        b.linear(Act::Mlp, Weight::Down(l), Act::Proj, Rows::Batch)?;
        if l + 1 < layers {
            b.add_rms_norm(
                Act::Residual,
                Act::Proj,
                Weight::AttnNorm(l + 1),
                Act::Normed,
            )?;
        } else {
            b.add(Act::Residual, Act::Proj)?;
        }
    }
    b.gather_logit_rows(batch, Act::Residual, Act::Last)?;
    b.rms_norm(Act::Last, Weight::FinalNorm, Act::LastNormed, Rows::Logits)?;
    b.linear(Act::LastNormed, Weight::LmHead, Act::Logits, Rows::Logits)
}
