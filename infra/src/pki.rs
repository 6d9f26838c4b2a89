//! The consortium's small PKI: one CA, a client certificate per hospital site, a server
//! certificate per aggregator host (rcgen, ECDSA P-256).
//!
//! Layout of a PKI directory (each party gets its own folder, ready to copy to its machine):
//!
//! ```text
//! DIR/ca/ca.pem, ca.key                       the consortium CA (keep ca.key offline)
//! DIR/ca/issued.toml                          every certificate issued (`issue`)
//! DIR/ca/crl.pem, revoked.toml                revoked certificates (`revoke`)
//! DIR/sites/<site>/cert.pem, key.pem, ca.pem  a hospital node's identity
//! DIR/aggregator/<host>/cert.pem, key.pem, ca.pem
//! ```
//!
//! Private keys are written with mode 0600. Issuing a certificate never touches the CA.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why a PKI operation (`medfed pki ...`) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// `init` found a CA at this path already.
    #[error(
        "a consortium CA already exists at {0}; refusing to replace it (every certificate it issued would stop working)"
    )]
    CaExists(PathBuf),
    /// No CA in the directory (`ca/`, and the `--dir` to name in the hint).
    #[error("no consortium CA at {0}: run `medfed pki init --dir {1}` first")]
    NoCa(PathBuf, String),
    /// A site name or host that cannot be a certificate's name.
    #[error("invalid name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What a name must be.
        why: &'static str,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// rcgen could not generate a key or a certificate, or read the CA's.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// `revoke` found no certificate of that site or host.
    #[error(
        "no certificate issued to '{site}' (none at {path}, none registered in ca/issued.toml): nothing to revoke"
    )]
    NotIssued {
        /// The site or host.
        site: String,
        /// Where its current certificate would be.
        path: PathBuf,
    },
    /// A register (`issued.toml`, `revoked.toml`) or certificate could not be parsed.
    #[error("{path}: {why}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        why: String,
    },
    /// `revoke --keep-current` found only the current certificate.
    #[error(
        "'{site}' has only its current certificate on record (ca/issued.toml): --keep-current leaves nothing to revoke"
    )]
    NothingReplaced {
        /// The site or host.
        site: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Files of one issued identity.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// The directory holding the three files (`DIR/sites/<site>` or `DIR/aggregator/<host>`).
    pub dir: PathBuf,
    /// The certificate, `cert.pem`.
    pub cert: PathBuf,
    /// Its private key, `key.pem` (mode 0600).
    pub key: PathBuf,
    /// A copy of the CA certificate, `ca.pem`, to install with them.
    pub ca: PathBuf,
}

/// The certificate revocation list that `revoke` writes, for `[tls] crl`.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("ca").join("crl.pem")
}

fn revoked_path(dir: &Path) -> PathBuf {
    dir.join("ca").join("revoked.toml")
}

fn issued_path(dir: &Path) -> PathBuf {
    dir.join("ca").join("issued.toml")
}

/// One certificate `issue` made, in `DIR/ca/issued.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCertificate {
    /// "site" or "aggregator".
    pub kind: String,
    /// The site name or aggregator host.
    pub name: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub issued_at: i64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuedList {
    #[serde(default)]
    issued: Vec<IssuedCertificate>,
}

