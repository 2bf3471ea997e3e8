//! `convoy-bench calibrate`: measure step times of the real CPU forward pass on this machine at
//! a grid of batch shapes (prompt chunks at several context lengths, decode batches at several
//! sizes and contexts, and a mixed step), fit the simulator's linear cost model to them by
//! least squares on relative error, print the fit's error per shape, and write a profile that
//! `convoy plan --profile` loads (docs/planning.md).
//!
//! The profile carries the model's shape, the KV memory the daemon would size from the same
//! `--kv-cache-memory`/`--host-cache-memory`/`--block-size` flags, and `convoy serve`'s
//! scheduler defaults, so the planner can model one daemon exactly as it starts.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use convoy_engine::options::{parse_bytes, ModelArgs};
use convoy_engine::sim::{CostModel, StepShape};
use convoy_engine::{ForwardBatch, LlamaModel};
use convoy_planner::plan::profile::{
    fit_linear, KvMemory, ModelShape, Profile, ReplicaDefaults, TextCounts, PROFILE_FORMAT,
};

/// Arguments of `convoy-bench calibrate`.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write the profile here.
    #[arg(long, default_value = "profile.json")]
    out: PathBuf,
    /// Timings per shape; the median is kept.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    decode_batch: Vec<usize>,
    /// Context lengths (tokens already cached).
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    context: Vec<usize>,
    /// Prompt chunk sizes.
    #[arg(long, value_delimiter = ',', default_value = "32,128,384")]
    prefill: Vec<usize>,
    /// Fit the steps a daemon logged under real traffic (`convoy serve --step-log FILE`)
    /// instead of timing a grid of synthetic shapes: their whole step time (forward pass,
    /// sampling, detokenising, events) is what the planner then predicts. Repeatable.
    #[arg(long)]
    from_steps: Vec<PathBuf>,
    /// Take the per-request edge (TTFT minus the engine's own, median) from this
    /// `convoy-bench run` report of a socket target; the planner adds it to every request.
    /// Repeatable: from reports at several loads, the edge is fitted as a constant plus a
    /// share per running request (the daemon's mean running count in each report).
    #[arg(long)]
    edge_from: Vec<PathBuf>,
}

/// One measured step: its shape and its median time.
struct Sample {
    label: String,
    shape: StepShape,
    seconds: f64,
}

/// The features of the linear model: 1, prompt tokens, decoding sequences, context tokens
/// read, attention pairs.
fn features(s: &StepShape) -> Vec<f64> {
    vec![
        1.0,
        s.prefill_tokens as f64,
        s.decode_seqs as f64,
        s.kv_tokens as f64,
        s.attention_pairs as f64,
    ]
}

/// Time a step of sequences `(new tokens, cached tokens)`, each sampling its last row.
fn time_step(
    model: &LlamaModel,
    cache: &mut convoy_engine::KvCache,
    num_blocks: usize,
    block_size: usize,
    seqs: &[(usize, usize)],
    reps: usize,
) -> Option<(StepShape, f64)> {
    let vocab = model.config.vocab_size as u32;
    let mut next_block = 0u32;
    let mut fb = ForwardBatch::default();
    let mut shape = StepShape::default();
    for (i, &(n, c)) in seqs.iter().enumerate() {
        let blocks = (n + c).div_ceil(block_size) as u32;
        if (next_block + blocks) as usize > num_blocks {
            return None;
        }
        let table: Vec<u32> = (next_block..next_block + blocks).collect();
        next_block += blocks;
        let tokens: Vec<u32> = (0..n)
            .map(|t| ((t * 7919 + i * 104_729 + 13) as u32) % vocab)
            .collect();
        fb.push_seq(&tokens, c, &table, block_size, true);
        if n == 1 {
            shape.decode_seqs += 1;
        } else {
            shape.prefill_tokens += n;
        }
        shape.kv_tokens += c + n;
        shape.attention_pairs += (n * c + n * (n + 1) / 2) as u64;
        shape.sampled += 1;
    }
    let mut times: Vec<f64> = (0..reps.max(1) + 1)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(model.forward(&fb, cache));
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.remove(0); // the first run warms caches and the thread pool
    times.sort_by(f64::total_cmp);
    Some((shape, times[times.len() / 2]))
}

