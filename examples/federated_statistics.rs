//! Descriptive statistics across three hospitals, beside the exact centralized values.
//!
//! An aggregator and three hospital nodes run on loopback (QUIC, mutual TLS). The Pima
//! diabetes data and the Wisconsin breast-cancer data are each split across the three
//! hospitals. Two statistics studies compute count, mean, variance, histogram, quartiles
//! and correlations of a cohort, with secure aggregation and differential privacy
//! (Gaussian noise, distributed over the sites). Small cells are suppressed.
//!
//! ```sh
//! cargo run --release --example federated_statistics            # with DP (z = 1.5)
//! cargo run --release --example federated_statistics -- --exact # without noise
//! ```
//!
//! It prints each released value, its stated error and the exact value, and exits with an
//! error if any exact value lies outside the stated error.

use std::path::{Path, PathBuf};

use medfed::{csv_text, local};
use medfed_aggregator::AggregatorEvent;
use medfed_infra::pki;
use medfed_protocol::fedstats::{Released, StatsQuery, StatsRelease};

const SITES: [&str; 3] = ["riverside", "st-marys", "northgate"];

struct Dataset {
    name: &'static str,
    csv: &'static str,
    /// (column, low, high, histogram edges)
    columns: &'static [(&'static str, f64, f64, &'static [f64])],
    /// The cohort condition, as TOML.
    cohort: &'static str,
    cohort_test: fn(&[&str], &[String]) -> bool,
}

