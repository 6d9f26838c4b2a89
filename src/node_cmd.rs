//! `medfed node init | rotate-key | privacy-report | status | quarantine` and
//! `medfed bench pseudonymize`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use medfed_node::deid::pseudonym::{Keystore, Pseudonymizer};
use medfed_node::deid::report::ClassCounter;

#[derive(clap::Args)]
pub struct InitArgs {
    /// The directory to set the node up in (created; must not hold a node.toml yet).
    #[arg(long)]
    dir: PathBuf,
    /// This hospital's site name, as on its certificate (lowercase letters, digits, '-').
    #[arg(long)]
    site: String,
    /// The aggregator's `host:port`, as the consortium gave it.
    #[arg(long, default_value = "localhost:4433")]
    aggregator: String,
}

/// The commented config `node init` writes.
fn sample_config(site: &str, aggregator: &str) -> String {
    format!(
        r#"# medfed node configuration of site '{site}'. Every key, with its default, is in
# docs/samples/node.toml; relative paths are relative to this file.

site = "{site}"

[aggregator]
# The node dials out (UDP); the hospital opens no inbound port.
address = "{aggregator}"

[tls]
# Your certificate, key and the consortium CA: the consortium's operator runs
# `medfed pki issue --site {site}` and sends you the folder pki/sites/{site}/.
ca = "pki/ca.pem"
cert = "pki/cert.pem"
key = "pki/key.pem"

[policy]
# Studies are served only once approved: `medfed node approve --config node.toml --study HASH`.
approvals = "approved-studies.txt"

# The local datasets studies may use, by name. Rows never leave this machine.
[[dataset]]
name = "pima"
path = "data/pima.csv"
# Everything this dataset releases carries differential-privacy noise, charged to this
# site's budget. To let studies without DP use it (exact models; exact statistics, each
# approved by hash), list what, and `node check` and the compliance log will say so:
# exact_releases = ["training"]
# Columns to class (identifier, patient-id, birth-date, date, zip are never used):
# classes = {{ mrn = "patient-id" }}

# Studies and queries served by rule (without one-by-one approvals), e.g.:
# [policy.rules]
# datasets = ["pima"]
# columns = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age", "type"]   # none if absent

[state]
dir = "state"
keystore = "keystore/pseudonym-keys.toml"   # made by `medfed node init`; mode 0600; back it up

# An ingestion pipeline with cleaning and de-identification (docs/privacy.md):
# [[ingest]]
# stream = "extracts"
# csv = "data/extract.csv"
# columns = ["glu", "bmi"]
# [[ingest.field]]
# name = "mrn"
# class = "patient-id"
# [[ingest.field]]
# name = "glu"
# min = 0
# max = 1000
# missing = "median"
"#
    )
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    medfed_infra::pki::validate_site_name(&args.site)?;
    let config = args.dir.join("node.toml");
    if config.exists() {
        anyhow::bail!(
            "{} already exists: this directory already holds a node (nothing was changed)",
            config.display()
        );
    }
    medfed_infra::files::create_private_dir(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let keystore = args.dir.join("keystore/pseudonym-keys.toml");
    Keystore::create(&keystore)?;
    medfed_infra::files::write_atomic(
        &config,
        sample_config(&args.site, &args.aggregator).as_bytes(),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let pki = args.dir.join("pki");
    medfed_infra::files::create_private_dir(&pki)
        .with_context(|| format!("cannot create {}", pki.display()))?;
    println!("node '{}' set up in {}", args.site, args.dir.display());
    println!(
        "  {:<40} the node's config: set your datasets",
        config.display().to_string()
    );
    println!(
        "  {:<40} this site's pseudonym key (mode 0600; never leaves this machine)",
        keystore.display().to_string()
    );
    println!("\nnext:");
    println!(
        "  1. ask the consortium for your certificate: they run `medfed pki issue --site {}`;",
        args.site
    );
    println!(
        "     copy ca.pem, cert.pem and key.pem of pki/sites/{}/ into {}",
        args.site,
        pki.display()
    );
    println!("  2. medfed node run --config {}", config.display());
    Ok(())
}

pub fn check(config: PathBuf, timeout: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let findings = rt.block_on(medfed_node::check::run(
        &config,
        std::time::Duration::from_secs(timeout.max(1)),
    ));
    let mut failed = 0;
    for f in &findings {
        let status = match (f.ok, &f.fix) {
            (false, _) => "FAIL",
            (true, Some(_)) => "warn",
            (true, None) => "ok",
        };
        println!("{:<12} {:<5} {}", f.check, status, f.detail);
        if let Some(fix) = &f.fix {
            println!("{:<12} {:<5} fix: {fix}", "", "");
        }
        if !f.ok {
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    println!(
        "\nall checks passed: `medfed node run --config {}` is ready",
        config.display()
    );
    Ok(())
}

pub fn rotate_key(config: PathBuf) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    let mut ks = Keystore::open(&cfg.state.keystore)?;
    let version = ks.rotate()?;
    println!(
        "pseudonym key version {version} is now current ({}); records ingested from now on get pseudonyms p{version}-…, older ones keep theirs",
        cfg.state.keystore.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PrivacyReportArgs {
    /// The node's config file; the quasi-identifiers are its fields marked
    /// `quasi_identifier = true`.
    #[arg(long)]
    config: PathBuf,
    /// Equivalence classes smaller than this are reported.
    #[arg(long, default_value_t = 5)]
    threshold: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn privacy_report(args: PrivacyReportArgs) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&args.config)?;
    let store = medfed_node::ingest::open_store(&cfg.state)?;
    let mut reports = Vec::new();
    for ing in cfg.ingests.iter().filter(|i| !i.fields.is_empty()) {
        let quasi: Vec<String> = ing
            .fields
            .iter()
            .filter(|f| f.quasi_identifier)
            .map(|f| f.name.clone())
            .collect();
        let mut classes = ClassCounter::new(&quasi);
        medfed_node::ingest::for_each_kept_record(ing, &*store, &mut |r| classes.add(&r))?;
        reports.push((ing.stream.clone(), classes.report(args.threshold)));
    }
    if reports.is_empty() {
        anyhow::bail!(
            "{}: no [[ingest]] pipeline declares its fields, so the node keeps no de-identified records to report on",
            args.config.display()
        );
    }
    if args.json {
        let v: Vec<_> = reports
            .iter()
            .map(|(s, r)| serde_json::json!({"stream": s, "report": r}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>9} {:>8} {:>6} {:>16} {:>16}  quasi-identifiers",
        "stream",
        "records",
        "classes",
        "k",
        format!("classes < {}", args.threshold),
        format!("records in them"),
    );
    println!("{}", "-".repeat(100));
    for (stream, r) in &reports {
        let quasi = if r.quasi_identifiers.is_empty() {
            "(none declared: mark fields quasi_identifier = true)".to_string()
        } else {
            r.quasi_identifiers.join(", ")
        };
        println!(
            "{:<14} {:>9} {:>8} {:>6} {:>16} {:>16}  {quasi}",
            stream, r.records, r.classes, r.k, r.classes_below, r.records_below
        );
    }
    println!(
        "\nk is the size of the smallest group of records sharing all quasi-identifier values: every record looks like at least k-1 others."
    );
    Ok(())
}

/// `medfed node status`: each ingestion partition and the privacy budget spent.
pub fn status(config: PathBuf, json: bool) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    let store = medfed_node::ingest::open_store(&cfg.state)?;
    let rows = medfed_node::ingest::status(&cfg.ingests, &*store)?;
    let ledger =
        medfed_node::privacy::load_ledger(&medfed_node::privacy::ledger_path(&cfg.state.dir))
            .map_err(anyhow::Error::msg)?;
    let policy = &cfg.policy.privacy;
    let delta = policy.delta;
    // (study, DP releases, DP-SGD steps, exact releases, refused, ε)
    type Row = (String, u64, u64, u64, u64, f64);
    let studies: Vec<Row> = ledger
        .studies
        .iter()
        .map(|(id, s)| {
            (
                id.clone(),
                ledger.releases(id),
                ledger.steps(id),
                s.exact,
                s.refused,
                ledger.epsilon(Some(id), delta),
            )
        })
        .collect();
    let exact_allowed: Vec<(String, Vec<String>)> = cfg
        .datasets
        .iter()
        .filter(|d| !d.exact_releases.is_empty())
        .map(|d| {
            (
                d.name.clone(),
                d.exact_releases.iter().map(|r| r.to_string()).collect(),
            )
        })
        .collect();
    let total = ledger.epsilon(None, delta);
    if json {
        let partitions: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"stream": r.stream, "partition": r.partition, "offset": r.offset, "lag": r.lag, "lag_unknown": r.lag_unknown,
                    "processed": r.processed, "quarantined": r.quarantined, "last_checkpoint_ms": r.last_checkpoint_ms,
                    "last_run": r.timing.map(|t| serde_json::json!({"records": t.records,
                        "waiting_for_input_us": t.wait_us, "in_tasks_us": t.work_us, "committing_us": t.commit_us}))})
            })
            .collect();
        let studies: Vec<_> = studies
            .iter()
            .map(|(id, releases, steps, exact, refused, eps)| {
                serde_json::json!({"study": id, "releases": releases, "dp_sgd_steps": steps,
                    "exact_releases": exact, "refused": refused, "epsilon": eps})
            })
            .collect();
        let exact: serde_json::Map<String, serde_json::Value> = exact_allowed
            .iter()
            .map(|(d, r)| (d.clone(), serde_json::json!(r)))
            .collect();
        let limits: serde_json::Map<String, serde_json::Value> = throughput_limits(&cfg, &rows)
            .into_iter()
            .map(|(stream, why)| (stream, serde_json::json!(why)))
            .collect();
        let v = serde_json::json!({
            "partitions": partitions,
            "throughput_limited_by": limits,
            "privacy": {"delta": delta, "epsilon_per_study": policy.epsilon,
                "epsilon_total": policy.total_epsilon, "spent_total": total,
                "exact_releases_allowed": exact, "studies": studies},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("site '{}', state in {}", cfg.site, cfg.state.dir.display());
    println!(
        "\n{:<16} {:>9} {:>10} {:>8} {:>11} {:>12}  last checkpoint",
        "stream", "partition", "offset", "lag", "processed", "quarantined"
    );
    println!("{}", "-".repeat(96));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for r in &rows {
        let last = r.last_checkpoint_ms.map_or("never".to_string(), |t| {
            format!("{:.0} s ago", now.saturating_sub(t) as f64 / 1000.0)
        });
        let lag = r.lag.map_or("-".to_string(), |l| l.to_string());
        println!(
            "{:<16} {:>9} {:>10} {:>8} {:>11} {:>12}  {last}",
            r.stream, r.partition, r.offset, lag, r.processed, r.quarantined
        );
    }
    for r in rows.iter().filter(|r| r.lag_unknown.is_some()) {
        let why = r.lag_unknown.as_deref().unwrap_or_default();
        eprintln!(
            "warning: {} partition {}: the lag is unknown: {why}",
            r.stream, r.partition
        );
    }
    print_timings(&rows);
    for (stream, why) in throughput_limits(&cfg, &rows) {
        println!("{stream}: throughput limited by {why}");
    }
    println!(
        "\nprivacy budget (δ = {delta:e}; limits ε {} per study, {} in all; {:.3} left in all)",
        policy.epsilon,
        policy.total_epsilon,
        (policy.total_epsilon - total).max(0.0)
    );
    for (dataset, releases) in &exact_allowed {
        println!(
            "WARNING: dataset '{dataset}' may be released WITHOUT differential privacy: {} \
             (exact_releases in node.toml); those releases are not in ε",
            releases.join(", ")
        );
    }
    println!(
        "{:<24} {:>9} {:>9} {:>7} {:>8} {:>10}",
        "study", "releases", "SGD steps", "EXACT", "refused", "ε spent"
    );
    println!("{}", "-".repeat(72));
    for (id, releases, steps, exact, refused, eps) in &studies {
        println!("{id:<24} {releases:>9} {steps:>9} {exact:>7} {refused:>8} {eps:>10.3}");
    }
    println!(
        "{:<24} {:>9} {:>9} {:>7} {:>8} {total:>10.3}",
        "all studies", "", "", "", ""
    );
    Ok(())
}

/// Each pipeline's throughput limit in its last run (streams with a timing only).
pub fn throughput_limits(
    cfg: &medfed_node::config::NodeConfig,
    rows: &[medfed_node::ingest::PartitionStatus],
) -> Vec<(String, String)> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cfg.ingests
        .iter()
        .filter_map(|ing| {
            let timings: Vec<_> = rows
                .iter()
                .filter(|r| r.stream == ing.stream)
                .filter_map(|r| r.timing)
                .collect();
            medfed_node::ingest::throughput_limit(&timings, cores, ing.commit_every)
                .map(|why| (ing.stream.clone(), why))
        })
        .collect()
}

/// Where each partition's last run spent its time.
fn print_timings(rows: &[medfed_node::ingest::PartitionStatus]) {
    if rows.iter().all(|r| r.timing.is_none()) {
        return;
    }
    println!(
        "\n{:<16} {:>9} {:>11} {:>15} {:>9} {:>7} {:>9}",
        "last run", "partition", "records", "records/s task", "waiting", "tasks", "commits"
    );
    println!("{}", "-".repeat(82));
    for r in rows {
        let Some(t) = r.timing else { continue };
        let total = (t.wait_us + t.work_us + t.commit_us).max(1) as f64;
        let pct = |x: u64| format!("{:.0}%", 100.0 * x as f64 / total);
        println!(
            "{:<16} {:>9} {:>11} {:>15} {:>9} {:>7} {:>9}",
            r.stream,
            r.partition,
            t.records,
            t.work_rate().map_or("-".into(), |x| format!("{x:.0}")),
            pct(t.wait_us),
            pct(t.work_us),
            pct(t.commit_us)
        );
    }
}

/// `medfed node quarantine`: the quarantined records, from the node's store.
pub fn quarantine(config: PathBuf, json: bool) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    if cfg.ingests.is_empty() {
        anyhow::bail!(
            "{}: no [[ingest]] pipeline configured, so nothing is ever quarantined",
            config.display()
        );
    }
    let store = medfed_node::ingest::open_store(&cfg.state)?;
    let listed = medfed_node::ingest::quarantine::list(&cfg.ingests, &*store)?;
    if json {
        let v: Vec<_> = listed
            .iter()
            .map(|q| {
                serde_json::json!({"stream": q.stream, "partition": q.partition, "offset": q.offset,
                    "field": q.rejection.field, "reason": q.rejection.reason, "patient": q.rejection.patient})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>9} {:>10}  {:<16} {:<36}  reason",
        "stream", "partition", "offset", "field", "patient"
    );
    println!("{}", "-".repeat(110));
    for q in &listed {
        let r = &q.rejection;
        println!(
            "{:<16} {:>9} {:>10}  {:<16} {:<36}  {}",
            q.stream,
            q.partition,
            q.offset,
            r.field.as_deref().unwrap_or("-"),
            r.patient.as_deref().unwrap_or("-"),
            r.reason
        );
    }
    println!(
        "
{} quarantined record(s). Offsets count data rows from 0 (a CSV file's header is not a row).          Values are not kept; a pipeline's `raw_rejects` file keeps the raw lines if the site turned it on.",
        listed.len()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PseudonymizeArgs {
    /// Identifiers to pseudonymize.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
}

/// Pseudonymization throughput beside the raw ring HMAC-SHA256 rate on the same inputs.
pub fn bench_pseudonymize(args: PseudonymizeArgs) -> anyhow::Result<()> {
    let key = [42u8; 32];
    let ids: Vec<String> = (0..args.records.min(1_000_000))
        .map(|i| format!("MRN-{:08}", i * 7919 % 100_000_000))
        .collect();
    let rounds = args.records.div_ceil(ids.len() as u64);
    let n = rounds * ids.len() as u64;
    let raw_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let time = |f: &mut dyn FnMut(&str) -> usize| {
        let start = Instant::now();
        let mut sink = 0usize;
        for _ in 0..rounds {
            for id in &ids {
                sink = sink.wrapping_add(f(id));
            }
        }
        std::hint::black_box(sink);
        n as f64 / start.elapsed().as_secs_f64()
    };
    let p = Pseudonymizer::from_key(1, &key);
    // Warm up, then alternate so neither side gets the quieter moment.
    let _ = time(&mut |id| ring::hmac::sign(&raw_key, id.as_bytes()).as_ref()[0] as usize);
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..3 {
        raw.push(time(&mut |id| {
            ring::hmac::sign(&raw_key, id.as_bytes()).as_ref()[0] as usize
        }));
        ours.push(time(&mut |id| p.pseudonym(id).len()));
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (raw, ours) = (best(&raw), best(&ours));
    println!("pseudonymization of {n} identifiers (best of 3 runs, one core)");
    println!("{:<34} {:>14}", "", "records/s");
    println!("{:<34} {:>14.0}", "ring HMAC-SHA256 (raw)", raw);
    println!("{:<34} {:>14.0}", "medfed pseudonym (p1-<hex>)", ours);
    println!("ratio: {:.2} (target at least 0.70)", ours / raw);
    Ok(())
}

/// `medfed node approve`: shows what the hash stands for (as announced to this node), then
/// records the approval; an unknown hash only with `--force`.
pub fn approve(config: PathBuf, study: &str, force: bool) -> anyhow::Result<()> {
    if study.len() != 64 || !study.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!(
            "--study must be a study hash: 64 hex digits, as given in the study's refusal or \
             by `medfed node studies`"
        );
    }
    let study = study.to_lowercase();
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    let announced = medfed_node::announced::load(&medfed_node::announced::path(&cfg.state.dir))
        .map_err(anyhow::Error::msg)?;
    match announced.iter().find(|a| a.hash == study) {
        Some(a) => print!("approving, as announced to this site:\n{}", a.describe()),
        None if force => println!(
            "approving study {study}, never announced to this site (--force): its contents were not shown"
        ),
        None => anyhow::bail!(
            "no study or query with hash {study} was announced to site '{}', so what it would \
             do cannot be shown: see `medfed node studies --config {}`, or approve it unseen \
             with --force",
            cfg.site,
            config.display()
        ),
    }
    let path = cfg.policy.approvals.clone();
    let added = medfed_node::policy::approve(&cfg.policy, &study)
        .with_context(|| format!("cannot write the approvals file {}", path.display()))?;
    if added {
        println!(
            "study {study} approved for site '{}' (recorded in {})",
            cfg.site,
            path.display()
        );
        println!("the running node serves it from the next announcement on");
    } else {
        println!("study {study} was already approved for site '{}'", cfg.site);
    }
    Ok(())
}

/// `medfed node studies`: what was announced to this node, newest last.
pub fn studies(config: PathBuf, json: bool) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    let announced = medfed_node::announced::load(&medfed_node::announced::path(&cfg.state.dir))
        .map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&announced)?);
        return Ok(());
    }
    if announced.is_empty() {
        println!(
            "nothing announced to site '{}' yet (the node keeps each study and query the aggregator announces)",
            cfg.site
        );
        return Ok(());
    }
    for a in &announced {
        println!("{}", a.describe());
    }
    println!(
        "approve one with `medfed node approve --config {} --study <hash>`",
        config.display()
    );
    Ok(())
}
