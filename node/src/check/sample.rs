//! `medfed node check`'s look at the data itself: each `[[ingest]]` pipeline's source
//! (there, readable, with a header naming every declared field) and a sample of its rows
//! against the declared types and ranges, and each `[[dataset]] path` CSV's shape. Counts
//! per problem and column, never a value: values are patient data.

use std::collections::BTreeMap;
use std::path::Path;

use super::Finding;
use crate::deid::ValidateClean;
use crate::ingest::IngestConfig;
use crate::runtime::csv_row::Splitter;
use crate::runtime::csv_source;

/// Rows read from the start of each CSV file.
pub const SAMPLE_ROWS: usize = 1000;

/// "of the first 1000 rows", or "of the 200 rows" when the file has fewer.
fn of_rows(sampled: usize) -> String {
    if sampled < SAMPLE_ROWS {
        format!("of the {sampled} rows")
    } else {
        format!("of the first {sampled} rows")
    }
}

/// The first rows of a CSV file as the pipeline's CSV source reads them: its header and
/// up to [`SAMPLE_ROWS`] data rows.
fn first_rows(path: &Path, stream: &str) -> std::io::Result<(Vec<String>, Vec<Vec<u8>>)> {
    let (header, batches) = csv_source::read(path, stream, 0, 0)?;
    let mut rows = Vec::new();
    // Dropping the receiver stops the reader thread at its next batch.
    for batch in batches.iter() {
        rows.extend(batch.into_iter().map(|e| e.payload));
        if rows.len() >= SAMPLE_ROWS {
            rows.truncate(SAMPLE_ROWS);
            return Ok((header, rows));
        }
    }
    // A file that could not be read to its end is not a short file.
    match batches.failed() {
        Some(why) => Err(std::io::Error::other(why)),
        None => Ok((header, rows)),
    }
}

/// Each `[[ingest]]` pipeline: its source, and a sample of each of its CSV files.
pub(super) fn check_pipeline(cfg: &IngestConfig) -> Vec<Finding> {
    let stream = &cfg.stream;
    if let Some(dir) = &cfg.fhir {
        return vec![match std::fs::read_dir(dir) {
            Ok(_) => Finding::ok(
                "ingest",
                format!(
                    "pipeline '{stream}': FHIR export directory {}",
                    dir.display()
                ),
            ),
            Err(e) => Finding::fail(
                "ingest",
                format!(
                    "pipeline '{stream}': fhir = {}: {}",
                    dir.display(),
                    io_words(&e)
                ),
                "set fhir to the FHIR Bulk Data export directory (relative paths are relative to the config file), readable by the node's user",
            ),
        }];
    }
    if let Some(omop) = &cfg.omop {
        return vec![match crate::runtime::omop_source::probe(omop) {
            Ok((persons, empty)) if empty.is_empty() => Finding::ok(
                "ingest",
                format!(
                    "pipeline '{stream}': OMOP database reached, every mapped concept found, {persons} persons in {}.person",
                    omop.schema
                ),
            ),
            // Possible (a drug this hospital never gives), but worth a look: every record
            // will say "absent" or miss the value.
            Ok((persons, empty)) => Finding::warn(
                "ingest",
                format!(
                    "pipeline '{stream}': OMOP database reached, {persons} persons in {}.person, but no row holds the concepts of the columns {}",
                    omop.schema,
                    empty.join(", ")
                ),
                "check those columns' concepts against what your ETL loads (a code of another vocabulary, or the wrong table); if this site really has none, it is fine",
            ),
            Err(e) => Finding::fail(
                "ingest",
                format!("pipeline '{stream}': {e}"),
                "check [ingest.omop]: connect (host, port, dbname, user), password_file, ca, schema, the account's SELECT grants and the mapping's concepts (docs/omop.md)",
            ),
        }];
    }
    let Some(csv) = &cfg.csv else {
        return vec![Finding::ok(
            "ingest",
            format!(
                "pipeline '{stream}': NATS JetStream, not sampled here (its records arrive when the node runs)"
            ),
        )];
    };
    let missing_source = |e: std::io::Error| {
        Finding::fail(
            "ingest",
            format!(
                "pipeline '{stream}': csv = {}: {}",
                csv.display(),
                io_words(&e)
            ),
            if e.kind() == std::io::ErrorKind::NotFound {
                "set [[ingest]] csv to the extract's file or directory (relative paths are relative to the config file), or put the extract there"
            } else {
                "make the extract readable by the node's user"
            },
        )
    };
    if let Err(e) = std::fs::metadata(csv) {
        return vec![missing_source(e)];
    }
    let files = match csv_source::files(csv) {
        Ok(f) => f,
        Err(e) => return vec![missing_source(e)],
    };
    if files.is_empty() {
        return vec![Finding::fail(
            "ingest",
            format!(
                "pipeline '{stream}': the directory {} has no .csv file",
                csv.display()
            ),
            "put the extract's .csv files there (one partition per file), or set csv to the extract's file",
        )];
    }
    files.iter().flat_map(|f| check_csv_file(cfg, f)).collect()
}

