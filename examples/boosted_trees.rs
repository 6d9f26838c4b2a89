//! Gradient-boosted trees across three hospitals, beside a centralized histogram GBDT.
//!
//! The Wisconsin breast-cancer rows (examples/data/breast_cancer_wisconsin.csv) are split
//! into three hospitals and a held-out file (tests/fixtures/breast_cancer, from
//! scripts/trees_reference.py). On loopback (QUIC, mutual TLS, secure aggregation) the
//! aggregator grows 50 trees of depth 3 on 32 quantile bins per feature, learning rate 0.1,
//! from the sums of the hospitals' gradient histograms, one secure round per tree level.
//!
//! ```sh
//! cargo run --release --example boosted_trees [-- --out DIR]
//! ```
//!
//! It prints the held-out ROC AUC beside scikit-learn's HistGradientBoostingClassifier
//! trained on the pooled rows with the same settings, what each hospital sent per tree, and
//! draws both ROC curves (`roc.svg` in the output directory).

use medfed::{csv_text, local};
use medfed_protocol::export::ExportedModel;
use medfed_protocol::metrics::{roc_auc, roc_points};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const PARTS: [&str; 3] = [
    include_str!("../tests/fixtures/breast_cancer/site-a.csv"),
    include_str!("../tests/fixtures/breast_cancer/site-b.csv"),
    include_str!("../tests/fixtures/breast_cancer/site-c.csv"),
];
const HOLDOUT: &str = include_str!("../tests/fixtures/breast_cancer/holdout.csv");
const REFERENCE: &str = include_str!("../tests/fixtures/breast_cancer/reference.json");

fn main() -> anyhow::Result<()> {
    let out = local::out_dir("boosted-trees")?;
    let reference: serde_json::Value = serde_json::from_str(REFERENCE)?;
    let features = reference["features"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("reference.json has no features"))?;
    let bounds: Vec<String> = features
        .iter()
        .map(|f| {
            format!(
                "{{ name = {}, low = {}, high = {} }}",
                f["name"], f["low"], f["high"]
            )
        })
        .collect();
    let s = &reference["settings"];
    let statistics = format!(
        "\n[[statistics]]\nid = \"wdbc-trees\"\ndataset = \"wdbc\"\nexact = true\nmin_sites = 3\n\
         [statistics.boosted_trees]\ntarget = \"diagnosis\"\npositive_class = \"malignant\"\n\
         trees = {}\ndepth = {}\nlearning_rate = {}\nmax_bins = {}\nl2 = {}\nmin_child_samples = {}\n\
         features = [{}]\n",
        s["trees"],
        s["depth"],
        s["learning_rate"],
        s["max_bins"],
        s["l2"],
        s["min_child_samples"],
        bounds.join(", ")
    );
    let mut columns: Vec<String> = features
        .iter()
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect();
    columns.push("diagnosis".into());
    let parts: Vec<String> = PARTS.iter().map(|p| p.to_string()).collect();
    let (agg, nodes) =
        local::exact_statistics_federation(&out, &SITES, "wdbc", &parts, &columns, &statistics)?;
    println!(
        "boosted trees: 1 aggregator + 3 hospitals on loopback (secure aggregation); files in {}",
        out.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(local::federate(&agg, &nodes, |_| {}))?;

    // The released model, scored on the raw held-out rows.
    let model: ExportedModel = serde_json::from_str(&std::fs::read_to_string(
        out.join("out/models/wdbc-trees/final.json"),
    )?)?;
    model.validate().map_err(anyhow::Error::msg)?;
    let (header, rows) = csv_text::read(HOLDOUT)?;
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow::anyhow!("holdout.csv has no column {name}"))
    };
    let idx: Vec<usize> = model
        .model
        .features
        .iter()
        .map(|f| column(f))
        .collect::<anyhow::Result<_>>()?;
    let target = column("diagnosis")?;
    let mut x = Vec::new();
    for r in &rows {
        for &j in &idx {
            x.push(r[j].parse::<f64>()?);
        }
    }
    let x = ndarray::Array2::from_shape_vec((rows.len(), idx.len()), x)?;
    let federated = model.predict_raw(x.view())?.to_vec();
    let y: Vec<f64> = rows
        .iter()
        .map(|r| f64::from(u8::from(r[target] == "malignant")))
        .collect();
    let centralized: Vec<f64> = reference["holdout_scores"]
        .as_array()
        .map(|v| v.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    let (auc_f, auc_c) = (roc_auc(&federated, &y), roc_auc(&centralized, &y));
    println!(
        "\nheld-out ROC AUC ({} rows): federated {auc_f:.4}, scikit-learn {} (pooled rows) {auc_c:.4}; difference {:.4}",
        rows.len(),
        reference["sklearn"].as_str().unwrap_or("?"),
        (auc_f - auc_c).abs()
    );
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("out/statistics/wdbc-trees.json"),
    )?)?;
    let t = &stats["release"]["trees"];
    let (entries, trees) = (
        t["entries_per_site"].as_u64().unwrap_or(0),
        t["trees"].as_u64().unwrap_or(1).max(1),
    );
    println!(
        "each hospital sent {entries} numbers in {} secure rounds: {} per tree, {} kB per tree as 64-bit fixed point",
        t["steps"],
        entries / trees,
        entries * 8 / trees / 1000
    );
    let roc = out.join("roc.svg");
    medfed::plots::roc_curves_titled(
        &roc,
        &format!(
            "Breast cancer, held-out rows ({}): boosted trees, 50 × depth 3",
            rows.len()
        ),
        &[
            (
                &format!("federated, 3 hospitals (AUC {auc_f:.4})"),
                roc_points(&federated, &y),
            ),
            (
                &format!("centralized scikit-learn (AUC {auc_c:.4})"),
                roc_points(&centralized, &y),
            ),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", roc.display()))?;
    println!("plot: {}", roc.display());
    if (auc_f - auc_c).abs() > 0.01 {
        anyhow::bail!("the federated AUC is more than 0.01 from the centralized one");
    }
    Ok(())
}
