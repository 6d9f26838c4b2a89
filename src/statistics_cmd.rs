//! `medfed aggregator statistics show`: a released statistics file as tables, and its
//! survival curves as a plot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use medfed_protocol::fedstats::{Released, StatsQuery, StatsRelease};
use serde::Deserialize;

/// `medfed aggregator statistics show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// The release, `out/statistics/<id>.json` under the aggregator's output directory.
    pub file: PathBuf,
    /// Also draw the survival curves (with 95% bands and numbers at risk) to this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// What `out/statistics/<id>.json` holds (the aggregator's `StatisticsFile`).
#[derive(Deserialize)]
struct StatisticsFile {
    format: String,
    query: StatsQuery,
    sites: Vec<String>,
    secure_aggregation: bool,
    release: StatsRelease,
}

fn load(path: &Path) -> anyhow::Result<StatisticsFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the statistics file {}", path.display()))?;
    let file: StatisticsFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a statistics release (medfed-statistics/2)",
            path.display()
        )
    })?;
    if file.format != "medfed-statistics/2" {
        anyhow::bail!(
            "{}: format {:?}, this medfed reads medfed-statistics/2",
            path.display(),
            file.format
        );
    }
    Ok(file)
}

/// A released number with its error, or "suppressed".
fn shown(r: &Released, decimals: usize) -> String {
    // Errors below the last decimal shown (an exact count's fixed-point rounding) are not.
    let visible = 0.5 * 10f64.powi(-(decimals as i32));
    match r.value {
        Some(v) if r.error >= visible => format!("{v:.decimals$} ± {:.decimals$}", r.error),
        Some(v) => format!("{v:.decimals$}"),
        None => "suppressed".into(),
    }
}