fn read_toml<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, PkiError> {
    if !path.exists() {
        return Ok(T::default());
    }
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    toml::from_str(&text).map_err(|e| PkiError::Unreadable {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), PkiError> {
    let text = toml::to_string(value).map_err(|e| PkiError::Unreadable {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    write_file(path, text.as_bytes(), 0o644)
}

/// The serial number (hex) of the first certificate in PEM `pem`, read from `path`.
fn pem_serial(path: &Path, pem: &[u8]) -> Result<String, PkiError> {
    let unreadable = |why: String| PkiError::Unreadable {
        path: path.to_path_buf(),
        why,
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| unreadable(format!("not a PEM certificate: {e}")))?;
    let cert = parsed
        .parse_x509()
        .map_err(|e| unreadable(format!("not an X.509 certificate: {e}")))?;
    Ok(medfed_protocol::hex::encode(cert.raw_serial()))
}

impl Role {
    fn kind(&self) -> &'static str {
        match self {
            Role::Site(_) => "site",
            Role::Aggregator(_) => "aggregator",
        }
    }

    fn name(&self) -> &str {
        match self {
            Role::Site(n) | Role::Aggregator(n) => n,
        }
    }
}

/// The consortium CA's certificate in a PKI directory, `DIR/ca/ca.pem`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca").join("ca.pem")
}

fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca").join("ca.key")
}

/// Site names become certificate common names, file names and log fields: keep them to a
/// DNS label (lowercase letters, digits, '-', 1..=63 characters, no leading/trailing '-').
pub fn validate_site_name(name: &str) -> Result<(), PkiError> {
    let bad = |why| {
        Err(PkiError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may contain only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("may not start or end with '-'");
    }
    Ok(())
}

fn validate_host(host: &str) -> Result<(), PkiError> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if host.is_empty()
        || host.len() > 253
        || host
            .split('.')
            .any(|label| validate_site_name(label).is_err())
    {
        return Err(PkiError::InvalidName {
            name: host.to_string(),
            why: "must be an IP address or a lowercase DNS name",
        });
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (temporary file + rename), created with `mode`
/// less the process umask (so a private key is 0600 whatever the umask, and a certificate
/// is 0644 under umask 022 and 0600 under the `medfed` command's 0077).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash would keep its old mode: start from a new one.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn validity(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // Back-date an hour so that small clock differences between sites do not matter.
    (now - Duration::hours(1), now + Duration::days(days))
}

/// Creates the consortium CA in `dir/ca/`. Refuses if one exists.
pub fn init_ca(dir: &Path, consortium: &str, days: i64) -> Result<PathBuf, PkiError> {
    let cert_path = ca_cert_path(dir);
    if cert_path.exists() || ca_key_path(dir).exists() {
        return Err(PkiError::CaExists(cert_path));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, consortium);
    dn.push(DnType::CommonName, format!("{consortium} medfed CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&ca_key_path(dir), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// What an issued certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A hospital node: a TLS client certificate whose common name is the site name.
    Site(String),
    /// The aggregator: a TLS server certificate for this host name or IP address.
    Aggregator(String),
}

/// Issues a certificate signed by the CA in `dir`, replacing an earlier one for the same
/// site or host (with a new key). The CA itself is read, never rewritten.
pub fn issue(dir: &Path, role: &Role, days: i64) -> Result<IssuedFiles, PkiError> {
    let ca_cert = ca_cert_path(dir);
    let ca_key = ca_key_path(dir);
    if !ca_cert.exists() || !ca_key.exists() {
        return Err(PkiError::NoCa(dir.join("ca"), dir.display().to_string()));
    }
    let ca_pem = fs::read_to_string(&ca_cert).map_err(io_err(&ca_cert))?;
    let ca_key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let out_dir = match role {
        Role::Site(site) => {
            validate_site_name(site)?;
            dn.push(DnType::CommonName, site.as_str());
            params.subject_alt_names = vec![SanType::DnsName(site.clone().try_into()?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            dir.join("sites").join(site)
        }
        Role::Aggregator(host) => {
            validate_host(host)?;
            dn.push(DnType::CommonName, host.as_str());
            params.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.clone().try_into()?),
            }];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            dir.join("aggregator").join(host)
        }
    };
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let files = IssuedFiles {
        cert: out_dir.join("cert.pem"),
        key: out_dir.join("key.pem"),
        ca: out_dir.join("ca.pem"),
        dir: out_dir,
    };
    // Every certificate issued is registered, so that one replaced later can still be
    // revoked; so is the one being replaced, if it predates the register.
    let serial = pem_serial(&files.cert, cert.pem().as_bytes())?;
    let register = issued_path(dir);
    let mut issued: IssuedList = read_toml(&register)?;
    if let Ok(old) = fs::read(&files.cert)
        && let Ok(old_serial) = pem_serial(&files.cert, &old)
        && !issued.issued.iter().any(|c| c.serial == old_serial)
    {
        issued.issued.push(IssuedCertificate {
            kind: role.kind().to_string(),
            name: role.name().to_string(),
            serial: old_serial,
            issued_at: 0,
        });
    }
    issued.issued.push(IssuedCertificate {
        kind: role.kind().to_string(),
        name: role.name().to_string(),
        serial,
        issued_at: OffsetDateTime::now_utc().unix_timestamp(),
    });
    write_toml(&register, &issued)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write_file(&files.ca, ca_pem.as_bytes(), 0o644)?;
    Ok(files)
}

/// Why a certificate is revoked (RFC 5280 reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    /// The private key was exposed (`key-compromise`).
    KeyCompromise,
    /// A new certificate replaced it (`superseded`).
    Superseded,
    /// The site or host left the consortium (`cessation-of-operation`).
    CessationOfOperation,
    /// The holder's affiliation changed (`affiliation-changed`).
    AffiliationChanged,
    /// No reason given (`unspecified`).
    Unspecified,
}

impl RevocationReason {
    /// The reason as written in `revoked.toml` and on the command line, e.g. `key-compromise`.
    pub fn name(self) -> &'static str {
        match self {
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Unspecified => "unspecified",
        }
    }

    fn code(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
        }
    }

    fn from_name(name: &str) -> RevocationReason {
        [
            RevocationReason::KeyCompromise,
            RevocationReason::Superseded,
            RevocationReason::CessationOfOperation,
            RevocationReason::AffiliationChanged,
        ]
        .into_iter()
        .find(|r| r.name() == name)
        .unwrap_or(RevocationReason::Unspecified)
    }
}

