//! TLS and certificate failures in words. rustls, webpki and quinn describe them with enum
//! names (`Revoked`, `KeyMismatch`), `DnsName("...")` and UNIX timestamps; this module says
//! the same as a hospital's IT engineer reads it, with times as dates, and says who refused
//! whose certificate.

use std::fmt;

/// A UNIX time as a date and minute, e.g. `2026-12-01 17:03 UTC`.
pub fn date(unix_secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix_secs} seconds after 1970"),
    }
}

/// What is wrong with a certificate (or the TLS handshake around it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertProblem {
    /// A certificate revocation list (`medfed pki revoke`) lists it.
    Revoked,
    /// Its validity ended, at this UNIX time where known.
    Expired {
        /// When it expired (UNIX seconds), if known.
        since: Option<i64>,
    },
    /// Its validity starts later, at this UNIX time where known.
    NotYetValid {
        /// When it becomes valid (UNIX seconds), if known.
        from: Option<i64>,
    },
    /// It names other hosts or sites than the one expected.
    WrongName {
        /// The name expected (site or host).
        expected: String,
        /// The names the certificate holds.
        presented: Vec<String>,
    },
    /// It was not issued by the CA trusted here.
    UnknownIssuer,
    /// Its signature does not verify.
    BadSignature,
    /// A client certificate where a server certificate is needed, or the reverse.
    WrongPurpose,
    /// No certificate was presented.
    NoCertificate,
    /// The revocation list itself expired, at this UNIX time where known.
    CrlExpired {
        /// When the list's next update was due (UNIX seconds), if known.
        since: Option<i64>,
    },
    /// The revocation list is not from the CA that issued the certificate.
    UnknownRevocationStatus,
    /// Anything else, already in words.
    Other(String),
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::Revoked => {
                f.write_str("it has been revoked (the certificate revocation list lists it)")
            }
            CertProblem::Expired { since: Some(t) } => write!(f, "it expired on {}", date(*t)),
            CertProblem::Expired { since: None } => f.write_str("it has expired"),
            CertProblem::NotYetValid { from } => write!(
                f,
                "it is not valid yet{} (check the clocks of both machines)",
                from.map(|t| format!(": not before {}", date(t)))
                    .unwrap_or_default()
            ),
            CertProblem::WrongName {
                expected,
                presented,
            } if presented.is_empty() => {
                write!(f, "it names no host or site, so it is not for '{expected}'")
            }
            CertProblem::WrongName {
                expected,
                presented,
            } => write!(
                f,
                "it is for {}, not for '{expected}'",
                presented
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            CertProblem::UnknownIssuer => {
                f.write_str("it was not issued by the consortium CA trusted here (another PKI's certificate, or another ca.pem)")
            }
            CertProblem::BadSignature => f.write_str(
                "its signature does not verify: it was not issued by the CA trusted here, or it was altered",
            ),
            CertProblem::WrongPurpose => f.write_str(
                "it is not for this use (a site's client certificate where the aggregator's server certificate is needed, or the reverse)",
            ),
            CertProblem::NoCertificate => f.write_str("no certificate was presented"),
            CertProblem::CrlExpired { since } => write!(
                f,
                "the certificate revocation list {}: get the current crl.pem from the consortium's operator",
                since
                    .map(|t| format!("expired on {}", date(t)))
                    .unwrap_or_else(|| "has expired".into())
            ),
            CertProblem::UnknownRevocationStatus => f.write_str(
                "its revocation status is unknown: the certificate revocation list is not from the CA that issued it",
            ),
            CertProblem::Other(s) => f.write_str(s),
        }
    }
}

