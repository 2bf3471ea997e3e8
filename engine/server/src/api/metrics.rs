//! Prometheus metrics (docs/metrics.md), named in vLLM's style (`convoy:` prefix).
//!
//! Two kinds of figures:
//! - per-request histograms and counters ([`RequestMetrics`]), recorded once per finished
//!   request beside the HDR latencies (socket and HTTP requests alike), on the engine thread:
//!   atomic adds, no allocation;
//! - engine gauges and counters read at scrape time from one `stats` snapshot of the engine
//!   ([`Snapshot`], a scrape-time collector), so the engine keeps a single set of counters and
//!   `/metrics` and the socket's `stats` can never disagree.
//!
//! [`render`] writes the Prometheus text format (0.0.4), or OpenMetrics when the scraper asks
//! for it, with the official `prometheus-client` crate.

use std::borrow::Cow;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use convoy_scheduler::FinishReason;

use convoy_engine::core::Done;
use convoy_engine::service::ServiceStats;

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const TPOT_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

const REASONS: [FinishReason; 6] = [
    FinishReason::Stop,
    FinishReason::Length,
    FinishReason::Cancelled,
    FinishReason::Deadline,
    FinishReason::SlowConsumer,
    FinishReason::Error,
];

type ReasonLabel = [(&'static str, &'static str); 1];

/// Per-request figures, recorded when a request finishes.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    finished: Family<ReasonLabel, Counter>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let finished = Family::<ReasonLabel, Counter>::default();
        for r in REASONS {
            // Every reason is present from the start (at 0), so rates work from the first scrape.
            let _ = finished.get_or_create(&[("finished_reason", r.as_str())]);
        }
        RequestMetrics {
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            queue: Histogram::new(E2E_BUCKETS),
            finished,
        }
    }
}

impl RequestMetrics {
    /// Record a finished request: its end-to-end latency and finish reason always; time in the
    /// queue when it was scheduled; time to first token when it produced one; time per output
    /// token (its mean after the first) when it produced two or more.
    pub fn record(&self, d: &Done) {
        self.finished
            .get_or_create(&[("finished_reason", d.finish_reason.as_str())])
            .inc();
        self.e2e.observe(d.timing.total.as_secs_f64());
        let n = d.usage.completion_tokens;
        if n == 0 || d.finish_reason == FinishReason::Error {
            return;
        }
        self.queue.observe(d.timing.queue.as_secs_f64());
        self.ttft.observe(d.timing.ttft.as_secs_f64());
        if n >= 2 {
            let decode = d.timing.total.saturating_sub(d.timing.ttft);
            self.tpot.observe(decode.as_secs_f64() / (n - 1) as f64);
        }
    }
}

/// The figures read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The engine's snapshot.
    pub stats: ServiceStats,
    /// Open client connections (socket and HTTP).
    pub connections: usize,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    v: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let e = &s.engine;
        gauge(
            &mut enc,
            "convoy:num_requests_running",
            "Requests in the running batch",
            s.running as i64,
        )?;
        gauge(
            &mut enc,
            "convoy:num_requests_waiting",
            "Requests waiting to be scheduled",
            s.waiting as i64,
        )?;
        gauge(
            &mut enc,
            "convoy:num_connections",
            "Open client connections (Unix socket and HTTP)",
            self.connections as i64,
        )?;
        let usage = [
            (
                "device",
                s.device_blocks_held as f64 / s.device_blocks.max(1) as f64,
            ),
            (
                "host",
                s.host_blocks_cached as f64 / s.host_blocks.max(1) as f64,
            ),
        ];
        let mut m = enc.encode_descriptor(
            "convoy:kv_cache_usage_perc",
            "KV-cache usage per tier, 0 to 1: device blocks held by requests, host blocks holding cached contents",
            None,
            MetricType::Gauge,
        )?;
        for (tier, v) in usage {
            let labels = [("tier", tier)];
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        let blocks = [
            ("device", "total", s.device_blocks),
            ("device", "held", s.device_blocks_held),
            ("device", "cached", s.device_blocks_cached),
            ("host", "total", s.host_blocks),
            ("host", "cached", s.host_blocks_cached),
        ];
        let mut m = enc.encode_descriptor(
            "convoy:kv_cache_blocks",
            "KV-cache blocks per tier and state (total, held by requests, holding cached contents)",
            None,
            MetricType::Gauge,
        )?;
        for (tier, state, v) in blocks {
            let labels = [("tier", tier), ("state", state)];
            ConstGauge::new(v as i64).encode(m.encode_family(&labels)?)?;
        }
        gauge(
            &mut enc,
            "convoy:kv_cache_block_size",
            "Tokens per KV-cache block",
            s.block_size as i64,
        )?;
        counter(
            &mut enc,
            "convoy:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            e.cache.queried_tokens,
        )?;
        let mut m = enc.encode_descriptor(
            "convoy:prefix_cache_hits",
            "Prompt tokens served from the prefix cache, per tier",
            None,
            MetricType::Counter,
        )?;
        for (tier, v) in [
            ("device", e.cache.device_hit_tokens),
            ("host", e.cache.host_hit_tokens),
        ] {
            let labels = [("tier", tier)];
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        counter(
            &mut enc,
            "convoy:kv_cache_swapped_out_blocks",
            "Device KV blocks copied out to the host tier",
            e.cache.swapped_out_blocks,
        )?;
        counter(
            &mut enc,
            "convoy:kv_cache_swapped_in_blocks",
            "Host KV blocks copied back to the device",
            e.cache.swapped_in_blocks,
        )?;
        counter(
            &mut enc,
            "convoy:kv_cache_evicted_blocks",
            "Cached device KV blocks dropped without a host copy",
            e.cache.evicted_blocks,
        )?;
        counter(
            &mut enc,
            "convoy:num_preemptions",
            "Requests preempted for lack of KV blocks",
            e.preemptions,
        )?;
        counter(
            &mut enc,
            "convoy:prompt_tokens",
            "Prompt tokens of admitted requests",
            e.prompt_tokens,
        )?;
        counter(
            &mut enc,
            "convoy:generation_tokens",
            "Tokens generated",
            e.generated_tokens,
        )?;
        counter(
            &mut enc,
            "convoy:verified_prefills",
            "Cache-hit prefills recomputed by the --verify-cache oracle",
            e.verified_prefills,
        )?;
        counter(
            &mut enc,
            "convoy:cache_divergence",
            "Verified cache hits whose logits differed from a recomputation (should stay 0)",
            e.cache_divergence_total,
        )?;
        counter(&mut enc, "convoy:engine_steps", "Engine steps run", e.steps)?;
        Ok(())
    }
}

