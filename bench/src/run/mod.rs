//! `convoy-bench run`: a load generator for a running daemon (its socket), any
//! OpenAI-compatible server (`--target openai`), or a daemon it starts itself (`--spawn`).
//!
//! It plays a workload spec (docs/workloads.md) at one offered load or a sweep of them and
//! reports time to first token, time per output token, inter-token latency and end-to-end
//! latency (HDR histograms), throughput, goodput under the SLOs given, the same per turn of a
//! conversation, the prefix cache's hit ratio from the servers' usage reports and, on convoy's
//! socket, KV usage and preemptions sampled from `stats`. Output: a table, a JSON report
//! (docs/bench-report.schema.json) and SVG plots of a sweep.
//!
//! Reproducibility: the same spec and seed give the same conversations and arrival times;
//! run `k` of a sweep uses seed `seed + k`, so no run finds the previous one's prompts cached.

mod driver;
mod plot;
mod record;
pub mod report;
mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_planner::workload::{ArrivalProcess, ArrivalProcessKind, Workload, WorkloadSpec};
use parking_lot::Mutex;

use driver::Phase;
use record::Recorder;
use report::{Machine, Offered, Report, Slo, TargetInfo, SCHEMA};
use target::{OpenAiTarget, Target};

/// Where `run` sends requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// convoy's JSON-lines Unix socket.
    Socket,
    /// An OpenAI-compatible HTTP server (streaming chat completions).
    Openai,
}

/// Arguments of `convoy-bench run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The workload spec (TOML, or JSON by extension; docs/workloads.md).
    #[arg(long)]
    pub workload: PathBuf,
    /// Where requests go.
    #[arg(long, value_enum, default_value = "socket")]
    pub target: TargetKind,
    /// The daemon's socket (socket target, without --spawn).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Base URL of the server (openai target, without --spawn), e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer token for the openai target (default: $OPENAI_API_KEY when set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The `model` field of OpenAI requests (default: the first model the server lists).
    #[arg(long, default_value = "")]
    pub model_name: String,
    /// Start `convoy serve` for the run (stopped at the end); daemon flags go after `--`.
    #[arg(long)]
    pub spawn: bool,
    /// The convoy binary for --spawn.
    #[arg(long, default_value = "target/release/convoy")]
    pub convoy: PathBuf,
    /// The model for --spawn.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Override the spec's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the arrival process.
    #[arg(long, value_enum)]
    pub arrival: Option<ArrivalArg>,
    /// Override the arrival rate (new conversations per second).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Run once per rate (new conversations per second), open loop.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f64>,
    /// Override the gap coefficient of variation (gamma arrivals).
    #[arg(long)]
    pub cv: Option<f64>,
    /// Override the closed-loop concurrency.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds in which conversations and turns start (each run of a sweep).
    #[arg(long, default_value_t = 60.0)]
    pub duration_s: f64,
    /// At most this many conversations per run (default: no limit, the duration decides).
    #[arg(long, default_value_t = u64::MAX, hide_default_value = true)]
    pub conversations: u64,
    /// Goodput SLO: time to first token at most this many ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// Goodput SLO: time per output token at most this many ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Goodput SLO: end-to-end latency at most this many ms.
    #[arg(long)]
    pub slo_e2e_ms: Option<f64>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write SVG plots (latency and goodput against offered load) into this directory.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Flags for the spawned daemon (after `--`).
    #[arg(last = true)]
    pub daemon_args: Vec<String>,
}

/// `--arrival`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArrivalArg {
    /// Exponential gaps.
    Poisson,
    /// Gamma gaps (`--cv`).
    Gamma,
    /// Fixed concurrency (`--concurrency`).
    Closed,
}

