//! Recording outcomes into HDR histograms (microseconds, 3 significant digits) and turning
//! them into a [`RunResult`].

use std::time::Duration;

use hdrhistogram::Histogram;

use super::report::{
    Cache, Goodput, Latency, Offered, Percentiles, Requests, RunResult, Server, Slo, Throughput,
    TurnFigures,
};
use super::target::TurnOutcome;

fn histogram() -> Histogram<u64> {
    // 1 us .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        mean: h.mean() / 1000.0,
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

struct TurnStats {
    ttft: Histogram<u64>,
    e2e: Histogram<u64>,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Everything one run measured.
pub struct Recorder {
    slo: Slo,
    ttft: Histogram<u64>,
    tpot: Histogram<u64>,
    itl: Histogram<u64>,
    e2e: Histogram<u64>,
    engine_ttft: Histogram<u64>,
    edge: Histogram<u64>,
    turns: Vec<TurnStats>,
    requests: Requests,
    good: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    host_cached_tokens: u64,
    completion_tokens: u64,
    /// Server samples: (kv usage, preemptions so far, running, waiting).
    server: Vec<(f64, u64, usize, usize)>,
}

impl Recorder {
    /// An empty recorder counting goodput under `slo`.
    pub fn new(slo: Slo) -> Recorder {
        Recorder {
            slo,
            ttft: histogram(),
            tpot: histogram(),
            itl: histogram(),
            e2e: histogram(),
            engine_ttft: histogram(),
            edge: histogram(),
            turns: Vec::new(),
            requests: Requests::default(),
            good: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            host_cached_tokens: 0,
            completion_tokens: 0,
            server: Vec::new(),
        }
    }

    /// A conversation started.
    pub fn conversation_started(&mut self) {
        self.requests.conversations_started += 1;
    }

    /// Requests completed or failed so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.requests.completed, self.requests.failed)
    }

    /// A completed request of 0-based turn index `turn`.
    pub fn completed(&mut self, turn: usize, o: &TurnOutcome) {
        self.requests.completed += 1;
        record(&mut self.ttft, o.ttft);
        record(&mut self.e2e, o.e2e);
        if let Some(engine) = o.engine_ttft {
            record(&mut self.engine_ttft, engine);
            record(&mut self.edge, o.ttft.saturating_sub(engine));
        }
        for &g in &o.itl {
            record(&mut self.itl, g);
        }
        let tpot = (o.completion_tokens > 1)
            .then(|| o.e2e.saturating_sub(o.ttft) / (o.completion_tokens as u32 - 1));
        if let Some(t) = tpot {
            record(&mut self.tpot, t);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        if self.slo.met(ms(o.ttft), tpot.map(ms), ms(o.e2e)) {
            self.good += 1;
        }
        self.prompt_tokens += o.prompt_tokens as u64;
        self.cached_tokens += o.cached_tokens as u64;
        self.host_cached_tokens += o.host_cached_tokens as u64;
        self.completion_tokens += o.completion_tokens as u64;
        while self.turns.len() <= turn {
            self.turns.push(TurnStats {
                ttft: histogram(),
                e2e: histogram(),
                prompt_tokens: 0,
                cached_tokens: 0,
            });
        }
        let t = &mut self.turns[turn];
        record(&mut t.ttft, o.ttft);
        record(&mut t.e2e, o.e2e);
        t.prompt_tokens += o.prompt_tokens as u64;
        t.cached_tokens += (o.cached_tokens + o.host_cached_tokens) as u64;
    }

    /// A failed request.
    pub fn failed(&mut self, code: &str) {
        self.requests.failed += 1;
        *self.requests.errors.entry(code.to_string()).or_default() += 1;
    }

    /// A sample of the server's state.
    pub fn server_sample(
        &mut self,
        kv_usage: f64,
        preemptions: u64,
        running: usize,
        waiting: usize,
    ) {
        self.server.push((kv_usage, preemptions, running, waiting));
    }

    /// The figures over `duration`.
    pub fn result(&self, offered: Offered, duration: Duration) -> RunResult {
        let secs = duration.as_secs_f64().max(1e-9);
        let ratio = |c: u64, p: u64| if p == 0 { 0.0 } else { c as f64 / p as f64 };
        let (later_p, later_c) = self.turns.iter().skip(1).fold((0, 0), |(p, c), t| {
            (p + t.prompt_tokens, c + t.cached_tokens)
        });
        let server = (!self.server.is_empty()).then(|| {
            let n = self.server.len();
            Server {
                samples: n as u64,
                kv_usage_mean: self.server.iter().map(|s| s.0).sum::<f64>() / n as f64,
                kv_usage_max: self.server.iter().map(|s| s.0).fold(0.0, f64::max),
                preemptions: self.server[n - 1].1.saturating_sub(self.server[0].1),
                running_mean: self.server.iter().map(|s| s.2 as f64).sum::<f64>() / n as f64,
                max_running: self.server.iter().map(|s| s.2).max().unwrap_or(0),
                max_waiting: self.server.iter().map(|s| s.3).max().unwrap_or(0),
            }
        });
        RunResult {
            offered,
            duration_s: secs,
            requests: self.requests.clone(),
            throughput: Throughput {
                requests_per_s: self.requests.completed as f64 / secs,
                output_tokens_per_s: self.completion_tokens as f64 / secs,
                prompt_tokens_per_s: self.prompt_tokens as f64 / secs,
            },
            latency_ms: Latency {
                ttft: percentiles(&self.ttft),
                tpot: percentiles(&self.tpot),
                itl: percentiles(&self.itl),
                e2e: percentiles(&self.e2e),
                engine_ttft: (!self.engine_ttft.is_empty()).then(|| percentiles(&self.engine_ttft)),
                edge: (!self.edge.is_empty()).then(|| percentiles(&self.edge)),
            },
            goodput: Goodput {
                requests_per_s: self.good as f64 / secs,
                fraction: ratio(self.good, self.requests.completed),
            },
            cache: Cache {
                prompt_tokens: self.prompt_tokens,
                cached_tokens: self.cached_tokens,
                host_cached_tokens: self.host_cached_tokens,
                hit_ratio: ratio(
                    self.cached_tokens + self.host_cached_tokens,
                    self.prompt_tokens,
                ),
                later_turn_hit_ratio: ratio(later_c, later_p),
            },
            by_turn: self
                .turns
                .iter()
                .enumerate()
                .map(|(i, t)| TurnFigures {
                    turn: i + 1,
                    requests: t.ttft.len(),
                    ttft: percentiles(&t.ttft),
                    e2e: percentiles(&t.e2e),
                    mean_prompt_tokens: t.prompt_tokens as f64 / t.ttft.len().max(1) as f64,
                    hit_ratio: ratio(t.cached_tokens, t.prompt_tokens),
                })
                .collect(),
            server,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        ttft_ms: u64,
        e2e_ms: u64,
        tokens: usize,
        prompt: usize,
        cached: usize,
    ) -> TurnOutcome {
        TurnOutcome {
            ttft: Duration::from_millis(ttft_ms),
            e2e: Duration::from_millis(e2e_ms),
            itl: vec![Duration::from_millis(10); tokens.saturating_sub(1)],
            completion_tokens: tokens,
            prompt_tokens: prompt,
            cached_tokens: cached,
            ..Default::default()
        }
    }

    #[test]
    fn figures_and_goodput() {
        let slo = Slo {
            ttft_ms: Some(100.0),
            tpot_ms: None,
            e2e_ms: None,
        };
        let mut r = Recorder::new(slo);
        r.completed(0, &outcome(50, 150, 11, 100, 0));
        r.completed(1, &outcome(200, 300, 11, 200, 150));
        r.failed("queue_full");
        let offered = Offered {
            process: "poisson".into(),
            conversations_per_s: Some(1.0),
            messages_per_s: Some(2.0),
            cv: None,
            concurrency: None,
            seed: 1,
        };
        let res = r.result(offered, Duration::from_secs(2));
        assert_eq!(res.requests.completed, 2);
        assert_eq!(res.requests.errors["queue_full"], 1);
        assert!((res.throughput.requests_per_s - 1.0).abs() < 1e-9);
        assert!((res.goodput.requests_per_s - 0.5).abs() < 1e-9);
        assert!((res.latency_ms.ttft.max - 200.0).abs() < 0.5);
        // TPOT: (150 - 50) / 10 = 10 ms.
        assert!((res.latency_ms.tpot.p50 - 10.0).abs() < 0.1);
        assert!((res.cache.later_turn_hit_ratio - 0.75).abs() < 1e-9);
        assert!((res.cache.hit_ratio - 0.5).abs() < 1e-9);
        assert_eq!(res.by_turn.len(), 2);
    }
}
