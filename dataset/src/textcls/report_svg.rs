//! The fine-tuning report as one self-contained SVG: the confusion matrices (dev and test) as
//! heatmaps with the counts written in the cells, and the training curves (train loss per step;
//! dev accuracy and macro-F1 per evaluation) as line charts with axes and ticks.
//!
//! Written by hand, without a plotting dependency: the picture is a few hundred elements, and
//! plain SVG opens in any browser or viewer.

use std::fmt::Write as _;

/// One confusion matrix to draw: `counts[gold][predicted]`, in [`ReportSeries::labels`] order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamedConfusion {
    /// The panel's title, e.g. `dev` or `test`.
    pub name: String,
    pub counts: Vec<Vec<u64>>,
}

/// Everything the picture shows. Points are `(step, value)`; non-finite values are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportSeries {
    pub title: String,
    pub labels: Vec<String>,
    pub confusions: Vec<NamedConfusion>,
    pub train_loss: Vec<(u64, f64)>,
    pub dev_accuracy: Vec<(u64, f64)>,
    pub dev_macro_f1: Vec<(u64, f64)>,
}

const WIDTH: f64 = 1000.0;
const PANEL_W: f64 = 500.0;
const TITLE_H: f64 = 40.0;
/// The heatmap's square grid, whatever the number of labels.
const GRID: f64 = 280.0;
/// Room for row labels left of the grid.
const HEAT_LEFT: f64 = 150.0;
/// Room above the grid (panel title) and below (rotated column labels, axis title).
const HEAT_TOP: f64 = 40.0;
const HEAT_BOTTOM: f64 = 110.0;
const CHART_H: f64 = 300.0;
/// Labels longer than this are cut on the axes (the full name stays in the cell tooltips).
const MAX_AXIS_LABEL: usize = 18;

const LOSS_COLOR: &str = "#d62728";
const ACCURACY_COLOR: &str = "#1f77b4";
const MACRO_F1_COLOR: &str = "#2ca02c";

/// The SVG document for `report`.
pub fn render_report_svg(report: &ReportSeries) -> String {
    let heat_h = HEAT_TOP + GRID + HEAT_BOTTOM;
    let heat_rows = report.confusions.len().div_ceil(2);
    let charts_top = TITLE_H + heat_rows as f64 * heat_h;
    let height = charts_top + CHART_H;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="26" font-size="18" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        xml_escape(&report.title)
    );
    for (i, confusion) in report.confusions.iter().enumerate() {
        let x = (i % 2) as f64 * PANEL_W;
        let y = TITLE_H + (i / 2) as f64 * heat_h;
        heatmap(&mut svg, x, y, &report.labels, confusion);
    }
    line_chart(
        &mut svg,
        0.0,
        charts_top,
        "train loss",
        &[Curve {
            name: "loss",
            color: LOSS_COLOR,
            points: &report.train_loss,
        }],
    );
    line_chart(
        &mut svg,
        PANEL_W,
        charts_top,
        "dev",
        &[
            Curve {
                name: "accuracy",
                color: ACCURACY_COLOR,
                points: &report.dev_accuracy,
            },
            Curve {
                name: "macro-F1",
                color: MACRO_F1_COLOR,
                points: &report.dev_macro_f1,
            },
        ],
    );
    svg.push_str("</svg>\n");
    svg
}

