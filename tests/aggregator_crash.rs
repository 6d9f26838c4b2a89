//! The aggregator survives being killed: a 10-round study, the aggregator killed with SIGKILL
//! at random moments (waiting for sites, announcing, mid-round, between rounds) at least 20
//! times; the nodes reconnect on their own, each restart resumes from the last checkpoint,
//! and the final model equals, bit for bit, that of an uninterrupted run with the same
//! seeds. (Plain FedAvg, so that the comparison is exact: secure aggregation's stochastic
//! rounding would differ between any two runs by about 2^-24.)

mod procs;
use procs::{Children, MEDFED};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// A federation's files in `d`: PKI, data, configs. Returns the aggregator's config.
fn setup(d: &Path) -> PathBuf {
    procs::pki(d, &SITES);
    let (header, rows) = procs::pima();
    let port = procs::free_udp_port();
    for (i, s) in SITES.iter().enumerate() {
        let mut out = format!("{header}\n");
        for _ in 0..60 {
            for row in rows.iter().skip(i).step_by(3) {
                out.push_str(row);
                out.push('\n');
            }
        }
        std::fs::write(d.join(format!("{s}.csv")), out).unwrap();
        std::fs::write(
            d.join(format!("{s}.toml")),
            format!(
                "site = \"{s}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 [tls]\nca = \"pki/sites/{s}/ca.pem\"\ncert = \"pki/sites/{s}/cert.pem\"\nkey = \"pki/sites/{s}/key.pem\"\n\
                 [audit]\nlog = \"{s}-audit.log\"\nkey = \"{s}-audit.key\"\n[state]\ndir = \"{s}-state\"\n\
                 [policy.rules]\ndatasets = [\"pima\"]\ncolumns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\"]\nallow_without_secure_aggregation = true\n\
                 [[dataset]]\nname = \"pima\"\npath = \"{s}.csv\"\nexact_releases = [\"training\"]\n\
                 [reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 300\nkeep_alive_ms = 100\nidle_timeout_ms = 400\n"
            ),
        )
        .unwrap();
    }
    let agg = d.join("aggregator.toml");
    std::fs::write(
        &agg,
        procs::aggregator_config(
            port,
            None,
            &["site-a", "site-b", "site-c"],
            r#"[[study]]
id = "pima"
dataset = "pima"
model = "logistic"
features = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
target = "type"
positive_class = "Yes"
rounds = 10
min_sites = 3
wait_for_sites_secs = 60
round_timeout_secs = 30
[study.training]
local_epochs = 60
batch_size = 8
seed = 11
[study.secure_aggregation]
enabled = false
"#,
        ),
    )
    .unwrap();
    agg
}

fn start_nodes(d: &Path) -> Children {
    Children(
        SITES
            .iter()
            .map(|s| {
                let cfg = d.join(format!("{s}.toml"));
                let log = std::fs::File::create(d.join(format!("{s}.log"))).unwrap();
                Command::new(MEDFED)
                    .args(["node", "run", "--config", cfg.to_str().unwrap()])
                    .stdout(Stdio::from(log.try_clone().unwrap()))
                    .stderr(Stdio::from(log))
                    .spawn()
                    .unwrap()
            })
            .collect(),
    )
}

fn start_aggregator(d: &Path, cfg: &Path, life: usize) -> Child {
    let log = std::fs::File::create(d.join(format!("aggregator-{life}.log"))).unwrap();
    Command::new(MEDFED)
        .args(["aggregator", "run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

fn final_weights(d: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(d.join("aggregator-out/models/pima/final.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model"]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect()
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_study_survives_twenty_kills_and_ends_with_the_same_model() {
    // The uninterrupted run.
    let clean = tempfile::tempdir().unwrap();
    let cfg = setup(clean.path());
    let _nodes = start_nodes(clean.path());
    let started = Instant::now();
    let mut agg = start_aggregator(clean.path(), &cfg, 0);
    let status = wait_exit(&mut agg, Duration::from_secs(180));
    // The kill windows scale with how long a whole study takes on this machine.
    let whole = started.elapsed().as_millis() as u64;
    assert!(status.is_some_and(|s| s.success()), "the clean run failed");
    let want = final_weights(clean.path());

    // The same study, killed again and again.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = setup(d);
    let _nodes = start_nodes(d);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let mut kills = 0;
    let mut life = 0;
    let finished = loop {
        life += 1;
        assert!(life < 200, "the study never finished ({kills} kills)");
        let mut agg = start_aggregator(d, &cfg, life);
        // Twenty short lives, killed while it listens, waits for the sites, announces or
        // trains; then longer ones, each killed a little after it has aggregated a round
        // (so every life makes progress, and later ones resume after a real round), until
        // the study finishes.
        let within = if life <= 20 {
            Duration::from_millis(rng.random_range(30..(whole / 2).clamp(60, 900)))
        } else {
            let log = d.join(format!("aggregator-{life}.log"));
            let deadline = Instant::now() + Duration::from_secs(120);
            while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("round aggregated"))
                && agg.try_wait().unwrap().is_none()
            {
                assert!(Instant::now() < deadline, "life {life} aggregated no round");
                std::thread::sleep(Duration::from_millis(5));
            }
            Duration::from_millis(rng.random_range(50..600))
        };
        match wait_exit(&mut agg, within) {
            Some(status) => break status,
            None => {
                agg.kill().unwrap(); // SIGKILL
                agg.wait().unwrap();
                kills += 1;
            }
        }
    };
    let logs: String = (1..=life)
        .map(|i| std::fs::read_to_string(d.join(format!("aggregator-{i}.log"))).unwrap_or_default())
        .collect();
    assert!(finished.success(), "the last life failed:\n{logs}");
    assert!(kills >= 20, "only {kills} kills before the study finished");
    // Some life was killed after a round had completed, and the next resumed there.
    assert!(
        logs.lines()
            .any(|l| l.contains("resuming from the checkpoint after round")
                && !l.contains("after round 0")),
        "{logs}"
    );
    for round in 1..=10 {
        assert!(
            d.join(format!("aggregator-out/models/pima/round-{round:04}.json"))
                .is_file(),
            "round {round} not exported"
        );
    }
    assert_eq!(
        final_weights(d),
        want,
        "the final model differs from the clean run's"
    );
    eprintln!("{kills} SIGKILLs over {life} lives; the final model equals the clean run's");
}
