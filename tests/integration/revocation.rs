//! Certificate revocation over real QUIC: the consortium's operator revokes a site's
//! certificate with `medfed pki revoke`; an aggregator with `[tls] crl` then refuses that
//! site at the handshake, and lets it in again once it has a new certificate. A node with
//! the CRL refuses a revoked aggregator certificate the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    Processes, RECONNECT_FAST, aggregator_config, free_udp_port, medfed, node_config, ok, pima_csv,
    pki, spawn_aggregator, spawn_node, until_logged, wait,
};

/// `medfed node check` on `config`: (success, stdout + stderr).
fn check(config: &Path) -> (bool, String) {
    crate::common::node_check(config, 5)
}

/// An aggregator config that checks the sites' certificates against the consortium's CRL.
fn with_aggregator_crl(config: &str) -> String {
    config.replace("[sites]", "crl = \"pki/ca/crl.pem\"\n[sites]")
}

#[test]
fn a_revoked_certificate_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = pki(d, &["alpha", "beta"]);
    let p = pki.to_str().unwrap();
    std::fs::copy(pima_csv(), d.join("pima.csv")).unwrap();

    let out = ok(&["pki", "revoke", "--dir", p, "--site", "beta"]);
    assert!(
        out.contains("revoked the site 'beta' certificate") && out.contains("(key-compromise)"),
        "{out}"
    );
    assert!(out.contains("1 certificate(s)"), "{out}");
    let again = ok(&["pki", "revoke", "--dir", p, "--site", "beta"]);
    assert!(again.contains("was already revoked"), "{again}");
    let out = medfed(&["pki", "revoke", "--dir", p, "--site", "gamma"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no certificate issued to 'gamma'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_udp_port();
    std::fs::write(
        d.join("aggregator.toml"),
        with_aggregator_crl(&aggregator_config(port, None, &["alpha", "beta"], "")),
    )
    .unwrap();
    let with_crl = |site: &str| {
        node_config(site, port, "pima.csv", "").replace(
            &format!("key = \"pki/sites/{site}/key.pem\"\n"),
            &format!("key = \"pki/sites/{site}/key.pem\"\ncrl = \"pki/ca/crl.pem\"\n"),
        )
    };
    // Beta's own node has no CRL (so its own check does not stop before dialling).
    std::fs::write(d.join("alpha.toml"), with_crl("alpha")).unwrap();
    std::fs::write(
        d.join("beta.toml"),
        node_config("beta", port, "pima.csv", ""),
    )
    .unwrap();
    std::fs::write(d.join("beta-crl.toml"), with_crl("beta")).unwrap();
    let _procs = Processes(vec![spawn_aggregator(
        d,
        "aggregator",
        &d.join("aggregator.toml"),
    )]);
    until_logged(
        d,
        "aggregator",
        "aggregator listening",
        Duration::from_secs(60),
    );

    // Alpha is let in; beta's revoked certificate is refused.
    let (good, text) = check(&d.join("alpha.toml"));
    assert!(good && text.contains("welcomed by"), "{text}");
    let (good, text) = check(&d.join("beta.toml"));
    assert!(!good, "{text}");
    assert!(
        text.contains("the aggregator refused this site's certificate as revoked")
            && text.contains("medfed pki issue --dir pki --site beta"),
        "{text}"
    );

    // With the CRL, beta's own check already names the problem and its fix.
    let (good, text) = check(&d.join("beta-crl.toml"));
    assert!(!good);
    assert!(
        text.contains("certificate  FAIL") && text.contains("has been revoked"),
        "{text}"
    );

    // A new certificate for beta (a new serial, which the CRL does not list) is let in.
    ok(&["pki", "issue", "--dir", p, "--site", "beta"]);
    let (good, text) = check(&d.join("beta.toml"));
    assert!(good && text.contains("welcomed by"), "{text}");

    // Alpha's certificate re-issued first (say its key leaked): the replaced one can still
    // be revoked, and the new one stays valid.
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(
            pki.join("sites/alpha").join(f),
            d.join(format!("old-alpha-{f}")),
        )
        .unwrap();
    }
    ok(&["pki", "issue", "--dir", p, "--site", "alpha"]);
    let out = ok(&[
        "pki",
        "revoke",
        "--dir",
        p,
        "--site",
        "alpha",
        "--keep-current",
        "--reason",
        "superseded",
    ]);
    assert!(
        out.matches("revoked the site 'alpha' certificate").count() == 1
            && out.contains("(superseded)"),
        "{out}"
    );
    std::fs::write(
        d.join("old-alpha.toml"),
        with_crl("alpha")
            .replace("pki/sites/alpha/cert.pem", "old-alpha-cert.pem")
            .replace("pki/sites/alpha/key.pem", "old-alpha-key.pem"),
    )
    .unwrap();
    let (good, text) = check(&d.join("old-alpha.toml"));
    assert!(!good && text.contains("has been revoked"), "{text}");
    let (good, text) = check(&d.join("alpha.toml"));
    assert!(good && text.contains("welcomed by"), "{text}");

    // The aggregator's certificate revoked: nodes with the new CRL refuse the aggregator
    // (which still serves it).
    ok(&["pki", "revoke", "--dir", p, "--aggregator", "localhost"]);
    let (good, text) = check(&d.join("alpha.toml"));
    assert!(!good, "{text}");
    assert!(
        text.contains("the aggregator's certificate is revoked in tls.crl"),
        "{text}"
    );

    // A CRL named in the config must exist.
    std::fs::write(
        d.join("nocrl.toml"),
        with_crl("alpha").replace("pki/ca/crl.pem", "pki/ca/missing-crl.pem"),
    )
    .unwrap();
    let (good, text) = check(&d.join("nocrl.toml"));
    assert!(!good);
    assert!(
        text.contains("`tls.crl`")
            && text.contains("missing-crl.pem")
            && text.contains(
                "fix: copy crl.pem, as the consortium's operator sent it, to the path in tls.crl"
            ),
        "{text}"
    );
}

