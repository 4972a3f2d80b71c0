//! A small SVG line chart of loss curves (iteration on x, loss on y), written by hand: the
//! format is text, every browser shows it, and the chart needs no plotting dependency.

use std::fmt::Write as _;

/// One curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (x, y) points; non-finite y values are skipped.
    pub points: Vec<(f64, f64)>,
    /// Dashed stroke.
    pub dashed: bool,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const MAX_POINTS: usize = 1500;

/// "Nice" tick step (1, 2 or 5 × 10ⁿ) giving about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// Averages runs of points so that a long run draws at most `MAX_POINTS` vertices.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if finite.len() <= MAX_POINTS {
        return finite;
    }
    let per = finite.len().div_ceil(MAX_POINTS);
    finite
        .chunks(per)
        .map(|c| {
            (c.iter().map(|p| p.0).sum::<f64>() / c.len() as f64, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64)
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart as an SVG document.
pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (820.0, 480.0);
    let (left, right, top, bottom) = (70.0, 190.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let thinned: Vec<Vec<(f64, f64)>> = series.iter().map(|s| thin(&s.points)).collect();
    let all: Vec<(f64, f64)> = thinned.iter().flatten().copied().collect();
    let (mut x0, mut x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    y0 = y0.min(0.0);
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    // Grid and ticks.
    let ys = tick_step(y1 - y0, 6.0);
    let mut y = (y0 / ys).ceil() * ys;
    while y <= y1 + ys * 1e-9 {
        let py = sy(y);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e0e0e0"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, py + 4.0, trim(y));
        y += ys;
    }
    let xs = tick_step(x1 - x0, 8.0);
    let mut x = (x0 / xs).ceil() * xs;
    while x <= x1 + xs * 1e-9 {
        let px = sx(x);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{}" stroke="#f0f0f0"/>"##, top + ph);
        let _ = writeln!(s, r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#, top + ph + 16.0, trim(x));
        x += xs;
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, (ser, pts)) in series.iter().zip(&thinned).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if ser.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{}"/>"#,
            path.join(" ")
        );
        let ly = top + 14.0 + 18.0 * i as f64;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 30.0, ly + 4.0, escape(&ser.label));
    }
    s.push_str("</svg>\n");
    s
}

/// One group of bars (e.g. a training mode): per series (e.g. a dataset) a mean and a
/// standard deviation, `None` where the group has no value.
#[derive(Debug, Clone, PartialEq)]
pub struct BarGroup {
    /// Label under the group.
    pub label: String,
    /// (mean, std) per series.
    pub values: Vec<Option<(f64, f64)>>,
}

/// A grouped bar chart with ±std error bars, as an SVG document (y from 0).
pub fn bars_svg(title: &str, y_label: &str, series: &[String], groups: &[BarGroup]) -> String {
    let gw = 26.0 * series.len().max(1) as f64 + 24.0;
    let (left, right, top, bottom) = (70.0, 150.0, 40.0, 150.0);
    let pw = gw * groups.len().max(1) as f64;
    let (w, h) = (left + pw + right, 520.0);
    let ph = h - top - bottom;
    let top_value = groups.iter().flat_map(|g| g.values.iter().flatten()).map(|&(m, sd)| m + sd).fold(0.0, f64::max);
    let y1 = if top_value > 0.0 && top_value.is_finite() { top_value * 1.05 } else { 1.0 };
    let sy = |y: f64| top + ph - y / y1 * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    let ys = tick_step(y1, 6.0);
    let mut y = 0.0;
    while y <= y1 + ys * 1e-9 {
        let py = sy(y);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e0e0e0"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, py + 4.0, trim(y));
        y += ys;
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (gi, g) in groups.iter().enumerate() {
        let gx = left + gw * gi as f64 + 12.0;
        for (si, v) in g.values.iter().enumerate() {
            let Some((m, sd)) = v.filter(|(m, sd)| m.is_finite() && sd.is_finite()) else { continue };
            let x = gx + 26.0 * si as f64;
            let color = COLORS[si % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="22" height="{:.1}" fill="{color}"/>"#,
                sy(m),
                (sy(0.0) - sy(m)).max(0.0)
            );
            let (lo, hi) = (sy((m - sd).max(0.0)), sy(m + sd));
            let cx = x + 11.0;
            let _ = writeln!(s, r#"<line x1="{cx:.1}" y1="{lo:.1}" x2="{cx:.1}" y2="{hi:.1}" stroke="black"/>"#);
            for yy in [lo, hi] {
                let _ = writeln!(
                    s,
                    r#"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="black"/>"#,
                    cx - 4.0,
                    cx + 4.0
                );
            }
        }
        let lx = gx + gw / 2.0 - 12.0;
        let ly = top + ph + 12.0;
        let _ = writeln!(
            s,
            r#"<text transform="translate({lx:.1} {ly:.1}) rotate(-40)" text-anchor="end">{}</text>"#,
            escape(&g.label)
        );
    }
    for (i, name) in series.iter().enumerate() {
        let (lx, ly) = (left + pw + 14.0, top + 14.0 + 18.0 * i as f64);
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(s, r#"<rect x="{lx}" y="{}" width="14" height="10" fill="{color}"/>"#, ly - 8.0);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 20.0, ly + 2.0, escape(name));
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_curve_and_a_legend_entry_per_series() {
        let a = Series {
            label: "city main".into(),
            points: (0..3000).map(|i| (i as f64, 2.0 / (1.0 + i as f64))).collect(),
            dashed: false,
        };
        let b =
            Series { label: "city <aux>".into(), points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)], dashed: true };
        let s = svg("losses", "iteration", "loss", &[a, b]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("city main") && s.contains("city &lt;aux&gt;"));
        // Thinned to at most MAX_POINTS vertices; the NaN skipped.
        let first = s.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert!(first.matches(',').count() <= MAX_POINTS);
        assert!(!s.contains("NaN"));
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(trim(0.5000), "0.5");
        // No data is still a valid document.
        assert!(svg("t", "x", "y", &[]).contains("</svg>"));
    }

    #[test]
    fn the_bar_chart_has_a_bar_and_an_error_bar_per_value() {
        let groups = vec![
            BarGroup { label: "dat".into(), values: vec![Some((0.5, 0.1)), Some((0.4, 0.0))] },
            BarGroup { label: "single <a>".into(), values: vec![Some((0.3, 0.05)), None] },
        ];
        let s = bars_svg("mIoU", "mIoU", &["city".into(), "dusk".into()], &groups);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        // 3 bars + 2 legend swatches + the frame and background.
        assert_eq!(s.matches("<rect").count(), 3 + 2 + 2);
        assert!(s.contains("single &lt;a&gt;") && !s.contains("NaN"));
        assert!(bars_svg("t", "y", &[], &[]).contains("</svg>"));
    }
}
