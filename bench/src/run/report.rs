//! The report of `convoy-bench run`: what is printed and what is written as JSON. The JSON's
//! schema is docs/bench-report.schema.json (a test validates a real report against it);
//! every field is documented there and here. Times are milliseconds, rates per second.

use std::collections::BTreeMap;

use serde::Serialize;

/// Version tag of the JSON layout.
pub const SCHEMA: &str = "convoy-bench-run/1";

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
    /// The command line.
    pub command: Vec<String>,
    /// The machine that ran the load generator.
    pub machine: Machine,
    /// Where requests went.
    pub target: TargetInfo,
    /// The workload spec as played (after command-line overrides).
    pub workload: serde_json::Value,
    /// The service-level objectives that goodput counts.
    pub slo: Slo,
    /// One entry per offered load (one for a single run, several for `--sweep`).
    pub runs: Vec<RunResult>,
}

/// The load generator's machine.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
}

/// Where requests went.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    /// `socket` or `openai`.
    pub kind: String,
    /// Socket path or base URL.
    pub address: String,
    /// Whether `--spawn` started the daemon.
    pub spawned: bool,
}

/// Service-level objectives: a request is "good" when it meets every one given.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Slo {
    /// Time to first token, at most (ms).
    pub ttft_ms: Option<f64>,
    /// Time per output token after the first, at most (ms).
    pub tpot_ms: Option<f64>,
    /// End-to-end latency, at most (ms).
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// Whether a request with these latencies meets every objective.
    pub fn met(&self, ttft_ms: f64, tpot_ms: Option<f64>, e2e_ms: f64) -> bool {
        self.ttft_ms.is_none_or(|l| ttft_ms <= l)
            && self.e2e_ms.is_none_or(|l| e2e_ms <= l)
            && self.tpot_ms.is_none_or(|l| tpot_ms.is_none_or(|t| t <= l))
    }
}

/// The offered load of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Offered {
    /// `poisson`, `gamma`, `closed` or `trace`.
    pub process: String,
    /// New conversations per second (open processes).
    pub conversations_per_s: Option<f64>,
    /// Messages (requests) per second offered: conversations/s times mean turns.
    pub messages_per_s: Option<f64>,
    /// Gap coefficient of variation (gamma).
    pub cv: Option<f64>,
    /// Conversations alive at once (closed loop).
    pub concurrency: Option<usize>,
    /// Seed of this run's draws.
    pub seed: u64,
}

/// Percentiles of one latency (ms); all zero when `count` is 0.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Requests of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Requests {
    /// Completed.
    pub completed: u64,
    /// Failed, by code.
    pub failed: u64,
    /// Failures by code (server error codes, `http_<status>`, `disconnected`, `io`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Conversations started.
    pub conversations_started: u64,
}

/// Throughput of a run over its whole duration.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Throughput {
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt tokens per second.
    pub prompt_tokens_per_s: f64,
}

/// Latencies of a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Time to first token.
    pub ttft: Percentiles,
    /// Time per output token after the first (per request).
    pub tpot: Percentiles,
    /// Gaps between successive token events.
    pub itl: Percentiles,
    /// Send to the end.
    pub e2e: Percentiles,
    /// The engine's own time to first token, from the request's handoff (the `done` event's
    /// `ttft_ms` less its `admit_ms`; socket target only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_ttft: Option<Percentiles>,
    /// Per request, TTFT minus the daemon's own: the time outside the engine (the request's
    /// framing, templating and tokenising, and the first token's way back), socket target only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge: Option<Percentiles>,
}

/// Requests meeting every SLO.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Goodput {
    /// Good requests per second.
    pub requests_per_s: f64,
    /// Good requests over completed ones.
    pub fraction: f64,
}

/// The prefix cache's effect, from the servers' usage reports.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Cache {
    /// Prompt tokens of completed requests.
    pub prompt_tokens: u64,
    /// Of those, served from the device tier.
    pub cached_tokens: u64,
    /// Of those, served from the host tier.
    pub host_cached_tokens: u64,
    /// Both tiers over prompt tokens.
    pub hit_ratio: f64,
    /// The same over turns 2 and later (the turns a chat cache is for).
    pub later_turn_hit_ratio: f64,
}

/// Figures of one turn index of the conversations.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TurnFigures {
    /// 1-based turn index.
    pub turn: usize,
    /// Completed requests.
    pub requests: u64,
    /// Time to first token.
    pub ttft: Percentiles,
    /// End to end.
    pub e2e: Percentiles,
    /// Mean prompt tokens.
    pub mean_prompt_tokens: f64,
    /// Cached over prompt tokens.
    pub hit_ratio: f64,
}

/// What the server said about itself while the run went (convoy's socket `stats`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Server {
    /// Samples taken.
    pub samples: u64,
    /// Mean of `kv.device_usage`.
    pub kv_usage_mean: f64,
    /// Largest `kv.device_usage`.
    pub kv_usage_max: f64,
    /// Preemptions during the run.
    pub preemptions: u64,
    /// Mean of the requests running at each sample (a time average: samples are periodic).
    pub running_mean: f64,
    /// Most requests running at once.
    pub max_running: usize,
    /// Most requests waiting at once.
    pub max_waiting: usize,
}

/// One offered load's results.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The load.
    pub offered: Offered,
    /// Seconds from the first send to the last end.
    pub duration_s: f64,
    /// Counts.
    pub requests: Requests,
    /// Throughput.
    pub throughput: Throughput,
    /// Latencies.
    pub latency_ms: Latency,
    /// Goodput under the report's SLOs.
    pub goodput: Goodput,
    /// Cache effect.
    pub cache: Cache,
    /// Per turn index.
    pub by_turn: Vec<TurnFigures>,
    /// Server samples (socket target only; null otherwise).
    pub server: Option<Server>,
}

