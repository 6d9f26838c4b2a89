//! The `--help` of every command, pinned: a change to what users read is a deliberate one.
//! Regenerate with `MEDFED_UPDATE_SNAPSHOTS=1 cargo test --test integration help::`.

use std::path::Path;
use std::process::Command;

const COMMANDS: &[&[&str]] = &[
    &[],
    &["demo"],
    &["pki", "init"],
    &["pki", "issue"],
    &["pki", "revoke"],
    &["aggregator", "run"],
    &["aggregator", "status"],
    &["aggregator", "statistics", "show"],
    &["aggregator", "model", "export"],
    &["aggregator", "study", "create"],
    &["aggregator", "study", "list"],
    &["aggregator", "study", "show"],
    &["aggregator", "study", "stop"],
    &["node", "init"],
    &["node", "check"],
    &["node", "run"],
    &["node", "rotate-key"],
    &["node", "privacy-report"],
    &["node", "ingest"],
    &["node", "status"],
    &["node", "quarantine"],
    &["node", "approve"],
    &["model", "evaluate"],
    &["audit", "verify"],
    &["audit", "report"],
    &["audit", "reconcile"],
    &["bench", "transport"],
    &["bench", "secagg"],
    &["bench", "audit"],
    &["bench", "store"],
    &["bench", "ingest"],
    &["bench", "pseudonymize"],
];

#[test]
fn help_output_matches_the_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let update = std::env::var_os("MEDFED_UPDATE_SNAPSHOTS").is_some();
    let mut stale = Vec::new();
    for cmd in COMMANDS {
        let mut args: Vec<&str> = cmd.to_vec();
        args.push("--help");
        let out = Command::new(crate::common::MEDFED)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "medfed {args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let name = if cmd.is_empty() {
            "medfed".to_string()
        } else {
            cmd.join("-")
        };
        let path = dir.join(format!("{name}.txt"));
        if update {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(format!("{name}:\n{text}"));
        }
    }
    assert!(
        stale.is_empty(),
        "help changed (regenerate with MEDFED_UPDATE_SNAPSHOTS=1):\n{}",
        stale.join("\n")
    );
}