/// The problem rustls found with a certificate.
pub fn cert_problem(e: &rustls::CertificateError) -> CertProblem {
    use rustls::CertificateError as E;
    match e {
        E::Revoked => CertProblem::Revoked,
        E::Expired => CertProblem::Expired { since: None },
        E::ExpiredContext { not_after, .. } => CertProblem::Expired {
            since: i64::try_from(not_after.as_secs()).ok(),
        },
        E::NotValidYet => CertProblem::NotYetValid { from: None },
        E::NotValidYetContext { not_before, .. } => CertProblem::NotYetValid {
            from: i64::try_from(not_before.as_secs()).ok(),
        },
        E::NotValidForName => CertProblem::WrongName {
            expected: "the name dialled".into(),
            presented: Vec::new(),
        },
        E::NotValidForNameContext {
            expected,
            presented,
        } => CertProblem::WrongName {
            expected: expected.to_str().into_owned(),
            presented: presented.iter().flat_map(|p| names(p)).collect(),
        },
        E::UnknownIssuer => CertProblem::UnknownIssuer,
        E::BadSignature
        | E::UnsupportedSignatureAlgorithmContext { .. }
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => CertProblem::BadSignature,
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => CertProblem::WrongPurpose,
        E::UnknownRevocationStatus => CertProblem::UnknownRevocationStatus,
        E::ExpiredRevocationList => CertProblem::CrlExpired { since: None },
        E::ExpiredRevocationListContext { next_update, .. } => CertProblem::CrlExpired {
            since: i64::try_from(next_update.as_secs()).ok(),
        },
        E::BadEncoding => CertProblem::Other("it is not a well-formed X.509 certificate".into()),
        other => CertProblem::Other(format!("it is not valid ({})", words(&other.to_string()))),
    }
}

/// Any rustls error, in words.
pub fn tls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!("certificate refused: {}", cert_problem(c)),
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate".into()
        }
        rustls::Error::NoCertificatesPresented => "the other side presented no certificate".into(),
        rustls::Error::NoApplicationProtocol => {
            "the other side does not speak medfed/1 (is it a medfed node or aggregator?)".into()
        }
        rustls::Error::PeerIncompatible(_) => {
            "the other side's TLS is incompatible (medfed needs TLS 1.3)".into()
        }
        rustls::Error::InvalidCertRevocationList(_) => {
            "the certificate revocation list is not valid: get crl.pem again from the consortium's operator".into()
        }
        rustls::Error::General(s) => s.clone(),
        other => words(&other.to_string()),
    }
}

/// Host names and site names in webpki's list of a certificate's names: `DnsName("x")` and
/// `IpAddress(1.2.3.4)` become `x` and `1.2.3.4`.
fn names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('(') {
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        out.push(rest[open + 1..open + close].trim_matches('"').to_string());
        rest = &rest[open + close + 1..];
    }
    if out.is_empty() && !text.trim().is_empty() {
        out.push(text.trim().to_string());
    }
    out
}

/// A TLS message from rustls as text (quinn keeps only the text), in words: the known
/// forms of certificate errors become a [`CertProblem`].
fn parse(reason: &str) -> Option<CertProblem> {
    let tail = match reason.split_once("invalid peer certificate: ") {
        Some((_, tail)) => tail.trim(),
        None if reason.contains("peer sent no certificates") => {
            return Some(CertProblem::NoCertificate);
        }
        None => return None,
    };
    let number_after = |marker: &str| {
        let (_, after) = tail.split_once(marker)?;
        after
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<i64>()
            .ok()
    };
    Some(match tail {
        "Revoked" => CertProblem::Revoked,
        "Expired" => CertProblem::Expired { since: None },
        "NotValidYet" => CertProblem::NotYetValid { from: None },
        "UnknownIssuer" => CertProblem::UnknownIssuer,
        "BadSignature" => CertProblem::BadSignature,
        "UnknownRevocationStatus" => CertProblem::UnknownRevocationStatus,
        "BadEncoding" => CertProblem::Other("it is not a well-formed X.509 certificate".into()),
        t if t.starts_with("InvalidPurpose")
            || t.starts_with("certificate does not allow extended key usage") =>
        {
            CertProblem::WrongPurpose
        }
        t if t.starts_with("UnsupportedSignatureAlgorithm") => CertProblem::BadSignature,
        t if t.starts_with("certificate expired") => CertProblem::Expired {
            since: number_after("not valid after "),
        },
        t if t.starts_with("certificate not valid yet") => CertProblem::NotYetValid {
            from: number_after("not valid before "),
        },
        t if t.starts_with("certificate revocation list expired") => CertProblem::CrlExpired {
            since: number_after("not valid after "),
        },
        t if t.starts_with("certificate not valid for name") => {
            let expected = t.split('"').nth(1).unwrap_or("").to_string();
            let presented = match t.split_once("is only valid for ") {
                Some((_, list)) => list
                    .split(", ")
                    .flat_map(|p| p.split(" or "))
                    .flat_map(names)
                    .collect(),
                None => Vec::new(),
            };
            CertProblem::WrongName {
                expected,
                presented,
            }
        }
        t => CertProblem::Other(format!("it is not valid ({})", words(t))),
    })
}

