//! A hospital node (`medfed_node::Node`) fed aggregator messages decoded from the input:
//! `Node::serve` for requests, `Node::serve_one_way` for one-way messages, as its QUIC
//! session does once a frame is read. One node per process, from a real configuration in a
//! temporary directory under /dev/shm: a consortium PKI made by `medfed_infra::pki`, the
//! Pima training rows as its dataset, rules that serve Pima studies, and a compliance log.
//! (Its state, the log, the privacy ledger, the announcements, carries over from one input
//! to the next, as a node's does from one request to the next.) A secure round's binding
//! of zeros and its placeholder certificates are filled in with the real ones (`fill_in`),
//! so that the fuzzer gets into the node's secure aggregation.
//!
//! Properties: nothing panics; every request gets an answer a node may send (a decision, an
//! update, an evaluation, a secure-aggregation message, a statistics report or an error)
//! that encodes within its frame limit and is about the study it was asked about; and what
//! must only be seen summed is never sent in the clear: no update for a secure round, no
//! statistics report for a secure query, no row count or feature statistics for a
//! differentially private study, no feature statistics for a secure one.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use medfed_fuzz::split_payloads;
use medfed_infra::pki::{Role, init_ca, issue};
use medfed_node::Node;
use medfed_node::config::NodeConfig;
use medfed_protocol::codec::{decode_payload, encode_frame};
use medfed_protocol::messages::*;
use medfed_protocol::{ErrorCode, Message};

const SITE: &str = "st-marys";

struct Fixture {
    node: Node,
    /// The certificates (DER) of this site and of sites "a" and "b", of the same CA.
    certificates: Vec<(String, Vec<u8>)>,
    runtime: tokio::runtime::Runtime,
    max_frame: u32,
    /// MEDFED_FUZZ_DEBUG set: print each request's kind and its answer.
    debug: bool,
}

const DIR_PREFIX: &str = "medfed-fuzz-node-";

/// The node's directory: `/dev/shm/medfed-fuzz-node-<pid>` (the system's temporary
/// directory where there is no /dev/shm). libFuzzer ends the process with `exit`, which
/// drops no static, so each run first removes the directories of processes that are gone.
fn node_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(DIR_PREFIX)
                && pid.parse::<u32>().is_ok()
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("{DIR_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the node's directory");
    dir
}

fn pima_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/pima_tr.csv")
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = node_dir();
        let pki = dir.join("pki");
        init_ca(&pki, "fuzz consortium", 30).expect("a CA");
        let files = issue(&pki, &Role::Site(SITE.into()), 30).expect("a site certificate");
        let mut certificates = Vec::new();
        for (site, cert) in [
            ("a", issue(&pki, &Role::Site("a".into()), 30).expect("a certificate").cert),
            ("b", issue(&pki, &Role::Site("b".into()), 30).expect("a certificate").cert),
            (SITE, files.cert.clone()),
        ] {
            let pem = std::fs::read(&cert).expect("a certificate file");
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("a PEM certificate");
            certificates.push((site.to_string(), pem.contents));
        }
        let csv = pima_csv();
        let config = format!(
            "site = \"{SITE}\"\n\
             [aggregator]\naddress = \"127.0.0.1:9\"\nserver_name = \"localhost\"\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [audit]\nlog = \"audit.log\"\nkey = \"audit.key\"\n\
             [state]\ndir = \"state\"\n\
             [policy]\ntolerated_colluders = 0\nmin_cell = 5\n\
             [policy.rules]\ndatasets = [\"pima\"]\n\
             columns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\"]\n\
             [policy.privacy]\nepsilon = 1e6\ntotal_epsilon = 1e9\n\
             [[dataset]]\nname = \"pima\"\npath = {csv:?}\n\
             exact_releases = [\"training\", \"statistics\"]\n",
            ca = files.ca,
            cert = files.cert,
            key = files.key,
        );
        let path = dir.join("node.toml");
        std::fs::write(&path, config).expect("node.toml written");
        let config = NodeConfig::load(&path).expect("a valid node.toml");
        // The sample statistics queries, approved by the site's operator.
        for (_, m) in medfed_fuzz::samples() {
            if let Message::StatisticsQuery(q) = m {
                medfed_node::policy::approve(&config.policy, &medfed_node::policy::query_hash(&q.query))
                    .expect("approved");
            }
        }
        let max_frame = config.max_frame_bytes;
        let node = Node::new(config).expect("the node starts");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Fixture {
            node,
            certificates,
            runtime,
            max_frame,
            debug: std::env::var_os("MEDFED_FUZZ_DEBUG").is_some(),
        }
    })
}

/// The study (or query) a request is about.
fn subject(m: &Message) -> Option<String> {
    match m {
        Message::StudyAnnouncement(a) => Some(a.study_id.clone()),
        Message::RoundOpen(r) => Some(r.study_id.clone()),
        Message::EvaluateRequest(r) => Some(r.study_id.clone()),
        Message::SecAggToNode(s) => Some(s.study_id.clone()),
        Message::StatisticsOpen(s) => Some(s.study_id.clone()),
        Message::StatisticsQuery(q) => Some(q.query.query_id.clone()),
        _ => None,
    }
}

