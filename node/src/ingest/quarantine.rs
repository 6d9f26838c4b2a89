//! Quarantined records: what the node keeps of them, and how its operator reads them.
//!
//! A dead letter keeps the reason, the field and the patient's pseudonym (see
//! [`Rejection`]), never a value of the record. [`list`] reads them back for
//! `medfed node quarantine`. Dead letters an earlier medfed wrote as text, which could
//! quote values, are rewritten without their text when a pipeline starts
//! ([`scrub_earlier`]).
//!
//! For the site's data stewards, `[[ingest]] raw_rejects = "FILE"` also appends each
//! quarantined record's raw input line to FILE (created mode 0600, never readable by other
//! users). It is off by default, and the file never leaves the node.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use medfed_infra::store::{Batch, Store};

use super::{IngestConfig, IngestError, parts};
use crate::runtime::{
    DEAD_LETTER, Envelope, KvState, MessageCollector, Rejection, StreamTask, TaskCoordinator,
    TaskError,
};

/// One quarantined record, as `medfed node quarantine` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The pipeline's stream.
    pub stream: String,
    /// The partition.
    pub partition: u32,
    /// The record's offset in its partition (for a CSV file, its data row, from 0).
    pub offset: u64,
    /// Why it was quarantined: the reason, the field and the patient's pseudonym, never a value.
    pub rejection: Rejection,
}

/// The store namespace of a partition's dead letters.
fn namespace(stream: &str, partition: u32) -> String {
    format!("{DEAD_LETTER}/{stream}/{partition}")
}

/// Every quarantined record of the configured pipelines, by stream, partition and offset.
pub fn list(ingests: &[IngestConfig], store: &dyn Store) -> Result<Vec<Quarantined>, IngestError> {
    let mut out = Vec::new();
    for cfg in ingests {
        let fail = |detail: String| IngestError {
            stream: cfg.stream.clone(),
            detail,
        };
        for (p, _) in parts(cfg).map_err(fail)? {
            for (key, value) in store
                .scan(&namespace(&cfg.stream, p))
                .map_err(|e| fail(e.to_string()))?
            {
                let offset = <[u8; 8]>::try_from(key.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| fail(format!("partition {p}: a dead letter with a bad key")))?;
                out.push(Quarantined {
                    stream: cfg.stream.clone(),
                    partition: p,
                    offset,
                    rejection: Rejection::decode(&value),
                });
            }
        }
    }
    Ok(out)
}

/// Rewrites the pipeline's dead letters that an earlier medfed stored as text (which could
/// quote a value) as [`Rejection::earlier`]: the field they named, without the text.
/// Returns how many were rewritten.
pub fn scrub_earlier(cfg: &IngestConfig, store: &dyn Store) -> Result<usize, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut batch = Batch::default();
    for (p, _) in parts(cfg).map_err(fail)? {
        let ns = namespace(&cfg.stream, p);
        for (key, value) in store.scan(&ns).map_err(|e| fail(e.to_string()))? {
            if !Rejection::is_current(&value) {
                batch
                    .put(&ns, &key, &Rejection::earlier(&value).encode())
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
    }
    let rewritten = batch.len();
    if rewritten > 0 {
        store.commit(batch).map_err(|e| fail(e.to_string()))?;
        tracing::info!(
            stream = %cfg.stream,
            rewritten,
            "dead letters of an earlier medfed rewritten without their text (it could quote values)"
        );
    }
    Ok(rewritten)
}

/// The raw-rejects file of a pipeline (`[[ingest]] raw_rejects`): a CSV file of
/// `stream,partition,offset,line`, appended, mode 0600. Shared by the pipeline's
/// partitions.
pub(crate) struct RawRejects {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl RawRejects {
    pub(crate) fn open(path: &Path) -> std::io::Result<Arc<RawRejects>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            medfed_infra::files::create_private_dir(dir)?;
        }
        let mut file = medfed_infra::files::private_file_options()
            .create(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            file.write_all(b"stream,partition,offset,line\n")?;
            file.sync_data()?;
        }
        Ok(Arc::new(RawRejects {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        }))
    }

    /// Appends one quarantined record's raw line, synced. A record re-read after a crash
    /// (before its checkpoint) is appended again: the offset tells the copies apart.
    fn append(&self, env: &Envelope) -> std::io::Result<()> {
        let mut row = csv::Writer::from_writer(Vec::new());
        row.write_record([
            env.stream.as_bytes(),
            env.partition.to_string().as_bytes(),
            env.offset.to_string().as_bytes(),
            env.payload.as_slice(),
        ])?;
        let row = row.into_inner().map_err(|e| e.into_error())?;
        // The file is the file's: a writer that panicked left whole rows or none.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&row)?;
        file.sync_data()
    }
}

