//! The case study: type 2 diabetes risk (Pima) across three hospitals whose patients differ
//! by age (under 25, 25–34, 35 and over), with secure aggregation, so the aggregator only
//! ever sees the sum of the hospitals' updates. Ends with the federated model beside a
//! centralized one trained on the union of the same rows, and writes a training curve and
//! ROC curves.
//!
//! ```sh
//! cargo run --release --example diabetes_federation
//! cargo run --release --example diabetes_federation -- --rounds 5 --out /tmp/run --dp 2
//! ```
//!
//! `--dp Z` trains with differential privacy (noise multiplier Z; see docs/privacy.md).

use medfed::local::{self, Hospital, Study};
use medfed_protocol::metrics::Metrics;
use medfed_protocol::model::ModelKind;

const PIMA: &str = include_str!("data/pima_tr.csv");

fn main() -> anyhow::Result<()> {
    let rounds = local::rounds_arg(20);
    let dir = local::out_dir("diabetes-federation")?;
    let args: Vec<String> = std::env::args().collect();
    let dp = args
        .iter()
        .position(|a| a == "--dp")
        .and_then(|i| args.get(i + 1))
        .and_then(|z| z.parse::<f64>().ok());
    println!(
        "Pima diabetes across 3 hospitals split by age, {rounds} rounds, secure aggregation{}",
        dp.map_or(String::new(), |z| format!(
            ", differential privacy (z = {z})"
        ))
    );
    println!("files: {}\n", dir.display());
    // Column 6 is age.
    let parts = local::split(PIMA, 3, |_, f| {
        let age: f64 = f[6].parse().unwrap_or(0.0);
        if age < 25.0 {
            0
        } else if age < 35.0 {
            1
        } else {
            2
        }
    });
    let hospitals = local::hospitals(&["under-25", "age-25-34", "age-35-plus"], parts);
    let privacy = dp.map_or(String::new(), |z| {
        format!(
            "[study.privacy]\nclip_norm = 0.5\nnoise_multiplier = {z}\n\
             feature_ranges = [[0, 17], [40, 200], [20, 125], [5, 100], [15, 70], [0, 2.5], [21, 85]]\n"
        )
    });
    let study = Study {
        id: "pima-diabetes".into(),
        dataset: "pima".into(),
        kind: ModelKind::Logistic,
        features: ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
            .map(String::from)
            .to_vec(),
        target: "type".into(),
        positive_class: Some("Yes".into()),
        toml: format!(
            "rounds = {rounds}\nmin_sites = 3\nvalidation_fraction = 0.2\n\
             [study.training]\nlocal_epochs = 2\nbatch_size = 64\nlearning_rate = 1.0\nseed = 7\n{privacy}"
        ),
    };
    let run = local::run(&dir, &hospitals, &study)?;
    report(&dir, &hospitals, &study, &run)
}

fn report(
    dir: &std::path::Path,
    hospitals: &[Hospital],
    study: &Study,
    run: &local::Run,
) -> anyhow::Result<()> {
    let c = local::compare(dir, hospitals, study, &run.final_model)?;
    let (Metrics::Classification(f), Metrics::Classification(z)) = (&c.federated, &c.centralized)
    else {
        anyhow::bail!("expected classification metrics");
    };
    println!("\npooled validation rows: {}", f.rows);
    println!(
        "{:<12} {:>8} {:>9} {:>9}",
        "model", "AUC", "accuracy", "log loss"
    );
    println!(
        "{:<12} {:>8.4} {:>9.3} {:>9.4}",
        "federated", f.roc_auc, f.accuracy, f.log_loss
    );
    println!(
        "{:<12} {:>8.4} {:>9.3} {:>9.4}",
        "centralized", z.roc_auc, z.accuracy, z.log_loss
    );
    let (curve, roc) = local::classification_plots(dir, run, &c, z.roc_auc)?;
    println!("\nplots: {}\n       {}", curve.display(), roc.display());
    println!("model: {}", run.final_model.display());
    Ok(())
}