/// Rewrites the enum names rustls prints for errors it has no words for.
fn words(text: &str) -> String {
    const KNOWN: [(&str, &str); 6] = [
        (
            "KeyMismatch",
            "the private key does not belong to the certificate",
        ),
        ("keys may not be consistent: ", ""),
        ("NoCipherSuitesInCommon", "no cipher suite in common"),
        ("Tls13RequiredForQuic", "QUIC needs TLS 1.3"),
        (
            "ApplicationVerificationFailure",
            "refused by the application",
        ),
        ("Unknown", "unknown"),
    ];
    KNOWN
        .iter()
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// A TLS alert (RFC 8446, section 6), for an alert that came without a reason we can read.
fn alert(code: u8) -> CertProblem {
    match code {
        44 => CertProblem::Revoked,
        45 => CertProblem::Expired { since: None },
        48 => CertProblem::UnknownIssuer,
        43 => CertProblem::WrongPurpose,
        51 => CertProblem::BadSignature,
        116 => CertProblem::NoCertificate,
        42 | 46 => CertProblem::Other("the certificate was refused".into()),
        120 => CertProblem::Other(
            "the other side does not speak medfed/1 (is it a medfed node or aggregator?)".into(),
        ),
        70 => CertProblem::Other("the other side does not speak TLS 1.3".into()),
        c => CertProblem::Other(format!("the TLS handshake failed (TLS alert {c})")),
    }
}

/// A TLS handshake that failed, and who ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeFailure {
    /// The other side ended it: it refused this party's certificate (or handshake). Otherwise
    /// this party refused the other side's certificate.
    pub by_peer: bool,
    /// The TLS alert sent (RFC 8446: 44 revoked, 45 expired, 48 unknown CA, ...).
    pub alert: u8,
    /// What was wrong, in terms of the certificate.
    pub problem: CertProblem,
}

impl HandshakeFailure {
    /// Of a connection that ended, if it ended in a failed TLS handshake.
    pub fn of(e: &quinn::ConnectionError) -> Option<HandshakeFailure> {
        let (by_peer, code, reason) = match e {
            quinn::ConnectionError::ConnectionClosed(close) => (
                true,
                u64::from(close.error_code),
                String::from_utf8_lossy(&close.reason).into_owned(),
            ),
            quinn::ConnectionError::TransportError(t) => {
                (false, u64::from(t.code), t.reason.clone())
            }
            _ => return None,
        };
        if !(0x100..0x200).contains(&code) {
            return None;
        }
        let alert_code = (code & 0xff) as u8;
        Some(HandshakeFailure {
            by_peer,
            alert: alert_code,
            problem: parse(&reason).unwrap_or_else(|| alert(alert_code)),
        })
    }

