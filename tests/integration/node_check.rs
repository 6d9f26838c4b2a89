//! `medfed node check` names the problem, and how to fix it, for each thing a hospital's IT
//! engineer can get wrong: a missing certificate, a certificate from another CA, an
//! unreachable aggregator, an unreadable data file, an unknown config key. With everything
//! right and an aggregator running, every check passes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Processes, free_udp_port, medfed, ok, pima, pima_csv, pki, pki_at, spawn_aggregator,
};

/// Runs `node check` on `config`; returns (success, stdout + stderr).
fn check(config: &Path) -> (bool, String) {
    crate::common::node_check(config, 2)
}

fn node_config(port: u16, extra: &str, dataset: &str, ca: &str) -> String {
    format!(
        r#"site = "alpha"
[aggregator]
address = "127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca = "{ca}"
cert = "pki/sites/alpha/cert.pem"
key = "pki/sites/alpha/key.pem"
[audit]
log = "alpha-audit.log"
key = "alpha-audit.key"
[policy.rules]
datasets = ["pima"]
columns = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age", "type"]
[[dataset]]
name = "pima"
path = "{dataset}"
exact_releases = ["training"]
{extra}"#
    )
}

/// The result column of a check's first line ("ok" or "FAIL").
fn status<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(check))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
}

#[test]
fn node_check_names_each_problem_and_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    pki_at(&d.join("other-pki"), &["alpha"]);
    std::fs::copy(pima_csv(), d.join("pima.csv")).unwrap();
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca = "pki/sites/alpha/ca.pem";

    // An unknown key.
    let (good, text) = check(&write(
        "typo.toml",
        node_config(
            free_udp_port(),
            "[reconect]\ninitial_backoff_ms = 10\n",
            "pima.csv",
            ca,
        ),
    ));
    assert!(!good);
    assert!(
        text.contains("config") && text.contains("unknown field `reconect`"),
        "{text}"
    );
    assert!(text.contains("docs/samples/node.toml"), "{text}");

    // A missing certificate.
    let missing = node_config(free_udp_port(), "", "pima.csv", ca)
        .replace("pki/sites/alpha/cert.pem", "pki/sites/alpha/nope.pem");
    let (good, text) = check(&write("nocert.toml", missing));
    assert!(!good);
    assert!(
        status(&text, "certificate") == "FAIL" && text.contains("nope.pem"),
        "{text}"
    );
    assert!(
        text.contains("medfed pki issue --dir pki --site <site>"),
        "{text}"
    );

    // A certificate from another consortium's CA.
    let (good, text) = check(&write(
        "wrongca.toml",
        node_config(free_udp_port(), "", "pima.csv", "other-pki/ca/ca.pem"),
    ));
    assert!(!good);
    assert!(
        text.contains("is not a valid certificate of site 'alpha' from the CA in"),
        "{text}"
    );
    assert!(text.contains("same consortium PKI"), "{text}");

    // An unreadable data file (a directory where the CSV should be).
    std::fs::create_dir_all(d.join("extract-dir")).unwrap();
    let (good, text) = check(&write(
        "nodata.toml",
        node_config(free_udp_port(), "", "extract-dir", ca),
    ));
    assert!(!good);
    assert!(
        text.contains("data") && text.contains("extract-dir"),
        "{text}"
    );
    assert!(text.contains("point [[dataset]] path at"), "{text}");

    // No aggregator listening.
    let (good, text) = check(&write(
        "noagg.toml",
        node_config(free_udp_port(), "", "pima.csv", ca),
    ));
    assert!(!good);
    assert!(
        status(&text, "certificate") == "ok" && status(&text, "data") == "ok",
        "{text}"
    );
    assert!(text.contains("no answer within 2 s"), "{text}");
    assert!(text.contains("send UDP to port"), "{text}");

    // With an aggregator that lets the site in, every check passes.
    let port = free_udp_port();
    let agg = write(
        "aggregator.toml",
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\n\
             cert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
             [sites]\nallow = [\"alpha\"]\n"
        ),
    );
    let _agg = Processes(vec![spawn_aggregator(d, "aggregator", &agg)]);
    let good_cfg = write("good.toml", node_config(port, "", "pima.csv", ca));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut good, mut text) = check(&good_cfg);
    while !good && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        (good, text) = check(&good_cfg);
    }
    assert!(good, "{text}");
    assert!(
        text.contains("welcomed by") && text.contains("all checks passed"),
        "{text}"
    );
    // The exact opt-in is said loudly; the Pima columns are all clinical.
    assert!(
        text.contains(
            "WARNING: dataset 'pima' may be released WITHOUT differential privacy: training"
        ),
        "{text}"
    );
    assert!(
        text.contains("dataset 'pima': no column looks like an identifier or a date"),
        "{text}"
    );

    // An extract with an SSN and a birth date: never used, and said so. Without the exact
    // opt-in every release is differentially private.
    let text_csv = std::fs::read_to_string(d.join("pima.csv")).unwrap();
    let mut lines = text_csv.lines();
    let mut with_ids = format!("{},ssn,dob\n", lines.next().unwrap());
    for (i, l) in lines.enumerate() {
        with_ids += &format!(
            "{l},{:03}-{:02}-{:04},19{:02}-0{}-1{}\n",
            100 + i,
            10 + i % 80,
            1000 + i,
            40 + i % 50,
            1 + i % 9,
            i % 10
        );
    }
    std::fs::write(d.join("ids.csv"), with_ids).unwrap();
    let ids_cfg = write(
        "ids.toml",
        node_config(port, "", "ids.csv", ca).replace("exact_releases = [\"training\"]\n", ""),
    );
    let (good, text) = check(&ids_cfg);
    assert!(good, "{text}");
    assert!(
        text.contains("never used by a study or query: 'dob' (a birth date (by name)), 'ssn' (an identifier (by name))"),
        "{text}"
    );
    assert!(
        text.contains("dataset 'pima': every release differentially private"),
        "{text}"
    );

    // A dataset that reads an ingestion pipeline's records: none before ingesting, then
    // the de-identified records.
    let pipeline = "[[ingest]]\nstream = \"extract\"\ncsv = \"pima.csv\"\ncolumns = [\"glu\"]\n\
        [[ingest.field]]\nname = \"glu\"\n[[ingest.field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n\
        [state]\ndir = \"ingested-state\"\n";
    let ingested = write(
        "ingested.toml",
        node_config(port, pipeline, "pima.csv", ca)
            .replace("path = \"pima.csv\"\n", "ingest = \"extract\"\n"),
    );
    let (good, text) = check(&ingested);
    assert!(!good);
    assert!(
        status(&text, "data") == "FAIL"
            && text.contains("pipeline 'extract' has kept no records yet")
            && text.contains("medfed node ingest"),
        "{text}"
    );
    ok(&["node", "ingest", "--config", ingested.to_str().unwrap()]);
    let (good, text) = check(&ingested);
    assert!(good, "{text}");
    assert!(
        text.contains("dataset 'pima': 200 de-identified records, 2 columns")
            && text.contains("(pipeline 'extract')"),
        "{text}"
    );
    assert!(
        status(&text, "files") == "ok"
            && text.contains("the node's state directory")
            && text.contains("ingested-state: this user's only"),
        "{text}"
    );

    // State other users can open: check names it and the fix, and the node refuses to
    // start (run and ingest) with the same fix, until it is applied.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let state = d.join("ingested-state");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fix = format!("chmod -R go-rwx {}", state.display());
        let (good, text) = check(&ingested);
        assert!(!good);
        assert!(
            status(&text, "files") == "FAIL"
                && text.contains("is open to other users (mode 755)")
                && text.contains(&fix),
            "{text}"
        );
        for cmd in ["ingest", "run"] {
            let out = medfed(&["node", cmd, "--config", ingested.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "node {cmd} started: {err}");
            assert!(
                err.contains(&fix) && err.contains("the node does not start until then"),
                "node {cmd}: {err}"
            );
        }
        let out = Command::new("sh").args(["-c", &fix]).status().unwrap();
        assert!(out.success());
        let (good, text) = check(&ingested);
        assert!(good, "{text}");
    }
}

