//! `medfed demo`: a whole federation on one machine, from a fresh clone.
//!
//! Makes a throwaway PKI, splits the Pima diabetes rows across three hospitals by age band
//! (a non-IID split), writes real config files, starts the aggregator and three nodes on
//! loopback (QUIC, mutual TLS), runs the rounds, and compares the federated model with the
//! centralized baseline: the same training on the union of the same training rows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use medfed::local::Comparison;
use medfed_aggregator::AggregatorEvent;
use medfed_infra::pki;
use medfed_protocol::metrics::Metrics;

use crate::report::{RoundTable, metrics_table, num};

/// The Pima training rows (MASS `Pima.tr`), embedded so the demo runs from any directory.
const PIMA_CSV: &str = include_str!("../examples/data/pima_tr.csv");
const STUDY_ID: &str = "pima-diabetes";
const FEATURES: [&str; 7] = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"];

/// The three simulated hospitals and the age band each one's patients fall in.
const SITES: [(&str, &str, u32, u32); 3] = [
    ("riverside", "age 21-24", 0, 25),
    ("st-marys", "age 25-34", 25, 35),
    ("northgate", "age 35+", 35, u32::MAX),
];

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep everything the run makes (PKI, configs, data splits, models, logs) in DIR; it
    /// must be empty or not exist. Without it, a temporary directory is used and removed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Federated rounds to run.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Turn secure aggregation off (for debugging: the aggregator then sees every update).
    #[arg(long)]
    no_secure_aggregation: bool,
    /// Train with differential privacy (DP-FedAvg): the noise multiplier z (noise standard
    /// deviation over the sensitivity 2 × clip norm). The demo's sites allow any ε; the ε
    /// spent is printed at the end.
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// With --noise-multiplier: the L2 bound of each site's model delta per round.
    #[arg(long, default_value_t = 0.5)]
    clip_norm: f64,
}

/// δ of the demo's differential-privacy guarantees.
const DEMO_DELTA: f64 = 1e-6;

/// Declared ranges of the Pima features (standardization under differential privacy).
const PIMA_RANGES: &str = "[[0, 17], [40, 200], [20, 125], [5, 100], [15, 70], [0, 2.5], [21, 85]]";