/// How a run's load is named in the tables.
fn load_label(o: &Offered) -> String {
    match (o.conversations_per_s, o.concurrency) {
        (Some(c), _) => format!("{c:.3}"),
        (None, Some(n)) => format!("closed {n}"),
        _ => "trace".into(),
    }
}

/// The run as a table (one line per offered load, under 100 columns, every column named in a
/// legend), then per-turn figures of each. TTFT's p90 and max, inter-token latency and the
/// rest are in the JSON report. `window_s`: the seconds in which each run started turns.
pub fn print_tables(report: &Report, window_s: f64) {
    println!(
        "load: conversations/s offered (or N alive at once, closed loop); msg/s: messages/s that \
         load offers\non average; done/fail: requests completed/failed; req/s: completed over \
         the run's time; out t/s: tokens/s made"
    );
    println!(
        "times in ms; goodput: requests/s that met the SLOs; hit2+: share of prompt tokens served \
         from the cache on turns 2 and later; TTFT p90/max, ITL and more in --report JSON"
    );
    println!(
        "{:>8} {:>6} {:>6} {:>4} {:>7} {:>8} {:>12} {:>11} {:>12} {:>8} {:>6}",
        "load",
        "msg/s",
        "done",
        "fail",
        "req/s",
        "out t/s",
        "TTFT p50/p99",
        "TPOT p50/99",
        "E2E p50/p99",
        "goodput",
        "hit2+"
    );
    for r in &report.runs {
        let l = &r.latency_ms;
        let load = load_label(&r.offered);
        println!(
            "{:>8} {:>6} {:>6} {:>4} {:>7.3} {:>8.1} {:>12} {:>11} {:>12} {:>8.3} {:>5.1}%",
            load,
            r.offered
                .messages_per_s
                .map_or("-".into(), |m| format!("{m:.3}")),
            r.requests.completed,
            r.requests.failed,
            r.throughput.requests_per_s,
            r.throughput.output_tokens_per_s,
            format!("{:.0}/{:.0}", l.ttft.p50, l.ttft.p99),
            format!("{:.1}/{:.1}", l.tpot.p50, l.tpot.p99),
            format!("{:.0}/{:.0}", l.e2e.p50, l.e2e.p99),
            r.goodput.requests_per_s,
            100.0 * r.cache.later_turn_hit_ratio,
        );
    }
    for r in &report.runs {
        println!();
        if let Some(rate) = r.offered.conversations_per_s {
            println!(
                "load {}: {} conversations started ({:.1} expected at {rate} conv/s in the {:.0} s \
                 window); the run took {:.1} s (the turns in flight at the window's end finish)",
                load_label(&r.offered),
                r.requests.conversations_started,
                rate * window_s,
                window_s,
                r.duration_s
            );
        }
        println!(
            "load {}: hit ratio {:.1}% (device {} + host {} of {} prompt tokens); errors {:?}",
            load_label(&r.offered),
            100.0 * r.cache.hit_ratio,
            r.cache.cached_tokens,
            r.cache.host_cached_tokens,
            r.cache.prompt_tokens,
            r.requests.errors
        );
        if let Some(s) = &r.server {
            println!(
                "server: kv usage mean {} max {}, preemptions {}, max running {}, max waiting {}",
                usage_percent(s.kv_usage_mean),
                usage_percent(s.kv_usage_max),
                s.preemptions,
                s.max_running,
                s.max_waiting
            );
        }
        if let (Some(e), Some(edge)) = (&r.latency_ms.engine_ttft, &r.latency_ms.edge) {
            println!(
                "engine TTFT ms p50/p99 {:.0}/{:.0}; edge (the client's TTFT minus the engine's: framing, templating, tokenising, delivery) p50/p99 {:.0}/{:.0}",
                e.p50, e.p99, edge.p50, edge.p99
            );
        }
        println!(
            "{:>5} {:>6} {:>12} {:>19} {:>15} {:>7}",
            "turn", "done", "prompt tok", "TTFT ms p50/p99", "E2E ms p50/p99", "hit"
        );
        for t in &r.by_turn {
            println!(
                "{:>5} {:>6} {:>12.0} {:>19} {:>15} {:>6.1}%",
                t.turn,
                t.requests,
                t.mean_prompt_tokens,
                format!("{:.0}/{:.0}", t.ttft.p50, t.ttft.p99),
                format!("{:.0}/{:.0}", t.e2e.p50, t.e2e.p99),
                100.0 * t.hit_ratio
            );
        }
    }
}

/// A share of the KV cache in use as a percentage that never rounds a used cache to zero: a
/// small model in a large cache fills a few thousandths of it (`0.004%`, not `0.0%`).
fn usage_percent(share: f64) -> String {
    let p = 100.0 * share;
    if p == 0.0 || p >= 1.0 {
        format!("{p:.1}%")
    } else {
        // Two significant digits.
        let decimals = (1.0 - p.log10().floor()).clamp(1.0, 6.0) as usize;
        format!("{p:.decimals$}%")
    }
}

#[cfg(test)]
mod tests {
    use super::usage_percent;

    #[test]
    fn a_used_cache_never_shows_as_zero() {
        assert_eq!(usage_percent(0.0), "0.0%");
        assert_eq!(usage_percent(0.5), "50.0%");
        assert_eq!(usage_percent(0.009), "0.90%");
        assert_eq!(usage_percent(0.0012), "0.12%");
        assert_eq!(usage_percent(0.00004), "0.0040%");
    }
}
