//! The FHIR R4 NDJSON connector (a Bulk Data export: `Patient.ndjson`,
//! `Observation.ndjson`, `Condition.ndjson`). A mapping turns coded observations into
//! feature columns (e.g. LOINC 2345-7 glucose → `glu`) and a condition into the target; each
//! patient becomes one record, emitted as a CSV row with the mapping's columns, so the same
//! tasks serve CSV and FHIR inputs. A patient's offset is its position in `Patient.ndjson`.
//!
//! Bulk exports are grouped by resource type, not by patient: the observations are joined in
//! memory (one value per feature per patient), which suits site extracts of up to a few
//! million observations.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use serde::{Deserialize, Serialize};

use super::Envelope;

/// How FHIR resources map to a record's columns.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FhirMapping {
    /// Observation codes to feature columns, in column order.
    pub features: Vec<CodedColumn>,
    /// The target column: "Yes" when the patient has a Condition with this code, else "No".
    pub target: Option<CodedColumn>,
}

/// A column filled from FHIR resources with one code.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodedColumn {
    /// The column's name.
    pub column: String,
    /// The code's system, e.g. `http://loinc.org`.
    pub system: String,
    /// The code, e.g. `2345-7` (glucose).
    pub code: String,
}

/// Why a FHIR export could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FhirError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A line is not a resource medfed can read.
    #[error("{path}, line {line}: {why}")]
    Bad {
        /// The NDJSON file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
}

