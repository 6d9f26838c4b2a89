//! The walkthrough in docs/quickstart.md ("Try it on one machine"), run as written in a
//! fresh directory, so it cannot rot.

use std::path::Path;
use std::process::Command;

use crate::common::{MEDFED, free_udp_port, pima_csv};

#[test]
fn the_quickstart_walkthrough_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/quickstart.md")).unwrap();
    let section = doc
        .split("## Try it on one machine")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the walkthrough section");
    // Background processes are stopped however the script ends.
    let mut script =
        String::from("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n");
    let mut in_block = false;
    for line in section.lines() {
        if !in_block && line.trim() == "```sh" {
            in_block = true;
        } else if in_block && line.trim() == "```" {
            in_block = false;
        } else if in_block {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(script.contains("medfed node run"), "{script}");
    // The walkthrough's port, unless something on this machine already holds it.
    assert!(script.contains(":4433"), "{script}");
    let script = script.replace(":4433", &format!(":{}", free_udp_port()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(pima_csv(), dir.path().join("pima.csv")).unwrap();
    let bin = Path::new(MEDFED).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .args(["300", "bash", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    assert!(
        out.status.success(),
        "the walkthrough failed:\n{stdout}\n{}\naggregator.log:\n{}\nst-marys.log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log("aggregator.log"),
        log("st-marys.log")
    );
    assert!(stdout.contains("node 'st-marys' set up"), "{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("AUC"), "{stdout}");
    let agg = log("aggregator.log");
    assert!(
        agg.contains("study 'pima-diabetes' complete after 5 rounds"),
        "{agg}"
    );
}
