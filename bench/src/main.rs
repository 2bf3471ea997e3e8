//! `convoy-bench`: throughput benchmarks.
//!
//! `convoy-bench cpu` measures prefill and decode tokens/s of the engine's forward pass at
//! several batch sizes (each sequence with its own prompt and its own KV blocks), and, given
//! `--llama-bench`, runs llama.cpp's `llama-bench` on the same model and threads and prints both
//! side by side with their ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod calibrate;
mod daemon;
mod gpu;
mod host;
mod run;
mod truncation;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use convoy_engine::backend::cuda::{
    GraphPolicy, DEFAULT_MAX_GRAPH_CONTEXT, DEFAULT_MAX_GRAPH_ROWS,
};
use convoy_engine::options::ModelArgs;
use convoy_engine::sampler::argmax;
use convoy_engine::{ForwardBatch, LlamaModel};
use convoy_kernels::Precision;

#[derive(Parser)]
#[command(name = "convoy-bench", about = "convoy benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive a daemon (or any OpenAI-compatible server) with a workload and report latency,
    /// throughput, goodput and the cache's effect (docs/benchmarks.md, docs/workloads.md).
    Run(Box<run::RunArgs>),
    /// Measure step times of the engine on this machine into a profile that `convoy plan`
    /// loads (docs/planning.md).
    Calibrate(calibrate::CalibrateArgs),
    /// Prefill and decode throughput of the CPU forward pass.
    Cpu {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch sizes (concurrent sequences).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batch: Vec<usize>,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        /// Decoded tokens per sequence.
        #[arg(long, default_value_t = 128)]
        gen_len: usize,
        /// Repetitions; the best is reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Path of llama.cpp's llama-bench (bench/build_llama_cpp.sh builds it) to run as the peer.
        #[arg(long)]
        llama_bench: Option<PathBuf>,
        /// The peer's KV cache type (llama-bench's `-ctk` and `-ctv`, e.g. `q8_0` to set
        /// llama.cpp's 8-bit cache against `--kv-cache-dtype fp8_e4m3`); a type other than
        /// `f16` also turns on its flash attention (`-fa 1`), which llama.cpp needs for a
        /// quantised V cache. Default: llama-bench's own (f16, no flash attention).
        #[arg(long)]
        llama_kv_cache_type: Option<String>,
        /// Measure each of these precisions in turn (e.g. `exact,fast`), in this one run;
        /// default: the one --precision chose.
        #[arg(long, value_delimiter = ',')]
        precisions: Vec<String>,
    },
    /// Aggregate decode throughput through the engine (scheduler, runner, sampler,
    /// detokeniser) at several concurrencies, against the compute bound of this machine's
    /// matrix multiply on the model's own weights.
    Engine {
        #[command(flatten)]
        model: ModelArgs,
        /// Concurrent sequences.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        concurrency: Vec<usize>,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        /// Generated tokens per sequence.
        #[arg(long, default_value_t = 64)]
        gen_len: usize,
        /// Repetitions; the best is reported (this machine's timings are noisy).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// The daemon's host side at a GPU's cadence: N streams against `convoy serve --device sim`
    /// (host time per step, tokens delivered, event delay, memory per stream).
    Host(host::HostArgs),
    /// Time of one scheduling step (schedule + update) with many running requests.
    Sched {
        /// Running requests.
        #[arg(long, default_value_t = 256)]
        running: usize,
        /// Steps to time.
        #[arg(long, default_value_t = 2000)]
        steps: usize,
    },
    /// A long chat through the daemon with a prompt template whose history overflows the
    /// token limit, once per truncation step: the later-turn prefix-cache hit ratio of each.
    Truncation {
        /// The convoy binary.
        #[arg(long, default_value = "target/release/convoy")]
        convoy: PathBuf,
        /// Model for the daemon (a directory without a chat template gets a plain ChatML one).
        #[arg(long, default_value = "models/glassllm")]
        model: PathBuf,
        /// Turns of the chat.
        #[arg(long, default_value_t = 40)]
        turns: usize,
        /// Most tokens the template's parts may hold.
        #[arg(long, default_value_t = 300)]
        token_limit: usize,
        /// Truncation steps to compare.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        steps: Vec<usize>,
        /// Tokens of each reply.
        #[arg(long, default_value_t = 12)]
        max_tokens: usize,
    },
    /// Many idle connections to a real daemon: memory per connection, and the time to first
    /// token of a new request with them open versus on an idle daemon.
    Load {
        /// The convoy binary.
        #[arg(long, default_value = "target/release/convoy")]
        convoy: PathBuf,
        /// Model for the daemon.
        #[arg(long, default_value = convoy_engine::options::DEFAULT_MODEL)]
        model: PathBuf,
        /// Idle connections to open.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Requests timed on each side.
        #[arg(long, default_value_t = 7)]
        samples: usize,
    },
    /// Compile every CUDA kernel through NVRTC for an architecture (a device-machine check).
    GpuKernels {
        /// NVRTC architecture, e.g. compute_90.
        #[arg(long, default_value = "compute_90")]
        arch: String,
    },
    /// Every CUDA operation at the SmolLM2, Llama-3-8B GQA and MQA shapes on the GPU against
    /// the emulated device (normalised mean squared error); exits 1 when one differs.
    GpuOps {
        /// cuda (a GPU) or cuda-emulated (the emulator against itself: checks the command).
        #[arg(long, default_value = "cuda")]
        device: String,
    },
    /// A model's logits and greedy tokens on the CUDA backend against the CPU, and a
    /// three-turn chat with every cache-hit prefill verified; exits 1 when a check fails.
    GpuModel {
        #[command(flatten)]
        model: ModelArgs,
        /// cuda or cuda-emulated.
        #[arg(long, default_value = "cuda")]
        on: String,
    },
    /// Decode and prefill throughput of a dummy Llama-3-8B (bf16) on the CUDA backend.
    GpuDecode {
        /// cuda or cuda-emulated.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// KV heads (8: GQA, 1: MQA).
        #[arg(long, value_delimiter = ',', default_value = "8,1")]
        kv_heads: Vec<usize>,
        /// Sequences decoding together.
        #[arg(long, value_delimiter = ',', default_value = "1,32,128,256")]
        batch: Vec<usize>,
        /// Tokens of context per sequence.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        /// Decode steps timed per batch size.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Layers (32 for the real shape; fewer for a quick check).
        #[arg(long, default_value_t = 32)]
        layers: usize,
        /// Tokens per KV block.
        #[arg(long, default_value_t = 16)]
        block_size: usize,
    },
    /// Time to first token of each turn of a long chat (a ~1,000-token persona), prefix cache
    /// on versus off, and the cache hit ratio.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// Turns to play.
        #[arg(long, default_value_t = 8)]
        turns: usize,
        /// Tokens each reply may have.
        #[arg(long, default_value_t = 48)]
        reply_tokens: usize,
        /// Block sizes to compare (default: the model's default only).
        #[arg(long, value_delimiter = ',')]
        block_sizes: Vec<usize>,
    },
}

