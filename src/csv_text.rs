//! CSV held in a string (an extract the examples split among hospitals, or a test edits),
//! read and written with the `csv` crate: quoted fields and embedded commas come out right,
//! which splitting on `,` gets wrong.

/// The fields of one CSV line (empty for an empty line).
pub fn fields(line: &str) -> Vec<String> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(line.as_bytes())
        .records()
        .next()
        .and_then(Result::ok)
        .map(|r| r.iter().map(str::to_string).collect())
        .unwrap_or_default()
}

/// One CSV line (without its line end) holding `fields`, quoted where they need it.
pub fn line<I, F>(fields: I) -> String
where
    I: IntoIterator<Item = F>,
    F: AsRef<[u8]>,
{
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    // Writing one record to memory cannot fail (the csv writer's errors are I/O errors).
    let bytes = match w.write_record(fields) {
        Ok(()) => w.into_inner().unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim_end_matches(['\r', '\n']).to_string()
}

/// The header row of `text` (empty if it has none).
pub fn header(text: &str) -> Vec<String> {
    csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes())
        .headers()
        .map(|h| h.iter().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The header and the data rows of `text` (rows may differ in length).
pub fn read(text: &str) -> Result<(Vec<String>, Vec<Vec<String>>), csv::Error> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = r.headers()?.iter().map(str::to_string).collect();
    let rows = r
        .records()
        .map(|rec| rec.map(|rec| rec.iter().map(str::to_string).collect()))
        .collect::<Result<_, _>>()?;
    Ok((header, rows))
}

/// `line` with field `index` replaced by `value` (a test's way to spoil one cell).
pub fn with_field(line_text: &str, index: usize, value: &str) -> String {
    let mut f = fields(line_text);
    if let Some(cell) = f.get_mut(index) {
        *cell = value.to_string();
    }
    line(&f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_round_trip() {
        let row = r#"MRN-2,"7 Bletchley Park, Unit 4",99"#;
        assert_eq!(fields(row), ["MRN-2", "7 Bletchley Park, Unit 4", "99"]);
        assert_eq!(line(fields(row)), row);
        assert_eq!(
            with_field(row, 2, ""),
            r#"MRN-2,"7 Bletchley Park, Unit 4","#
        );
        let (head, rows) = read("a,b\n1,2\n3,\"x,y\"\n").unwrap();
        assert_eq!(head, ["a", "b"]);
        assert_eq!(rows, [vec!["1", "2"], vec!["3", "x,y"]]);
        assert!(fields("").is_empty());
        assert_eq!(header("a,\"b,c\"\n1,2\n"), ["a", "b,c"]);
    }
}
