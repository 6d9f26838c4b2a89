//! `medfed aggregator status` and `medfed aggregator model export`.

use std::path::PathBuf;

use anyhow::Context;

/// GETs `path` from the operations endpoint at `address`.
pub fn ops_get(address: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {address}"))?
        .next()
        .with_context(|| format!("no address for {address}"))?;
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| {
        format!(
            "no aggregator operations endpoint at {address}: is the aggregator running, with [ops] listen = \"{address}\"?"
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.take(64 << 20).read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("{address}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{address}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

pub fn aggregator_status(address: &str, json: bool) -> anyhow::Result<()> {
    let body = ops_get(address, "/status")?;
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
    if !cfg.studies.iter().any(|s| s.id == args.study) {
        anyhow::bail!(
            "{}: no study '{}' (studies: {})",
            args.config.display(),
            args.study,
            cfg.studies
                .iter()
                .map(|s| s.id.as_str())
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
        "study '{}' round {} ({} sites, {} training rows) written to {}",
        model.study_id,
        model.round,
        model.sites.len(),
        model.training_rows,
        out.display()
    );
    Ok(())
}
