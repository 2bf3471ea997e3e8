//! SVG plots of a report: latency percentiles and throughput/goodput against offered load.

use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::prelude::*;

use super::report::Report;

/// Write `latency.svg` and `goodput.svg` into `dir`; returns their paths. The x axis is the
/// offered load in messages/s (or the run's index when the load is not a rate).
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
    let latency = dir.join("latency.svg");
    let l = |f: fn(&super::report::RunResult) -> f64| -> Vec<(f64, f64)> {
        x.iter().copied().zip(report.runs.iter().map(f)).collect()
    };
    chart(
        &latency,
        "Latency against offered load",
        x_label,
        "milliseconds",
        &[
            ("TTFT p50", l(|r| r.latency_ms.ttft.p50)),
            ("TTFT p99", l(|r| r.latency_ms.ttft.p99)),
            ("E2E p50", l(|r| r.latency_ms.e2e.p50)),
            ("E2E p99", l(|r| r.latency_ms.e2e.p99)),
        ],
    )?;
    let goodput = dir.join("goodput.svg");
    chart(
        &goodput,
        "Throughput and goodput against offered load",
        x_label,
        "requests/s",
        &[
            ("completed", l(|r| r.throughput.requests_per_s)),
            ("meeting SLOs", l(|r| r.goodput.requests_per_s)),
        ],
    )?;
    Ok(vec![latency, goodput])
}

fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let pad = ((x1 - x0) * 0.05).max(0.05 * x1.abs().max(1e-3));
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..(y1 * 1.1).max(1e-3))?;
    c.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        c.draw_series(s.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