/// The exposition of every metric: the request histograms, then the snapshot. `model_name`
/// labels every series (as vLLM's `model_name`).
pub fn render(
    metrics: &RequestMetrics,
    snapshot: Snapshot,
    model_name: &str,
    openmetrics: bool,
) -> String {
    let labels = [(
        Cow::Borrowed("model_name"),
        Cow::Owned(model_name.to_string()),
    )];
    let mut registry = Registry::with_labels(labels.into_iter());
    registry.register(
        "convoy:time_to_first_token_seconds",
        "Time from arrival to the first token, per request",
        metrics.ttft.clone(),
    );
    registry.register(
        "convoy:time_per_output_token_seconds",
        "Mean time per output token after the first, per request with two or more tokens",
        metrics.tpot.clone(),
    );
    registry.register(
        "convoy:e2e_request_latency_seconds",
        "Time from arrival to the end, per finished request",
        metrics.e2e.clone(),
    );
    registry.register(
        "convoy:request_queue_time_seconds",
        "Time from arrival to first scheduled, per request that produced a token",
        metrics.queue.clone(),
    );
    registry.register(
        "convoy:request_finished",
        "Finished requests by finish reason",
        metrics.finished.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    let written = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    // Writing into a String cannot fail.
    debug_assert!(written.is_ok());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_engine::core::{Timing, Usage};
    use std::time::Duration;

    #[test]
    fn renders_both_formats_with_vllm_style_names() {
        let m = RequestMetrics::default();
        m.record(&Done {
            finish_reason: FinishReason::Stop,
            output_ids: vec![1, 2, 3],
            text: String::new(),
            unsent_text: String::new(),
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                ..Default::default()
            },
            timing: Timing {
                admit: Duration::ZERO,
                queue: Duration::from_millis(1),
                ttft: Duration::from_millis(30),
                total: Duration::from_millis(50),
            },
        });
        let mut snap = Snapshot::default();
        snap.stats.engine.prompt_tokens = 5;
        snap.stats.device_blocks = 10;
        snap.stats.device_blocks_held = 5;
        let text = render(&m, snap.clone(), "smol", false);
        for line in [
            "# TYPE convoy:prompt_tokens_total counter",
            "convoy:prompt_tokens_total{model_name=\"smol\"} 5",
            "convoy:kv_cache_usage_perc{model_name=\"smol\",tier=\"device\"} 0.5",
            "convoy:time_to_first_token_seconds_count{model_name=\"smol\"} 1",
            "convoy:time_per_output_token_seconds_sum{model_name=\"smol\"} 0.01",
            "convoy:request_finished_total{model_name=\"smol\",finished_reason=\"stop\"} 1",
            "convoy:request_finished_total{model_name=\"smol\",finished_reason=\"error\"} 0",
            "convoy:cache_divergence_total{model_name=\"smol\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let om = render(&m, snap, "smol", true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE convoy:prompt_tokens counter"), "{om}");
    }
}
