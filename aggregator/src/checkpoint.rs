//! Study checkpoints: after every round, one atomic, synced store transaction holds what a
//! restarted aggregator needs to go on with the next round: the round, the global model,
//! the server optimizer's state, and the round whose validation figures are still to come.
//! A crash in the middle of a round repeats that round: the sites' inputs are the same
//! (seeded local training from the same model), so the repeat reveals nothing new.

use std::path::PathBuf;

use medfed_infra::store::{Batch, Store};

use crate::config::StudyConfig;

const STUDIES: &str = "studies";
const STATISTICS: &str = "statistics";

pub use medfed_protocol::study::checkpoint::{StudyCheckpoint, config_hash};

/// The study's checkpoint, if one matches its current configuration.
pub fn load(store: &dyn Store, cfg: &StudyConfig) -> Result<Option<StudyCheckpoint>, String> {
    let Some(bytes) = store
        .get(STUDIES, cfg.id.as_bytes())
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let cp: StudyCheckpoint = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the checkpoint of study '{}' is unreadable: {e}", cfg.id))?;
    Ok((cp.config_sha256 == config_hash(cfg)).then_some(cp))
}

pub fn save(store: &dyn Store, id: &str, cp: &StudyCheckpoint) -> Result<(), String> {
    // JSON: exact for finite doubles (shortest round-trip form), and readable by an operator.
    let bytes = serde_json::to_vec(cp)
        .map_err(|e| format!("the checkpoint of study '{id}' cannot be encoded: {e}"))?;
    let mut b = Batch::default();
    b.put(STUDIES, id.as_bytes(), &bytes)
        .map_err(|e| e.to_string())?;
    store.commit(b).map_err(|e| e.to_string())
}

/// Where a released statistics study's file is, if it was released.
pub fn statistics_released(store: &dyn Store, id: &str) -> Result<Option<PathBuf>, String> {
    Ok(store
        .get(STATISTICS, id.as_bytes())
        .map_err(|e| e.to_string())?
        .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())))
}

/// What to do with a configured statistics study, given what the store says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatisticsAction {
    /// Released before (to this file): not released again.
    Released(PathBuf),
    /// Not released yet: run it.
    Run,
    /// The store cannot say: not run, since a second release would cost every site's
    /// budget twice and could differ from the first.
    Unknown(String),
}

/// [`StatisticsAction`] for study `id`.
pub fn statistics_action(store: &dyn Store, id: &str) -> StatisticsAction {
    match statistics_released(store, id) {
        Ok(Some(path)) => StatisticsAction::Released(path),
        Ok(None) => StatisticsAction::Run,
        Err(e) => StatisticsAction::Unknown(e),
    }
}

pub fn save_statistics(store: &dyn Store, id: &str, path: &std::path::Path) -> Result<(), String> {
    let mut b = Batch::default();
    b.put(STATISTICS, id.as_bytes(), path.to_string_lossy().as_bytes())
        .map_err(|e| e.to_string())?;
    store.commit(b).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use medfed_infra::store::{Backend, Batch, StoreError, Visitor};

    use super::*;

    /// A store whose reads fail (a disk error, a corrupt page).
    struct Unreadable;

    impl Store for Unreadable {
        fn backend(&self) -> Backend {
            Backend::DEFAULT
        }
        fn get(&self, _: &str, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Err(StoreError::Backend {
                path: "state".into(),
                backend: "test",
                detail: "read error".into(),
            })
        }
        fn scan_each(&self, _: &str, _: &mut Visitor<'_>) -> Result<(), StoreError> {
            Err(StoreError::Backend {
                path: "state".into(),
                backend: "test",
                detail: "read error".into(),
            })
        }
        fn commit(&self, _: Batch) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// A store that cannot say whether a statistics study was released does not let it run
    /// again (it ran whenever the read failed).
    #[test]
    fn an_unreadable_store_does_not_release_statistics_twice() {
        assert!(matches!(
            statistics_action(&Unreadable, "q"),
            StatisticsAction::Unknown(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let store = medfed_infra::store::open(Backend::DEFAULT, &dir.path().join("s")).unwrap();
        assert_eq!(statistics_action(&*store, "q"), StatisticsAction::Run);
        save_statistics(&*store, "q", std::path::Path::new("out/q.json")).unwrap();
        assert_eq!(
            statistics_action(&*store, "q"),
            StatisticsAction::Released("out/q.json".into())
        );
    }
}
