//! Latency statistics and the `stats` answer.
//!
//! Time to first token, time per output token and end-to-end latency of every finished request
//! since start are recorded in HDR histograms (microseconds, 3 significant digits, up to one
//! hour; larger values saturate), so memory is bounded and constant, recording is O(1) on the
//! engine thread, and a `stats` call reads percentiles without sorting anything.

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::api::protocol::{CacheReport, KvReport, LatencyReport, StatsReport};
use convoy_engine::core::Done;
use convoy_engine::service::ServiceStats;
use convoy_scheduler::FinishReason;

/// Largest recorded value, in microseconds (one hour).
const MAX_MICROS: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

struct Histograms {
    ttft: Histogram<u64>,
    tpot: Histogram<u64>,
    total: Histogram<u64>,
}

/// Latencies of finished requests since start; shared by the engine thread (recording) and
/// the I/O thread (reading).
pub struct Latencies {
    inner: Mutex<Histograms>,
    /// The same requests in Prometheus histograms and counters (`/metrics`).
    pub(crate) metrics: crate::api::metrics::RequestMetrics,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            inner: Mutex::new(Histograms {
                ttft: histogram(),
                tpot: histogram(),
                total: histogram(),
            }),
            metrics: Default::default(),
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_MICROS)
}

impl Latencies {
    /// Record a finished request. Requests that produced no token (refused by a deadline
    /// before running, cancelled in the queue, failed) count only in the end-to-end figure.
    pub fn record(&self, d: &Done) {
        self.metrics.record(d);
        let mut h = self.inner.lock();
        h.total.saturating_record(micros(d.timing.total));
        let n = d.usage.completion_tokens;
        if n == 0 || d.finish_reason == FinishReason::Error {
            return;
        }
        h.ttft.saturating_record(micros(d.timing.ttft));
        if n >= 2 {
            let decode = d.timing.total.saturating_sub(d.timing.ttft);
            h.tpot.saturating_record(micros(decode / (n as u32 - 1)));
        }
    }

    /// Percentiles in milliseconds.
    pub fn report(&self) -> LatencyReport {
        let h = self.inner.lock();
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e3
            }
        };
        LatencyReport {
            requests: h.total.len(),
            ttft_p50: ms(&h.ttft, 0.5),
            ttft_p90: ms(&h.ttft, 0.9),
            ttft_p99: ms(&h.ttft, 0.99),
            ttft_max: ms(&h.ttft, 1.0),
            tpot_p50: ms(&h.tpot, 0.5),
            tpot_p90: ms(&h.tpot, 0.9),
            tpot_p99: ms(&h.tpot, 0.99),
            total_p50: ms(&h.total, 0.5),
            total_p90: ms(&h.total, 0.9),
            total_p99: ms(&h.total, 0.99),
            total_max: ms(&h.total, 1.0),
        }
    }
}

/// The `stats` answer from an engine snapshot and the daemon's own figures.
pub fn report(
    s: &ServiceStats,
    latency: LatencyReport,
    connections: usize,
    uptime_s: f64,
) -> StatsReport {
    let e = &s.engine;
    let prompt = e.prompt_tokens.max(1) as f64;
    StatsReport {
        queue: s.waiting,
        running: s.running,
        connections,
        kv: KvReport {
            block_size: s.block_size,
            device_blocks: s.device_blocks,
            device_blocks_held: s.device_blocks_held,
            device_blocks_cached: s.device_blocks_cached,
            host_blocks: s.host_blocks,
            host_blocks_cached: s.host_blocks_cached,
            device_usage: s.device_blocks_held as f64 / s.device_blocks.max(1) as f64,
        },
        cache: CacheReport {
            prompt_tokens: e.prompt_tokens,
            cached_prompt_tokens: e.cached_prompt_tokens,
            hit_ratio: e.cached_prompt_tokens as f64 / prompt,
            device_hit_ratio: (e.cached_prompt_tokens - e.host_cached_prompt_tokens) as f64
                / prompt,
            host_hit_ratio: e.host_cached_prompt_tokens as f64 / prompt,
            swapped_out_blocks: e.cache.swapped_out_blocks,
            swapped_in_blocks: e.cache.swapped_in_blocks,
        },
        generated_tokens: e.generated_tokens,
        generated_tokens_per_s: e.generated_tokens as f64 / uptime_s.max(1e-9),
        finished_requests: e.finished_requests,
        preemptions: e.preemptions,
        latency_ms: latency,
        verified_prefills: e.verified_prefills,
        cache_divergence_total: e.cache_divergence_total,
        uptime_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_engine::core::{Timing, Usage};
    use std::time::Duration;

    fn done(ttft_ms: u64, total_ms: u64, tokens: usize) -> Done {
        Done {
            finish_reason: FinishReason::Stop,
            output_ids: vec![],
            text: String::new(),
            unsent_text: String::new(),
            usage: Usage {
                completion_tokens: tokens,
                ..Default::default()
            },
            timing: Timing {
                admit: Duration::ZERO,
                queue: Duration::ZERO,
                ttft: Duration::from_millis(ttft_ms),
                total: Duration::from_millis(total_ms),
            },
        }
    }

    #[test]
    fn percentiles_cover_every_request_since_start() {
        let l = Latencies::default();
        // 1,000 requests: TTFT 1..=1000 ms, each then 11 tokens at 10 ms apart.
        for i in 1..=1000 {
            l.record(&done(i, i + 100, 11));
        }
        // A request that never produced a token counts only end to end.
        l.record(&done(0, 5, 0));
        let r = l.report();
        assert_eq!(r.requests, 1001);
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.002;
        assert!(close(r.ttft_p50, 500.0), "{}", r.ttft_p50);
        assert!(close(r.ttft_p99, 990.0), "{}", r.ttft_p99);
        assert!(close(r.ttft_max, 1000.0), "{}", r.ttft_max);
        assert!(close(r.tpot_p50, 10.0) && close(r.tpot_p99, 10.0), "{r:?}");
        assert!(close(r.total_max, 1100.0), "{}", r.total_max);
    }
}
