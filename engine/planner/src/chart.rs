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
            self.draw_on(path, x, (1f64..y1 * 1.5).log_scale(), 1.0)
        } else {
            self.draw_on(path, x, 0f64..(y1 * 1.1).max(1e-3), f64::MIN)
        }
    }

    /// Draw with the y coordinate `y`; values are raised to at least `y_floor`.
    fn draw_on<Y>(
        &self,
        path: &Path,
        x: std::ops::Range<f64>,
        y: Y,
        y_floor: f64,
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
        c.configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .draw()?;
        for (i, (name, s)) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = s.iter().map(|&(x, y)| (x, y.max(y_floor))).collect();
            c.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            c.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        for (i, (name, v)) in self.hlines.iter().enumerate() {
            let color = Palette99::pick(self.series.len() + i).to_rgba();
            let v = *v;
            let dashes = (0..40).map(move |k| {
                let s = a + (b - a) * k as f64 / 40.0;
                PathElement::new(vec![(s, v), (s + (b - a) / 80.0, v)], color.stroke_width(1))
            });
            c.draw_series(dashes)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