    /// Whether the certificate refused is this party's own and can never be accepted again
    /// (revoked or expired): only a new certificate helps.
    pub fn own_certificate_unusable(&self) -> bool {
        self.by_peer
            && matches!(
                self.problem,
                CertProblem::Revoked | CertProblem::Expired { .. }
            )
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.problem, self.by_peer) {
            (CertProblem::Other(s), true) => {
                write!(f, "the other side ended the TLS handshake: {s}")
            }
            (CertProblem::Other(s), false) => write!(f, "TLS handshake failed: {s}"),
            (p, true) => write!(f, "the other side refused this party's certificate: {p}"),
            (p, false) => write!(f, "the other side's certificate was refused: {p}"),
        }
    }
}

/// A connection error in words: a failed handshake says who refused which certificate and
/// why; the rest as quinn says it.
pub fn connection_error(e: &quinn::ConnectionError) -> String {
    match HandshakeFailure::of(e) {
        Some(h) => h.to_string(),
        None => match e {
            quinn::ConnectionError::TimedOut => "no answer (timed out)".into(),
            other => words(&other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_texts_read_as_words_with_dates() {
        assert_eq!(date(1_796_148_928), "2026-12-01 18:15 UTC");
        let expired = "invalid peer certificate: certificate expired: verification time 1796148935 (UNIX), but certificate is not valid after 1796148928 (7 seconds ago)";
        let p = parse(expired).unwrap();
        assert_eq!(p.to_string(), "it expired on 2026-12-01 18:15 UTC");
        let name = "invalid peer certificate: certificate not valid for name \"wrong\"; certificate is only valid for DnsName(\"localhost\") or IpAddress(127.0.0.1)";
        assert_eq!(
            parse(name).unwrap().to_string(),
            "it is for 'localhost' or '127.0.0.1', not for 'wrong'"
        );
        assert_eq!(
            parse("invalid peer certificate: Revoked").unwrap(),
            CertProblem::Revoked
        );
        assert_eq!(
            parse("invalid peer certificate: UnknownIssuer").unwrap(),
            CertProblem::UnknownIssuer
        );
        assert!(parse("something else").is_none());
        for text in [
            tls_error(&rustls::Error::InconsistentKeys(
                rustls::InconsistentKeys::KeyMismatch,
            )),
            tls_error(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            )),
            words("keys may not be consistent: KeyMismatch"),
        ] {
            assert!(
                !text.contains("KeyMismatch") && !text.contains("Revoked"),
                "{text}"
            );
        }
        assert_eq!(alert(44), CertProblem::Revoked);
    }

    /// The known offenders read well: a key that is not the certificate's, an expired
    /// certificate (with its date), one for another site.
    #[test]
    fn certificate_problems_name_the_files_and_dates() {
        use crate::identity::CertificateVerifier;
        use crate::pki;
        use crate::transport::{Identity, TransportError, Trust, load_certs};
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path(), "T", 2).unwrap();
        let a = pki::issue(dir.path(), &pki::Role::Site("alpha".into()), 2).unwrap();
        let old = pki::issue(dir.path(), &pki::Role::Site("old".into()), 0).unwrap();
        let b = pki::issue(dir.path(), &pki::Role::Site("beta".into()), 2).unwrap();
        let err = Identity::load(&a.cert, &b.key).unwrap_err();
        assert!(matches!(err, TransportError::KeyMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "the private key {} does not belong to the certificate {}",
                b.key.display(),
                a.cert.display()
            )) && !text.contains("KeyMismatch"),
            "{text}"
        );
        Identity::load(&a.cert, &a.key).unwrap();

        std::thread::sleep(std::time::Duration::from_millis(1100));
        let trust = Trust::load(&a.ca, None).unwrap();
        let der = load_certs(&old.cert).unwrap()[0].to_vec();
        let text = CertificateVerifier::new(&trust, &[("old".into(), der)])
            .err()
            .unwrap()
            .to_string();
        assert!(
            text.contains("it expired on 20") && text.ends_with(" UTC") && !text.contains("UNIX"),
            "{text}"
        );
    }
}