/// The certificate problems a hospital's IT engineer meets, each in words (no `KeyMismatch`,
/// `Some(..)` or UNIX times) with the fix that matches it.
#[test]
fn certificate_problems_are_named_with_the_matching_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha", "beta"]);
    std::fs::copy(pima_csv(), d.join("pima.csv")).unwrap();
    let port = free_udp_port();
    let config = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let alpha = node_config(port, "", "pima.csv", "pki/sites/alpha/ca.pem");

    // A key that is not the certificate's.
    let (good, text) = check(&config(
        "wrong-key.toml",
        alpha.replace("pki/sites/alpha/key.pem", "pki/sites/beta/key.pem"),
    ));
    assert!(!good);
    assert!(
        status(&text, "certificate") == "FAIL"
            && text.contains("pki/sites/beta/key.pem does not belong to the certificate")
            && text.contains("does not belong to the certificate /")
            && text.contains("pki/sites/alpha/cert.pem\n")
            && text.contains("fix: set tls.key to the key.pem that came with this cert.pem"),
        "{text}"
    );
    assert!(!text.contains("KeyMismatch"), "{text}");

    // Another site's certificate and key.
    let (good, text) = check(&config(
        "other-site.toml",
        alpha
            .replace("pki/sites/alpha/cert.pem", "pki/sites/beta/cert.pem")
            .replace("pki/sites/alpha/key.pem", "pki/sites/beta/key.pem"),
    ));
    assert!(!good);
    assert!(
        text.contains("is the certificate of site 'beta', but this node is site 'alpha'")
            && text.contains("set site = \"beta\""),
        "{text}"
    );
    assert!(!text.contains("Some("), "{text}");

    // A good certificate shows until when it is valid, as a date.
    let (_, text) = check(&config("alpha.toml", alpha));
    assert!(
        status(&text, "certificate") == "ok"
            && text.contains(", valid until 20")
            && text.contains(" UTC"),
        "{text}"
    );
}

