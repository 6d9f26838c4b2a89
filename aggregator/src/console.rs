//! The operator's web console: read-only pages rendered on the server from the status board
//! (no script, no build step: the page and its style are compiled into the binary).
//!
//! - `/`: the aggregator (its role under `[ha]`, its compliance log's last signed tree head),
//!   the sites (connected or not, traffic), the studies (state, round, phase, stragglers).
//! - `/studies/<id>`: a study's training curves (loss and the headline metric per round),
//!   its rounds, and what its last release says of secure aggregation and privacy.
//!
//! It shows only what the aggregator already holds: sums the sites released, the models it
//! exported, its own counters. Plots use the Okabe–Ito palette (safe for colour-blind
//! readers) with markers, and axes that start at zero (the metric's axis spans its range).

/// Appends formatted text to a page being built. The page is a `String`, to which writing
/// cannot fail: no result to handle or drop.
macro_rules! put {
    ($b:expr, $($arg:tt)*) => {
        $b.push_str(&format!($($arg)*))
    };
}

/// One round as the console plots it.
#[derive(Debug, Clone)]
pub struct RoundPoint {
    /// The round, from 1.
    pub round: u32,
    /// Sites whose updates were averaged.
    pub sites: Vec<String>,
    /// Training rows behind the average.
    pub training_rows: u64,
    /// Sample-weighted mean training loss (NaN when not released, as under DP).
    pub train_loss: f64,
    /// The headline validation metric (name, value), when evaluated.
    pub metric: Option<(&'static str, f64)>,
}

/// What the overview shows of one site.
#[derive(Debug, Clone)]
pub struct SiteRow {
    /// The site.
    pub site: String,
    /// Connected now.
    pub connected: bool,
    /// Messages and bytes exchanged with it.
    pub traffic: medfed_infra::auditlog::PeerTraffic,
    /// Seconds since it last answered a request of a study.
    pub last_answer_secs: Option<u64>,
    /// The median time its recent answers took, in seconds (local work and network).
    pub median_answer_secs: Option<f64>,
}

/// What the overview shows of one study.
#[derive(Debug, Clone)]
pub struct StudyRow {
    /// The study.
    pub id: String,
    /// `training` or `statistics`.
    pub kind: String,
    /// waiting, running, complete, stopped or failed.
    pub state: String,
    /// Last completed round.
    pub round: u32,
    /// Rounds planned.
    pub rounds_planned: u32,
    /// What it is doing, in words.
    pub phase: String,
    /// Sites taking part.
    pub participants: Vec<String>,
    /// Participants left out of completed rounds (stragglers, dropouts).
    pub dropouts: u64,
    /// Round attempts that failed.
    pub round_failures: u64,
    /// Sites that refused, and why.
    pub refusals: Vec<(String, String)>,
}

/// The overview page's facts.
#[derive(Debug, Clone)]
pub struct Overview {
    /// The aggregator's name.
    pub aggregator: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// `[ha]`: this instance's role and the active instance.
    pub ha: Option<crate::ha::HaView>,
    /// The compliance log's last signed tree head (records, root, signed at ms).
    pub tree_head: Option<(u64, String, u64)>,
    /// The compliance log's path.
    pub log: String,
    /// Every allowed site.
    pub sites: Vec<SiteRow>,
    /// Every study.
    pub studies: Vec<StudyRow>,
}

/// A study page's facts.
#[derive(Debug, Clone)]
pub struct StudyPage {
    /// The study's row of the overview.
    pub row: StudyRow,
    /// Its rounds.
    pub rounds: Vec<RoundPoint>,
    /// The provenance of its last release (`provenance` of the exported model), if any.
    pub provenance: Option<serde_json::Value>,
    /// Where its last release is.
    pub released: Option<String>,
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

/// The Okabe–Ito palette: blue, vermillion, bluish green, orange.
const PALETTE: [&str; 4] = ["#0072B2", "#D55E00", "#009E73", "#E69F00"];

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#fff;line-height:1.45}\
header,main{padding:0 1.5rem}header{background:#1b2a3a;color:#fff;padding:.8rem 1.5rem}\
header a{color:#fff}h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.15rem;margin-top:1.6rem}\
a{color:#0550ae}a:focus,a:hover{outline:3px solid #E69F00;outline-offset:2px}\
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:#fff;color:#000;padding:.4rem}\
table{border-collapse:collapse;margin:.4rem 0 1rem}caption{text-align:left;font-weight:600;padding:.3rem 0}\
th,td{border:1px solid #8a8a8a;padding:.3rem .6rem;text-align:left;vertical-align:top}\
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#005a32;font-weight:600}.bad{color:#a50f15;font-weight:600}.muted{color:#444}\
figure{margin:0 0 1rem}figcaption{font-size:.9rem;color:#333}code{font-size:.95em}";

/// A whole page of the operator's console: `title` as heading, `body` inside `<main>`.
pub fn page(title: &str, body: &str) -> String {
    page_with_nav(
        title,
        "<a href=\"/\">Overview</a> · <a href=\"/status\">/status (JSON)</a> · \
         <a href=\"/metrics\">/metrics</a>",
        body,
    )
}

/// A whole page with its own navigation links (`nav`, HTML), the console's style.
pub fn page_with_nav(title: &str, nav: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{t} · medfed console</title><style>{STYLE}</style></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><h1>{t}</h1><nav aria-label=\"console\">{nav}</nav></header>\
         <main id=\"main\">{body}</main></body></html>",
        t = esc(title)
    )
}

/// A date and time, in UTC, from milliseconds since the epoch.
pub fn when(ms: u64) -> String {
    when_inner(ms)
}

fn when_inner(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 10_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

/// The overview page.
pub fn overview(o: &Overview) -> String {
    let mut b = String::new();
    let role = match &o.ha {
        Some(h) => format!(
            "instance <strong>{}</strong>, <strong>{}</strong>{}",
            esc(&h.instance),
            esc(h.role),
            h.active_instance
                .as_ref()
                .filter(|a| **a != h.instance)
                .map(|a| format!(" (active: {})", esc(a)))
                .unwrap_or_default()
        ),
        None => "single aggregator (no <code>[ha]</code>)".into(),
    };
    let head = match &o.tree_head {
        Some((size, root, at)) => format!(
            "<span class=\"ok\">signed</span>: {size} records, root <code>{}…</code>, at {}",
            esc(&root[..root.len().min(16)]),
            when(*at)
        ),
        None => "<span class=\"muted\">no tree head signed since start</span>".into(),
    };
    put!(
        b,
        "<h2>Aggregator</h2><table><caption>The aggregator</caption><tbody>\
         <tr><th scope=\"row\">Name</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Up for</th><td>{} s</td></tr>\
         <tr><th scope=\"row\">Role</th><td>{role}</td></tr>\
         <tr><th scope=\"row\">Compliance log</th><td><code>{}</code>; last tree head {head}. \
         Verify it with <code>medfed audit verify</code>.</td></tr></tbody></table>",
        esc(&o.aggregator),
        o.uptime_secs,
        esc(&o.log)
    );
    b.push_str(
        "<h2>Sites</h2><table><caption>Allowed sites: connection and traffic</caption><thead><tr>\
         <th scope=\"col\">Site</th><th scope=\"col\">Connection</th>\
         <th scope=\"col\">Messages sent</th><th scope=\"col\">Bytes sent</th>\
         <th scope=\"col\">Messages received</th><th scope=\"col\">Bytes received</th>\
         <th scope=\"col\">Last answer</th><th scope=\"col\">Median answer time</th>\
         </tr></thead><tbody>",
    );
    for s in &o.sites {
        put!(
            b,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&s.site),
            if s.connected {
                "<span class=\"ok\">connected</span>"
            } else {
                "<span class=\"bad\">not connected</span>"
            },
            s.traffic.messages_sent,
            bytes(s.traffic.bytes_sent),
            s.traffic.messages_received,
            bytes(s.traffic.bytes_received),
            s.last_answer_secs
                .map_or("never".to_string(), |t| format!("{t} s ago")),
            s.median_answer_secs
                .map_or("—".to_string(), |t| if t < 1.0 {
                    format!("{:.1} ms", t * 1000.0)
                } else {
                    format!("{t:.2} s")
                }),
        );
    }
    b.push_str("</tbody></table>");
    b.push_str(
        "<h2>Studies</h2><table><caption>Studies: state, progress, stragglers</caption><thead><tr>\
         <th scope=\"col\">Study</th><th scope=\"col\">Kind</th><th scope=\"col\">State</th>\
         <th scope=\"col\">Round</th><th scope=\"col\">Phase</th><th scope=\"col\">Sites</th>\
         <th scope=\"col\">Left out of rounds</th><th scope=\"col\">Failed attempts</th>\
         <th scope=\"col\">Refusals</th></tr></thead><tbody>",
    );
    for s in &o.studies {
        put!(
            b,
            "<tr><th scope=\"row\"><a href=\"/studies/{id}\">{id_text}</a></th><td>{}</td><td>{}</td>\
             <td class=\"n\">{} of {}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&s.kind),
            state(&s.state),
            s.round,
            s.rounds_planned,
            esc(&s.phase),
            esc(&s.participants.join(", ")),
            s.dropouts,
            s.round_failures,
            if s.refusals.is_empty() {
                "none".to_string()
            } else {
                s.refusals
                    .iter()
                    .map(|(site, why)| format!("{}: {}", esc(site), esc(why)))
                    .collect::<Vec<_>>()
                    .join("<br>")
            },
            id = esc(&percent(&s.id)),
            id_text = esc(&s.id),
        );
    }
    b.push_str("</tbody></table>");
    page(&format!("{} — overview", o.aggregator), &b)
}

fn state(s: &str) -> String {
    let class = match s {
        "complete" | "running" => "ok",
        "failed" | "stopped" => "bad",
        _ => "muted",
    };
    format!("<span class=\"{class}\">{}</span>", esc(s))
}

/// `id` as a URL path segment.
pub fn percent(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A study's page.
pub fn study(p: &StudyPage) -> String {
    let s = &p.row;
    let mut b = String::new();
    put!(
        b,
        "<p>{} study, {}: round {} of {}, {}. Sites: {}.</p>",
        esc(&s.kind),
        state(&s.state),
        s.round,
        s.rounds_planned,
        esc(&s.phase),
        esc(&s.participants.join(", "))
    );
    if !p.rounds.is_empty() {
        let loss: Vec<(f64, f64)> = p
            .rounds
            .iter()
            .filter(|r| r.train_loss.is_finite())
            .map(|r| (f64::from(r.round), r.train_loss))
            .collect();
        let metric_name = p.rounds.iter().find_map(|r| r.metric.map(|m| m.0));
        let metric: Vec<(f64, f64)> = p
            .rounds
            .iter()
            .filter_map(|r| r.metric.map(|m| (f64::from(r.round), m.1)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        b.push_str("<h2>Training curves</h2>");
        if loss.is_empty() {
            b.push_str("<p class=\"muted\">No training loss is released for this study (differential privacy).</p>");
        } else {
            b.push_str(&chart(
                "Training loss per round",
                "training loss",
                &[("training loss", &loss)],
                None,
            ));
        }
        if let Some(name) = metric_name {
            let range = if name.contains("AUC") {
                Some((0.0, 1.0))
            } else {
                None
            };
            b.push_str(&chart(
                &format!("Validation {name} per round"),
                &format!("validation {name}"),
                &[(name, &metric)],
                range,
            ));
        }
        b.push_str(
            "<table><caption>Rounds</caption><thead><tr><th scope=\"col\">Round</th>\
             <th scope=\"col\">Sites</th><th scope=\"col\">Training rows</th>\
             <th scope=\"col\">Training loss</th><th scope=\"col\">Validation</th></tr></thead><tbody>",
        );
        for r in &p.rounds {
            put!(
                b,
                "<tr><th scope=\"row\">{}</th><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                r.round,
                esc(&r.sites.join(", ")),
                r.training_rows,
                if r.train_loss.is_finite() {
                    format!("{:.4}", r.train_loss)
                } else {
                    "not released".into()
                },
                r.metric
                    .map(|(n, v)| format!("{n} {v:.4}"))
                    .unwrap_or_else(|| "—".into())
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("<h2>Release, secure aggregation and privacy</h2>");
    match (&p.released, &p.provenance) {
        (Some(path), prov) => {
            put!(b, "<p>Last release: <code>{}</code>.</p>", esc(path));
            b.push_str(&provenance(prov.as_ref()));
        }
        (None, _) => b.push_str("<p class=\"muted\">Nothing released yet.</p>"),
    }
    page(&format!("Study {}", s.id), &b)
}

fn provenance(p: Option<&serde_json::Value>) -> String {
    let Some(p) = p else {
        return "<p class=\"muted\">The release carries no provenance.</p>".into();
    };
    let mut b = String::from("<table><caption>From the release's provenance</caption><tbody>");
    let row = |b: &mut String, k: &str, v: String| {
        put!(
            b,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            esc(k),
            esc(&v)
        );
    };
    match p.get("secure_aggregation").filter(|v| !v.is_null()) {
        Some(sa) => {
            row(
                &mut b,
                "Secure aggregation",
                format!(
                    "on; threshold {} (shares needed to unmask), tolerates {}",
                    sa.get("threshold")
                        .and_then(serde_json::Value::as_u64)
                        .map_or("n/a".to_string(), |t| t.to_string()),
                    match sa
                        .get("tolerated_colluders")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0)
                    {
                        1 => "1 colluding site".to_string(),
                        n => format!("{n} colluding sites"),
                    }
                ),
            );
        }
        None => row(
            &mut b,
            "Secure aggregation",
            "off: the aggregator saw each site's update".into(),
        ),
    }
    match p.get("privacy").filter(|v| !v.is_null()) {
        Some(dp) => {
            let f = |k: &str| {
                dp.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(f64::NAN)
            };
            row(
                &mut b,
                "Privacy cost per site",
                format!(
                    "ε = {:.3} at δ = {:e} after {} rounds ({}; clip {}, noise multiplier {})",
                    f("epsilon"),
                    f("delta"),
                    dp.get("rounds")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0),
                    dp.get("mechanism")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?"),
                    f("clip_norm"),
                    f("noise_multiplier")
                ),
            );
        }
        None => row(
            &mut b,
            "Privacy cost per site",
            "exact release (no differential privacy): each site's policy allowed it".into(),
        ),
    }
    b.push_str("</tbody></table>");
    b
}

/// A line chart as inline SVG: series of (x, y) with markers, axes from zero (or `range`),
/// labelled ticks, a legend, and a text alternative.
pub fn chart(
    title: &str,
    y_label: &str,
    series: &[(&str, &[(f64, f64)])],
    range: Option<(f64, f64)>,
) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 300.0, 64.0, 16.0, 16.0, 44.0);
    let points: Vec<&(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter()).collect();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (y_min, y_max) = range.unwrap_or_else(|| {
        let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
        (0.0, if hi > 0.0 { hi * 1.1 } else { 1.0 })
    });
    let sx = |x: f64| left + (x - 1.0).max(0.0) / (x_max - 1.0).max(1.0) * (w - left - right);
    let sy = |y: f64| top + (1.0 - (y - y_min) / (y_max - y_min)) * (h - top - bottom);
    let mut desc = String::new();
    for (name, s) in series {
        put!(
            desc,
            "{name}: {}. ",
            s.iter()
                .map(|(x, y)| format!("round {x} {y:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut svg = format!(
        "<figure><svg role=\"img\" aria-labelledby=\"t-{id} d-{id}\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title id=\"t-{id}\">{t}</title><desc id=\"d-{id}\">{d}</desc>",
        id = percent(title),
        t = esc(title),
        d = esc(&desc)
    );
    // Axes and ticks.
    put!(
        svg,
        "<g stroke=\"#333\" stroke-width=\"1\"><line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\"/></g>",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let y = y_min + (y_max - y_min) * f64::from(i) / 4.0;
        put!(
            svg,
            "<line x1=\"{}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\" fill=\"#222\">{y:.3}</text>",
            left,
            w - right,
            left - 6.0,
            sy(y) + 4.0,
            py = sy(y)
        );
    }
    let step = (x_max / 10.0).ceil().max(1.0);
    let mut x = 1.0;
    while x <= x_max {
        put!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#222\">{x}</text>",
            sx(x),
            h - bottom + 16.0
        );
        x += step;
    }
    put!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#222\">round</text>\
         <text x=\"14\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#222\" transform=\"rotate(-90 14 {})\">{}</text>",
        (left + w - right) / 2.0,
        h - 6.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        esc(y_label)
    );
    for (i, (name, s)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = s
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        put!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in *s {
            put!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                sx(*x),
                sy(*y)
            );
        }
        put!(
            svg,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#222\">{}{}</text>",
            w - right - 170.0,
            top + 8.0 + 16.0 * i as f64,
            w - right - 152.0,
            top + 12.0 + 16.0 * i as f64,
            esc(name),
            s.last()
                .map(|(_, y)| format!(" (last {y:.4})"))
                .unwrap_or_default()
        );
    }
    put!(
        svg,
        "</svg><figcaption>{}</figcaption></figure>",
        esc(title)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_sites_and_configs_is_escaped() {
        let row = StudyRow {
            id: "<script>x</script>".into(),
            kind: "training".into(),
            state: "running".into(),
            round: 1,
            rounds_planned: 2,
            phase: "round 2".into(),
            participants: vec!["a&b".into()],
            dropouts: 0,
            round_failures: 0,
            refusals: vec![("c".into(), "\"><img src=x onerror=alert(1)>".into())],
        };
        let html = overview(&Overview {
            aggregator: "agg".into(),
            uptime_secs: 1,
            ha: None,
            tree_head: None,
            log: "audit.log".into(),
            sites: vec![],
            studies: vec![row],
        });
        assert!(
            !html.contains("<script>x") && !html.contains("<img"),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;") && html.contains("a&amp;b"));
        assert!(html.contains("href=\"/studies/%3Cscript%3Ex%3C%2Fscript%3E\""));
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_796_083_200_000), "2026-12-01 00:00:00 UTC");
    }

    #[test]
    fn a_chart_has_a_text_alternative_and_starts_at_zero() {
        let svg = chart("Loss", "loss", &[("loss", &[(1.0, 0.6), (2.0, 0.5)])], None);
        assert!(svg.contains("<title") && svg.contains("round 1 0.600, round 2 0.500"));
        assert!(
            svg.contains(">0.000</text>"),
            "the y axis starts at 0: {svg}"
        );
    }
}
