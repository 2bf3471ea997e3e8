//! The CUDA backend on the emulated device (`--device cuda-emulated`: convoy's `.cu` kernels
//! run on the CPU) against the CPU backend, on whole models: glassllm and SmolLM2 logits within
//! bf16 tolerance, and greedy tokens equal wherever the CPU's top two are further apart than
//! that tolerance.

use convoy_engine::backend::cuda::CudaBackend;
use convoy_engine::backend::forward;
use convoy_engine::Device;
use convoy_engine::{ForwardBatch, LlamaModel};
use convoy_kernels::cuda::emulator::EmulatedDevice;
use convoy_tests::guarantees::{
    assert_cached_equals_recomputed, assert_together_equals_alone, Scale,
};
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

// The guarantees, generic over the backend: the same functions the CPU's test files call.

#[test]
fn on_the_emulated_cuda_backend_a_sequence_does_not_depend_on_its_batch() {
    let (model, codec) = load(&smollm2_path());
    assert_together_equals_alone(Device::CudaEmulated, &model, &codec, Scale::EMULATED);
}

#[test]
fn on_the_emulated_cuda_backend_cached_equals_recomputed() {
    let (model, codec) = load(&smollm2_path());
    assert_cached_equals_recomputed(Device::CudaEmulated, &model, &codec, &[16], Scale::EMULATED);
}

/// The bf16 tolerance of SmolLM2's logits on the CUDA backend: above the largest difference
/// from the CPU measured on these prompts (0.27), below any margin that decides a token.
const LOGIT_TOLERANCE: f32 = 0.5;

fn top_two(row: &[f32]) -> (usize, f32) {
    let mut best = (0usize, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

#[test]
fn smollm2_greedy_tokens_match_the_cpu_wherever_its_top_two_are_apart() {
    let (model, codec) = load(&smollm2_path());
    let reference = convoy_tests::smollm2_reference();
    let cases = convoy_tests::reference_cases(&codec, &reference);
    let (bs, blocks) = (16usize, 32usize);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let (mut compared, mut steps) = (0, 0);
    for case in cases.iter().take(3) {
        let mut cpu_cache = model.new_kv_cache(blocks, bs);
        let mut cuda = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 256).unwrap();
        let mut tokens = case.prompt_ids.clone();
        let mut computed = 0;
        for step in 0..12 {
            let mut batch = ForwardBatch::default();
            batch.push_seq(&tokens[computed..], computed, &table, bs, true);
            let cpu = model.forward(&batch, &mut cpu_cache);
            let mut gpu = Vec::new();
            forward(&mut cuda, &batch, &mut gpu).unwrap();
            let worst = cpu
                .iter()
                .zip(&gpu)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < LOGIT_TOLERANCE,
                "step {step}: logits differ by {worst}"
            );
            let (cpu_token, margin) = top_two(&cpu);
            let (gpu_token, _) = top_two(&gpu);
            steps += 1;
            if margin > 2.0 * LOGIT_TOLERANCE {
                compared += 1;
                assert_eq!(gpu_token, cpu_token, "step {step}: CPU margin {margin}");
            }
            // Both continue with the CPU's token, so every step compares the same context.
            computed = tokens.len();
            tokens.push(cpu_token as u32);
        }
    }
    eprintln!(
        "greedy: {compared} of {steps} steps had a CPU margin above {}",
        2.0 * LOGIT_TOLERANCE
    );
    assert!(
        compared * 2 >= steps,
        "only {compared} of {steps} steps were decisive"
    );
}
