//! Segments of kept records (`medfed_node::runtime::record`), as the node's store holds
//! them: arbitrary bytes never panic the reader (a broken segment is an error naming where),
//! and records made up by the fuzzer come back from their segment exactly as they were.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use medfed_node::runtime::record::{
    Record, Value, chunk_value, decode_chunked, decode_segment, decode_stored, encode_segment,
    segment_chunks, stored_field_names,
};

/// A value the fuzzer chooses.
#[derive(Arbitrary, Debug)]
enum V {
    Number(f64),
    Decimal(i32, u8),
    Text(String),
    Hex(u128),
    Missing,
}

fuzz_target!(|data: &[u8]| {
    if data.first().is_some_and(|b| *b < 0x80) {
        let _ = decode_segment(&data[1..]);
        let _ = decode_stored(&data[1..]);
        let _ = stored_field_names(&data[1..]);
        // As stored values in key order: cut wherever a 0xff byte is.
        let _ = decode_chunked(data[1..].split(|b| *b == 0xff));
        return;
    }
    let mut u = Unstructured::new(data);
    let names = ["patient", "glu", "bmi", "zip", "note", "a", "b_missing"];
    let mut records = Vec::new();
    while let Ok(fields) = u.arbitrary::<Vec<(u8, V)>>() {
        if u.is_empty() && fields.is_empty() {
            break;
        }
        let mut r = Record::default();
        for (n, v) in fields {
            let value = match v {
                // Records hold finite numbers only (cleaning refuses the rest).
                V::Number(x) if x.is_finite() => Value::Number(x),
                V::Number(_) => Value::Missing,
                V::Decimal(m, s) => Value::Number(f64::from(m) / 10f64.powi(i32::from(s % 8))),
                V::Text(t) => Value::Text(t.into()),
                V::Hex(h) => Value::Text(format!("p1-{h:032x}").into()),
                V::Missing => Value::Missing,
            };
            r.set(names[usize::from(n) % names.len()], value);
        }
        records.push(r);
        if records.len() > 64 {
            break;
        }
    }
    let bytes = encode_segment(&records);
    let back = decode_segment(&bytes).expect("a segment the node wrote reads back");
    assert_eq!(back, records);
    // The field names read without decoding are the records' own.
    let mut names: Vec<String> = records
        .iter()
        .flat_map(|r| r.names().map(str::to_string).collect::<Vec<_>>())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(stored_field_names(&bytes).expect("names read back"), names);
    // Stored in chunks, read back whole.
    let values: Vec<Vec<u8>> = segment_chunks(&bytes)
        .into_iter()
        .enumerate()
        .map(|(i, c)| chunk_value(i, c))
        .collect();
    let back = decode_chunked(values.iter().map(Vec::as_slice)).expect("chunks read back");
    assert_eq!(back, records);
});
