//! The node's two CSV paths on arbitrary bytes:
//!
//! - an extract row by row through an ingestion pipeline (`medfed_node::ingest::build_task`
//!   with declared fields: validate and clean with the one CSV splitter of ingestion,
//!   de-identify, features, keep), as `csv_source` hands its rows over: every row is kept
//!   or quarantined, a quarantined row blames a declared field and never quotes the
//!   patient's identifier, a kept row is de-identified (see `medfed_fuzz::pipeline`);
//! - the whole input as a dataset file (`medfed_node::data::Table`, the csv crate), then a
//!   study's rows from it (`StudyData::prepare`): an error names the file, and a bad value
//!   its line and column, and what the aggregator is told of it never quotes the value.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use medfed_fuzz::pipeline::Pipeline;
use medfed_node::data::{DataError, StudyData, Table};
use medfed_node::runtime::csv_row::Splitter;

const HEADER: [&str; 9] = [
    "mrn", "npreg", "glu", "bp", "skin", "bmi", "ped", "age", "type",
];

fn extract(data: &[u8]) {
    let header: Vec<String> = HEADER.iter().map(|s| s.to_string()).collect();
    let mut pipeline = Pipeline::new(&header);
    let mut splitter = Splitter::new();
    // As csv_source cuts them: at '\n', without a trailing '\r'.
    for line in data.split(|b| *b == b'\n').take(64) {
        let row = line.strip_suffix(b"\r").unwrap_or(line);
        // The splitter's direct paths split as the CSV state machine does (a lone '\r'
        // inside a row is the one case the unquoted path keeps as data).
        if !row.contains(&b'\r') {
            let direct: Vec<Vec<u8>> = (0..)
                .map_while(|i| splitter.field(row, i).map(<[u8]>::to_vec))
                .collect();
            assert_eq!(direct, state_machine_fields(row), "{row:?}");
        }
        let mrn = splitter
            .field(row, 0)
            .and_then(|f| std::str::from_utf8(f).ok())
            .map(|s| s.trim().to_string());
        pipeline.feed(row, mrn.as_deref());
    }
}

/// One row's fields as `csv_core`'s state machine reads them.
fn state_machine_fields(row: &[u8]) -> Vec<Vec<u8>> {
    use csv_core::ReadRecordResult as R;
    let mut reader = csv_core::Reader::new();
    let (mut out, mut ends) = (vec![0u8; row.len() + 1], vec![0usize; row.len() + 2]);
    let (mut input, mut nout, mut nend) = (row, 0, 0);
    let fields = loop {
        let (res, nin, o, e) = reader.read_record(input, &mut out[nout..], &mut ends[nend..]);
        input = &input[nin..];
        nout += o;
        nend += e;
        match res {
            R::InputEmpty => {}
            R::OutputFull | R::OutputEndsFull => unreachable!("buffers as long as the row"),
            R::Record => break nend,
            R::End => break 0,
        }
    };
    (0..fields)
        .map(|i| out[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec())
        .collect()
}

fn dataset(data: &[u8]) {
    let path = Path::new("site/pima.csv");
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let study = medfed_fuzz::pima_announcement("fuzz", &["glu", "bmi", "age"], false);
    let table = match Table::from_reader(path, data) {
        Ok(t) => t,
        Err(e) => {
            assert!(e.to_string().starts_with("site/pima.csv"), "{e}");
            return;
        }
    };
    match StudyData::prepare(&table, &study) {
        Ok(d) => {
            let rows = d.x_train.nrows() + d.x_val.nrows();
            assert_eq!(rows, table.len());
            assert_eq!(d.y_train.len(), d.x_train.nrows());
            assert!(
                d.x_train
                    .iter()
                    .chain(d.x_val.iter())
                    .all(|x| x.is_finite())
            );
            assert!(d.y_train.iter().all(|y| *y == 0.0 || *y == 1.0));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("site/pima.csv"), "{text}");
            let public = e.public_reason();
            assert!(!public.contains("site/pima.csv"), "{public}");
            match &e {
                DataError::BadValue {
                    line, column, why, ..
                } => {
                    let why = *why;
                    assert!(
                        *line >= 2 && *line <= lines,
                        "line {line} of {lines}: {text}"
                    );
                    assert!(
                        study.features.contains(column) || *column == study.target,
                        "column {column}"
                    );
                    assert!(text.contains(&format!("line {line}, column '{column}'")));
                    // The aggregator's copy says which column and what is wrong, never
                    // the value, the line or the file: it is the same without them.
                    let blank = DataError::BadValue {
                        path: Default::default(),
                        line: 0,
                        column: column.clone(),
                        value: String::new(),
                        why,
                    };
                    assert_eq!(public, blank.public_reason(), "the aggregator is told more");
                }
                DataError::MissingColumn { column, .. } => {
                    assert!(study.features.contains(column) || *column == study.target);
                }
                _ => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    extract(data);
    dataset(data);
});
