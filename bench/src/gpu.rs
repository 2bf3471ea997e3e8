//! The GPU checks and benchmarks `bench/gpu/check.sh` runs on a device machine: every operation
//! on the card against the emulated device (`gpu-ops`), whole-model logits and a verified
//! multi-turn chat on the card against the CPU (`gpu-model`), and decode/prefill throughput at
//! the Llama-3-8B shape (`gpu-decode`). Each also runs with `--device cuda-emulated` on a
//! machine without a GPU, which keeps the commands working between GPU runs.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use convoy_engine::backend::cuda::CudaBackend;
use convoy_engine::backend::{forward, Backend};
use convoy_engine::{
    Device, ForwardBatch, GenerationRequest, Generator, GeneratorConfig, LlamaModel, SamplingParams,
};
use convoy_kernels::cuda::device::DeviceLayer;
use convoy_kernels::cuda::driver::CudaDriverDevice;
use convoy_kernels::cuda::emulator::EmulatedDevice;
use convoy_kernels::cuda::op_cases::{self, OPS, SHAPES};

/// Largest normalised mean squared error between the card and the emulator for a floating-point
/// operation (the two differ only in summation order and fast intrinsics).
pub const OPS_NMSE_BOUND: f64 = 1e-8;

/// `gpu-ops`: every operation at every shape on `device` against the emulator. Returns the
/// number of failing cases.
pub fn ops(device: Device) -> Result<usize> {
    let emu = EmulatedDevice::new();
    let gpu = match device {
        Device::Cuda => Some(CudaDriverDevice::open(0).context("--device cuda")?),
        Device::CudaEmulated => None,
        Device::Cpu => bail!(
            "gpu-ops compares a CUDA device with the emulator: use --device cuda or cuda-emulated"
        ),
    };
    let mut failed = 0;
    println!(
        "{:<20}{:<16}{:>12}{:>6}  verdict",
        "operation", "shape", "NMSE", "NaN"
    );
    let mut report =
        |op: &str, shape: &str, want: &[f32], got: std::result::Result<Vec<f32>, String>| {
            let (line, ok) = match got {
                Err(e) => (
                    format!("{:<20}{:<16}{:>12}{:>6}  error: {e}", op, shape, "-", "-"),
                    false,
                ),
                Ok(got) => {
                    let (e, nan) = op_cases::nmse(want, &got);
                    let ok = if op_cases::is_exact(op) {
                        e == 0.0 && nan == 0
                    } else {
                        e < OPS_NMSE_BOUND && nan == 0
                    };
                    (
                        format!(
                            "{op:<20}{shape:<16}{e:>12.2e}{nan:>6}  {}",
                            if ok { "ok" } else { "FAILED" }
                        ),
                        ok,
                    )
                }
            };
            println!("{line}");
            failed += usize::from(!ok);
        };
    for shape in SHAPES {
        for op in OPS {
            let want = op_cases::run(&emu, op, shape)
                .with_context(|| format!("{op} at {} on the emulator", shape.name))?;
            let got = match &gpu {
                Some(g) => op_cases::run(g, op, shape).map_err(|e| e.to_string()),
                None => op_cases::run(&emu, op, shape).map_err(|e| e.to_string()),
            };
            report(op, shape.name, &want, got);
        }
    }
    Ok(failed)
}

fn logits_of<B: Backend>(b: &mut B, prompt: &[u32]) -> Result<Vec<f32>> {
    let bs = b.block_size();
    let table: Vec<u32> = (0..prompt.len().div_ceil(bs) as u32 + 1).collect();
    let mut batch = ForwardBatch::default();
    batch.push_seq(prompt, 0, &table, bs, false);
    batch.logits_rows = (0..prompt.len()).collect();
    let mut logits = Vec::new();
    forward(b, &batch, &mut logits)?;
    Ok(logits)
}

/// Three sequences prefilled, then `steps` decode steps of all three (a padded graph bucket of
/// four rows) on a backend with decode graphs and on one without: the largest NMSE of a step's
/// logits between the two, and the graphed backend's graph counts.
fn graphs_against_eager<D: DeviceLayer>(
    mut graphed: CudaBackend<D>,
    mut eager: CudaBackend<D>,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<(f64, convoy_engine::backend::cuda::GraphStats)> {
    eager.set_graph_policy(convoy_engine::backend::cuda::GraphPolicy::eager())?;
    let bs = graphed.block_size();
    let per_seq = (prompts.iter().map(Vec::len).max().unwrap_or(0) + steps).div_ceil(bs) + 1;
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut worst = 0f64;
    let mut run = |batch: &ForwardBatch| -> Result<()> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        forward(&mut graphed, batch, &mut a)?;
        forward(&mut eager, batch, &mut b)?;
        let (e, nan) = op_cases::nmse(&b, &a);
        worst = worst.max(if nan > 0 { f64::INFINITY } else { e });
        Ok(())
    };
    for (s, p) in prompts.iter().enumerate() {
        let mut batch = ForwardBatch::default();
        batch.push_seq(p, 0, &tables[s], bs, true);
        run(&batch)?;
    }
    for step in 0..steps {
        let mut batch = ForwardBatch::default();
        for (s, p) in prompts.iter().enumerate() {
            let token = ((step * 31 + s * 7) % 1000 + 10) as u32;
            batch.push_seq(&[token], p.len() + step, &tables[s], bs, true);
        }
        run(&batch)?;
    }
    Ok((worst, graphed.graph_stats()))
}

