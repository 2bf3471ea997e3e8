//! `convoy-bench host`: the daemon's host side at a GPU's cadence. It starts `convoy serve
//! --device sim` (a simulated GPU paced in real time, `--step-log` on), opens N streams on its
//! socket from this process, keeps each busy with back-to-back requests for the run, and
//! reports, over the measured window (after a warm-up):
//!
//! - host time per step: from one simulated execution's end to the next one's start (the
//!   engine thread's scheduling, detokenising, stop strings and events, and its command
//!   intake), against the simulated step;
//! - tokens delivered per second, and whether every token a `done` counted was read;
//! - event delay: from the end of the step that produced a token to the client's read of it,
//!   taken as the last step that ended before the read (a read that lags a whole step is
//!   attributed to a later step than its own, so the figure is a lower bound; reads of two
//!   tokens of one request after the same step show such lags and are counted apart);
//! - memory per live stream (the daemon's resident memory with N streams over its idle
//!   figure) and the CPU the daemon and the clients took.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::daemon::Spawned;
use convoy_server::api::protocol::ServerEvent;

/// The settings of one run.
#[derive(clap::Args, Clone, Debug)]
pub struct HostArgs {
    /// The convoy binary.
    #[arg(long, default_value = "target/release/convoy")]
    pub convoy: PathBuf,
    /// The tokenizer's model (no weights are computed).
    #[arg(long, default_value = convoy_engine::options::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Concurrent streams (connections, one request at a time each).
    #[arg(long, default_value_t = 1024)]
    pub streams: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds of warm-up before measuring (every stream started).
    #[arg(long, default_value_t = 10.0)]
    pub warmup: f64,
    /// Tokens per reply.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// The simulated GPU.
    #[arg(long, default_value = "h100")]
    pub sim_gpu: String,
    /// The simulated model shape.
    #[arg(long, default_value = "llama-3-8b")]
    pub sim_model: String,
}

fn epoch_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What one stream saw.
#[derive(Default)]
struct StreamLog {
    /// Read times (epoch seconds) of token events, per request, in order.
    reads: Vec<Vec<f64>>,
    /// Tokens the `done` events counted.
    done_tokens: usize,
    /// Token events read.
    token_events: usize,
    errors: Vec<String>,
}

async fn stream(
    socket: PathBuf,
    i: usize,
    max_tokens: usize,
    until: Instant,
    log: Arc<Mutex<StreamLog>>,
) {
    // Thousands of streams connect at once: a full listen backlog (EAGAIN) is retried, as a
    // client library would, for up to ten seconds.
    let mut wait = Duration::from_millis(5);
    let give_up = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < give_up => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                log.lock().errors.push(format!("connect: {e}"));
                return;
            }
        }
    };
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut k = 0u64;
    while Instant::now() < until {
        k += 1;
        let req = serde_json::json!({
            "op": "generate",
            "id": format!("r{k}"),
            "prompt": format!("Conversation {i}, turn {k}: tell me a story about the sea."),
            "max_tokens": max_tokens,
            "ignore_eos": true,
        });
        if w.write_all(format!("{req}\n").as_bytes()).await.is_err() {
            log.lock().errors.push("write failed".into());
            return;
        }
        let mut reads = Vec::with_capacity(max_tokens);
        loop {
            let line = match lines.next_line().await {
                Ok(Some(l)) => l,
                _ => {
                    log.lock().errors.push("connection closed".into());
                    return;
                }
            };
            if line.starts_with(r#"{"event":"token""#) {
                reads.push(epoch_s());
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => {
                    log.lock().errors.push(format!("bad line: {e}"));
                    return;
                }
            };
            if v["event"] == "done" {
                let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                let mut l = log.lock();
                l.done_tokens += n;
                l.token_events += reads.len();
                l.reads.push(reads);
                break;
            }
            log.lock().errors.push(format!("unexpected: {line}"));
            return;
        }
    }
}

/// The daemon's memory at a moment of the window, and how full its prefix cache's index was.
struct MemorySample {
    /// Seconds since the window opened.
    at_s: f64,
    /// Resident set size, bytes.
    rss: u64,
    /// Share of the device's blocks holding cached contents (`None` when `stats` did not
    /// answer in time).
    cached_share: Option<f64>,
}

