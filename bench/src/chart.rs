//! The PNG chart: throughput by batch size for each variant.

use std::path::Path;

use plotters::prelude::*;

use crate::Report;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws events/s (log) against batch size (log): guard and floor as lines, the
/// baseline as a flat line.
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .map_err(|e| anyhow::anyhow!("{FONT}: {e} (install Debian's fonts-dejavu-core for the chart)"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("bad font {FONT}"))?;

    let series = |variant: &str| -> Vec<(f64, f64)> {
        report.rows.iter().filter(|r| r.variant == variant).map(|r| (r.batch as f64, r.events_per_sec)).collect()
    };
    let (guard, floor) = (series("guard"), series("floor"));
    let baseline = report.rows.iter().find(|r| r.variant == "baseline").map(|r| r.events_per_sec).unwrap_or(1.0);
    let max_batch = guard.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_rate = guard.iter().chain(&floor).map(|p| p.1).fold(baseline, f64::max);

    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Guarded events per second by batch size (25% duplicates)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8..max_batch * 1.3).log_scale(), (baseline / 2.0..max_rate * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("batch size (events)").y_desc("events / s").label_style(("sans-serif", 14)).draw()?;
    chart
        .draw_series(LineSeries::new(floor.clone(), RED.stroke_width(2)))?
        .label("floor: SET NX pipeline + one INSERT UNNEST")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(floor.iter().map(|p| Circle::new(*p, 4, RED.filled())))?;
    chart
        .draw_series(LineSeries::new(guard.clone(), BLUE.stroke_width(3)))?
        .label("guard (ours)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    chart.draw_series(guard.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new(vec![(0.8, baseline), (max_batch * 1.3, baseline)], BLACK.stroke_width(2)))?
        .label("baseline: common per-event design, 2 statements per event")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
