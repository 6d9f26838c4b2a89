//! `medfed model evaluate`: exact metrics of an exported global model on a CSV file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use medfed_node::data::Table;
use medfed_protocol::export::ExportedModel;
use medfed_protocol::metrics::{Metrics, exact_metrics};
use medfed_protocol::model::ModelKind;

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// An exported model (JSON), e.g. models/STUDY/final.json in the aggregator's out_dir.
    #[arg(long)]
    pub model: PathBuf,
    /// A CSV file with a header row holding the model's feature columns and the target.
    #[arg(long)]
    pub data: PathBuf,
    /// The target column.
    #[arg(long)]
    pub target: String,
    /// The target value counted as positive (default: the model's).
    #[arg(long)]
    pub positive_class: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the ROC curve (one per class, against the rest, for a multinomial model)
    /// and a multinomial model's confusion matrix, as SVG files in this directory.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
}

pub fn load_model(path: &Path) -> anyhow::Result<ExportedModel> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model file {}", path.display()))?;
    let model: ExportedModel = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a medfed model file", path.display()))?;
    model
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(model)
}

/// Exact metrics of `model` on every row of `table`.
pub fn evaluate(
    model: &ExportedModel,
    table: &Table,
    target: &str,
    positive_class: Option<&str>,
) -> anyhow::Result<Metrics> {
    let kind = model.model.kind;
    if matches!(kind, ModelKind::Multinomial { .. }) && positive_class.is_some() {
        anyhow::bail!(
            "--positive-class is for a binary model; this multinomial model predicts the classes {:?}",
            model.classes
        );
    }
    let positive = positive_class.or(model.positive_class.as_deref());
    if kind == ModelKind::Logistic && positive.is_none() {
        anyhow::bail!("the model does not name its positive class: pass --positive-class");
    }
    if kind == ModelKind::Logistic
        && let Some(positive) = positive
    {
        // A positive class the data does not have would score every row as negative, and
        // an accuracy of 1.000 would look like a perfect model.
        let classes = table.classes(target)?;
        if !classes.contains_key(positive) {
            let found = classes
                .iter()
                .map(|(c, n)| format!("{c:?} ({n} rows)"))
                .collect::<Vec<_>>()
                .join(", ");
            let near = classes
                .keys()
                .find(|c| c.eq_ignore_ascii_case(positive))
                .map(|c| format!(" (classes are compared exactly: did you mean {c:?}?)"))
                .unwrap_or_default();
            anyhow::bail!(
                "the positive class {positive:?} is not a value of column '{target}' in the data; \
                    it has: {}{near}. fix: pass --positive-class with one of them",
                if found.is_empty() {
                    "no label".to_string()
                } else {
                    found
                }
            );
        }
    }
    let x = table.inputs(&model.model.preprocessing(), false)?;
    let y = table.target(target, kind, positive, &model.classes)?;
    let p = model.predict_raw(x.view())?;
    Ok(exact_metrics(kind, &p.to_vec(), &y.to_vec()))
}

/// Writes `roc.svg` (and for a multinomial model `confusion.svg`) into `dir`; returns
/// their paths. A linear model has no such plots.
fn plots(
    dir: &Path,
    model: &ExportedModel,
    table: &Table,
    target: &str,
    positive_class: Option<&str>,
    metrics: &Metrics,
) -> anyhow::Result<Vec<PathBuf>> {
    use medfed_protocol::metrics::roc_points;
    let kind = model.model.kind;
    if !kind.is_classifier() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let positive = positive_class.or(model.positive_class.as_deref());
    let x = table.inputs(&model.model.preprocessing(), false)?;
    let y = table
        .target(target, kind, positive, &model.classes)?
        .to_vec();
    let p = model.predict_raw(x.view())?.to_vec();
    let k = kind.outputs();
    let curves: Vec<(String, Vec<(f64, f64)>)> = match metrics {
        Metrics::Multiclass(m) => (0..k)
            .map(|c| {
                let scores: Vec<f64> = p.chunks_exact(k).map(|row| row[c]).collect();
                let labels: Vec<f64> = y
                    .iter()
                    .map(|v| f64::from(u8::from(*v as usize == c)))
                    .collect();
                let name = model.classes.get(c).cloned().unwrap_or_default();
                let auc = m.per_class.get(c).map_or(f64::NAN, |c| c.roc_auc);
                (
                    format!("{name} (AUC {auc:.3})"),
                    roc_points(&scores, &labels),
                )
            })
            .collect(),
        _ => vec![(
            format!(
                "{} (AUC {:.3})",
                positive.unwrap_or("positive"),
                metrics.headline().1
            ),
            roc_points(&p, &y),
        )],
    };
    let roc = dir.join("roc.svg");
    let named: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(n, c)| (n.as_str(), c.clone()))
        .collect();
    let title = match metrics {
        Metrics::Multiclass(_) => format!(
            "ROC of each class against the rest, {} rows",
            metrics.rows()
        ),
        _ => format!("ROC, {} rows", metrics.rows()),
    };
    medfed::plots::roc_curves_titled(&roc, &title, &named)
        .map_err(|e| anyhow::anyhow!("{}: {e}", roc.display()))?;
    let mut written = vec![roc];
    if let Metrics::Multiclass(m) = metrics {
        let path = dir.join("confusion.svg");
        medfed::plots::confusion_matrix(
            &path,
            &format!("Confusion matrix, {} rows", m.rows),
            &model.classes,
            &m.confusion,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<()> {
    let model = load_model(&args.model)?;
    let (table, unlabelled) = Table::load(&args.data)?.with_value_in(&args.target, None)?;
    if unlabelled > 0 {
        eprintln!(
            "note: {unlabelled} rows of {} have no value of '{}' and are left out",
            args.data.display(),
            args.target
        );
    }
    let metrics = evaluate(&model, &table, &args.target, args.positive_class.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
    } else {
        println!(
            "model {} (study '{}', round {}, {} sites) on {}:",
            args.model.display(),
            model.study_id,
            model.round,
            model.sites.len(),
            args.data.display()
        );
        if let Some(why) = &model.stopped {
            println!("note: the study stopped early, after this round: {why}");
        }
        for m in &model.missing_sites {
            println!("note: the model is without site '{}': {}", m.site, m.reason);
        }
        print!("{}", crate::report::metrics_table(&[("global", &metrics)]));
        if let Metrics::Multiclass(m) = &metrics {
            println!();
            print!("{}", crate::report::class_table(&model.classes, m));
        }
    }
    if let Some(dir) = &args.plots {
        let target = args.target.as_str();
        for path in plots(
            dir,
            &model,
            &table,
            target,
            args.positive_class.as_deref(),
            &metrics,
        )? {
            // With --json, stdout is the JSON alone.
            if args.json {
                eprintln!("wrote {}", path.display());
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
