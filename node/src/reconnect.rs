//! What the node does after a connection to the aggregator fails: try again with backoff (the
//! aggregator is down, the network is lost), try again only every [`RARE_RETRY`] with an
//! error each time (a certificate problem that someone else may fix), or stop (this site's
//! own certificate is expired or revoked: only a new certificate helps).

use std::time::Duration;

use medfed_infra::identity::{CertificateFacts, check_site_certificate};
use medfed_infra::tls_errors::{CertProblem, date};
use medfed_infra::transport;

use crate::NodeError;
use crate::check::certs::new_certificate;
use crate::config::NodeConfig;

/// How long a node waits between attempts that fail for a certificate it cannot tell is
/// its own fault.
pub const RARE_RETRY: Duration = Duration::from_secs(600);

/// The next step after a failed connection.
pub(crate) enum Next {
    /// Back off as usual.
    Retry(NodeError),
    /// Try again after [`RARE_RETRY`], logging the error as an error.
    RetryRarely(String),
    /// Stop the node with this error.
    Stop(NodeError),
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// This site's certificate, read again: its validity period.
fn own_facts(cfg: &NodeConfig) -> Option<CertificateFacts> {
    let der = transport::load_certs(&cfg.tls.cert)
        .ok()?
        .into_iter()
        .next()?;
    CertificateFacts::of(&der).ok()
}

fn unusable(cfg: &NodeConfig, detail: String) -> NodeError {
    NodeError::Certificate {
        detail,
        fix: new_certificate(&cfg.site),
    }
}

/// Checks this site's own certificate before the node dials: one that has expired, is not
/// valid yet, or is revoked by the node's own `tls.crl` stops the node with the fix.
pub(crate) fn own_certificate(cfg: &NodeConfig) -> Result<(), NodeError> {
    let cert = cfg.tls.cert.display();
    let der = transport::load_certs(&cfg.tls.cert)?
        .into_iter()
        .next()
        .ok_or_else(|| {
            NodeError::Transport(transport::TransportError::Pem {
                path: cfg.tls.cert.clone(),
                detail: "no certificate in this file".into(),
            })
        })?;
    let facts = CertificateFacts::of(&der).map_err(|why| {
        NodeError::Transport(transport::TransportError::Pem {
            path: cfg.tls.cert.clone(),
            detail: why,
        })
    })?;
    let now = now();
    if facts.not_after < now {
        return Err(unusable(
            cfg,
            format!(
                "this site's certificate {cert} expired on {}",
                date(facts.not_after)
            ),
        ));
    }
    if facts.not_before > now {
        return Err(NodeError::Certificate {
            detail: format!(
                "this site's certificate {cert} is not valid before {}, and this machine's clock says {}",
                date(facts.not_before),
                date(now)
            ),
            fix: "set this machine's clock right (NTP), then start the node again".into(),
        });
    }
    if cfg.tls.crl.is_some()
        && let Err(CertProblem::Revoked) = check_site_certificate(&cfg.tls.trust()?, &der)
    {
        return Err(unusable(
            cfg,
            format!("this site's certificate {cert} has been revoked (tls.crl lists it)"),
        ));
    }
    Ok(())
}

/// Judges a failed connection attempt.
pub(crate) fn next(cfg: &NodeConfig, err: NodeError) -> Next {
    let Some(h) = (match &err {
        NodeError::Transport(t) => t.handshake_failure(),
        _ => None,
    }) else {
        return Next::Retry(err);
    };
    let cert = cfg.tls.cert.display();
    if h.by_peer {
        match (&h.problem, own_facts(cfg)) {
            (CertProblem::Revoked, _) => Next::Stop(unusable(
                cfg,
                format!(
                    "the aggregator refused this site's certificate {cert}: it has been revoked (the consortium's certificate revocation list lists it); the node stops, as retrying cannot help"
                ),
            )),
            (CertProblem::Expired { .. }, Some(f)) if f.not_after >= now() => {
                Next::RetryRarely(format!(
                    "the aggregator refused this site's certificate {cert} as expired, but it is valid until {} by this machine's clock: the aggregator's clock may be wrong (tell its operator)",
                    date(f.not_after)
                ))
            }
            (CertProblem::Expired { .. }, facts) => Next::Stop(unusable(
                cfg,
                format!(
                    "the aggregator refused this site's certificate {cert}: it expired{}; the node stops, as retrying cannot help",
                    facts
                        .map(|f| format!(" on {}", date(f.not_after)))
                        .unwrap_or_default()
                ),
            )),
            (problem, _) => Next::RetryRarely(format!(
                "the aggregator refused this site's certificate {cert}: {problem} (`medfed node check` says what to do)"
            )),
        }
    } else {
        Next::RetryRarely(format!(
            "this node refused the aggregator's certificate: {} (`medfed node check` says what to do)",
            h.problem
        ))
    }
}
