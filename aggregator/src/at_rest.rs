//! What the aggregator keeps on disk, and that it is this user's alone: its state (the
//! store with the studies' checkpoints), its compliance log and signing key, and its out
//! directory (models and statistics). Each is created owner-only (0600 files, 0700
//! directories) where it is made, and [`check`]ed before the aggregator starts.

use medfed_infra::files::{NotPrivate, PrivatePath, check_private};

use crate::config::AggregatorConfig;

/// Every path of the aggregator's state, directories first (their fix, `chmod -R`, covers
/// the files in them).
pub fn private_paths(cfg: &AggregatorConfig) -> Vec<PrivatePath> {
    let mut paths = vec![
        PrivatePath::new("the aggregator's state directory", &cfg.state.dir),
        PrivatePath::new(
            "the aggregator's out directory (models and statistics)",
            &cfg.out_dir,
        ),
        PrivatePath::new(
            "the aggregator's store",
            cfg.state
                .dir
                .join(format!("{}.db", cfg.state.backend.name())),
        ),
        PrivatePath::new("the compliance log", &cfg.audit.log),
        PrivatePath::new("the compliance log's signing key", &cfg.audit.key),
    ];
    if let Some(token) = cfg.ops.as_ref().and_then(|o| o.token_file.as_ref()) {
        paths.push(PrivatePath::new("the operations endpoint's token", token));
    }
    if let Some(capture) = &cfg.audit.capture_sent {
        paths.push(PrivatePath::new("the capture of sent frames", capture));
    }
    paths
}

/// Refuses state that other users can open: the first such path, with the fix.
pub fn check(cfg: &AggregatorConfig) -> Result<(), NotPrivate> {
    check_private(&private_paths(cfg))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_out_directory_others_can_read_stops_the_aggregator_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "placeholder").unwrap();
        }
        let toml = "listen = \"127.0.0.1:0\"\nout_dir = \"models\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                    [sites]\nallow = [\"riverside\"]\n";
        let path = dir.path().join("aggregator.toml");
        std::fs::write(&path, toml).unwrap();
        let cfg = AggregatorConfig::load(&path).unwrap();
        check(&cfg).unwrap();
        let out = dir.path().join("models");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = crate::Aggregator::bind(cfg.clone())
            .err()
            .expect("the aggregator refuses to start")
            .to_string();
        for part in [
            format!("out directory (models and statistics) {}", out.display()),
            "is open to other users (mode 755)".to_string(),
            format!("run `chmod -R go-rwx {}`", out.display()),
            "the aggregator does not start until then".to_string(),
        ] {
            assert!(err.contains(&part), "{part:?} not in: {err}");
        }
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
        check(&cfg).unwrap();
    }
}
