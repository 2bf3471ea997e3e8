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
    both_on(EmulatedDevice::new(), model, prompt, bs)
}

/// As [`both`], the CUDA backend on `device`.
fn both_on(
    device: EmulatedDevice,
    model: &LlamaModel,
    prompt: &[u32],
    bs: usize,
) -> (Vec<f32>, Vec<f32>) {
    let blocks = prompt.len().div_ceil(bs) + 2;
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(prompt, 0, &table, bs, false);
    batch.logits_rows = (0..prompt.len()).collect();
    let mut cache = model.new_kv_cache(blocks, bs);
    let cpu = model.forward(&batch, &mut cache);
    let mut cuda = CudaBackend::new(device, model, blocks, 0, bs, 64)
        .expect("the CUDA backend runs this model");
    let mut gpu = Vec::new();
    forward(&mut cuda, &batch, &mut gpu).expect("the emulated pass runs");
    (cpu, gpu)
}

/// Normalised mean squared error of `got` against `want` (no NaN on either side, which
/// would fail), and the largest absolute difference.
fn nmse(want: &[f32], got: &[f32]) -> (f64, f64) {
    let (e, nan) = convoy_kernels::cuda::op_cases::nmse(want, got);
    assert_eq!(nan, 0, "NaN where the other backend has a number");
    let worst = want
        .iter()
        .zip(got)
        .map(|(w, g)| (g - w).abs() as f64)
        .fold(0.0, f64::max);
    (e, worst)
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

/// A batch whose sequence rows are not its context's last positions in order (what the
/// attention tiles rely on) is refused before anything runs, never computed wrongly.
#[test]
fn a_batch_with_a_sequence_s_rows_out_of_order_is_refused() {
    use convoy_engine::backend::BackendError;
    let (model, _) = load(&glassllm_path());
    let mut cuda = CudaBackend::new(EmulatedDevice::new(), &model, 8, 0, 4, 16).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push_seq(&[5, 9, 14], 0, &[3], 4, true);
    batch.positions.swap(0, 2);
    let mut logits = Vec::new();
    match forward(&mut cuda, &batch, &mut logits) {
        Err(BackendError::Unsupported { reason, .. }) => {
            assert!(reason.contains("row 0 is not position 0"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(logits.is_empty());
}

/// On a card without tensor cores attention runs on the CUDA-core kernel; the model still
/// matches the CPU. The two kernels agree within float rounding (kernels/tests), which the
/// bf16 KV cache turns into bf16-sized differences of the logits: within the same tolerance.
#[test]
fn smollm2_logits_match_the_cpu_on_a_device_without_tensor_cores() {
    let (model, codec) = load(&smollm2_path());
    let prompt = codec
        .encode("In a quiet village by the sea, the fishermen")
        .unwrap();
    let (cpu, fallback) = both_on(EmulatedDevice::without_tensor_cores(), &model, &prompt, 16);
    let (e, worst) = nmse(&cpu, &fallback);
    eprintln!("smollm2 without tensor cores: NMSE {e:.3e}, max abs {worst:.3e}");
    assert!(e < 1e-3, "NMSE {e}");
    let (_, tensor_cores) = both(&model, &prompt, 16);
    let (e, worst) = nmse(&fallback, &tensor_cores);
    eprintln!("tensor cores against CUDA cores: NMSE {e:.3e}, max abs {worst:.3e}");
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

/// A dummy Llama-3 model with Llama-3-8B's attention geometry (32 query heads of 128, rope
/// theta 500,000 with Llama-3 scaling) and `kv_heads` KV heads, narrowed elsewhere (hidden 512,
/// MLP 1,024, vocabulary 2,048, 2 layers) so the emulator runs it in seconds; bf16 weights.
fn llama3_attention_shape(kv_heads: usize) -> LlamaModel {
    let cfg = convoy_weights::ModelConfig::from_hf_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": kv_heads,
        "head_dim": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    }))
    .expect("a valid config");
    let tensors = convoy_weights::dummy::tensors(&cfg, convoy_weights::DType::BF16, 7);
    LlamaModel::new(convoy_weights::loader::LoadedModel {
        name: format!("dummy-llama3-kv{kv_heads}"),
        config: cfg,
        tensors,
        tokenizer: None,
        chat_template: None,
    })
    .expect("the dummy model builds")
}

/// Two sequences at once, one decoding after a 300-token cached prefix (two attention
/// partitions) and one prefilling 40 tokens, on both backends: every logit row compared.
fn dummy_model_matches(kv_heads: usize) -> f64 {
    let model = llama3_attention_shape(kv_heads);
    let bs = 16;
    let blocks = 48;
    let mut cpu_cache = model.new_kv_cache(blocks, bs);
    let mut cuda = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 512).unwrap();
    let long: Vec<u32> = (0..301).map(|i| (i * 37 % 2000) as u32 + 5).collect();
    let short: Vec<u32> = (0..40).map(|i| (i * 11 % 2000) as u32 + 3).collect();
    let table_a: Vec<u32> = (0..20).map(|b| 47 - b).collect();
    let table_b: Vec<u32> = (20..23).collect();
    // The long sequence's prefix first (its own pass), then a mixed step.
    let mut prefix = ForwardBatch::default();
    prefix.push_seq(&long[..300], 0, &table_a, bs, true);
    let mut step = ForwardBatch::default();
    step.push_seq(&long[300..], 300, &table_a, bs, true);
    step.push_seq(&short, 0, &table_b, bs, false);
    step.logits_rows.extend(1..41); // every row of the prefill
    let mut worst = 0f64;
    for batch in [&prefix, &step] {
        let cpu = model.forward(batch, &mut cpu_cache);
        let mut gpu = Vec::new();
        forward(&mut cuda, batch, &mut gpu).unwrap();
        let (e, _) = nmse(&cpu, &gpu);
        worst = worst.max(e);
    }
    worst
}

#[test]
fn a_dummy_llama3_gqa_model_matches_the_cpu() {
    let e = dummy_model_matches(8);
    eprintln!("dummy Llama-3 GQA (32/8 heads): NMSE {e:.3e}");
    assert!(e < 1e-3, "NMSE {e}");
}

#[test]
fn a_dummy_llama3_mqa_model_matches_the_cpu() {
    let e = dummy_model_matches(1);
    eprintln!("dummy Llama-3 MQA (32/1 heads): NMSE {e:.3e}");
    assert!(e < 1e-3, "NMSE {e}");
}

/// A seeded draw gives the same token on both backends: the host sampler and the device's
/// `gumbel_sample_rows` compute the same keyed Gumbel-max over the same top-k and top-p
/// candidates, so an answer sampled on a GPU can be reproduced on a laptop. Rows cover every
/// filter alone and together, ties (logits on a grid of quarters), NaN and -inf entries.
#[test]
fn a_seed_draws_the_same_token_on_the_host_and_the_device() {
    use convoy_kernels::cuda::device::{launch, DeviceLayer, DeviceMemory};
    use convoy_kernels::cuda::launch::GumbelSampleRows;
    use convoy_scheduler::SamplingSpec;
    let dev = EmulatedDevice::new();
    let (rows, vocab) = (160usize, 5000usize);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
    };
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| next()).collect();
    for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
        match r % 4 {
            // Ties: quarters, so hundreds of tokens share each logit.
            1 => row.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0),
            // NaN and -inf entries, one NaN among the largest.
            2 => {
                row.iter_mut().step_by(7).for_each(|v| *v = f32::NAN);
                row.iter_mut()
                    .skip(3)
                    .step_by(11)
                    .for_each(|v| *v = f32::NEG_INFINITY);
                row[10] = f32::NAN;
            }
            _ => {}
        }
    }
    let temps: Vec<f32> = (0..rows)
        .map(|r| [0.0, 0.3, 0.7, 1.0, 1.6][r % 5])
        .collect();
    let top_k: Vec<i32> = (0..rows)
        .map(|r| [0, 1, 5, 50, 4999, 0, 300][r % 7])
        .collect();
    let top_p: Vec<f32> = (0..rows)
        .map(|r| [1.0, 0.9, 0.5, 0.95, 0.0, 0.999][r % 6])
        .collect();
    let seeds: Vec<u64> = (0..rows as u64).map(|r| r * 1_000_003 + 11).collect();
    let steps: Vec<u64> = (0..rows as u64).map(|r| r % 7).collect();
    let (l, t, k, p) = (
        dev.upload(&logits).unwrap(),
        dev.upload(&temps).unwrap(),
        dev.upload(&top_k).unwrap(),
        dev.upload(&top_p).unwrap(),
    );
    let (s, st) = (dev.upload(&seeds).unwrap(), dev.upload(&steps).unwrap());
    let out = dev.alloc(rows * 4).unwrap();
    let launch_args = GumbelSampleRows {
        logits: l.slice(),
        temperature: t.slice(),
        top_k: k.slice(),
        top_p: p.slice(),
        seeds: s.slice(),
        steps: st.slice(),
        out: out.slice(),
        vocab,
        rows,
        threads: 1024,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(&dev, &launch_args) }.unwrap();
    let device: Vec<i32> = dev.download(&out).unwrap();
    let mut filtered = 0;
    for r in 0..rows {
        let spec = SamplingSpec {
            temperature: temps[r],
            top_k: top_k[r] as usize,
            top_p: top_p[r],
            ..Default::default()
        };
        filtered += usize::from(!spec.is_greedy() && (spec.top_k > 0 || spec.top_p < 1.0));
        let row = &logits[r * vocab..(r + 1) * vocab];
        let host = convoy_engine::sampler::sample(row, &spec, seeds[r], steps[r]);
        assert_eq!(
            device[r] as u32, host,
            "row {r}: temperature {}, top-k {}, top-p {}",
            temps[r], top_k[r], top_p[r]
        );
        assert!(!row[host as usize].is_nan(), "row {r} drew a NaN logit");
    }
    assert!(filtered >= 100, "{filtered} rows exercise top-k or top-p");
}

