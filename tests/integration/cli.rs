//! The `medfed` binary as a black box: bad input gets an error that names what and where;
//! SIGTERM stops a serving aggregator cleanly; the sample configs in docs/ parse.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{MEDFED, medfed, model_evaluate, pima_csv, pki_at};

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

/// A PKI in `dir` with the aggregator's certificate and site alpha's.
fn pki(dir: &Path) {
    pki_at(dir, &["alpha"]);
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
    // A dataset read from an ingestion pipeline: the pipeline must exist, and a dataset is
    // a file or a pipeline, not both, nor neither.
    let base = "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n[tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n";
    std::fs::write(dir.path().join("x.csv"), "a\n1\n").unwrap();
    let pipeline = "[[ingest]]\nstream = \"extract\"\ncsv = \"x.csv\"\ncolumns = [\"a\"]\n[[ingest.field]]\nname = \"a\"\n";
    for (dataset, expected) in [
        (
            "[[dataset]]\nname = \"pima\"\ningest = \"extracts\"\n",
            vec![
                "`dataset[0].ingest`",
                "no [[ingest]] pipeline has stream = \"extracts\" (configured: \"extract\")",
            ],
        ),
        (
            "[[dataset]]\nname = \"pima\"\ningest = \"extract\"\npath = \"x.csv\"\n",
            vec!["`dataset[0]`", "has both path and ingest"],
        ),
        (
            "[[dataset]]\nname = \"pima\"\n",
            vec!["`dataset[0]`", "needs path (a CSV file) or ingest"],
        ),
        (
            "[[dataset]]\nname = \"pima\"\ningest = \"bare\"\n[[ingest]]\nstream = \"bare\"\ncsv = \"x.csv\"\ncolumns = [\"a\"]\n",
            vec![
                "`dataset[0].ingest`",
                "pipeline \"bare\" declares no [[ingest.field]]",
            ],
        ),
    ] {
        std::fs::write(&node, format!("{base}{pipeline}{dataset}")).unwrap();
        let mut want = vec!["node.toml"];
        want.extend(expected);
        fails_with(&["node", "run", "--config", node.to_str().unwrap()], &want);
    }
}

#[test]
fn survival_cox_and_trees_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    pki(&dir.path().join("pki"));
    let cfg = dir.path().join("aggregator.toml");
    let cfg_s = cfg.to_str().unwrap();
    let stats = "[[statistics]]\nid = \"q\"\ndataset = \"lung\"\nmin_sites = 1\n";
    let survival = "[statistics.survival]\ntime = \"time\"\nevent = \"status\"\n";
    let trees = "[statistics.boosted_trees]\ntarget = \"y\"\nfeatures = [{ name = \"a\", low = 0, high = 1 }]\n";
    for (rest, expected) in [
        (
            format!("{stats}{survival}start = 0\nend = 10\nstep = -1\n"),
            vec!["`statistics[0].survival`", "step > 0"],
        ),
        (
            format!("{stats}{survival}start = 0\nend = 10\nstep = 1\nedges = [0, 5, 10]\n"),
            vec!["`statistics[0].survival`", "not both"],
        ),
        (
            format!("{stats}{survival}edges = [0, 5, 5]\n"),
            vec!["`statistics[0].survival`", "strictly rising"],
        ),
        (
            format!("{stats}{survival}edges = [0, 10]\n[statistics.cox]\ncovariates = [\"age\"]\n"),
            vec!["`statistics[0].cox`", "set exact = true"],
        ),
        (
            format!("{stats}exact = true\n[statistics.cox]\ncovariates = [\"age\"]\n"),
            vec!["`statistics[0].cox`", "needs [statistics.survival]"],
        ),
        (
            // A numeric target (squared loss) under the default noise.
            format!("{stats}{trees}"),
            vec!["`statistics[0].boosted_trees`", "logistic loss"],
        ),
        (
            format!("{stats}exact = true\n{trees}depth = 0\n"),
            vec!["`statistics[0].boosted_trees`", "depth must be 1 to 8"],
        ),
    ] {
        std::fs::write(&cfg, format!("{AGG}{rest}")).unwrap();
        let mut want = vec![cfg_s];
        want.extend(expected);
        fails_with(&["aggregator", "run", "--config", cfg_s], &want);
    }
}

