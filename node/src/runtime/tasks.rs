//! Built-in tasks.

use super::{
    Envelope, KvState, MessageCollector, Record, Rejection, StreamTask, TaskCoordinator, TaskError,
};

/// Count, sum and sum of squares of chosen numeric columns of CSV rows: the statistics a
/// study's standardization needs. A row with a missing or non-numeric value in a chosen
/// column is quarantined with the column (not the value), and so is a row with more fields
/// than the header.
pub struct ColumnStats {
    /// (index in the row, column name) of each chosen column.
    columns: Vec<(usize, String)>,
    /// The header's number of columns (CSV rows).
    width: usize,
    splitter: super::csv_row::Splitter,
    count: u64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    values: Vec<f64>,
    /// Reading de-identified records (`crate::deid::Record`) rather than CSV rows.
    records: bool,
    /// The chosen fields of records.
    slots: Vec<super::record::FieldSlot>,
    /// Records left out for want of a number in a chosen field.
    skipped: u64,
}

impl ColumnStats {
    /// Tracks `chosen` columns of rows with `header`; a chosen column missing from the
    /// header is an error naming it.
    pub fn new(header: &[String], chosen: &[&str]) -> Result<ColumnStats, TaskError> {
        let columns = chosen
            .iter()
            .map(|c| {
                header
                    .iter()
                    .position(|h| h == c)
                    .map(|i| (i, c.to_string()))
                    .ok_or_else(|| TaskError {
                        task: "column-stats".into(),
                        detail: format!("no column named '{c}' (columns: {})", header.join(", ")),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = columns.len();
        Ok(ColumnStats {
            columns,
            width: header.len(),
            splitter: super::csv_row::Splitter::new(),
            count: 0,
            sum: vec![0.0; n],
            sum_sq: vec![0.0; n],
            values: vec![0.0; n],
            records: false,
            slots: Vec::new(),
            skipped: 0,
        })
    }

    /// Tracks `chosen` fields of the records a de-identification pipeline produces. A
    /// record without a number in a chosen field is left out of the statistics (it was
    /// kept, as its missing-value policy said) and counted under `skipped`.
    pub fn over_records(chosen: &[&str]) -> ColumnStats {
        let n = chosen.len();
        ColumnStats {
            columns: chosen
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.to_string()))
                .collect(),
            width: n,
            splitter: super::csv_row::Splitter::new(),
            count: 0,
            sum: vec![0.0; n],
            sum_sq: vec![0.0; n],
            values: vec![0.0; n],
            records: true,
            slots: chosen
                .iter()
                .map(|c| super::record::FieldSlot::new(c))
                .collect(),
            skipped: 0,
        }
    }

    /// (count, sums, sums of squares) from a state.
    pub fn read(state: &KvState, columns: usize) -> (u64, Vec<f64>, Vec<f64>) {
        let f = |k: String| {
            state
                .get(k.as_bytes())
                .and_then(|v| v.try_into().ok())
                .map_or(0.0, f64::from_be_bytes)
        };
        let sums = (0..columns).map(|j| f(format!("sum/{j}"))).collect();
        let squares = (0..columns).map(|j| f(format!("sum_sq/{j}"))).collect();
        (state.get_u64(b"count"), sums, squares)
    }
}

impl ColumnStats {
    fn add_values(&mut self) {
        self.count += 1;
        for (j, v) in self.values.iter().enumerate() {
            self.sum[j] += v;
            self.sum_sq[j] += v * v;
        }
    }
}

impl StreamTask for ColumnStats {
    fn init(&mut self, state: &mut KvState) -> Result<(), TaskError> {
        (self.count, self.sum, self.sum_sq) = ColumnStats::read(state, self.columns.len());
        self.skipped = state.get_u64(b"skipped");
        Ok(())
    }

    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        if self.records {
            return match crate::deid::Record::decode(&env.payload) {
                Ok(r) => self.process_record(env, r, state, out, _coord),
                Err(e) => {
                    out.dead_letter(env, e);
                    Ok(())
                }
            };
        }
        let fields = match self.splitter.row(&env.payload, self.width) {
            Ok(f) => f,
            Err(why) => {
                out.dead_letter(env, why);
                return Ok(());
            }
        };
        for (slot, (i, name)) in self.columns.iter().enumerate() {
            let raw = fields.get(*i).map_or("", str::trim);
            match raw.parse::<f64>() {
                Ok(v) if v.is_finite() => self.values[slot] = v,
                _ => {
                    out.dead_letter(env, Rejection::in_field(name, "not a number"));
                    return Ok(());
                }
            }
        }
        self.add_values();
        Ok(())
    }

    /// Counts the record (de-identified records only: a record has no CSV row) and passes
    /// it on.
    fn process_record(
        &mut self,
        env: &Envelope,
        record: Record,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        if !self.records {
            out.dead_letter(env, "column statistics of CSV rows cannot read a record");
            return Ok(());
        }
        let mut all = true;
        for (slot, field) in self.slots.iter().enumerate() {
            match record.number_slot(field) {
                Some(v) if v.is_finite() => self.values[slot] = v,
                _ => {
                    all = false;
                    break;
                }
            }
        }
        if all {
            self.add_values();
        } else {
            self.skipped += 1;
        }
        out.send_record(super::NEXT, record);
        Ok(())
    }

    fn flush(&mut self, state: &mut KvState) {
        if self.records {
            state.put_u64(b"skipped", self.skipped);
        }
        state.put_u64(b"count", self.count);
        for j in 0..self.columns.len() {
            state.put(
                format!("sum/{j}").as_bytes(),
                self.sum[j].to_be_bytes().to_vec(),
            );
            state.put(
                format!("sum_sq/{j}").as_bytes(),
                self.sum_sq[j].to_be_bytes().to_vec(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use medfed_infra::store::{self, Backend};

    use super::super::{RunOptions, csv_source, restore, run_partition};
    use super::*;

    fn csv(dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("site.csv");
        let mut text = String::from("glu,bmi,type\n");
        for i in 0..1000 {
            if i == 500 {
                text.push_str("NA,30.1,No\n");
            } else {
                text.push_str(&format!("{},{}.5,Yes\n", 80 + i % 100, 20 + i % 15));
            }
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run(
        store: Arc<dyn store::Store>,
        path: &std::path::Path,
        commit_every: u64,
    ) -> super::super::PartitionReport {
        let (offset, ..) = restore(&*store, "site", 0).unwrap();
        let (header, rx) = csv_source::read(path, "site", 0, offset).unwrap();
        let task = ColumnStats::new(&header, &["glu", "bmi"]).unwrap();
        run_partition(
            Box::new(task),
            store,
            "site",
            0,
            rx,
            &RunOptions {
                commit_every,
                window: None,
                signals: None,
                checkpoint_when_idle: false,
                caught_up: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn bad_rows_are_quarantined_with_the_reason_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = csv(dir.path());
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let report = run(store.clone(), &path, 100);
        assert_eq!(
            (report.offset, report.processed, report.quarantined),
            (1000, 1000, 1)
        );
        let (.., state, _, _) = restore(&*store, "site", 0).unwrap();
        let (count, sum, _) = ColumnStats::read(&state, 2);
        assert_eq!(count, 999);
        let want: f64 = (0..1000)
            .filter(|i| *i != 500)
            .map(|i| f64::from(80 + i % 100))
            .sum();
        assert_eq!(sum[0], want);
        let dead = store.scan("dead-letter/site/0").unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 500u64.to_be_bytes().to_vec());
        // The field and the reason, not the value.
        assert_eq!(
            String::from_utf8_lossy(&dead[0].1),
            r#"{"reason":"not a number","field":"glu","patient":null}"#
        );
        // Running again reads nothing new and changes nothing.
        let again = run(store.clone(), &path, 100);
        assert_eq!((again.offset, again.processed), (1000, 1000));
        let (.., state, _, _) = restore(&*store, "site", 0).unwrap();
        assert_eq!(ColumnStats::read(&state, 2).0, 999);
    }

    #[test]
    fn a_row_with_more_fields_than_the_header_is_quarantined_not_shifted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.csv");
        // Row 1 has a decimal comma: read by position, 30 would be counted as bmi.
        std::fs::write(
            &path,
            "glu,bmi,type\n99,30.5,No\n101,30,5,Yes\n\"102\",31.5,No\n",
        )
        .unwrap();
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let report = run(store.clone(), &path, 100);
        assert_eq!((report.processed, report.quarantined), (3, 1));
        let (.., state, _, _) = restore(&*store, "site", 0).unwrap();
        assert_eq!(ColumnStats::read(&state, 2).1, vec![201.0, 62.0]);
        let dead = store.scan("dead-letter/site/0").unwrap();
        assert_eq!(dead[0].0, 1u64.to_be_bytes().to_vec());
        assert_eq!(
            Rejection::decode(&dead[0].1),
            Rejection::new(
                "the row has 4 fields; the header has 3 (a comma outside double quotes?)"
            )
        );
    }

    /// The first field of a CSV row, as a number.
    fn first_number(row: &[u8]) -> Option<f64> {
        let mut splitter = super::super::csv_row::Splitter::new();
        let first = splitter.field(row, 0)?;
        std::str::from_utf8(first).ok()?.trim().parse().ok()
    }

    /// Passes on rows whose first column is above 100.
    struct HighFirst;

    impl StreamTask for HighFirst {
        fn process(
            &mut self,
            env: &Envelope,
            _: &mut KvState,
            out: &mut MessageCollector,
            _: &mut TaskCoordinator,
        ) -> Result<(), TaskError> {
            if first_number(&env.payload).is_some_and(|v| v > 100.0) {
                out.send(super::super::NEXT, env.payload.clone());
            }
            Ok(())
        }
    }

    #[test]
    fn a_chain_feeds_one_task_into_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = csv(dir.path());
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let (header, rx) = csv_source::read(&path, "site", 0, 0).unwrap();
        let chain = super::super::Chain::new(vec![
            Box::new(HighFirst),
            Box::new(ColumnStats::new(&header, &["glu", "bmi"]).unwrap()),
        ]);
        let report = run_partition(
            Box::new(chain),
            store.clone(),
            "site",
            0,
            rx,
            &RunOptions::default(),
        )
        .unwrap();
        assert_eq!(report.processed, 1000);
        let (.., state, _, _) = restore(&*store, "site", 0).unwrap();
        let want = (0..1000)
            .filter(|i| *i != 500 && 80 + i % 100 > 100)
            .count() as u64;
        assert_eq!(ColumnStats::read(&state, 2).0, want);
    }

    /// Sends an alert for every row whose first column is above 170.
    struct Alerts;

    impl StreamTask for Alerts {
        fn process(
            &mut self,
            env: &Envelope,
            _: &mut KvState,
            out: &mut MessageCollector,
            _: &mut TaskCoordinator,
        ) -> Result<(), TaskError> {
            let line = String::from_utf8_lossy(&env.payload).into_owned();
            if first_number(&env.payload).is_some_and(|v| v > 170.0) {
                out.send(
                    "alerts",
                    format!("glucose above 170 mg/dL: {line}").into_bytes(),
                );
            }
            Ok(())
        }
    }

    #[test]
    fn records_sent_to_an_output_stream_are_kept_with_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = csv(dir.path());
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let (_, rx) = csv_source::read(&path, "site", 0, 0).unwrap();
        run_partition(
            Box::new(Alerts),
            store.clone(),
            "site",
            0,
            rx,
            &RunOptions::default(),
        )
        .unwrap();
        let alerts = store.scan("output/alerts/site/0").unwrap();
        let want = (0..1000)
            .filter(|i| *i != 500 && 80 + i % 100 > 170)
            .count();
        assert_eq!(alerts.len(), want);
        assert!(String::from_utf8_lossy(&alerts[0].1).starts_with("glucose above 170 mg/dL: 171,"));
    }

    /// Keeps every envelope's row as a record, and one summary record at the end of input.
    struct KeepWithSummary;

    impl StreamTask for KeepWithSummary {
        fn process(
            &mut self,
            env: &Envelope,
            _: &mut KvState,
            out: &mut MessageCollector,
            _: &mut TaskCoordinator,
        ) -> Result<(), TaskError> {
            let mut r = super::super::record::Record::default();
            r.set(
                "offset",
                super::super::record::Value::Number(env.offset as f64),
            );
            out.send_record("kept", r);
            Ok(())
        }
        fn on_end_of_stream(
            &mut self,
            _: &mut KvState,
            out: &mut MessageCollector,
        ) -> Result<(), TaskError> {
            let mut r = super::super::record::Record::default();
            r.set("summary", super::super::record::Value::Number(1.0));
            out.send_record("kept", r);
            Ok(())
        }
    }

    #[test]
    fn records_kept_at_the_same_offset_by_two_runs_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = csv(dir.path());
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        // Two runs over the same file: the second has no new row, and keeps its summary at
        // the same offset as the first's summary.
        for _ in 0..2 {
            let (offset, ..) = restore(&*store, "site", 0).unwrap();
            let (_, rx) = csv_source::read(&path, "site", 0, offset).unwrap();
            let opts = RunOptions {
                // 1,000 rows: the first run ends on a checkpoint, so its summary starts a
                // segment at offset 1000, as the second run's does.
                commit_every: 100,
                ..RunOptions::default()
            };
            run_partition(
                Box::new(KeepWithSummary),
                store.clone(),
                "site",
                0,
                rx,
                &opts,
            )
            .unwrap();
        }
        let values = store.scan("output/kept/site/0").unwrap();
        let records =
            super::super::record::decode_chunked(values.iter().map(|(_, v)| v.as_slice())).unwrap();
        let rows = records.iter().filter(|r| r.get("offset").is_some()).count();
        let summaries = records
            .iter()
            .filter(|r| r.get("summary").is_some())
            .count();
        assert_eq!(
            (rows, summaries),
            (1000, 2),
            "every row once, both summaries"
        );
        let offsets: Vec<f64> = records.iter().filter_map(|r| r.number("offset")).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in input order");
    }

    /// Asks every task of the pipeline to stop at its first envelope.
    struct StopAll;

    impl StreamTask for StopAll {
        fn process(
            &mut self,
            _: &Envelope,
            _: &mut KvState,
            _: &mut MessageCollector,
            c: &mut TaskCoordinator,
        ) -> Result<(), TaskError> {
            c.shutdown(super::super::Scope::AllTasks);
            Ok(())
        }
    }

    #[test]
    fn an_all_tasks_shutdown_stops_every_partition() {
        use super::super::csv_source::{CsvOptions, Partitioning, read_with};
        let dir = tempfile::tempdir().unwrap();
        let path = csv(dir.path());
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let signals = Arc::new(super::super::PipelineSignals::default());
        let opts = RunOptions {
            commit_every: 100,
            window: None,
            signals: Some(signals),
            checkpoint_when_idle: false,
            caught_up: None,
        };
        // Partitions 1 and 2 follow their file: without the signal they would never end.
        let mut runs = Vec::new();
        for p in 1..3u32 {
            let (header, rx) = read_with(
                &path,
                "site",
                p,
                0,
                &CsvOptions {
                    partitioning: Partitioning::Whole,
                    follow: true,
                },
            )
            .unwrap();
            let (store, opts) = (store.clone(), opts.clone());
            let task = ColumnStats::new(&header, &["glu"]).unwrap();
            runs.push(std::thread::spawn(move || {
                run_partition(Box::new(task), store, "site", p, rx, &opts).unwrap()
            }));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (_, rx) = read_with(
            &path,
            "site",
            0,
            0,
            &CsvOptions {
                partitioning: Partitioning::Whole,
                follow: true,
            },
        )
        .unwrap();
        let first = run_partition(Box::new(StopAll), store.clone(), "site", 0, rx, &opts).unwrap();
        assert!(first.shut_down);
        for r in runs {
            let report = r.join().unwrap();
            assert!(report.shut_down, "{report:?}");
        }
    }

    #[test]
    fn a_missing_column_is_named() {
        let err = ColumnStats::new(&["a".into(), "b".into()], &["glu"])
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("no column named 'glu' (columns: a, b)"),
            "{err}"
        );
    }

    #[test]
    fn a_source_that_fails_stops_its_partition_with_an_error_not_as_at_its_end() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn store::Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let signals = Arc::new(super::super::PipelineSignals::default());
        let caught_up = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let stream: Arc<str> = "db".into();
        let batch: Vec<super::super::Envelope> = (0..30u64)
            .map(|i| super::super::Envelope {
                stream: stream.clone(),
                partition: 0,
                offset: 10 + i,
                key: None,
                payload: format!("{}", 100 + i).into_bytes(),
            })
            .collect();
        tx.send(batch).unwrap();
        // Partition 1 has its own source, which does not end (a followed file).
        let (_tx1, rx1) = std::sync::mpsc::sync_channel::<Vec<super::super::Envelope>>(4);
        signals.source_failure(&[1]);
        let other = {
            let (store, signals) = (store.clone(), signals.clone());
            std::thread::spawn(move || {
                let task = ColumnStats::new(&["glu".to_string()], &["glu"]).unwrap();
                run_partition(
                    Box::new(task),
                    store,
                    "db",
                    1,
                    rx1,
                    &RunOptions {
                        signals: Some(signals),
                        ..RunOptions::default()
                    },
                )
            })
        };
        // Partition 0's source records its failure, then its channel closes.
        signals
            .source_failure(&[0])
            .fail("the database went away".into());
        drop(tx);
        let task = ColumnStats::new(&["glu".to_string()], &["glu"]).unwrap();
        let err = run_partition(
            Box::new(task),
            store.clone(),
            "db",
            0,
            rx,
            &RunOptions {
                commit_every: 1000,
                window: None,
                signals: Some(signals),
                checkpoint_when_idle: false,
                caught_up: Some(caught_up.clone()),
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the database went away (stopped at offset 40, which the checkpoint holds; a new run resumes there)"
        );
        assert!(
            !caught_up.load(Ordering::Relaxed),
            "a failed source is not caught up"
        );
        // What was processed before the failure is checkpointed.
        let (offset, _, processed, _) = restore(&*store, "db", 0).unwrap();
        assert_eq!((offset, processed), (40, 30));
        // The other partition stops (its input never ends), without an error of its own:
        // the pipeline's error reaches the operator at once.
        let report = other.join().unwrap().unwrap();
        assert!(report.shut_down);
    }
}