/// A confusion-matrix panel whose top-left corner is `(x, y)`. Shades are each cell's share of
/// its gold row (the recall view), so a small class is as readable as a large one.
fn heatmap(svg: &mut String, x: f64, y: f64, labels: &[String], confusion: &NamedConfusion) {
    let counts = &confusion.counts;
    let n = counts
        .len()
        .max(counts.iter().map(Vec::len).max().unwrap_or(0));
    let _ = writeln!(
        svg,
        r#"<g class="confusion" data-name="{}">"#,
        xml_escape(&confusion.name)
    );
    let (gx, gy) = (x + HEAT_LEFT, y + HEAT_TOP);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="14" text-anchor="middle">confusion: {} (rows gold, columns predicted)</text>"#,
        gx + GRID / 2.0,
        y + 20.0,
        xml_escape(&confusion.name)
    );
    if n == 0 {
        no_data(svg, gx + GRID / 2.0, gy + GRID / 2.0);
        svg.push_str("</g>\n");
        return;
    }
    let cell = GRID / n as f64;
    let count_font = (cell * 0.35).clamp(4.0, 14.0);
    let label_of = |i: usize| labels.get(i).map_or_else(|| format!("#{i}"), String::clone);
    for (row, row_counts) in counts.iter().enumerate() {
        let row_total: u64 = row_counts.iter().sum();
        for (col, &count) in row_counts.iter().enumerate() {
            let share = if row_total == 0 {
                0.0
            } else {
                count as f64 / row_total as f64
            };
            let (cx, cy) = (gx + col as f64 * cell, gy + row as f64 * cell);
            let _ = writeln!(
                svg,
                r#"<rect class="cell" data-row="{row}" data-col="{col}" x="{cx:.2}" y="{cy:.2}" width="{cell:.2}" height="{cell:.2}" fill="{}" stroke="white"><title>gold {}, predicted {}: {count}</title></rect>"#,
                blues(share),
                xml_escape(&label_of(row)),
                xml_escape(&label_of(col)),
            );
            let ink = if share > 0.5 { "white" } else { "black" };
            let _ = writeln!(
                svg,
                r#"<text class="count" x="{:.2}" y="{:.2}" font-size="{count_font:.1}" text-anchor="middle" dominant-baseline="central" fill="{ink}">{count}</text>"#,
                cx + cell / 2.0,
                cy + cell / 2.0
            );
        }
    }
    for i in 0..n {
        let name = xml_escape(&shorten(&label_of(i), MAX_AXIS_LABEL));
        let mid = i as f64 * cell + cell / 2.0;
        let _ = writeln!(
            svg,
            r#"<text class="row-label" x="{:.2}" y="{:.2}" text-anchor="end" dominant-baseline="central">{name}</text>"#,
            gx - 6.0,
            gy + mid
        );
        let (lx, ly) = (gx + mid, gy + GRID + 12.0);
        let _ = writeln!(
            svg,
            r#"<text class="col-label" x="{lx:.2}" y="{ly:.2}" text-anchor="end" transform="rotate(-40 {lx:.2} {ly:.2})">{name}</text>"#
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle" font-style="italic">predicted</text>"#,
        gx + GRID / 2.0,
        gy + GRID + HEAT_BOTTOM - 8.0
    );
    let (tx, ty) = (x + 14.0, gy + GRID / 2.0);
    let _ = writeln!(
        svg,
        r#"<text x="{tx:.2}" y="{ty:.2}" text-anchor="middle" font-style="italic" transform="rotate(-90 {tx:.2} {ty:.2})">gold</text>"#
    );
    svg.push_str("</g>\n");
}

/// One series of a line chart.
struct Curve<'a> {
    name: &'a str,
    color: &'a str,
    points: &'a [(u64, f64)],
}

/// A line chart panel whose top-left corner is `(x, y)`, one polyline per curve, sharing axes
/// fitted to all their finite points.
fn line_chart(svg: &mut String, x: f64, y: f64, title: &str, series: &[Curve]) {
    let (left, right, top, bottom) = (60.0, 20.0, 36.0, 44.0);
    let (px, py) = (x + left, y + top);
    let (pw, ph) = (PANEL_W - left - right, CHART_H - top - bottom);
    let _ = writeln!(
        svg,
        r#"<g class="chart" data-name="{}">"#,
        xml_escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{px:.2}" y="{:.2}" font-size="14">{}</text>"#,
        y + 20.0,
        xml_escape(title)
    );
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|curve| curve.points.iter())
        .filter(|(_, v)| v.is_finite())
        .map(|&(step, v)| (step as f64, v))
        .collect();
    if points.is_empty() {
        no_data(svg, px + pw / 2.0, py + ph / 2.0);
        svg.push_str("</g>\n");
        return;
    }
    let bounds = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    };
    let (x_ticks, (x_lo, x_hi)) = nice_ticks(bounds(&mut points.iter().map(|p| p.0)));
    let (y_ticks, (y_lo, y_hi)) = nice_ticks(bounds(&mut points.iter().map(|p| p.1)));
    let sx = |v: f64| px + (v - x_lo) / (x_hi - x_lo) * pw;
    let sy = |v: f64| py + ph - (v - y_lo) / (y_hi - y_lo) * ph;

    let _ = writeln!(
        svg,
        r##"<rect x="{px:.2}" y="{py:.2}" width="{pw:.2}" height="{ph:.2}" fill="none" stroke="#444"/>"##
    );
    let (x_decimals, y_decimals) = (tick_decimals(&x_ticks), tick_decimals(&y_ticks));
    for &t in &x_ticks {
        let tx = sx(t);
        let _ = writeln!(
            svg,
            r##"<line class="x-tick" x1="{tx:.2}" y1="{:.2}" x2="{tx:.2}" y2="{:.2}" stroke="#444"/><text x="{tx:.2}" y="{:.2}" text-anchor="middle">{t:.x_decimals$}</text>"##,
            py + ph,
            py + ph + 5.0,
            py + ph + 18.0
        );
    }
    for &t in &y_ticks {
        let ty = sy(t);
        let _ = writeln!(
            svg,
            r##"<line class="y-tick" x1="{:.2}" y1="{ty:.2}" x2="{px:.2}" y2="{ty:.2}" stroke="#444"/><line x1="{px:.2}" y1="{ty:.2}" x2="{:.2}" y2="{ty:.2}" stroke="#ddd"/><text x="{:.2}" y="{ty:.2}" text-anchor="end" dominant-baseline="central">{t:.y_decimals$}</text>"##,
            px - 5.0,
            px + pw,
            px - 8.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle" font-style="italic">step</text>"#,
        px + pw / 2.0,
        py + ph + 36.0
    );
    for (i, curve) in series.iter().enumerate() {
        let color = curve.color;
        let finite: Vec<(f64, f64)> = curve
            .points
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(step, v)| (sx(step as f64), sy(v)))
            .collect();
        let name = xml_escape(curve.name);
        match finite[..] {
            [] => {}
            [(cx, cy)] => {
                let _ = writeln!(
                    svg,
                    r#"<circle class="series" data-name="{name}" cx="{cx:.2}" cy="{cy:.2}" r="3" fill="{color}"/>"#
                );
            }
            _ => {
                let path: Vec<String> = finite
                    .iter()
                    .map(|(a, b)| format!("{a:.2},{b:.2}"))
                    .collect();
                let _ = writeln!(
                    svg,
                    r#"<polyline class="series" data-name="{name}" points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
                    path.join(" ")
                );
            }
        }
        // The legend sits in the header band, right-aligned, off the data: one entry of about
        // 110 px per curve, the last one at the right edge.
        let (lx, ly) = (px + pw - 110.0 * (series.len() - i) as f64, y + 16.0);
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.2}" y1="{ly:.2}" x2="{:.2}" y2="{ly:.2}" stroke="{color}" stroke-width="2"/><text x="{:.2}" y="{ly:.2}" dominant-baseline="central">{name}</text>"#,
            lx + 18.0,
            lx + 24.0
        );
    }
    svg.push_str("</g>\n");
}