/// Prints the release at `args.file` and draws its survival curves to `args.plot`.
pub fn show(args: ShowArgs) -> anyhow::Result<()> {
    let f = load(&args.file)?;
    let r = &f.release;
    println!(
        "statistics '{}' on dataset '{}': {} sites ({}), {}{}",
        f.query.query_id,
        f.query.dataset,
        f.sites.len(),
        f.sites.join(", "),
        if f.secure_aggregation {
            "secure aggregation"
        } else {
            "no secure aggregation"
        },
        match &r.privacy {
            Some(p) => format!(
                ", differentially private (noise multiplier {}, ε = {:.2} at δ = {:e} per site)",
                p.noise_multiplier, p.epsilon, p.delta
            ),
            None => ", EXACT (no noise)".into(),
        }
    );
    println!("cohort: {} patients", shown(&r.count, 0));
    if !r.columns.is_empty() {
        println!(
            "\n{:<16} {:>20} {:>20} {:>20}",
            "column", "mean", "variance", "median"
        );
        for c in &r.columns {
            let median = c
                .quantiles
                .iter()
                .find(|(q, _)| *q == 0.5)
                .map_or("-".to_string(), |(_, m)| shown(m, 2));
            println!(
                "{:<16} {:>20} {:>20} {:>20}",
                c.name,
                shown(&c.mean, 2),
                shown(&c.variance, 2),
                median
            );
        }
    }
    if let Some(t) = &r.trees {
        println!(
            "\nboosted trees: {} trees in {} steps (secure sums); each site sent {} numbers in all",
            t.trees, t.steps, t.entries_per_site
        );
        let shown: Vec<String> = t
            .train_loss
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                i % (t.train_loss.len() / 10).max(1) == 0 || *i + 1 == t.train_loss.len()
            })
            .map(|(i, l)| format!("tree {}: {l:.4}", i + 1))
            .collect();
        println!("mean training loss before each tree: {}", shown.join(", "));
        println!(
            "the model: {} (evaluate it with `medfed model evaluate --model {} --data FILE --target COLUMN`)",
            t.model, t.model
        );
    }
    if let Some(fit) = &r.cox {
        println!(
            "\nCox proportional hazards, each site its own stratum ({} ties): {} patients, {} events, {} iterations",
            match fit.ties {
                medfed_protocol::cox::Ties::Efron => "Efron",
                medfed_protocol::cox::Ties::Breslow => "Breslow",
            },
            fit.patients,
            fit.events,
            fit.iterations
        );
        println!(
            "{:<16} {:>10} {:>12} {:>10} {:>8} {:>10} {:>22}",
            "covariate", "coef", "exp(coef)", "se", "z", "p", "exp(coef) 95% CI"
        );
        for c in &fit.coefficients {
            println!(
                "{:<16} {:>10.5} {:>12.5} {:>10.5} {:>8.3} {:>10.4} {:>22}",
                c.covariate,
                c.coef,
                c.hazard_ratio,
                c.se,
                c.z,
                c.p_value,
                format!("{:.4} – {:.4}", c.hazard_ratio_ci.0, c.hazard_ratio_ci.1)
            );
        }
        println!(
            "partial log-likelihood {:.4}; concordance {}",
            fit.log_likelihood,
            fit.concordance.map_or("-".to_string(), |c| format!(
                "{c:.4} (pairs within a site and stratum)"
            ))
        );
    }
    if let Some(s) = &r.survival {
        println!(
            "\nsurvival ('{}'; Kaplan–Meier, {:.0}% Greenwood intervals on the log(−log) scale)",
            s.time,
            s.confidence * 100.0
        );
        println!(
            "{:<14} {:>16} {:>12} {:>12} {:>26}",
            "stratum", "patients", "events", "median", "survival at the median time"
        );
        // The survival of every stratum at the pooled median follow-up time: a common point.
        let times: Vec<f64> = s
            .strata
            .iter()
            .flat_map(|c| {
                c.points
                    .iter()
                    .filter(|p| p.survival.value.is_some())
                    .map(|p| p.start)
            })
            .collect();
        let mid = times.get(times.len() / 2).copied();
        for c in &s.strata {
            let at_mid = mid.and_then(|t| {
                c.points
                    .iter()
                    .take_while(|p| p.start <= t)
                    .last()
                    .map(|p| (t, shown(&p.survival, 3)))
            });
            println!(
                "{:<14} {:>16} {:>12} {:>12} {:>26}",
                c.level.as_deref().unwrap_or("all"),
                shown(&c.patients, 0),
                shown(&c.events, 0),
                c.median.map_or("not reached".into(), |m| format!("{m}")),
                at_mid.map_or("-".into(), |(t, v)| format!("{v} at {t}")),
            );
        }
        match &s.log_rank {
            Some(lr) => println!(
                "log-rank test between the strata: χ² = {:.3} on {} df, p = {:.4}",
                lr.chi2, lr.df, lr.p_value
            ),
            None if s.strata.len() > 1 && s.noisy => println!(
                "log-rank test: not computed from noisy counts (its p-value would not account \
                 for the noise); an exact query gives it"
            ),
            None if s.strata.len() > 1 => {
                println!("log-rank test: not computed (no events to compare)");
            }
            None => {}
        }
        if s.noisy {
            println!(
                "the counts carry differential-privacy noise: each ± is the noise's stated \
                 error (see docs/privacy.md), not a confidence interval"
            );
        }
        if let Some(path) = &args.plot {
            let curves: Vec<crate::plots::SurvivalCurve<'_>> = s
                .strata
                .iter()
                .map(|c| {
                    let name = c.level.as_deref().unwrap_or("all patients").to_string();
                    let n = c
                        .patients
                        .value
                        .map_or("n suppressed".into(), |n| format!("n = {n:.0}"));
                    let median = c
                        .median
                        .map_or("median not reached".into(), |m| format!("median {m}"));
                    (format!("{name} ({n}, {median})"), name, c)
                })
                .collect();
            let title = match &s.log_rank {
                Some(lr) => format!(
                    "Kaplan–Meier, '{}' over {} sites; log-rank p = {:.4}",
                    f.query.query_id,
                    f.sites.len(),
                    lr.p_value
                ),
                None => format!(
                    "Kaplan–Meier, '{}' over {} sites",
                    f.query.query_id,
                    f.sites.len()
                ),
            };
            let note = format!(
                "Bands: 95% Greenwood intervals{}. Curves stop where fewer than {} patients are at risk.",
                if s.noisy {
                    ", widened to the differential-privacy noise's stated error"
                } else {
                    ""
                },
                f.query.suppress_below
            );
            crate::plots::survival_curves(path, &title, &s.time, &curves, &note)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            println!("plot: {}", path.display());
        }
    } else if args.plot.is_some() {
        anyhow::bail!(
            "{}: the query asked for no survival curves, so there is nothing to plot",
            args.file.display()
        );
    }
    Ok(())
}