const PERSONA_LINES: [&str; 6] = [
    "You are Captain Marlowe, the weathered keeper of a lighthouse on a storm-beaten northern island.",
    "You speak in short, salty sentences, you love tea with too much honey, and you distrust seagulls.",
    "You remember every shipwreck of the last forty years and tell their stories when asked.",
    "You never reveal the location of the hidden cove where your late brother kept his boat.",
    "When visitors are kind you offer them biscuits; when they are rude you talk about the weather.",
    "You keep a logbook of the tides, the winds and the colour of the sea at dawn and at dusk.",
];

const USER_TURNS: [&str; 10] = [
    "Good evening, captain! May I come in out of the rain?",
    "What is the strangest shipwreck you remember?",
    "Why do you dislike seagulls so much?",
    "How do you take your tea?",
    "Tell me about the colour of the sea this morning.",
    "Is there a hidden cove on this island?",
    "What does your logbook say about yesterday's wind?",
    "Do you ever get lonely out here?",
    "Could you teach me to read the tides?",
    "Thank you for the biscuits. Good night!",
];

fn persona(codec: &convoy_engine::TextCodec, target_tokens: usize) -> Result<String> {
    let mut text = String::new();
    let mut i = 0;
    while codec.encode(&text)?.len() < target_tokens {
        text.push_str(PERSONA_LINES[i % PERSONA_LINES.len()]);
        text.push_str(&format!(" (Note {}.) ", i + 1));
        i += 1;
    }
    Ok(text)
}