/// Run `batch` on both backends; the logits must be bitwise equal.
fn run_both(
    eager: &mut CudaBackend<EmulatedDevice>,
    graphed: &mut CudaBackend<EmulatedDevice>,
    batch: &ForwardBatch,
) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    forward(eager, batch, &mut a).unwrap();
    forward(graphed, batch, &mut b).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "a graphed pass differs from the eager one"
    );
}

/// Block tables of 20 blocks for `seqs` sequences, each in reverse order (no sequence's blocks
/// are contiguous).
fn reversed_tables(seqs: usize) -> Vec<Vec<u32>> {
    (0..seqs as u32)
        .map(|s| (0..20).map(|b| s * 20 + 19 - b).collect())
        .collect()
}

/// Prefill each sequence alone on both backends: sequence `s` gets `6 + grow * s` tokens,
/// token `i` being `(i * mul + s) % 200 + 3`; `lens` takes the prompts' lengths.
fn prefill_each(
    eager: &mut CudaBackend<EmulatedDevice>,
    graphed: &mut CudaBackend<EmulatedDevice>,
    tables: &[Vec<u32>],
    lens: &mut [usize],
    bs: usize,
    (grow, mul): (usize, usize),
) {
    for (s, len) in lens.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..6 + grow * s)
            .map(|i| (i * mul + s) as u32 % 200 + 3)
            .collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(&prompt, 0, &tables[s], bs, true);
        run_both(eager, graphed, &batch);
        *len = prompt.len();
    }
}