/// `gpu-model`: a prompt's logits on `device` against the CPU, decode steps run as CUDA graphs
/// against eager ones, greedy tokens of a few prompts on both, and a three-turn chat on
/// `device` with every cache-hit prefill recomputed and compared (`--verify-cache 1`). Returns
/// the number of failed checks.
pub fn model(
    device: Device,
    model: &LlamaModel,
    codec: &convoy_engine::TextCodec,
) -> Result<usize> {
    let mut failed = 0;
    let prompt = codec.encode("The history of the lighthouse at the edge of the harbour begins")?;
    let bs = 16;
    let blocks = prompt.len().div_ceil(bs) + 1;
    let mut cache = model.new_kv_cache(blocks, bs);
    let mut batch = ForwardBatch::default();
    batch.push_seq(
        &prompt,
        0,
        &(0..blocks as u32).collect::<Vec<_>>(),
        bs,
        false,
    );
    batch.logits_rows = (0..prompt.len()).collect();
    let cpu = model.forward(&batch, &mut cache);
    let got = match device {
        Device::Cuda => logits_of(
            &mut CudaBackend::new(CudaDriverDevice::open(0)?, model, blocks, 0, bs, 256)?,
            &prompt,
        )?,
        Device::CudaEmulated => logits_of(
            &mut CudaBackend::new(EmulatedDevice::new(), model, blocks, 0, bs, 256)?,
            &prompt,
        )?,
        Device::Cpu => bail!("gpu-model compares a CUDA device with the CPU"),
    };
    let (e, nan) = op_cases::nmse(&cpu, &got);
    let ok = e < 1e-3 && nan == 0;
    failed += usize::from(!ok);
    println!(
        "logits of {} rows against the CPU: NMSE {e:.2e}, NaN mismatches {nan}: {}",
        prompt.len(),
        if ok { "ok" } else { "FAILED" }
    );

    let prompts: Vec<Vec<u32>> = ["A lighthouse keeper", "The tide came in", "Seven ships"]
        .iter()
        .map(|p| codec.encode(p))
        .collect::<Result<_, _>>()?;
    let steps: usize = 6;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let blocks = prompts.len() * ((longest + steps).div_ceil(bs) + 1);
    let (worst, stats) = match device {
        Device::Cuda => graphs_against_eager(
            CudaBackend::new(CudaDriverDevice::open(0)?, model, blocks, 0, bs, 256)?,
            CudaBackend::new(CudaDriverDevice::open(0)?, model, blocks, 0, bs, 256)?,
            &prompts,
            steps,
        )?,
        Device::CudaEmulated => graphs_against_eager(
            CudaBackend::new(EmulatedDevice::new(), model, blocks, 0, bs, 256)?,
            CudaBackend::new(EmulatedDevice::new(), model, blocks, 0, bs, 256)?,
            &prompts,
            steps,
        )?,
        Device::Cpu => unreachable!("refused above"),
    };
    // One bucket: its first decode step runs eagerly and is recorded, the others replay.
    let ok = worst < 1e-5 && stats.recorded == 1 && stats.replayed == steps - 1;
    failed += usize::from(!ok);
    println!(
        "{steps} decode steps as CUDA graphs against eager ones: worst NMSE {worst:.2e}, \
         {} recorded, {} replayed: {}",
        stats.recorded,
        stats.replayed,
        if ok { "ok" } else { "FAILED" }
    );

    let requests: Vec<GenerationRequest> = [
        "Once upon a time",
        "The three laws of motion are",
        "def fibonacci(n):",
    ]
    .iter()
    .map(|p| GenerationRequest {
        prompt_ids: codec.encode(p).expect("encodes"),
        params: SamplingParams {
            max_tokens: 24,
            ..Default::default()
        },
        ..Default::default()
    })
    .collect();
    let cfg = GeneratorConfig::new(256, bs);
    let on_cpu = Generator::new(model, codec.clone(), cfg.clone()).run(&requests, |_, _| {})?;
    let on_dev = Generator::on_device(device, model, codec.clone(), cfg.clone())?
        .run(&requests, |_, _| {})?;
    for (i, (a, b)) in on_cpu.iter().zip(&on_dev).enumerate() {
        let same = a
            .output_ids
            .iter()
            .zip(&b.output_ids)
            .take_while(|(x, y)| x == y)
            .count();
        println!(
            "greedy prompt {i}: {same} of {} tokens as on the CPU",
            a.output_ids.len()
        );
    }

    let mut verified = cfg;
    verified.verify_fraction = 1.0;
    let mut g = Generator::on_device(device, model, codec.clone(), verified)?;
    let mut msgs = vec![convoy_weights::ChatMessage::new(
        "system",
        "You are a patient teacher.",
    )];
    for turn in ["What is a prime number?", "Is 91 one?", "Why not?"] {
        msgs.push(convoy_weights::ChatMessage::new("user", turn));
        let ids = codec.encode_chat(&msgs)?;
        let r = g
            .run(
                &[GenerationRequest {
                    prompt_ids: ids,
                    params: SamplingParams {
                        max_tokens: 24,
                        ..Default::default()
                    },
                    ..Default::default()
                }],
                |_, _| {},
            )?
            .remove(0);
        msgs.push(convoy_weights::ChatMessage::new("assistant", &r.text));
    }
    let s = g.stats();
    let ok = s.cache_divergence_total == 0 && s.verified_prefills >= 2;
    failed += usize::from(!ok);
    println!(
        "3-turn chat, cache verified: {} prefills recomputed, {} divergent, {} of {} prompt tokens from cache: {}",
        s.verified_prefills,
        s.cache_divergence_total,
        s.cached_prompt_tokens,
        s.prompt_tokens,
        if ok { "ok" } else { "FAILED" }
    );
    Ok(failed)
}

