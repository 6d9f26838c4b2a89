//! Every example runs green, in a short mode, and writes its plots (labelled SVG files).

use std::path::Path;
use std::process::Command;

use crate::common::example;

fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(example(name)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn svg(path: &Path, labels: &[&str]) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.starts_with("<svg"), "{}", path.display());
    for l in labels {
        assert!(text.contains(l), "{} lacks {l:?}", path.display());
    }
}

#[test]
fn the_federation_examples_train_and_plot() {
    for (name, metric) in [
        ("diabetes_federation", "AUC"),
        ("breast_cancer_federation", "AUC"),
        ("progression_regression", "RMSE"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            name,
            &["--rounds", "3", "--out", dir.path().to_str().unwrap()],
        );
        assert!(
            out.contains("federated") && out.contains("centralized") && out.contains(metric),
            "{out}"
        );
        let plots = dir.path().join("plots");
        svg(&plots.join("training.svg"), &["round", "federated"]);
        if metric == "AUC" {
            svg(
                &plots.join("roc.svg"),
                &["false positive rate", "centralized", "rows)"],
            );
            // The plotted AUC is the table's (the table rounds to 3 decimals, the legend to 4).
            let table: f64 = out
                .lines()
                .find(|l| l.starts_with("federated"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or_else(|| panic!("no federated row:\n{out}"));
            let roc = std::fs::read_to_string(plots.join("roc.svg")).unwrap();
            let plotted: f64 = roc
                .split("federated (AUC ")
                .nth(1)
                // The legend reads "federated (AUC 0.8998, 50 rows)": the number's characters.
                .and_then(|r| {
                    let end = r.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
                    r[..end].parse().ok()
                })
                .expect("the ROC legend gives the federated AUC");
            assert!(
                (table - plotted).abs() <= 0.0005 + 1e-9,
                "{name}: table {table}, plot {plotted}"
            );
        } else {
            svg(&plots.join("training.svg"), &["R²", "mean squared error"]);
        }
    }
}

#[test]
fn the_custom_streamtask_example_runs() {
    let out = run("custom_streamtask", &[]);
    assert!(!out.is_empty());
}

#[test]
fn the_survival_and_boosted_trees_examples_match_their_references_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = run("survival", &["--out", dir.path().to_str().unwrap()]);
    assert!(
        out.contains("log-rank") && out.contains("lifelines"),
        "{out}"
    );
    svg(
        &dir.path().join("km-exact.svg"),
        &["at risk at", "male", "female"],
    );
    svg(
        &dir.path().join("km-dp.svg"),
        &["differential privacy", "at risk at"],
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run("boosted_trees", &["--out", dir.path().to_str().unwrap()]);
    assert!(
        out.contains("held-out ROC AUC") && out.contains("scikit-learn"),
        "{out}"
    );
    svg(&dir.path().join("roc.svg"), &["federated", "centralized"]);
}
