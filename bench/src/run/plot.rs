//! SVG plots of a report: latency percentiles and throughput/goodput against offered load.

use std::path::{Path, PathBuf};

use anyhow::Result;
use convoy_planner::chart::LineChart;

use super::report::{Report, RunResult};

/// One figure of a run.
type Figure = fn(&RunResult) -> f64;

/// Write `latency.svg` and `goodput.svg` into `dir`; returns their paths. The x axis is the
/// offered load in messages/s (or the run's index when the load is not a rate). With one run
/// each figure is a single point: sweep rates (`--sweep`) for curves.
pub fn write_plots(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    let x: Vec<f64> = report
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| r.offered.messages_per_s.unwrap_or(i as f64 + 1.0))
        .collect();
    let x_label = if report
        .runs
        .iter()
        .all(|r| r.offered.messages_per_s.is_some())
    {
        "offered load (messages/s)"
    } else {
        "run"
    };
    let series = |named: &[(&str, Figure)]| -> Vec<(String, Vec<(f64, f64)>)> {
        named
            .iter()
            .map(|(name, f)| {
                let line = x.iter().copied().zip(report.runs.iter().map(f)).collect();
                (name.to_string(), line)
            })
            .collect()
    };
    let latency = dir.join("latency.svg");
    LineChart {
        title: "Latency against offered load".into(),
        x_label: x_label.into(),
        y_label: "milliseconds".into(),
        series: series(&[
            ("TTFT p50", |r| r.latency_ms.ttft.p50),
            ("TTFT p99", |r| r.latency_ms.ttft.p99),
            ("E2E p50", |r| r.latency_ms.e2e.p50),
            ("E2E p99", |r| r.latency_ms.e2e.p99),
        ]),
        // The objectives the goodput counts, as lines to read the curves against.
        hlines: [
            ("SLO TTFT", report.slo.ttft_ms),
            ("SLO E2E", report.slo.e2e_ms),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
        .collect(),
        ..Default::default()
    }
    .write_svg(&latency)?;
    let goodput = dir.join("goodput.svg");
    LineChart {
        title: "Throughput and goodput against offered load".into(),
        x_label: x_label.into(),
        y_label: "requests/s".into(),
        series: series(&[
            ("completed", |r| r.throughput.requests_per_s),
            ("meeting SLOs", |r| r.goodput.requests_per_s),
        ]),
        ..Default::default()
    }
    .write_svg(&goodput)?;
    Ok(vec![latency, goodput])
}