/// `node check` reads what the pipelines and datasets will read: a missing extract, a
/// declared field the header lacks, an empty or header-only file, rows with more fields than
/// the header, and values that are not numbers or out of range, counted per column from the
/// first rows without ever showing a value.
#[test]
fn pipelines_and_extracts_are_checked_and_sampled_without_showing_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    let (header, rows) = pima();
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    write("pima.csv", format!("{header}\n{}\n", rows.join("\n")));
    write("empty.csv", String::new());
    write("header-only.csv", format!("{header}\n"));
    // glu (the second column): a word in every 50th row, 999 in every 40th.
    let odd: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 50 == 0 {
                medfed::csv_text::with_field(r, 1, "SECRETWORD")
            } else if i % 40 == 0 {
                medfed::csv_text::with_field(r, 1, "999")
            } else {
                r.clone()
            }
        })
        .collect();
    write("odd.csv", format!("{header}\n{}\n", odd.join("\n")));
    let ragged: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 25 == 0 {
                format!("{r},extra")
            } else {
                r.clone()
            }
        })
        .collect();
    write("ragged.csv", format!("{header}\n{}\n", ragged.join("\n")));
    let ca = "pki/sites/alpha/ca.pem";
    let port = free_udp_port();
    let pipeline = |csv: &str, glu: &str| {
        format!(
            "[[ingest]]\nstream = \"extract\"\ncsv = \"{csv}\"\ncolumns = [\"npreg\"]\n\
             [[ingest.field]]\nname = \"npreg\"\n[[ingest.field]]\nname = \"{glu}\"\nmax = 199\n\
             [[ingest.field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n"
        )
    };
    let ingest_check = |name: &str, csv: &str, glu: &str| {
        check(&write(
            name,
            node_config(port, &pipeline(csv, glu), "pima.csv", ca),
        ))
    };

    let (good, text) = ingest_check("missing.toml", "nope.csv", "glu");
    assert!(!good);
    assert!(
        status(&text, "ingest") == "FAIL"
            && text.contains("pipeline 'extract': csv = ")
            && text.contains("nope.csv: does not exist")
            && text.contains("fix: set [[ingest]] csv to the extract's file or directory"),
        "{text}"
    );

    let (good, text) = ingest_check("wrong-field.toml", "pima.csv", "glucose");
    assert!(!good);
    assert!(
        text.contains(
            "no column 'glucose' in the header (its columns: npreg, glu, bp, skin, bmi, ped, age, type)"
        ) && text.contains("make the [[ingest.field]] names match the extract's header"),
        "{text}"
    );

    let (good, text) = ingest_check("empty.toml", "empty.csv", "glu");
    assert!(!good);
    assert!(
        text.contains("empty.csv: the file is empty (no header row)"),
        "{text}"
    );

    let (good, text) = ingest_check("header-only.toml", "header-only.csv", "glu");
    assert!(!good);
    assert!(
        text.contains("header-only.csv: a header and no rows: the pipeline would keep no records"),
        "{text}"
    );

    // Bad values: counted per column and problem, the value never shown. Some rows only:
    // warnings (those records are quarantined), not failures.
    let (_, text) = ingest_check("odd.toml", "odd.csv", "glu");
    assert!(
        text.contains("odd.csv: header has every declared column; 200 rows sampled")
            && text.contains("4 of the 200 rows have a value in 'glu' that is not a number")
            && text.contains("have a value in 'glu' that is above the declared maximum 199")
            && text.contains("declare type = \"text\" for field 'glu'"),
        "{text}"
    );
    assert!(
        status(&text, "ingest") == "ok" && !text.contains("ingest       FAIL"),
        "{text}"
    );
    assert!(
        !text.contains("SECRETWORD") && !text.contains("999"),
        "{text}"
    );
    // A value wrong in every row: nothing would be kept, a failure.
    let (good, text) = check(&write(
        "all-text.toml",
        node_config(port, &pipeline("pima.csv", "glu"), "pima.csv", ca).replace(
            "categories = [\"Yes\", \"No\"]",
            "categories = [\"yes\", \"no\"]",
        ),
    ));
    assert!(!good);
    assert!(
        text.contains("200 of the 200 rows have a value in 'type' that is not one of the categories yes, no: every record would be quarantined")
            && text.contains("they are case-sensitive"),
        "{text}"
    );

    // [[dataset]] path files: empty, header-only, rows wider than the header.
    for (csv, says) in [
        ("empty.csv", "empty.csv: the file is empty (no header row)"),
        ("header-only.csv", "header-only.csv: a header and no rows"),
        (
            "ragged.csv",
            "ragged.csv: 8 of the 200 rows have more fields than the header's 8 (a comma outside double quotes?)",
        ),
    ] {
        let (good, text) = check(&write("dataset.toml", node_config(port, "", csv, ca)));
        assert!(!good, "{csv}: {text}");
        assert!(
            status(&text, "data") == "FAIL" && text.contains(says),
            "{csv}: {text}"
        );
    }
}
