//! What differential privacy costs a model: held-out AUC against ε, for record-level DP-SGD
//! inside each hospital and for hospital-level DP-FedAvg, on Pima (200 rows, 3 hospitals by
//! age band, as in the demo) and Wisconsin breast cancer (569 rows dealt out to 3
//! hospitals), beside the non-private federated model and the centralized non-private
//! baseline (the same training on the pooled rows). Every point is a real federation on loopback (QUIC, mutual TLS,
//! secure aggregation), repeated; ε is each hospital's, at δ = 1e-6, from the same RDP
//! accountant the nodes charge their budgets with.
//!
//! ```sh
//! cargo run --release --example privacy_cost                 # 3 validation splits
//! cargo run --release --example privacy_cost -- --runs 7 --out docs/img
//! ```
//!
//! Prints a table per dataset and writes `privacy-cost-<dataset>.svg`.

use std::path::PathBuf;

use medfed::csv_text;
use medfed::local::{self, Hospital, Study};
use medfed_protocol::dp::accountant::RdpAccountant;
use medfed_protocol::metrics::Metrics;
use medfed_protocol::model::ModelKind;

const PIMA: &str = include_str!("data/pima_tr.csv");
const BREAST_CANCER: &str = include_str!("data/breast_cancer_wisconsin.csv");
const DELTA: f64 = 1e-6;

/// DP-SGD: rounds, local steps, sampling rate, clip; noise multipliers tried.
const SGD: (u32, u32, f64, f64) = (10, 20, 0.2, 1.0);
const SGD_Z: [f64; 6] = [1.5, 2.0, 3.0, 4.0, 6.0, 10.0];
/// DP-FedAvg: rounds and clip (the demo's); noise multipliers tried.
const FEDAVG: (u32, f64) = (5, 0.5);
const FEDAVG_Z: [f64; 4] = [1.0, 2.0, 4.0, 8.0];

struct Dataset {
    name: &'static str,
    target: &'static str,
    positive: &'static str,
    hospitals: Vec<Hospital>,
    features: Vec<String>,
    /// [low, high] per feature: the declared ranges a DP study standardizes with.
    ranges: String,
    /// DP-SGD's public lot size: about q × a typical hospital's training rows.
    lot: f64,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let runs: usize = arg("--runs").map_or(Ok(3), |r| r.parse())?;
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| ".".into()));
    std::fs::create_dir_all(&out)?;
    for ds in datasets()? {
        run_dataset(&ds, runs, &out)?;
    }
    Ok(())
}

fn datasets() -> anyhow::Result<Vec<Dataset>> {
    let age = |fields: &[&str], header: &[&str]| -> usize {
        let i = header.iter().position(|h| *h == "age").unwrap_or(0);
        match fields.get(i).and_then(|a| a.parse::<f64>().ok()) {
            Some(a) if a < 25.0 => 0,
            Some(a) if a < 35.0 => 1,
            _ => 2,
        }
    };
    let pima_header = csv_text::header(PIMA);
    let pima_header: Vec<&str> = pima_header.iter().map(String::as_str).collect();
    let pima = Dataset {
        name: "pima",
        target: "type",
        positive: "Yes",
        hospitals: local::hospitals(
            &["riverside", "st-marys", "northgate"],
            local::split(PIMA, 3, |_, f| age(f, &pima_header)),
        ),
        features: local::features_except(PIMA, "type"),
        // The demo's declared ranges (clinical plausibility, not the data's).
        ranges: "[[0, 17], [40, 200], [20, 125], [5, 100], [15, 70], [0, 2.5], [21, 85]]".into(),
        // About 50 training rows per hospital, q = 0.2.
        lot: 10.0,
    };
    let features = local::features_except(BREAST_CANCER, "diagnosis");
    let breast = Dataset {
        name: "breast-cancer",
        target: "diagnosis",
        positive: "malignant",
        hospitals: local::hospitals(
            &["north", "central", "south"],
            local::split(BREAST_CANCER, 3, |i, _| i % 3),
        ),
        // The ranges UCI's documentation of the dataset lists (its minima and maxima).
        ranges: ranges_of(BREAST_CANCER, &features)?,
        features,
        // About 150 training rows per hospital, q = 0.2.
        lot: 30.0,
    };
    Ok(vec![pima, breast])
}

