//! The walkthroughs in docs/quickstart.md ("Try it on one machine", "Onboard a new
//! dataset"), run as written in a fresh directory, so they cannot rot.

use std::path::Path;
use std::process::Command;

use crate::common::{MEDFED, free_udp_port, pima_csv};

/// The `sh` blocks of the section of docs/quickstart.md titled `title`, as one script that
/// stops at the first failing command and stops its background processes however it ends.
fn section_script(title: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/quickstart.md")).unwrap();
    let section = doc
        .split(&format!("## {title}\n"))
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap_or_else(|| panic!("no section '{title}'"));
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
    script
}

/// Runs `script` in `dir` with this build's `medfed` first on the PATH: whether it
/// succeeded, and its stdout and stderr.
fn run_script(dir: &Path, script: &str) -> (bool, String, String) {
    let bin = Path::new(MEDFED).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .args(["300", "bash", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_quickstart_walkthrough_runs_as_written() {
    let script = section_script("Try it on one machine");
    assert!(script.contains("medfed node run"), "{script}");
    // The walkthrough's port, unless something on this machine already holds it.
    assert!(script.contains(":4433"), "{script}");
    let script = script.replace(":4433", &format!(":{}", free_udp_port()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(pima_csv(), dir.path().join("pima.csv")).unwrap();
    let (success, stdout, stderr) = run_script(dir.path(), &script);
    let log = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    assert!(
        success,
        "the walkthrough failed:\n{stdout}\n{stderr}\naggregator.log:\n{}\nst-marys.log:\n{}",
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

/// Config-only onboarding: a dataset with text columns, missing values and a four-class
/// target (the PBC trial) needs three node.toml files and a study, nothing else.
#[test]
fn the_onboarding_walkthrough_runs_as_written() {
    let script = section_script("Onboard a new dataset");
    assert!(script.contains(":4433"), "{script}");
    let script = script.replace(":4433", &format!(":{}", free_udp_port()));
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("examples/data/pbc.csv"),
        dir.path().join("pbc.csv"),
    )
    .unwrap();
    let (success, stdout, stderr) = run_script(dir.path(), &script);
    let log = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    assert!(
        success,
        "the onboarding walkthrough failed:\n{stdout}\n{stderr}\naggregator.log:\n{}\nnorth.log:\n{}",
        log("aggregator.log"),
        log("north.log")
    );
    eprintln!("{stdout}");
    let agg = log("aggregator.log");
    assert!(
        agg.contains("study 'pbc-stage' complete after 8 rounds"),
        "{agg}"
    );
    // Per class, by the classes' names, on the raw held-out rows; the unlabelled left out.
    assert!(
        stdout.contains("macro AUC") && stdout.contains("confusion"),
        "{stdout}"
    );
    assert!(
        stderr.contains("have no value of 'stage' and are left out"),
        "{stderr}"
    );
    assert!(dir.path().join("plots/confusion.svg").is_file());
    let scores = log("scores.csv");
    let lines: Vec<&str> = scores.lines().collect();
    assert_eq!(lines[0], "id,p_1,p_2,p_3,p_4,predicted,error");
    let holdout = log("holdout.csv").lines().count();
    assert_eq!(
        lines.len(),
        holdout,
        "one line per held-out row and the header"
    );
    // Every held-out patient is scored: the model imputes and reads the text categories.
    assert!(
        lines[1..].iter().all(|l| medfed::csv_text::fields(l)
            .last()
            .is_some_and(String::is_empty)),
        "{scores}"
    );
}