#[derive(Deserialize)]
struct Coding {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct CodeableConcept {
    #[serde(default)]
    coding: Vec<Coding>,
}

#[derive(Deserialize)]
struct Reference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct Quantity {
    value: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    resource_type: String,
    id: Option<String>,
    code: Option<CodeableConcept>,
    subject: Option<Reference>,
    value_quantity: Option<Quantity>,
}

/// The export file of Patient resources the connector reads, in its directory.
pub const PATIENTS: &str = "Patient.ndjson";
/// The export file of Observation resources.
pub const OBSERVATIONS: &str = "Observation.ndjson";
/// The export file of Condition resources.
pub const CONDITIONS: &str = "Condition.ndjson";

/// Opens one export file; a missing one has no resources.
fn open(path: &Path) -> Result<Option<std::io::BufReader<std::fs::File>>, FhirError> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(std::io::BufReader::new(f))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FhirError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The resources of one NDJSON file (`path` names it in errors), each with its line
/// number; blank lines are skipped. A line that is not UTF-8 text or not a resource is an
/// error naming the file and the line.
fn lines(path: &Path, reader: Option<impl BufRead>) -> Result<Vec<(usize, Resource)>, FhirError> {
    let Some(mut reader) = reader else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for i in 1.. {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| FhirError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        let bad = |why: String| FhirError::Bad {
            path: path.to_path_buf(),
            line: i,
            why,
        };
        let line = std::str::from_utf8(&buf).map_err(|_| bad("not UTF-8 text".into()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Resource =
            serde_json::from_str(line).map_err(|e| bad(format!("not a FHIR resource: {e}")))?;
        out.push((i, r));
    }
    Ok(out)
}

fn matches(c: Option<&CodeableConcept>, col: &CodedColumn) -> bool {
    c.is_some_and(|c| {
        c.coding.iter().any(|k| {
            k.system.as_deref() == Some(&col.system) && k.code.as_deref() == Some(&col.code)
        })
    })
}

fn subject(r: &Resource) -> Option<&str> {
    r.subject
        .as_ref()?
        .reference
        .as_deref()?
        .strip_prefix("Patient/")
}

/// The header of the records this mapping produces.
pub fn header(mapping: &FhirMapping) -> Vec<String> {
    mapping
        .features
        .iter()
        .chain(&mapping.target)
        .map(|c| c.column.clone())
        .collect()
}

/// Joins an export into records: one per line of the patients' file, in its order, as the
/// CSV row of the mapping's columns (a feature a patient has no observation for is left
/// empty: the task decides, quarantine or impute). `dir` names the files in errors; each
/// reader is that file's content (none: the file is missing). Conditions are read only
/// when the mapping has a target.
pub fn records(
    dir: &Path,
    mapping: &FhirMapping,
    patients: Option<impl BufRead>,
    observations: Option<impl BufRead>,
    conditions: Option<impl BufRead>,
) -> Result<Vec<Vec<u8>>, FhirError> {
    let patients = lines(&dir.join(PATIENTS), patients)?;
    let index: HashMap<String, usize> = patients
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| r.resource_type == "Patient")
        .filter_map(|(i, (_, r))| r.id.clone().map(|id| (id, i)))
        .collect();
    let width = mapping.features.len();
    let mut values: Vec<Vec<Option<f64>>> = vec![vec![None; width]; patients.len()];
    let mut target = vec![false; patients.len()];
    let obs_path = dir.join(OBSERVATIONS);
    for (line, r) in lines(&obs_path, observations)? {
        if r.resource_type != "Observation" {
            continue;
        }
        let Some(col) = mapping
            .features
            .iter()
            .position(|c| matches(r.code.as_ref(), c))
        else {
            continue;
        };
        let Some(&p) = subject(&r).and_then(|s| index.get(s)) else {
            return Err(FhirError::Bad {
                path: obs_path,
                line,
                why: "an observation of an unknown patient".into(),
            });
        };
        let v = r
            .value_quantity
            .as_ref()
            .and_then(|q| q.value)
            .ok_or(FhirError::Bad {
                path: obs_path.clone(),
                line,
                why: format!(
                    "the '{}' observation has no valueQuantity.value",
                    mapping.features[col].column
                ),
            })?;
        values[p][col] = Some(v);
    }
    if let Some(t) = &mapping.target {
        for (_, r) in lines(&dir.join(CONDITIONS), conditions)? {
            if r.resource_type == "Condition"
                && matches(r.code.as_ref(), t)
                && let Some(&p) = subject(&r).and_then(|s| index.get(s))
            {
                target[p] = true;
            }
        }
    }
    let has_target = mapping.target.is_some();
    Ok(values
        .into_iter()
        .zip(target)
        .map(|(vals, t)| {
            let mut row: Vec<String> = vals
                .iter()
                .map(|v| v.map_or(String::new(), |v| v.to_string()))
                .collect();
            if has_target {
                row.push(if t { "Yes" } else { "No" }.to_string());
            }
            row.join(",").into_bytes()
        })
        .collect())
}

/// [`records`] of the export's files in `dir` (Conditions read only for a target).
fn export_rows(dir: &Path, mapping: &FhirMapping) -> Result<Vec<Vec<u8>>, FhirError> {
    let conditions = match &mapping.target {
        Some(_) => open(&dir.join(CONDITIONS))?,
        None => None,
    };
    records(
        dir,
        mapping,
        open(&dir.join(PATIENTS))?,
        open(&dir.join(OBSERVATIONS))?,
        conditions,
    )
}

/// The export in `dir` as a table: a header (the mapping's columns, then its target's) and
/// one row per line of `Patient.ndjson` ([`records`]), with each row's Patient id (empty
/// for a line that is not a Patient), for scoring the export with a model.
pub fn table(dir: &Path, mapping: &FhirMapping) -> Result<(String, Vec<String>), FhirError> {
    let rows = export_rows(dir, mapping)?;
    let ids: Vec<String> = lines(&dir.join(PATIENTS), open(&dir.join(PATIENTS))?)?
        .into_iter()
        .map(|(_, r)| {
            if r.resource_type == "Patient" {
                r.id.unwrap_or_default()
            } else {
                String::new()
            }
        })
        .collect();
    // The header through the csv crate (a column name may need quoting); the rows are
    // numbers and Yes/No, as `records` makes them.
    let mut header = csv::Writer::from_writer(Vec::new());
    header
        .write_record(
            mapping
                .features
                .iter()
                .chain(mapping.target.as_ref())
                .map(|c| c.column.as_str()),
        )
        .and_then(|()| header.flush().map_err(csv::Error::from))
        .map_err(|e| FhirError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let mut csv = String::from_utf8_lossy(header.get_ref()).into_owned();
    for row in rows {
        if row.is_empty() {
            // One empty field: a blank line would be skipped, and the rows after it moved
            // onto the wrong patients.
            csv.push_str("\"\"");
        } else {
            csv.push_str(&String::from_utf8_lossy(&row));
        }
        csv.push('\n');
    }
    Ok((csv, ids))
}

/// Joins the export in `dir` into records ([`records`]) and streams those from patient
/// `from` on.
pub fn read(
    dir: &Path,
    mapping: &FhirMapping,
    stream: &str,
    partition: u32,
    from: u64,
) -> Result<(Vec<String>, Receiver<Vec<Envelope>>), FhirError> {
    let rows = export_rows(dir, mapping)?;
    let (tx, rx) = sync_channel(16);
    let stream: Arc<str> = stream.into();
    std::thread::spawn(move || {
        let mut batch = Vec::new();
        for (i, payload) in rows.into_iter().enumerate().skip(from as usize) {
            batch.push(Envelope {
                stream: stream.clone(),
                partition,
                offset: i as u64,
                key: None,
                payload,
            });
            if batch.len() == 1024 && tx.send(std::mem::take(&mut batch)).is_err() {
                return;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(batch);
        }
    });
    Ok((header(mapping), rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pima_mapping() -> FhirMapping {
        let loinc = |column: &str, code: &str| CodedColumn {
            column: column.into(),
            system: "http://loinc.org".into(),
            code: code.into(),
        };
        let local = |column: &str, code: &str| CodedColumn {
            column: column.into(),
            system: "urn:medfed:example".into(),
            code: code.into(),
        };
        FhirMapping {
            features: vec![
                loinc("npreg", "11996-6"),
                loinc("glu", "2345-7"),
                loinc("bp", "8462-4"),
                local("skin", "triceps-skinfold"),
                loinc("bmi", "39156-5"),
                local("ped", "diabetes-pedigree"),
                loinc("age", "30525-0"),
            ],
            target: Some(CodedColumn {
                column: "type".into(),
                system: "http://snomed.info/sct".into(),
                code: "44054006".into(),
            }),
        }
    }

    #[test]
    fn the_fhir_example_gives_the_same_records_as_the_csv() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
        let (fhir_header, rx) =
            read(&root.join("pima_fhir"), &pima_mapping(), "fhir", 0, 0).unwrap();
        let fhir: Vec<Envelope> = rx.iter().flatten().collect();
        let (csv_header, rx) =
            super::super::csv_source::read(&root.join("pima_tr.csv"), "csv", 0, 0).unwrap();
        let csv: Vec<Envelope> = rx.iter().flatten().collect();
        assert_eq!(fhir_header, csv_header);
        assert_eq!(fhir.len(), 200);
        assert_eq!(fhir.len(), csv.len());
        let parse = |e: &Envelope| -> Vec<String> {
            let mut r = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(&e.payload[..]);
            let row = r.records().next().unwrap().unwrap();
            row.iter()
                .map(|f| f.parse::<f64>().map_or(f.to_string(), |v| v.to_string()))
                .collect()
        };
        for (f, c) in fhir.iter().zip(&csv) {
            assert_eq!(f.offset, c.offset);
            assert_eq!(parse(f), parse(c), "patient {}", f.offset);
        }
        // Resuming from a patient offset.
        let (_, rx) = read(&root.join("pima_fhir"), &pima_mapping(), "fhir", 0, 150).unwrap();
        assert_eq!(
            rx.iter().flatten().map(|e| e.offset).collect::<Vec<_>>(),
            (150..200).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_resources_are_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Patient.ndjson"),
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("Observation.ndjson"), "{\"resourceType\":\"Observation\",\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"2345-7\"}]},\"subject\":{\"reference\":\"Patient/zz\"},\"valueQuantity\":{\"value\":1}}\n").unwrap();
        let err = read(dir.path(), &pima_mapping(), "f", 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("Observation.ndjson, line 1: an observation of an unknown patient"),
            "{err}"
        );
        std::fs::write(dir.path().join("Observation.ndjson"), "not json\n").unwrap();
        let err = read(dir.path(), &pima_mapping(), "f", 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("Observation.ndjson, line 1: not a FHIR resource"),
            "{err}"
        );
        // A line that is not text is named too (it was an I/O error without a line).
        std::fs::write(dir.path().join("Observation.ndjson"), b"\n\n{\"a\xff\"}\n").unwrap();
        let err = read(dir.path(), &pima_mapping(), "f", 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("Observation.ndjson, line 3: not UTF-8 text"),
            "{err}"
        );
    }
}
