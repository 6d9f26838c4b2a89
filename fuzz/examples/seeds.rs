//! Writes the seed corpus of the targets that read wire messages:
//! `cargo +nightly run --release --example seeds -- fuzz/corpus` (from the repository
//! root). The secagg_server and study_coordinator seeds are what their fuzzing found
//! (`cargo fuzz cmin`): their inputs are choices, not messages.
//!
//! - `frame_decoder/`: a frame of every message kind (first byte 0: the default limit).
//! - `node_client/`: message sequences a node answers (announcement, then its rounds).
//! - `audit_verify/`: a real compliance log, and a Merkle proof of each kind.
//! - `csv_reader/`, `fhir_reader/`: rows and resources of examples/data.

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
            &join_payloads(std::slice::from_ref(msg)),
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

    // CSV: the Pima rows with a patient id in front (a header first, for the dataset path).
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    let csv = root.join("csv_reader");
    for (name, file, take) in [
        ("pima", "pima_tr.csv", 24),
        ("pima-missing", "pima_tr2_missing.csv", 300),
    ] {
        let text = std::fs::read_to_string(data.join(file)).expect("example data");
        let mut lines = text.lines();
        let mut out = format!("mrn,{}\n", lines.next().expect("a header"));
        for (i, l) in lines
            .enumerate()
            .skip(if take > 100 { 199 } else { 0 })
            .take(24)
        {
            out.push_str(&format!("pt-x{i:05},{l}\n"));
        }
        write(&csv, name, out.as_bytes());
    }
    write(
        &csv,
        "quoted",
        b"mrn,npreg,glu,bp,skin,bmi,ped,age,type\r\n\"pt-q,1\",2,\"140\",70,,\"30.5\",0.2,91,Yes\r\npt-q2,1,NA,300,,,0.2,95,No\r\n\r\npt-q3,1,99,70,20,31,0.3,40,Maybe,extra\r\n",
    );

    // FHIR: the first patients of the example export, their observations and conditions,
    // NUL between the files.
    let fhir = data.join("pima_fhir");
    let read = |f: &str| std::fs::read_to_string(fhir.join(f)).expect("example export");
    let patients: Vec<String> = read("Patient.ndjson")
        .lines()
        .take(6)
        .map(String::from)
        .collect();
    let ids: Vec<String> = (1..=6)
        .map(|i| format!("\"Patient/pima-{i:04}\""))
        .collect();
    let about = |text: String| -> String {
        text.lines()
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let export = format!(
        "{}\n\0{}\0{}",
        patients.join("\n"),
        about(read("Observation.ndjson")),
        about(read("Condition.ndjson"))
    );
    write(&root.join("fhir_reader"), "pima-export", export.as_bytes());
    write(
        &root.join("fhir_reader"),
        "odd-export",
        b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n\n{\"resourceType\":\"Group\"}\n\0{\"resourceType\":\"Observation\",\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"2345-7\"}]},\"subject\":{\"reference\":\"Patient/p1\"},\"valueQuantity\":{\"value\":1e308}}\n\0",
    );

    println!("seeds written under {}", root.display());
}
