//! Disease progression one year after baseline (the diabetes data of Efron et al. 2004),
//! as linear regression across three hospitals, with secure aggregation. Ends with the
//! federated model's RMSE and R² beside a centralized model's, and writes a training curve.
//!
//! ```sh
//! cargo run --release --example progression_regression
//! cargo run --release --example progression_regression -- --rounds 5 --out /tmp/run
//! ```

use medfed::local::{self, Study};
use medfed_protocol::metrics::Metrics;
use medfed_protocol::model::ModelKind;

const DATA: &str = include_str!("data/diabetes_progression.csv");

fn main() -> anyhow::Result<()> {
    let rounds = local::rounds_arg(20);
    let dir = local::out_dir("progression-regression")?;
    println!(
        "diabetes progression (linear regression) across 3 hospitals, {rounds} rounds, secure aggregation"
    );
    println!("files: {}\n", dir.display());
    let features = local::features_except(DATA, "progression");
    let parts = local::split(DATA, 3, |i, _| i % 3);
    let hospitals = local::hospitals(&["east", "west", "harbour"], parts);
    let study = Study {
        id: "progression".into(),
        dataset: "progression".into(),
        kind: ModelKind::Linear,
        features,
        target: "progression".into(),
        positive_class: None,
        toml: format!(
            "rounds = {rounds}\nmin_sites = 3\nvalidation_fraction = 0.2\n\
             [study.training]\nlocal_epochs = 2\nbatch_size = 32\nlearning_rate = 0.05\nseed = 5\n"
        ),
    };
    let run = local::run(&dir, &hospitals, &study)?;
    let c = local::compare(&dir, &hospitals, &study, &run.final_model)?;
    let (Metrics::Regression(f), Metrics::Regression(z)) = (&c.federated, &c.centralized) else {
        anyhow::bail!("expected regression metrics");
    };
    println!("\npooled validation rows: {}", f.rows);
    println!("{:<12} {:>9} {:>7}", "model", "RMSE", "R²");
    println!("{:<12} {:>9.2} {:>7.3}", "federated", f.rmse, f.r2);
    println!("{:<12} {:>9.2} {:>7.3}", "centralized", z.rmse, z.r2);
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)?;
    let curve = plots.join("training.svg");
    medfed::plots::training_curve_of(&curve, &run.rounds, z.r2, "mean squared error", "R²")
        .map_err(|e| anyhow::anyhow!("{}: {e}", curve.display()))?;
    println!("\nplot: {}", curve.display());
    Ok(())
}