pub fn run(args: DemoArgs, log_level: &str) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let (dir, _temp) = match &args.out {
        Some(d) => {
            if d.exists()
                && std::fs::read_dir(d)
                    .with_context(|| format!("cannot read {}", d.display()))?
                    .next()
                    .is_some()
            {
                bail!(
                    "{} is not empty; give --out a new or empty directory",
                    d.display()
                );
            }
            medfed_infra::files::create_private_dir(d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            (d.canonicalize()?, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("medfed-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let log = dir.join("logs").join("medfed.log");
    crate::logging::init_file(&log, log_level)
        .with_context(|| format!("cannot create log file {}", log.display()))?;
    println!(
        "medfed demo: 1 aggregator + 3 hospital nodes on loopback (QUIC, mutual TLS 1.3, secure aggregation {})",
        if args.no_secure_aggregation {
            "OFF"
        } else {
            "on"
        }
    );
    println!(
        "working directory: {}{}",
        dir.display(),
        if args.out.is_none() {
            " (temporary; --out DIR keeps it)"
        } else {
            ""
        }
    );

    let sites = write_site_data(&dir)?;
    make_pki(&dir)?;
    let (agg_config_path, node_config_paths) = write_configs(
        &dir,
        args.rounds,
        !args.no_secure_aggregation,
        args.noise_multiplier.map(|z| (z, args.clip_norm)),
    )?;
    println!(
        "\nhospital  {:<11}  {:>5}  {:>9}",
        "patients", "rows", "diabetic"
    );
    for s in &sites {
        println!(
            "{:<9} {:<11}  {:>5}  {:>9}",
            s.name, s.band, s.rows, s.positives
        );
    }
    println!();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (final_model, rounds) =
        runtime.block_on(federate(&agg_config_path, &node_config_paths, args.rounds))?;

    // Compare with the centralized baseline on the union of the same rows.
    let comparison = compare(&dir, &final_model)?;
    let (federated, central) = (&comparison.federated, &comparison.centralized);
    let val_path = dir.join("data").join("validation.csv");
    println!("\nvalidation rows of all three hospitals, exact metrics:");
    print!(
        "{}",
        metrics_table(&[("federated", federated), ("centralized", central)])
    );
    if let (Metrics::Classification(f), Metrics::Classification(c)) = (federated, central) {
        println!(
            "AUC difference (federated - centralized): {}",
            num(f.roc_auc - c.roc_auc, 4)
        );
    }
    if let Some(z) = args.noise_multiplier {
        let ledger = medfed_node::privacy::load_ledger(&medfed_node::privacy::ledger_path(
            &dir.join("nodes").join(format!("state-{}", SITES[0].0)),
        ))
        .map_err(anyhow::Error::msg)?;
        println!(
            "differential privacy: z = {z}, clip norm {}: each site spent ε = {:.2} (δ = {DEMO_DELTA:e}) over {} rounds",
            args.clip_norm,
            ledger.epsilon(Some(STUDY_ID), DEMO_DELTA),
            ledger.releases(STUDY_ID)
        );
    }
    let central_auc = match central {
        Metrics::Classification(c) => c.roc_auc,
        Metrics::Regression(_) | Metrics::Multiclass(_) => f64::NAN,
    };
    let run = medfed::local::Run {
        rounds,
        final_model,
    };
    let (training_svg, roc_svg) =
        medfed::local::classification_plots(&dir, &run, &comparison, central_auc)?;
    let final_model = run.final_model;
    println!(
        "\nplots:              {}\n                    {}",
        training_svg.display(),
        roc_svg.display()
    );
    println!("final global model: {}", final_model.display());
    if args.out.is_none() {
        println!(
            "                    (removed on exit with the rest of the run: --out DIR keeps it)"
        );
    }
    println!(
        "evaluate it:        medfed model evaluate --model {} --data {} --target type",
        final_model.display(),
        val_path.display()
    );
    println!("logs:               {}", log.display());
    Ok(())
}

struct SiteData {
    name: &'static str,
    band: &'static str,
    rows: usize,
    positives: usize,
}

/// Splits the embedded Pima rows by age band into `dir/data/<site>.csv`.
fn write_site_data(dir: &Path) -> anyhow::Result<Vec<SiteData>> {
    let mut reader = csv::Reader::from_reader(PIMA_CSV.as_bytes());
    let header = reader.headers()?.clone();
    let age = header
        .iter()
        .position(|h| h == "age")
        .context("embedded data has no age column")?;
    let target = header
        .iter()
        .position(|h| h == "type")
        .context("embedded data has no type column")?;
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let mut writers = SITES
        .iter()
        .map(|(name, ..)| {
            let mut w = csv::Writer::from_path(data_dir.join(format!("{name}.csv")))?;
            w.write_record(&header)?;
            Ok(w)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut counts = vec![(0usize, 0usize); SITES.len()];
    for rec in reader.records() {
        let rec = rec?;
        let a: u32 = rec[age].parse().context("embedded data: bad age")?;
        let i = SITES
            .iter()
            .position(|(_, _, lo, hi)| (*lo..*hi).contains(&a))
            .context("age outside every band")?;
        writers[i].write_record(&rec)?;
        counts[i].0 += 1;
        counts[i].1 += usize::from(&rec[target] == "Yes");
    }
    for w in &mut writers {
        w.flush()?;
    }
    Ok(SITES
        .iter()
        .zip(counts)
        .map(|((name, band, ..), (rows, positives))| SiteData {
            name,
            band,
            rows,
            positives,
        })
        .collect())
}

fn make_pki(dir: &Path) -> anyhow::Result<()> {
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir, "medfed demo consortium", 7)?;
    pki::issue(&pki_dir, &pki::Role::Aggregator("localhost".into()), 7)?;
    for (name, ..) in SITES {
        pki::issue(&pki_dir, &pki::Role::Site(name.into()), 7)?;
    }
    Ok(())
}

/// Writes `aggregator.toml` and `nodes/<site>.toml` as a user would, on a free loopback
/// port.
fn write_configs(
    dir: &Path,
    rounds: u32,
    secure: bool,
    privacy: Option<(f64, f64)>,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let study_privacy = match privacy {
        Some((z, c)) => format!(
            "\n# DP-FedAvg: each round releases only the noisy sum of clipped model deltas.\n[study.privacy]\nclip_norm = {c}\nnoise_multiplier = {z}\nfeature_ranges = {PIMA_RANGES}\n"
        ),
        None => String::new(),
    };
    let node_privacy = if privacy.is_some() {
        format!(
            "\n# The demo's sites allow any ε (a real site sets its own limits).\n[policy.privacy]\nepsilon = 1e6\ntotal_epsilon = 1e6\ndelta = {DEMO_DELTA:e}\n"
        )
    } else {
        String::new()
    };
    // Without DP the demo's hospitals opt in to exact models of their dataset: a node
    // trains only with differential privacy unless its operator says otherwise.
    let exact = if privacy.is_some() {
        String::new()
    } else {
        "# This hospital lets studies without differential privacy train on this dataset (the\n\
         # model is released exactly, summed under secure aggregation). Without this line\n\
         # only DP studies are served: run `medfed demo --noise-multiplier 2` to see one.\n\
         exact_releases = [\"training\"]\n"
            .to_string()
    };
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let allow = SITES
        .iter()
        .map(|(n, ..)| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let features = FEATURES
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let aggregator = format!(
        r#"# medfed aggregator: written by `medfed demo`
name = "demo-coordinating-centre"
listen = "127.0.0.1:{port}"
out_dir = "aggregator"

[tls]
ca = "pki/aggregator/localhost/ca.pem"
cert = "pki/aggregator/localhost/cert.pem"
key = "pki/aggregator/localhost/key.pem"

[audit]
log = "audit/aggregator.log"
key = "audit/aggregator.key"

[sites]
allow = [{allow}]

[[study]]
id = "{STUDY_ID}"
description = "Type 2 diabetes risk (WHO criteria) from routine measurements"
dataset = "pima"
model = "logistic"
features = [{features}]
target = "type"
positive_class = "Yes"
validation_fraction = 0.25
rounds = {rounds}
min_sites = 3
wait_for_sites_secs = 30
round_timeout_secs = 30

# Two full-batch local epochs per round: the sites differ a lot (split by age), and more
# local work per round pulls each site towards its own optimum (client drift).
[study.training]
local_epochs = 2
batch_size = 64
learning_rate = 1.0
l2 = 0.01
seed = 7

# Each hospital's update is masked: the aggregator only learns their sum.
[study.secure_aggregation]
enabled = {secure}
{study_privacy}"#
    );
    let agg_path = dir.join("aggregator.toml");
    std::fs::write(&agg_path, aggregator)?;
    let mut node_paths = Vec::new();
    let columns = FEATURES
        .iter()
        .chain(&["type"])
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let plain = !secure;
    for (name, ..) in SITES {
        let node = format!(
            r#"# medfed node of site '{name}': written by `medfed demo`
site = "{name}"

[aggregator]
address = "127.0.0.1:{port}"
server_name = "localhost"

[tls]
ca = "../pki/sites/{name}/ca.pem"
cert = "../pki/sites/{name}/cert.pem"
key = "../pki/sites/{name}/key.pem"

[audit]
log = "../audit/{name}.log"
key = "../audit/{name}.key"

# The hospital serves only studies its operator approved; the demo approves by rule.
[policy.rules]
datasets = ["pima"]
models = ["logistic"]
columns = [{columns}]
max_rounds = 1000
min_training_rows = 11
allow_without_secure_aggregation = {plain}
{node_privacy}
[state]
dir = "state-{name}"

[[dataset]]
name = "pima"
path = "../data/{name}.csv"
{exact}
[reconnect]
initial_backoff_ms = 200
max_backoff_ms = 2000
"#
        );
        let p = dir.join("nodes").join(format!("{name}.toml"));
        std::fs::create_dir_all(dir.join("nodes"))?;
        std::fs::write(&p, node)?;
        node_paths.push(p);
    }
    Ok((agg_path, node_paths))
}

/// Runs the aggregator and the nodes until the study completes; returns the final model.
async fn federate(
    agg_config: &Path,
    node_configs: &[PathBuf],
    rounds: u32,
) -> anyhow::Result<(PathBuf, Vec<(u32, f64, f64)>)> {
    let bar = indicatif::ProgressBar::new(u64::from(rounds));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message("waiting for the hospitals to connect");
    let mut table = RoundTable::new();
    // (round, train loss, federated validation AUC) for the training curve.
    let mut curve = Vec::new();
    let mut connected = 0;
    let outcomes = medfed::local::federate(agg_config, node_configs, |event| {
        match event {
            AggregatorEvent::SiteConnected { .. } => {
                connected += 1;
                bar.set_message(format!("{connected}/3 hospitals connected"));
            }
            AggregatorEvent::StudyStarted { .. } => bar.set_message("training"),
            AggregatorEvent::RoundCompleted(s) => {
                bar.set_position(u64::from(s.round));
                let auc = match &s.validation {
                    Some(Metrics::Classification(m)) => m.roc_auc,
                    _ => f64::NAN,
                };
                curve.push((s.round, s.train_loss, auc));
            }
            _ => {}
        }
        if let Some(line) = table.line_for(event) {
            bar.suspend(|| println!("{line}"));
        }
    })
    .await;
    bar.finish_and_clear();
    let outcome = outcomes?
        .into_iter()
        .next()
        .context("the aggregator ran no study")?;
    Ok((outcome.final_model, curve))
}

/// The federated model beside the centralized baseline on the pooled validation rows
/// ([`medfed::local::compare_study`]); writes those rows to `dir/data/validation.csv`.
fn compare(dir: &Path, final_model: &Path) -> anyhow::Result<Comparison> {
    let sites = SITES.map(|(name, ..)| name);
    let comparison = medfed::local::compare_study(dir, STUDY_ID, &sites, final_model)?;
    let mut val_rows = csv::Writer::from_path(dir.join("data").join("validation.csv"))?;
    for (i, (name, val)) in sites.iter().zip(&comparison.validation_rows).enumerate() {
        let mut r = csv::Reader::from_path(dir.join("data").join(format!("{name}.csv")))?;
        if i == 0 {
            val_rows.write_record(r.headers()?)?;
        }
        for (row, rec) in r.records().enumerate() {
            if val.binary_search(&row).is_ok() {
                val_rows.write_record(&rec?)?;
            }
        }
    }
    val_rows.flush()?;
    Ok(comparison)
}