struct ChatRun {
    ttft_ms: Vec<f64>,
    prompt_tokens: usize,
    cached_tokens: usize,
    decode_tps: f64,
}

fn play_chat(
    loaded: &convoy_engine::options::Loaded,
    block_size: usize,
    caching: bool,
    turns: usize,
    reply_tokens: usize,
) -> Result<ChatRun> {
    use convoy_engine::{GenerationRequest, Generator, SamplingParams};
    use convoy_weights::ChatMessage;
    let mut cfg = loaded.generator_config();
    let per_block_tokens = loaded.num_blocks * loaded.block_size;
    cfg.block_size = block_size;
    cfg.num_blocks = per_block_tokens / block_size;
    cfg.num_host_blocks = 0;
    cfg.enable_prefix_caching = caching;
    let mut g = Generator::new(loaded.host_model()?, loaded.codec.clone(), cfg);
    let mut msgs = vec![ChatMessage::new("system", persona(&loaded.codec, 1000)?)];
    let mut out = ChatRun {
        ttft_ms: Vec::new(),
        prompt_tokens: 0,
        cached_tokens: 0,
        decode_tps: 0.0,
    };
    let mut decode_time = 0.0;
    let mut decoded = 0;
    for t in 0..turns {
        msgs.push(ChatMessage::new("user", USER_TURNS[t % USER_TURNS.len()]));
        let prompt = loaded.codec.encode_chat(&msgs)?;
        let req = GenerationRequest {
            prompt_ids: prompt.clone(),
            params: SamplingParams {
                max_tokens: reply_tokens,
                ..Default::default()
            },
            ..Default::default()
        };
        let r = g.run(&[req], |_, _| {})?.remove(0);
        out.ttft_ms.push(r.time_to_first_token.as_secs_f64() * 1e3);
        if t > 0 {
            out.prompt_tokens += prompt.len();
            out.cached_tokens += r.cached_tokens + r.host_cached_tokens;
        }
        decode_time += (r.total_time - r.time_to_first_token).as_secs_f64();
        decoded += r.output_ids.len().saturating_sub(1);
        msgs.push(ChatMessage::new("assistant", r.text));
    }
    out.decode_tps = decoded as f64 / decode_time.max(1e-9);
    Ok(out)
}

struct Figures {
    prefill_tps: f64,
    decode_tps: f64,
}

fn measure(
    model: &LlamaModel,
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
    block_size: usize,
) -> Figures {
    let vocab = model.config.vocab_size as u32;
    let per_seq = (prompt_len + gen_len).div_ceil(block_size);
    let mut cache = model.new_kv_cache(per_seq * batch, block_size);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((i * 7919 + s * 104729 + 13) as u32) % vocab)
                .collect()
        })
        .collect();
    let mut fb = ForwardBatch::default();
    for s in 0..batch {
        fb.push_seq(&prompts[s], 0, &tables[s], block_size, true);
    }
    let t = Instant::now();
    let logits = model.forward(&fb, &mut cache);
    let prefill = t.elapsed().as_secs_f64();
    let v = vocab as usize;
    let mut next: Vec<u32> = (0..batch)
        .map(|s| argmax(&logits[s * v..(s + 1) * v]))
        .collect();
    let t = Instant::now();
    for step in 0..gen_len {
        let mut fb = ForwardBatch::default();
        for s in 0..batch {
            fb.push_seq(&[next[s]], prompt_len + step, &tables[s], block_size, true);
        }
        let logits = model.forward(&fb, &mut cache);
        next = (0..batch)
            .map(|s| argmax(&logits[s * v..(s + 1) * v]))
            .collect();
    }
    let decode = t.elapsed().as_secs_f64();
    Figures {
        prefill_tps: (batch * prompt_len) as f64 / prefill,
        decode_tps: (batch * gen_len) as f64 / decode,
    }
}

