//! `medfed bench ingest`: the node's real de-identification pipeline (the one `medfed node
//! ingest` runs) on a generated hospital extract with identifier and clinical columns, beside
//! the machine's limits measured in the same run (reading and splitting the CSV alone, raw
//! HMAC-SHA256) and the framework's own ceiling (the trivial column-statistics task).
//!
//! The pipeline's configuration is the de-identifying example of `docs/configuration.md`
//! (`docs/samples/node.toml`, compiled in), every field class used; the extract's columns are
//! drawn from the Pima data's per-column statistics, with repeat admissions per patient,
//! quoted addresses, missing values and a few bad values that are quarantined.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use medfed_infra::store::{self, Backend};
use medfed_node::deid::FieldClass;
use medfed_node::ingest::IngestConfig;
use medfed_node::runtime::csv_row::Splitter;
use medfed_node::runtime::{ColumnStats, RunOptions, csv_source, restore, run_partition};

/// The sample configuration, whose `admissions` pipeline is the one measured.
const SAMPLE: &str = include_str!("../docs/samples/node.toml");
/// The sample's de-identifying pipeline.
const PIPELINE: &str = "admissions";

#[derive(clap::Args)]
pub struct IngestArgs {
    /// Rows in the generated extract.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Partitions of the pipeline (default: the sample configuration's).
    #[arg(long)]
    partitions: Option<u32>,
    /// Store backend (default: the default backend).
    #[arg(long)]
    backend: Option<Backend>,
    /// Also write the extract (admissions.csv), a node.toml whose pipeline reads it, and its
    /// pseudonym key into this directory and keep them, for `medfed node ingest --config
    /// DIR/node.toml`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The extract's columns, in order.
const COLUMNS: [&str; 16] = [
    "mrn", "name", "address", "phone", "dob", "admitted", "zip", "age", "sex", "npreg", "glu",
    "bp", "skin", "bmi", "ped", "type",
];

const GIVEN: [&str; 16] = [
    "Ada",
    "Grace",
    "Mary",
    "Alan",
    "John",
    "Rosalind",
    "Edith",
    "Lise",
    "Emmy",
    "Barbara",
    "Katherine",
    "Dorothy",
    "Hedy",
    "Sofia",
    "Marie",
    "Chien-Shiung",
];
const FAMILY: [&str; 16] = [
    "Lovelace",
    "Hopper",
    "Somerville",
    "Turing",
    "Snow",
    "Franklin",
    "Cavell",
    "Meitner",
    "Noether",
    "McClintock",
    "Johnson",
    "Hodgkin",
    "Lamarr",
    "Kovalevskaya",
    "Curie",
    "Wu",
];
const STREETS: [&str; 8] = [
    "Bletchley Park",
    "High Street",
    "Station Road",
    "Mill Lane",
    "Church Street",
    "Park Avenue",
    "Elm Street",
    "Oak Road",
];
const TOWNS: [&str; 8] = [
    "Springfield",
    "Riverton",
    "Fairview",
    "Greenville",
    "Madison",
    "Georgetown",
    "Salem",
    "Clinton",
];

/// SplitMix64: a patient's fixed attributes from its index, and the rows' draws.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A draw in [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A rough normal draw (the sum of four uniforms, scaled to unit variance).
fn normal(h: u64) -> f64 {
    let s: f64 = (0..4).map(|i| unit(mix(h ^ (i * 0x51)))).sum();
    (s - 2.0) * 1.732
}

/// Per-column (mean, sd) of Pima.tr.
const PIMA: [(f64, f64); 6] = [
    (3.57, 3.37),  // npreg
    (124.0, 31.7), // glu
    (71.3, 11.6),  // bp
    (29.2, 11.7),  // skin
    (32.3, 6.1),   // bmi
    (0.46, 0.31),  // ped
];

/// What the generator wrote.
struct Extract {
    rows: u64,
    bytes: u64,
    /// Bytes of the cells of the columns that are not identifiers (patient-id, identifier),
    /// with their separators: the extract's clinical part.
    clinical_bytes: u64,
}

/// Writes `rows` rows of a hospital extract to `path`: about four admissions per patient,
/// ~2% missing values, ~0.2% bad values (quarantined by the pipeline).
fn generate(path: &Path, rows: u64, clinical: &[bool]) -> anyhow::Result<Extract> {
    let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, file);
    writeln!(f, "{}", COLUMNS.join(","))?;
    let patients = (rows / 4).max(1);
    let progress = crate::bench::progress_bar(rows, "writing the extract");
    let mut clinical_bytes = 0u64;
    let mut cell = String::with_capacity(64);
    let mut line = String::with_capacity(256);
    for row in 0..rows {
        let h = mix(row ^ 0x5eed);
        let patient = h % patients;
        let p = mix(patient.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let birth_year = 1925 + (p % 81);
        let admitted_year = 2015 + (h >> 8) % 11;
        line.clear();
        for (c, name) in COLUMNS.iter().enumerate() {
            cell.clear();
            use std::fmt::Write as _;
            let draw = mix(h ^ (c as u64).wrapping_mul(0x9e37));
            let missing = unit(draw) < 0.02;
            let bad = unit(mix(draw)) < 0.0007;
            match *name {
                "mrn" => write!(cell, "MRN{:08}", patient * 7919 % 100_000_000)?,
                "name" => write!(
                    cell,
                    "{} {}",
                    GIVEN[(p >> 4) as usize % 16],
                    FAMILY[(p >> 8) as usize % 16]
                )?,
                "address" => write!(
                    cell,
                    "\"{} {}, {}\"",
                    1 + (p >> 12) % 300,
                    STREETS[(p >> 20) as usize % 8],
                    TOWNS[(p >> 24) as usize % 8]
                )?,
                "phone" => write!(cell, "555-{:04}", (p >> 28) % 10_000)?,
                "dob" => write!(
                    cell,
                    "{birth_year}-{:02}-{:02}",
                    1 + (p >> 32) % 12,
                    1 + (p >> 36) % 28
                )?,
                "admitted" => write!(
                    cell,
                    "{admitted_year}-{:02}-{:02}",
                    1 + (h >> 16) % 12,
                    1 + (h >> 20) % 28
                )?,
                "zip" => write!(cell, "{:05}", (p >> 40) % 100_000)?,
                "age" => write!(cell, "{}", admitted_year - birth_year)?,
                "sex" => cell.push_str(if (p >> 48).is_multiple_of(2) {
                    "F"
                } else {
                    "M"
                }),
                "type" if bad => cell.push_str("maybe"),
                "type" => cell.push_str(if unit(draw) < 0.33 { "Yes" } else { "No" }),
                _ => {
                    let k = c - 9;
                    let (mean, sd) = PIMA[k];
                    let x = (mean + sd * normal(draw)).max(0.0);
                    if name == &"glu" && bad {
                        cell.push_str("abc");
                    } else if missing && matches!(*name, "glu" | "bp" | "bmi") {
                        cell.push_str(if row % 2 == 0 { "NA" } else { "" });
                    } else {
                        match *name {
                            "npreg" if bad => cell.push_str("45"),
                            "npreg" | "bp" | "skin" | "glu" => write!(cell, "{}", x.round())?,
                            "bmi" => write!(cell, "{x:.1}")?,
                            _ => write!(cell, "{x:.3}")?,
                        }
                    }
                }
            }
            if c > 0 {
                line.push(',');
            }
            line.push_str(&cell);
            if clinical[c] {
                clinical_bytes += cell.len() as u64 + 1;
            }
        }
        line.push('\n');
        f.write_all(line.as_bytes())?;
        if row % 65_536 == 0 {
            progress.set_position(row);
        }
    }
    f.flush()?;
    progress.finish_and_clear();
    Ok(Extract {
        rows,
        bytes: std::fs::metadata(path)?.len(),
        clinical_bytes,
    })
}

/// The sample's de-identifying pipeline, reading `csv`.
fn sample_pipeline(csv: &Path) -> anyhow::Result<IngestConfig> {
    let sample: toml::Table = toml::from_str(SAMPLE).context("docs/samples/node.toml")?;
    let pipeline = sample
        .get("ingest")
        .and_then(toml::Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|p| p.get("stream").and_then(toml::Value::as_str) == Some(PIPELINE))
        })
        .context("docs/samples/node.toml has no [[ingest]] stream = \"admissions\"")?;
    let mut cfg: IngestConfig = pipeline
        .clone()
        .try_into()
        .context("docs/samples/node.toml: the admissions pipeline")?;
    cfg.csv = Some(csv.to_path_buf());
    Ok(cfg)
}