/// Sample the daemon's memory, and ask `stats` how full the prefix cache's index is (on a
/// connection of its own, given two seconds: a sample never stalls the clients).
async fn sample(pid: u32, socket: &Path, window_start: f64) -> MemorySample {
    let share = tokio::time::timeout(Duration::from_secs(2), cached_share(socket)).await;
    MemorySample {
        at_s: epoch_s() - window_start,
        rss: rss_bytes(pid),
        cached_share: share.ok().flatten(),
    }
}

/// The share of the device's blocks holding cached contents, from a `stats` answer.
async fn cached_share(socket: &Path) -> Option<f64> {
    let (r, mut w) = tokio::net::UnixStream::connect(socket)
        .await
        .ok()?
        .into_split();
    w.write_all(b"{\"op\":\"stats\"}\n").await.ok()?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await.ok()? {
        if let Ok(ServerEvent::Stats { stats }) = serde_json::from_str(&line) {
            return Some(
                stats.kv.device_blocks_cached as f64 / stats.kv.device_blocks.max(1) as f64,
            );
        }
    }
    None
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds of a process (user + system).
fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One step of the daemon's step log: when its execution started and how long it took.
struct Step {
    at: f64,
    execute: f64,
}

fn read_steps(path: &Path) -> Result<Vec<Step>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut steps = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        steps.push(Step {
            at: v["at_s"].as_f64().unwrap_or(0.0),
            execute: v["execute_s"].as_f64().unwrap_or(0.0),
        });
    }
    Ok(steps)
}

