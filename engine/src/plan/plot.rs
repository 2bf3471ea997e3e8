//! The plan's curve as an SVG: TTFT p50/p99 and end-to-end p99 against the number of GPUs,
//! with the SLO bounds drawn as horizontal lines, so the fewest GPUs that meet them and what a
//! relaxation frees can be read off.

use std::path::Path;

use plotters::prelude::*;

use super::fleet::FleetReport;
use super::PlanError;

/// One latency of a fleet report.
type Metric = fn(&FleetReport) -> f64;

/// Write the curve (`(report, meets)` per fleet size) to `path`. `slo_lines` are drawn as
/// dashed horizontal lines with their names.
pub fn write_curve_svg(
    path: &Path,
    title: &str,
    curve: &[(FleetReport, Option<bool>)],
    slo_lines: &[(&str, f64)],
) -> Result<(), PlanError> {
    draw(path, title, curve, slo_lines)
        .map_err(|e| PlanError::invalid("--plot", format!("cannot draw {}: {e}", path.display())))
}

fn draw(
    path: &Path,
    title: &str,
    curve: &[(FleetReport, Option<bool>)],
    slo_lines: &[(&str, f64)],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut pts: Vec<&FleetReport> = curve.iter().map(|(r, _)| r).collect();
    pts.sort_by_key(|r| r.gpus);
    let series: [(&str, Metric); 3] = [
        ("TTFT p50", |r| r.ttft_p50_ms),
        ("TTFT p99", |r| r.ttft_p99_ms),
        ("E2E p99", |r| r.e2e_p99_ms),
    ];
    let x0 = pts.first().map_or(0, |r| r.gpus) as f64;
    let x1 = pts.last().map_or(1, |r| r.gpus) as f64;
    let y_max = pts
        .iter()
        .flat_map(|r| series.iter().map(move |(_, f)| f(r)))
        .chain(slo_lines.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), (1f64..y_max * 1.5).log_scale())?;
    c.configure_mesh()
        .x_desc("GPUs (replicas)")
        .y_desc("milliseconds (log)")
        .draw()?;
    for (i, (name, f)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = pts.iter().map(|r| (r.gpus as f64, f(r).max(1.0))).collect();
        c.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        c.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    for (i, (name, v)) in slo_lines.iter().enumerate() {
        let color = Palette99::pick(i + 3).to_rgba();
        let (a, b) = (x0 - pad, x1 + pad);
        let dashes = (0..40).map(move |k| {
            let s = a + (b - a) * k as f64 / 40.0;
            PathElement::new(
                vec![(s, *v), (s + (b - a) / 80.0, *v)],
                color.stroke_width(1),
            )
        });
        c.draw_series(dashes)?
            .label(format!("SLO {name}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