/// The node's peak resident memory so far, in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Starts a new peak-memory measurement (Linux: `clear_refs` 5 resets VmHWM).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the peak-memory counter ({e}): peak RSS covers the whole run");
    }
}

/// Bytes under `dir`.
/// The bytes of the files under `dir`: their lengths, and the disk space they take (the
/// store's file has unwritten regions, which take none).
fn dir_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => (m.len(), m.blocks() * 512),
                    Err(_) => (0, 0),
                })
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
        .unwrap_or((0, 0))
}

/// Reading the extract and splitting every row into its fields with ingestion's CSV parser,
/// on one thread: the most a pipeline reading CSV can do per core.
fn parse_only(path: &Path) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut line = Vec::with_capacity(256);
    let mut splitter = Splitter::new();
    let (mut rows, mut fields) = (0u64, 0usize);
    reader.read_until(b'\n', &mut line)?;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if let Ok(row) = splitter.row(&line, COLUMNS.len()) {
            fields += row.len();
        }
        rows += 1;
    }
    std::hint::black_box(fields);
    Ok((rows, t.elapsed().as_secs_f64()))
}

/// Raw HMAC-SHA256 of `n` identifiers as the extract writes them, on one thread.
fn hmac_only(n: u64) -> (u64, f64) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]);
    let ids: Vec<String> = (0..n.min(1 << 20))
        .map(|i| format!("MRN{:08}", i * 7919 % 100_000_000))
        .collect();
    let t = Instant::now();
    let mut sink = 0u8;
    let mut done = 0u64;
    while done < n {
        for id in ids.iter().take((n - done) as usize) {
            sink ^= ring::hmac::sign(&key, id.as_bytes()).as_ref()[0];
        }
        done += ids.len().min((n - done) as usize) as u64;
    }
    std::hint::black_box(sink);
    (n, t.elapsed().as_secs_f64())
}

