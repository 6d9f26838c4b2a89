//! Studies added to, listed on and stopped at a running aggregator, as processes:
//! `medfed aggregator study create | list | show | stop`.

mod procs;
use procs::{Children, MEDFED, ok};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SITES: [&str; 2] = ["site-a", "site-b"];

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(MEDFED).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spec(id: &str, rounds: u32) -> String {
    format!(
        "id = \"{id}\"\ndataset = \"pima\"\nmodel = \"logistic\"\n\
         features = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\"]\n\
         target = \"type\"\npositive_class = \"Yes\"\nrounds = {rounds}\nmin_sites = 2\n"
    )
}

#[test]
fn studies_are_created_listed_and_stopped_while_the_aggregator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    let p = pki.to_str().unwrap();
    ok(&["pki", "init", "--dir", p]);
    ok(&["pki", "issue", "--dir", p, "--aggregator", "localhost"]);
    let (header, rows) = procs::pima();
    let udp = procs::free_udp_port();
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let agg = d.join("aggregator.toml");
    std::fs::write(
        &agg,
        format!(
            "listen = \"127.0.0.1:{udp}\"\n[ops]\nlisten = \"{ops}\"\n[studies]\nkeep_serving = true\n\
             [tls]\nca = \"pki/aggregator/localhost/ca.pem\"\ncert = \"pki/aggregator/localhost/cert.pem\"\n\
             key = \"pki/aggregator/localhost/key.pem\"\n[sites]\nallow = [\"site-a\", \"site-b\"]\n"
        ),
    )
    .unwrap();
    let a = agg.to_str().unwrap();
    let mut procs = Children(vec![
        Command::new(MEDFED)
            .args(["aggregator", "run", "--config", a])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    for (i, s) in SITES.iter().enumerate() {
        ok(&["pki", "issue", "--dir", p, "--site", s]);
        let part: Vec<String> = rows.iter().skip(i).step_by(2).cloned().collect();
        std::fs::write(
            d.join(format!("{s}.csv")),
            format!("{header}\n{}\n", part.join("\n")),
        )
        .unwrap();
        let cfg = d.join(format!("{s}.toml"));
        std::fs::write(
            &cfg,
            procs::node_config(s, udp, &format!("{s}.csv"), procs::SERVE_PIMA),
        )
        .unwrap();
        procs.0.push(
            Command::new(MEDFED)
                .args(["node", "run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    // A short study, added while the aggregator runs, runs to the end.
    std::fs::write(d.join("short.toml"), spec("short", 3)).unwrap();
    let said = ok(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("short.toml").to_str().unwrap(),
    ]);
    assert!(
        said.contains("study 'short' added") && said.contains("medfed node approve"),
        "{said}"
    );
    let (dup, said) = run(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("short.toml").to_str().unwrap(),
    ]);
    assert!(!dup && said.contains("already exists"), "{said}");
    until("the short study", Duration::from_secs(60), || {
        d.join("aggregator-out/models/short/final.json").is_file()
    });
    until("its state", Duration::from_secs(10), || {
        ok(&["aggregator", "study", "list", "--config", a]).contains("complete")
    });
    let show = ok(&[
        "aggregator",
        "study",
        "show",
        "--config",
        a,
        "--study",
        "short",
    ]);
    assert!(
        show.contains("hash: ") && show.contains("rounds = 3"),
        "{show}"
    );

    // A long one is stopped by the operator after it started.
    std::fs::write(d.join("long.toml"), spec("long", 10_000)).unwrap();
    ok(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("long.toml").to_str().unwrap(),
    ]);
    until(
        "the long study's first round",
        Duration::from_secs(60),
        || {
            d.join("aggregator-out/models/long/round-0001.json")
                .is_file()
        },
    );
    let said = ok(&[
        "aggregator",
        "study",
        "stop",
        "--config",
        a,
        "--study",
        "long",
    ]);
    assert!(said.contains("stops at its next round"), "{said}");
    until("the stop", Duration::from_secs(30), || {
        let list = ok(&["aggregator", "study", "list", "--config", a]);
        list.lines()
            .any(|l| l.starts_with("long") && l.contains("stopped"))
    });
    // The aggregator keeps serving, and stops cleanly on SIGTERM.
    let status = ok(&["aggregator", "status", "--address", &ops]);
    assert!(status.contains("site-a, site-b"), "{status}");
    let pid = procs.0[0].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = procs.0[0].try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no clean stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
