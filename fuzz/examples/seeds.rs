//! Writes the seed corpus of the targets that read wire messages:
//! `cargo +nightly run --release --example seeds -- fuzz/corpus` (from the repository
//! root; the other targets' seeds are checked in as written by hand or cut from data/).
//!
//! - `frame_decoder/`: a frame of every message kind (first byte 0: the default limit).
//! - `node_client/`: message sequences a node answers (announcement, then its rounds).
//! - `audit_verify/`: a real compliance log, and a Merkle proof of each kind.

use std::path::{Path, PathBuf};

use medfed_fuzz::*;
use medfed_protocol::Message;
use medfed_protocol::messages::*;
use medfed_protocol::model::TrainParams;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or("fuzz/corpus".into()));
    let samples = samples();
    let mut kinds = [false; KINDS];
    for (name, msg) in &samples {
        kinds[kind_index(msg)] = true;
        let mut input = vec![0u8];
        input.extend(frame(msg));
        write(&root.join("frame_decoder"), name, &input);
    }
    assert!(kinds.iter().all(|k| *k), "a message kind has no sample");

    // The node: an announcement of each study, then what follows it.
    let node = root.join("node_client");
    let f = &PIMA_FEATURES[..2];
    let by_name = |n: &str| {
        samples
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, m)| m.clone())
            .expect("a sample of that name")
    };
    let open = |study: &str, round: u32| {
        Message::RoundOpen(RoundOpen {
            study_id: study.into(),
            round,
            model: model(f, 0.01 * f64::from(round)),
            params: TrainParams {
                local_epochs: 1,
                ..TrainParams::default()
            },
            deadline_ms: 10_000,
            secure: None,
        })
    };
    let plain = vec![
        by_name("announcement"),
        open("s1", 1),
        open("s1", 2),
        Message::EvaluateRequest(EvaluateRequest {
            study_id: "s1".into(),
            round: 2,
            model: model(f, 0.02),
        }),
        by_name("round-result"),
    ];
    write(&node, "plain-study", &join_payloads(&plain));
    let secure = vec![
        by_name("announcement-secure"),
        by_name("statistics-open"),
        by_name("round-open-secure"),
        by_name("secagg-key-directory"),
        by_name("secagg-encrypted-shares"),
        by_name("secagg-consistency-check"),
        by_name("secagg-unmask-request"),
    ];
    write(&node, "secure-study", &join_payloads(&secure));
    write(
        &node,
        "statistics",
        &join_payloads(&[
            by_name("statistics-query"),
            by_name("statistics-query-secure"),
        ]),
    );
    for (name, msg) in &samples {
        write(
            &node,
            &format!("one-{name}"),
            &join_payloads(&[msg.clone()]),
        );
    }
    // The audit log: a real one (mode byte 0), and a proof of each kind (0x80, 0xc0).
    let audit = root.join("audit_verify");
    let mut log = vec![0u8];
    log.extend(audit_log().lines.join("\n").into_bytes());
    write(&audit, "log", &log);
    // The same, cut after its last signed tree head (a log whose every line is signed).
    let real = audit_log();
    let last = real.heads.last().expect("a signed head").0 as usize;
    let mut signed = vec![0u8];
    signed.extend(real.lines[..=last].join("\n").into_bytes());
    write(&audit, "log-signed", &signed);
    write(&audit, "inclusion", &[0x80, 20, 7, 0, 0, 0, 0, 0, 0]);
    write(&audit, "consistency", &[0xc0, 20, 7, 0, 0, 0, 0, 0, 0]);

    println!("seeds written under {}", root.display());
}