/// Time the forward pass at a grid of synthetic shapes.
fn time_grid(
    args: &CalibrateArgs,
    model: &LlamaModel,
    cache: &mut convoy_engine::KvCache,
    num_blocks: usize,
    block_size: usize,
) -> Vec<Sample> {
    let mut shapes: Vec<(String, Vec<(usize, usize)>)> = Vec::new();
    for &c in std::iter::once(&0).chain(&args.context) {
        for &n in &args.prefill {
            shapes.push((format!("prefill {n} at context {c}"), vec![(n, c)]));
        }
    }
    for &c in &args.context {
        for &b in &args.decode_batch {
            shapes.push((format!("decode x{b} at context {c}"), vec![(1, c); b]));
        }
    }
    let b = args.decode_batch.iter().copied().max().unwrap_or(8).min(16);
    let c = args.context.first().copied().unwrap_or(128);
    let n = args.prefill.get(1).copied().unwrap_or(128);
    let mut mixed = vec![(1, c); b];
    mixed.push((n, c));
    shapes.push((
        format!("mixed: decode x{b} + prefill {n} at context {c}"),
        mixed,
    ));
    let mut samples = Vec::new();
    for (label, seqs) in shapes {
        match time_step(model, cache, num_blocks, block_size, &seqs, args.reps) {
            Some((shape, seconds)) => samples.push(Sample {
                label,
                shape,
                seconds,
            }),
            None => println!("  skipped {label}: does not fit {num_blocks} KV blocks"),
        }
    }
    samples
}

/// The steps of daemon step logs, each a sample of its whole step time.
fn logged_steps(paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for path in paths {
        for r in convoy_engine::step_log::read_step_log(path)? {
            let shape = r.shape;
            let label = if shape.prefill_tokens > 0 {
                "steps with a prompt chunk"
            } else {
                "decode-only steps"
            };
            samples.push(Sample {
                label: label.into(),
                shape,
                seconds: r.step_s,
            });
        }
    }
    if samples.is_empty() {
        bail!("the step logs hold no steps");
    }
    Ok(samples)
}

/// How the model's tokenizer counts `convoy-bench run`'s synthetic text: tokens per word over
/// a few long texts, and what the `[conversation.turn] ` tag of a user message adds (the
/// workload's own format, `workload::conversation`). Nominal counts without a tokenizer.
fn text_counts(codec: &convoy_engine::TextCodec) -> TextCounts {
    use convoy_planner::workload::synthetic_text;
    let count = |t: &str| codec.encode(t).map(|ids| ids.len());
    let mut words = 0usize;
    let mut tokens = 0usize;
    let mut tag = 0usize;
    let mut tags = 0usize;
    for seed in 1..=4u64 {
        let text = synthetic_text(seed, 1000);
        let (Ok(n), Ok(short)) = (count(&text), count(&synthetic_text(seed, 20))) else {
            return TextCounts::default();
        };
        words += 1000;
        tokens += n;
        for (i, t) in [(seed * 37, 0), (seed * 1234, 3), (seed, 11)] {
            if let Ok(tagged) = count(&format!("[{i}.{t}] {}", synthetic_text(seed, 20))) {
                tag += tagged.saturating_sub(short);
                tags += 1;
            }
        }
    }
    let (assistant_header_tokens, default_system_tokens) = template_counts(codec);
    TextCounts {
        tokens_per_word: tokens as f64 / words as f64,
        user_tag_tokens: tag as f64 / tags.max(1) as f64,
        assistant_header_tokens,
        default_system_tokens,
    }
}

/// What the chat template adds beyond the planner's 5 framing tokens per message: the tokens
/// of the assistant header that ends a prompt, and of the system message it inserts into a
/// conversation that has none. The defaults (3, 0) without a template.
fn template_counts(codec: &convoy_engine::TextCodec) -> (u32, u32) {
    use convoy_weights::ChatMessage;
    let (system, user) = ("Be brief.", "What is the capital of France?");
    let count = |t: &str| codec.encode(t).map(|ids| ids.len());
    let chat = |m: &[ChatMessage]| codec.encode_chat(m).map(|ids| ids.len());
    let (Ok(s), Ok(u)) = (count(system), count(user)) else {
        return (3, 0);
    };
    let with_system = chat(&[
        ChatMessage::new("system", system),
        ChatMessage::new("user", user),
    ]);
    let without = chat(&[ChatMessage::new("user", user)]);
    let (Ok(with_system), Ok(without)) = (with_system, without) else {
        return (3, 0);
    };
    let header = with_system as i64 - (5 + s as i64) - (5 + u as i64);
    let default_system = without as i64 - (5 + u as i64) - header;
    if !(2..=64).contains(&header) || !(0..=4096).contains(&default_system) {
        return (3, 0);
    }
    (header as u32, default_system as u32)
}

