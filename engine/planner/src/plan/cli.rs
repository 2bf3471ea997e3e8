//! `convoy plan`: the command line over [`Planner`] (docs/planning.md).
//!
//! Without `--gpus` it answers "how few GPUs meet these SLOs" (and, with `--relax-*`, how many
//! a looser SLO frees); with `--gpus N` it reports the latencies of that fleet; with both, the
//! curve between. `--json` prints one JSON document instead of tables.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::fleet::{FleetReport, Router};
use super::profile::{GpuSpec, ModelShape, Profile, RooflineOptions};
use super::search::{BatchConfig, PlanOptions, Planner, Slo};
use super::PlanError;
use crate::workload::WorkloadSpec;

/// `--router`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterArg {
    /// Consistent hash of the conversation id.
    Sticky,
    /// Requests in turn.
    RoundRobin,
    /// Fewest running + waiting.
    LeastLoaded,
}

/// Arguments of `convoy plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// The workload spec (TOML or JSON; the same files `convoy-bench run` plays).
    #[arg(long)]
    pub workload: PathBuf,
    /// Offered load in messages (requests) per second, whole fleet (open loop; default: the
    /// spec's arrival process).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Offered load in new conversations per second (`convoy-bench run --rate`'s unit).
    #[arg(long, conflicts_with = "rate")]
    pub conversation_rate: Option<f64>,
    /// A device profile (`convoy-bench calibrate --out`, or measured on a GPU).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// A roofline profile for this GPU: h100, h200, a100.
    #[arg(long, conflicts_with = "profile")]
    pub gpu: Option<String>,
    /// The model of a roofline profile: a config.json path or a name (llama-3-8b, ...).
    #[arg(long, requires = "gpu")]
    pub model_config: Option<String>,
    /// Roofline: share of peak bandwidth and FLOP/s reached.
    #[arg(long, default_value_t = 0.7)]
    pub efficiency: f64,
    /// Roofline: fixed milliseconds per step.
    #[arg(long, default_value_t = 0.5)]
    pub step_overhead_ms: f64,
    /// Roofline: host-tier KV cache per GPU, GiB.
    #[arg(long, default_value_t = 64.0)]
    pub host_cache_gib: f64,
    /// SLO: median time to first token, ms.
    #[arg(long)]
    pub slo_ttft_p50_ms: Option<f64>,
    /// SLO: 99th percentile time to first token, ms.
    #[arg(long)]
    pub slo_ttft_p99_ms: Option<f64>,
    /// SLO: 99th percentile time per output token, ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// SLO: 99th percentile end-to-end latency, ms.
    #[arg(long)]
    pub slo_e2e_ms: Option<f64>,
    /// Relaxed SLO: how many GPUs does this looser bound free?
    #[arg(long)]
    pub relax_ttft_p50_ms: Option<f64>,
    /// Relaxed SLO (p99 TTFT).
    #[arg(long)]
    pub relax_ttft_p99_ms: Option<f64>,
    /// Relaxed SLO (p99 TPOT).
    #[arg(long)]
    pub relax_tpot_ms: Option<f64>,
    /// Relaxed SLO (p99 end to end).
    #[arg(long)]
    pub relax_e2e_ms: Option<f64>,
    /// Router.
    #[arg(long, value_enum, default_value = "sticky")]
    pub router: RouterArg,
    /// Report this fleet size (with SLOs: also the curve from the fewest to this).
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Largest fleet the search tries.
    #[arg(long, default_value_t = 1024)]
    pub max_gpus: usize,
    /// Max running requests per replica (a list is searched; default: the profile's).
    #[arg(long, value_delimiter = ',')]
    pub max_running: Vec<usize>,
    /// Token budget per step (a list is searched; default: the profile's).
    #[arg(long, value_delimiter = ',')]
    pub max_batched_tokens: Vec<usize>,
    /// Step time target, ms (0 = off; default: the profile's, 250 like `convoy serve` for
    /// calibrated CPU profiles).
    #[arg(long)]
    pub step_time_target_ms: Option<f64>,
    /// Turn prefix caching off.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Write the simulated replica's steps (shape and modelled time, one JSON line each, the
    /// format of `convoy serve --step-log`) to this file, to compare with the daemon's.
    /// Needs `--gpus 1` and no search (no SLO).
    #[arg(long)]
    pub step_log: Option<std::path::PathBuf>,
    /// Replicas simulated in the engine when the fleet is larger.
    #[arg(long, default_value_t = 2)]
    pub sample_replicas: usize,
    /// Simulate every replica of fleets up to this size.
    #[arg(long, default_value_t = 2)]
    pub full_up_to: usize,
    /// Measured requests to aim for per run.
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Warm-up seconds (0 = measure from a cold start, like `convoy-bench run`).
    #[arg(long)]
    pub warmup_s: Option<f64>,
    /// Measured seconds of sends.
    #[arg(long)]
    pub window_s: Option<f64>,
    /// Seed of arrivals and routing.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seeds (`--seed` and the next ones) the fewest-GPUs answer must meet the SLOs on; the
    /// output gives the latencies' spread over them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub confirm_seeds: u64,
    /// How sure: also answer as if every step took this share longer than the profile says
    /// (0.1: 10% slower; negative: faster; 0: off). Near a fleet's knee a few percent of step
    /// time moves the latencies a lot, and no profile is exact.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub cost_margin: f64,
    /// Write the curve as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw the curve (latencies against GPUs, SLOs as lines) as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    fn slo(&self) -> Slo {
        Slo {
            ttft_p50_ms: self.slo_ttft_p50_ms,
            ttft_p99_ms: self.slo_ttft_p99_ms,
            tpot_p99_ms: self.slo_tpot_ms,
            e2e_p99_ms: self.slo_e2e_ms,
        }
    }

    fn relax(&self) -> Slo {
        Slo {
            ttft_p50_ms: self.relax_ttft_p50_ms,
            ttft_p99_ms: self.relax_ttft_p99_ms,
            tpot_p99_ms: self.relax_tpot_ms,
            e2e_p99_ms: self.relax_e2e_ms,
        }
    }
}