#[test]
fn statistics_show_names_a_file_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["aggregator", "statistics", "show", "/nonexistent/q.json"],
        &["cannot read the statistics file /nonexistent/q.json"],
    );
    let other = dir.path().join("model.json");
    std::fs::write(&other, "{\"format\": \"medfed-model/2\"}").unwrap();
    fails_with(
        &["aggregator", "statistics", "show", other.to_str().unwrap()],
        &["model.json is not a statistics release"],
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
    let data = pima_csv();
    fails_with(
        &model_evaluate(&model, &data, &[]),
        &["is not a medfed model file"],
    );
    fails_with(
        &model_evaluate(Path::new("/nonexistent.json"), &data, &[]),
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
    // Signal it once it is serving (it reads its log line from stderr).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("aggregator listening") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("the aggregator never listened: {:?}", reader.join());
    }
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
    let stderr = reader.join().unwrap().join("\n");
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
    pki_at(&dir.path().join("pki"), &["alpha", "st-marys"]);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(pima_csv(), dir.path().join("data/pima.csv")).unwrap();
    for name in ["aggregator.toml", "node.toml"] {
        std::fs::copy(root.join("docs/samples").join(name), dir.path().join(name)).unwrap();
    }
    let agg =
        medfed_aggregator::config::AggregatorConfig::load(&dir.path().join("aggregator.toml"))
            .expect("aggregator sample");
    let node =
        medfed_node::config::NodeConfig::load(&dir.path().join("node.toml")).expect("node sample");

    // Every key the config structs have (defaults included) is written out in the samples,
    // and docs/configuration.md holds the samples as they are: the reference cannot drift.
    let reference_path = root.join("docs/configuration.md");
    let mut reference = std::fs::read_to_string(&reference_path).unwrap();
    if std::env::var_os("MEDFED_UPDATE_SNAPSHOTS").is_some() {
        let sample = |n: &str| std::fs::read_to_string(root.join("docs/samples").join(n)).unwrap();
        let head = reference.split("## node.toml").next().unwrap().to_string();
        reference = format!(
            "{head}## node.toml\n\n```toml\n{}\n```\n\n## aggregator.toml\n\n```toml\n{}\n```\n",
            sample("node.toml").trim(),
            sample("aggregator.toml").trim()
        );
        std::fs::write(&reference_path, &reference).unwrap();
    }
    for (name, serialized) in [
        ("aggregator.toml", toml::Value::try_from(&agg).unwrap()),
        ("node.toml", toml::Value::try_from(&node).unwrap()),
    ] {
        let text = std::fs::read_to_string(root.join("docs/samples").join(name)).unwrap();
        let written: toml::Value = toml::from_str(&text).unwrap();
        let (mut have, mut want) = (Default::default(), Default::default());
        key_paths(&written, "", &mut have);
        key_paths(&serialized, "", &mut want);
        let missing: Vec<&String> = want.difference(&have).collect();
        assert!(missing.is_empty(), "docs/samples/{name} lacks {missing:?}");
        assert!(
            reference.contains(text.trim()),
            "docs/configuration.md does not hold docs/samples/{name} as it is \
             (regenerate with MEDFED_UPDATE_SNAPSHOTS=1 cargo test --test integration cli::)"
        );
    }
}

/// Every key of `v` as a dotted path (array elements share their array's path).
fn key_paths(v: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                key_paths(v, &p, out);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| key_paths(v, prefix, out)),
        _ => {}
    }
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

#[test]
fn the_sample_systemd_units_run_real_commands() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for unit in ["medfed-node.service", "medfed-aggregator.service"] {
        let text = std::fs::read_to_string(root.join("docs/samples").join(unit)).unwrap();
        let commands: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("ExecStart=")
                    .or_else(|| l.strip_prefix("ExecStartPre="))
            })
            .collect();
        assert!(!commands.is_empty(), "{unit}");
        for c in commands {
            let words: Vec<&str> = c.split_whitespace().collect();
            assert!(words[0].ends_with("/medfed"), "{unit}: {c}");
            // The subcommand and every flag it uses exist.
            let sub: Vec<&str> = words[1..]
                .iter()
                .take_while(|w| !w.starts_with("--"))
                .copied()
                .collect();
            let help = medfed(&[sub.as_slice(), &["--help"]].concat());
            let help = String::from_utf8_lossy(&help.stdout).into_owned();
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                assert!(help.contains(flag), "{unit}: `{c}`: no {flag} in:\n{help}");
            }
        }
    }
}

#[test]
fn two_nodes_cannot_share_a_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    pki(&dir.path().join("pki"));
    std::fs::write(dir.path().join("x.csv"), "a\n1\n").unwrap();
    let node = dir.path().join("node.toml");
    // An aggregator nobody listens for: the first node keeps trying to reach it.
    std::fs::write(
        &node,
        "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:9\"\nserver_name = \"localhost\"\n[tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n[[dataset]]\nname = \"x\"\npath = \"x.csv\"\n",
    )
    .unwrap();
    let node_s = node.to_str().unwrap();
    let mut first = Command::new(MEDFED)
        .args(["node", "run", "--config", node_s])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It has locked its state once it tries to connect.
    let stderr = first.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("reconnecting") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = first.kill();
        panic!("the first node never tried to connect");
    }
    fails_with(
        &["node", "run", "--config", node_s],
        &["state", "another medfed node process is using it"],
    );
    first.kill().unwrap();
    first.wait().unwrap();
}