/// Runs a pipeline's task and appends the raw line of every record it quarantines to the
/// pipeline's raw-rejects file.
pub(crate) struct KeepRawRejects {
    pub(crate) inner: Box<dyn StreamTask>,
    pub(crate) sink: Arc<RawRejects>,
}

impl StreamTask for KeepRawRejects {
    fn init(&mut self, state: &mut KvState) -> Result<(), TaskError> {
        self.inner.init(state)
    }

    fn process(
        &mut self,
        envelope: &Envelope,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        let before = collector.quarantined();
        self.inner
            .process(envelope, state, collector, coordinator)?;
        if collector.quarantined() > before {
            self.sink.append(envelope).map_err(|e| TaskError {
                task: "raw-rejects".into(),
                detail: format!(
                    "cannot append to the raw rejects file {}: {e}",
                    self.sink.path.display()
                ),
            })?;
        }
        Ok(())
    }

    fn process_record(
        &mut self,
        envelope: &Envelope,
        record: crate::deid::Record,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        let before = collector.quarantined();
        self.inner
            .process_record(envelope, record, state, collector, coordinator)?;
        if collector.quarantined() > before {
            self.sink.append(envelope).map_err(|e| TaskError {
                task: "raw-rejects".into(),
                detail: format!(
                    "cannot append to the raw rejects file {}: {e}",
                    self.sink.path.display()
                ),
            })?;
        }
        Ok(())
    }

    fn window(
        &mut self,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.inner.window(state, collector, coordinator)
    }

    fn flush(&mut self, state: &mut KvState) {
        self.inner.flush(state);
    }

    fn on_end_of_stream(
        &mut self,
        state: &mut KvState,
        collector: &mut MessageCollector,
    ) -> Result<(), TaskError> {
        self.inner.on_end_of_stream(state, collector)
    }