/// The profile the arguments name.
pub fn load_profile(args: &PlanArgs) -> Result<Profile, PlanError> {
    match (&args.profile, &args.gpu) {
        (Some(p), _) => Profile::load(p),
        (None, Some(g)) => {
            let gpu = GpuSpec::named(g).ok_or_else(|| PlanError::UnknownGpu(g.clone()))?;
            let m = args.model_config.as_deref().unwrap_or("llama-3-8b");
            let model = match ModelShape::named(m) {
                Some(s) => s,
                None if std::path::Path::new(m).exists() => {
                    ModelShape::from_config_file(std::path::Path::new(m))?
                }
                None => {
                    return Err(PlanError::ModelConfig {
                        what: m.to_string(),
                        message: format!(
                            "neither a file nor a known shape ({})",
                            ModelShape::NAMES.join(", ")
                        ),
                    })
                }
            };
            let o = RooflineOptions {
                efficiency: args.efficiency,
                step_overhead_s: args.step_overhead_ms / 1e3,
                host_cache_bytes: (args.host_cache_gib * (1u64 << 30) as f64) as u64,
                ..RooflineOptions::default()
            };
            Profile::roofline(&gpu, &model, &o)
        }
        (None, None) => Err(PlanError::ProfileMissing),
    }
}

fn fmt_ms(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn row(r: &FleetReport, meets: Option<bool>) -> String {
    format!(
        "{:>5} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6.3} {:>9.1} {:>6.1} {:>6}{}",
        r.gpus,
        r.max_running,
        r.max_batched_tokens,
        fmt_ms(r.ttft_p50_ms),
        fmt_ms(r.ttft_p99_ms),
        fmt_ms(r.tpot_p99_ms),
        fmt_ms(r.e2e_p99_ms),
        r.hit_ratio,
        r.requests_per_s,
        r.mean_batch,
        match meets {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        },
        if r.cannot_keep_up() {
            "  (overloaded)"
        } else if r.stopped_early {
            "  (stopped early)"
        } else {
            ""
        }
    )
}

const HEADER: &str =
    " gpus maxrun  tokens  ttft p50  ttft p99  tpot p99   e2e p99    hit     req/s  batch  meets";

/// Run `convoy plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    match plan(&args) {
        Ok(()) => Ok(()),
        Err(e) => {
            if args.json {
                let mut doc = json!({"error": {"code": e.code(), "message": e.to_string()}});
                if let PlanError::Unreachable { best, failing, .. } = &e {
                    doc["error"]["best"] = serde_json::to_value(best.as_ref())?;
                    doc["error"]["failing"] = json!(failing);
                }
                println!("{doc}");
            }
            Err(anyhow::anyhow!("{e} [{}]", e.code()))
        }
    }
}

