//! The one CSV dialect of ingestion (`csv_core`, the parser of the `csv` crate, with its
//! defaults): comma-separated, fields optionally in double quotes (RFC 4180), one row per
//! line. Every reader of ingested CSV (the CSV source's header and partition key,
//! validate-clean, the column statistics) splits rows with a [`Splitter`], so all of them
//! agree on where a field ends.
//!
//! A row with more fields than the header is refused rather than read: an unquoted comma
//! (in an address, say) would otherwise shift every later value into the next column.

use super::Rejection;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Splits CSV rows, one at a time, reusing its parser and buffers (no allocation per row
/// once they have grown to the widest row).
#[derive(Debug)]
pub struct Splitter {
    reader: csv_core::Reader,
    out: Vec<u8>,
    ends: Vec<usize>,
    /// Fields of the last row split.
    fields: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter {
            reader: csv_core::Reader::new(),
            out: vec![0; 256],
            ends: vec![0; 32],
            fields: 0,
        }
    }
}

/// One row's fields, as text.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    text: &'a str,
    ends: &'a [usize],
}

impl<'a> Row<'a> {
    /// Field `i`, untrimmed.
    pub fn get(&self, i: usize) -> Option<&'a str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..end)
    }

    /// The fields in the row.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the row has no field.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl Splitter {
    /// A splitter with empty buffers.
    pub fn new() -> Splitter {
        Splitter::default()
    }

    /// Parses `line` (one row, with or without its line ending); the number of fields (0:
    /// an empty line).
    /// Splits a row whose quoted fields are all simple (a field that begins with a quote,
    /// holds no quote, and ends with a quote right before a comma or the row's end) as the
    /// CSV parser would, without its byte-at-a-time state machine; `None` for anything
    /// else (a doubled quote, a quote inside an unquoted field, text after a closing
    /// quote), which the parser then splits.
    fn split_simple_quotes(&mut self, row: &[u8]) -> Option<usize> {
        self.out.clear();
        let mut n = 0;
        let mut rest = row;
        loop {
            let (field, after) = if let Some(quoted) = rest.strip_prefix(b"\"") {
                let close = memchr::memchr(b'"', quoted)?;
                let after = &quoted[close + 1..];
                if !(after.is_empty() || after[0] == b',') {
                    return None;
                }
                (&quoted[..close], after)
            } else {
                let end = memchr::memchr3(b',', b'"', b'\n', rest).unwrap_or(rest.len());
                if rest.get(end).is_some_and(|b| *b != b',') {
                    return None;
                }
                (&rest[..end], &rest[end..])
            };
            self.out.extend_from_slice(field);
            if n == self.ends.len() {
                self.ends.resize(self.ends.len() * 2, 0);
            }
            self.ends[n] = self.out.len();
            n += 1;
            match after.split_first() {
                Some((_comma, next)) => rest = next,
                None => break,
            }
        }
        let len = self.out.len();
        self.out.resize(len.max(256), 0);
        Some(n)
    }

    fn parse(&mut self, line: &[u8]) -> usize {
        let row = line.strip_suffix(b"\n").unwrap_or(line);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        if row.is_empty() {
            self.fields = 0;
            return 0;
        }
        // A row that begins with a UTF-8 byte order mark (the header of an extract saved
        // as Excel's "CSV UTF-8") goes to the state machine, which drops the mark.
        if row.starts_with(BOM) {
            return self.parse_with_state_machine(line);
        }
        // Most rows quote nothing: split them at their commas directly (what the CSV
        // parser would do, without its byte-at-a-time state machine).
        if memchr::memchr(b'"', line).is_none() {
            self.out.clear();
            let mut n = 0;
            let mut start = 0;
            for end in memchr::memchr_iter(b',', row).chain([row.len()]) {
                self.out.extend_from_slice(&row[start..end]);
                start = end + 1;
                if n == self.ends.len() {
                    self.ends.resize(self.ends.len() * 2, 0);
                }
                self.ends[n] = self.out.len();
                n += 1;
            }
            // The state machine's path keeps `out` as long as its longest row.
            let len = self.out.len();
            self.out.resize(len.max(256), 0);
            self.fields = n;
            return n;
        }
        // Rows whose quoted fields are simple (an address in quotes) likewise; the state
        // machine takes the rest.
        if memchr::memchr(b'\r', row).is_none()
            && let Some(n) = self.split_simple_quotes(row)
        {
            self.fields = n;
            return n;
        }
        self.parse_with_state_machine(line)
    }

    /// [`Splitter::parse`] by the CSV parser's state machine alone.
    fn parse_with_state_machine(&mut self, line: &[u8]) -> usize {
        use csv_core::ReadRecordResult as R;
        // The direct paths may have left `out` short.
        if self.out.len() < 256 {
            self.out.resize(256, 0);
        }
        self.reader.reset();
        let (mut input, mut nout, mut nend) = (line, 0, 0);
        self.fields = loop {
            let (res, nin, o, e) =
                self.reader
                    .read_record(input, &mut self.out[nout..], &mut self.ends[nend..]);
            input = &input[nin..];
            nout += o;
            nend += e;
            match res {
                // The next call, with no input left, ends the row.
                R::InputEmpty => {}
                R::OutputFull => self.out.resize((self.out.len() * 2).max(256), 0),
                R::OutputEndsFull => self.ends.resize((self.ends.len() * 2).max(32), 0),
                R::Record => break nend,
                R::End => break 0,
            }
        };
        self.fields
    }

    /// Field `i` of the last row parsed, as bytes.
    fn bytes(&self, i: usize) -> Option<&[u8]> {
        if i >= self.fields {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.out.get(start..self.ends[i])
    }

    /// Field `index` of `line`, untrimmed; nothing if the row is too short.
    pub fn field(&mut self, line: &[u8], index: usize) -> Option<&[u8]> {
        self.parse(line);
        self.bytes(index)
    }

    /// One row, split into its fields. Fewer fields than the header's `width` are allowed
    /// (the missing ones read as empty); more are refused, with the two counts and no value,
    /// and so is a row that is empty or not UTF-8 text.
    pub fn row(&mut self, line: &[u8], width: usize) -> Result<Row<'_>, Rejection> {
        let fields = self.parse(line);
        if fields == 0 {
            return Err(Rejection::new("an empty line"));
        }
        if fields > width {
            return Err(Rejection::new(format!(
                "the row has {fields} fields; the header has {width} (a comma outside double quotes?)"
            )));
        }
        // The row's text at once; every field boundary must also be a character boundary
        // (two halves of one character in two fields are not text).
        let end = self.ends[fields - 1];
        if let Ok(text) = std::str::from_utf8(&self.out[..end])
            && self.ends[..fields]
                .iter()
                .all(|e| text.is_char_boundary(*e))
        {
            return Ok(Row {
                text,
                ends: &self.ends[..fields],
            });
        }
        // Name the first field that is not text.
        let bad = (0..fields)
            .find(|i| {
                self.bytes(*i)
                    .is_none_or(|f| std::str::from_utf8(f).is_err())
            })
            .unwrap_or(0);
        Err(Rejection::new(format!(
            "field {} is not UTF-8 text",
            bad + 1
        )))
    }

    /// Field `index` of `line`, reading no further than that field; nothing if the row is
    /// too short. (For a partition key: the rest of the row is its task's to read.)
    pub fn leading_field(&mut self, line: &[u8], index: usize) -> Option<&[u8]> {
        // Up to the field's end, no quote and no line end: the commas split it, as they
        // split it for the state machine (most keys: an MRN in the first column). A
        // leading byte order mark is the state machine's to drop.
        if line.starts_with(BOM) {
            return self.leading_field_with_state_machine(line, index);
        }
        let mut start = 0;
        for _ in 0..index {
            match memchr::memchr(b',', &line[start..]) {
                Some(i) => start += i + 1,
                None if memchr::memchr3(b'"', b'\r', b'\n', line).is_none() => return None,
                None => return self.leading_field_with_state_machine(line, index),
            }
        }
        let end = memchr::memchr(b',', &line[start..]).map_or(line.len(), |i| start + i);
        if line.is_empty() || memchr::memchr3(b'"', b'\r', b'\n', &line[..end]).is_some() {
            return self.leading_field_with_state_machine(line, index);
        }
        let field = &line[start..end];
        if self.out.len() < field.len() {
            self.out.resize(field.len(), 0);
        }
        self.out[..field.len()].copy_from_slice(field);
        self.out.get(..field.len())
    }

    /// [`Splitter::leading_field`] by `csv_core`'s state machine.
    fn leading_field_with_state_machine(&mut self, line: &[u8], index: usize) -> Option<&[u8]> {
        use csv_core::ReadFieldResult as R;
        self.reader.reset();
        let mut input = line;
        let mut field = 0;
        let mut nout = 0;
        loop {
            let (res, nin, o) = self.reader.read_field(input, &mut self.out[nout..]);
            input = &input[nin..];
            nout += o;
            match res {
                R::InputEmpty if input.is_empty() && nout == 0 && field == 0 && line.is_empty() => {
                    return None;
                }
                R::InputEmpty => {}
                R::OutputFull => self.out.resize(self.out.len() * 2, 0),
                R::Field { record_end } => {
                    if field == index {
                        return self.out.get(..nout);
                    }
                    if record_end {
                        return None;
                    }
                    field += 1;
                    nout = 0;
                }
                R::End => return None,
            }
        }
    }
}