/// An I/O error as words (not "os error 2").
fn io_words(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        std::io::ErrorKind::PermissionDenied => "this user may not read it".into(),
        _ => e.to_string(),
    }
}

/// The columns a pipeline needs in its input's header.
fn needed_columns(cfg: &IngestConfig) -> Vec<&str> {
    let mut needed: Vec<&str> = if cfg.fields.is_empty() {
        cfg.columns.iter().map(String::as_str).collect()
    } else {
        cfg.fields.iter().map(|f| f.name.as_str()).collect()
    };
    needed.extend(cfg.partition_by.as_deref());
    needed
}

fn check_csv_file(cfg: &IngestConfig, file: &Path) -> Vec<Finding> {
    let stream = &cfg.stream;
    let at = format!("pipeline '{stream}': {}", file.display());
    let (header, rows) = match first_rows(file, stream) {
        Ok(r) => r,
        Err(e) => {
            return vec![Finding::fail(
                "ingest",
                format!("{at}: {}", io_words(&e)),
                "make the extract readable by the node's user",
            )];
        }
    };
    if header.iter().all(String::is_empty) {
        return vec![Finding::fail(
            "ingest",
            format!("{at}: the file is empty (no header row)"),
            "export the extract with a header row naming its columns, then its rows",
        )];
    }
    let missing: Vec<&str> = needed_columns(cfg)
        .into_iter()
        .filter(|c| !header.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        let declared = if cfg.fields.is_empty() {
            "columns"
        } else {
            "[[ingest.field]] names"
        };
        return vec![Finding::fail(
            "ingest",
            format!(
                "{at}: no column {} in the header (its columns: {})",
                missing
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                header.join(", ")
            ),
            format!(
                "make the {declared} match the extract's header exactly (case and spaces count), or add the columns to the extract"
            ),
        )];
    }
    if rows.is_empty() {
        return vec![if cfg.follow {
            Finding::ok(
                "ingest",
                format!("{at}: a header and no rows yet (follow: rows appended later are read)"),
            )
        } else {
            Finding::fail(
                "ingest",
                format!("{at}: a header and no rows: the pipeline would keep no records"),
                "export the extract with its rows (or set follow = true if rows are appended to the file later)",
            )
        }];
    }
    let counts = match sample_problems(cfg, &header, &rows) {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                "ingest",
                format!("{at}: {e}"),
                "fix the [[ingest.field]] named above",
            )];
        }
    };
    let sampled = rows.len();
    let mut out = vec![Finding::ok(
        "ingest",
        format!(
            "{at}: header has every declared column; {} sampled",
            of_rows(sampled).trim_start_matches("of the ")
        ),
    )];
    for ((field, reason), n) in counts {
        out.push(problem_finding(&at, field.as_deref(), &reason, n, sampled));
    }
    out
}

/// (field, reason) → rows with that problem.
type Counts = BTreeMap<(Option<String>, String), usize>;

fn sample_problems(
    cfg: &IngestConfig,
    header: &[String],
    rows: &[Vec<u8>],
) -> Result<Counts, String> {
    let mut counts = Counts::new();
    if !cfg.fields.is_empty() {
        let mut clean = ValidateClean::new(header, &cfg.fields).map_err(|e| e.detail)?;
        for row in rows {
            for why in clean.problems(row) {
                *counts.entry((why.field, why.reason)).or_default() += 1;
            }
        }
        return Ok(counts);
    }
    // No declared fields: the built-in statistics read `columns` as numbers.
    let columns: Vec<(usize, &str)> = cfg
        .columns
        .iter()
        .filter_map(|c| Some((header.iter().position(|h| h == c)?, c.as_str())))
        .collect();
    let mut splitter = Splitter::new();
    for row in rows {
        match splitter.row(row, header.len()) {
            Ok(cells) => {
                for (i, name) in &columns {
                    let raw = cells.get(*i).map_or("", str::trim);
                    if !raw.parse::<f64>().is_ok_and(f64::is_finite) {
                        *counts
                            .entry((Some(name.to_string()), "not a number".into()))
                            .or_default() += 1;
                    }
                }
            }
            Err(why) => *counts.entry((why.field, why.reason)).or_default() += 1,
        }
    }
    Ok(counts)
}