    fn close(&mut self) {
        self.inner.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &Path, raw_rejects: bool) -> IngestConfig {
        let csv = dir.join("extract.csv");
        std::fs::write(
            &csv,
            "mrn,street,glu\nMRN-1,1 Main St,140\nMRN-2,7 Bletchley Park, Unit 4,99\nMRN-3,2 Low Rd,abc\n",
        )
        .unwrap();
        let raw = if raw_rejects {
            format!("raw_rejects = {:?}\n", dir.join("stewards/rejects.csv"))
        } else {
            String::new()
        };
        let toml = format!(
            "stream = \"extract\"\ncsv = {csv:?}\ncolumns = [\"glu\"]\n{raw}\
             [[field]]\nname = \"mrn\"\nclass = \"patient-id\"\n\
             [[field]]\nname = \"street\"\nclass = \"identifier\"\n\
             [[field]]\nname = \"glu\"\n"
        );
        let cfg: IngestConfig = toml::from_str(&toml).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    fn ingest(dir: &Path, cfg: &IngestConfig) -> Arc<dyn Store> {
        let keystore = dir.join("keystore.toml");
        if !keystore.exists() {
            crate::deid::pseudonym::Keystore::create(&keystore).unwrap();
        }
        let store: Arc<dyn Store> = Arc::from(
            medfed_infra::store::open(medfed_infra::store::Backend::DEFAULT, &dir.join("db"))
                .unwrap(),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(super::super::run(cfg, store.clone(), &keystore))
            .unwrap();
        store
    }

    #[test]
    fn quarantined_records_are_listed_with_reason_field_and_pseudonym_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = pipeline(dir.path(), false);
        let store = ingest(dir.path(), &cfg);
        let listed = list(std::slice::from_ref(&cfg), &*store).unwrap();
        let keys = crate::deid::pseudonym::Keystore::open(&dir.path().join("keystore.toml"))
            .unwrap()
            .pseudonymizer();
        assert_eq!(
            listed,
            [
                Quarantined {
                    stream: "extract".into(),
                    partition: 0,
                    offset: 1,
                    rejection: Rejection::new(
                        "the row has 4 fields; the header has 3 (a comma outside double quotes?)"
                    ),
                },
                Quarantined {
                    stream: "extract".into(),
                    partition: 0,
                    offset: 2,
                    rejection: Rejection::in_field("glu", "not a number")
                        .with_patient(Some(keys.pseudonym("MRN-3"))),
                },
            ]
        );
        assert!(
            !dir.path().join("stewards").exists(),
            "raw rejects are opt-in"
        );
    }

    #[test]
    fn raw_rejects_go_to_an_owner_only_file_when_asked_for() {
        medfed_infra::files::set_umask(0o022);
        let dir = tempfile::tempdir().unwrap();
        let cfg = pipeline(dir.path(), true);
        let store = ingest(dir.path(), &cfg);
        let path = dir.path().join("stewards/rejects.csv");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "stream,partition,offset,line\n\
             extract,0,1,\"MRN-2,7 Bletchley Park, Unit 4,99\"\n\
             extract,0,2,\"MRN-3,2 Low Rd,abc\"\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!((mode(&path), mode(path.parent().unwrap())), (0o600, 0o700));
        }
        // The dead letters themselves still hold no value. (A random
        // pseudonym's hex can contain "abc", so the value is looked for as a
        // whole quoted string or inside a reason, never as a bare substring.)
        let listed = list(std::slice::from_ref(&cfg), &*store).unwrap();
        let text = format!("{listed:?}");
        assert!(
            !text.contains("Bletchley") && !text.contains("\"abc\""),
            "{text}"
        );
        assert!(
            listed.iter().all(|q| !q.rejection.reason.contains("abc")),
            "{text}"
        );
    }

    #[test]
    fn dead_letters_an_earlier_medfed_wrote_as_text_lose_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = pipeline(dir.path(), false);
        let store = ingest(dir.path(), &cfg);
        let mut b = Batch::default();
        b.put(
            "dead-letter/extract/0",
            &7u64.to_be_bytes(),
            b"column 'glu': not a number (value \"MRN-9 Ada Lovelace\")",
        )
        .unwrap();
        store.commit(b).unwrap();
        assert_eq!(scrub_earlier(&cfg, &*store).unwrap(), 1);
        assert_eq!(scrub_earlier(&cfg, &*store).unwrap(), 0);
        let stored = store.scan("dead-letter/extract/0").unwrap();
        let all: Vec<u8> = stored.iter().flat_map(|(_, v)| v.clone()).collect();
        assert!(!String::from_utf8_lossy(&all).contains("Lovelace"));
        let listed = list(std::slice::from_ref(&cfg), &*store).unwrap();
        let old = listed.iter().find(|q| q.offset == 7).unwrap();
        assert_eq!(old.rejection.field.as_deref(), Some("glu"));
        assert_eq!(old.rejection.reason, Rejection::EARLIER);
    }

    #[cfg(not(feature = "jetstream"))]
    #[test]
    fn a_jetstream_source_outside_a_jetstream_build_names_the_feature() {
        let cfg: IngestConfig = toml::from_str(
            "stream = \"lab\"\ncolumns = [\"glu\"]\n[jetstream]\nurl = \"nats://127.0.0.1:4222\"\n\
             stream = \"medfed\"\nsubject_prefix = \"medfed.lab\"\npartitions = 2\n",
        )
        .unwrap();
        let why = cfg.validate().unwrap_err();
        assert!(why.contains("cargo feature `jetstream`"), "{why}");
        assert!(parts(&cfg).is_err());
    }
}