/// A node whose own certificate is revoked (refused by the aggregator) or expired stops
/// within seconds with the fix and exit status 78, instead of reconnecting forever; one that
/// refuses the aggregator's certificate (a wrong server name) tries again only every 10
/// minutes, with an error each time. The messages are words and dates, not rustls' enum
/// names and UNIX times.
#[test]
fn a_node_with_an_unusable_certificate_stops_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = pki(d, &["alpha", "beta"]);
    let p = pki.to_str().unwrap();
    let issued = ok(&["pki", "issue", "--dir", p, "--site", "gamma", "--days", "0"]);
    assert!(
        issued.contains("  valid until 20") && issued.contains(" UTC"),
        "{issued}"
    );
    ok(&["pki", "revoke", "--dir", p, "--site", "beta"]);
    std::fs::copy(pima_csv(), d.join("pima.csv")).unwrap();
    let port = free_udp_port();
    std::fs::write(
        d.join("aggregator.toml"),
        with_aggregator_crl(&aggregator_config(
            port,
            None,
            &["alpha", "beta", "gamma"],
            "",
        )),
    )
    .unwrap();
    for site in ["alpha", "beta", "gamma"] {
        std::fs::write(
            d.join(format!("{site}.toml")),
            node_config(site, port, "pima.csv", RECONNECT_FAST),
        )
        .unwrap();
    }
    std::fs::write(
        d.join("wrong-name.toml"),
        node_config("alpha", port, "pima.csv", RECONNECT_FAST).replace(
            "server_name = \"localhost\"",
            "server_name = \"aggregator.example\"",
        ),
    )
    .unwrap();
    let mut procs = Processes(vec![spawn_aggregator(
        d,
        "aggregator",
        &d.join("aggregator.toml"),
    )]);
    until_logged(
        d,
        "aggregator",
        "aggregator listening",
        Duration::from_secs(60),
    );
    let run = |name: &str, config: &str| spawn_node(d, name, &d.join(config));
    let log = |name: &str| std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap();

    // Revoked: the aggregator refuses it at the handshake; the node stops with the fix.
    // In `procs`, so that a node that does not stop is killed when the test fails.
    procs.0.push(run("beta-node", "beta.toml"));
    let status = wait(&mut procs.0[1].1, Duration::from_secs(15));
    let text = log("beta-node");
    assert_eq!(status.and_then(|s| s.code()), Some(78), "{text}");
    assert!(
        text.contains("the aggregator refused this site's certificate")
            && text.contains("it has been revoked")
            && text.contains("fix: ask the consortium's operator for a new certificate")
            && text.contains("medfed pki issue --dir pki --site beta"),
        "{text}"
    );
    assert!(
        !text.contains("Revoked") && !text.contains("error 44"),
        "{text}"
    );
    // The aggregator's operator reads the same in words.
    let agg = log("aggregator");
    assert!(
        agg.contains(
            "TLS handshake failed: the other side's certificate was refused: it has been revoked"
        ) && !agg.contains("Revoked"),
        "{agg}"
    );

    // Expired (valid for 0 days): the node says since when, as a date, and stops.
    std::thread::sleep(Duration::from_millis(1100));
    procs.0.push(run("gamma-node", "gamma.toml"));
    let status = wait(&mut procs.0[2].1, Duration::from_secs(15));
    let text = log("gamma-node");
    assert_eq!(status.and_then(|s| s.code()), Some(78), "{text}");
    assert!(
        text.contains("this site's certificate")
            && text.contains("expired on 20")
            && text.contains(" UTC")
            && text.contains("medfed pki issue --dir pki --site gamma"),
        "{text}"
    );
    assert!(!text.contains("UNIX"), "{text}");
    let (good, check_text) = check(&d.join("gamma.toml"));
    assert!(!good);
    assert!(
        check_text.contains("certificate  FAIL")
            && check_text.contains("this site's certificate expired on 20")
            && check_text.contains("--site gamma"),
        "{check_text}"
    );

    // The aggregator's certificate is not for the name dialled: the node cannot tell whose
    // mistake it is, so it tries again every 10 minutes, saying why each time.
    procs.0.push(run("wrong-name-node", "wrong-name.toml"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log("wrong-name-node").contains("trying again in 10 minutes") {
        assert!(
            Instant::now() < deadline,
            "no long backoff: {}",
            log("wrong-name-node")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = log("wrong-name-node");
    assert!(
        text.contains("it is for 'localhost', not for 'aggregator.example'")
            && !text.contains("DnsName"),
        "{text}"
    );
    assert_eq!(text.matches("trying again").count(), 1, "{text}");
    let (good, check_text) = check(&d.join("wrong-name.toml"));
    assert!(!good);
    assert!(
        check_text.contains(
            "the aggregator's certificate is for 'localhost', not for 'aggregator.example'"
        ) && check_text.contains("server_name = \"localhost\""),
        "{check_text}"
    );
}
