//! The plan's curve as an SVG: TTFT p50/p99 and end-to-end p99 against the number of GPUs,
//! with the SLO bounds drawn as horizontal lines, so the fewest GPUs that meet them and what a
//! relaxation frees can be read off.

use std::path::Path;

use super::fleet::FleetReport;
use super::PlanError;
use crate::chart::LineChart;

/// One latency of a fleet report.
type Metric = fn(&FleetReport) -> f64;

/// Write the curve (`(report, meets)` per fleet size) to `path`. `slo_lines` are drawn as
/// dashed horizontal lines with their names.
pub fn write_curve_svg(
    path: &Path,
    title: &str,
    curve: &[(FleetReport, Option<bool>)],
    slo_lines: &[(String, f64)],
    answers: &[(String, usize)],
) -> Result<(), PlanError> {
    let mut pts: Vec<&FleetReport> = curve.iter().map(|(r, _)| r).collect();
    pts.sort_by_key(|r| r.gpus);
    let series: [(&str, Metric); 4] = [
        ("TTFT p50", |r| r.ttft_p50_ms),
        ("TTFT p99", |r| r.ttft_p99_ms),
        ("TPOT p99", |r| r.tpot_p99_ms),
        ("E2E p99", |r| r.e2e_p99_ms),
    ];
    let chart = LineChart {
        title: title.to_string(),
        x_label: "GPUs (replicas)".into(),
        y_label: "milliseconds (log)".into(),
        log_y: true,
        series: series
            .iter()
            .map(|(name, f)| {
                let line = pts.iter().map(|r| (r.gpus as f64, f(r))).collect();
                (name.to_string(), line)
            })
            .collect(),
        hlines: slo_lines.to_vec(),
        vlines: answers
            .iter()
            .map(|(name, n)| (name.clone(), *n as f64))
            .collect(),
        x_integer: true,
    };
    chart
        .write_svg(path)
        .map_err(|e| PlanError::invalid("--plot", e.to_string()))
}
