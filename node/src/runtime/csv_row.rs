//! The one CSV dialect of ingestion, read with the `csv` crate: comma-separated, fields
//! optionally in double quotes (RFC 4180), one row per line. Every reader of ingested CSV
//! (the CSV source's header and partition key, validate-clean, the column statistics)
//! splits rows here, so all of them agree on where a field ends.
//!
//! A row with more fields than the header is refused rather than read: an unquoted comma
//! (in an address, say) would otherwise shift every later value into the next column.

use super::Rejection;

fn reader(bytes: &[u8]) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        // Each call reads one row; its width is checked against the header below.
        .flexible(true)
        .buffer_capacity(bytes.len().clamp(64, 1 << 16))
        .from_reader(bytes)
}

/// The column names of a header line, trimmed (an empty line has none).
pub fn header(line: &[u8]) -> Result<Vec<String>, csv::Error> {
    let mut record = csv::ByteRecord::new();
    if !reader(line).read_byte_record(&mut record)? {
        return Ok(Vec::new());
    }
    Ok(record
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect())
}

/// One row, split into its fields. Fewer fields than the header's `width` are allowed (the
/// missing ones are empty); more are refused, with the two counts and no value.
pub fn row(line: &[u8], width: usize) -> Result<csv::StringRecord, Rejection> {
    let mut record = csv::StringRecord::new();
    match reader(line).read_record(&mut record) {
        Ok(true) => {}
        Ok(false) => return Err(Rejection::new("an empty line")),
        Err(e) => return Err(Rejection::new(unreadable(&e))),
    }
    if record.len() > width {
        return Err(Rejection::new(format!(
            "the row has {} fields; the header has {width} (a comma outside double quotes?)",
            record.len()
        )));
    }
    Ok(record)
}

/// One field of a row (untrimmed), or nothing if the row cannot be read or is too short.
pub fn field(line: &[u8], index: usize) -> Option<Vec<u8>> {
    let mut record = csv::ByteRecord::new();
    match reader(line).read_byte_record(&mut record) {
        Ok(true) => record.get(index).map(<[u8]>::to_vec),
        _ => None,
    }
}

/// Why a row cannot be read, without its text.
fn unreadable(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => {
            format!("field {} is not UTF-8 text", err.field() + 1)
        }
        _ => "not a CSV row".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_commas_stay_in_their_field_and_unquoted_ones_are_refused() {
        let cols = header(b"mrn, name ,address,glu").unwrap();
        assert_eq!(cols, ["mrn", "name", "address", "glu"]);
        let ok = row(b"MRN-1,Ada,\"12 High St, Leeds\",140", 4).unwrap();
        assert_eq!(ok.get(2), Some("12 High St, Leeds"));
        assert_eq!(ok.get(3), Some("140"));
        let shifted = row(b"MRN-1,Ada,12 High St, Leeds,140", 4).unwrap_err();
        assert_eq!(
            shifted.reason,
            "the row has 5 fields; the header has 4 (a comma outside double quotes?)"
        );
        assert!(!shifted.to_string().contains("Leeds"));
        assert_eq!(row(b"MRN-1,Ada", 4).unwrap().len(), 2);
        assert_eq!(row(b"", 4).unwrap_err().reason, "an empty line");
        assert_eq!(
            row(b"MRN-1,\xff\xfe", 4).unwrap_err().reason,
            "field 2 is not UTF-8 text"
        );
        assert_eq!(field(b"p7,\"a,b\",3", 1).as_deref(), Some(&b"a,b"[..]));
        assert_eq!(field(b"p7", 1), None);
        assert!(header(b"").unwrap().is_empty());
    }
}
