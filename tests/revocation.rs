//! Certificate revocation over real QUIC: the consortium's operator revokes a site's
//! certificate with `medfed pki revoke`; an aggregator with `[tls] crl` then refuses that
//! site at the handshake, and lets it in again once it has a new certificate. A node with
//! the CRL refuses a revoked aggregator certificate the same way.

mod procs;
use procs::{Processes, free_udp_port, medfed, ok, spawn};

use std::path::Path;
use std::time::{Duration, Instant};

/// `medfed node check` on `config`: (success, stdout + stderr).
fn check(config: &Path) -> (bool, String) {
    let out = medfed(&[
        "node",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "5",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

#[test]
fn a_revoked_certificate_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = procs::pki(d, &["alpha", "beta"]);
    let p = pki.to_str().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv"),
        d.join("pima.csv"),
    )
    .unwrap();

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
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\n\
             cert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
             crl = \"pki/ca/crl.pem\"\n[sites]\nallow = [\"alpha\", \"beta\"]\n"
        ),
    )
    .unwrap();
    let with_crl = |site: &str| {
        procs::node_config(site, port, "pima.csv", "").replace(
            &format!("key = \"pki/sites/{site}/key.pem\"\n"),
            &format!("key = \"pki/sites/{site}/key.pem\"\ncrl = \"pki/ca/crl.pem\"\n"),
        )
    };
    // Beta's own node has no CRL (so its own check does not stop before dialling).
    std::fs::write(d.join("alpha.toml"), with_crl("alpha")).unwrap();
    std::fs::write(
        d.join("beta.toml"),
        procs::node_config("beta", port, "pima.csv", ""),
    )
    .unwrap();
    std::fs::write(d.join("beta-crl.toml"), with_crl("beta")).unwrap();
    let mut procs = Processes(vec![spawn(
        d,
        "aggregator",
        &[
            "aggregator",
            "run",
            "--config",
            d.join("aggregator.toml").to_str().unwrap(),
        ],
    )]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(d.join("aggregator.log"))
        .is_ok_and(|l| l.contains("aggregator listening"))
    {
        assert!(Instant::now() < deadline, "the aggregator did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

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
        text.contains("`tls.crl`") && text.contains("missing-crl.pem"),
        "{text}"
    );
    drop(procs.0.pop());
}