/// Block tables of `sequences` sequences of up to `tokens` tokens each, blocks of `bs`.
pub fn tables(sequences: usize, tokens: usize, bs: usize) -> Vec<Vec<u32>> {
    let per_seq = tokens.div_ceil(bs);
    (0..sequences)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect()
}

/// Prefill `context` tokens of every sequence of `tables`, in chunks of `chunk`; prefill
/// tokens per second.
pub fn prefill<D: DeviceLayer>(
    backend: &mut CudaBackend<D>,
    tables: &[Vec<u32>],
    context: usize,
    chunk: usize,
) -> Result<f64> {
    let bs = backend.block_size();
    let vocab = backend.config().vocab_size as u32;
    let mut logits = Vec::new();
    let t = Instant::now();
    for (s, table) in tables.iter().enumerate() {
        let tokens: Vec<u32> = (0..context)
            .map(|i| ((i * 7919 + s * 104_729 + 13) as u32) % vocab)
            .collect();
        let mut done = 0;
        while done < context {
            let n = chunk.min(context - done);
            let mut fb = ForwardBatch::default();
            fb.push_seq(
                &tokens[done..done + n],
                done,
                table,
                bs,
                done + n == context,
            );
            forward(backend, &fb, &mut logits)?;
            done += n;
        }
    }
    backend.device().synchronize()?;
    Ok((tables.len() * context) as f64 / t.elapsed().as_secs_f64())
}

/// `steps` decode steps of the first `batch` sequences of `tables`, each at `context` tokens
/// of context (their K/V from [`prefill`]); (tokens per second, milliseconds per step).
pub fn decode<D: DeviceLayer>(
    backend: &mut CudaBackend<D>,
    tables: &[Vec<u32>],
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<(f64, f64)> {
    let bs = backend.block_size();
    let vocab = backend.config().vocab_size as u32;
    let mut logits = Vec::new();
    // One warm-up step (workspace, caches), then the timed ones.
    let t = Instant::now();
    let mut timed = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            backend.device().synchronize()?;
            timed = Instant::now();
        }
        let mut fb = ForwardBatch::default();
        for (s, table) in tables[..batch].iter().enumerate() {
            fb.push_seq(
                &[((s + step) as u32) % vocab],
                context + step,
                table,
                bs,
                true,
            );
        }
        forward(backend, &fb, &mut logits)?;
    }
    backend.device().synchronize()?;
    let _ = t;
    let secs = timed.elapsed().as_secs_f64();
    Ok(((batch * steps) as f64 / secs, secs * 1e3 / steps as f64))
}

/// A dummy Llama-3-8B (bf16 weights) with `kv_heads` KV heads and `layers` layers, as loaded
/// tensors (the CUDA backend uploads them straight, never holding the model in f32).
pub fn llama3_8b(kv_heads: usize, layers: usize) -> Result<convoy_weights::LoadedModel> {
    let cfg = convoy_weights::ModelConfig::from_hf_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": kv_heads,
        "head_dim": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    }))?;
    let tensors = convoy_weights::dummy::tensors(&cfg, convoy_weights::DType::BF16, 1);
    Ok(convoy_weights::LoadedModel {
        name: format!("dummy-llama3-8b-kv{kv_heads}"),
        config: cfg,
        tensors,
        tokenizer: None,
        chat_template: None,
    })
}