/// One run of a `convoy-bench run` report: its median edge (seconds) and the daemon's mean
/// running requests (`None` in a report from before the bench recorded it).
struct EdgePoint {
    edge_s: f64,
    running: Option<f64>,
}

/// The runs of a `convoy-bench run` report of a socket target, as edge points.
fn edge_points(report: &std::path::Path) -> Result<Vec<EdgePoint>> {
    let text = std::fs::read_to_string(report)
        .map_err(|e| anyhow::anyhow!("--edge-from {}: {e}", report.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--edge-from {}: {e}", report.display()))?;
    let points: Vec<EdgePoint> = v["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some(EdgePoint {
                edge_s: r["latency_ms"]["edge"]["p50"].as_f64()? / 1e3,
                running: r["server"]["running_mean"].as_f64(),
            })
        })
        .collect();
    if points.is_empty() {
        bail!(
            "--edge-from {}: no run has latency_ms.edge (a socket target's report is needed)",
            report.display()
        );
    }
    Ok(points)
}

/// The per-request edge a profile carries: a constant and a share per running request.
#[derive(Clone, Copy, Debug, PartialEq)]
struct EdgeFit {
    /// Seconds with nothing else running (`CostModel::request_edge_s`).
    at_rest_s: f64,
    /// Seconds more per other request running (`CostModel::request_edge_per_running_s`).
    per_running_s: f64,
}

/// The edge from runs at any number of loads: none, no edge; one run, its median edge;
/// several, the least-squares line through (mean running, median edge), its slope kept `>= 0`
/// and its intercept too (refitted through the origin when it would go below). Runs from a
/// report without running counts give their mean edge, with a warning.
fn fit_edge(points: &[EdgePoint]) -> EdgeFit {
    let n = points.len().max(1) as f64;
    let mean_edge = points.iter().map(|p| p.edge_s).sum::<f64>() / n;
    let constant = EdgeFit {
        at_rest_s: mean_edge,
        per_running_s: 0.0,
    };
    if points.len() < 2 {
        return constant;
    }
    let Some(running): Option<Vec<f64>> = points.iter().map(|p| p.running).collect() else {
        eprintln!(
            "WARNING: --edge-from: a report has no server.running_mean (from an older convoy-bench), \
             so the edge is their mean, {:.1} ms, whatever the load; rerun them to fit it against \
             the running requests",
            mean_edge * 1e3
        );
        return constant;
    };
    let mean_running = running.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (p, r) in points.iter().zip(&running) {
        sxy += (r - mean_running) * (p.edge_s - mean_edge);
        sxx += (r - mean_running) * (r - mean_running);
    }
    if sxx <= 0.0 || sxy <= 0.0 {
        return constant;
    }
    let slope = sxy / sxx;
    let at_rest = mean_edge - slope * mean_running;
    if at_rest >= 0.0 {
        return EdgeFit {
            at_rest_s: at_rest,
            per_running_s: slope,
        };
    }
    // Through the origin: the best line with no negative edge at rest.
    let (xy, xx) = points
        .iter()
        .zip(&running)
        .fold((0.0, 0.0), |(xy, xx), (p, r)| {
            (xy + r * p.edge_s, xx + r * r)
        });
    EdgeFit {
        at_rest_s: 0.0,
        per_running_s: xy / xx,
    }
}

