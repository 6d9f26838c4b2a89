//! The `medfed` binary as a black box: bad input gets an error that names what and where;
//! SIGTERM stops a serving aggregator cleanly; the sample configs in docs/ parse.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");

fn medfed(args: &[&str]) -> Output {
    Command::new(MEDFED)
        .args(args)
        .output()
        .expect("run medfed")
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = medfed(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "medfed {args:?} succeeded");
    for n in needles {
        assert!(
            stderr.contains(n),
            "medfed {args:?}: {n:?} not in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    assert!(medfed(&["pki", "init", "--dir", d]).status.success());
    assert!(
        medfed(&["pki", "issue", "--dir", d, "--aggregator", "localhost"])
            .status
            .success()
    );
    assert!(
        medfed(&["pki", "issue", "--dir", d, "--site", "alpha"])
            .status
            .success()
    );
}

const AGG: &str = r#"listen = "127.0.0.1:0"
[tls]
ca = "pki/aggregator/localhost/ca.pem"
cert = "pki/aggregator/localhost/cert.pem"
key = "pki/aggregator/localhost/key.pem"
[sites]
allow = ["alpha"]
"#;

#[test]
fn config_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    pki(&dir.path().join("pki"));
    let cfg = dir.path().join("aggregator.toml");
    let cfg_s = cfg.to_str().unwrap();

    fails_with(
        &["aggregator", "run", "--config", "/nonexistent/agg.toml"],
        &["cannot read config file /nonexistent/agg.toml"],
    );

    std::fs::write(&cfg, format!("{AGG}colour = \"blue\"\n")).unwrap();
    fails_with(
        &["aggregator", "run", "--config", cfg_s],
        &[cfg_s, "unknown field `colour`"],
    );

    std::fs::write(&cfg, AGG.replace("127.0.0.1:0", "nowhere")).unwrap();
    fails_with(
        &["aggregator", "run", "--config", cfg_s],
        &[cfg_s, "listen"],
    );

    std::fs::write(
        &cfg,
        AGG.replace("localhost/key.pem", "localhost/missing.pem"),
    )
    .unwrap();
    fails_with(
        &["aggregator", "run", "--config", cfg_s],
        &[cfg_s, "`tls.key`", "missing.pem"],
    );

    std::fs::write(&cfg, AGG.replace("[\"alpha\"]", "[\"Alpha Hospital\"]")).unwrap();
    fails_with(
        &["aggregator", "run", "--config", cfg_s],
        &[cfg_s, "`sites.allow`", "Alpha Hospital"],
    );

    let study = "[[study]]\nid = \"s\"\ndataset = \"d\"\nmodel = \"logistic\"\nfeatures = [\"a\"]\ntarget = \"y\"\nrounds = 3\nmin_sites = 1\n";
    std::fs::write(&cfg, format!("{AGG}{study}")).unwrap();
    fails_with(
        &["aggregator", "run", "--config", cfg_s],
        &[cfg_s, "`study[0].positive_class`"],
    );

    let node = dir.path().join("node.toml");
    std::fs::write(
        &node,
        "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n[tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n[[dataset]]\nname = \"pima\"\npath = \"gone.csv\"\n",
    )
    .unwrap();
    fails_with(
        &["node", "run", "--config", node.to_str().unwrap()],
        &["node.toml", "`dataset[0].path`", "gone.csv"],
    );
}

#[test]
fn pki_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    fails_with(
        &["pki", "issue", "--dir", d, "--site", "alpha"],
        &["no consortium CA", "medfed pki init --dir"],
    );
    assert!(medfed(&["pki", "init", "--dir", d]).status.success());
    fails_with(
        &["pki", "init", "--dir", d],
        &["already exists", "refusing to replace it"],
    );
    fails_with(
        &["pki", "issue", "--dir", d, "--site", "St Mary's"],
        &["invalid name", "lowercase"],
    );
    fails_with(&["pki", "issue", "--dir", d], &["--site", "--aggregator"]);
}

#[test]
fn model_evaluate_reports_bad_files_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.json");
    std::fs::write(&model, "{\"not\": \"a model\"}").unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv");
    let data = data.to_str().unwrap();
    fails_with(
        &[
            "model",
            "evaluate",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "--target",
            "type",
        ],
        &["is not a medfed model file"],
    );
    fails_with(
        &[
            "model",
            "evaluate",
            "--model",
            "/nonexistent.json",
            "--data",
            data,
            "--target",
            "type",
        ],
        &["cannot read model file /nonexistent.json"],
    );
}

#[cfg(unix)]
#[test]
fn sigterm_stops_a_serving_aggregator_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    pki(&dir.path().join("pki"));
    let cfg = dir.path().join("aggregator.toml");
    std::fs::write(&cfg, AGG).unwrap();
    let mut child = Command::new(MEDFED)
        .args([
            "--log-format",
            "json",
            "aggregator",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the aggregator did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{status:?}\n{stderr}");
    // JSON log lines, one object each.
    let first = stderr.lines().next().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(first).expect("JSON log line");
    assert_eq!(v["fields"]["message"], "aggregator listening");
}

#[test]
fn sample_configs_in_docs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // The samples name PKI files relative to themselves: give them real ones.
    pki(&dir.path().join("pki"));
    assert!(
        medfed(&[
            "pki",
            "issue",
            "--dir",
            dir.path().join("pki").to_str().unwrap(),
            "--site",
            "st-marys"
        ])
        .status
        .success()
    );
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(
        root.join("examples/data/pima_tr.csv"),
        dir.path().join("data/pima.csv"),
    )
    .unwrap();
    for name in ["aggregator.toml", "node.toml"] {
        std::fs::copy(root.join("docs/samples").join(name), dir.path().join(name)).unwrap();
    }
    medfed_aggregator::config::AggregatorConfig::load(&dir.path().join("aggregator.toml"))
        .expect("aggregator sample");
    medfed_node::config::NodeConfig::load(&dir.path().join("node.toml")).expect("node sample");
}

#[test]
fn node_init_sets_up_a_node_once_and_the_rest_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("st-marys");
    let n = node.to_str().unwrap();
    let out = medfed(&["node", "init", "--dir", n, "--site", "st-marys"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("medfed pki issue --site st-marys"),
        "{stdout}"
    );
    let keystore = node.join("keystore/pseudonym-keys.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keystore).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key_before = std::fs::read(&keystore).unwrap();
    // A second init changes nothing.
    fails_with(
        &["node", "init", "--dir", n, "--site", "st-marys"],
        &["node.toml already exists", "nothing was changed"],
    );
    assert_eq!(std::fs::read(&keystore).unwrap(), key_before);
    fails_with(
        &["node", "init", "--dir", n, "--site", "St Marys"],
        &["St Marys"],
    );
    // The config it wrote parses up to the files the hospital has yet to provide.
    let cfg = node.join("node.toml");
    fails_with(
        &["node", "run", "--config", cfg.to_str().unwrap()],
        &["pki/ca.pem"],
    );
}
