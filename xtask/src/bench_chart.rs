//! The bench chart (`bench-<direction>.svg`), drawn with plotters' SVG
//! backend: a grouped bar chart of the medians, the guard's cost below it.

use std::path::Path;

use anyhow::Result;

use crate::bench_report::{Cell, Report};

/// A grouped bar chart: one group per configuration, one bar per stream count.
pub fn write_svg(report: &Report, cells: &[Cell], path: &Path) -> Result<()> {
    use plotters::prelude::*;

    let labels = &report.order;
    let n = labels.len().max(1);
    let top = cells
        .iter()
        .filter_map(|c| c.median_gbps)
        .fold(1.0_f64, f64::max)
        * 1.15;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];

    // 24 px under the chart for the guard-cost note.
    let root = SVGBackend::new(path, (900, 504)).into_drawing_area();
    let (plot, note_area) = root.split_vertically(480);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let caption = format!(
            "iperf3 through the gateways, median of {} x {} s ({} CPUs, kernel {})",
            report.rounds, report.seconds, report.machine.cpus, report.machine.kernel
        );
        let mut chart = ChartBuilder::on(&plot)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            // Only whole numbers are group centres; other tick positions stay blank.
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("Gbit/s")
            .draw()?;
        let groups = report.streams.len().max(1) as f64;
        let width = 0.8 / groups;
        for (k, &streams) in report.streams.iter().enumerate() {
            let color = palette[k % palette.len()];
            let bars = labels.iter().enumerate().filter_map(|(i, label)| {
                let cell = cells
                    .iter()
                    .find(|c| c.streams == streams && &c.label == label)?;
                let x0 = i as f64 - 0.4 + k as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.95, cell.median_gbps?)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)?
                .label(format!("{streams} stream(s)"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        let costs: Vec<String> = report
            .guard_costs(cells)
            .iter()
            .map(|g| format!("{} P{} {:.3}x", g.config, g.streams, g.throughput_ratio))
            .collect();
        if !costs.is_empty() {
            let note = format!(
                "guard (XDP or tc), with/without (paired rounds): {}",
                costs.join(", ")
            );
            note_area.draw(&Text::new(note, (70, 4), ("sans-serif", 13)))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}