fn no_data(svg: &mut String, cx: f64, cy: f64) {
    let _ = writeln!(
        svg,
        r##"<text x="{cx:.2}" y="{cy:.2}" text-anchor="middle" fill="#888">no data</text>"##
    );
}

/// About five round ticks (1, 2 or 5 times a power of ten) covering `(lo, hi)`, and the axis
/// range they span. A single value gets a range around it.
fn nice_ticks((lo, hi): (f64, f64)) -> (Vec<f64>, (f64, f64)) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    };
    let rough = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude);
    let (first, last) = ((lo / step).floor(), (hi / step).ceil());
    // Ranges near the ends of f64 (overflowing or subnormal) have no round ticks: just the ends.
    if !(step.is_finite() && step > 0.0 && first.is_finite() && last.is_finite()) {
        return (vec![lo, hi], (lo, hi));
    }
    // `step >= (hi - lo) / 5`, so there are at most 7 ticks; the cap is a backstop.
    let count = ((last - first) as usize).min(20);
    let ticks = (0..=count).map(|i| (first + i as f64) * step).collect();
    (ticks, (first * step, last * step))
}

/// Enough decimals to tell the ticks apart.
fn tick_decimals(ticks: &[f64]) -> usize {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => 1.0,
    };
    if step >= 1.0 || step <= 0.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    }
}

/// White to dark blue, by `share` in [0, 1] (the ColorBrewer "Blues" end points).
fn blues(share: f64) -> String {
    let t = if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(247.0, 8.0),
        mix(251.0, 48.0),
        mix(255.0, 107.0)
    )
}

fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Text made safe for XML content and attribute values: markup characters escaped, and the
/// control characters that XML 1.0 forbids replaced by U+FFFD.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        // A range of 2.54: a fifth is 0.508, just over 0.5, so the step is 1.
        let (ticks, (lo, hi)) = nice_ticks((0.37, 2.91));
        assert_eq!(ticks, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!((lo, hi), (0.0, 3.0));
        let (ticks, (lo, hi)) = nice_ticks((0.37, 2.41));
        assert_eq!(ticks, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!((lo, hi), (0.0, 2.5));
        let (ticks, _) = nice_ticks((0.0, 1000.0));
        assert_eq!(ticks, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let (ticks, (lo, hi)) = nice_ticks((5.0, 5.0));
        assert!(lo < 5.0 && hi > 5.0 && ticks.len() >= 2, "{ticks:?}");
        assert_eq!(tick_decimals(&[0.0, 0.05]), 2);
        assert_eq!(tick_decimals(&[0.0, 200.0]), 0);
    }

    #[test]
    fn escapes_markup_and_forbidden_controls() {
        assert_eq!(
            xml_escape("<a & \"b\" 'c'>\u{1}"),
            "&lt;a &amp; &quot;b&quot; &apos;c&apos;&gt;\u{FFFD}"
        );
    }

    #[test]
    fn shades_run_from_white_to_dark_blue() {
        assert_eq!(blues(0.0), "#f7fbff");
        assert_eq!(blues(1.0), "#08306b");
        assert_eq!(blues(f64::NAN), "#f7fbff");
    }
}
