//! What the node keeps on disk, and that it is this user's alone: the files and directories
//! of its state, each created owner-only (0600 files, 0700 directories) where it is made,
//! and checked before the node starts ([`check`]): one that other users can open stops
//! `medfed node run` and `medfed node ingest` with the command that fixes it. `medfed node
//! check` reports each of them.

use medfed_infra::files::{NotPrivate, PrivatePath, check_private};

use crate::config::NodeConfig;

/// Every path of the node's state, in the order a fix is best applied: the state directory
/// first (its fix, `chmod -R`, covers the files in it), then each file by name.
pub fn private_paths(cfg: &NodeConfig) -> Vec<PrivatePath> {
    let state = &cfg.state.dir;
    let mut paths = vec![
        PrivatePath::new("the node's state directory", state),
        PrivatePath::new(
            "the node's store",
            state.join(format!("{}.db", cfg.state.backend.name())),
        ),
        PrivatePath::new("the node's lock file", state.join("node.lock")),
        PrivatePath::new(
            "the privacy-budget ledger",
            crate::privacy::ledger_path(state),
        ),
        PrivatePath::new(
            "the revealed secure-aggregation rounds",
            crate::secure::RevealedRounds::path(state),
        ),
        PrivatePath::new(
            "the answered statistics cohorts",
            crate::statistics::CohortMemory::path(state),
        ),
        PrivatePath::new(
            "the answered steps of iterative queries",
            crate::statistics::AnsweredSteps::path(state),
        ),
        PrivatePath::new(
            "the studies announced to this site",
            crate::announced::path(state),
        ),
        PrivatePath::new("the pseudonym keystore", &cfg.state.keystore),
        PrivatePath::new("the compliance log", &cfg.audit.log),
        PrivatePath::new("the compliance log's signing key", &cfg.audit.key),
        PrivatePath::new("the approvals file", &cfg.policy.approvals),
    ];
    if let Some(capture) = &cfg.audit.capture_sent {
        paths.push(PrivatePath::new("the capture of sent frames", capture));
    }
    for ingest in &cfg.ingests {
        if let Some(raw) = &ingest.raw_rejects {
            paths.push(PrivatePath::new(
                format!("the raw rejects file of pipeline '{}'", ingest.stream),
                raw,
            ));
        }
    }
    paths
}

/// Refuses state that other users can open: the first such path, with the fix.
pub fn check(cfg: &NodeConfig) -> Result<(), NotPrivate> {
    check_private(&private_paths(cfg))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// A node config in `dir` (its TLS files are placeholders: the checks here come first).
    fn config(dir: &Path) -> NodeConfig {
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.join(f), "placeholder").unwrap();
        }
        std::fs::write(dir.join("pima.csv"), "glu,type\n100,Yes\n").unwrap();
        let toml = "site = \"riverside\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                    [[dataset]]\nname = \"pima\"\npath = \"pima.csv\"\n";
        std::fs::write(dir.join("node.toml"), toml).unwrap();
        NodeConfig::load(&dir.join("node.toml")).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn an_existing_state_directory_others_can_read_stops_the_node_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = crate::Node::new(cfg.clone())
            .err()
            .expect("the node refuses to start")
            .to_string();
        for part in [
            format!("the node's state directory {}", state.display()),
            "is open to other users (mode 755)".to_string(),
            format!("run `chmod -R go-rwx {}`", state.display()),
            "the node does not start until then".to_string(),
        ] {
            assert!(err.contains(&part), "{part:?} not in: {err}");
        }
        // Fixed as told, it passes; a file of the state made readable by others is named
        // with its own fix.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        check(&cfg).unwrap();
        std::fs::write(&cfg.policy.approvals, "").unwrap();
        std::fs::set_permissions(
            &cfg.policy.approvals,
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = check(&cfg).unwrap_err();
        assert_eq!(
            err.fix(),
            Some(format!("chmod 600 {}", cfg.policy.approvals.display()).as_str())
        );
    }

    #[test]
    fn the_node_makes_its_state_owner_only_under_a_permissive_umask() {
        medfed_infra::files::set_umask(0o022);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.state.dir = dir.path().join("var/medfed/state");
        cfg.state.keystore = dir.path().join("keystore/keys.toml");
        let store = crate::ingest::open_store(&cfg.state).unwrap();
        drop(store);
        crate::policy::approve(&cfg.policy, &"ab".repeat(32)).unwrap();
        crate::deid::pseudonym::Keystore::create(&cfg.state.keystore).unwrap();
        for (p, want) in [
            (dir.path().join("var"), 0o700),
            (cfg.state.dir.clone(), 0o700),
            (cfg.state.dir.join("redb.db"), 0o600),
            (dir.path().join("keystore"), 0o700),
            (cfg.state.keystore.clone(), 0o600),
            (cfg.policy.approvals.clone(), 0o600),
        ] {
            assert_eq!(mode(&p), want, "{}", p.display());
        }
        check(&cfg).unwrap();
    }
}
