//! Tables for people: the per-round table and metric comparisons.

use medfed_aggregator::{AggregatorEvent, RoundSummary};
use medfed_protocol::metrics::Metrics;

/// Formats a metric, showing "-" for undefined values.
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// The per-round table the aggregator and the demo print.
pub struct RoundTable {
    header_printed: bool,
}

impl RoundTable {
    pub fn new() -> Self {
        RoundTable {
            header_printed: false,
        }
    }

    pub fn header() -> String {
        format!(
            "{:>5}  {:>5}  {:>10}  {:>8}  {:>8}  {:>8}\n{}",
            "round",
            "sites",
            "train loss",
            "val loss",
            "val AUC",
            "val acc",
            "-".repeat(5 + 2 + 5 + 2 + 10 + 2 + 8 + 2 + 8 + 2 + 8)
        )
    }

    pub fn row(s: &RoundSummary) -> String {
        let (loss, headline, acc) = match &s.validation {
            Some(Metrics::Classification(m)) => {
                (num(m.log_loss, 4), num(m.roc_auc, 4), num(m.accuracy, 3))
            }
            Some(Metrics::Regression(m)) => {
                (num(m.rmse, 4), format!("R2 {}", num(m.r2, 3)), "-".into())
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        format!(
            "{:>5}  {:>5}  {:>10}  {:>8}  {:>8}  {:>8}",
            s.round,
            s.sites.len(),
            num(s.train_loss, 4),
            loss,
            headline,
            acc
        )
    }

    /// The line(s) to print for an event, if any (the header comes before the first row).
    pub fn line_for(&mut self, event: &AggregatorEvent) -> Option<String> {
        match event {
            AggregatorEvent::StudyStarted {
                study_id,
                sites,
                rounds,
            } => {
                self.header_printed = false;
                Some(format!(
                    "study '{study_id}': {} sites ({}), {rounds} rounds",
                    sites.len(),
                    sites.join(", ")
                ))
            }
            AggregatorEvent::RoundCompleted(s) => {
                let row = Self::row(s);
                if self.header_printed {
                    Some(row)
                } else {
                    self.header_printed = true;
                    Some(format!("{}\n{row}", Self::header()))
                }
            }
            AggregatorEvent::RoundFailed { round, reason, .. } => {
                Some(format!("round {round} failed: {reason}"))
            }
            AggregatorEvent::SiteRefused {
                remote,
                site,
                reason,
            } => Some(format!(
                "refused {} ({remote}): {reason}",
                site.as_deref().unwrap_or("a peer")
            )),
            AggregatorEvent::StudyRefused {
                study_id,
                site,
                reason,
            } => Some(format!(
                "site '{site}' refused study '{study_id}': {reason}"
            )),
            _ => None,
        }
    }
}

/// A table of named metric sets side by side (one row per model).
pub fn metrics_table(rows: &[(&str, &Metrics)]) -> String {
    let mut out = String::new();
    match rows.first().map(|r| r.1) {
        Some(Metrics::Classification(_)) => {
            out += &format!(
                "{:<12}  {:>5}  {:>7}  {:>8}  {:>8}  {:>11}  {:>11}\n",
                "model", "rows", "AUC", "accuracy", "log loss", "sensitivity", "specificity"
            );
            out += &"-".repeat(12 + 2 + 5 + 2 + 7 + 2 + 8 + 2 + 8 + 2 + 11 + 2 + 11);
            out.push('\n');
            for (name, m) in rows {
                if let Metrics::Classification(m) = m {
                    out += &format!(
                        "{:<12}  {:>5}  {:>7}  {:>8}  {:>8}  {:>11}  {:>11}\n",
                        name,
                        m.rows,
                        num(m.roc_auc, 4),
                        num(m.accuracy, 3),
                        num(m.log_loss, 4),
                        num(m.sensitivity, 3),
                        num(m.specificity, 3)
                    );
                }
            }
        }
        Some(Metrics::Regression(_)) => {
            out += &format!(
                "{:<12}  {:>5}  {:>10}  {:>7}\n",
                "model", "rows", "RMSE", "R2"
            );
            out += &"-".repeat(12 + 2 + 5 + 2 + 10 + 2 + 7);
            out.push('\n');
            for (name, m) in rows {
                if let Metrics::Regression(m) = m {
                    out += &format!(
                        "{:<12}  {:>5}  {:>10}  {:>7}\n",
                        name,
                        m.rows,
                        num(m.rmse, 4),
                        num(m.r2, 4)
                    );
                }
            }
        }
        None => {}
    }
    out
}