/// `[[min, max], ...]` of each feature column.
fn ranges_of(csv: &str, features: &[String]) -> anyhow::Result<String> {
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = r.headers()?.iter().map(str::to_string).collect();
    let idx: Vec<usize> = features
        .iter()
        .map(|f| {
            header
                .iter()
                .position(|h| h == f)
                .ok_or_else(|| anyhow::anyhow!("no column {f}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut lo = vec![f64::INFINITY; idx.len()];
    let mut hi = vec![f64::NEG_INFINITY; idx.len()];
    for rec in r.records() {
        let rec = rec?;
        for (k, &i) in idx.iter().enumerate() {
            let x: f64 = rec.get(i).unwrap_or("").parse()?;
            lo[k] = lo[k].min(x);
            hi[k] = hi[k].max(x);
        }
    }
    let pairs: Vec<String> = lo
        .iter()
        .zip(&hi)
        .map(|(a, b)| format!("[{a}, {b}]"))
        .collect();
    Ok(format!("[{}]", pairs.join(", ")))
}

fn study(ds: &Dataset, id: &str, toml: String) -> Study {
    Study {
        id: id.into(),
        dataset: ds.name.into(),
        kind: ModelKind::Logistic,
        features: ds.features.clone(),
        target: ds.target.into(),
        positive_class: Some(ds.positive.into()),
        toml,
    }
}

/// Held-out AUC of the federated model, and the centralized one's, for one federation.
fn auc(ds: &Dataset, s: &Study) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let run = local::run(dir.path(), &ds.hospitals, s)?;
    let c = local::compare(dir.path(), &ds.hospitals, s, &run.final_model)?;
    match (c.federated, c.centralized) {
        (Metrics::Classification(f), Metrics::Classification(z)) => Ok((f.roc_auc, z.roc_auc)),
        _ => anyhow::bail!("expected classification metrics"),
    }
}

fn summary(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn run_dataset(ds: &Dataset, runs: usize, out: &std::path::Path) -> anyhow::Result<()> {
    let rows: usize = ds.hospitals.iter().map(|h| h.csv.lines().count() - 1).sum();
    println!(
        "\n== {}: {rows} rows over 3 hospitals; {runs} validation splits (20% of each hospital's rows), each point's models trained once per split",
        ds.name
    );
    let base = "min_sites = 3\nvalidation_fraction = 0.2\n";
    // Run k of every setting uses split k: the references and the DP models are compared
    // on the same held-out rows.
    let id = |what: &str, k: usize| format!("{}-{what}-split{k}", ds.name);
    let (mut fed_exact, mut central) = (Vec::new(), Vec::new());
    for k in 0..runs {
        let exact = study(
            ds,
            &id("exact", k),
            format!(
                "rounds = 10\n{base}[study.training]\nlocal_epochs = 2\nbatch_size = 64\nlearning_rate = 1.0\nl2 = 0.01\n"
            ),
        );
        let (f, c) = auc(ds, &exact)?;
        fed_exact.push(f);
        central.push(c);
    }
    let (fed_exact, fe_lo, fe_hi) = summary(fed_exact);
    let (central, c_lo, c_hi) = summary(central);
    let mut table = vec![
        (
            "centralized, no DP (pooled rows)".to_string(),
            f64::INFINITY,
            (central, c_lo, c_hi),
        ),
        (
            "federated, no DP".to_string(),
            f64::INFINITY,
            (fed_exact, fe_lo, fe_hi),
        ),
    ];
    let (r, t, q, c) = SGD;
    let mut sgd_points = Vec::new();
    for z in SGD_Z {
        let mut acc = RdpAccountant::default();
        acc.compose_gaussian(q, z, u64::from(r * t));
        let eps = acc.epsilon(DELTA).0;
        let aucs = (0..runs)
            .map(|k| {
                let s = study(
                    ds,
                    &id(&format!("sgd{z}"), k),
                    format!(
                        "rounds = {r}\n{base}[study.training]\nlearning_rate = 1.0\nl2 = 0.0\n\
                         [study.privacy]\nmechanism = \"dp-sgd\"\nclip_norm = {c}\nnoise_multiplier = {z}\n\
                         sampling_rate = {q}\nlocal_steps = {t}\nlot_size = {}\nfeature_ranges = {}\n",
                        ds.lot, ds.ranges
                    ),
                );
                auc(ds, &s).map(|a| a.0)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (m, lo, hi) = summary(aucs);
        sgd_points.push((eps, m, lo, hi));
        table.push((format!("DP-SGD, z = {z}"), eps, (m, lo, hi)));
    }
    let (r, c) = FEDAVG;
    let mut fedavg_points = Vec::new();
    for z in FEDAVG_Z {
        let mut acc = RdpAccountant::default();
        acc.compose_gaussian(1.0, z, u64::from(r));
        let eps = acc.epsilon(DELTA).0;
        let aucs = (0..runs)
            .map(|k| {
                let s = study(
                    ds,
                    &id(&format!("fedavg{z}"), k),
                    format!(
                        "rounds = {r}\n{base}[study.training]\nlocal_epochs = 2\nbatch_size = 64\nlearning_rate = 1.0\nl2 = 0.01\n\
                         [study.privacy]\nclip_norm = {c}\nnoise_multiplier = {z}\nfeature_ranges = {}\n",
                        ds.ranges
                    ),
                );
                auc(ds, &s).map(|a| a.0)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (m, lo, hi) = summary(aucs);
        fedavg_points.push((eps, m, lo, hi));
        table.push((format!("DP-FedAvg, z = {z}"), eps, (m, lo, hi)));
    }
    println!("\n| model | ε per hospital (δ = 1e-6) | held-out AUC, median | range over splits |");
    println!("|---|---|---|---|");
    for (name, eps, (m, lo, hi)) in &table {
        let e = if eps.is_finite() {
            format!("{eps:.2}")
        } else {
            "∞ (no DP)".into()
        };
        println!("| {name} | {e} | {m:.3} | {lo:.3}–{hi:.3} |");
    }
    let path = out.join(format!("privacy-cost-{}.svg", ds.name));
    medfed::plots::privacy_cost(
        &path,
        &format!(
            "{} ({rows} rows, 3 hospitals): held-out AUC against ε, median of {runs} splits",
            ds.name
        ),
        &[
            (
                &format!(
                    "DP-SGD, record-level ({} rounds x {} steps, q = {})",
                    SGD.0, SGD.1, SGD.2
                ),
                sgd_points,
            ),
            (
                &format!("DP-FedAvg, hospital-level ({} rounds)", FEDAVG.0),
                fedavg_points,
            ),
        ],
        &[
            ("centralized, no DP", central),
            ("federated, no DP", fed_exact),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("plot: {}", path.display());
    Ok(())
}
