//! `medfed audit`: the compliance auditor's commands. They read a party's log and its public
//! key, offline, and trust nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use medfed_protocol::audit::{self, Event, Record, Verified};
use serde::Serialize;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The party's compliance log.
    #[arg(long)]
    log: PathBuf,
    /// The party's public key: the `.pub` file beside its signing key, or its hex.
    #[arg(long)]
    key: String,
    /// A tree head seen earlier, as SIZE:ROOT (from an earlier `verify`): the log must still
    /// contain it, which catches records cut from the end since.
    #[arg(long)]
    known_head: Option<String>,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The party's compliance log.
    #[arg(long)]
    log: PathBuf,
    /// The party's public key (the log is verified before anything is reported).
    #[arg(long)]
    key: String,
    /// table, json, or fhir (a FHIR R4 Bundle of AuditEvent resources).
    #[arg(long, default_value = "table", value_parser = ["table", "json", "fhir"])]
    format: String,
}

fn public_key(key: &str) -> anyhow::Result<Vec<u8>> {
    let text = if Path::new(key).is_file() {
        std::fs::read_to_string(key)
            .with_context(|| format!("cannot read public key file {key}"))?
    } else {
        key.to_string()
    };
    let text = text.trim();
    match medfed_protocol::hex::decode(text) {
        Some(b) if b.len() == 32 => Ok(b),
        _ => bail!("{key} is neither a public key file nor 64 hex digits (an Ed25519 public key)"),
    }
}

pub(crate) fn load(log: &Path, key: &str) -> anyhow::Result<Verified> {
    let key = public_key(key)?;
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("cannot read compliance log {}", log.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    audit::verify(&lines, &key).map_err(|e| anyhow::anyhow!("{}: FAILED at {e}", log.display()))
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let v = load(&args.log, &args.key)?;
    if let Some(head) = &args.known_head {
        let parsed = head.split_once(':').and_then(|(size, root)| {
            Some((
                size.parse::<u64>().ok()?,
                medfed_protocol::hex::decode_array::<32>(root)?,
            ))
        });
        let (size, root) = parsed.ok_or_else(|| {
            anyhow::anyhow!("--known-head must be SIZE:ROOT, e.g. 45:dc67ef34... (64 hex digits)")
        })?;
        v.check_known_head(size, &root)
            .map_err(|e| anyhow::anyhow!("{}: FAILED: {e}", args.log.display()))?;
    }
    println!("{}: OK", args.log.display());
    println!("  party:   {}", v.party);
    println!(
        "  records: {} (hash chain and sequence intact)",
        v.records.len()
    );
    match v.head {
        Some((size, root)) => {
            let root = medfed_protocol::hex::encode(&root);
            println!(
                "  signed:  tree head over {size} records, root {root}\n           (keep {size}:{root} to check later copies with --known-head)"
            );
        }
        None => println!("  signed:  no tree head yet"),
    }
    if v.unsigned_tail() > 0 {
        println!(
            "  note:    the last {} records are after the last signed tree head: the party stopped without\n           \
             closing its log (a crash), or records were cut after it. Compare with a tree head seen earlier.",
            v.unsigned_tail()
        );
    }
    Ok(())
}

#[derive(Default, Serialize)]
pub(crate) struct StudySummary {
    pub(crate) messages_sent: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) messages_received: u64,
    pub(crate) bytes_received: u64,
    pub(crate) rounds: std::collections::BTreeSet<u32>,
    pub(crate) decisions: Vec<String>,
    pub(crate) released: u64,
    /// Releases made without differential privacy (a dataset's `exact_releases`).
    pub(crate) exact_releases: u64,
}

/// What `audit report` shows of a verified log (the auditor's console shows the same).
#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) party: String,
    pub(crate) records: usize,
    pub(crate) unsigned_tail: usize,
    pub(crate) starts: u64,
    pub(crate) recoveries: u64,
    pub(crate) errors: Vec<String>,
    /// Datasets this party may release without differential privacy, and what.
    pub(crate) exact_allowed: BTreeMap<String, Vec<String>>,
    pub(crate) studies: BTreeMap<String, StudySummary>,
}