/// One problem's finding: a failure if every row sampled has it (the pipeline would keep
/// nothing), a warning otherwise (those rows are quarantined).
fn problem_finding(
    at: &str,
    field: Option<&str>,
    reason: &str,
    n: usize,
    sampled: usize,
) -> Finding {
    let rows = format!("{n} {}", of_rows(sampled));
    let (detail, fix) = match field {
        None => (
            format!("{at}: {rows} cannot be read: {reason}"),
            "have the extract quote fields that contain commas (\"12 High St, Leeds\"), and export it as UTF-8 text"
                .to_string(),
        ),
        Some(f) if reason.starts_with("missing") => (
            format!("{at}: {rows} have no value in '{f}' ({reason})"),
            format!(
                "fill '{f}' in the extract, or choose another missing policy for field '{f}' (missing = \"keep\" or \"indicator\")"
            ),
        ),
        Some(f) => (
            format!("{at}: {rows} have a value in '{f}' that is {reason}"),
            if reason == "not a number" {
                format!(
                    "check how the extract writes '{f}' (a decimal comma, a unit in the cell, a text code?); if the column is not numeric, declare type = \"text\" for field '{f}'"
                )
            } else if reason.starts_with("not one of the categories") {
                format!(
                    "add the values the extract uses to field '{f}''s categories (they are case-sensitive), or fix the extract"
                )
            } else {
                format!(
                    "check field '{f}''s min and max, and its unit (unit, to_unit: the extract may use another), or set out_of_range = \"clip\""
                )
            },
        ),
    };
    if n >= sampled {
        Finding::fail(
            "ingest",
            format!("{detail}: every record would be quarantined"),
            fix,
        )
    } else {
        Finding::warn(
            "ingest",
            format!(
                "{detail}: those records are quarantined (`medfed node quarantine` lists them)"
            ),
            fix,
        )
    }
}

/// A `[[dataset]] path` CSV file's shape, from its first rows: a header, data rows, and no
/// row with more or fewer fields than the header. `None` if it looks right.
pub(super) fn check_csv_dataset(name: &str, path: &Path) -> Option<Finding> {
    let at = format!("dataset '{name}': {}", path.display());
    // If it cannot be read at all, Table::load says why.
    let Ok(mut reader) = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(path)
    else {
        return None;
    };
    let width = match reader.headers() {
        Ok(h) if h.iter().any(|c| !c.is_empty()) => h.len(),
        Ok(_) => {
            return Some(Finding::fail(
                "data",
                format!("{at}: the file is empty (no header row)"),
                "export the extract with a header row naming its columns, then its rows",
            ));
        }
        Err(_) => return None,
    };
    let (mut sampled, mut longer, mut shorter) = (0, 0, 0);
    for record in reader.records().take(SAMPLE_ROWS) {
        sampled += 1;
        match record {
            Ok(r) if r.len() > width => longer += 1,
            Ok(r) if r.len() < width => shorter += 1,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    if sampled == 0 {
        return Some(Finding::fail(
            "data",
            format!("{at}: a header and no rows"),
            "export the extract with its rows, or point [[dataset]] path at the full extract",
        ));
    }
    if longer + shorter == 0 {
        return None;
    }
    let mut problems = Vec::new();
    if longer > 0 {
        problems.push(format!(
            "{longer} {} have more fields than the header's {width} (a comma outside double quotes?)",
            of_rows(sampled)
        ));
    }
    if shorter > 0 {
        problems.push(format!(
            "{shorter} {} have fewer fields than the header's {width}",
            of_rows(sampled)
        ));
    }
    Some(Finding::fail(
        "data",
        format!("{at}: {}; the node cannot load it", problems.join(", and ")),
        "have the extract quote fields that contain commas (\"12 High St, Leeds\") and write every column of every row (empty for a missing value)",
    ))
}