/// "1 partition", "2 partitions".
fn partitions(n: u32) -> String {
    match n {
        1 => "1 partition".into(),
        n => format!("{n} partitions"),
    }
}

pub fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.records > 0, "--records must be at least 1");
    let tmp = tempfile::tempdir()?;
    let dir = match &args.out {
        Some(out) => {
            medfed_infra::files::create_private_dir(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            out.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let csv = dir.join("admissions.csv");
    let mut cfg = sample_pipeline(&csv)?;
    if let Some(p) = args.partitions {
        anyhow::ensure!(p > 0, "--partitions must be at least 1");
        cfg.partitions = p;
    }
    let clinical: Vec<bool> = COLUMNS
        .iter()
        .map(|c| {
            cfg.fields
                .iter()
                .find(|f| f.name == *c)
                .is_some_and(|f| !matches!(f.class, FieldClass::PatientId | FieldClass::Identifier))
        })
        .collect();
    let t = Instant::now();
    let extract = generate(&csv, args.records, &clinical)?;
    println!(
        "extract: {} rows, {:.0} MB ({:.0} bytes a row, {:.1} of them clinical), written in {:.1} s",
        extract.rows,
        extract.bytes as f64 / 1e6,
        extract.bytes as f64 / extract.rows as f64,
        extract.clinical_bytes as f64 / extract.rows as f64,
        t.elapsed().as_secs_f64()
    );
    println!(
        "pipeline: docs/samples/node.toml's '{PIPELINE}' ({} fields, every class; {} by {})",
        cfg.fields.len(),
        partitions(cfg.partitions),
        cfg.partition_by.as_deref().unwrap_or("file")
    );
    let keystore = dir.join("keystore/pseudonym-keys.toml");
    if !keystore.exists() {
        medfed_node::deid::pseudonym::Keystore::create(&keystore)?;
    }
    if args.out.is_some() {
        write_node_toml(&dir, &cfg)?;
    }

    // The machine's limits, measured first (nothing else running).
    let (parse_rows, parse_secs) = parse_only(&csv)?;
    let (hmacs, hmac_secs) = hmac_only(extract.rows);

    // The real pipeline, as `medfed node ingest` runs it.
    let backend = args.backend.unwrap_or(Backend::DEFAULT);
    let state = tmp.path().join("state");
    reset_peak_rss();
    let (reports, secs) = run_pipeline(
        &cfg,
        backend,
        &state,
        &keystore,
        extract.rows,
        "de-identifying",
    )?;
    let rss = peak_rss_mb();
    let processed: u64 = reports.iter().map(|(_, r)| r.processed).sum();
    let quarantined: u64 = reports.iter().map(|(_, r)| r.quarantined).sum();
    anyhow::ensure!(
        processed == extract.rows,
        "the pipeline processed {processed} of {} rows",
        extract.rows
    );
    let kept = processed - quarantined;
    let (store_length, store_bytes) = dir_bytes(&state);

    // The same pipeline with a model scoring every record (`[[ingest.score]]`).
    let mut scored_cfg = cfg.clone();
    scored_cfg.scores = vec![score_model(tmp.path())?];
    let (_, scored_secs) = run_pipeline(
        &scored_cfg,
        backend,
        &tmp.path().join("state-scored"),
        &keystore,
        extract.rows,
        "de-identifying and scoring",
    )?;

    // The framework's own ceiling: the trivial task over the same extract, one partition.
    let trivial_dir = tempfile::tempdir()?;
    let s: Arc<dyn store::Store> = Arc::from(store::open(
        backend,
        &trivial_dir.path().join(format!("{}.db", backend.name())),
    )?);
    let t = Instant::now();
    let (offset, ..) = restore(&*s, "trivial", 0)?;
    let (header, rx) = csv_source::read(&csv, "trivial", 0, offset)?;
    let task = ColumnStats::new(&header, &["npreg", "skin", "age"])?;
    let trivial = run_partition(Box::new(task), s, "trivial", 0, rx, &RunOptions::default())?;
    let trivial_secs = t.elapsed().as_secs_f64();

    let mb = |rows: u64, secs: f64| {
        extract.bytes as f64 * rows as f64 / extract.rows as f64 / secs / 1e6
    };
    let parse_rate = parse_rows as f64 / parse_secs;
    println!(
        "\n{:<52} {:>12} {:>8} {:>13}",
        "", "records/s", "MB/s", "/ parse-only"
    );
    println!("{}", "-".repeat(88));
    let row = |what: &str, rate: f64, mbs: f64| {
        println!(
            "{:<52} {:>12.0} {:>8.0} {:>13.2}",
            what,
            rate,
            mbs,
            rate / parse_rate
        );
    };
    row(
        "CSV read and split only (1 thread; the limit)",
        parse_rate,
        mb(parse_rows, parse_secs),
    );
    println!(
        "{:<52} {:>12.0}",
        "raw HMAC-SHA256 of one identifier (1 thread)",
        hmacs as f64 / hmac_secs
    );
    row(
        &format!(
            "de-identification pipeline ({})",
            partitions(cfg.partitions)
        ),
        processed as f64 / secs,
        mb(processed, secs),
    );
    row(
        &format!(
            "the same, scoring each record ({})",
            partitions(cfg.partitions)
        ),
        processed as f64 / scored_secs,
        mb(processed, scored_secs),
    );
    row(
        "trivial task: 3 column sums (1 partition; ceiling)",
        trivial.processed as f64 / trivial_secs,
        mb(trivial.processed, trivial_secs),
    );
    println!(
        "\nde-identification: {processed} rows in {secs:.2} s, {kept} kept, {quarantined} quarantined; \
         peak RSS {rss:.0} MB"
    );
    println!(
        "scoring ([[ingest.score]], a logistic model of 9 inputs with its recipe): {:.2} µs more \
         per record of wall time over {} ({:.2} s in all)",
        (scored_secs - secs) / processed as f64 * 1e6,
        partitions(cfg.partitions),
        scored_secs
    );
    println!(
        "store: {:.0} MB on disk ({:.0} MB file length), {:.1} bytes per kept record ({:.2}× the \
         clinical CSV bytes, {:.1} a row)",
        store_bytes as f64 / 1e6,
        store_length as f64 / 1e6,
        store_bytes as f64 / kept.max(1) as f64,
        store_bytes as f64
            / kept.max(1) as f64
            / (extract.clinical_bytes as f64 / extract.rows as f64),
        extract.clinical_bytes as f64 / extract.rows as f64,
    );
    if let Some(out) = &args.out {
        println!(
            "\nkept in {}: medfed node ingest --config {}",
            out.display(),
            out.join("node.toml").display()
        );
    }
    Ok(())
}

/// Runs `cfg` over its extract into a new store under `state`, as `medfed node ingest`
/// does, with a progress bar; the partitions' reports and the seconds it took.
fn run_pipeline(
    cfg: &IngestConfig,
    backend: Backend,
    state: &Path,
    keystore: &Path,
    rows: u64,
    what: &str,
) -> anyhow::Result<(Vec<(u32, medfed_node::runtime::PartitionReport)>, f64)> {
    std::fs::create_dir_all(state)?;
    let store: Arc<dyn store::Store> = Arc::from(store::open(
        backend,
        &state.join(format!("{}.db", backend.name())),
    )?);
    let progress = medfed_node::runtime::progress::Progress::new();
    let bar = crate::bench::progress_bar(rows, what);
    let t = Instant::now();
    let reports = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let watch = {
            let (progress, bar) = (progress.clone(), bar.clone());
            rt.spawn(async move {
                loop {
                    bar.set_position(progress.processed());
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        };
        let r = rt.block_on(medfed_node::ingest::run_with_progress(
            cfg,
            store.clone(),
            keystore,
            None,
            Some(progress.clone()),
        ));
        watch.abort();
        r?
    };
    let secs = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((reports, secs))
}

/// A logistic model over the sample pipeline's de-identified fields, with a recipe that
/// expands `sex` and imputes `skin`, written to `dir` and declared as a
/// `[[ingest.score]]` (its hash as approved). Its weights are made up: scoring costs the
/// same whatever they are.
fn score_model(dir: &Path) -> anyhow::Result<medfed_node::deid::ScoreSpec> {
    use medfed_protocol::model::{GlobalModel, ModelKind};
    use medfed_protocol::preprocess::{ImputeRule, Preprocess};
    let features: Vec<String> = ["age", "sex", "npreg", "glu", "bp", "skin", "bmi", "ped"]
        .map(String::from)
        .to_vec();
    let pre = Preprocess {
        categorical: [("sex".to_string(), vec!["F".to_string(), "M".to_string()])].into(),
        impute: [
            ("skin".to_string(), ImputeRule::Value(29.0)),
            ("bp".to_string(), ImputeRule::Value(72.0)),
        ]
        .into(),
    };
    let recipe = pre.recipe(&features);
    let inputs = recipe.features();
    let n = inputs.len();
    let standardization = medfed_protocol::stats::Standardization {
        mean: vec![0.0; n],
        std: vec![1.0; n],
    };
    let mut model = GlobalModel::zeros(ModelKind::Logistic, inputs, standardization);
    for (j, w) in model.weights.iter_mut().enumerate() {
        *w = 0.01 * (j as f64 - 4.0);
    }
    model.recipe = recipe;
    let exported = medfed_protocol::export::ExportedModel {
        format: medfed_protocol::export::MODEL_FORMAT.into(),
        study_id: "bench".into(),
        round: 1,
        target: "type".into(),
        positive_class: Some("Yes".into()),
        classes: Vec::new(),
        model,
        sites: Vec::new(),
        training_rows: 0,
        train_loss: f64::NAN,
        validation: None,
        missing_sites: Vec::new(),
        stopped: None,
        created_unix: 0,
        provenance: None,
        trees: None,
    };
    exported.validate().map_err(anyhow::Error::msg)?;
    let bytes = serde_json::to_vec(&exported)?;
    let path = dir.join("score-model.json");
    std::fs::write(&path, &bytes)?;
    Ok(medfed_node::deid::ScoreSpec {
        model: path,
        sha256: medfed_protocol::audit::sha256_hex(&bytes),
        output: "risk".into(),
        class: None,
        alert_above: Some(0.9),
    })
}

/// A node.toml whose only pipeline is `cfg` (and a dataset reading its records), for
/// `medfed node ingest`.
fn write_node_toml(dir: &Path, cfg: &IngestConfig) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Pipelines<'a> {
        ingest: [&'a IngestConfig; 1],
    }
    let mut cfg = cfg.clone();
    cfg.csv = Some("admissions.csv".into());
    // A node.toml must name a certificate and key, and load checks they exist: a
    // throwaway consortium CA and this site's certificate, valid for 30 days.
    let pki = dir.join("pki");
    if !medfed_infra::pki::ca_cert_path(&pki).exists() {
        medfed_infra::pki::init_ca(&pki, "bench", 30)?;
    }
    medfed_infra::pki::issue(&pki, &medfed_infra::pki::Role::Site("bench".into()), 30)?;
    let text = format!(
        "# Written by `medfed bench ingest --out`: the de-identifying pipeline of\n\
         # docs/samples/node.toml over the generated extract. `medfed node ingest` does not\n\
         # contact the aggregator; the certificate is a throwaway one (pki/, 30 days).\n\
         site = \"bench\"\n\n[aggregator]\naddress = \"localhost:4433\"\n\n\
         [tls]\nca = \"pki/sites/bench/ca.pem\"\ncert = \"pki/sites/bench/cert.pem\"\n\
         key = \"pki/sites/bench/key.pem\"\n\n\
         [[dataset]]\nname = \"{PIPELINE}\"\ningest = \"{PIPELINE}\"\n\n\
         [state]\ndir = \"state\"\nkeystore = \"keystore/pseudonym-keys.toml\"\n\n{}",
        toml::to_string(&Pipelines { ingest: [&cfg] })?
    );
    std::fs::write(dir.join("node.toml"), text)?;
    Ok(())
}