/// One revoked certificate in `DIR/ca/revoked.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedCertificate {
    /// The site or aggregator host the certificate was issued to.
    pub site: String,
    /// The certificate's serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Why, as [`RevocationReason::name`] writes it.
    pub reason: String,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedList {
    /// Incremented with every CRL issued.
    crl_number: u64,
    #[serde(default)]
    revoked: Vec<RevokedCertificate>,
}

/// What `revoke` did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The certificates revoked by this call (serials, hex).
    pub newly_revoked: Vec<String>,
    /// Certificates of this subject that were already revoked.
    pub already_revoked: Vec<String>,
    /// Every certificate the CRL now lists.
    pub revoked: Vec<RevokedCertificate>,
    /// The certificate revocation list written, to distribute as `[tls] crl`.
    pub crl: PathBuf,
}

/// Revokes the certificates of a site or aggregator host: every one `issue` registered
/// for it (`DIR/ca/issued.toml`) and its current one (`DIR/sites/<site>/cert.pem`,
/// `DIR/aggregator/<host>/cert.pem`), except the current one with `keep_current` (after a
/// re-issue: the new certificate stays valid, the replaced ones are revoked). Records them
/// in `DIR/ca/revoked.toml` and issues a new CRL at `DIR/ca/crl.pem`, signed by the CA,
/// listing every certificate revoked so far. Aggregators and nodes with `[tls] crl` set to
/// a copy of it refuse those certificates from their next start. A certificate issued
/// afterwards has a new serial, which the CRL does not list.
pub fn revoke(
    dir: &Path,
    role: &Role,
    reason: RevocationReason,
    keep_current: bool,
) -> Result<Revocation, PkiError> {
    let (site, cert_path) = match role {
        Role::Site(site) => {
            validate_site_name(site)?;
            (site.as_str(), dir.join("sites").join(site).join("cert.pem"))
        }
        Role::Aggregator(host) => {
            validate_host(host)?;
            (
                host.as_str(),
                dir.join("aggregator").join(host).join("cert.pem"),
            )
        }
    };
    let ca_cert = ca_cert_path(dir);
    let ca_key = ca_key_path(dir);
    if !ca_cert.exists() || !ca_key.exists() {
        return Err(PkiError::NoCa(dir.join("ca"), dir.display().to_string()));
    }
    let unreadable = |path: &Path, why: String| PkiError::Unreadable {
        path: path.to_path_buf(),
        why,
    };
    let current = if cert_path.exists() {
        let pem = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        Some(pem_serial(&cert_path, &pem)?)
    } else {
        None
    };
    let issued: IssuedList = read_toml(&issued_path(dir))?;
    let mut serials: Vec<String> = issued
        .issued
        .iter()
        .filter(|c| c.kind == role.kind() && c.name == site)
        .map(|c| c.serial.clone())
        .chain(current.clone())
        .collect();
    serials.sort();
    serials.dedup();
    if keep_current {
        serials.retain(|s| Some(s) != current.as_ref());
        if serials.is_empty() {
            return Err(PkiError::NothingReplaced {
                site: site.to_string(),
            });
        }
    }
    if serials.is_empty() {
        return Err(PkiError::NotIssued {
            site: site.to_string(),
            path: cert_path,
        });
    }

    let list_path = revoked_path(dir);
    let mut list: RevokedList = read_toml(&list_path)?;
    let (mut newly_revoked, mut already_revoked) = (Vec::new(), Vec::new());
    for serial in serials {
        if list.revoked.iter().any(|r| r.serial == serial) {
            already_revoked.push(serial);
            continue;
        }
        list.revoked.push(RevokedCertificate {
            site: site.to_string(),
            serial: serial.clone(),
            revoked_at: OffsetDateTime::now_utc().unix_timestamp(),
            reason: reason.name().to_string(),
        });
        newly_revoked.push(serial);
    }
    list.crl_number += 1;

    let ca_pem = fs::read_to_string(&ca_cert).map_err(io_err(&ca_cert))?;
    let ca_key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;
    let revoked_certs = list
        .revoked
        .iter()
        .map(|r| {
            let bytes = medfed_protocol::hex::decode(&r.serial)
                .ok_or_else(|| unreadable(&list_path, format!("bad serial {:?}", r.serial)))?;
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at)
                    .map_err(|e| unreadable(&list_path, e.to_string()))?,
                reason_code: Some(RevocationReason::from_name(&r.reason).code()),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let (this_update, next_update) = validity(365);
    let crl = rcgen::CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: rcgen::SerialNumber::from(list.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    write_toml(&list_path, &list)?;
    let crl_file = crl_path(dir);
    write_file(&crl_file, crl.pem()?.as_bytes(), 0o644)?;
    Ok(Revocation {
        newly_revoked,
        already_revoked,
        revoked: list.revoked,
        crl: crl_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_certificates_stay_revocable() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "T", 2).unwrap();
        let site = Role::Site("alpha".into());
        let first = issue(dir.path(), &site, 2).unwrap();
        let serial_of = |path: &Path| pem_serial(path, &fs::read(path).unwrap()).unwrap();
        let old = serial_of(&first.cert);
        // As if the first certificate predated the register.
        fs::remove_file(issued_path(dir.path())).unwrap();
        assert!(matches!(
            revoke(dir.path(), &site, RevocationReason::Superseded, true),
            Err(PkiError::NothingReplaced { .. })
        ));
        let second = issue(dir.path(), &site, 2).unwrap();
        let new = serial_of(&second.cert);
        assert_ne!(old, new);
        let r = revoke(dir.path(), &site, RevocationReason::Superseded, true).unwrap();
        assert_eq!(r.newly_revoked, vec![old.clone()], "only the replaced one");
        let r = revoke(dir.path(), &site, RevocationReason::KeyCompromise, false).unwrap();
        assert_eq!(r.newly_revoked, vec![new]);
        assert_eq!(r.already_revoked, vec![old]);
        assert_eq!(r.revoked.len(), 2);
        assert!(matches!(
            revoke(
                dir.path(),
                &Role::Site("beta".into()),
                RevocationReason::Unspecified,
                false
            ),
            Err(PkiError::NotIssued { .. })
        ));
    }

    #[test]
    fn site_names_are_dns_labels() {
        assert!(validate_site_name("st-marys-1").is_ok());
        for bad in ["", "St-Marys", "a b", "-x", "x-", "a/../b", &"a".repeat(64)] {
            assert!(validate_site_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_host("127.0.0.1").is_ok());
        assert!(validate_host("agg.example.org").is_ok());
        assert!(validate_host("agg..org").is_err());
    }

    #[test]
    fn reissuing_never_touches_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "Test", 30).unwrap();
        let before = fs::read(ca_cert_path(dir.path())).unwrap();
        let key_before = fs::read(ca_key_path(dir.path())).unwrap();
        let a = issue(dir.path(), &Role::Site("alpha".into()), 30).unwrap();
        let cert_a = fs::read(&a.cert).unwrap();
        let again = issue(dir.path(), &Role::Site("alpha".into()), 30).unwrap();
        assert_ne!(
            cert_a,
            fs::read(&again.cert).unwrap(),
            "a re-issue makes a new certificate"
        );
        assert_eq!(before, fs::read(ca_cert_path(dir.path())).unwrap());
        assert_eq!(key_before, fs::read(ca_key_path(dir.path())).unwrap());
        assert_eq!(before, fs::read(&again.ca).unwrap());
        assert!(matches!(
            init_ca(dir.path(), "Test", 30),
            Err(PkiError::CaExists(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "Test", 30).unwrap();
        let files = issue(dir.path(), &Role::Aggregator("localhost".into()), 30).unwrap();
        for key in [ca_key_path(dir.path()), files.key] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    #[test]
    fn issuing_without_a_ca_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), &Role::Site("alpha".into()), 30).unwrap_err();
        assert!(err.to_string().contains("medfed pki init"), "{err}");
    }
}
