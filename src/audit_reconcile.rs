//! `medfed audit reconcile`: checks that a node's compliance log and the aggregator's agree
//! on every message between them, after checking that they are a node's log and the log of
//! the aggregator it talked to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::bail;
use medfed_protocol::audit::{Event, Record, Verified};

use crate::audit::load;

#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// A hospital node's compliance log.
    #[arg(long)]
    node_log: PathBuf,
    /// The node's public key.
    #[arg(long)]
    node_key: String,
    /// The aggregator's compliance log. With highly available aggregators (`[ha]`), give
    /// each instance's log, each followed by its --aggregator-key: the node talked to
    /// whichever was active, and its messages are matched against all of them.
    #[arg(long, required = true)]
    aggregator_log: Vec<PathBuf>,
    /// The aggregator's public key (one per --aggregator-log, in the same order).
    #[arg(long, required = true)]
    aggregator_key: Vec<String>,
}

/// A message as one side recorded it: (log, line, kind, study, round, sha256).
type Seen = (String, usize, String, Option<String>, Option<u32>, String);

/// The messages one side logged as sent (`outgoing`) or received, to or from any of `peers`.
fn messages(log: &Path, v: &Verified, outgoing: bool, peers: &[&str]) -> Vec<Seen> {
    v.records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match (&r.event, outgoing) {
            (Event::Sent(m), true) | (Event::Received(m), false)
                if peers.contains(&m.peer.as_str()) =>
            {
                Some((
                    log.display().to_string(),
                    i + 1,
                    m.message.clone(),
                    m.study.clone(),
                    m.round,
                    m.sha256.clone(),
                ))
            }
            _ => None,
        })
        .collect()
}

/// Pairs two sides' records of the same messages by hash; returns what is left on each side.
fn unmatched(a: &[Seen], b: &[Seen]) -> (Vec<Seen>, Vec<Seen>) {
    let mut pool: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    for s in b {
        pool.entry(s.5.as_str()).or_default().push(s);
    }
    let mut left = Vec::new();
    for s in a {
        match pool.get_mut(s.5.as_str()).and_then(|v| v.pop()) {
            Some(_) => {}
            None => left.push(s.clone()),
        }
    }
    let right = pool.into_values().flatten().cloned().collect();
    (left, right)
}

fn describe(s: &Seen) -> String {
    let study =
        s.3.as_deref()
            .map(|x| format!(" study '{x}'"))
            .unwrap_or_default();
    let round = s.4.map(|r| format!(" round {r}")).unwrap_or_default();
    format!(
        "{} line {}: {}{study}{round} (sha256 {})",
        s.0,
        s.1,
        s.2,
        &s.5[..16]
    )
}

/// Whether two records are of the same message kind, study and round.
fn same_kind(a: &Seen, b: &Seen) -> bool {
    a.2 == b.2 && a.3 == b.3 && a.4 == b.4
}

const RECONCILE_USAGE: &str = "medfed audit reconcile --node-log NODE.log --node-key NODE.key.pub \
     --aggregator-log AGGREGATOR.log --aggregator-key AGGREGATOR.key.pub (each log with its own party's key)";

/// The party and role ("node" or "aggregator") a log's start record gives, read from its
/// first line before the log is verified: to name a log given in the wrong place before its
/// signatures are checked against the wrong key. `None` if the first line is not a start
/// record (verification then says why).
fn claimed_role(log: &Path) -> Option<(String, String)> {
    use std::io::BufRead;
    let file = std::fs::File::open(log).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(file).read_line(&mut first).ok()?;
    match serde_json::from_str::<Record>(first.trim_end()).ok()?.event {
        Event::Start { party, role, .. } => Some((party, role)),
        _ => None,
    }
}

/// The role of a verified log's party, from its first start record.
fn role(v: &Verified) -> Option<&str> {
    v.records.iter().find_map(|r| match &r.event {
        Event::Start { role, .. } => Some(role.as_str()),
        _ => None,
    })
}

/// Refuses a pair of logs that are not a node's (given as `--node-log`) and an aggregator's
/// (given as `--aggregator-log`), naming which log is which.
fn check_roles(
    args: &ReconcileArgs,
    aggregator_log: &Path,
    node: Option<(String, String)>,
    agg: Option<(String, String)>,
) -> anyhow::Result<()> {
    let (n, a) = (args.node_log.display(), aggregator_log.display());
    let (Some((node_party, node_role)), Some((agg_party, agg_role))) = (node, agg) else {
        return Ok(());
    };
    match (node_role.as_str(), agg_role.as_str()) {
        ("node", "aggregator") => Ok(()),
        ("aggregator", "node") => bail!(
            "the logs are swapped: --node-log {n} is the log of the aggregator '{node_party}', and \
             --aggregator-log {a} is the log of the node '{agg_party}'. Give each log in its place, \
             each with its own party's public key: --node-log {a} --node-key <the key of \
             '{agg_party}'> --aggregator-log {n} --aggregator-key <the key of '{node_party}'>\n\
             usage: {RECONCILE_USAGE}"
        ),
        ("node", other) => bail!(
            "--aggregator-log {a} is the log of {} '{agg_party}', not of the aggregator; both logs are \
             of nodes ('{node_party}' and '{agg_party}'), and reconcile compares a node with the \
             aggregator it talked to: give --aggregator-log the aggregator's compliance log (its \
             [audit] log).\nusage: {RECONCILE_USAGE}",
            a_role(other)
        ),
        (other, "aggregator") => bail!(
            "--node-log {n} is the log of {} '{node_party}', not of a node: give --node-log the \
             compliance log of a hospital node (its [audit] log).\nusage: {RECONCILE_USAGE}",
            a_role(other)
        ),
        (r1, r2) => bail!(
            "--node-log {n} is the log of {} '{node_party}' and --aggregator-log {a} the log of {} \
             '{agg_party}': reconcile needs a node's log and the aggregator's.\nusage: {RECONCILE_USAGE}",
            a_role(r1),
            a_role(r2)
        ),
    }
}