/// Apply the command line's overrides to the spec and check the result.
fn effective_spec(args: &RunArgs) -> Result<WorkloadSpec> {
    let mut spec =
        WorkloadSpec::load(&args.workload).map_err(|e| anyhow::anyhow!("{e} [{}]", e.code()))?;
    if let Some(s) = args.seed {
        spec.seed = s;
    }
    if let Some(a) = args.arrival {
        spec.arrival.process = match a {
            ArrivalArg::Poisson => ArrivalProcessKind::Poisson,
            ArrivalArg::Gamma => ArrivalProcessKind::Gamma,
            ArrivalArg::Closed => ArrivalProcessKind::Closed,
        };
    }
    if let Some(r) = args.rate {
        spec.arrival.rate = r;
    }
    if let Some(cv) = args.cv {
        spec.arrival.cv = cv;
    }
    if let Some(c) = args.concurrency {
        spec.arrival.concurrency = c;
    }
    if !args.sweep.is_empty() && spec.arrival.process == ArrivalProcessKind::Closed {
        bail!("--sweep needs an open arrival process (poisson or gamma), not closed");
    }
    if args.sweep.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("every --sweep rate must be > 0");
    }
    if !(args.duration_s.is_finite() && args.duration_s > 0.0) {
        bail!("--duration-s must be > 0");
    }
    for (name, v) in [
        ("--slo-ttft-ms", args.slo_ttft_ms),
        ("--slo-tpot-ms", args.slo_tpot_ms),
        ("--slo-e2e-ms", args.slo_e2e_ms),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{name} must be > 0");
        }
    }
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{e} [{}]", e.code()))?;
    Ok(spec)
}

