//! Loading TOML configuration files with errors that name the file and the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration file cannot be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (toml's message names the key, line
    /// and column).
    #[error("config file {path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key's value is well-formed but not acceptable.
    #[error("config file {path}: `{key}` {why}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The key, dotted as in the file (e.g. `tls.crl`).
        key: String,
        /// What is wrong with its value, and what it must be.
        why: String,
    },
}

/// Reads and parses a TOML file. Unknown keys are errors when the target type says
/// `#[serde(deny_unknown_fields)]`; toml's message names the key, line and column.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Resolves a path from a config file relative to the file's directory.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Checks that a file named by config key `key` exists, naming both on failure.
pub fn require_file(config_path: &Path, key: &str, p: &Path) -> Result<(), ConfigError> {
    if p.is_file() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: config_path.to_path_buf(),
            key: key.to_string(),
            why: format!(
                "names {}, which does not exist or is not a file",
                p.display()
            ),
        })
    }
}

/// Where a party keeps its compliance log and the key that signs it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFiles {
    /// The append-only log (created if missing).
    #[serde(default = "default_audit_log")]
    pub log: PathBuf,
    /// Its Ed25519 signing key (made on first start, mode 0600; the public key is written
    /// beside it as `<key>.pub` for auditors).
    #[serde(default = "default_audit_key")]
    pub key: PathBuf,
    /// Append a copy of every frame this party sends to this file (for privacy reviews:
    /// the exact bytes that left, before encryption). Off by default.
    #[serde(default)]
    pub capture_sent: Option<PathBuf>,
}

fn default_audit_log() -> PathBuf {
    "audit/compliance.log".into()
}

fn default_audit_key() -> PathBuf {
    "audit/signing.key".into()
}

impl Default for AuditFiles {
    fn default() -> Self {
        AuditFiles {
            log: default_audit_log(),
            key: default_audit_key(),
            capture_sent: None,
        }
    }
}

impl AuditFiles {
    /// Makes the log, key and capture paths relative to the configuration file's directory
    /// (absolute paths stay as they are).
    pub fn resolve(&mut self, config_path: &Path) {
        self.log = resolve(config_path, &self.log);
        self.key = resolve(config_path, &self.key);
        if let Some(c) = &mut self.capture_sent {
            *c = resolve(config_path, c);
        }
    }
}

/// SHA-256 (hex) of a config file's bytes, for the compliance log.
pub fn file_sha256(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| medfed_protocol::audit::sha256_hex(&b))
        .unwrap_or_default()
}

/// The TLS files of one party, as every config spells them.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The consortium CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The consortium's certificate revocation list (PEM, `medfed pki revoke` writes it):
    /// certificates it lists are refused. Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// Resolves the paths against the config file and checks that they exist.
    pub fn resolve(&mut self, config_path: &Path) -> Result<(), ConfigError> {
        for (key, p) in [
            ("tls.ca", &mut self.ca),
            ("tls.cert", &mut self.cert),
            ("tls.key", &mut self.key),
        ] {
            *p = resolve(config_path, p);
            require_file(config_path, key, p)?;
        }
        if let Some(crl) = &mut self.crl {
            *crl = resolve(config_path, crl);
            require_file(config_path, "tls.crl", crl)?;
        }
        Ok(())
    }

    /// The CA and CRL this party trusts.
    pub fn trust(&self) -> Result<crate::transport::Trust, crate::transport::TransportError> {
        crate::transport::Trust::load(&self.ca, self.crl.as_deref())
    }
}
