//! Writing a release (a round's model, a statistics study's result) so that nothing is
//! released that the compliance log does not show: first the log (its record and a signed
//! tree head), then what the aggregator must remember of it, then the file.

use std::path::Path;

use medfed_infra::auditlog::AuditLog;
use medfed_protocol::audit::Event;

/// Why a release was not written, and at which step.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReleaseError {
    #[error("the compliance log cannot record it ({0}), so it is not released")]
    Unlogged(std::io::Error),
    #[error("{0}; not released")]
    Remember(String),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Logs `event` (with a signed tree head), then `remember`s it, then writes `bytes` to
/// `path`. Each step runs only if the ones before succeeded.
pub(crate) fn release(
    audit: &AuditLog,
    event: Event,
    remember: impl FnOnce() -> Result<(), String>,
    path: &Path,
    bytes: &[u8],
) -> Result<(), ReleaseError> {
    audit
        .record(event)
        .and_then(|()| audit.checkpoint())
        .map_err(ReleaseError::Unlogged)?;
    remember().map_err(ReleaseError::Remember)?;
    medfed_infra::files::write_atomic(path, bytes).map_err(|source| ReleaseError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::Released {
            study: "s".into(),
            round: 1,
            sites: vec!["a".into(), "b".into()],
            sha256: "00".into(),
        }
    }

    /// A release the compliance log cannot record is not written, nor remembered; one
    /// whose memory cannot be written is not written either.
    #[test]
    fn nothing_is_released_that_the_log_does_not_show() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(
            &dir.path().join("log"),
            &dir.path().join("key"),
            "agg",
            "aggregator",
            "test",
            "",
        )
        .unwrap();
        let out = dir.path().join("out/model.json");
        let mut remembered = false;
        release(&log, event(), || Ok(()), &out, b"{}").unwrap();
        assert!(out.exists());
        std::fs::remove_file(&out).unwrap();
        let err = release(
            &log,
            event(),
            || Err("the store is gone".into()),
            &out,
            b"{}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not released"), "{err}");
        assert!(!out.exists());
        log.fail_writes().unwrap();
        let err = release(
            &log,
            event(),
            || {
                remembered = true;
                Ok(())
            },
            &out,
            b"{}",
        )
        .unwrap_err();
        assert!(matches!(err, ReleaseError::Unlogged(_)), "{err}");
        assert!(!out.exists() && !remembered);
    }
}
