//! Line charts as standalone SVG files: readable offline, in any browser or image viewer, with
//! no script and nothing fetched (goose's HTML report loads its charting library from a CDN).
//!
//! Integer coordinates only (the workspace forbids float arithmetic); at 900 × 420 pixels a
//! pixel of rounding is invisible.

use std::fmt::Write;

const WIDTH: u64 = 900;
const HEIGHT: u64 = 420;
const LEFT: u64 = 80;
const RIGHT: u64 = 190;
const TOP: u64 = 40;
const BOTTOM: u64 = 50;

/// Colours that stay apart for the few series a chart has.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    /// `(x, y)` points, x ascending.
    pub points: Vec<(u64, u64)>,
}

/// A chart: lines over a shared x axis.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Formats a y value for the axis (say microseconds as milliseconds).
    pub y_format: fn(u64) -> String,
    pub series: Vec<Series>,
}

/// The y axis in plain integers.
pub fn plain(value: u64) -> String {
    value.to_string()
}

/// Microseconds shown as milliseconds with one decimal.
pub fn micros_as_ms(value: u64) -> String {
    format!("{}.{}", value / 1_000, (value % 1_000) / 100)
}

/// Tenths shown with one decimal.
pub fn tenths(value: u64) -> String {
    format!("{}.{}", value / 10, value % 10)
}

/// Kibibytes shown as mebibytes with one decimal.
pub fn kib_as_mib(value: u64) -> String {
    format!("{}.{}", value / 1_024, (value % 1_024) * 10 / 1_024)
}

/// The smallest "round" number at or above `value` (at least 1): 1–10 below 10, else 1, 1.2,
/// 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k, so an axis of five steps has readable ticks and the
/// data fills most of the height.
pub fn nice_ceiling(value: u64) -> u64 {
    if value <= 5 {
        return value.max(1);
    }
    if value <= 10 {
        return 10;
    }
    let mut unit = 1u64; // 10^(k-1)
    loop {
        for mantissa in [10, 12, 15, 20, 25, 30, 40, 50, 60, 80] {
            let candidate = unit.saturating_mul(mantissa);
            if candidate >= value || candidate == u64::MAX {
                return candidate;
            }
        }
        unit = unit.saturating_mul(10);
    }
}

/// Escapes text for SVG content and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn scale(value: u64, max: u64, pixels: u64) -> u64 {
    u64::try_from(u128::from(value.min(max)) * u128::from(pixels) / u128::from(max.max(1)))
        .unwrap_or(pixels)
}

impl LineChart {
    /// The chart as a complete SVG document.
    pub fn render(&self) -> String {
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let max_x = nice_ceiling(points.clone().map(|p| p.0).max().unwrap_or(0).max(1));
        // Five percent of headroom: a line at the maximum stays off the frame.
        let highest = points.map(|p| p.1).max().unwrap_or(0);
        let max_y = nice_ceiling(highest.saturating_add(highest / 20).max(1));
        let x_of = |x: u64| LEFT + scale(x, max_x, plot_w);
        let y_of = |y: u64| TOP + plot_h - scale(y, max_y, plot_h);

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            LEFT + plot_w / 2,
            escape(&self.title)
        );
        // Grid and tick labels: five steps on each axis.
        for step in 0..=5 {
            let y_value = max_y * step / 5;
            let y = y_of(y_value);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6,
                y + 4,
                escape(&(self.y_format)(y_value))
            );
            let x_value = max_x * step / 5;
            let x = x_of(x_value);
            let _ = writeln!(
                svg,
                r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{x_value}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 16
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2,
            HEIGHT - 12,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
            TOP + plot_h / 2,
            TOP + plot_h / 2,
            escape(&self.y_label)
        );
        for (index, series) in self.series.iter().enumerate() {
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            if series.points.len() == 1 {
                let (x, y) = series.points[0];
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{}" cy="{}" r="3" fill="{}"/>"#,
                    x_of(x),
                    y_of(y),
                    series.color
                );
            } else if !series.points.is_empty() {
                let coordinates: Vec<String> = series
                    .points
                    .iter()
                    .map(|&(x, y)| format!("{},{}", x_of(x), y_of(y)))
                    .collect();
                let _ = writeln!(
                    svg,
                    r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#,
                    series.color,
                    coordinates.join(" ")
                );
            }
            let legend_y = TOP + 10 + 18 * u64::try_from(index).unwrap_or(0);
            let legend_x = LEFT + plot_w + 12;
            let _ = writeln!(
                svg,
                r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                legend_x + 22,
                series.color,
                legend_x + 28,
                legend_y + 4,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>) -> LineChart {
        LineChart {
            title: "Latency <grab> & co".to_owned(),
            x_label: "second of the run".to_owned(),
            y_label: "ms".to_owned(),
            y_format: micros_as_ms,
            series,
        }
    }

    #[test]
    fn nice_ceilings_are_round_numbers() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 3);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(10), 10);
        assert_eq!(nice_ceiling(11), 12);
        assert_eq!(nice_ceiling(105), 120);
        assert_eq!(nice_ceiling(4_999), 5_000);
        assert_eq!(nice_ceiling(5_001), 6_000);
        assert_eq!(nice_ceiling(8_001), 10_000);
        assert!(nice_ceiling(u64::MAX) >= u64::MAX / 2);
    }

    #[test]
    fn a_chart_is_a_standalone_svg_with_escaped_text() {
        let svg = chart(vec![
            Series {
                name: "grab p50".to_owned(),
                color: PALETTE[0],
                dashed: false,
                points: vec![(0, 1_000), (1, 2_500), (2, 1_200)],
            },
            Series {
                name: "grab p99".to_owned(),
                color: PALETTE[1],
                dashed: true,
                points: vec![(0, 9_000)],
            },
        ])
        .render();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;grab&gt; &amp; co"));
        assert!(!svg.contains("<grab>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("stroke-dasharray"));
        // Nothing fetched, nothing run.
        assert!(!svg.contains("<script"));
        assert!(!svg.contains("href"));
        // Every opened element is closed.
        let opened = svg.matches('<').count();
        let closed = svg.matches("/>").count() + svg.matches("</").count() * 2;
        assert_eq!(opened, closed, "{svg}");
    }

    #[test]
    fn points_land_inside_the_plot_area() {
        let svg = chart(vec![Series {
            name: "s".to_owned(),
            color: PALETTE[2],
            dashed: false,
            points: vec![(0, 0), (10, 100)],
        }])
        .render();
        // max_x = 10 (already round) and max_y = 120 (100 and its 5 % headroom): (0,0) at the
        // bottom left, (10,100) at the right, 100/120 of the way up.
        let bottom = HEIGHT - BOTTOM;
        let right = WIDTH - RIGHT;
        let top = bottom - (bottom - TOP) * 100 / 120;
        assert!(
            svg.contains(&format!("points=\"{LEFT},{bottom} {right},{top}\"")),
            "{svg}"
        );
    }

    #[test]
    fn axis_formats_are_integer_decimals() {
        assert_eq!(micros_as_ms(12_345), "12.3");
        assert_eq!(micros_as_ms(999), "0.9");
        assert_eq!(kib_as_mib(1_536), "1.5");
        assert_eq!(tenths(804), "80.4");
        assert_eq!(plain(42), "42");
    }
}
