//! The aggregator survives being killed: a 10-round study, the aggregator killed with SIGKILL
//! at random moments (waiting for sites, announcing, mid-round, between rounds) at least 20
//! times; the nodes reconnect on their own, each restart resumes from the last checkpoint,
//! and the final model equals, bit for bit, that of an uninterrupted run with the same
//! seeds. (Plain FedAvg, so that the comparison is exact: secure aggregation's stochastic
//! rounding would differ between any two runs by about 2^-24.)

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use crate::common::{
    ALLOW_PLAIN, Federation, Processes, SERVE_PIMA, pima_study, spawn_aggregator, wait,
};

/// A federation's files in `d`: PKI, data, configs. Returns the aggregator's config, and
/// starts the nodes.
fn setup(d: &Path) -> (PathBuf, Processes) {
    let fed = Federation::new(d)
        .sites(&["site-a", "site-b", "site-c"])
        .copies(|_| 60)
        .node_extra(|_| {
            format!(
                "{SERVE_PIMA}{ALLOW_PLAIN}[reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 300\n\
                 keep_alive_ms = 100\nidle_timeout_ms = 400\n"
            )
        })
        .out_dir(None)
        .aggregator(&pima_study(
            "pima",
            "rounds = 10\nmin_sites = 3\nwait_for_sites_secs = 60\nround_timeout_secs = 30\n\
             [study.training]\nlocal_epochs = 60\nbatch_size = 8\nseed = 11\n\
             [study.secure_aggregation]\nenabled = false\n",
        ))
        .write();
    (fed.aggregator.clone(), Processes(fed.spawn_nodes()))
}

fn start_aggregator(d: &Path, cfg: &Path, life: usize) -> Child {
    spawn_aggregator(d, &format!("aggregator-{life}"), cfg).1
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

#[test]
fn a_study_survives_twenty_kills_and_ends_with_the_same_model() {
    // The uninterrupted run.
    let clean = tempfile::tempdir().unwrap();
    let (cfg, _nodes) = setup(clean.path());
    let started = Instant::now();
    let mut agg = start_aggregator(clean.path(), &cfg, 0);
    let status = wait(&mut agg, Duration::from_secs(180));
    // The kill windows scale with how long a whole study takes on this machine.
    let whole = started.elapsed().as_millis() as u64;
    assert!(status.is_some_and(|s| s.success()), "the clean run failed");
    let want = final_weights(clean.path());

    // The same study, killed again and again.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cfg, _nodes) = setup(d);
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
        match wait(&mut agg, within) {
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
