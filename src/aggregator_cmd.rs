//! `medfed aggregator status` and `medfed aggregator model export`.

use std::path::PathBuf;

use anyhow::Context;

/// How to reach the operations endpoint over HTTPS: the CA its certificate chains to, and
/// the name to verify it against (default: the host of the address).
#[derive(Clone, Copy)]
pub struct OpsTls<'a> {
    /// The CA certificate (PEM).
    pub ca: &'a std::path::Path,
    /// The name the endpoint's certificate must hold.
    pub name: Option<&'a str>,
}

/// GETs `path` from the operations endpoint at `address`, with the token of `token_file`
/// if given, over HTTPS if `tls` is given. The token never goes out in clear but to a
/// loopback address.
pub fn ops_get(
    address: &str,
    path: &str,
    token_file: Option<&std::path::Path>,
    tls: Option<OpsTls<'_>>,
) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let ca = tls.map(|t| t.ca);
    let addrs: Vec<std::net::SocketAddr> = address
        .to_socket_addrs()
        .with_context(|| {
            format!("cannot resolve {address} (expected host:port, e.g. agg.example.org:9464)")
        })?
        .collect();
    if token_file.is_some() && tls.is_none() && !addrs.iter().all(|a| a.ip().is_loopback()) {
        anyhow::bail!(
            "{address} is not a loopback address: the token would cross the network in clear. \
             Pass --ca with the CA that issued the endpoint's [ops] tls_cert"
        );
    }
    let timeout = std::time::Duration::from_secs(5);
    // Each address of the name in turn (localhost may be ::1 first, the endpoint on IPv4).
    let tcp = addrs
        .iter()
        .find_map(|a| std::net::TcpStream::connect_timeout(a, timeout).ok())
        .with_context(|| {
            format!(
                "no aggregator operations endpoint at {address}: is the aggregator running, with [ops] listen = \"{address}\"?"
            )
        })?;
    tcp.set_read_timeout(Some(timeout))?;
    let mut s: Box<dyn ReadWrite> = match tls {
        Some(t) => Box::new(tls_stream(tcp, t.name.unwrap_or(&host_of(address)), t.ca)?),
        None => Box::new(tcp),
    };
    let auth = match token_file {
        Some(f) => {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("--token-file {}", f.display()))?;
            format!("Authorization: Bearer {}\r\n", token.trim())
        }
        None => String::new(),
    };
    let mut reply = String::new();
    // With TLS the handshake happens at the first write: its failure is told as a read's.
    let read = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n"
    )
    .and_then(|()| s.take(64 << 20).read_to_string(&mut reply).map(|_| ()));
    if let Err(e) = read {
        if ca.is_some() {
            anyhow::bail!(
                "{address}: {e}: is --ca the CA that issued the endpoint's [ops] tls_cert, and does the certificate name the host of --address?"
            );
        }
        if reply.is_empty() {
            anyhow::bail!(
                "{address} closed the connection: if its [ops] has tls_cert, pass --ca with the CA that issued it ({e})"
            );
        }
        return Err(e.into());
    }
    let Some((head, body)) = reply.split_once("\r\n\r\n") else {
        anyhow::bail!(
            "{address}: not an HTTP answer{}",
            if ca.is_none() {
                " (if its [ops] has tls_cert, pass --ca with the CA that issued it)"
            } else {
                ""
            }
        );
    };
    if head.starts_with("HTTP/1.1 401") {
        anyhow::bail!(
            "{address}{path} needs the operations endpoint's token: pass --token-file with the \
             aggregator's [ops] token_file{}",
            if token_file.is_some() {
                " (the one given was refused)"
            } else {
                ""
            }
        );
    }
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{address}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// A stream to read and write an HTTP exchange on, plain or TLS.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// The host of `host:port` (an IPv6 literal without its brackets).
fn host_of(address: &str) -> String {
    address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// A TLS client stream over `tcp`, verifying the server against the CA certificates in
/// `ca` and the name `host`.
fn tls_stream(
    tcp: std::net::TcpStream,
    host: &str,
    ca: &std::path::Path,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let config = medfed_infra::transport::tls_client_config(ca)
        .with_context(|| format!("--ca {}", ca.display()))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host} is not a host name or IP address"))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

pub fn aggregator_status(
    address: &str,
    json: bool,
    token_file: Option<&std::path::Path>,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let tls = ca.map(|ca| OpsTls { ca, name: None });
    let body = ops_get(address, "/status", token_file, tls)?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let sites: Vec<&str> = v["sites_connected"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    println!(
        "aggregator '{}', up {} s; {} site(s) connected: {}",
        v["aggregator"].as_str().unwrap_or("?"),
        v["uptime_secs"],
        sites.len(),
        if sites.is_empty() {
            "none".to_string()
        } else {
            sites.join(", ")
        }
    );
    println!(
        "messages sent {} ({} bytes), received {} ({} bytes); connections refused {}, disconnects {}",
        v["messages_sent"],
        v["bytes_sent"],
        v["messages_received"],
        v["bytes_received"],
        v["connections_refused"],
        v["disconnects"]
    );
    println!(
        "\n{:<20} {:<10} {:<9} {:>7} {:>6} {:>8} {:>8}  phase",
        "study", "kind", "state", "round", "sites", "dropouts", "refusals"
    );
    println!("{}", "-".repeat(96));
    if let Some(studies) = v["studies"].as_object() {
        for (id, s) in studies {
            println!(
                "{:<20} {:<10} {:<9} {:>7} {:>6} {:>8} {:>8}  {}",
                id,
                s["kind"].as_str().unwrap_or(""),
                s["state"].as_str().unwrap_or(""),
                format!("{}/{}", s["round"], s["rounds_planned"]),
                s["participants"].as_array().map_or(0, |a| a.len()),
                s["dropouts"],
                s["refusals"].as_array().map_or(0, |a| a.len()),
                s["phase"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The aggregator's config file (its `out_dir` holds the models).
    #[arg(long)]
    config: PathBuf,
    /// The study's id.
    #[arg(long)]
    study: String,
    /// The round (default: the final model).
    #[arg(long)]
    round: Option<u32>,
    /// Where to write the model (default: `<study>-final.json` or `<study>-round-R.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Writes one of a study's model versions (every round's is kept) to a file.
pub fn model_export(args: ExportArgs) -> anyhow::Result<()> {
    let cfg = medfed_aggregator::config::AggregatorConfig::load(&args.config)?;
    // The configured studies and those added with `study create` (the studies directory).
    let studies = all_studies(&cfg)?;
    if !studies.iter().any(|(_, s)| s.id == args.study) {
        anyhow::bail!(
            "{}: no study '{}' (studies: {})",
            args.config.display(),
            args.study,
            studies
                .iter()
                .map(|(_, s)| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let dir = cfg.out_dir.join("models").join(&args.study);
    let (from, name) = match args.round {
        Some(r) => (
            dir.join(format!("round-{r:04}.json")),
            format!("{}-round-{r}.json", args.study),
        ),
        None => (dir.join("final.json"), format!("{}-final.json", args.study)),
    };
    if !from.is_file() {
        let mut have: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        have.sort();
        anyhow::bail!(
            "{} does not exist (the study has {}): {}",
            from.display(),
            if have.is_empty() {
                "no model yet".to_string()
            } else {
                have.join(", ")
            },
            match args.round {
                Some(_) => "choose a round it has completed",
                None => "the study has not completed; export a round with --round",
            }
        );
    }
    let model = crate::evaluate::load_model(&from)?;
    let out = args.out.unwrap_or_else(|| PathBuf::from(name));
    medfed_infra::files::write_atomic(&out, &std::fs::read(&from)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "study '{}' round {} ({} sites, {}) written to {}",
        model.study_id,
        model.round,
        model.sites.len(),
        if model.training_rows == 0 {
            "no row count released".to_string()
        } else {
            format!("{} training rows", model.training_rows)
        },
        out.display()
    );
    if let Some(why) = &model.stopped {
        println!("note: the study stopped early, after this round: {why}");
    }
    for m in &model.missing_sites {
        println!("note: the model is without site '{}': {}", m.site, m.reason);
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum StudyCommand {
    /// Add a study from a spec file (the keys of one [[study]] table) to the aggregator's
    /// studies directory; a running aggregator with `[studies] keep_serving` picks it up.
    Create {
        /// The aggregator's config file.
        #[arg(long)]
        config: PathBuf,
        /// The study's spec (TOML: id, dataset, model, features, target, rounds, ...).
        #[arg(long)]
        spec: PathBuf,
    },
    /// Every study: configured or added, with its hash and, if the aggregator is reachable,
    /// its state.
    List {
        /// The aggregator's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// One study's spec, the hash sites approve, and its state.
    Show {
        /// The aggregator's config file.
        #[arg(long)]
        config: PathBuf,
        /// The study's id.
        #[arg(long)]
        study: String,
    },
    /// Stop a study at its next round (its checkpoint and exported models stay).
    Stop {
        /// The aggregator's config file.
        #[arg(long)]
        config: PathBuf,
        /// The study's id.
        #[arg(long)]
        study: String,
    },
}

/// The hash a site approves a study by (`medfed node approve --study HASH`).
fn study_hash(s: &medfed_aggregator::config::StudyConfig) -> String {
    medfed_node::policy::study_hash(&s.announcement())
}

type Studies = Vec<(String, medfed_aggregator::config::StudyConfig)>;

fn all_studies(cfg: &medfed_aggregator::config::AggregatorConfig) -> anyhow::Result<Studies> {
    let mut out: Studies = cfg
        .studies
        .iter()
        .map(|s| ("config".to_string(), s.clone()))
        .collect();
    for (path, s) in cfg.studies_dir.specs()? {
        out.push((path.display().to_string(), s));
    }
    Ok(out)
}

/// Study states from the running aggregator's `/status`, when it answers.
fn live_states(cfg: &medfed_aggregator::config::AggregatorConfig) -> Option<serde_json::Value> {
    let ops = cfg.ops.as_ref()?;
    // This machine's endpoint: its listen address (loopback when it listens on all), over
    // HTTPS verified against the consortium CA and the name its own certificate holds.
    let mut at = ops.listen;
    if at.ip().is_unspecified() {
        at.set_ip(match at {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let name = match &ops.tls_cert {
        Some(cert) => medfed_infra::transport::certificate_names(cert)
            .ok()?
            .into_iter()
            .next(),
        None => None,
    };
    let tls = ops.tls_cert.as_ref().map(|_| OpsTls {
        ca: cfg.tls.ca.as_path(),
        name: name.as_deref(),
    });
    let body = ops_get(&at.to_string(), "/status", ops.token_file.as_deref(), tls).ok()?;
    serde_json::from_str::<serde_json::Value>(&body).ok()
}

pub fn study(cmd: StudyCommand) -> anyhow::Result<()> {
    use medfed_aggregator::config::AggregatorConfig;
    match cmd {
        StudyCommand::Create { config, spec } => {
            let cfg = AggregatorConfig::load(&config)?;
            let s: medfed_aggregator::config::StudyConfig = medfed_infra::config::load_toml(&spec)?;
            cfg.validate_study(&s, "study", &spec)?;
            if all_studies(&cfg)?.iter().any(|(_, t)| t.id == s.id) {
                anyhow::bail!(
                    "a study with id '{}' already exists: choose another id",
                    s.id
                );
            }
            let to = cfg.studies_dir.dir.join(format!("{}.toml", s.id));
            medfed_infra::files::write_atomic(&to, &std::fs::read(&spec)?)
                .with_context(|| format!("cannot write {}", to.display()))?;
            println!("study '{}' added: {}", s.id, to.display());
            println!(
                "its hash, for the sites that approve studies one by one: {}",
                study_hash(&s)
            );
            println!(
                "  (each site runs `medfed node approve --config node.toml --study {}`)",
                study_hash(&s)
            );
            if !cfg.studies_dir.keep_serving {
                println!(
                    "note: [studies] keep_serving is off; the aggregator runs it at its next start"
                );
            }
            Ok(())
        }
        StudyCommand::List { config } => {
            let cfg = AggregatorConfig::load(&config)?;
            let live = live_states(&cfg);
            println!(
                "{:<20} {:>6} {:<12} {:<18}  source",
                "study", "rounds", "state", "hash"
            );
            println!("{}", "-".repeat(90));
            for (source, s) in all_studies(&cfg)? {
                let state = live
                    .as_ref()
                    .and_then(|v| v["studies"][&s.id]["state"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "-".into());
                let stop = if cfg.studies_dir.stop_file(&s.id).exists() {
                    " (stop asked)"
                } else {
                    ""
                };
                println!(
                    "{:<20} {:>6} {:<12} {:<18}  {source}{stop}",
                    s.id,
                    s.rounds,
                    state,
                    &study_hash(&s)[..16]
                );
            }
            if live.is_none() {
                println!("\n(state: no running aggregator answered on its [ops] endpoint)");
            }
            Ok(())
        }
        StudyCommand::Show { config, study } => {
            let cfg = AggregatorConfig::load(&config)?;
            let Some((source, s)) = all_studies(&cfg)?.into_iter().find(|(_, s)| s.id == study)
            else {
                anyhow::bail!("{}: no study '{study}'", config.display());
            };
            println!("study '{}' ({source})", s.id);
            println!("hash: {}", study_hash(&s));
            if let Some(v) = live_states(&cfg) {
                println!(
                    "state: {}",
                    serde_json::to_string_pretty(&v["studies"][&s.id])?
                );
            }
            println!("\n{}", toml::to_string(&s)?);
            Ok(())
        }
        StudyCommand::Stop { config, study } => {
            let cfg = AggregatorConfig::load(&config)?;
            if !all_studies(&cfg)?.iter().any(|(_, s)| s.id == study) {
                anyhow::bail!("{}: no study '{study}'", config.display());
            }
            let file = cfg.studies_dir.stop_file(&study);
            medfed_infra::files::write_atomic(&file, b"stop\n")
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!(
                "study '{study}' stops at its next round ({} asks it; delete the file to allow it again)",
                file.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_goes_to_a_remote_endpoint_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("ops.token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        // 192.0.2.1 is TEST-NET-1: refused before any connection is tried.
        let err = ops_get("192.0.2.1:9464", "/status", Some(&token), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("would cross the network in clear") && err.contains("--ca"),
            "{err}"
        );
        let err = ops_get("agg.example.org", "/status", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected host:port"), "{err}");
        assert_eq!(host_of("[::1]:9464"), "::1");
        assert_eq!(host_of("agg.example.org:9464"), "agg.example.org");
    }
}
