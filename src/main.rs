//! `medfed`: the one command every medfed user runs.
//!
//! - hospital IT: `medfed node run --config node.toml`
//! - aggregator operator: `medfed pki ...`, `medfed aggregator run --config aggregator.toml`
//! - anyone: `medfed demo`, `medfed model evaluate`, `medfed bench transport`

#![forbid(unsafe_code)]

mod aggregator_cmd;
mod audit;
mod audit_console;
mod audit_reconcile;
mod bench;
mod bench_audit;
mod bench_ingest;
mod bench_secagg;
mod bench_store;
mod demo;
mod evaluate;
mod logging;
mod node_cmd;
mod predict;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// Only in a build with `--features alloc-meter`: `medfed bench secagg` meters the
/// aggregator's memory with it.
#[cfg(feature = "alloc-meter")]
#[global_allocator]
static ALLOCATOR: medfed_alloc_meter::Meter = medfed_alloc_meter::Meter;

/// mimalloc otherwise: the node's pipeline allocates on its reader thread and frees on its
/// partitions' threads, which glibc's allocator serves slowly (measured in
/// docs/performance.md).
#[cfg(not(feature = "alloc-meter"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "medfed",
    version,
    about = "Privacy-preserving federated analytics across hospitals"
)]
struct Cli {
    /// Log format on stderr: text, json, or auto (text on a terminal, JSON otherwise).
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "text", "json"])]
    log_format: String,
    /// Log level: error, warn, info, debug or trace (the MEDFED_LOG variable, a tracing
    /// filter, overrides it).
    #[arg(long, global = true, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an aggregator and three hospital nodes on loopback with real certificates, on the
    /// Pima diabetes data split by age band, and compare with a centralized model.
    Demo(demo::DemoArgs),
    /// Make the consortium CA and the certificates of sites and aggregators.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run the aggregator.
    #[command(subcommand)]
    Aggregator(AggregatorCommand),
    /// Run a hospital node, or approve a study for it.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Work with exported models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Check and summarise a party's compliance log (for auditors; works offline).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify a log end to end (records, hash chain, signed Merkle tree heads); names the
    /// first bad record.
    Verify(audit::VerifyArgs),
    /// Summarise what left the party and what was asked of it, per study.
    Report(audit::ReportArgs),
    /// Check that a node's and the aggregator's logs agree on every message between them.
    Reconcile(audit_reconcile::ReconcileArgs),
    /// Browse a party's verified log in a browser: per study and per round, what left it,
    /// what it received, released and spent (read-only, on loopback).
    Console(audit_console::ConsoleArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the consortium CA in DIR/ca (refuses to replace an existing one).
    Init {
        /// The PKI directory (the CA goes to DIR/ca).
        #[arg(long)]
        dir: PathBuf,
        /// The consortium's name, written into the CA certificate.
        #[arg(long, default_value = "medfed consortium")]
        consortium: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a site's client certificate or an aggregator's server certificate, signed by
    /// the CA in DIR (the CA is never regenerated).
    Issue(IssueArgs),
    /// Revoke a site's or the aggregator's certificate: DIR/ca/crl.pem then lists it. Copy
    /// crl.pem to the aggregator and the nodes ([tls] crl) and restart them; `issue` makes a
    /// new certificate.
    Revoke {
        /// The PKI directory made by `medfed pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Whose current certificate (DIR/sites/SITE/cert.pem or
        /// DIR/aggregator/HOST/cert.pem) is revoked.
        #[command(flatten)]
        role: IssueRole,
        /// Why, as recorded in the CRL.
        #[arg(long, value_enum, default_value_t = RevokeReason::KeyCompromise)]
        reason: RevokeReason,
        /// Revoke only the certificates it replaced, not its current one (after `issue`
        /// made a new one).
        #[arg(long)]
        keep_current: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RevokeReason {
    KeyCompromise,
    Superseded,
    CessationOfOperation,
    AffiliationChanged,
    Unspecified,
}

#[derive(Args)]
#[group(required = true, multiple = false, id = "role")]
struct IssueRole {
    /// A hospital site name (lowercase letters, digits, '-').
    #[arg(long)]
    site: Option<String>,
    /// The aggregator's host name or IP address, as nodes will dial it.
    #[arg(long)]
    aggregator: Option<String>,
}

#[derive(Args)]
struct IssueArgs {
    /// The PKI directory made by `medfed pki init`.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    role: IssueRole,
    /// Validity in days.
    #[arg(long, default_value_t = 397)]
    days: i64,
}

#[derive(Subcommand)]
enum AggregatorModelCommand {
    /// Write one of a study's model versions (the final one, or any round's).
    Export(aggregator_cmd::ExportArgs),
}

#[derive(Subcommand)]
enum StatisticsCommand {
    /// Print a released statistics file (`out/statistics/<id>.json`) as tables; `--plot`
    /// draws its survival curves.
    Show(medfed::statistics_cmd::ShowArgs),
}

#[derive(Subcommand)]
enum AggregatorCommand {
    /// Run with a TOML config file.
    Run {
        /// The config file (see docs/samples/).
        #[arg(long)]
        config: PathBuf,
    },
    /// Exported models of a study.
    #[command(subcommand)]
    Model(AggregatorModelCommand),
    /// Add, list, show and stop studies.
    #[command(subcommand)]
    Study(aggregator_cmd::StudyCommand),
    /// Released statistics: tables, and survival curves as a plot.
    #[command(subcommand)]
    Statistics(StatisticsCommand),
    /// Show a running aggregator's studies, rounds, sites and traffic, from its operations
    /// endpoint (`[ops] listen`).
    Status {
        /// The operations endpoint's host:port.
        #[arg(long, default_value = "127.0.0.1:9464")]
        address: String,
        /// Print the endpoint's JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// The endpoint's token file ([ops] token_file), when it is not on loopback.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Connect with HTTPS, verifying the endpoint's certificate ([ops] tls_cert)
        /// against this CA (PEM); its host must be the host of --address.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Set up a new node: a commented config and this site's pseudonym key.
    Init(node_cmd::InitArgs),
    /// Run with a TOML config file.
    Run {
        /// The node's config file (see docs/samples/node.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the node's ingestion pipelines (`[[ingest]]`) until their inputs end.
    Ingest {
        /// The node's config file, with its ingest pipelines.
        #[arg(long)]
        config: PathBuf,
    },
    /// Where each ingestion partition stands: offset, lag, records processed and
    /// quarantined, last checkpoint.
    Status {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The records the ingestion pipelines quarantined: stream, partition, offset, field,
    /// reason and the patient's pseudonym (never the rejected values).
    Quarantine {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the config, certificates, data, keys and the connection to the aggregator;
    /// says what is wrong and how to fix it.
    Check {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Seconds to wait for the aggregator.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Make a new pseudonym key current (older versions are kept).
    RotateKey {
        /// The node's config file (`[state] keystore` names the keystore).
        #[arg(long)]
        config: PathBuf,
    },
    /// Re-identification risk of the de-identified records the node holds (k-anonymity
    /// over the declared quasi-identifiers).
    PrivacyReport(node_cmd::PrivacyReportArgs),
    /// Approve a study for this site, by the hash in its refusal (or in `node studies`):
    /// shows what the study reads, trains, releases and costs first.
    Approve {
        /// The node's config file (its policy section names the approvals file).
        #[arg(long)]
        config: PathBuf,
        /// The study's hash (64 hex digits).
        #[arg(long)]
        study: String,
        /// Approve a hash that was never announced to this node (so not shown first).
        #[arg(long)]
        force: bool,
    },
    /// The studies and statistics queries announced to this node: what each reads,
    /// trains or releases, what it would cost this site's privacy budget, its hash and this
    /// site's answer.
    Studies {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Evaluate an exported global model on a CSV file with the study's raw columns and the
    /// target.
    Evaluate(evaluate::EvaluateArgs),
    /// Score every row of a CSV file with the study's raw columns: probabilities (or
    /// predictions) per row, as CSV.
    Predict(predict::PredictArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Throughput of sending a model update over loopback QUIC (mutual TLS) beside plain
    /// TCP, measured in the same run.
    Transport(bench::TransportArgs),
    /// Cost of one secure aggregation (all parties simulated here): client and aggregator
    /// time, bytes sent, aggregator memory.
    Secagg(bench_secagg::SecAggArgs),
    /// What the compliance log costs per message (time and bytes).
    Audit(bench_audit::AuditArgs),
    /// The store backends side by side (checkpoint latency, batch throughput).
    Store(bench_store::StoreArgs),
    /// Ingest throughput: the real de-identification pipeline on a generated extract, beside
    /// CSV-parse-only and HMAC-SHA256 rates measured in the same run.
    Ingest(bench_ingest::IngestArgs),
    /// Pseudonymization throughput beside the raw HMAC-SHA256 rate.
    Pseudonymize(node_cmd::PseudonymizeArgs),
}

fn main() -> ExitCode {
    // Everything medfed writes is its user's alone: files are created 0600 and directories
    // 0700 where they are made; this mask is the backstop for anything else (logs, plots,
    // the demo's copies), whatever umask the shell had.
    medfed_infra::files::set_umask(0o077);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args, &cli.log_level),
        Command::Pki(cmd) => pki(cmd),
        Command::Aggregator(AggregatorCommand::Model(AggregatorModelCommand::Export(args))) => {
            aggregator_cmd::model_export(args)
        }
        Command::Aggregator(AggregatorCommand::Study(cmd)) => aggregator_cmd::study(cmd),
        Command::Aggregator(AggregatorCommand::Statistics(StatisticsCommand::Show(args))) => {
            medfed::statistics_cmd::show(args)
        }
        Command::Aggregator(AggregatorCommand::Status {
            address,
            json,
            token_file,
            ca,
        }) => {
            aggregator_cmd::aggregator_status(&address, json, token_file.as_deref(), ca.as_deref())
        }
        Command::Aggregator(AggregatorCommand::Run { config }) => {
            logging::init_stderr(&cli.log_format, &cli.log_level);
            run_aggregator(config)
        }
        Command::Node(NodeCommand::Run { config }) => {
            logging::init_stderr(&cli.log_format, &cli.log_level);
            run_node(config)
        }
        Command::Node(NodeCommand::Approve {
            config,
            study,
            force,
        }) => node_cmd::approve(config, &study, force),
        Command::Node(NodeCommand::Studies { config, json }) => node_cmd::studies(config, json),
        Command::Node(NodeCommand::Init(args)) => node_cmd::init(args),
        Command::Node(NodeCommand::Check { config, timeout }) => node_cmd::check(config, timeout),
        Command::Node(NodeCommand::RotateKey { config }) => node_cmd::rotate_key(config),
        Command::Node(NodeCommand::PrivacyReport(args)) => node_cmd::privacy_report(args),
        Command::Node(NodeCommand::Ingest { config }) => {
            logging::init_stderr(&cli.log_format, &cli.log_level);
            node_ingest(config)
        }
        Command::Node(NodeCommand::Status { config, json }) => node_cmd::status(config, json),
        Command::Node(NodeCommand::Quarantine { config, json }) => {
            node_cmd::quarantine(config, json)
        }
        Command::Model(ModelCommand::Evaluate(args)) => evaluate::run(args),
        Command::Model(ModelCommand::Predict(args)) => predict::run(args),
        Command::Bench(BenchCommand::Transport(args)) => bench::transport(args),
        Command::Bench(BenchCommand::Secagg(args)) => bench_secagg::secagg(args),
        Command::Bench(BenchCommand::Audit(args)) => bench_audit::audit(args),
        Command::Bench(BenchCommand::Store(args)) => bench_store::store(args),
        Command::Bench(BenchCommand::Ingest(args)) => bench_ingest::ingest(args),
        Command::Bench(BenchCommand::Pseudonymize(args)) => node_cmd::bench_pseudonymize(args),
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(args),
        Command::Audit(AuditCommand::Report(args)) => audit::report(args),
        Command::Audit(AuditCommand::Reconcile(args)) => audit_reconcile::reconcile(args),
        Command::Audit(AuditCommand::Console(args)) => audit_console::console(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Partial>().is_some() => {
            eprintln!("warning: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            // A node whose own certificate cannot be used stops with EX_CONFIG, which the
            // sample systemd unit does not restart (RestartPreventExitStatus).
            match e.downcast_ref::<medfed_node::NodeError>() {
                Some(medfed_node::NodeError::Certificate { .. }) => ExitCode::from(78),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn pki(cmd: PkiCommand) -> anyhow::Result<()> {
    use medfed_infra::pki;
    match cmd {
        PkiCommand::Init {
            dir,
            consortium,
            days,
        } => {
            let ca = pki::init_ca(&dir, &consortium, days)?;
            println!("consortium CA created: {}", ca.display());
            println!(
                "keep {} offline; give only ca.pem to the parties",
                dir.join("ca").join("ca.key").display()
            );
        }
        PkiCommand::Issue(args) => {
            let role = match (args.role.site, args.role.aggregator) {
                (Some(site), None) => pki::Role::Site(site),
                (None, Some(host)) => pki::Role::Aggregator(host),
                _ => anyhow::bail!("give exactly one of --site NAME or --aggregator HOST"),
            };
            let files = pki::issue(&args.dir, &role, args.days)?;
            println!(
                "issued {}: {}",
                match role {
                    pki::Role::Site(s) => format!("site certificate for '{s}'"),
                    pki::Role::Aggregator(h) => format!("aggregator certificate for '{h}'"),
                },
                files.dir.display()
            );
            println!(
                "  cert {}\n  key  {} (mode 0600)\n  ca   {}",
                files.cert.display(),
                files.key.display(),
                files.ca.display()
            );
            let der = medfed_infra::transport::load_certs(&files.cert)?;
            if let Some(facts) = der
                .first()
                .and_then(|c| medfed_infra::identity::CertificateFacts::of(c).ok())
            {
                println!(
                    "  valid until {}",
                    medfed_infra::tls_errors::date(facts.not_after)
                );
            }
        }
        PkiCommand::Revoke {
            dir,
            role,
            reason,
            keep_current,
        } => {
            let role = match (role.site, role.aggregator) {
                (Some(site), None) => pki::Role::Site(site),
                (None, Some(host)) => pki::Role::Aggregator(host),
                _ => anyhow::bail!("give exactly one of --site NAME or --aggregator HOST"),
            };
            let reason = match reason {
                RevokeReason::KeyCompromise => pki::RevocationReason::KeyCompromise,
                RevokeReason::Superseded => pki::RevocationReason::Superseded,
                RevokeReason::CessationOfOperation => pki::RevocationReason::CessationOfOperation,
                RevokeReason::AffiliationChanged => pki::RevocationReason::AffiliationChanged,
                RevokeReason::Unspecified => pki::RevocationReason::Unspecified,
            };
            let r = pki::revoke(&dir, &role, reason, keep_current)?;
            let (whose, again) = match &role {
                pki::Role::Site(s) => (format!("site '{s}'"), format!("--site {s}")),
                pki::Role::Aggregator(h) => {
                    (format!("aggregator '{h}'"), format!("--aggregator {h}"))
                }
            };
            for serial in &r.newly_revoked {
                println!(
                    "revoked the {whose} certificate {serial} ({})",
                    reason.name()
                );
            }
            for serial in &r.already_revoked {
                println!("the {whose} certificate {serial} was already revoked");
            }
            println!(
                "certificate revocation list: {} ({} certificate(s))",
                r.crl.display(),
                r.revoked.len()
            );
            println!(
                "copy it to the aggregator and every node, set [tls] crl to it, and restart them; \
                 `medfed pki issue --dir {} {again}` issues a new certificate",
                dir.display()
            );
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (inside
/// the runtime), not when it is first awaited, so a signal that comes while the process is
/// still starting stops it cleanly too.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (term, int) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn run_aggregator(config: PathBuf) -> anyhow::Result<()> {
    let rt = runtime()?;
    let stop = {
        let _runtime = rt.enter();
        stop_signal()
    };
    let cfg = medfed_aggregator::config::AggregatorConfig::load(&config)?;
    rt.block_on(async move {
        // The stop signal reaches whichever run is current ([ha]: an instance that lost its
        // lease starts again as a standby).
        let current: std::sync::Arc<std::sync::Mutex<Option<medfed_aggregator::AggregatorHandle>>> =
            std::sync::Arc::default();
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (current, stopped) = (current.clone(), stopped.clone());
            tokio::spawn(async move {
                stop.await;
                tracing::info!("stop signal received; shutting down");
                stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Some(h) = &*current.lock().unwrap_or_else(|p| p.into_inner()) {
                    h.shutdown("the aggregator is shutting down");
                }
            });
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            let mut table = report::RoundTable::new();
            while let Some(event) = rx.recv().await {
                if let Some(line) = table.line_for(&event) {
                    println!("{line}");
                }
            }
        });
        let mut restarts = 0u32;
        let outcomes = loop {
            let aggregator = match medfed_aggregator::Aggregator::bind(cfg.clone()) {
                Ok(a) => a,
                // A stepped-down instance waits for NATS to come back rather than exit.
                Err(medfed_aggregator::AggregatorError::Ha(e))
                    if restarts > 0 && !stopped.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    tracing::warn!("{e}; trying again in 5 s");
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            tracing::info!(addr = %aggregator.local_addr()?, "aggregator listening");
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(aggregator.handle());
            if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                aggregator
                    .handle()
                    .shutdown("the aggregator is shutting down");
            }
            match aggregator.run(Some(tx.clone())).await {
                Err(medfed_aggregator::AggregatorError::SteppedDown(reason))
                    if !stopped.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    tracing::warn!("{reason}; starting again as a standby");
                    restarts += 1;
                }
                other => break other?,
            }
        };
        drop(tx);
        let _ = printer.await;
        let mut partial = Vec::new();
        for o in outcomes {
            println!(
                "study '{}' complete after {} rounds; final model: {}",
                o.study_id,
                o.rounds,
                o.final_model.display()
            );
            for m in &o.missing {
                println!("  WITHOUT site '{}': {}", m.site, m.reason);
            }
            if !o.missing.is_empty() {
                partial.push(format!(
                    "study '{}' without {}",
                    o.study_id,
                    o.missing
                        .iter()
                        .map(|m| m.site.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if partial.is_empty() {
            Ok(())
        } else {
            Err(Partial(partial.join("; ")).into())
        }
    })
}

/// A run that completed on fewer sites than asked: exit status 2 (1 is an error).
#[derive(Debug)]
struct Partial(String);

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "completed on fewer sites than allowed ({}); the models say which sites are \
             missing and why (missing_sites in final.json)",
            self.0
        )
    }
}

impl std::error::Error for Partial {}

fn node_ingest(config: PathBuf) -> anyhow::Result<()> {
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    if cfg.ingests.is_empty() {
        anyhow::bail!("{}: no [[ingest]] pipeline configured", config.display());
    }
    medfed_node::at_rest::check(&cfg).map_err(medfed_node::NodeError::from)?;
    let store = medfed_node::ingest::open_store(&cfg.state)?;
    runtime()?.block_on(async {
        for ing in &cfg.ingests {
            // Progress: a bar on a terminal, a log line every ten seconds otherwise.
            let progress = medfed_node::runtime::progress::Progress::new();
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let bar = bench::progress_bar(0, &ing.stream);
            let watch = {
                let (progress, bar, stream) = (progress.clone(), bar.clone(), ing.stream.clone());
                tokio::spawn(async move {
                    let mut ticks = 0u64;
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        ticks += 1;
                        let s = progress.snapshot();
                        if terminal {
                            match s.fraction {
                                Some(f) => {
                                    bar.set_length(1000);
                                    bar.set_position((f * 1000.0) as u64);
                                }
                                None => bar.set_length(0),
                            }
                            bar.set_message(format!("{stream}: {s}"));
                        } else if ticks.is_multiple_of(40) {
                            tracing::info!(stream = %stream, records = s.records, quarantined = s.quarantined, rate = s.rate as u64, "ingesting: {s}");
                        }
                    }
                })
            };
            let reports = medfed_node::ingest::run_with_progress(
                ing,
                store.clone(),
                &cfg.state.keystore,
                None,
                Some(progress.clone()),
            )
            .await;
            watch.abort();
            bar.finish_and_clear();
            let snapshot = progress.snapshot();
            for (p, r) in reports? {
                println!(
                    "{} partition {p}: offset {}, processed {}, quarantined {}, checkpoints {}",
                    ing.stream, r.offset, r.processed, r.quarantined, r.checkpoints
                );
            }
            println!(
                "{}: {} records in {:.1} s ({:.0} records/s)",
                ing.stream,
                snapshot.records,
                snapshot.elapsed.as_secs_f64(),
                snapshot.rate
            );
            // What limited it: told, but a store that cannot say fails nothing (the records
            // are in).
            match medfed_node::ingest::timings(ing, &*store) {
                Ok(timings) => {
                    let cores = std::thread::available_parallelism().map_or(1, usize::from);
                    if let Some(why) =
                        medfed_node::ingest::throughput_limit(&timings, cores, ing.commit_every)
                    {
                        println!("{}: throughput limited by {why}", ing.stream);
                    }
                }
                Err(e) => tracing::warn!("cannot tell what limited the throughput: {e}"),
            }
        }
        anyhow::Ok(())
    })
}

fn run_node(config: PathBuf) -> anyhow::Result<()> {
    let rt = runtime()?;
    let stop = {
        let _runtime = rt.enter();
        stop_signal()
    };
    let cfg = medfed_node::config::NodeConfig::load(&config)?;
    let site = cfg.site.clone();
    let ingests = cfg.ingests.clone();
    let state = cfg.state.clone();
    // Before anything is opened: state other users can open stops the node, with the fix.
    medfed_node::at_rest::check(&cfg).map_err(medfed_node::NodeError::from)?;
    // One store for the ingestion pipelines and the datasets that read their records.
    let store = if !ingests.is_empty() {
        Some(medfed_node::ingest::open_store(&state)?)
    } else {
        None
    };
    let readiness = Arc::new(medfed_node::ingest::ready::Readiness::default());
    let node = medfed_node::Node::with_store(cfg, store.clone())?.with_readiness(readiness.clone());
    // The ingestion pipelines run beside the connection to the aggregator; the node serves
    // their datasets once they caught up with their input.
    if let Some(store) = store {
        for ing in ingests {
            let (store, keystore) = (store.clone(), state.keystore.clone());
            let readiness = readiness.clone();
            rt.spawn(async move {
                match medfed_node::ingest::run_reporting(&ing, store, &keystore, Some(readiness))
                    .await
                {
                    Ok(reports) => {
                        for (p, r) in reports {
                            tracing::info!(stream = %ing.stream, partition = p, offset = r.offset, processed = r.processed, quarantined = r.quarantined, "ingestion finished");
                        }
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            });
        }
    }
    let exit = rt.block_on(node.run(stop))?;
    match exit {
        medfed_node::NodeExit::StudiesComplete => {
            println!("site '{site}': the aggregator completed all studies");
        }
        medfed_node::NodeExit::Stopped => println!("site '{site}': stopped"),
    }
    Ok(())
}
