//! Malignant or benign, from 30 features of cell nuclei (Wisconsin breast cancer), across
//! three hospitals, with secure aggregation. Ends with the federated model beside a
//! centralized one, and writes a training curve and ROC curves.
//!
//! ```sh
//! cargo run --release --example breast_cancer_federation
//! cargo run --release --example breast_cancer_federation -- --rounds 5 --out /tmp/run
//! ```

use medfed::local::{self, Study};
use medfed_protocol::metrics::Metrics;
use medfed_protocol::model::ModelKind;

const DATA: &str = include_str!("data/breast_cancer_wisconsin.csv");

fn main() -> anyhow::Result<()> {
    let rounds = local::rounds_arg(15);
    let dir = local::out_dir("breast-cancer-federation")?;
    println!(
        "Wisconsin breast cancer (30 features) across 3 hospitals, {rounds} rounds, secure aggregation"
    );
    println!("files: {}\n", dir.display());
    let features = local::features_except(DATA, "diagnosis");
    // Rows dealt out in turn: three hospitals of similar case mix.
    let parts = local::split(DATA, 3, |i, _| i % 3);
    let hospitals = local::hospitals(&["north", "central", "south"], parts);
    let study = Study {
        id: "breast-cancer".into(),
        dataset: "wdbc".into(),
        kind: ModelKind::Logistic,
        features,
        target: "diagnosis".into(),
        positive_class: Some("malignant".into()),
        toml: format!(
            "rounds = {rounds}\nmin_sites = 3\nvalidation_fraction = 0.2\n\
             [study.training]\nlocal_epochs = 2\nbatch_size = 32\nlearning_rate = 0.5\nseed = 3\n"
        ),
    };
    let run = local::run(&dir, &hospitals, &study)?;
    let c = local::compare(&dir, &hospitals, &study, &run.final_model)?;
    let (Metrics::Classification(f), Metrics::Classification(z)) = (&c.federated, &c.centralized)
    else {
        anyhow::bail!("expected classification metrics");
    };
    println!("\npooled validation rows: {}", f.rows);
    println!(
        "{:<12} {:>8} {:>9} {:>11} {:>11}",
        "model", "AUC", "accuracy", "sensitivity", "specificity"
    );
    for (name, m) in [("federated", f), ("centralized", z)] {
        println!(
            "{name:<12} {:>8.4} {:>9.3} {:>11.3} {:>11.3}",
            m.roc_auc, m.accuracy, m.sensitivity, m.specificity
        );
    }
    let (curve, roc) = local::classification_plots(&dir, &run, &c, z.roc_auc)?;
    println!("\nplots: {}\n       {}", curve.display(), roc.display());
    Ok(())
}