pub(crate) fn summarise(v: &Verified) -> Report {
    let mut r = Report {
        party: v.party.clone(),
        records: v.records.len(),
        unsigned_tail: v.unsigned_tail(),
        starts: 0,
        recoveries: 0,
        errors: Vec::new(),
        exact_allowed: BTreeMap::new(),
        studies: BTreeMap::new(),
    };
    for rec in &v.records {
        match &rec.event {
            Event::Start { .. } => r.starts += 1,
            Event::Recovered { .. } => r.recoveries += 1,
            Event::Error { what } => r.errors.push(what.clone()),
            Event::Sent(m) | Event::Received(m) => {
                let s = r
                    .studies
                    .entry(m.study.clone().unwrap_or_else(|| "(connection)".into()))
                    .or_default();
                if let Some(round) = m.round.filter(|r| *r > 0) {
                    s.rounds.insert(round);
                }
                if matches!(rec.event, Event::Sent(_)) {
                    s.messages_sent += 1;
                    s.bytes_sent += m.bytes;
                } else {
                    s.messages_received += 1;
                    s.bytes_received += m.bytes;
                }
            }
            Event::StudyDecision {
                study,
                accepted,
                reason,
            } => {
                let s = r.studies.entry(study.clone()).or_default();
                s.decisions.push(format!(
                    "{}: {reason}",
                    if *accepted { "accepted" } else { "refused" }
                ));
            }
            Event::Released { study, .. } => {
                r.studies.entry(study.clone()).or_default().released += 1;
            }
            Event::StudyStatus { study, status } => r
                .studies
                .entry(study.clone())
                .or_default()
                .decisions
                .push(status.clone()),
            Event::PrivacySpent {
                study,
                round,
                epsilon,
                total_epsilon,
                delta,
                refused,
            } => r
                .studies
                .entry(study.clone())
                .or_default()
                .decisions
                .push(format!(
                    "round {round}: {}",
                    privacy_spent(*epsilon, *total_epsilon, *delta, *refused)
                )),
            Event::ExactRelease { study, dataset } => {
                let s = r.studies.entry(study.clone()).or_default();
                s.exact_releases += 1;
                s.decisions.push(format!(
                    "EXACT release of dataset '{dataset}' (no differential privacy)"
                ));
            }
            Event::ExactAllowed { dataset, releases } => {
                r.exact_allowed.insert(dataset.clone(), releases.clone());
            }
            Event::Announced { study, hash, .. } => r
                .studies
                .entry(study.clone())
                .or_default()
                .decisions
                .push(format!("announced (hash {})", &hash[..hash.len().min(12)])),
            Event::Stop { .. } | Event::TreeHead { .. } => {}
        }
    }
    r
}

/// A `PrivacySpent` record in words (the report's and the auditor's console's).
pub(crate) fn privacy_spent(epsilon: f64, total_epsilon: f64, delta: f64, refused: bool) -> String {
    if refused {
        format!(
            "refused for the privacy budget (would reach ε = {epsilon:.3}, all studies {total_epsilon:.3}, δ = {delta:e})"
        )
    } else {
        format!("DP release, ε spent {epsilon:.3} (all studies {total_epsilon:.3}, δ = {delta:e})")
    }
}

/// The decisions as a table shows them: each distinct one once, in the order it first
/// came, with how many times it came when more than once (an iterative query's hundreds
/// of identical steps read as one line with their count).
pub(crate) fn compact(decisions: &[String]) -> Vec<String> {
    let mut seen: Vec<(&String, usize)> = Vec::new();
    for d in decisions {
        match seen.iter_mut().find(|(s, _)| *s == d) {
            Some((_, n)) => *n += 1,
            None => seen.push((d, 1)),
        }
    }
    seen.into_iter()
        .map(|(d, n)| {
            if n > 1 {
                format!("{d} (×{n})")
            } else {
                d.clone()
            }
        })
        .collect()
}

fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let date = medfed_node::deid::safe_harbor::Date::from_days(days);
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A FHIR R4 AuditEvent for a record that an auditor cares about, if it is one.
fn audit_event(party: &str, rec: &Record) -> Option<serde_json::Value> {
    use serde_json::json;
    let dcm = "http://dicom.nema.org/resources/ontology/DCM";
    let (code, display, entity, other) = match &rec.event {
        Event::Sent(m) => ("110106", "Export", m, &m.peer),
        Event::Received(m) => ("110107", "Import", m, &m.peer),
        Event::StudyDecision {
            study,
            accepted,
            reason,
        } => {
            return Some(json!({
                "resourceType": "AuditEvent",
                "type": {"system": dcm, "code": "110112", "display": "Query"},
                "action": "E",
                "recorded": iso_time(rec.time_ms),
                "outcome": if *accepted { "0" } else { "4" },
                "outcomeDesc": reason,
                "agent": [{"who": {"display": party}, "requestor": false}],
                "source": {"observer": {"display": party}},
                "entity": [{"what": {"display": format!("study {study}")}, "name": study}],
            }));
        }
        _ => return None,
    };
    let mut detail = vec![json!({"type": "bytes", "valueString": entity.bytes.to_string()})];
    if let Some(s) = &entity.study {
        detail.push(json!({"type": "study", "valueString": s}));
    }
    if let Some(r) = entity.round {
        detail.push(json!({"type": "round", "valueString": r.to_string()}));
    }
    Some(json!({
        "resourceType": "AuditEvent",
        "type": {"system": dcm, "code": code, "display": display},
        "action": "E",
        "recorded": iso_time(rec.time_ms),
        "outcome": "0",
        "agent": [
            {"who": {"display": party}, "requestor": code == "110106"},
            {"who": {"display": other}, "requestor": code == "110107"}
        ],
        "source": {"observer": {"display": party}},
        "entity": [{
            "what": {"identifier": {"system": "urn:medfed:sha256", "value": entity.sha256}},
            "name": entity.message,
            "detail": detail
        }]
    }))
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let v = load(&args.log, &args.key)?;
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&summarise(&v))?),
        "fhir" => {
            let entries: Vec<_> = v
                .records
                .iter()
                .filter_map(|r| audit_event(&v.party, r))
                .map(|e| serde_json::json!({"resource": e}))
                .collect();
            let bundle = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
            println!("{}", serde_json::to_string_pretty(&bundle)?);
        }
        _ => {
            let r = summarise(&v);
            println!(
                "compliance log of '{}': {} records, verified",
                r.party, r.records
            );
            println!(
                "starts {}, recoveries after a crash {}, errors {}",
                r.starts,
                r.recoveries,
                r.errors.len()
            );
            if r.unsigned_tail > 0 {
                println!(
                    "note: the last {} records are not covered by a signed tree head",
                    r.unsigned_tail
                );
            }
            for (dataset, releases) in &r.exact_allowed {
                println!(
                    "WARNING: dataset '{dataset}' may be released WITHOUT differential privacy: {} (exact_releases)",
                    releases.join(", ")
                );
            }
            let exact: u64 = r.studies.values().map(|s| s.exact_releases).sum();
            if exact > 0 {
                println!(
                    "WARNING: {exact} release(s) WITHOUT differential privacy (see the studies below)"
                );
            }
            println!(
                "\n{:<20} {:>6} {:>9} {:>12} {:>9} {:>12} {:>8}  decisions",
                "study", "rounds", "msgs out", "bytes out", "msgs in", "bytes in", "released"
            );
            println!("{}", "-".repeat(100));
            for (study, s) in &r.studies {
                println!(
                    "{:<20} {:>6} {:>9} {:>12} {:>9} {:>12} {:>8}  {}",
                    study,
                    s.rounds.len(),
                    s.messages_sent,
                    s.bytes_sent,
                    s.messages_received,
                    s.bytes_received,
                    s.released,
                    compact(&s.decisions).join("; ")
                );
            }
            for e in &r.errors {
                println!("error: {e}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_times() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(1_795_495_418_558), "2026-11-24T04:43:38.558Z");
        assert_eq!(iso_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn repeated_decisions_read_as_one_line_with_their_count() {
        let d: Vec<String> = ["announced (hash ab)", "EXACT release", "accepted: x"]
            .iter()
            .cycle()
            .take(9)
            .map(|s| s.to_string())
            .chain(["stopped".to_string()])
            .collect();
        assert_eq!(
            compact(&d),
            [
                "announced (hash ab) (×3)",
                "EXACT release (×3)",
                "accepted: x (×3)",
                "stopped"
            ]
        );
    }
}