/// Run the benchmark.
pub fn main(args: RunArgs) -> Result<()> {
    let spec = effective_spec(&args)?;
    let workload =
        Arc::new(Workload::new(spec.clone()).map_err(|e| anyhow::anyhow!("{e} [{}]", e.code()))?);
    // The daemon, when we start it; kept alive until the end of the run.
    let mut _spawned = None;
    let (mut target, address) = match args.target {
        TargetKind::Socket => {
            let socket = if args.spawn {
                let model = args.model.as_ref().context("--spawn needs --model")?;
                let d =
                    crate::daemon::Spawned::start(&args.convoy, model, "run", &args.daemon_args)?;
                let s = d.socket.clone();
                _spawned = Some(d);
                s
            } else {
                args.socket
                    .clone()
                    .context("the socket target needs --socket PATH (or --spawn)")?
            };
            (Target::Socket(socket.clone()), socket.display().to_string())
        }
        TargetKind::Openai => {
            let url = if args.spawn {
                let model = args.model.as_ref().context("--spawn needs --model")?;
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let mut extra = vec!["--http".to_string(), format!("127.0.0.1:{port}")];
                extra.extend(args.daemon_args.iter().cloned());
                _spawned = Some(crate::daemon::Spawned::start(
                    &args.convoy,
                    model,
                    "run",
                    &extra,
                )?);
                format!("http://127.0.0.1:{port}")
            } else {
                args.url
                    .clone()
                    .context("the openai target needs --url URL (or --spawn)")?
            };
            let key = args
                .api_key
                .clone()
                .or_else(|| std::env::var("OPENAI_API_KEY").ok());
            (
                Target::OpenAi(OpenAiTarget::new(&url, key, args.model_name.clone())?),
                url,
            )
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A spawned daemon answers once it is up; give it the time to load its model.
    let deadline = Instant::now() + Duration::from_secs(if args.spawn { 120 } else { 0 });
    loop {
        match rt.block_on(target.probe()) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        tpot_ms: args.slo_tpot_ms,
        e2e_ms: args.slo_e2e_ms,
    };
    let rates: Vec<Option<f64>> = if args.sweep.is_empty() {
        vec![None]
    } else {
        args.sweep.iter().map(|&r| Some(r)).collect()
    };
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let is_trace = workload.len().is_some();
    let mut runs = Vec::new();
    for (k, rate) in rates.iter().enumerate() {
        let seed = spec.seed + k as u64;
        let mut run_spec = spec.clone();
        run_spec.seed = seed;
        if let Some(r) = rate {
            run_spec.arrival.rate = *r;
        }
        // The first run of a plain run plays the workload prepared (and checked) above.
        let run_workload = if run_spec == *workload.spec() {
            workload.clone()
        } else {
            Arc::new(Workload::new(run_spec.clone()).map_err(|e| anyhow::anyhow!("{e}"))?)
        };
        let process = ArrivalProcess::from(&run_spec.arrival);
        let mean_turns = run_workload.mean_turns();
        let offered = match (is_trace, process) {
            (true, _) => Offered {
                process: "trace".into(),
                conversations_per_s: None,
                messages_per_s: None,
                cv: None,
                concurrency: None,
                seed,
            },
            (false, ArrivalProcess::Open { rate, cv }) => Offered {
                process: if run_spec.arrival.process == ArrivalProcessKind::Gamma {
                    "gamma".into()
                } else {
                    "poisson".into()
                },
                conversations_per_s: Some(rate),
                messages_per_s: Some(rate * mean_turns),
                cv: Some(cv),
                concurrency: None,
                seed,
            },
            (false, ArrivalProcess::Closed { concurrency }) => Offered {
                process: "closed".into(),
                conversations_per_s: None,
                messages_per_s: None,
                cv: None,
                concurrency: Some(concurrency),
                seed,
            },
        };
        let duration = Duration::from_secs_f64(args.duration_s);
        let phase = Phase {
            process,
            seed,
            duration,
            max_conversations: args.conversations,
        };
        let recorder = Arc::new(Mutex::new(Recorder::new(slo)));
        let progress = (!args.no_progress).then(|| {
            let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} s  {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("run {}/{}", k + 1, rates.len()));
            bar
        });
        let sampler = match &target {
            Target::Socket(path) => Some(rt.spawn(sample_stats(path.clone(), recorder.clone()))),
            Target::OpenAi(_) => None,
        };
        let elapsed = rt.block_on(driver::play(
            target.clone(),
            run_workload,
            recorder.clone(),
            &phase,
            progress.clone(),
        ));
        if let Some(s) = sampler {
            s.abort();
        }
        // One last sample so the run's preemptions are counted to its end.
        if let Target::Socket(path) = &target {
            let _ = rt.block_on(take_sample(path, &recorder));
        }
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        let result = recorder.lock().result(offered, elapsed);
        if result.requests.completed == 0 {
            eprintln!(
                "error: run {} completed no request (errors: {:?})",
                k + 1,
                result.requests.errors
            );
        }
        runs.push(result);
    }
    let report = Report {
        schema: SCHEMA,
        started_unix_s,
        command: std::env::args().collect(),
        machine: Machine {
            cpu: crate::cpu_name(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        target: TargetInfo {
            kind: match args.target {
                TargetKind::Socket => "socket".into(),
                TargetKind::Openai => "openai".into(),
            },
            address,
            spawned: args.spawn,
        },
        workload: serde_json::to_value(&spec)?,
        slo,
        runs,
    };
    report::print_tables(&report, args.duration_s);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nreport: {}", path.display());
    }
    if let Some(dir) = &args.plot_dir {
        std::fs::create_dir_all(dir)?;
        for f in plot::write_plots(&report, dir)? {
            println!("plot: {}", f.display());
        }
    }
    // A run where every request failed measured nothing: the report is written (its errors
    // say why), and the command fails.
    if let Some(k) = report.runs.iter().position(|r| r.requests.completed == 0) {
        let errors = &report.runs[k].requests.errors;
        let hint = if errors.contains_key("no_chat_template") {
            ": the model has no chat template; give the daemon one (after `--`, \
             --chat-template bench/workloads/compact.jinja for glassllm)"
        } else {
            ""
        };
        bail!(
            "run {} completed no request (errors: {errors:?}){hint}",
            k + 1
        );
    }
    Ok(())
}

/// Poll the daemon's `stats` every half second into the recorder.
async fn sample_stats(path: PathBuf, recorder: Arc<Mutex<Recorder>>) {
    loop {
        let t = Instant::now();
        if take_sample(&path, &recorder).await.is_err() {
            tracing::debug!("stats sample failed");
        }
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(t.elapsed())).await;
    }
}

async fn take_sample(path: &PathBuf, recorder: &Mutex<Recorder>) -> Result<()> {
    use convoy_server::api::protocol::ServerEvent;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::UnixStream::connect(path).await?;
    s.write_all(b"{\"op\":\"stats\"}\n").await?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await?;
    if let ServerEvent::Stats { stats } = serde_json::from_str(&line)? {
        recorder.lock().server_sample(
            stats.kv.device_usage,
            stats.preemptions,
            stats.running,
            stats.queue,
        );
    }
    Ok(())
}