/// The column names of a header line, trimmed (an empty line has none).
pub fn header(line: &[u8]) -> Vec<String> {
    let mut s = Splitter::new();
    let n = s.parse(line);
    (0..n)
        .filter_map(|i| s.bytes(i))
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of up to `longest` symbols of `alphabet`.
    fn every_row<'a>(alphabet: &'a [&'a [u8]], longest: u32) -> impl Iterator<Item = Vec<u8>> + 'a {
        let k = alphabet.len();
        (0..=longest).flat_map(move |len| {
            (0..k.pow(len)).map(move |code| {
                (0..len)
                    .flat_map(|i| alphabet[code / k.pow(i) % k])
                    .copied()
                    .collect()
            })
        })
    }

    #[test]
    fn quoted_commas_stay_in_their_field_and_unquoted_ones_are_refused() {
        assert_eq!(
            header(b"mrn, name ,address,glu\r\n"),
            ["mrn", "name", "address", "glu"]
        );
        assert!(header(b"").is_empty());
        let mut s = Splitter::new();
        let ok = s.row(b"MRN-1,Ada,\"12 High St, Leeds\",140", 4).unwrap();
        assert_eq!(
            (ok.len(), ok.get(2), ok.get(3), ok.get(4)),
            (4, Some("12 High St, Leeds"), Some("140"), None)
        );
        let shifted = s.row(b"MRN-1,Ada,12 High St, Leeds,140", 4).unwrap_err();
        assert_eq!(
            shifted.reason,
            "the row has 5 fields; the header has 4 (a comma outside double quotes?)"
        );
        assert!(!shifted.to_string().contains("Leeds"));
        assert_eq!(s.row(b"MRN-1,Ada", 4).unwrap().len(), 2);
        assert_eq!(s.row(b"", 4).unwrap_err().reason, "an empty line");
        assert_eq!(
            s.row(b"MRN-1,\xff\xfe", 4).unwrap_err().reason,
            "field 2 is not UTF-8 text"
        );
        // Two halves of one character in two fields: each field must be text on its own.
        assert_eq!(
            s.row(b"\xc3,\xa9", 4).unwrap_err().reason,
            "field 1 is not UTF-8 text"
        );
        assert_eq!(
            s.row("é,\"x\"\"y\"".as_bytes(), 4).unwrap().get(1),
            Some("x\"y")
        );
        assert_eq!(s.field(b"p7,\"a,b\",3", 1), Some(&b"a,b"[..]));
        assert_eq!(s.field(b"p7", 1), None);
        for (line, i) in [
            (&b"p7,\"a,b\",3"[..], 0),
            (b"p7,\"a,b\",3", 1),
            (b"p7,\"a,b\",3", 2),
            (b"p7,\"a,b\",3", 3),
            (b"p7", 1),
            (b"", 0),
            (b"\"x\"\"y\",z", 0),
        ] {
            let whole = s.field(line, i).map(<[u8]>::to_vec);
            assert_eq!(
                s.leading_field(line, i).map(<[u8]>::to_vec),
                whole,
                "{line:?} {i}"
            );
        }
        // Rows without quotes take a shorter path: the same fields.
        for line in [&b"a,b,,c"[..], b"a,b,,c\r\n", b",", b"x", b"a,b\n"] {
            let fast = s.row(line, 9).map(|r| {
                (0..r.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect::<Vec<_>>()
            });
            let want: Vec<Option<String>> = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(line)
                .records()
                .next()
                .map(|r| r.unwrap().iter().map(|f| Some(f.to_string())).collect())
                .unwrap_or_default();
            assert_eq!(fast.unwrap(), want, "{line:?}");
        }
        // Every row of up to 7 characters of `a , " space BOM` splits as the state machine
        // splits it (the direct paths are only taken where they agree with it).
        let mut reference = Splitter::new();
        for line in every_row(&[b"a", b",", b"\"", b" ", BOM], 7) {
            let fields = |s: &Splitter, n: usize| -> Vec<Vec<u8>> {
                (0..n)
                    .map(|i| s.bytes(i).unwrap_or_default().to_vec())
                    .collect()
            };
            let n = s.parse(&line);
            let m = reference.parse_with_state_machine(&line);
            assert_eq!(n, m, "{:?}", String::from_utf8_lossy(&line));
            assert_eq!(
                fields(&s, n),
                fields(&reference, m),
                "{:?}",
                String::from_utf8_lossy(&line)
            );
        }
        // A row's leading fields (a partition key) as the state machine reads them, for
        // every row of up to 6 characters of `a , " CR LF BOM`.
        for line in every_row(&[b"a", b",", b"\"", b"\r", b"\n", BOM], 6) {
            for index in 0..4 {
                let want = reference
                    .leading_field_with_state_machine(&line, index)
                    .map(<[u8]>::to_vec);
                let got = s.leading_field(&line, index).map(<[u8]>::to_vec);
                assert_eq!(
                    got,
                    want,
                    "{:?} field {index}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
        // Line ends inside quotes are the field's; outside, the state machine's.
        for line in [
            &b"\"a\nb\",c"[..],
            b"\"a\r\nb\",c",
            b"a\n\"b\"",
            b"\"a\",b\nc",
        ] {
            let n = s.parse(line);
            let m = reference.parse_with_state_machine(line);
            assert_eq!(
                (0..n)
                    .map(|i| s.bytes(i).map(<[u8]>::to_vec))
                    .collect::<Vec<_>>(),
                (0..m)
                    .map(|i| reference.bytes(i).map(<[u8]>::to_vec))
                    .collect::<Vec<_>>(),
                "{line:?}"
            );
        }
        // An Excel "CSV UTF-8" header: the byte order mark is not part of the first name.
        assert_eq!(header(b"\xef\xbb\xbfmrn,\"glu\"\r\n"), ["mrn", "glu"]);
        assert_eq!(header(b"\xef\xbb\xbfmrn,glu\n"), ["mrn", "glu"]);
        // A row wider than the buffers it starts with.
        let wide = vec!["x".repeat(300); 40].join(",");
        let row = s.row(wide.as_bytes(), 40).unwrap();
        assert_eq!((row.len(), row.get(39).map(str::len)), (40, Some(300)));
    }
}