/// One decode step of the `active` sequences (block tables `tables`, lengths `lens`).
fn decode_step(
    active: &[usize],
    tables: &[Vec<u32>],
    lens: &mut [usize],
    bs: usize,
) -> ForwardBatch {
    let mut batch = ForwardBatch::default();
    for &s in active {
        let token = (lens[s] * 13 + s) as u32 % 200 + 3;
        let blocks = (lens[s] + 1).div_ceil(bs);
        batch.push_seq(&[token], lens[s], &tables[s][..blocks], bs, true);
        lens[s] += 1;
    }
    batch
}

/// Decode passes run as graph replays (padded to their bucket) give exactly the logits of
/// eager passes; each bucket is recorded once, and recorded again after the workspace moves;
/// a context past the graphed one runs eagerly.
#[test]
fn decode_graphs_replay_exactly_what_eager_passes_compute() {
    use convoy_engine::backend::cuda::{GraphPolicy, GraphStats};
    let (model, _) = load(&glassllm_path());
    let (bs, blocks, seqs) = (4, 100, 5);
    let backend = |policy: GraphPolicy| {
        let mut b = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 16).unwrap();
        b.set_graph_policy(policy).unwrap();
        b
    };
    let (mut eager, mut graphed) = (
        backend(GraphPolicy::eager()),
        backend(GraphPolicy::new(16, 64)),
    );
    let tables = reversed_tables(seqs);
    let mut lens = vec![0usize; seqs];
    // Prefills (eager on both), one sequence per pass.
    prefill_each(&mut eager, &mut graphed, &tables, &mut lens, bs, (3, 7));
    // Buckets 8, 4, 1, 8, 2, 8: each bucket's first pass runs eagerly and is recorded (four
    // graphs); the later passes of bucket 8 replay.
    for active in [
        &[0, 1, 2, 3, 4][..],
        &[0, 2, 4],
        &[3],
        &[0, 1, 2, 3, 4],
        &[1, 4],
        &[0, 1, 2, 3, 4],
    ] {
        run_both(
            &mut eager,
            &mut graphed,
            &decode_step(active, &tables, &mut lens, bs),
        );
    }
    assert_eq!(
        graphed.graph_stats(),
        GraphStats {
            recorded: 4,
            replayed: 2
        }
    );
    // A 44-token pass outgrows the 16-token workspace: the buffers move, so bucket 4 is
    // recorded again (and then replayed) rather than replayed with the old addresses.
    let long: Vec<u32> = (0..44).map(|i| i as u32 % 200 + 3).collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(&long, lens[4], &tables[4], bs, true);
    lens[4] += long.len();
    run_both(&mut eager, &mut graphed, &batch);
    for _ in 0..2 {
        run_both(
            &mut eager,
            &mut graphed,
            &decode_step(&[0, 1, 2], &tables, &mut lens, bs),
        );
    }
    assert_eq!(
        graphed.graph_stats(),
        GraphStats {
            recorded: 5,
            replayed: 3
        }
    );
    // Sequence 4 is now past the graphed 64 tokens of context: eager, and still equal.
    run_both(
        &mut eager,
        &mut graphed,
        &decode_step(&[0, 4], &tables, &mut lens, bs),
    );
    assert_eq!(
        graphed.graph_stats(),
        GraphStats {
            recorded: 5,
            replayed: 3
        }
    );
}