/// Run the benchmark and print its table.
pub fn run(args: &HostArgs) -> Result<()> {
    convoy_server::api::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("convoy-bench-host-steps-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let step_log = dir.join("steps.jsonl");
    let n = args.streams;
    let extra: Vec<String> = [
        "--device",
        "sim",
        "--sim-gpu",
        &args.sim_gpu,
        "--sim-model",
        &args.sim_model,
        "--max-running",
        &n.to_string(),
        "--max-queued",
        &(2 * n).to_string(),
        // Every running stream decodes each step, and newcomers' prompts join them.
        "--max-batched-tokens",
        &(2 * n).max(2048).to_string(),
        "--max-connections",
        &(n + 64).to_string(),
        "--step-log",
        step_log.to_str().context("a UTF-8 temp dir")?,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Spawned::start(&args.convoy, &args.model, "host", &extra)?;
    let pid = daemon.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_bytes(pid);
    let started = Instant::now();
    let warm_until = started + Duration::from_secs_f64(args.warmup);
    let until = warm_until + Duration::from_secs_f64(args.duration);
    let log = Arc::new(Mutex::new(StreamLog::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let me = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let my_cpu_before = me.user_time().tv_sec() as f64
        + me.user_time().tv_usec() as f64 / 1e6
        + me.system_time().tv_sec() as f64
        + me.system_time().tv_usec() as f64 / 1e6;
    let (window_start, window_end, live_rss, daemon_cpu, rss_samples) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tasks.push(tokio::spawn(stream(
                daemon.socket.clone(),
                i,
                args.max_tokens,
                until,
                log.clone(),
            )));
        }
        // Progress every five seconds, on a terminal or not.
        let mut next = Instant::now();
        while Instant::now() < warm_until {
            if Instant::now() >= next {
                eprintln!(
                    "convoy-bench host: warming up, {n} streams, {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                next += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let window_start = epoch_s();
        let live_rss = rss_bytes(pid);
        let cpu0 = cpu_s(pid);
        let mut rss_samples = vec![sample(pid, &daemon.socket, window_start).await];
        while Instant::now() < until {
            if Instant::now() >= next {
                rss_samples.push(sample(pid, &daemon.socket, window_start).await);
                let l = log.lock();
                eprintln!(
                    "convoy-bench host: measuring, {} requests done, {:.0} s left",
                    l.reads.len(),
                    until
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64()
                );
                next += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let window_end = epoch_s();
        let daemon_cpu = cpu_s(pid) - cpu0;
        for t in tasks {
            let _ = t.await;
        }
        rss_samples.push(sample(pid, &daemon.socket, window_start).await);
        (window_start, window_end, live_rss, daemon_cpu, rss_samples)
    });
    let me = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let my_cpu = me.user_time().tv_sec() as f64
        + me.user_time().tv_usec() as f64 / 1e6
        + me.system_time().tv_sec() as f64
        + me.system_time().tv_usec() as f64 / 1e6
        - my_cpu_before;
    drop(daemon);
    let steps = read_steps(&step_log)?;
    let _ = std::fs::remove_dir_all(&dir);
    let log = log.lock();
    if !log.errors.is_empty() {
        bail!(
            "{} stream errors, the first: {}",
            log.errors.len(),
            log.errors[0]
        );
    }
    // Host time between executions, over the window.
    let in_window: Vec<&Step> = steps
        .iter()
        .filter(|s| s.at >= window_start && s.at + s.execute <= window_end)
        .collect();
    let mut gaps: Vec<f64> = in_window
        .windows(2)
        .map(|w| w[1].at - (w[0].at + w[0].execute))
        .collect();
    gaps.sort_by(f64::total_cmp);
    let mean_exec =
        in_window.iter().map(|s| s.execute).sum::<f64>() / in_window.len().max(1) as f64;
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
    // Event delays: each read against the last step end before it.
    let ends: Vec<f64> = steps.iter().map(|s| s.at + s.execute).collect();
    let mut delays = Vec::new();
    let mut lagged = 0usize;
    let mut window_tokens = 0usize;
    for reads in &log.reads {
        let mut last_step = None;
        for &r in reads {
            if r < window_start || r > window_end {
                continue;
            }
            window_tokens += 1;
            let k = ends.partition_point(|&e| e <= r);
            if k == 0 {
                continue;
            }
            if last_step == Some(k) {
                lagged += 1;
            }
            last_step = Some(k);
            delays.push(r - ends[k - 1]);
        }
    }
    delays.sort_by(f64::total_cmp);
    let window = window_end - window_start;
    println!(
        "convoy-bench host: {n} streams, {} tokens per reply, simulated {} with {} ({} steps in a {:.0} s window)",
        args.max_tokens,
        args.sim_gpu,
        args.sim_model,
        in_window.len(),
        window
    );
    println!(
        "  simulated step (mean)             {:>9.2} ms",
        mean_exec * 1e3
    );
    println!(
        "  host time between steps           {:>9.2} ms mean, {:.2} p50, {:.2} p99 ({:.1}% of the step)",
        mean_gap * 1e3,
        percentile(&gaps, 0.5) * 1e3,
        percentile(&gaps, 0.99) * 1e3,
        100.0 * mean_gap / mean_exec.max(1e-12)
    );
    println!(
        "  tokens delivered                  {:>9.0} /s ({} in the window)",
        window_tokens as f64 / window,
        window_tokens
    );
    println!(
        "  every token delivered             {:>9} ({} read, {} counted by done)",
        if log.token_events == log.done_tokens {
            "yes"
        } else {
            "NO"
        },
        log.token_events,
        log.done_tokens
    );
    println!(
        "  event delay (step end to read)    {:>9.2} ms p50, {:.2} p99; {:.2}% of reads a step or more late",
        percentile(&delays, 0.5) * 1e3,
        percentile(&delays, 0.99) * 1e3,
        100.0 * lagged as f64 / window_tokens.max(1) as f64
    );
    println!(
        "  daemon memory per live stream     {:>9.1} KiB (RSS {:.0} MiB idle, {:.0} MiB with {n} streams)",
        (live_rss.saturating_sub(idle_rss)) as f64 / n as f64 / 1024.0,
        idle_rss as f64 / (1 << 20) as f64,
        live_rss as f64 / (1 << 20) as f64
    );
    // Six samples spread over the window: memory is flat when it stops growing once the
    // prefix cache's index has filled (its size is bounded by the device's blocks).
    let spread: Vec<String> = (0..6)
        .map(|i| &rss_samples[i * (rss_samples.len() - 1) / 5])
        .map(|s| {
            let cached = match s.cached_share {
                Some(c) => format!("{:.0}% cached", 100.0 * c),
                None => "cache n/a".into(),
            };
            format!(
                "{:.0} MiB ({cached}) at {:.0} s",
                s.rss as f64 / (1 << 20) as f64,
                s.at_s
            )
        })
        .collect();
    println!("  daemon RSS over the window        {}", spread.join(", "));
    println!(
        "  CPU                               {:>9.2} cores daemon (window), {:.2} cores clients (whole run)",
        daemon_cpu / window,
        my_cpu / (args.warmup + args.duration)
    );
    Ok(())
}