/// Run the calibration.
pub fn main(args: CalibrateArgs) -> Result<()> {
    let loaded = args.model.clone().on_cpu().load()?;
    let model = loaded.host_model()?;
    let cfg = &model.config;
    let block_size = loaded.block_size;
    let num_blocks = loaded.num_blocks;
    let mut cache = model.new_kv_cache(num_blocks, block_size);
    let path = args.model.model_path()?;
    let name = path
        .file_stem()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let how = if args.from_steps.is_empty() {
        format!("median of {} per shape", args.reps)
    } else {
        "from logged daemon steps".to_string()
    };
    println!(
        "calibrating {} on {} threads: {} KV blocks of {} tokens, {how}",
        path.display(),
        convoy_kernels::cpu::pool::num_threads(),
        num_blocks,
        block_size,
    );
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    let (samples, source_note) = if args.from_steps.is_empty() {
        let samples = time_grid(&args, model, &mut cache, num_blocks, block_size);
        let note = format!(
            "convoy-bench calibrate: forward pass only (scheduler and sampling not timed), median of {} runs per shape",
            args.reps
        );
        (samples, note)
    } else {
        let samples = logged_steps(&args.from_steps)?;
        let note = format!(
            "convoy-bench calibrate --from-steps: whole engine steps of a daemon under traffic ({} steps from {})",
            samples.len(),
            args.from_steps
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        (samples, note)
    };
    if samples.len() < 4 {
        bail!(
            "only {} shapes fit the KV cache; give a larger --kv-cache-memory",
            samples.len()
        );
    }
    let rows: Vec<(Vec<f64>, f64)> = samples
        .iter()
        .map(|s| (features(&s.shape), s.seconds))
        .collect();
    let Some((c, quality)) = fit_linear(&rows) else {
        bail!("the least-squares fit is singular (too few distinct shapes)");
    };
    let kv_per_token = convoy_engine::KvCache::block_bytes(
        cfg.num_layers,
        1,
        cfg.num_kv_heads,
        cfg.head_dim,
        model.kv_cache_dtype(),
    );
    let mut edge_runs = Vec::new();
    for report in &args.edge_from {
        edge_runs.extend(edge_points(report)?);
    }
    let edge = fit_edge(&edge_runs);
    let cost = CostModel {
        fixed_s: c[0],
        prefill_token_s: c[1],
        decode_token_s: c[2],
        kv_token_s: c[3],
        attention_pair_s: c[4],
        // Swaps are memory copies on the CPU backend: ~10 GB/s.
        copy_token_s: kv_per_token as f64 / 10e9,
        roofline: None,
        request_edge_s: edge.at_rest_s,
        request_edge_per_running_s: edge.per_running_s,
    };
    // One row per label (a grid shape, or a kind of logged step): mean times and the error
    // of their total.
    let mut groups: Vec<(&str, usize, f64, f64)> = Vec::new();
    for s in &samples {
        let p = cost.time(&s.shape);
        match groups.iter_mut().find(|g| g.0 == s.label) {
            Some(g) => {
                g.1 += 1;
                g.2 += s.seconds;
                g.3 += p;
            }
            None => groups.push((&s.label, 1, s.seconds, p)),
        }
    }
    println!(
        "{:<46} {:>6} {:>12} {:>12} {:>8}",
        "shape", "steps", "measured ms", "model ms", "error"
    );
    for (label, n, measured, predicted) in groups {
        println!(
            "{:<46} {:>6} {:>12.2} {:>12.2} {:>7.1}%",
            label,
            n,
            measured * 1e3 / n as f64,
            predicted * 1e3 / n as f64,
            100.0 * (predicted - measured) / measured
        );
    }
    println!(
        "fit: step = {:.3} ms + {:.1} us x prompt token + {:.1} us x decoding sequence + {:.2} ns x context token + {:.2} ns x attention pair",
        c[0] * 1e3,
        c[1] * 1e6,
        c[2] * 1e6,
        c[3] * 1e9,
        c[4] * 1e9
    );
    println!(
        "fit error over {} steps: rms {:.1}%, max {:.1}%  ({:.1} s of measuring)",
        quality.samples,
        100.0 * quality.rms_relative_error,
        100.0 * quality.max_relative_error,
        started.elapsed().as_secs_f64()
    );
    if args.from_steps.is_empty() {
        // The grid runs the forward pass on every thread of the pool; if they got much less
        // than their cores, something else was running and every time is off.
        let threads = convoy_kernels::cpu::pool::num_threads() as f64;
        let share =
            (process_cpu_seconds() - cpu_before) / (started.elapsed().as_secs_f64() * threads);
        if share < 0.8 {
            eprintln!(
                "WARNING: the measuring threads had {:.0}% of their {threads} cores: another process \
                 was using the CPU, so these step times, and a profile made of them, are wrong. \
                 Rerun calibrate on an idle machine.",
                100.0 * share
            );
        }
    }
    if quality.rms_relative_error > 0.2 {
        eprintln!(
            "WARNING: the fitted model misses the measured steps by {:.0}% (rms): a profile this far \
             off mispredicts latency. Look for another process using the CPU, or raise --reps.",
            100.0 * quality.rms_relative_error
        );
    }
    let text = text_counts(&loaded.codec);
    println!(
        "synthetic text: {:.3} tokens per word, {:.1} tokens per user-message tag; \
         chat template: {}-token assistant header, {}-token default system message",
        text.tokens_per_word,
        text.user_tag_tokens,
        text.assistant_header_tokens,
        text.default_system_tokens
    );
    let cpu = crate::cpu_name();
    let threads = convoy_kernels::cpu::pool::num_threads();
    let profile = Profile {
        format: PROFILE_FORMAT.into(),
        name: format!("{name} on {cpu} ({threads} threads)"),
        source: "calibrate".into(),
        model: ModelShape::from_config(&name, cfg),
        memory: KvMemory {
            kv_cache_bytes: parse_bytes(&args.model.kv_cache_memory)? as u64,
            host_cache_bytes: parse_bytes(&args.model.host_cache_memory)? as u64,
            block_size,
            kv_bytes_per_token: kv_per_token as u64,
        },
        text,
        defaults: ReplicaDefaults::default(),
        cost,
        fit: Some(quality),
        notes: source_note,
    };
    if let Err(e) = profile.validate() {
        bail!("the fitted profile is not valid: {e}");
    }
    profile.save(&args.out)?;
    if !edge_runs.is_empty() {
        let from: Vec<String> = args
            .edge_from
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let measured: Vec<String> = edge_runs
            .iter()
            .map(|p| match p.running {
                Some(r) => format!("{:.1} ms at {r:.1} running", p.edge_s * 1e3),
                None => format!("{:.1} ms", p.edge_s * 1e3),
            })
            .collect();
        println!(
            "request edge: {:.1} ms per request + {:.2} ms per other request running on the \
             replica (measured: {}; from {})",
            cost.request_edge_s * 1e3,
            cost.request_edge_per_running_s * 1e3,
            measured.join(", "),
            from.join(", ")
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// CPU seconds (user and system) this process has used, all threads together.
fn process_cpu_seconds() -> f64 {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
            t(u.user_time()) + t(u.system_time())
        }
        // Unknown: no warning rather than a false one.
        Err(_) => f64::NAN,
    }
}

#[cfg(test)]
mod template_tests {
    use super::template_counts;

    #[test]
    fn smollm2s_template_adds_a_four_token_header_and_a_default_system_message() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut loaded =
            convoy_weights::loader::load_model(&path, convoy_weights::loader::LoadFormat::Auto)
                .expect("SmolLM2 (scripts/fetch_models.sh)");
        let codec = convoy_engine::TextCodec::take_from(&mut loaded);
        // `<|im_start|>`, "ass", "istant", `\n`; "You are a helpful AI assistant named SmolLM,
        // trained by Hugging Face" framed as a system message.
        assert_eq!(template_counts(&codec), (4, 21));
    }
}

#[cfg(test)]
mod edge_tests {
    use super::{fit_edge, EdgeFit, EdgePoint};

    fn at(edge_ms: f64, running: Option<f64>) -> EdgePoint {
        EdgePoint {
            edge_s: edge_ms / 1e3,
            running,
        }
    }

    fn close(a: EdgeFit, at_rest_ms: f64, per_running_ms: f64) -> bool {
        (a.at_rest_s * 1e3 - at_rest_ms).abs() < 1e-9
            && (a.per_running_s * 1e3 - per_running_ms).abs() < 1e-9
    }

    #[test]
    fn the_edge_is_a_constant_plus_a_share_per_running_request() {
        // One load: its edge, nothing per request.
        assert!(close(fit_edge(&[]), 0.0, 0.0));
        let f = fit_edge(&[at(11.0, Some(1.5))]);
        assert!(close(f, 11.0, 0.0), "{f:?}");
        // Two loads: the line through them (10.9 ms at 0.75 running, 33.4 at 7.3).
        let f = fit_edge(&[at(10.9, Some(0.75)), at(33.4, Some(7.3))]);
        let slope = (33.4 - 10.9) / (7.3 - 0.75);
        assert!(close(f, 10.9 - slope * 0.75, slope), "{f:?}");
        // An edge that falls with load is noise: a constant, never a negative share.
        let f = fit_edge(&[at(12.0, Some(1.0)), at(10.0, Some(8.0))]);
        assert!(close(f, 11.0, 0.0), "{f:?}");
        // A line that would start below zero is refitted through the origin.
        let f = fit_edge(&[at(1.0, Some(2.0)), at(30.0, Some(4.0))]);
        assert!(
            close(f, 0.0, (2.0 * 1.0 + 4.0 * 30.0) / (4.0 + 16.0)),
            "{f:?}"
        );
        // Reports without running counts: their mean edge.
        let f = fit_edge(&[at(11.0, None), at(37.0, Some(9.0))]);
        assert!(close(f, 24.0, 0.0), "{f:?}");
    }
}