/// One llama-bench result: prompt tokens, generated tokens, depth (tokens already in the
/// context), tokens per second.
struct PeerResult {
    n_prompt: u64,
    n_gen: u64,
    n_depth: u64,
    tps: f64,
}

/// Run llama-bench (JSON output, 3 repetitions) with `extra` arguments.
fn llama_bench(
    bin: &Path,
    model: &Path,
    threads: usize,
    extra: &[String],
) -> Result<Vec<PeerResult>> {
    let mut args = vec![
        "-m".to_string(),
        model.to_string_lossy().into_owned(),
        "-t".to_string(),
        threads.to_string(),
        "-o".to_string(),
        "json".to_string(),
        "-r".to_string(),
        "3".to_string(),
    ];
    args.extend_from_slice(extra);
    let out = Command::new(bin)
        .args(&args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("llama-bench JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|r| PeerResult {
            n_prompt: r["n_prompt"].as_u64().unwrap_or(0),
            n_gen: r["n_gen"].as_u64().unwrap_or(0),
            n_depth: r["n_depth"].as_u64().unwrap_or(0),
            tps: r["avg_ts"].as_f64().unwrap_or(0.0),
        })
        .collect())
}

/// llama.cpp's figures to compare `convoy-bench cpu` with: `pp<prompt>`, `tg<gen>` from an
/// empty context (llama-bench's usual test, the one the targets name) and `tg<gen>` at depth
/// `<prompt>` (after a prompt as long as convoy's, like for like).
fn llama_peer(
    bin: &Path,
    model: &Path,
    threads: usize,
    prompt: usize,
    gen: usize,
    kv_cache_type: Option<&str>,
) -> Result<(f64, f64, f64)> {
    let cache: Vec<String> = match kv_cache_type {
        None => Vec::new(),
        Some(t) => {
            let mut a = vec!["-ctk".into(), t.into(), "-ctv".into(), t.into()];
            if t != "f16" {
                a.extend(["-fa".into(), "1".into()]);
            }
            a
        }
    };
    let with_cache = |test: &[String]| [test, &cache].concat();
    let plain = llama_bench(
        bin,
        model,
        threads,
        &with_cache(&[
            "-p".into(),
            prompt.to_string(),
            "-n".into(),
            gen.to_string(),
        ]),
    )?;
    let deep = llama_bench(
        bin,
        model,
        threads,
        &with_cache(&[
            "-p".into(),
            "0".into(),
            "-n".into(),
            gen.to_string(),
            "-d".into(),
            prompt.to_string(),
        ]),
    )?;
    let find = |rs: &[PeerResult], prompt: bool, depth: u64| {
        rs.iter()
            .find(|r| (r.n_prompt > 0) == prompt && (prompt || r.n_gen > 0) && r.n_depth == depth)
            .map(|r| r.tps)
            .ok_or_else(|| anyhow::anyhow!("llama-bench printed no result for that test"))
    };
    Ok((
        find(&plain, true, 0)?,
        find(&plain, false, 0)?,
        find(&deep, false, prompt as u64)?,
    ))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run::main(*args)?,
        Cmd::Calibrate(args) => calibrate::main(args)?,
        Cmd::Cpu {
            model,
            batch,
            prompt_len,
            gen_len,
            reps,
            llama_bench: peer,
            llama_kv_cache_type,
            precisions,
        } => {
            let model = model.on_cpu();
            let mut loaded = model.load()?;
            let precisions = if precisions.is_empty() {
                vec![loaded.host_model()?.precision()]
            } else {
                precisions
                    .iter()
                    .map(|p| {
                        Precision::parse(p)
                            .with_context(|| format!("--precisions: {p:?} is not exact or fast"))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let threads = convoy_kernels::cpu::pool::num_threads();
            let cpu = cpu_name();
            println!(
                "model: {}  threads: {threads}  cpu: {cpu}  block size: {}  kv cache: {}",
                model.model_path()?.display(),
                loaded.block_size,
                loaded.host_model()?.kv_cache_dtype().as_str()
            );
            println!(
                "prompt {prompt_len} tokens, decode {gen_len} tokens per sequence, best of {reps}"
            );
            println!(
                "{:>9} {:>6} {:>14} {:>14}",
                "precision", "batch", "prefill tok/s", "decode tok/s"
            );
            // Each precision's figures by batch size, to set against llama.cpp's below.
            let mut rows: Vec<(Precision, usize, Figures)> = Vec::new();
            for &precision in &precisions {
                loaded.host_model_mut()?.set_precision(precision);
                for &b in &batch {
                    let mut best = Figures {
                        prefill_tps: 0.0,
                        decode_tps: 0.0,
                    };
                    for _ in 0..reps {
                        let f = measure(
                            loaded.host_model()?,
                            b,
                            prompt_len,
                            gen_len,
                            loaded.block_size,
                        );
                        best.prefill_tps = best.prefill_tps.max(f.prefill_tps);
                        best.decode_tps = best.decode_tps.max(f.decode_tps);
                    }
                    println!(
                        "{:>9} {b:>6} {:>14.1} {:>14.1}",
                        precision.as_str(),
                        best.prefill_tps,
                        best.decode_tps
                    );
                    rows.push((precision, b, best));
                }
            }
            if let Some(bin) = peer {
                let kv = llama_kv_cache_type.as_deref();
                let (pp, tg, tg_deep) =
                    llama_peer(&bin, &model.model_path()?, threads, prompt_len, gen_len, kv)?;
                println!(
                    "llama.cpp llama-bench -t {threads}{}: pp{prompt_len} {pp:.1} tok/s, \
                     tg{gen_len} {tg:.1} tok/s from an empty context, tg{gen_len} {tg_deep:.1} \
                     tok/s at depth {prompt_len} (convoy decodes after its {prompt_len}-token \
                     prompt)",
                    kv.map_or(String::new(), |t| format!(", KV cache {t}"))
                );
                for (precision, b, f) in &rows {
                    let p = precision.as_str();
                    if *b == 1 {
                        println!(
                            "convoy ({p}) / llama.cpp at batch 1: prefill {:.2}x, decode {:.2}x \
                             (against tg{gen_len} at depth {prompt_len}: {:.2}x)",
                            f.prefill_tps / pp.max(1e-9),
                            f.decode_tps / tg.max(1e-9),
                            f.decode_tps / tg_deep.max(1e-9)
                        );
                    } else {
                        println!(
                            "convoy ({p}) decode of {b} sequences / llama.cpp tg{gen_len}: {:.2}x",
                            f.decode_tps / tg.max(1e-9)
                        );
                    }
                }
            }
        }
        Cmd::Engine {
            model,
            concurrency,
            prompt_len,
            gen_len,
            reps,
        } => {
            use convoy_engine::{GenerationRequest, Generator, SamplingParams};
            let model = model.on_cpu();
            let loaded = model.load()?;
            let host = loaded.host_model()?;
            let vocab = host.config.vocab_size as u32;
            // Compute bound: the model's matmuls at a large batch (prefill), in tokens/s.
            let bound = (0..3)
                .map(|_| measure(host, 1, 128, 1, loaded.block_size).prefill_tps)
                .fold(0.0, f64::max);
            println!(
                "model: {}  threads: {}  prompt {prompt_len}, decode {gen_len} tokens per sequence",
                model.model_path()?.display(),
                convoy_kernels::cpu::pool::num_threads()
            );
            println!(
                "compute bound (128-token prefill through the same kernels, attention negligible): {bound:.1} tok/s"
            );
            println!(
                "{:>11} {:>18} {:>14} {:>16}",
                "concurrency", "decode tok/s", "vs single", "vs compute bound"
            );
            let mut single = None;
            for &c in &concurrency {
                let reqs: Vec<GenerationRequest> = (0..c)
                    .map(|i| GenerationRequest {
                        prompt_ids: (0..prompt_len)
                            .map(|t| ((t * 7919 + i * 104729 + 13) as u32) % vocab)
                            .collect(),
                        params: SamplingParams {
                            max_tokens: gen_len,
                            ignore_eos: true,
                            ..Default::default()
                        },
                        ..Default::default()
                    })
                    .collect();
                let mut tps: f64 = 0.0;
                for _ in 0..reps.max(1) {
                    let mut g =
                        Generator::new(host, loaded.codec.clone(), loaded.generator_config());
                    let t = Instant::now();
                    let results = g.run(&reqs, |_, _| {})?;
                    let wall = t.elapsed().as_secs_f64();
                    let ttft = results
                        .iter()
                        .map(|r| r.time_to_first_token.as_secs_f64())
                        .fold(0.0, f64::max);
                    let decoded: usize = results.iter().map(|r| r.output_ids.len() - 1).sum();
                    tps = tps.max(decoded as f64 / (wall - ttft).max(1e-9));
                }
                let s1 = *single.get_or_insert(tps);
                println!(
                    "{c:>11} {tps:>18.1} {:>13.2}x {:>15.1}%",
                    tps / s1,
                    100.0 * tps / bound
                );
            }
        }
        Cmd::Host(args) => host::run(&args)?,
        Cmd::Sched { running, steps } => {
            use convoy_scheduler::{
                KvCacheConfig, ModelOutput, NewRequest, Scheduler, SchedulerConfig,
            };
            let mut cfg = SchedulerConfig::new(KvCacheConfig::new(16, running * 256));
            cfg.max_running = running;
            cfg.max_queued = running;
            cfg.max_queued_per_owner = running;
            cfg.max_batched_tokens = running * 4;
            let mut s = Scheduler::new(cfg);
            for i in 0..running as u64 {
                s.add(NewRequest {
                    id: i,
                    prompt: (0..200).map(|t| (t + i * 1000) as u32).collect(),
                    max_tokens: 1 << 30,
                    ..Default::default()
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            // One output, model answer and result buffer for the whole run, as the engine keeps.
            let mut out = convoy_scheduler::SchedulerOutput::default();
            let mut model = ModelOutput::default();
            let mut results = Vec::new();
            let mut step = |s: &mut Scheduler| {
                s.schedule_into(&mut out);
                model.sampled.clear();
                model.sampled.extend(
                    out.scheduled
                        .iter()
                        .filter(|r| r.sample)
                        .map(|r| convoy_scheduler::SampledToken { id: r.id, token: 7 }),
                );
                s.update_from_output_into(&out, &model, &mut results)
                    .expect("the stand-in model answers every sampled request");
                out.scheduled.len()
            };
            // Warm up: prefill everyone, so every step is a decode of all requests.
            for _ in 0..200 {
                step(&mut s);
            }
            let t = Instant::now();
            let mut n = 0;
            for _ in 0..steps {
                n += step(&mut s);
            }
            let per = t.elapsed().as_secs_f64() / steps as f64;
            println!(
                "{running} running requests, {} scheduled per step on average: {:.1} us per step (schedule + update_from_output)",
                n / steps,
                per * 1e6
            );
        }
        Cmd::Load {
            convoy,
            model,
            connections,
            samples,
        } => load(&convoy, &model, connections, samples)?,
        Cmd::Truncation {
            convoy,
            model,
            turns,
            token_limit,
            steps,
            max_tokens,
        } => {
            let runs = truncation::run(&convoy, &model, turns, token_limit, &steps, max_tokens)?;
            println!(
                "{turns}-turn chat through the daemon, template `character`, token_limit {token_limit}, model {}",
                model.display()
            );
            println!(" step  turns cut  cut changed  turn 2+ prompt tokens  cached  hit ratio");
            for r in runs {
                println!(
                    "{:>5}  {:>9}  {:>11}  {:>21}  {:>6}  {:>9.3}",
                    r.step,
                    r.truncated_turns,
                    r.cut_changes,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.cached_tokens as f64 / r.prompt_tokens.max(1) as f64
                );
            }
        }
        Cmd::GpuOps { device } => {
            let failed = gpu::ops(convoy_engine::Device::parse(&device)?)?;
            if failed > 0 {
                bail!("{failed} operations differ between the devices");
            }
        }
        Cmd::GpuModel { mut model, on } => {
            model.device = "cpu".into();
            let loaded = model.load()?;
            let failed = gpu::model(
                convoy_engine::Device::parse(&on)?,
                loaded.host_model()?,
                &loaded.codec,
            )?;
            if failed > 0 {
                bail!("{failed} model checks failed");
            }
        }
        Cmd::GpuDecode {
            device,
            kv_heads,
            batch,
            context,
            steps,
            layers,
            block_size,
        } => {
            let device = convoy_engine::Device::parse(&device)?;
            let max_batch = batch.iter().copied().max().unwrap_or(1);
            println!(
                "{:<6}{:>7}{:>9}{:>14}{:>10}{:>14}{:>15}",
                "model",
                "batch",
                "context",
                "decode tok/s",
                "step ms",
                "eager tok/s",
                "prefill tok/s"
            );
            for kv in kv_heads {
                let t = Instant::now();
                let model = gpu::llama3_8b(kv, layers)?;
                eprintln!(
                    "dummy Llama-3-8B, {kv} KV heads, {layers} layers built in {:.0} s",
                    t.elapsed().as_secs_f64()
                );
                let tables = gpu::tables(max_batch, context + steps + 1, block_size);
                let blocks = tables.len() * tables[0].len();
                let name = if kv == 1 { "mqa" } else { "gqa" };
                macro_rules! run_on {
                    ($dev:expr) => {{
                        let mut backend = convoy_engine::backend::cuda::CudaBackend::from_tensors(
                            $dev,
                            model.config,
                            model.tensors,
                            convoy_engine::backend::cuda::KvBlocks::Count(blocks),
                            0,
                            block_size,
                            max_batch.max(context),
                        )?;
                        let prefill = gpu::prefill(&mut backend, &tables, context, context)?;
                        let graphs = GraphPolicy::new(
                            DEFAULT_MAX_GRAPH_ROWS.min(max_batch.max(context)),
                            DEFAULT_MAX_GRAPH_CONTEXT,
                        );
                        for &b in &batch {
                            // Decode graphs (the default), then every pass eager.
                            backend.set_graph_policy(graphs.clone())?;
                            let (tps, ms) = gpu::decode(&mut backend, &tables, b, context, steps)?;
                            backend.set_graph_policy(GraphPolicy::eager())?;
                            let (eager, _) = gpu::decode(&mut backend, &tables, b, context, steps)?;
                            println!(
                                "{name:<6}{b:>7}{context:>9}{tps:>14.1}{ms:>10.2}{eager:>14.1}{prefill:>15.0}"
                            );
                        }
                    }};
                }
                match device {
                    convoy_engine::Device::Cuda => {
                        run_on!(convoy_kernels::cuda::driver::CudaDriverDevice::open(0)?)
                    }
                    convoy_engine::Device::CudaEmulated => {
                        run_on!(convoy_kernels::cuda::emulator::EmulatedDevice::new())
                    }
                    convoy_engine::Device::Cpu => {
                        bail!("gpu-decode runs the CUDA backend: --device cuda or cuda-emulated")
                    }
                }
            }
        }
        Cmd::GpuKernels { arch } => {
            use convoy_kernels::cuda::{full_source, nvrtc, SOURCES};
            let (major, minor) = nvrtc::version()?;
            println!("NVRTC {major}.{minor}, {arch}");
            for src in SOURCES {
                let t = Instant::now();
                let ptx = nvrtc::compile_ptx(&full_source(src), src.name, &arch)?;
                let missing: Vec<&str> = src
                    .kernels
                    .iter()
                    .copied()
                    .filter(|k| !ptx.contains(&format!(".entry {k}(")))
                    .collect();
                if !missing.is_empty() {
                    bail!("{}: kernels missing from the PTX: {missing:?}", src.name);
                }
                println!(
                    "{:<14} {} kernels, {} bytes of PTX, {:.0} ms",
                    src.name,
                    src.kernels.len(),
                    ptx.len(),
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        Cmd::Chat {
            model,
            turns,
            reply_tokens,
            block_sizes,
        } => {
            let model = model.on_cpu();
            let loaded = model.load()?;
            let sizes = if block_sizes.is_empty() {
                vec![loaded.block_size]
            } else {
                block_sizes
            };
            println!(
                "model: {}  threads: {}  {turns} turns, persona ~1000 tokens, replies <= {reply_tokens} tokens",
                model.model_path()?.display(),
                convoy_kernels::cpu::pool::num_threads()
            );
            println!(
                "{:>6} {:>7} {:>16} {:>16} {:>9} {:>10} {:>12}",
                "block",
                "cache",
                "turn-1 TTFT ms",
                "last TTFT ms",
                "speedup",
                "hit ratio",
                "decode tok/s"
            );
            for bs in sizes {
                let off = play_chat(&loaded, bs, false, turns, reply_tokens)?;
                let on = play_chat(&loaded, bs, true, turns, reply_tokens)?;
                for (name, r) in [("off", &off), ("on", &on)] {
                    println!(
                        "{bs:>6} {name:>7} {:>16.1} {:>16.1} {:>9.2} {:>10.3} {:>12.1}",
                        r.ttft_ms[0],
                        r.ttft_ms[turns - 1],
                        off.ttft_ms[turns - 1] / r.ttft_ms[turns - 1],
                        r.cached_tokens as f64 / r.prompt_tokens.max(1) as f64,
                        r.decode_tps
                    );
                }
            }
        }
    }
    Ok(())
}

/// The processor's model name, for reports ("unknown CPU" where /proc/cpuinfo has none).
pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("VmRSS not found")
}

fn median_ttft(socket: &Path, samples: usize) -> Result<f64> {
    use convoy_server::api::client::Client;
    use convoy_server::api::protocol::ServerEvent;
    let mut c = Client::connect(socket)?;
    // Microseconds, 3 significant digits: the daemon's own latency histograms' precision.
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for i in 0..samples {
        let (_, done) = c.generate(&serde_json::json!({"op": "generate", "id": format!("probe{i}"), "prompt_ids": [504, 3575, 282, 4649, 314, 1000 + i], "max_tokens": 1}))?;
        match done {
            ServerEvent::Done { timing, .. } => {
                h.saturating_record((timing.ttft_ms * 1e3).round().max(1.0) as u64)
            }
            other => bail!("probe failed: {other:?}"),
        }
    }
    Ok(h.value_at_quantile(0.5) as f64 / 1e3)
}

fn load(convoy: &Path, model: &Path, connections: usize, samples: usize) -> Result<()> {
    convoy_server::api::raise_fd_limit();
    let d = daemon::Spawned::start(
        convoy,
        model,
        "load",
        &["--max-connections".into(), (connections + 100).to_string()],
    )?;
    let (socket, child) = (&d.socket, &d.child);
    let result = (|| -> Result<()> {
        median_ttft(socket, 3)?; // warm up
        let idle_ttft = median_ttft(socket, samples)?;
        let rss_before = rss_kib(child.id())?;
        // One file descriptor per connection (the blocking client clones its stream).
        use std::io::{Read, Write};
        let mut open = Vec::with_capacity(connections);
        let t = Instant::now();
        for _ in 0..connections {
            open.push(std::os::unix::net::UnixStream::connect(socket)?);
        }
        // Make sure every connection is accepted and served once, then leave them idle.
        for c in open.iter_mut() {
            c.write_all(b"{\"op\":\"health\"}\n")?;
        }
        let mut buf = [0u8; 64];
        for c in open.iter_mut() {
            let mut got = Vec::new();
            while !got.contains(&b'\n') {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    bail!("a connection closed");
                }
                got.extend_from_slice(&buf[..n]);
            }
            if !got.starts_with(b"{\"event\":\"health\"") {
                bail!("unexpected answer: {}", String::from_utf8_lossy(&got));
            }
        }
        let opened = t.elapsed().as_secs_f64();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let rss_after = rss_kib(child.id())?;
        let busy_ttft = median_ttft(socket, samples)?;
        let per_conn = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / connections as f64;
        println!("daemon: {} with {}", convoy.display(), model.display());
        println!("{connections} idle connections opened and answered in {opened:.2} s");
        println!("daemon RSS: {rss_before} KiB before, {rss_after} KiB after: {per_conn:.0} bytes per connection (target < 65536)");
        println!("time to first token (median of {samples}): idle daemon {idle_ttft:.2} ms, with {connections} connections open {busy_ttft:.2} ms ({:+.1}%)", 100.0 * (busy_ttft / idle_ttft - 1.0));
        drop(open);
        Ok(())
    })();
    result
}
