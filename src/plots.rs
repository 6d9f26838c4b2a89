//! Pictures for people: the training curve and ROC curves the demo writes (SVG, plotters).

use std::path::Path;

use plotters::prelude::*;

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Train loss and validation AUC per round, with the centralized model's AUC for reference.
pub fn training_curve(path: &Path, rounds: &[(u32, f64, f64)], centralized_auc: f64) -> PlotResult {
    training_curve_of(path, rounds, centralized_auc, "log loss", "ROC AUC")
}

/// Train loss and a validation metric per round (e.g. "mean squared error" and "R²" for a
/// regression), with the centralized model's metric for reference.
pub fn training_curve_of(
    path: &Path,
    rounds: &[(u32, f64, f64)],
    centralized_auc: f64,
    loss_name: &str,
    metric_name: &str,
) -> PlotResult {
    let root = SVGBackend::new(path, (800, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(320);
    let last = rounds.iter().map(|r| r.0).max().unwrap_or(1).max(1);
    let finite = |v: &f64| v.is_finite();
    let loss: Vec<(u32, f64)> = rounds
        .iter()
        .map(|r| (r.0, r.1))
        .filter(|p| finite(&p.1))
        .collect();
    let hi = loss.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    // From zero: a small change of loss does not read as a large one.
    let (lo, hi) = if hi.is_finite() && hi > 0.0 {
        (0.0, hi * 1.08)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Training loss per round (sample-weighted mean over hospitals)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1u32..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(loss_name)
        .draw()?;
    let [blue, vermillion, ..] = OKABE_ITO;
    let last_loss = loss.last().map(|p| p.1);
    chart
        .draw_series(LineSeries::new(loss.clone(), blue.stroke_width(2)))?
        .label(match last_loss {
            Some(l) => format!("federated, training rows (last {l:.4})"),
            None => "federated, training rows".into(),
        })
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart.draw_series(loss.iter().map(|p| Circle::new(*p, 3, blue.filled())))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;

    let auc: Vec<(u32, f64)> = rounds
        .iter()
        .map(|r| (r.0, r.2))
        .filter(|p| finite(&p.1))
        .collect();
    // AUC from chance (0.5) to perfect (1); another metric (R²) from the lower of 0 and its
    // lowest value to 1: the axis does not zoom in on small differences.
    let lowest = auc.iter().map(|p| p.1).fold(centralized_auc, f64::min);
    let (lo, hi) = if metric_name.contains("AUC") {
        (lowest.min(0.5), 1.0)
    } else {
        (lowest.min(0.0), 1.0)
    };
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!("Validation {metric_name} per round"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1u32..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(metric_name)
        .draw()?;
    let last_auc = auc.last().map(|p| p.1);
    chart
        .draw_series(LineSeries::new(auc.clone(), blue.stroke_width(2)))?
        .label(match last_auc {
            Some(a) => {
                format!(
                    "federated, all hospitals' validation rows, from binned summaries (last {a:.4})"
                )
            }
            None => "federated, all hospitals' validation rows, from binned summaries".into(),
        })
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart.draw_series(auc.iter().map(|p| Circle::new(*p, 3, blue.filled())))?;
    // Dashed, in another colour: where the two meet, both stay visible.
    chart
        .draw_series(DashedLineSeries::new(
            vec![(1, centralized_auc), (last, centralized_auc)],
            8,
            5,
            vermillion.stroke_width(2),
        ))?
        .label(format!(
            "centralized model ({metric_name} {centralized_auc:.4})"
        ))
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], vermillion.stroke_width(2))
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// ROC curves of several models on the same rows.
pub fn roc_curves(path: &Path, curves: &[(&str, Vec<(f64, f64)>)]) -> PlotResult {
    roc_curves_titled(path, "ROC on the validation rows of all hospitals", curves)
}

/// ROC curves (several models, or one model's classes one against the rest) under `title`.
pub fn roc_curves_titled(
    path: &Path,
    title: &str,
    curves: &[(&str, Vec<(f64, f64)>)],
) -> PlotResult {
    let root = SVGBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate (1 - specificity)")
        .y_desc("true positive rate (sensitivity)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (1.0, 1.0)],
        BLACK.mix(0.3),
    ))?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = match OKABE_ITO.get(i) {
            Some(c) => c.to_rgba(),
            None => Palette99::pick(i).to_rgba(),
        };
        // The first solid, the others dashed: curves that overlap stay visible.
        let style = color.stroke_width(2);
        let series = if i == 0 {
            chart.draw_series(LineSeries::new(points.clone(), style))?
        } else {
            chart.draw_series(DashedLineSeries::new(points.clone(), 7, 4, style))?
        };
        series.label(*name).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A confusion matrix as a grid of cells shaded by the share of the actual class's rows
/// (so rare classes read as well as common ones), each with its count and that share.
pub fn confusion_matrix(
    path: &Path,
    title: &str,
    classes: &[String],
    matrix: &[Vec<u64>],
) -> PlotResult {
    let k = classes.len().max(1);
    let longest = classes.iter().map(|c| c.chars().count()).max().unwrap_or(0) as i32;
    // Wide enough for the longest class name under its column (about 7 px a character).
    let cell = (7 * longest + 14).max(90);
    let (left, top) = ((8 * longest + 20).max(100), 60i32);
    let side = cell * k as i32;
    let root = SVGBackend::new(path, ((left + side + 30) as u32, (top + side + 110) as u32))
        .into_drawing_area();
    root.fill(&WHITE)?;
    let font = ("sans-serif", 14).into_font();
    root.draw(&Text::new(
        title.to_string(),
        (12, 16),
        ("sans-serif", 18).into_font(),
    ))?;
    for (a, row) in matrix.iter().enumerate().take(k) {
        let total: u64 = row.iter().sum();
        for (p, n) in row.iter().enumerate().take(k) {
            let share = if total == 0 {
                0.0
            } else {
                *n as f64 / total as f64
            };
            let (x, y) = (left + cell * p as i32, top + cell * a as i32);
            let shade = OKABE_ITO[0].mix(0.08 + 0.85 * share);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                shade.filled(),
            ))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                BLACK.mix(0.3),
            ))?;
            let colour = if share > 0.5 { WHITE } else { BLACK };
            root.draw(&Text::new(
                format!("{n}"),
                (x + 10, y + cell / 2 - 14),
                font.clone().color(&colour),
            ))?;
            root.draw(&Text::new(
                format!("{:.0}%", 100.0 * share),
                (x + 10, y + cell / 2 + 4),
                font.clone().color(&colour),
            ))?;
        }
    }
    for (c, name) in classes.iter().enumerate() {
        root.draw(&Text::new(
            name.clone(),
            (8, top + cell * c as i32 + cell / 2 - 7),
            font.clone(),
        ))?;
        root.draw(&Text::new(
            name.clone(),
            (left + cell * c as i32 + 4, top + side + 8),
            ("sans-serif", 12).into_font(),
        ))?;
    }
    root.draw(&Text::new(
        "rows: actual class; columns: predicted class (shade: share of the actual class)",
        (8, top + side + 40),
        font,
    ))?;
    root.present()?;
    Ok(())
}