/// Graphs recorded before serving (as a runner does at startup) replay from each bucket's
/// first decode pass, with no recording while serving, bitwise as eager passes compute.
#[test]
fn decode_graphs_recorded_at_startup_replay_from_the_first_step() {
    use convoy_engine::backend::cuda::{GraphPolicy, GraphStats};
    let (model, _) = load(&glassllm_path());
    let (bs, blocks, seqs) = (4, 100, 5);
    let mut eager = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 16).unwrap();
    eager.set_graph_policy(GraphPolicy::eager()).unwrap();
    let mut graphed = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 16).unwrap();
    let policy = GraphPolicy::new(16, 64);
    graphed.set_graph_policy(policy).unwrap();
    // Buckets 1, 2, 4, 8 and 16.
    assert_eq!(graphed.record_decode_graphs().unwrap(), 5);
    assert_eq!(eager.record_decode_graphs().unwrap(), 0);
    let tables = reversed_tables(seqs);
    let mut lens = vec![0usize; seqs];
    // Prefills within the 16-token workspace: no buffer moves.
    prefill_each(&mut eager, &mut graphed, &tables, &mut lens, bs, (2, 5));
    for active in [&[0, 1, 2, 3, 4][..], &[0, 2, 4], &[3], &[1, 4]] {
        run_both(
            &mut eager,
            &mut graphed,
            &decode_step(active, &tables, &mut lens, bs),
        );
    }
    assert_eq!(
        graphed.graph_stats(),
        GraphStats {
            recorded: 5,
            replayed: 4
        }
    );
}

