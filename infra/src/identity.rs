//! Site identities for secure aggregation: a node signs its round keys with the private key
//! of its site certificate; every party checks those signatures against certificates that
//! chain to the consortium CA and name the signing site. So an aggregator that relays keys
//! cannot substitute its own.

use std::collections::BTreeMap;
use std::path::Path;

use medfed_protocol::secagg::{Signer, Verifier};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};

use crate::transport::{TransportError, Trust};

/// Signs with a site's certificate key (ECDSA P-256, as `medfed pki issue` makes).
pub struct SiteSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl SiteSigner {
    /// Loads the site's private key (PKCS#8 PEM, ECDSA P-256: the `key.pem` of
    /// `medfed pki issue`); the error names the file.
    pub fn load(key_path: &Path) -> Result<SiteSigner, TransportError> {
        let pem_err = |detail: String| TransportError::Pem {
            path: key_path.to_path_buf(),
            detail,
        };
        let der =
            PrivatePkcs8KeyDer::from_pem_file(key_path).map_err(|e| pem_err(e.to_string()))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| {
            pem_err(format!(
                "not an ECDSA P-256 key ({e}); reissue it with `medfed pki issue`"
            ))
        })?;
        Ok(SiteSigner { key, rng })
    }
}

impl Signer for SiteSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        // Signing only fails if the system's random generator does; an empty signature then
        // fails verification at every peer, which drops this party from the round.
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }
}

/// Verifies sites' signatures with their certificates, each checked against the consortium
/// CA and the site's name before use.
pub struct CertificateVerifier {
    keys: BTreeMap<String, Vec<u8>>,
}

impl CertificateVerifier {
    /// Checks each `(site, certificate DER)`; a certificate that does not chain to the CA in
    /// `roots`, or names another site, is an error naming the site.
    pub fn new(
        trust: &Trust,
        certificates: &[(String, Vec<u8>)],
    ) -> Result<CertificateVerifier, TransportError> {
        let verifier = trust
            .client_verifier()
            .map_err(|e| TransportError::PeerCertificate(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for (site, der) in certificates {
            let cert = CertificateDer::from(der.as_slice());
            verifier
                .verify_client_cert(&cert, &[], UnixTime::now())
                .map_err(|e| {
                    TransportError::PeerCertificate(format!(
                        "site '{site}': {}",
                        crate::tls_errors::tls_error(&e)
                    ))
                })?;
            let (_, parsed) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| TransportError::PeerCertificate(format!("site '{site}': {e}")))?;
            let cn = parsed
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok());
            if cn != Some(site.as_str()) {
                return Err(TransportError::PeerCertificate(match cn {
                    Some(cn) => {
                        format!("the certificate given for site '{site}' is for site '{cn}'")
                    }
                    None => format!(
                        "the certificate given for site '{site}' names no site (it has no common name)"
                    ),
                }));
            }
            keys.insert(
                site.clone(),
                parsed.public_key().subject_public_key.data.to_vec(),
            );
        }
        Ok(CertificateVerifier { keys })
    }
}

impl Verifier for CertificateVerifier {
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool {
        self.keys.get(site).is_some_and(|pk| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pk)
                .verify(message, signature)
                .is_ok()
        })
    }
}

/// Checks a site's certificate (DER) against what `trust` trusts (the CA, and its CRL if
/// any), as the aggregator checks it at the handshake: what is wrong with it, in words.
pub fn check_site_certificate(
    trust: &Trust,
    der: &[u8],
) -> Result<(), crate::tls_errors::CertProblem> {
    use crate::tls_errors::{CertProblem, cert_problem, tls_error};
    let verifier = trust
        .client_verifier()
        .map_err(|e| CertProblem::Other(format!("the CA or CRL cannot be used: {e}")))?;
    match verifier.verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(c)) => Err(cert_problem(&c)),
        Err(e) => Err(CertProblem::Other(tls_error(&e))),
    }
}

/// What a certificate says about itself: the name it is for and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Its common name: a site's name, or the aggregator's host.
    pub common_name: Option<String>,
    /// UNIX seconds.
    pub not_before: i64,
    /// UNIX seconds: when it expires.
    pub not_after: i64,
}

impl CertificateFacts {
    /// Reads the certificate in DER; the error says why it is not one.
    pub fn of(der: &[u8]) -> Result<CertificateFacts, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate ({e})"))?;
        let validity = cert.validity();
        Ok(CertificateFacts {
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }
}

/// The DER of a connected peer's certificate.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|c| c.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn signatures_verify_only_for_the_right_site_and_ca() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path(), "T", 2).unwrap();
        let a = pki::issue(dir.path(), &pki::Role::Site("alpha".into()), 2).unwrap();
        let b = pki::issue(dir.path(), &pki::Role::Site("beta".into()), 2).unwrap();
        let other = tempfile::tempdir().unwrap();
        pki::init_ca(other.path(), "Other", 2).unwrap();
        let foreign = pki::issue(other.path(), &pki::Role::Site("alpha".into()), 2).unwrap();
        let der = |p: &Path| {
            crate::transport::load_certs(p).unwrap()[0]
                .as_ref()
                .to_vec()
        };
        let trust = Trust::load(&a.ca, None).unwrap();

        let v = CertificateVerifier::new(
            &trust,
            &[
                ("alpha".into(), der(&a.cert)),
                ("beta".into(), der(&b.cert)),
            ],
        )
        .unwrap();
        let sig = SiteSigner::load(&a.key).unwrap().sign(b"keys");
        assert!(v.verify("alpha", b"keys", &sig));
        assert!(!v.verify("alpha", b"other keys", &sig));
        assert!(
            !v.verify("beta", b"keys", &sig),
            "alpha's signature passed as beta's"
        );
        assert!(!v.verify("gamma", b"keys", &sig));

        // A certificate from another CA, or given under another site's name, is refused.
        let err = CertificateVerifier::new(&trust, &[("alpha".into(), der(&foreign.cert))])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("site 'alpha'")
                && err.to_string().contains("not issued by the consortium CA")
                && !err.to_string().contains("UnknownIssuer"),
            "{err}"
        );
        let err = CertificateVerifier::new(&trust, &[("beta".into(), der(&a.cert))])
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("the certificate given for site 'beta' is for site 'alpha'")
                && !err.to_string().contains("Some("),
            "{err}"
        );

        // Once beta's certificate is revoked, a verifier with the CRL refuses it (and still
        // accepts alpha's); one without the CRL does not know.
        let revocation = pki::revoke(
            dir.path(),
            &pki::Role::Site("beta".into()),
            pki::RevocationReason::KeyCompromise,
            false,
        )
        .unwrap();
        assert_eq!(revocation.newly_revoked.len(), 1);
        let with_crl = Trust::load(&a.ca, Some(&revocation.crl)).unwrap();
        let err = CertificateVerifier::new(&with_crl, &[("beta".into(), der(&b.cert))])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("site 'beta'")
                && err.to_string().contains("it has been revoked")
                && !err.to_string().contains("Revoked"),
            "{err}"
        );
        CertificateVerifier::new(&with_crl, &[("alpha".into(), der(&a.cert))]).unwrap();
        CertificateVerifier::new(&trust, &[("beta".into(), der(&b.cert))]).unwrap();
    }
}