/// The Okabe–Ito palette: told apart by people with any common colour-vision deficiency.
pub const OKABE_ITO: [RGBColor; 5] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(230, 159, 0),   // orange
    RGBColor(204, 121, 167), // reddish purple
];

/// One curve of a privacy-cost plot: its name and, per setting, (ε, median AUC, lowest,
/// highest) over the repeated runs.
pub type CostCurve<'a> = (&'a str, Vec<(f64, f64, f64, f64)>);

/// Held-out AUC against ε (log scale) for each mechanism, with the range over runs as
/// error bars, and the non-private models as horizontal references.
pub fn privacy_cost(
    path: &Path,
    title: &str,
    curves: &[CostCurve<'_>],
    references: &[(&str, f64)],
) -> PlotResult {
    let root = SVGBackend::new(path, (820, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let eps: Vec<f64> = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .filter(|e| e.is_finite() && *e > 0.0)
        .collect();
    let x_lo = eps.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) * 0.8;
    let x_hi = eps.iter().copied().fold(0.0, f64::max).max(10.0) * 1.25;
    let y_lo = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.2))
        .chain(references.iter().map(|r| r.1))
        .fold(1.0, f64::min);
    // The AUC axis starts at 0.5 (chance) or below: differences are not exaggerated.
    let y_lo = (y_lo - 0.02).clamp(0.0, 0.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..1.0)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .x_desc("ε per hospital (δ = 1e-6), log scale")
        .y_desc("held-out ROC AUC")
        .draw()?;
    for (i, (name, ref_auc)) in references.iter().enumerate() {
        let colour = if i == 0 { BLACK } else { OKABE_ITO[4] };
        let style = colour.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_lo, *ref_auc), (x_hi, *ref_auc)],
                6,
                4,
                style,
            ))?
            .label(format!("{name} (AUC {ref_auc:.3})"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    for (i, (name, pts)) in curves.iter().enumerate() {
        let colour = OKABE_ITO[i % 4];
        let mut pts: Vec<_> = pts.iter().filter(|p| p.0.is_finite()).copied().collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                colour.stroke_width(2),
            ))?
            .label(format!("{name} (median over splits; bars: range)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(
            pts.iter()
                .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, colour.filled(), 8)),
        )?;
        chart.draw_series(
            pts.iter()
                .map(|p| Circle::new((p.0, p.1), 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One stratum of a survival plot: its legend, its short name for the at-risk table, and
/// its released curve.
pub type SurvivalCurve<'a> = (String, String, &'a medfed_protocol::survival::StratumCurve);

/// Kaplan–Meier curves: one step curve per stratum with its band (shaded: the 95%
/// confidence interval, widened for noisy counts to the noise's stated error), and the
/// numbers at risk under the plot at six times. Curves stop where the release stops them
/// (too few at risk); `note` is printed under the at-risk table.
pub fn survival_curves(
    path: &Path,
    title: &str,
    time_label: &str,
    curves: &[SurvivalCurve<'_>],
    note: &str,
) -> PlotResult {
    let rows = curves.len() as i32;
    let root = SVGBackend::new(path, (820, (520 + 22 * rows + 24) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(480);
    // The time axis ends a little after the last released point.
    let released_end = curves
        .iter()
        .flat_map(|(_, _, c)| {
            c.points
                .iter()
                .filter(|p| p.survival.value.is_some())
                .map(|p| p.end)
        })
        .fold(0.0f64, f64::max);
    let t_max = if released_end > 0.0 {
        released_end * 1.05
    } else {
        1.0
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..1.0)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .x_desc(time_label)
        .y_desc("survival probability")
        .draw()?;
    for (i, (name, _, curve)) in curves.iter().enumerate() {
        let colour = OKABE_ITO[i % OKABE_ITO.len()];
        let first = curve.points.first().map_or(0.0, |p| p.start.min(0.0));
        // The step function: flat until each bin's start, then down to its value.
        let mut line = vec![(first, 1.0)];
        let mut lower = vec![(first, 1.0)];
        let mut upper = vec![(first, 1.0)];
        let mut prev = (1.0, (1.0, 1.0));
        let mut end = first;
        for p in &curve.points {
            let Some(s) = p.survival.value else { break };
            let s = s.clamp(0.0, 1.0);
            let (lo, hi) = p.ci.unwrap_or((s, s));
            let band = (
                lo.min(s - p.survival.error).max(0.0),
                hi.max(s + p.survival.error).min(1.0),
            );
            line.push((p.start, prev.0));
            line.push((p.start, s));
            lower.push((p.start, prev.1.0));
            lower.push((p.start, band.0));
            upper.push((p.start, prev.1.1));
            upper.push((p.start, band.1));
            prev = (s, band);
            end = p.end;
        }
        line.push((end, prev.0));
        lower.push((end, prev.1.0));
        upper.push((end, prev.1.1));
        let band: Vec<(f64, f64)> = upper.iter().chain(lower.iter().rev()).copied().collect();
        chart.draw_series(std::iter::once(Polygon::new(
            band,
            colour.mix(0.18).filled(),
        )))?;
        chart
            .draw_series(LineSeries::new(line, colour.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    // Numbers at risk at six round times, each column headed by its time.
    let font = ("sans-serif", 14).into_font();
    let plot_left = 14 + 60;
    let plot_width = 820 - plot_left - 14;
    let step = nice_step(t_max / 5.0);
    let times: Vec<f64> = (0..6)
        .map(|k| step * f64::from(k))
        .filter(|t| *t <= t_max)
        .collect();
    let x_of = |t: f64| plot_left + (f64::from(plot_width) * t / t_max) as i32 - 8;
    bottom.draw(&Text::new("at risk at", (8, 4), font.clone()))?;
    for t in &times {
        bottom.draw(&Text::new(format!("{t}"), (x_of(*t), 4), font.clone()))?;
    }
    for (i, (_, short, curve)) in curves.iter().enumerate() {
        let y = 4 + 22 * (i as i32 + 1);
        let colour = OKABE_ITO[i % OKABE_ITO.len()];
        let label: String = short.chars().take(9).collect();
        bottom.draw(&Text::new(label, (8, y), font.clone().color(&colour)))?;
        for t in &times {
            // The first bin starting at or after t: nobody leaves between them (bins
            // without an event or a censoring are not listed).
            let at = curve
                .points
                .iter()
                .find(|p| p.start >= *t)
                .map_or(Some(0.0), |p| p.at_risk.value);
            let text = match at {
                Some(n) => format!("{:.0}", n.max(0.0)),
                None => "–".into(),
            };
            bottom.draw(&Text::new(text, (x_of(*t), y), font.clone()))?;
        }
    }
    bottom.draw(&Text::new(
        note.to_string(),
        (8, 4 + 22 * (rows + 1)),
        ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
    ))?;
    root.present()?;
    Ok(())
}

/// The round number (1, 2 or 5 × 10ⁿ) nearest above `x`.
fn nice_step(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= x)
        .unwrap_or(10.0 * p)
}