fn plan(args: &PlanArgs) -> Result<(), PlanError> {
    let spec = WorkloadSpec::load(&args.workload)?;
    let profile = load_profile(args)?;
    if args.max_gpus == 0 || args.gpus == Some(0) {
        return Err(PlanError::invalid(
            "--gpus/--max-gpus",
            "must be at least 1",
        ));
    }
    let target = args
        .step_time_target_ms
        .unwrap_or(profile.defaults.step_time_target_ms);
    if !(target.is_finite() && target >= 0.0) {
        return Err(PlanError::invalid("--step-time-target-ms", "must be >= 0"));
    }
    let opts = PlanOptions {
        router: match args.router {
            RouterArg::Sticky => Router::Sticky,
            RouterArg::RoundRobin => Router::RoundRobin,
            RouterArg::LeastLoaded => Router::LeastLoaded,
        },
        seed: args.seed,
        confirm_seeds: args.confirm_seeds as usize,
        sample_replicas: args.sample_replicas,
        full_up_to: args.full_up_to,
        target_requests: args.requests,
        warmup_s: args.warmup_s,
        window_s: args.window_s,
        step_time_target: (target > 0.0).then(|| Duration::from_secs_f64(target / 1e3)),
        prefix_caching: !args.no_prefix_caching,
        step_log: args.step_log.clone(),
        progress: !args.json,
        ..PlanOptions::default()
    };
    if !(args.cost_margin.is_finite() && args.cost_margin > -0.5 && args.cost_margin <= 1.0) {
        return Err(PlanError::invalid(
            "--cost-margin",
            "must be between -0.5 and 1 (0.1: every step 10% slower)",
        ));
    }
    // A question with nothing to answer is refused before any work is announced.
    if args.slo().is_empty() && args.gpus.is_none() {
        return Err(PlanError::NoSlo);
    }
    if !args.json {
        eprintln!(
            "convoy plan: workload {}, simulating fleets (each line below is one; the answer follows)",
            args.workload.display()
        );
    }
    if args.step_log.is_some() && args.gpus != Some(1) {
        return Err(PlanError::invalid(
            "--step-log",
            "logs one simulated replica: give --gpus 1",
        ));
    }
    let mut rate = args.rate;
    let started = std::time::Instant::now();
    let mut planner = Planner::new(spec, None, profile, opts.clone())?;
    if let Some(c) = args.conversation_rate {
        rate = Some(c * planner.summary.mean_turns);
    }
    if rate.is_some() {
        let spec = WorkloadSpec::load(&args.workload)?;
        planner = Planner::new(spec, rate, planner.profile.clone(), opts)?;
    }
    let defaults = planner.default_batch();
    let runs: Vec<usize> = if args.max_running.is_empty() {
        vec![defaults.max_running]
    } else {
        args.max_running.clone()
    };
    let tokens: Vec<usize> = if args.max_batched_tokens.is_empty() {
        vec![defaults.max_batched_tokens]
    } else {
        args.max_batched_tokens.clone()
    };
    if runs.contains(&0) || tokens.contains(&0) {
        return Err(PlanError::invalid(
            "--max-running/--max-batched-tokens",
            "must be at least 1",
        ));
    }
    // The profile's default first: it is the likeliest winner and bounds the others.
    let mut grid: Vec<BatchConfig> = Vec::new();
    for &r in &runs {
        for &t in &tokens {
            grid.push(BatchConfig {
                max_running: r,
                max_batched_tokens: t,
            });
        }
    }
    grid.sort_by_key(|b| {
        (
            *b != defaults,
            std::cmp::Reverse(b.max_running),
            b.max_batched_tokens,
        )
    });
    let slo = args.slo();
    let relax = args.relax();
    let mut doc = json!({
        "profile": planner.profile.name,
        "profile_source": planner.profile.source,
        "router": planner.opts.router.name(),
        "messages_per_s": planner.messages_per_s,
        "workload": planner.summary,
        "slo": slo,
        "kv_blocks": planner.profile.memory.num_blocks(),
        "host_blocks": planner.profile.memory.num_host_blocks(),
        "block_size": planner.profile.memory.block_size,
        "step_time_target_ms": target,
    });
    let mut text = String::new();
    text.push_str(&format!(
        "profile: {} | router {} | load {} | KV {} blocks x {} tokens (+{} host)\n",
        planner.profile.name,
        planner.opts.router.name(),
        match planner.messages_per_s {
            Some(r) => format!("{r:.1} msg/s"),
            None => "closed loop / trace".into(),
        },
        planner.profile.memory.num_blocks(),
        planner.profile.memory.block_size,
        planner.profile.memory.num_host_blocks()
    ));
    let mut curve: Vec<(FleetReport, Option<bool>)> = Vec::new();
    // The --gpus fleet's latencies with the cost margin (no SLO: nothing to search).
    let mut margin_line: Option<String> = None;
    // Fleet sizes that met the SLOs on the search's seed but not on every confirming seed.
    let mut unconfirmed: Vec<usize> = Vec::new();
    if slo.is_empty() {
        let Some(n) = args.gpus else {
            return Err(PlanError::NoSlo);
        };
        if !relax.is_empty() {
            return Err(PlanError::invalid("--relax-*", "needs the strict SLOs too"));
        }
        for b in &grid {
            let r = planner.evaluate(n, *b);
            curve.push((r, None));
        }
        doc["at"] = serde_json::to_value(&curve[0].0).expect("a report serialises");
        if args.cost_margin != 0.0 {
            if !args.json {
                eprintln!(
                    "convoy plan: the same fleet with every step {} (--cost-margin {})",
                    describe_margin(args.cost_margin),
                    args.cost_margin
                );
            }
            let mut other = planner.with_cost_factor(1.0 + args.cost_margin)?;
            let r = other.evaluate(n, grid[0]);
            planner.runs += other.runs;
            let how = if r.cannot_keep_up() {
                "overloaded".to_string()
            } else {
                format!(
                    "TTFT p50 {} ms, p99 {} ms, TPOT p99 {} ms",
                    fmt_ms(r.ttft_p50_ms),
                    fmt_ms(r.ttft_p99_ms),
                    fmt_ms(r.tpot_p99_ms)
                )
            };
            margin_line = Some(format!(
                "with every step {}: {how}\n",
                describe_margin(args.cost_margin)
            ));
            doc["margin"] = json!({"cost_margin": args.cost_margin, "report": r});
        }
    } else {
        let found = planner.fewest(&slo, &grid, args.max_gpus)?;
        text.push_str(&format!(
            "fewest GPUs meeting {}: {} (max running {}, token budget {})\n",
            describe(&slo),
            found.gpus,
            found.batch.max_running,
            found.batch.max_batched_tokens
        ));
        text.push_str(&spread(&slo, &found.seed_reports));
        if args.cost_margin != 0.0 {
            text.push_str(&margin_answer(
                &mut planner,
                &slo,
                found.batch,
                found.gpus,
                args,
                &mut doc,
            )?);
        }
        unconfirmed.clone_from(&found.unconfirmed);
        doc["fewest"] = json!({
            "gpus": found.gpus,
            "batch": found.batch,
            "report": found.report,
            "seeds": found.seed_reports,
        });
        if let Some(n) = args.gpus {
            let r = planner.evaluate(n, found.batch);
            doc["at"] = serde_json::to_value(&r).expect("a report serialises");
            doc["at_failing"] = json!(slo.failures(&r));
        }
        let mut relaxed_gpus = None;
        if !relax.is_empty() {
            let loose = slo.relaxed(&relax);
            match planner.fewest(&loose, &grid, args.max_gpus) {
                Ok(l) => {
                    if l.batch == found.batch {
                        relaxed_gpus = Some(l.gpus);
                    }
                    text.push_str(&format!(
                        "fewest GPUs meeting {}: {} (max running {}, token budget {}): frees {} of {}\n",
                        describe(&loose),
                        l.gpus,
                        l.batch.max_running,
                        l.batch.max_batched_tokens,
                        found.gpus.saturating_sub(l.gpus),
                        found.gpus
                    ));
                    text.push_str(&spread(&loose, &l.seed_reports));
                    doc["relaxed"] = json!({
                        "slo": loose,
                        "gpus": l.gpus,
                        "batch": l.batch,
                        "report": l.report,
                        "frees": found.gpus.saturating_sub(l.gpus),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        // The curve: runs of the winning settings, the relaxed answer, and the span up to
        // --gpus.
        let mut points: Vec<usize> = found
            .runs
            .iter()
            .filter(|(b, _, _)| *b == found.batch)
            .map(|(_, r, _)| r.gpus)
            .collect();
        if let Some(n) = args.gpus {
            let (a, z) = (found.gpus.min(n), found.gpus.max(n));
            let steps = (z - a).clamp(1, 5);
            for i in 0..=steps {
                points.push(a + (z - a) * i / steps);
            }
        }
        points.extend(relaxed_gpus);
        points.sort_unstable();
        points.dedup();
        for n in points {
            let r = planner.evaluate(n, found.batch);
            let ok = slo.failures(&r).is_empty();
            curve.push((r, Some(ok)));
        }
    }
    text.push_str(HEADER);
    text.push('\n');
    for (r, ok) in &curve {
        text.push_str(&row(r, *ok));
        if *ok == Some(true) && unconfirmed.contains(&r.gpus) {
            text.push_str("  (fails on another seed)");
        }
        text.push('\n');
    }
    // The fleet asked about (--gpus): say it plainly when it cannot keep up.
    let asked = curve.iter().find(|(r, _)| Some(r.gpus) == args.gpus);
    if let (Some(offered), Some((r, _))) = (planner.messages_per_s, asked) {
        if r.cannot_keep_up() {
            text.push_str(&format!(
                "OVERLOADED at {} GPUs: {:.1} of the {offered:.1} messages/s offered are served; queues grow without bound\n",
                r.gpus, r.requests_per_s
            ));
        }
    }
    text.push_str(margin_line.as_deref().unwrap_or(""));
    if let Some((r, _)) = curve.first() {
        text.push_str(&format!(
            "simulated: {} of {} replicas per run, warm-up {:.0} s, window {:.1} s, {} measured requests; predicted output {:.0} tok/s\n",
            r.simulated_replicas, r.gpus, r.warmup_s, r.window_s, r.requests, r.output_tokens_per_s
        ));
    }
    text.push_str(&format!(
        "{} simulations in {:.1} s\n",
        planner.runs,
        started.elapsed().as_secs_f64()
    ));
    doc["curve"] = json!(curve
        .iter()
        .map(|(r, ok)| {
            let mut v = serde_json::to_value(r).expect("a report serialises");
            v["meets"] = json!(ok);
            v["cannot_keep_up"] = json!(r.cannot_keep_up());
            v
        })
        .collect::<Vec<_>>());
    doc["simulations"] = json!(planner.runs);
    doc["wall_s"] = json!(started.elapsed().as_secs_f64());
    if let Some(path) = &args.csv {
        let mut csv = String::from("gpus,max_running,max_batched_tokens,ttft_p50_ms,ttft_p99_ms,tpot_p50_ms,tpot_p99_ms,e2e_p50_ms,e2e_p99_ms,hit_ratio,requests_per_s,output_tokens_per_s,utilization,overloaded,meets\n");
        for (r, ok) in &curve {
            csv.push_str(&format!(
                "{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{:.3},{:.1},{:.3},{},{}\n",
                r.gpus,
                r.max_running,
                r.max_batched_tokens,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.tpot_p50_ms,
                r.tpot_p99_ms,
                r.e2e_p50_ms,
                r.e2e_p99_ms,
                r.hit_ratio,
                r.requests_per_s,
                r.output_tokens_per_s,
                r.utilization,
                r.cannot_keep_up(),
                ok.map_or("".into(), |b| b.to_string())
            ));
        }
        std::fs::write(path, csv).map_err(|e| {
            PlanError::invalid("--csv", format!("cannot write {}: {e}", path.display()))
        })?;
        text.push_str(&format!("curve written to {}\n", path.display()));
    }
    if let Some(path) = &args.plot {
        let mut lines: Vec<(String, f64)> = [
            ("TTFT p50", slo.ttft_p50_ms),
            ("TTFT p99", slo.ttft_p99_ms),
            ("TPOT p99", slo.tpot_p99_ms),
            ("E2E p99", slo.e2e_p99_ms),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (format!("SLO {n}"), v)))
        .collect();
        if !relax.is_empty() {
            let loose = slo.relaxed(&relax);
            let extra: Vec<(String, f64)> = [
                ("TTFT p50", loose.ttft_p50_ms),
                ("TTFT p99", loose.ttft_p99_ms),
                ("TPOT p99", loose.tpot_p99_ms),
                ("E2E p99", loose.e2e_p99_ms),
            ]
            .into_iter()
            .filter_map(|(n, v)| v.map(|v| (format!("relaxed SLO {n}"), v)))
            .collect();
            lines.extend(extra);
        }
        let mut answers = Vec::new();
        if let Some(n) = doc["fewest"]["gpus"].as_u64() {
            answers.push((format!("answer: {n} GPUs"), n as usize));
        }
        if let Some(n) = doc["relaxed"]["gpus"].as_u64() {
            answers.push((format!("relaxed answer: {n} GPUs"), n as usize));
        }
        super::plot::write_curve_svg(
            path,
            &planner
                .messages_per_s
                .map_or("convoy plan".to_string(), |r| {
                    format!("convoy plan: {r:.0} messages/s")
                }),
            &curve,
            &lines,
            &answers,
        )?;
        text.push_str(&format!("chart written to {}\n", path.display()));
    }
    if args.json {
        println!("{doc}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// `10% slower than the profile` for a margin of 0.1.
fn describe_margin(margin: f64) -> String {
    format!(
        "{:.0}% {} than the profile",
        100.0 * margin.abs(),
        if margin > 0.0 { "slower" } else { "faster" }
    )
}

/// The answer again with every step `1 + --cost-margin` times as long: one line saying how
/// many GPUs that takes (or that none up to `--max-gpus` does), recorded in `doc["margin"]`.
fn margin_answer(
    planner: &mut Planner,
    slo: &Slo,
    batch: BatchConfig,
    gpus: usize,
    args: &PlanArgs,
    doc: &mut serde_json::Value,
) -> Result<String, PlanError> {
    let margin = args.cost_margin;
    if !args.json {
        eprintln!(
            "convoy plan: the same question with every step {} (--cost-margin {margin})",
            describe_margin(margin)
        );
    }
    let mut other = planner.with_cost_factor(1.0 + margin)?;
    // Near the answer scaled by the margin: per-replica capacity moves with step time.
    let start = ((gpus as f64 * (1.0 + margin)).round() as usize).max(1);
    let found = other.fewest_from(slo, &[batch], args.max_gpus, Some(start));
    planner.runs += other.runs;
    let line = match found {
        Ok(m) => {
            let delta = m.gpus as i64 - gpus as i64;
            doc["margin"] = json!({
                "cost_margin": margin,
                "gpus": m.gpus,
                "report": m.report,
                "seeds": m.seed_reports,
            });
            format!(
                "  with every step {}: {} GPUs ({delta:+})\n",
                describe_margin(margin),
                m.gpus
            )
        }
        Err(PlanError::Unreachable { max_gpus, .. }) => {
            doc["margin"] = json!({"cost_margin": margin, "gpus": null});
            format!(
                "  with every step {}: no fleet of up to {max_gpus} GPUs meets them\n",
                describe_margin(margin)
            )
        }
        Err(e) => return Err(e),
    };
    Ok(line)
}

/// One line: how the answer's latencies under `slo` spread over the confirming seeds.
fn spread(slo: &Slo, reports: &[FleetReport]) -> String {
    let parts: Vec<String> = slo
        .objectives()
        .iter()
        .filter(|o| o.bound_ms.is_some())
        .map(|o| {
            let lo = reports.iter().map(o.of).fold(f64::INFINITY, f64::min);
            let hi = reports.iter().map(o.of).fold(f64::NEG_INFINITY, f64::max);
            format!("{} {}-{} ms", o.label, fmt_ms(lo), fmt_ms(hi))
        })
        .collect();
    format!(
        "  met on each of {} seeds of arrivals and routing: {}\n",
        reports.len(),
        parts.join(", ")
    )
}

fn describe(s: &Slo) -> String {
    let parts: Vec<String> = s
        .objectives()
        .iter()
        .filter_map(|o| o.bound_ms.map(|b| format!("{} <= {b} ms", o.label)))
        .collect();
    parts.join(", ")
}
