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
    /// The aggregator's compliance log.
    #[arg(long)]
    aggregator_log: PathBuf,
    /// The aggregator's public key.
    #[arg(long)]
    aggregator_key: String,
}

/// A message as one side recorded it: (line, kind, study, round, sha256).
type Seen = (usize, String, Option<String>, Option<u32>, String);

/// The messages one side logged as sent (`outgoing`) or received, to or from any of `peers`.
fn messages(v: &Verified, outgoing: bool, peers: &[&str]) -> Vec<Seen> {
    v.records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match (&r.event, outgoing) {
            (Event::Sent(m), true) | (Event::Received(m), false)
                if peers.contains(&m.peer.as_str()) =>
            {
                Some((
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
        pool.entry(s.4.as_str()).or_default().push(s);
    }
    let mut left = Vec::new();
    for s in a {
        match pool.get_mut(s.4.as_str()).and_then(|v| v.pop()) {
            Some(_) => {}
            None => left.push(s.clone()),
        }
    }
    let right = pool.into_values().flatten().cloned().collect();
    (left, right)
}

fn describe(s: &Seen) -> String {
    let study =
        s.2.as_deref()
            .map(|x| format!(" study '{x}'"))
            .unwrap_or_default();
    let round = s.3.map(|r| format!(" round {r}")).unwrap_or_default();
    format!(
        "line {}: {}{study}{round} (sha256 {})",
        s.0,
        s.1,
        &s.4[..16]
    )
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
    node: Option<(String, String)>,
    agg: Option<(String, String)>,
) -> anyhow::Result<()> {
    let (n, a) = (args.node_log.display(), args.aggregator_log.display());
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
    check_roles(
        &args,
        claimed_role(&args.node_log),
        claimed_role(&args.aggregator_log),
    )?;
    let node = load(&args.node_log, &args.node_key)?;
    let agg = load(&args.aggregator_log, &args.aggregator_key)?;
    let name = |v: &Verified| Some((v.party.clone(), role(v).unwrap_or("").to_string()));
    check_roles(&args, name(&node), name(&agg))?;
    let site = node.party.clone();
    // A node names its peer "aggregator" in its log; the aggregator names each site.
    let aggregator_names = ["aggregator", agg.party.as_str()];
    let named = sites_named(&agg);
    if !named.contains(site.as_str()) {
        let others: Vec<&str> = named.into_iter().collect();
        bail!(
            "the aggregator's log {} (of '{}') has no message to or from site '{site}', whose log is \
             --node-log {}: these logs are not of a node and the aggregator it talked to{}. Give \
             --aggregator-log the log of the aggregator this node connected to.",
            args.aggregator_log.display(),
            agg.party,
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
    let mut problems = Vec::new();
    let mut compared = 0;
    for (dir, from, to, sent, received) in [
        (
            "node to aggregator",
            &args.node_log,
            &args.aggregator_log,
            messages(&node, true, &aggregator_names),
            messages(&agg, false, &[site.as_str()]),
        ),
        (
            "aggregator to node",
            &args.aggregator_log,
            &args.node_log,
            messages(&agg, true, &[site.as_str()]),
            messages(&node, false, &aggregator_names),
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
            let twin = only_received
                .iter()
                .find(|r| r.1 == s.1 && r.2 == s.2 && r.3 == s.3);
            match twin {
                Some(r) => problems.push(format!(
                    "{dir}: hash mismatch: {} {} vs {} {}",
                    from.display(),
                    describe(s),
                    to.display(),
                    describe(r)
                )),
                None => problems.push(format!(
                    "{dir}: sent but never received: {} {}",
                    from.display(),
                    describe(s)
                )),
            }
        }
        for r in &only_received {
            if !only_sent
                .iter()
                .any(|s| r.1 == s.1 && r.2 == s.2 && r.3 == s.3)
            {
                problems.push(format!(
                    "{dir}: received but never sent: {} {}",
                    to.display(),
                    describe(r)
                ));
            }
        }
    }
    if compared == 0 {
        bail!(
            "no message between '{site}' and '{}' in either log: nothing to compare",
            agg.party
        );
    }
    if problems.is_empty() {
        println!(
            "OK: the logs of '{site}' and '{}' agree on all {compared} messages between them",
            agg.party
        );
        Ok(())
    } else {
        for p in &problems {
            println!("{p}");
        }
        anyhow::bail!(
            "{} discrepancies between the logs of '{site}' and '{}' ({compared} messages compared)",
            problems.len(),
            agg.party
        )
    }
}