fn a_role(role: &str) -> String {
    match role {
        "node" => "the node".into(),
        "aggregator" => "the aggregator".into(),
        other => format!("a party of role '{other}'"),
    }
}

/// The sites the aggregator's log exchanged messages with.
fn sites_named(agg: &Verified) -> std::collections::BTreeSet<&str> {
    agg.records
        .iter()
        .filter_map(|r| match &r.event {
            Event::Sent(m) | Event::Received(m) => Some(m.peer.as_str()),
            _ => None,
        })
        .collect()
}

/// Checks that every message one side logged as sent, the other logged as received, with the
/// same hash. Refuses logs that are not a node's and an aggregator's that name each other,
/// and never reports agreement over no messages.
pub fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    if args.aggregator_log.len() != args.aggregator_key.len() {
        bail!(
            "{} --aggregator-log but {} --aggregator-key: give each aggregator instance's log \
             followed by its own public key\nusage: {RECONCILE_USAGE}",
            args.aggregator_log.len(),
            args.aggregator_key.len()
        );
    }
    for log in &args.aggregator_log {
        check_roles(&args, log, claimed_role(&args.node_log), claimed_role(log))?;
    }
    let node = load(&args.node_log, &args.node_key)?;
    let name = |v: &Verified| Some((v.party.clone(), role(v).unwrap_or("").to_string()));
    let mut aggs = Vec::new();
    for (log, key) in args.aggregator_log.iter().zip(&args.aggregator_key) {
        let agg = load(log, key)?;
        check_roles(&args, log, name(&node), name(&agg))?;
        aggs.push((log.as_path(), agg));
    }
    let site = node.party.clone();
    let agg_party = aggs
        .iter()
        .map(|(_, a)| a.party.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join("', '");
    // A node names its peer "aggregator" in its log; the aggregator names each site.
    let mut aggregator_names = vec!["aggregator"];
    aggregator_names.extend(aggs.iter().map(|(_, a)| a.party.as_str()));
    let named: std::collections::BTreeSet<&str> =
        aggs.iter().flat_map(|(_, a)| sites_named(a)).collect();
    if !named.contains(site.as_str()) {
        let others: Vec<&str> = named.into_iter().collect();
        let logs: Vec<String> = args
            .aggregator_log
            .iter()
            .map(|l| l.display().to_string())
            .collect();
        bail!(
            "the aggregator's log {} (of '{agg_party}') has no message to or from site '{site}', whose log is \
             --node-log {}: these logs are not of a node and the aggregator it talked to{}. Give \
             --aggregator-log the log of the aggregator this node connected to.",
            logs.join(", "),
            args.node_log.display(),
            if others.is_empty() {
                " (the aggregator's log has no messages at all)".to_string()
            } else {
                format!(
                    " (the aggregator's log names the sites {})",
                    others.join(", ")
                )
            }
        );
    }
    let from_aggregators = |outgoing: bool| -> Vec<Seen> {
        aggs.iter()
            .flat_map(|(log, a)| messages(log, a, outgoing, &[site.as_str()]))
            .collect()
    };
    let mut problems = Vec::new();
    let mut compared = 0;
    for (dir, sent, received) in [
        (
            "node to aggregator",
            messages(&args.node_log, &node, true, &aggregator_names),
            from_aggregators(false),
        ),
        (
            "aggregator to node",
            from_aggregators(true),
            messages(&args.node_log, &node, false, &aggregator_names),
        ),
    ] {
        let (only_sent, only_received) = unmatched(&sent, &received);
        compared += sent.len() + only_received.len();
        println!(
            "{dir}: {} messages sent, {} received, {} matched by hash",
            sent.len(),
            received.len(),
            sent.len() - only_sent.len()
        );
        for s in &only_sent {
            match only_received.iter().find(|r| same_kind(r, s)) {
                Some(r) => problems.push(format!(
                    "{dir}: hash mismatch: {} vs {}",
                    describe(s),
                    describe(r)
                )),
                None => problems.push(format!("{dir}: sent but never received: {}", describe(s))),
            }
        }
        for r in &only_received {
            if !only_sent.iter().any(|s| same_kind(r, s)) {
                problems.push(format!("{dir}: received but never sent: {}", describe(r)));
            }
        }
    }
    if compared == 0 {
        bail!("no message between '{site}' and '{agg_party}' in either log: nothing to compare");
    }
    let instances = if aggs.len() > 1 {
        format!(" ({} aggregator logs)", aggs.len())
    } else {
        String::new()
    };
    if problems.is_empty() {
        println!(
            "OK: the logs of '{site}' and '{agg_party}'{instances} agree on all {compared} messages between them"
        );
        Ok(())
    } else {
        for p in &problems {
            println!("{p}");
        }
        anyhow::bail!(
            "{} discrepancies between the logs of '{site}' and '{agg_party}'{instances} ({compared} messages compared)",
            problems.len()
        )
    }
}
