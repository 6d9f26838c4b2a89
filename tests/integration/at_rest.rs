//! Nothing a node or the aggregator keeps is readable by other users: after a whole demo
//! run (aggregator, three nodes, their stores, compliance logs and keys, the models, the
//! PKI, the logs) started from a shell whose umask is 022, no file or directory it wrote
//! has a group or other permission bit.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::MEDFED;

/// Every file and directory under `dir` (not following symbolic links), with its mode.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        out.push((path.clone(), meta.permissions().mode() & 0o7777));
        if meta.is_dir() {
            walk(&path, out);
        }
    }
}

/// Runs `medfed args` from a shell whose umask is 022; its stdout.
fn medfed_umask_022(args: &[&str]) -> String {
    let run = Command::new("sh")
        .args(["-c", "umask 022 && umask && exec \"$0\" \"$@\"", MEDFED])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "medfed {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.starts_with("0022\n"), "the shell's umask: {stdout}");
    stdout
}

/// The paths of `all` with a group or other permission bit.
fn open_to_others(all: &[(PathBuf, u32)]) -> Vec<String> {
    all.iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .map(|(p, mode)| format!("{:o} {}", mode, p.display()))
        .collect()
}

#[test]
fn nothing_a_demo_run_writes_is_readable_by_others_under_umask_022() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    medfed_umask_022(&["demo", "--out", out.to_str().unwrap(), "--rounds", "2"]);

    // What the run keeps: state and stores, compliance logs and keys, models, PKI, logs.
    for kept in [
        "nodes/state-riverside",
        "nodes/state-riverside/node.lock",
        "nodes/state-riverside/revealed-rounds.json",
        "aggregator-state/redb.db",
        "audit/riverside.log",
        "audit/riverside.key",
        "audit/riverside.key.pub",
        "audit/aggregator.log",
        "aggregator/models/pima-diabetes/final.json",
        "pki/sites/riverside/key.pem",
        "pki/ca/ca.key",
        "logs/medfed.log",
        "data/riverside.csv",
    ] {
        assert!(out.join(kept).exists(), "{kept} not written");
    }
    let mut all = vec![(
        out.clone(),
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777,
    )];
    walk(&out, &mut all);
    assert!(all.len() > 40, "{} paths", all.len());
    let open = open_to_others(&all);
    assert!(
        open.is_empty(),
        "readable by group or others:\n{}",
        open.join("\n")
    );
}

#[test]
fn a_node_that_ingests_keeps_its_store_keystore_and_rejects_owner_only_under_umask_022() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    let node_s = node.to_str().unwrap();
    medfed_umask_022(&["node", "init", "--dir", node_s, "--site", "alpha"]);
    let pki = node.join("consortium");
    medfed_umask_022(&["pki", "init", "--dir", pki.to_str().unwrap()]);
    medfed_umask_022(&[
        "pki",
        "issue",
        "--dir",
        pki.to_str().unwrap(),
        "--site",
        "alpha",
    ]);
    // The extract is the hospital's own file, outside the node's directory.
    let extract = dir.path().join("extract.csv");
    std::fs::write(&extract, "mrn,glu\nMRN-1,140\nMRN-2,abc\n").unwrap();
    let config = format!(
        "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n\
         [tls]\nca = \"consortium/sites/alpha/ca.pem\"\ncert = \"consortium/sites/alpha/cert.pem\"\n\
         key = \"consortium/sites/alpha/key.pem\"\n\
         [[dataset]]\nname = \"labs\"\ningest = \"labs\"\n\
         [[ingest]]\nstream = \"labs\"\ncsv = {extract:?}\ncolumns = [\"glu\"]\n\
         raw_rejects = \"stewards/rejects.csv\"\n\
         [[ingest.field]]\nname = \"mrn\"\nclass = \"patient-id\"\n[[ingest.field]]\nname = \"glu\"\n"
    );
    // node.toml exists (node init made it): writing keeps its mode.
    std::fs::write(node.join("node.toml"), config).unwrap();
    let cfg = node.join("node.toml");
    let out = medfed_umask_022(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(out.contains("processed 2, quarantined 1"), "{out}");
    medfed_umask_022(&[
        "node",
        "approve",
        "--config",
        cfg.to_str().unwrap(),
        "--study",
        &"ab".repeat(32),
        "--force",
    ]);
    for kept in [
        "state/redb.db",
        "keystore/pseudonym-keys.toml",
        "stewards/rejects.csv",
        "approved-studies.txt",
        "consortium/ca/ca.key",
    ] {
        assert!(node.join(kept).exists(), "{kept} not written");
    }
    let mut all = vec![(
        node.clone(),
        std::fs::metadata(&node).unwrap().permissions().mode() & 0o7777,
    )];
    walk(&node, &mut all);
    let open = open_to_others(&all);
    assert!(
        open.is_empty(),
        "readable by group or others:\n{}",
        open.join("\n")
    );
}
