//! Tables for people: the per-round table and metric comparisons.

use medfed_aggregator::{AggregatorEvent, RoundSummary};
use medfed_protocol::metrics::{Metrics, MulticlassMetrics};

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
            Some(Metrics::Multiclass(m)) => {
                (num(m.log_loss, 4), num(m.macro_auc, 4), num(m.accuracy, 3))
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
        Some(Metrics::Multiclass(_)) => {
            out += &format!(
                "{:<12}  {:>5}  {:>9}  {:>8}  {:>8}\n",
                "model", "rows", "macro AUC", "accuracy", "log loss"
            );
            out += &"-".repeat(12 + 2 + 5 + 2 + 9 + 2 + 8 + 2 + 8);
            out.push('\n');
            for (name, m) in rows {
                if let Metrics::Multiclass(m) = m {
                    out += &format!(
                        "{:<12}  {:>5}  {:>9}  {:>8}  {:>8}\n",
                        name,
                        m.rows,
                        num(m.macro_auc, 4),
                        num(m.accuracy, 3),
                        num(m.log_loss, 4)
                    );
                }
            }
        }
        None => {}
    }
    out
}

/// A multinomial model's figures per class (one-vs-rest AUC, recall, precision, rows) and
/// its confusion matrix, with the classes' names.
pub fn class_table(classes: &[String], m: &MulticlassMetrics) -> String {
    let name = |c: usize| {
        classes
            .get(c)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    };
    let width = (0..m.per_class.len())
        .map(|c| name(c).chars().count())
        .chain([5])
        .max()
        .unwrap_or(5);
    let mut out = format!(
        "{:<width$}  {:>5}  {:>7}  {:>6}  {:>9}\n",
        "class", "rows", "AUC", "recall", "precision"
    );
    out += &"-".repeat(width + 2 + 5 + 2 + 7 + 2 + 6 + 2 + 9);
    out.push('\n');
    for (c, k) in m.per_class.iter().enumerate() {
        out += &format!(
            "{:<width$}  {:>5}  {:>7}  {:>6}  {:>9}\n",
            name(c),
            k.support,
            num(k.roc_auc, 4),
            num(k.recall, 3),
            num(k.precision, 3)
        );
    }
    out += &format!(
        "\nconfusion (rows: actual class, columns: predicted)\n{:<width$}",
        ""
    );
    let cell = (0..m.per_class.len())
        .map(|c| name(c).chars().count())
        .chain(m.confusion.iter().flatten().map(|n| n.to_string().len()))
        .max()
        .unwrap_or(1);
    for c in 0..m.per_class.len() {
        out += &format!("  {:>cell$}", name(c));
    }
    out.push('\n');
    for (c, row) in m.confusion.iter().enumerate() {
        out += &format!("{:<width$}", name(c));
        for n in row {
            out += &format!("  {n:>cell$}");
        }
        out.push('\n');
    }
    out
}
