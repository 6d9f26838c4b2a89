//! The node's FHIR R4 NDJSON connector (`medfed_node::runtime::fhir_source::records`, what
//! `fhir_source::read` streams) on arbitrary bytes: the input is the export's three files,
//! `Patient.ndjson`, `Observation.ndjson` and `Condition.ndjson`, cut at NUL bytes, read
//! with the Pima mapping of examples/data/pima_fhir (LOINC and SNOMED codes to columns).
//!
//! Properties: an error names the file and a line of it; otherwise there is one record per
//! patient line, each a CSV row of the mapping's columns (numbers or empty, then Yes or
//! No), and each goes through an ingestion pipeline as the CSV rows do (kept or
//! quarantined, see `medfed_fuzz::pipeline`).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use medfed_fuzz::pipeline::Pipeline;
use medfed_node::runtime::csv_row::Splitter;
use medfed_node::runtime::fhir_source::{
    CONDITIONS, CodedColumn, FhirError, FhirMapping, OBSERVATIONS, PATIENTS, header, records,
};

fn pima_mapping() -> FhirMapping {
    let coded = |column: &str, system: &str, code: &str| CodedColumn {
        column: column.into(),
        system: system.into(),
        code: code.into(),
    };
    let loinc = "http://loinc.org";
    let local = "urn:medfed:example";
    FhirMapping {
        features: vec![
            coded("npreg", loinc, "11996-6"),
            coded("glu", loinc, "2345-7"),
            coded("bp", loinc, "8462-4"),
            coded("skin", local, "triceps-skinfold"),
            coded("bmi", loinc, "39156-5"),
            coded("ped", local, "diabetes-pedigree"),
            coded("age", loinc, "30525-0"),
        ],
        target: Some(coded("type", "http://snomed.info/sct", "44054006")),
    }
}

fn line_count(bytes: &[u8]) -> usize {
    bytes.split(|b| *b == b'\n').count()
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let patients = parts.next().unwrap_or_default();
    let observations = parts.next();
    let conditions = parts.next();
    let dir = Path::new("export");
    let mapping = pima_mapping();
    let result = records(dir, &mapping, Some(patients), observations, conditions);
    let rows = match result {
        Ok(rows) => rows,
        Err(FhirError::Bad { path, line, why }) => {
            let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
            let content = match file {
                PATIENTS => patients,
                OBSERVATIONS => observations.unwrap_or_default(),
                CONDITIONS => conditions.unwrap_or_default(),
                other => panic!("an error names '{other}'"),
            };
            assert_eq!(path.parent(), Some(dir));
            assert!(
                line >= 1 && line <= line_count(content),
                "line {line} of {file}: {why}"
            );
            assert!(!why.is_empty());
            return;
        }
        Err(e) => panic!("reading from memory failed: {e}"),
    };
    let patient_lines = patients
        .split(|b| *b == b'\n')
        .filter(|l| std::str::from_utf8(l).map_or(true, |s| !s.trim().is_empty()))
        .count();
    assert_eq!(rows.len(), patient_lines, "a record per patient line");
    let columns = header(&mapping);
    let mut splitter = Splitter::new();
    let mut pipeline = Pipeline::new(&columns);
    for row in rows.iter().take(64) {
        let fields = splitter
            .row(row, columns.len())
            .expect("a record is a CSV row");
        assert_eq!(fields.len(), columns.len());
        for i in 0..columns.len() - 1 {
            let f = fields.get(i).expect("a field");
            assert!(
                f.is_empty() || f.parse::<f64>().is_ok_and(f64::is_finite),
                "feature {i} is {f:?}"
            );
        }
        assert!(matches!(fields.get(columns.len() - 1), Some("Yes" | "No")));
        pipeline.feed(row, None);
    }
});
