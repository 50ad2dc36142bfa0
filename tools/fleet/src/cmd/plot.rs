//! A hand-written SVG line plot of per-round test accuracy and loss.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 400.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 60.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 50.0;

/// An SVG document: accuracy (left axis, 0–1) and loss (right axis, 0 to its maximum) per round,
/// and the centralized accuracy as a dashed line when given.
pub fn svg(title: &str, accuracy: &[f32], loss: &[f32], centralized: Option<f32>) -> String {
    let n = accuracy.len().max(loss.len()).max(1);
    let max_loss = loss
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(0.0f32, f32::max)
        .max(1e-6);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |i: usize| {
        LEFT + if n > 1 {
            pw * i as f64 / (n - 1) as f64
        } else {
            pw / 2.0
        }
    };
    let y = |v: f64| TOP + ph * (1.0 - v.clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for k in 0..=5 {
        let v = f64::from(k) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.1}</text><text x="{}" y="{:.1}">{:.3}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            W - RIGHT + 6.0,
            y(v) + 4.0,
            v * f64::from(max_loss),
            y0 = y(v),
        );
    }
    let step = (n / 10).max(1);
    for i in (0..n).step_by(step) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(i),
            H - BOTTOM + 18.0,
            i + 1
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">round</text>"#,
        LEFT + pw / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    if let Some(c) = centralized {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#2a7" stroke-dasharray="6 4"/>"##,
            W - RIGHT,
            y0 = y(f64::from(c))
        );
    }
    let acc: Vec<f64> = accuracy.iter().map(|&a| f64::from(a)).collect();
    let lo: Vec<f64> = loss.iter().map(|&l| f64::from(l / max_loss)).collect();
    for (values, colour) in [(&acc, "#1f5fbf"), (&lo, "#e07b00")] {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
    }
    legend(&mut s, centralized.is_some());
    s.push_str("</svg>\n");
    s
}

fn legend(s: &mut String, centralized: bool) {
    let mut items = vec![
        ("#1f5fbf", "test accuracy (left)", ""),
        ("#e07b00", "test loss (right)", ""),
    ];
    if centralized {
        items.push(("#2a7", "centralized accuracy", r#" stroke-dasharray="6 4""#));
    }
    for (k, (colour, label, dash)) in items.iter().enumerate() {
        let lx = LEFT + 10.0 + 190.0 * k as f64;
        let ly = TOP - 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{label}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn plot_has_one_polyline_per_series_and_scales_loss() {
        let s = super::svg("t <1>", &[0.5, 0.9], &[2.0, 1.0], Some(0.95));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("t &lt;1&gt;") && s.contains("stroke-dasharray"));
        assert!(
            s.contains("2.000"),
            "the loss axis goes to the maximum loss"
        );
        assert!(s.ends_with("</svg>\n"));
    }
}