const DATASETS: [Dataset; 2] = [
    Dataset {
        name: "pima",
        csv: include_str!("data/pima_tr.csv"),
        columns: &[
            (
                "glu",
                40.0,
                200.0,
                &[40.0, 80.0, 100.0, 120.0, 140.0, 160.0, 200.0],
            ),
            ("bmi", 15.0, 70.0, &[15.0, 25.0, 30.0, 35.0, 40.0, 70.0]),
            ("age", 21.0, 85.0, &[21.0, 25.0, 35.0, 45.0, 85.0]),
        ],
        cohort: r#"{ column = "npreg", op = ">=", value = 0 }"#,
        cohort_test: |_, _| true,
    },
    Dataset {
        name: "breast-cancer",
        csv: include_str!("data/breast_cancer_wisconsin.csv"),
        columns: &[
            (
                "mean_radius",
                5.0,
                30.0,
                &[5.0, 10.0, 12.0, 14.0, 16.0, 20.0, 30.0],
            ),
            ("mean_texture", 8.0, 40.0, &[8.0, 15.0, 20.0, 25.0, 40.0]),
        ],
        cohort: r#"{ column = "diagnosis", op = "==", text = "malignant" }"#,
        cohort_test: |row, header| {
            let i = header.iter().position(|h| h == "diagnosis");
            i.and_then(|i| row.get(i)) == Some(&"malignant")
        },
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let exact_only = std::env::args().any(|a| a == "--exact");
    let noise = if exact_only { None } else { Some(1.5) };
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    println!(
        "federated statistics: 1 aggregator + 3 hospitals on loopback, secure aggregation, {}",
        match noise {
            Some(z) => format!("differential privacy (Gaussian noise multiplier {z})"),
            None => "no noise".into(),
        }
    );
    let pki_dir = d.join("pki");
    pki::init_ca(&pki_dir, "medfed example consortium", 2)?;
    pki::issue(&pki_dir, &pki::Role::Aggregator("localhost".into()), 2)?;
    for s in SITES {
        pki::issue(&pki_dir, &pki::Role::Site(s.into()), 2)?;
    }
    // Each dataset split across the hospitals, row by row.
    for ds in &DATASETS {
        let parts = local::split(ds.csv, SITES.len(), |i, _| i % SITES.len());
        for (s, part) in SITES.iter().zip(parts) {
            std::fs::write(d.join(format!("{s}-{}.csv", ds.name)), part)?;
        }
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut agg = format!(
        "listen = \"127.0.0.1:{port}\"\nout_dir = \"out\"\n[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\n\
         cert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
         [sites]\nallow = [\"riverside\", \"st-marys\", \"northgate\"]\n"
    );
    for ds in &DATASETS {
        agg += &format!(
            "\n[[statistics]]\nid = \"{0}\"\ndataset = \"{0}\"\ncohort = [{1}]\ncorrelations = true\nmin_sites = 3\n",
            ds.name, ds.cohort
        );
        match noise {
            Some(z) => agg += &format!("noise_multiplier = {z}\n"),
            None => agg += "exact = true\n",
        }
        for (name, lo, hi, edges) in ds.columns {
            agg += &format!(
                "[[statistics.column]]\nname = \"{name}\"\nlow = {lo}\nhigh = {hi}\nedges = {edges:?}\n"
            );
        }
    }
    std::fs::write(d.join("aggregator.toml"), agg)?;
    let mut nodes = Vec::new();
    for s in SITES {
        // Exact statistics are released only where a dataset opts in.
        let exact = if noise.is_none() {
            "exact_releases = [\"statistics\"]\n"
        } else {
            ""
        };
        let datasets: String = DATASETS
            .iter()
            .map(|ds| {
                format!(
                    "[[dataset]]\nname = \"{0}\"\npath = \"{s}-{0}.csv\"\n{exact}",
                    ds.name
                )
            })
            .collect();
        // The rules name every column the queries read (cohorts included).
        let columns: Vec<String> = DATASETS
            .iter()
            .flat_map(|ds| ds.columns.iter().map(|c| format!("{:?}", c.0)))
            .chain(["\"npreg\"".to_string(), "\"diagnosis\"".to_string()])
            .collect();
        let cfg = d.join(format!("{s}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "site = \"{s}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 [tls]\nca = \"pki/sites/{s}/ca.pem\"\ncert = \"pki/sites/{s}/cert.pem\"\nkey = \"pki/sites/{s}/key.pem\"\n\
                 [audit]\nlog = \"{s}-audit.log\"\nkey = \"{s}-audit.key\"\n[state]\ndir = \"{s}-state\"\n\
                 [policy.rules]\ncolumns = [{}]\n{datasets}",
                columns.join(", ")
            ),
        )?;
        nodes.push(cfg);
    }

    let rt = tokio::runtime::Runtime::new()?;
    let released: Vec<PathBuf> = rt.block_on(run(&d.join("aggregator.toml"), &nodes))?;

    let mut failures = 0;
    for (ds, path) in DATASETS.iter().zip(&released) {
        let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let query: StatsQuery = serde_json::from_value(file["query"].clone())?;
        let release: StatsRelease = serde_json::from_value(file["release"].clone())?;
        failures += compare(ds, &query, &release)?;
    }
    // What the releases cost each hospital, from its own ledger (a node's `medfed node
    // status` shows the same).
    let budget = medfed_node::policy::PrivacyPolicy::default();
    println!(
        "\nprivacy budget of each hospital (limits: ε {} per study, {} in all, δ = {:e}):",
        budget.epsilon, budget.total_epsilon, budget.delta
    );
    for s in SITES {
        let ledger = medfed_node::privacy::load_ledger(&medfed_node::privacy::ledger_path(
            &d.join(format!("{s}-state")),
        ))?;
        let spent = ledger.epsilon(None, budget.delta);
        println!(
            "  {s:<12} spent ε = {spent:.3} over {} release(s); {:.3} of {} left",
            ledger
                .studies
                .values()
                .map(|x| x.releases.iter().map(|r| r.1).sum::<u64>())
                .sum::<u64>(),
            (budget.total_epsilon - spent).max(0.0),
            budget.total_epsilon
        );
    }
    if failures > 0 {
        return Err(format!("{failures} released values lie outside their stated error").into());
    }
    println!("\nevery released value lies within its stated error of the exact value");
    Ok(())
}

/// Runs the aggregator and the nodes until both statistics studies are released.
async fn run(agg: &Path, nodes: &[PathBuf]) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut paths = Vec::new();
    local::federate(agg, nodes, |event| {
        if let AggregatorEvent::StatisticsReleased { study_id, path } = event {
            println!("released: {study_id} ({})", path.display());
            paths.push(path.clone());
        }
    })
    .await?;
    Ok(paths)
}

/// The exact statistics of the pooled cohort, printed beside the released ones; returns the
/// number of released values outside their stated error.
fn compare(ds: &Dataset, q: &StatsQuery, r: &StatsRelease) -> Result<usize, String> {
    let (header, rows) = csv_text::read(ds.csv).map_err(|e| format!("{}: {e}", ds.name))?;
    if header.is_empty() {
        return Err(format!("{}: no header row", ds.name));
    }
    let rows: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| r.iter().map(String::as_str).collect())
        .collect();
    let cohort: Vec<&Vec<&str>> = rows
        .iter()
        .filter(|row| (ds.cohort_test)(row, &header))
        .collect();
    let n = cohort.len() as f64;
    let mut bad = 0;
    let mut row = |what: String, released: &Released, exact: f64| {
        let shown = match released.value {
            Some(v) => format!("{v:>12.3} ± {:<9.3}", released.error),
            None => format!("{:>12} {:<11}", "suppressed", ""),
        };
        let ok = released
            .value
            .is_none_or(|v| (v - exact).abs() <= released.error);
        if !ok {
            bad += 1;
        }
        println!(
            "  {what:<28} {shown} {exact:>12.3}{}",
            if ok { "" } else { "  OUTSIDE" }
        );
    };
    println!(
        "\n{} ({} of {} rows in the cohort), released beside exact:",
        ds.name,
        cohort.len(),
        rows.len()
    );
    match &r.privacy {
        Some(p) => println!(
            "  differentially private release: (ε = {:.3}, δ = {:e}) per hospital's patients \
             (noise multiplier {}, noise sd per entry {:.3} units)",
            p.epsilon,
            p.delta,
            p.noise_multiplier,
            r.noise_sd_units.unwrap_or(0.0)
        ),
        None => println!("  EXACT release: no differential privacy (the datasets opt in)"),
    }
    println!(
        "  {:<28} {:>12}   {:<9} {:>12}",
        "statistic", "released", "error", "exact"
    );
    row("count".into(), &r.count, n);
    for (c, col) in q.columns.iter().zip(&r.columns) {
        let i = header
            .iter()
            .position(|h| *h == c.name)
            .ok_or(format!("{}: no column '{}'", ds.name, c.name))?;
        let xs: Vec<f64> = cohort
            .iter()
            .map(|row| {
                let cell = row.get(i).copied().unwrap_or("");
                cell.parse::<f64>()
                    .map(|x| x.clamp(c.low, c.high))
                    .map_err(|_| {
                        format!("{}: column '{}': not a number ({cell:?})", ds.name, c.name)
                    })
            })
            .collect::<Result<_, _>>()?;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        row(format!("{} mean", c.name), &col.mean, mean);
        row(format!("{} variance", c.name), &col.variance, var);
        for (b, h) in col.histogram.iter().enumerate() {
            let (lo, hi) = (c.edges[b], c.edges[b + 1]);
            let last = b + 2 == c.edges.len();
            let exact = xs
                .iter()
                .filter(|x| **x >= lo && (**x < hi || (last && **x <= hi)))
                .count();
            row(
                format!("{} in [{lo}, {hi}{}", c.name, if last { "]" } else { ")" }),
                h,
                exact as f64,
            );
        }
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        for (q, v) in &col.quantiles {
            let exact = sorted[((q * n).ceil() as usize).clamp(1, sorted.len()) - 1];
            row(format!("{} quantile {q}", c.name), v, exact);
        }
    }
    if let Some(m) = &r.correlations {
        println!("  correlations (released):");
        for (j, c) in q.columns.iter().enumerate() {
            let cells: Vec<String> = m[j]
                .iter()
                .map(|x| x.map_or("     -".into(), |v| format!("{v:>6.3}")))
                .collect();
            println!("    {:<14} {}", c.name, cells.join(" "));
        }
    }
    Ok(bad)
}