fn check(request: &Message, reply: &Message, max_frame: u32) {
    assert!(
        encode_frame(reply, max_frame).is_ok(),
        "the {} sent for a {} does not fit a frame",
        reply.kind(),
        request.kind()
    );
    let about = match reply {
        Message::StudyDecision(
            StudyDecision::Accept { study_id, .. } | StudyDecision::Refuse { study_id, .. },
        ) => Some(study_id.clone()),
        Message::ModelUpdate(u) => Some(u.study_id.clone()),
        Message::EvaluationReport(r) => Some(r.study_id.clone()),
        Message::SecAggFromNode(s) => Some(s.study_id.clone()),
        Message::StatisticsReport(r) => Some(r.query_id.clone()),
        Message::Error(e) => {
            assert!(!e.reason.is_empty(), "an error without a reason");
            None
        }
        other => panic!("a node sent a {} for a {}", other.kind(), request.kind()),
    };
    if let Some(about) = about {
        assert_eq!(
            Some(about),
            subject(request),
            "an answer about another study"
        );
    }
    match (request, reply) {
        (Message::StudyAnnouncement(_), Message::StudyDecision(_) | Message::Error(_)) => {}
        (Message::RoundOpen(r), Message::ModelUpdate(_)) => {
            assert!(
                r.secure.is_none(),
                "an update in the clear for a secure round"
            );
        }
        (Message::RoundOpen(r), Message::SecAggFromNode(s)) => {
            assert!(r.secure.is_some(), "secure aggregation for a plain round");
            assert_eq!(s.round, r.round);
        }
        (Message::StatisticsQuery(q), Message::StatisticsReport(_)) => {
            assert!(
                q.secure.is_none(),
                "statistics in the clear for a secure query"
            );
        }
        (Message::StatisticsQuery(q), Message::SecAggFromNode(_)) => {
            assert!(q.secure.is_some(), "secure aggregation for a plain query");
        }
        (Message::StatisticsOpen(_) | Message::SecAggToNode(_), Message::SecAggFromNode(_)) => {}
        (Message::EvaluateRequest(r), Message::EvaluationReport(e)) => {
            assert_eq!(e.round, r.round);
        }
        (_, Message::Error(_)) => {}
        (req, rep) => panic!("a {} answered with a {}", req.kind(), rep.kind()),
    }
    if let (
        Message::StudyAnnouncement(a),
        Message::StudyDecision(StudyDecision::Accept {
            training_rows,
            feature_stats,
            ..
        }),
    ) = (request, reply)
    {
        if a.privacy.is_some() {
            assert_eq!(*training_rows, 0, "a row count for a private study");
            assert!(
                feature_stats.is_none(),
                "feature statistics for a private study"
            );
        }
        if a.secure_aggregation {
            assert!(
                feature_stats.is_none(),
                "feature statistics in the clear for a secure study"
            );
        }
    }
    // A request a node does not answer is refused as unexpected.
    if subject(request).is_none() {
        assert!(
            matches!(reply, Message::Error(e)
                if matches!(e.code, ErrorCode::UnexpectedMessage | ErrorCode::Internal)),
            "a {} answered with {reply:?}",
            request.kind()
        );
    }
}

/// Fills in what the fuzzer cannot make: in a secure round's set-up, a binding of zeros
/// becomes the one computed from the request (as the aggregator computes it), and a
/// placeholder certificate (shorter than 8 bytes) of a site the CA certified becomes that
/// site's real certificate. So the node gets past its checks of both, into the secure
/// aggregation itself; longer certificates and other bindings are left as the input has
/// them.
fn fill_in(msg: &mut Message, certificates: &[(String, Vec<u8>)]) {
    let (secure, binding) = match msg {
        Message::RoundOpen(r) => match &mut r.secure {
            Some(sr) => {
                let b = training_binding(&r.study_id, r.round, sr.scale, &r.model, &r.params);
                (sr, b)
            }
            None => return,
        },
        Message::StatisticsOpen(s) => {
            let b = statistics_binding(&s.study_id, s.secure.scale);
            (&mut s.secure, b)
        }
        Message::StatisticsQuery(q) => match &mut q.secure {
            Some(sr) => {
                let b = query_binding(&q.query, sr.scale);
                (sr, b)
            }
            None => return,
        },
        _ => return,
    };
    if secure.setup.binding == [0; 32] {
        secure.setup.binding = binding;
    }
    for (party, cert) in secure.setup.parties.iter().zip(&mut secure.certificates) {
        if cert.len() < 8
            && let Some((_, real)) = certificates.iter().find(|(name, _)| name == party)
        {
            cert.clone_from(real);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    for payload in split_payloads(data).into_iter().take(16) {
        let Ok(mut msg) = decode_payload(payload) else {
            continue;
        };
        fill_in(&mut msg, &f.certificates);
        match msg {
            Message::RoundResult(_) => f.node.serve_one_way(msg),
            request => {
                let reply = f.runtime.block_on(f.node.serve(request.clone()));
                if f.debug {
                    eprintln!("{} -> {reply:?}", request.kind());
                }
                check(&request, &reply, f.max_frame);
            }
        }
    }
});
