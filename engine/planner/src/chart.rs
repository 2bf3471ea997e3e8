//! SVG line charts for reports: the planner's curve (`convoy plan --plot`) and the load
//! generator's sweeps (`convoy-bench run --plot-dir`). One drawing routine, so every chart
//! has the same layout: a caption, labelled axes, each series as a line with its points, dashed
//! horizontal reference lines (SLOs), and a legend. Text is left to the SVG viewer's fonts.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;

/// A chart that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct ChartError {
    /// The file.
    pub path: PathBuf,
    /// What the drawing backend said.
    pub message: String,
}

/// A line chart: series of `(x, y)` points against shared axes.
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    /// The caption.
    pub title: String,
    /// The x axis's description.
    pub x_label: String,
    /// The y axis's description.
    pub y_label: String,
    /// A logarithmic y axis from 1 (values below 1 are drawn at 1).
    pub log_y: bool,
    /// Named series, drawn in order with the palette's colours.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Named horizontal lines at a y value, drawn dashed.
    pub hlines: Vec<(String, f64)>,
    /// Named vertical lines at an x value (an answer), drawn solid and thick.
    pub vlines: Vec<(String, f64)>,
    /// The x values are counts: label the axis with whole numbers.
    pub x_integer: bool,
}

/// Series and line colours: strong and far apart, readable on white and in print.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(0, 0, 0),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];

/// A y tick's label: whole numbers without a fraction (`10000`, not `10000.0`), others with
/// at most three decimal places (`0.25`, `1.5`).
fn tick_label(y: f64) -> String {
    if y.fract() == 0.0 || y.abs() >= 100.0 {
        format!("{y:.0}")
    } else {
        let s = format!("{y:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn color(i: usize) -> RGBAColor {
    COLORS[i % COLORS.len()].to_rgba()
}

impl LineChart {
    /// Write the chart to `path` as SVG (800 x 500).
    pub fn write_svg(&self, path: &Path) -> Result<(), ChartError> {
        self.draw(path).map_err(|e| ChartError {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    fn draw(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let points = self.series.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1) = (f64::MAX, f64::MIN);
        let mut y1 = if self.log_y { 1f64 } else { 0f64 };
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            if y.is_finite() {
                y1 = y1.max(y);
            }
        }
        for (_, v) in &self.hlines {
            y1 = y1.max(*v);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        let pad = ((x1 - x0) * 0.05).max(0.05 * x1.abs().max(1e-3));
        let x = (x0 - pad)..(x1 + pad);
        if self.log_y {
            self.draw_on(path, x, (1f64..y1 * 1.5).log_scale(), 1.0, (1.0, y1 * 1.5))
        } else {
            let top = (y1 * 1.1).max(1e-3);
            self.draw_on(path, x, 0f64..top, f64::MIN, (0.0, top))
        }
    }

    /// Draw with the y coordinate `y`; values are raised to at least `y_floor`; vertical lines
    /// span `y_span`.
    fn draw_on<Y>(
        &self,
        path: &Path,
        x: std::ops::Range<f64>,
        y: Y,
        y_floor: f64,
        y_span: (f64, f64),
    ) -> Result<(), Box<dyn std::error::Error>>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let (a, b) = (x.start, x.end);
        let mut c = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x, y)?;
        let integer = self.x_integer;
        let x_fmt = move |x: &f64| {
            if integer {
                format!("{:.0}", x)
            } else {
                format!("{x}")
            }
        };
        c.configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|y: &f64| tick_label(*y))
            .draw()?;
        for (i, (name, s)) in self.series.iter().enumerate() {
            let color = color(i);
            let line: Vec<(f64, f64)> = s.iter().map(|&(x, y)| (x, y.max(y_floor))).collect();
            c.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            c.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        for (i, (name, v)) in self.hlines.iter().enumerate() {
            let color = color(self.series.len() + i);
            let v = *v;
            let dashes = (0..40).map(move |k| {
                let s = a + (b - a) * k as f64 / 40.0;
                PathElement::new(vec![(s, v), (s + (b - a) / 80.0, v)], color.stroke_width(1))
            });
            c.draw_series(dashes)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        for (i, (name, v)) in self.vlines.iter().enumerate() {
            let color = color(self.series.len() + self.hlines.len() + i);
            let v = *v;
            let (lo, hi) = y_span;
            c.draw_series(std::iter::once(PathElement::new(
                vec![(v, lo), (v, hi)],
                color.stroke_width(3),
            )))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::tick_label;

    #[test]
    fn tick_labels_drop_a_fraction_they_do_not_have() {
        let labels: Vec<String> = [10000.0, 1000.0, 1.0, 0.0, 2.5, 0.125, 0.1, 150.4]
            .into_iter()
            .map(tick_label)
            .collect();
        assert_eq!(
            labels,
            ["10000", "1000", "1", "0", "2.5", "0.125", "0.1", "150"]
        );
    }
}
