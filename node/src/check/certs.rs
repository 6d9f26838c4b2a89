//! The certificate and aggregator checks of `medfed node check`: each problem named (the
//! file, the site, the date) with the fix that matches it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use medfed_infra::identity::{CertificateFacts, check_site_certificate};
use medfed_infra::store::Store;
use medfed_infra::tls_errors::{CertProblem, date};
use medfed_infra::transport::{self, Identity, TransportError};

use super::{Finding, GET_CERTIFICATE};
use crate::config::NodeConfig;

/// Certificates expiring sooner than this are named in the check's output.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// The fix for this site's own certificate when only a new one helps.
pub(crate) fn new_certificate(site: &str) -> String {
    format!(
        "ask the consortium's operator for a new certificate for this site (they run `medfed pki issue --dir pki --site {site}`), \
         install its cert.pem and key.pem at tls.cert and tls.key, and restart the node"
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// This site's certificate: readable, with its key, for this site, in its validity period,
/// issued by the CA in `tls.ca` and not revoked by `tls.crl`.
pub(super) fn check_certificates(cfg: &NodeConfig) -> Result<String, Finding> {
    let tls = &cfg.tls;
    let fail = |detail: String, fix: String| Finding::fail("certificate", detail, fix);
    Identity::load(&tls.cert, &tls.key).map_err(|e| match e {
        TransportError::KeyMismatch { .. } => fail(
            format!(
                "the private key {} does not belong to the certificate {}",
                tls.key.display(),
                tls.cert.display()
            ),
            format!(
                "set tls.key to the key.pem that came with this cert.pem (both are in pki/sites/{}/ \
                 where the certificate was issued); if that key is lost, {}",
                cfg.site,
                new_certificate(&cfg.site)
            ),
        ),
        _ => fail(
            format!("{} / {}: {e}", tls.cert.display(), tls.key.display()),
            GET_CERTIFICATE.into(),
        ),
    })?;
    let der = transport::load_certs(&tls.cert)
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| {
            fail(
                format!("{}: no certificate in the file", tls.cert.display()),
                GET_CERTIFICATE.into(),
            )
        })?;
    let facts = CertificateFacts::of(&der).map_err(|why| {
        fail(
            format!("{}: {why}", tls.cert.display()),
            GET_CERTIFICATE.into(),
        )
    })?;
    match facts.common_name.as_deref() {
        Some(cn) if cn == cfg.site => {}
        Some(cn) => {
            return Err(fail(
                format!(
                    "{} is the certificate of site '{cn}', but this node is site '{}' (site in the config)",
                    tls.cert.display(),
                    cfg.site
                ),
                format!(
                    "if this is the node of '{cn}', set site = \"{cn}\"; otherwise install site '{}''s \
                     certificate and key (pki/sites/{}/ of the consortium's PKI)",
                    cfg.site, cfg.site
                ),
            ));
        }
        None => {
            return Err(fail(
                format!(
                    "{} names no site (it has no common name): it is not a medfed site certificate",
                    tls.cert.display()
                ),
                GET_CERTIFICATE.into(),
            ));
        }
    }
    let now = now();
    if facts.not_after < now {
        return Err(fail(
            format!(
                "{}: this site's certificate expired on {}",
                tls.cert.display(),
                date(facts.not_after)
            ),
            new_certificate(&cfg.site),
        ));
    }
    if facts.not_before > now {
        return Err(fail(
            format!(
                "{}: this site's certificate is not valid before {}, and this machine's clock says {}",
                tls.cert.display(),
                date(facts.not_before),
                date(now)
            ),
            "set this machine's clock right (NTP); the certificate is valid from the time it was issued"
                .to_string(),
        ));
    }
    let trust = tls.trust().map_err(|e| {
        fail(
            e.to_string(),
            "tls.ca must be the consortium's CA certificate (ca.pem) and tls.crl its revocation list (crl.pem), as the consortium's operator sent them".into(),
        )
    })?;
    check_site_certificate(&trust, &der).map_err(|problem| match problem {
        CertProblem::Revoked => fail(
            format!(
                "{}: this site's certificate has been revoked by the consortium (tls.crl {} lists it)",
                tls.cert.display(),
                tls.crl.as_deref().unwrap_or(Path::new("")).display()
            ),
            format!(
                "{}; a revoked certificate cannot be used again",
                new_certificate(&cfg.site)
            ),
        ),
        CertProblem::CrlExpired { .. } | CertProblem::UnknownRevocationStatus => fail(
            format!(
                "tls.crl {}: {problem}",
                tls.crl.as_deref().unwrap_or(Path::new("")).display()
            ),
            "install the current crl.pem from the consortium's operator (from the same PKI as ca.pem)"
                .into(),
        ),
        problem => fail(
            format!(
                "{} is not a valid certificate of site '{}' from the CA in {}: {problem}",
                tls.cert.display(),
                cfg.site,
                tls.ca.display()
            ),
            "the certificate, its key and ca.pem must come from the same consortium PKI: get all three \
             again from the consortium's operator (pki/sites/<site>/)"
                .into(),
        ),
    })?;
    let days_left = (facts.not_after - now) / 86_400;
    let expiry = if days_left < EXPIRY_WARNING_DAYS {
        format!(
            "; WARNING: it expires in {days_left} day(s), on {}: ask the consortium's operator for a new one now",
            date(facts.not_after)
        )
    } else {
        format!(", valid until {}", date(facts.not_after))
    };
    Ok(format!(
        "site '{}', issued by the consortium CA in {}{expiry}",
        cfg.site,
        tls.ca.display()
    ))
}

/// Dials the aggregator once and says hello.
pub(super) async fn check_aggregator(
    cfg: NodeConfig,
    store: Option<Arc<dyn Store>>,
    within: Duration,
) -> Finding {
    let address = cfg.aggregator.address.clone();
    let server_name = cfg.aggregator.server_name().to_string();
    let site = cfg.site.clone();
    let node = match store {
        Some(store) => crate::Node::with_store(cfg, Some(store)),
        None => crate::Node::new(cfg),
    };
    let node = match node {
        Ok(n) => n,
        Err(e) => {
            return Finding::fail(
                "aggregator",
                format!("not tried: {e}"),
                "fix the problem named above",
            );
        }
    };
    let e = match node.probe(within).await {
        Ok(name) => return Finding::ok("aggregator", format!("{address}: welcomed by '{name}'")),
        Err(e) => e,
    };
    let port = address.rsplit(':').next().unwrap_or("4433");
    let (detail, fix) = match &e {
        crate::NodeError::Transport(TransportError::Timeout { .. }) => (
            format!("{address}: no answer within {} s", within.as_secs()),
            format!(
                "check [aggregator] address, that the aggregator is running, and that this network lets the node send UDP to port {port} (nodes dial out; no inbound port is needed)"
            ),
        ),
        crate::NodeError::Refused { .. } => (
            format!("{address}: {e}"),
            "ask the aggregator's operator to add this site to [sites] allow, or to check the reason above".into(),
        ),
        crate::NodeError::Resolve { .. } => (
            e.to_string(),
            "check the host name in [aggregator] address, and this machine's DNS".into(),
        ),
        crate::NodeError::Transport(t) => match t.handshake_failure() {
            // The aggregator refused this site's certificate.
            Some(h) if h.by_peer => match &h.problem {
                CertProblem::Revoked => (
                    format!("{address}: the aggregator refused this site's certificate as revoked (its certificate revocation list lists it)"),
                    new_certificate(&site),
                ),
                CertProblem::Expired { .. } => (
                    format!("{address}: the aggregator refused this site's certificate as expired"),
                    format!("{} (if the certificate has not expired, the aggregator's clock is wrong: tell its operator)", new_certificate(&site)),
                ),
                CertProblem::UnknownIssuer | CertProblem::BadSignature => (
                    format!("{address}: the aggregator does not trust the CA that issued this site's certificate"),
                    "the certificate must come from the consortium's CA: get cert.pem, key.pem and ca.pem again from the consortium's operator, and check that [aggregator] address is the consortium's aggregator".into(),
                ),
                problem => (
                    format!("{address}: the aggregator refused this site's certificate: {problem}"),
                    format!("tell the aggregator's operator the time of this check; if the certificate is at fault, {}", new_certificate(&site)),
                ),
            },
            // This node refused the aggregator's certificate.
            Some(h) => match &h.problem {
                CertProblem::Revoked => (
                    format!("{address}: the aggregator's certificate is revoked in tls.crl"),
                    "do not connect: the aggregator's operator must install a new certificate (`medfed pki issue --aggregator HOST`); tell the consortium's operator".into(),
                ),
                CertProblem::WrongName { presented, .. } => (
                    if presented.is_empty() {
                        format!("{address}: the aggregator's certificate names no host, so it is not for '{server_name}' ([aggregator] server_name)")
                    } else {
                        let names: Vec<String> = presented.iter().map(|n| format!("'{n}'")).collect();
                        format!("{address}: the aggregator's certificate is for {}, not for '{server_name}' ([aggregator] server_name)", names.join(" or "))
                    },
                    match presented.first() {
                        Some(name) => format!(
                            "set [aggregator] server_name = \"{name}\" (the name on the aggregator's certificate), or ask the consortium's operator for an aggregator certificate for '{server_name}' (`medfed pki issue --dir pki --aggregator {server_name}`)"
                        ),
                        None => format!("ask the consortium's operator for an aggregator certificate for '{server_name}' (`medfed pki issue --dir pki --aggregator {server_name}`)"),
                    },
                ),
                CertProblem::Expired { .. } | CertProblem::NotYetValid { .. } => (
                    format!("{address}: the aggregator's certificate is not valid now: {}", h.problem),
                    "the aggregator's operator must install a new certificate (`medfed pki issue --dir pki --aggregator HOST`); if it has not expired, check this machine's clock".into(),
                ),
                CertProblem::UnknownIssuer | CertProblem::BadSignature => (
                    format!("{address}: the aggregator's certificate was not issued by the CA in tls.ca"),
                    "tls.ca must be the consortium's CA (ca.pem, as the consortium's operator sent it), and [aggregator] address the consortium's aggregator".into(),
                ),
                problem => (
                    format!("{address}: the aggregator's certificate was refused: {problem}"),
                    "the aggregator's certificate must come from the consortium CA in tls.ca, and its name must match [aggregator] server_name".into(),
                ),
            },
            None => (
                format!("{address}: {e}"),
                format!("check that the aggregator is running at [aggregator] address and that UDP to port {port} is allowed, then rerun `medfed node check`"),
            ),
        },
        _ => (
            format!("{address}: {e}"),
            "fix the problem named above, then rerun `medfed node check`".into(),
        ),
    };
    Finding::fail("aggregator", detail, fix)
}