/// Seeded requests with top-k and top-p, served on the emulated CUDA backend, sample on the
/// device (only token ids cross); every token is the host sampler's draw from the logits a
/// single pass over the prompt and the output computes at that position.
#[test]
fn top_k_and_top_p_requests_sample_on_the_device_as_the_host_would() {
    use convoy_engine::{GenerationRequest, Generator, GeneratorConfig, SamplingParams};
    use convoy_scheduler::SamplingSpec;
    let (model, codec) = load(&glassllm_path());
    let prompt = codec.encode("Once upon a time there was").unwrap();
    let filters = [(0, 0.8, 1u64), (20, 1.0, 2), (30, 0.7, 3), (5, 0.9, 4)];
    let requests: Vec<GenerationRequest> = filters
        .iter()
        .map(|&(top_k, top_p, seed)| GenerationRequest {
            prompt_ids: prompt.clone(),
            params: SamplingParams {
                temperature: 0.9,
                top_k,
                top_p,
                seed: Some(seed),
                max_tokens: 10,
                ignore_eos: true,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let bs = 4;
    let results = Generator::on_device(
        Device::CudaEmulated,
        &model,
        codec,
        GeneratorConfig::new(256, bs),
    )
    .unwrap()
    .run(&requests, |_, _| {})
    .unwrap();
    let vocab = model.config.vocab_size;
    for (&(top_k, top_p, seed), r) in filters.iter().zip(&results) {
        let ids: Vec<u32> = prompt.iter().chain(&r.output_ids).copied().collect();
        let blocks = ids.len().div_ceil(bs);
        let table: Vec<u32> = (0..blocks as u32).collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(&ids[..ids.len() - 1], 0, &table, bs, false);
        batch.logits_rows = (prompt.len() - 1..ids.len() - 1).collect();
        let mut cuda = CudaBackend::new(EmulatedDevice::new(), &model, blocks, 0, bs, 64).unwrap();
        let mut logits = Vec::new();
        forward(&mut cuda, &batch, &mut logits).unwrap();
        let spec = SamplingSpec {
            temperature: 0.9,
            top_k,
            top_p,
            ..Default::default()
        };
        for (j, &token) in r.output_ids.iter().enumerate() {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let host = convoy_engine::sampler::sample(row, &spec, seed, j as u64);
            assert_eq!(token, host, "top-k {top_k}, top-p {top_p}: token {j}");
        }
    }
}

/// Weights uploaded straight from the loaded tensors (bf16 as it is, every other type rounded
/// one tensor at a time) are the bytes the host model's rows give: the logits are bitwise those
/// of a backend built from the `LlamaModel`, for f32 (glassllm), GGUF Q4_1 (SmolLM2) and bf16
/// (a dummy Llama-3 with one KV head) checkpoints.
#[test]
fn weights_uploaded_from_tensors_equal_weights_from_the_host_model() {
    use convoy_engine::backend::cuda::KvBlocks;
    use convoy_weights::loader::{load_model, LoadFormat};
    let check = |name: &str, loaded: &dyn Fn() -> convoy_weights::LoadedModel| {
        let model = LlamaModel::new(loaded()).unwrap();
        let tensors = loaded();
        let prompt: Vec<u32> = (0..9).map(|i| (i * 31 + 7) % 200 + 3).collect();
        let bs = 4;
        let mut batch = ForwardBatch::default();
        batch.push_seq(&prompt, 0, &[0, 1, 2], bs, false);
        batch.logits_rows = (0..prompt.len()).collect();
        let mut from_model = CudaBackend::new(EmulatedDevice::new(), &model, 3, 0, bs, 16).unwrap();
        let mut from_tensors = CudaBackend::from_tensors(
            EmulatedDevice::new(),
            tensors.config,
            tensors.tensors,
            KvBlocks::Count(3),
            0,
            bs,
            16,
        )
        .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        forward(&mut from_model, &batch, &mut a).unwrap();
        forward(&mut from_tensors, &batch, &mut b).unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(),
            "{name}: the two uploads differ"
        );
    };
    check("glassllm", &|| {
        load_model(&glassllm_path(), LoadFormat::Auto).unwrap()
    });
    check("SmolLM2 Q4_1", &|| {
        load_model(&smollm2_path(), LoadFormat::Auto).unwrap()
    });
    let dummy = llama3_attention_shape(1).config;
    check("dummy bf16", &|| convoy_weights::LoadedModel {
        name: "dummy".into(),
        config: dummy.clone(),
        tensors: convoy_weights::dummy::tensors(&dummy, convoy_weights::DType::BF16, 7),
        tokenizer: None,
        chat_template: None,
    });
    // A missing tensor is a clear error, not a panic.
    let mut t = load_model(&glassllm_path(), LoadFormat::Auto).unwrap();
    t.tensors.remove("model.layers.0.mlp.up_proj.weight");
    let err = CudaBackend::from_tensors(
        EmulatedDevice::new(),
        t.config,
        t.tensors,
        KvBlocks::Count(3),
        0,
        4,
        16,
    )
    .err()
    .expect("a missing tensor is refused");
    assert!(
        err.to_string()
            .contains("model.layers.0.mlp.up_proj.weight is missing"),
        "{err}"
    );
}

/// The device draw is split as the runner's step is: `stage_draws` uploads the draws before
/// the pass is queued, `launch_sample_rows` starts them after it, `sampled_ids` waits for the
/// ids once. Greedy ids are the argmax of the logits the same pass leaves; ids asked for with
/// no draw launched, twice, or after a new pass began, and a launch with nothing staged, are
/// typed errors, not stale ids.
#[test]
fn a_device_draw_is_staged_before_the_pass_and_its_ids_read_once() {
    use convoy_engine::backend::{run_layers, Backend, BackendError, RowDraw};
    let (model, _) = load(&glassllm_path());
    let bs = 4;
    let prompts: [&[u32]; 2] = [&[5, 9, 14, 3, 7], &[11, 2, 8]];
    let mut batch = ForwardBatch::default();
    batch.push_seq(prompts[0], 0, &[0, 1], bs, true);
    batch.push_seq(prompts[1], 0, &[2], bs, true);
    let mut cuda = CudaBackend::new(EmulatedDevice::new(), &model, 3, 0, bs, 16).unwrap();
    let out_of_order = |r: Result<(), BackendError>| match r {
        Err(BackendError::OutOfOrder { .. }) => {}
        other => panic!("expected an out-of-order error, got {other:?}"),
    };
    let mut ids = Vec::new();
    out_of_order(cuda.sampled_ids(&mut ids));
    let greedy = RowDraw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 1,
        step: 0,
    };
    assert!(cuda.stage_draws(&[greedy, greedy]).unwrap());
    run_layers(&mut cuda, &batch).unwrap();
    cuda.launch_sample_rows().unwrap();
    cuda.sampled_ids(&mut ids).unwrap();
    let mut logits = Vec::new();
    cuda.read_logits(&mut logits).unwrap();
    let vocab = model.config.vocab_size;
    let argmax: Vec<u32> = logits
        .chunks(vocab)
        .map(convoy_engine::sampler::argmax)
        .collect();
    assert_eq!(ids, argmax);
    out_of_order(cuda.sampled_ids(&mut ids));
    // Nothing staged: no launch. A draw launched and never read is dropped by the next pass.
    out_of_order(cuda.launch_sample_rows());
    assert!(cuda.stage_draws(&[greedy, greedy]).unwrap());
    run_layers(&mut cuda, &batch).unwrap();
    cuda.launch_sample_rows().unwrap();
    run_layers(&mut cuda, &batch).unwrap();
    out_of_order(cuda.sampled_ids(&mut ids));
}

/// Within a step, the host waits for the device only in `finish`: `launch` uploads the step's
/// metadata and draws before it queues the pass and the draw, so on a GPU (whose driver layer
/// waits in `write`, `read` and `synchronize`) the engine thread works while the pass runs. The
/// emulator counts each place the driver would wait; chats that share a system prompt (partial
/// prefix copies), batches of changing size (new decode graphs, replays), a last step that
/// samples nothing, 8 tokens each.
#[test]
fn a_launched_step_waits_for_the_device_only_in_finish() {
    use convoy_engine::runner::{ModelRunner, Runner, StepResult};
    use convoy_engine::{GenerationRequest, Generator, GeneratorConfig, SamplingParams};
    use convoy_scheduler::{BlockId, SchedulerOutput};
    use std::cell::Cell;
    use std::rc::Rc;

    /// A runner that counts the device waits inside each half of a step, and its launches.
    struct Probe<R> {
        inner: R,
        device: EmulatedDevice,
        launches: Rc<Cell<u64>>,
        in_launch: Rc<Cell<u64>>,
        in_finish: Rc<Cell<u64>>,
        steps: Rc<Cell<u64>>,
    }
    impl<R: ModelRunner> ModelRunner for Probe<R> {
        fn keep_logits(&mut self, id: u64) {
            self.inner.keep_logits(id)
        }
        fn execute(&mut self, out: &SchedulerOutput) -> StepResult {
            self.launch(out);
            self.finish(out)
        }
        /// As on a GPU, whose work runs apart (the emulator's runs as it is issued): the
        /// engine launches each step before its host work, and `finish` waits for it.
        fn computes_apart(&self) -> bool {
            true
        }
        fn launch(&mut self, out: &SchedulerOutput) {
            if !out.scheduled.is_empty() {
                self.launches.set(self.launches.get() + 1);
            }
            let before = self.device.host_waits();
            self.inner.launch(out);
            self.in_launch
                .set(self.in_launch.get() + self.device.host_waits() - before);
        }
        fn finish(&mut self, out: &SchedulerOutput) -> StepResult {
            let before = self.device.host_waits();
            let result = self.inner.finish(out);
            self.in_finish
                .set(self.in_finish.get() + self.device.host_waits() - before);
            if !out.scheduled.is_empty() {
                self.steps.set(self.steps.get() + 1);
            }
            result
        }
        fn recompute_logits(
            &mut self,
            tokens: &[u32],
            blocks: &[BlockId],
            copies: &[convoy_scheduler::BlockCopy],
        ) -> Option<Vec<f32>> {
            self.inner.recompute_logits(tokens, blocks, copies)
        }
        fn now(&self) -> std::time::Duration {
            self.inner.now()
        }
        fn vocab_size(&self) -> usize {
            self.inner.vocab_size()
        }
        fn kv_blocks(&self) -> Option<usize> {
            self.inner.kv_blocks()
        }
    }

    let (model, codec) = load(&glassllm_path());
    let (bs, blocks) = (4, 64);
    let device = EmulatedDevice::new();
    let backend = CudaBackend::new(device.clone(), &model, blocks, 0, bs, 64).unwrap();
    let (launches, in_launch, in_finish, steps) = (
        Rc::new(Cell::new(0)),
        Rc::new(Cell::new(0)),
        Rc::new(Cell::new(0)),
        Rc::new(Cell::new(0)),
    );
    let probe = Probe {
        inner: Runner::with_backend(backend),
        device,
        launches: launches.clone(),
        in_launch: in_launch.clone(),
        in_finish: in_finish.clone(),
        steps: steps.clone(),
    };
    let mut cfg = GeneratorConfig::new(blocks, bs);
    cfg.max_batched_tokens = 64;
    let mut generator = Generator::with_runner(
        Box::new(probe),
        model.config.max_position_embeddings,
        codec,
        &cfg,
    );
    let system: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 200 + 3).collect();
    let requests: Vec<GenerationRequest> = (0..5)
        .map(|r| GenerationRequest {
            prompt_ids: system
                .iter()
                .copied()
                .chain((0..3 + r).map(|i| ((i + r) * 13 % 200 + 3) as u32))
                .collect(),
            params: SamplingParams {
                max_tokens: 8,
                ignore_eos: true,
                ..Default::default()
            },
            arrival_step: 2 * r,
            ..Default::default()
        })
        .collect();
    let results = generator.run(&requests, |_, _| {}).unwrap();
    assert!(results.iter().all(|r| r.output_ids.len() == 8));
    assert!(
        results.iter().skip(1).any(|r| r.cached_tokens > 0),
        "later requests hit the cached system prompt"
    );
    assert_eq!(
        in_launch.get(),
        0,
        "launch waited for the device (steps: {})",
        steps.get()
    );
    assert_eq!(in_finish.get(), steps.get(), "finish waits once per step");
    // Every step was launched before its host work, not left to `finish`.
    assert_eq!(launches.get(), steps.get(), "the engine launches each step");
}
