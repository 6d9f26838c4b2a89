//! Records as tasks pass them to each other, and as the node keeps them.
//!
//! A [`Record`] is a short list of named values, sorted by name. Field names are shared
//! (`Arc<str>`): a task that names its fields once, when it is built, adds them to every
//! record without allocating ([`Record::set_named`]). Chained tasks hand records to each
//! other as they are; nothing is encoded between tasks.
//!
//! Records sent to an output stream are kept in the node's store as **segments**: the
//! records of one checkpoint, column by column ([`encode_segment`]). Numbers that are
//! decimals of up to six places are stored as variable-length integers, text columns with
//! few distinct values as a dictionary, text columns that are a fixed prefix and hex digits
//! (pseudonyms) as raw bytes; a kept record takes about as many bytes as its clinical
//! values took in the CSV extract.

pub use compact_str::CompactString;

/// One value of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number (after unit conversion).
    Number(f64),
    /// Text (held inline up to 24 bytes: most values need no allocation).
    Text(CompactString),
    /// No value (an empty cell, `NA`, `NaN` or `null`).
    Missing,
}

impl Value {
    /// The number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(x) => Some(*x),
            _ => None,
        }
    }

    /// The text, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A field's name, with its first eight bytes as a number (names are compared by that
/// number first). Names are interned: a copy is a pointer, two names are equal exactly when
/// they point at the same text, and a task's names cost nothing per record
/// ([`Record::set_named`]). The interned texts live as long as the process: field names
/// come from the configuration and from records the node wrote itself, a bounded set.
#[derive(Clone, Copy)]
pub struct FieldName {
    key: u64,
    text: &'static str,
}

/// Every field name seen, once.
static NAMES: std::sync::Mutex<Option<std::collections::HashSet<&'static str>>> =
    std::sync::Mutex::new(None);

impl FieldName {
    /// The name `text`.
    pub fn new(text: &str) -> FieldName {
        let mut names = NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names = names.get_or_insert_with(std::collections::HashSet::new);
        let text = match names.get(text) {
            Some(t) => *t,
            None => {
                let t: &'static str = Box::leak(text.to_string().into_boxed_str());
                names.insert(t);
                t
            }
        };
        FieldName {
            key: prefix(text.as_bytes()),
            text,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.text
    }

    #[inline]
    fn cmp_to(&self, key: u64, text: &str) -> std::cmp::Ordering {
        match self.key.cmp(&key) {
            // Same first eight bytes: names of up to eight bytes differ only in length.
            std::cmp::Ordering::Equal if self.text.len() <= 8 && text.len() <= 8 => {
                self.text.len().cmp(&text.len())
            }
            std::cmp::Ordering::Equal if std::ptr::eq(self.text, text) => std::cmp::Ordering::Equal,
            std::cmp::Ordering::Equal => self.text.as_bytes().cmp(text.as_bytes()),
            other => other,
        }
    }

    #[inline]
    fn same(&self, other: &FieldName) -> bool {
        std::ptr::eq(self.text, other.text)
    }
}

/// A field's name and the place in a record it was last found at. The records of one
/// pipeline have the same fields in the same places, so a task looking a field up through
/// its slot compares one name, not searches ([`Record::get_slot`] and the like); a record
/// laid out otherwise is searched, and the place remembered.
#[derive(Debug, Clone)]
pub struct FieldSlot {
    name: FieldName,
    at: std::cell::Cell<usize>,
}

impl FieldSlot {
    /// The slot of field `name`.
    pub fn new(name: &str) -> FieldSlot {
        FieldSlot {
            name: FieldName::new(name),
            at: std::cell::Cell::new(0),
        }
    }

    /// Where the field is in `record` (`Err`: where it would go). The remembered place is
    /// tried first: the field is there, or it is absent and belongs there (its neighbours
    /// bracket its name: a field a task adds to every record, or one the records lack).
    #[inline]
    fn find(&self, record: &Record) -> Result<usize, usize> {
        let at = self.at.get();
        if record
            .fields
            .get(at)
            .is_some_and(|(name, _)| name.same(&self.name))
        {
            return Ok(at);
        }
        self.find_elsewhere(record, at)
    }

    /// [`FieldSlot::find`] when the field is not at its remembered place `at`.
    #[inline(never)]
    fn find_elsewhere(&self, record: &Record, at: usize) -> Result<usize, usize> {
        let fields = &record.fields;
        let (key, text) = (self.name.key, self.name.text);
        if at <= fields.len()
            && (at == 0 || fields[at - 1].0.cmp_to(key, text).is_lt())
            && fields
                .get(at)
                .is_none_or(|(n, _)| n.cmp_to(key, text).is_gt())
        {
            return Err(at);
        }
        let found = record.find_named(&self.name);
        self.at.set(found.unwrap_or_else(|i| i));
        found
    }
}

impl std::fmt::Debug for FieldName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.text.fmt(f)
    }
}

/// A patient record inside the node. Deliberately not `Serialize`: it cannot be put into a
/// protocol message; its encodings ([`Record::encode`], [`encode_segment`]) are the node's
/// own, for its store.
///
/// Every field of every protocol message is an aggregate, a name or a protocol value; no
/// message has a field that could hold a record, and this does not compile:
///
/// ```compile_fail
/// fn into_any_message<T: serde::Serialize>(_: &T) {}
/// into_any_message(&medfed_node::deid::Record::default());
/// ```
#[derive(Clone, Default)]
pub struct Record {
    /// Sorted by name, names unique.
    fields: Vec<(FieldName, Value)>,
}

impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        self.fields.len() == other.fields.len()
            && self
                .fields
                .iter()
                .zip(&other.fields)
                .all(|(a, b)| a.0.same(&b.0) && a.1 == b.1)
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.fields.iter().map(|(k, v)| (k.as_str(), v)))
            .finish()
    }
}

/// The first eight bytes of `s`, big-endian, zero-padded: comparing these numbers orders
/// names as comparing their first eight bytes does.
#[inline]
fn prefix(s: &[u8]) -> u64 {
    match s.first_chunk::<8>() {
        Some(b) => u64::from_be_bytes(*b),
        None => s
            .iter()
            .enumerate()
            .fold(0u64, |k, (i, b)| k | u64::from(*b) << (56 - 8 * i)),
    }
}

impl Record {
    #[inline]
    fn find(&self, name: &str) -> Result<usize, usize> {
        let key = prefix(name.as_bytes());
        self.fields.binary_search_by(|(k, _)| k.cmp_to(key, name))
    }

    #[inline]
    fn find_named(&self, name: &FieldName) -> Result<usize, usize> {
        self.fields
            .binary_search_by(|(k, _)| k.cmp_to(name.key, name.text))
    }

    /// A record with fields `names`, each [`Value::Missing`], or `None` if two names are
    /// the same. A task that sets the same fields in every record clones it and fills the
    /// fields by place ([`Record::position`], [`Record::set_at`]): no search, no shifting.
    pub fn template(names: &[FieldName]) -> Option<Record> {
        let mut fields: Vec<(FieldName, Value)> =
            names.iter().map(|n| (*n, Value::Missing)).collect();
        fields.sort_by(|a, b| a.0.cmp_to(b.0.key, b.0.text));
        if fields.windows(2).any(|w| w[0].0.same(&w[1].0)) {
            return None;
        }
        Some(Record { fields })
    }

    /// The value of the field of `slot`, if the record has it.
    #[inline]
    pub fn get_slot(&self, slot: &FieldSlot) -> Option<&Value> {
        slot.find(self).ok().map(|i| &self.fields[i].1)
    }

    /// The value of the field of `slot` if it is a number.
    #[inline]
    pub fn number_slot(&self, slot: &FieldSlot) -> Option<f64> {
        self.get_slot(slot).and_then(Value::as_f64)
    }

    /// The value of the field of `slot`, to change in place.
    #[inline]
    pub fn get_slot_mut(&mut self, slot: &FieldSlot) -> Option<&mut Value> {
        slot.find(self).ok().map(|i| &mut self.fields[i].1)
    }

    /// Sets the field of `slot` to `value`, replacing any earlier value.
    #[inline]
    pub fn set_slot(&mut self, slot: &FieldSlot, value: Value) {
        match slot.find(self) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => {
                self.fields.insert(i, (slot.name, value));
                slot.at.set(i);
            }
        }
    }

    /// Removes the field of `slot`, returning its value.
    #[inline]
    pub fn remove_slot(&mut self, slot: &FieldSlot) -> Option<Value> {
        slot.find(self).ok().map(|i| self.fields.remove(i).1)
    }

    /// Where field `name` is in this record, for [`Record::set_at`].
    pub fn position(&self, name: &FieldName) -> Option<usize> {
        self.find_named(name).ok()
    }

    /// Sets the value of the field at `position` (from [`Record::position`] on a record
    /// with the same fields); a position past the end does nothing.
    #[inline]
    pub fn set_at(&mut self, position: usize, value: Value) {
        if let Some(field) = self.fields.get_mut(position) {
            field.1 = value;
        }
    }

    /// The value of field `name`, if the record has it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.find(name).ok().map(|i| &self.fields[i].1)
    }

    /// The value of field `name` if it is a number.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(Value::as_f64)
    }

    /// Sets field `name` to `value`, replacing any earlier value.
    pub fn set(&mut self, name: &str, value: Value) {
        match self.find(name) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (FieldName::new(name), value)),
        }
    }

    /// As [`Record::set`], sharing the name (no allocation for a new field).
    pub fn set_named(&mut self, name: &FieldName, value: Value) {
        match self.find_named(name) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (*name, value)),
        }
    }

    /// The value of field `name`, to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.find(name).ok().map(|i| &mut self.fields[i].1)
    }

    /// As [`Record::get_mut`], by a shared name.
    pub fn get_named_mut(&mut self, name: &FieldName) -> Option<&mut Value> {
        self.find_named(name).ok().map(|i| &mut self.fields[i].1)
    }

    /// As [`Record::remove`], by a shared name.
    pub fn remove_named(&mut self, name: &FieldName) -> Option<Value> {
        self.find_named(name).ok().map(|i| self.fields.remove(i).1)
    }

    /// Removes field `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.find(name).ok().map(|i| self.fields.remove(i).1)
    }

    /// The fields, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The field names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(k, _)| k.as_str())
    }

    /// How many fields the record has.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the record has no field.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// A record with this one's fields, each [`Value::Missing`], and room for `extra` more
    /// (tasks down the chain add them without moving the record): a [`Record::template`]'s
    /// copy to fill.
    pub fn blank_with_room(&self, extra: usize) -> Record {
        let mut fields = Vec::with_capacity(self.fields.len() + extra);
        fields.extend(self.fields.iter().map(|(name, _)| (*name, Value::Missing)));
        Record { fields }
    }

    /// A record with room for `n` fields.
    pub fn with_capacity(n: usize) -> Record {
        Record {
            fields: Vec::with_capacity(n),
        }
    }

    /// The record as a JSON object (missing values are null): the form of records on the
    /// `alerts` and `features` output streams, and of kept records before segments.
    pub fn encode(&self) -> Vec<u8> {
        let map: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| {
                let j = match v {
                    Value::Number(x) => serde_json::Number::from_f64(*x)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                    Value::Text(s) => serde_json::Value::String(s.to_string()),
                    Value::Missing => serde_json::Value::Null,
                };
                (k.as_str().to_string(), j)
            })
            .collect();
        serde_json::to_vec(&map).unwrap_or_default()
    }

    /// Reads [`Record::encode`]'s form. The error says where the bytes are broken, never
    /// what they hold (it may end up in the dead-letter stream).
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| {
                let what = match e.classify() {
                    serde_json::error::Category::Io => "a read",
                    serde_json::error::Category::Syntax => "a syntax",
                    serde_json::error::Category::Data => "a data",
                    serde_json::error::Category::Eof => "an end-of-input",
                };
                format!(
                    "not a record (JSON: {what} error at line {}, column {})",
                    e.line(),
                    e.column()
                )
            })?;
        let mut r = Record::with_capacity(map.len());
        for (k, v) in map {
            let value = match v {
                serde_json::Value::Null => Value::Missing,
                serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
                serde_json::Value::String(s) => Value::Text(s.into()),
                serde_json::Value::Bool(_) => return Err(format!("field '{k}': a boolean")),
                serde_json::Value::Array(_) => return Err(format!("field '{k}': a list")),
                serde_json::Value::Object(_) => return Err(format!("field '{k}': an object")),
            };
            // serde_json's map is sorted: appending keeps the order.
            r.fields.push((FieldName::new(&k), value));
        }
        Ok(r)
    }
}

/// The first bytes of a segment (a JSON record starts with `{`).
const SEGMENT_MAGIC: &[u8; 4] = b"MFS1";

/// Whether `bytes` is a segment (else: one record, as [`Record::encode`] writes it).
pub fn is_segment(bytes: &[u8]) -> bool {
    bytes.starts_with(SEGMENT_MAGIC)
}

// A value's kind in a column, two bits each.
const ABSENT: u8 = 0;
const MISSING: u8 = 1;
const NUMBER: u8 = 2;
const TEXT: u8 = 3;

// How a column's numbers are stored.
const NUM_DECIMAL: u8 = 0;
const NUM_F64: u8 = 1;
// How a column's texts are stored.
const TEXT_RAW: u8 = 0;
const TEXT_DICT: u8 = 1;
const TEXT_HEX: u8 = 2;

/// The most records a segment holds.
pub const MAX_SEGMENT_RECORDS: usize = 1 << 20;
/// The most values (records × columns) a segment holds: a reader never builds more than
/// this from one stored value, however few bytes claim it. Writers start a new segment
/// well before ([`SegmentBuilder::is_full`]).
pub const MAX_SEGMENT_VALUES: usize = 1 << 24;

/// Decimal places tried for numbers.
const MAX_DECIMALS: u32 = 6;
/// Distinct values up to which a text column is a dictionary.
const MAX_DICT: usize = 4096;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

/// The decimal places (up to [`MAX_DECIMALS`]) of a column's most precise number, if every
/// number is exact at some: the places [`encode_numbers`] tries. A value already exact at
/// the places found so far costs one try.
fn column_decimals(numbers: &[f64]) -> Option<u32> {
    let mut places = 0;
    for &x in numbers {
        if !exact_at(x, places) {
            places = (places + 1..=MAX_DECIMALS).find(|&s| exact_at(x, s))?;
        }
    }
    Some(places)
}

/// A column's numbers: as integers of the column's decimal places where every one comes
/// back exactly at those places (checked as each is written: a value exact at fewer places
/// may not be at more, a large one overflows), else as doubles.
fn encode_numbers(out: &mut Vec<u8>, numbers: &[f64]) {
    if let Some(s) = column_decimals(numbers) {
        let start = out.len();
        out.push(NUM_DECIMAL);
        out.push(s as u8);
        let scale = POW10[s as usize];
        if numbers.iter().all(|&x| {
            let scaled = (x * scale).round();
            let exact = scaled.abs() < 9.0e15 && scaled as i64 as f64 / scale == x;
            if exact {
                put_varint(out, zigzag(scaled as i64));
            }
            exact
        }) {
            return;
        }
        out.truncate(start);
    }
    out.push(NUM_F64);
    for x in numbers {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Whether `x` comes back exactly from an integer of `s` decimal places (one a double
/// holds exactly).
fn exact_at(x: f64, s: u32) -> bool {
    let scaled = (x * POW10[s as usize]).round();
    scaled.abs() < 9.0e15 && scaled as i64 as f64 / POW10[s as usize] == x
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The prefix and the length of the lowercase-hex suffix of the first text (an even
/// number of digits, at least 8), if it has one: the shape every text of a column of
/// pseudonyms has ([`encode_texts_plain`] checks the others).
fn hex_shape<'a>(texts: &[&'a str]) -> Option<(&'a str, usize)> {
    let first = texts.first()?;
    let digits = first
        .bytes()
        .rev()
        .take_while(|b| HEX[usize::from(*b)] < 16)
        .count();
    let digits = digits - digits % 2;
    (digits >= 8).then(|| (&first[..first.len() - digits], digits))
}

/// Each byte's value as a lowercase hex digit, or 0xff.
const HEX: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < 16 {
        t[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Appends the bytes `hex` (lowercase hex digits, an even number) spells; `false`, with
/// some appended, if it is not that.
fn push_hex(out: &mut Vec<u8>, hex: &[u8]) -> bool {
    let (pairs, rest) = hex.as_chunks::<2>();
    rest.is_empty()
        && pairs.iter().all(|[h, l]| {
            let (h, l) = (HEX[usize::from(*h)], HEX[usize::from(*l)]);
            out.push(h << 4 | l);
            (h | l) < 16
        })
}

/// The records, column by column, in one segment: what a checkpoint writes for an output
/// stream of records.
pub fn encode_segment(records: &[Record]) -> Vec<u8> {
    let mut b = SegmentBuilder::default();
    for r in records {
        b.push(r.clone());
    }
    b.finish()
}

/// One column of a segment being built.
#[derive(Default)]
struct Column {
    name: Option<FieldName>,
    kinds: Vec<u8>,
    numbers: Vec<f64>,
    texts: Vec<CompactString>,
}

impl Column {
    /// Adds a record's value.
    #[inline(always)]
    fn push(&mut self, value: Value) {
        self.kinds.push(match value {
            Value::Missing => MISSING,
            Value::Number(x) => {
                self.numbers.push(x);
                NUMBER
            }
            Value::Text(t) => {
                self.texts.push(t);
                TEXT
            }
        });
    }
}

/// Builds a segment record by record: each record's values go into their columns as it
/// arrives (the record itself is dropped), so a checkpoint's records take about the bytes
/// they will take in the store, and are read once, in order.
#[derive(Default)]
pub struct SegmentBuilder {
    /// Sorted by name.
    columns: Vec<Column>,
    records: usize,
}

impl SegmentBuilder {
    /// Records added so far.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether the segment should be written now and a new one begun (a quarter of
    /// [`MAX_SEGMENT_VALUES`], or of [`MAX_SEGMENT_RECORDS`]).
    pub fn is_full(&self) -> bool {
        self.records.saturating_mul(self.columns.len().max(1)) >= MAX_SEGMENT_VALUES / 4
            || self.records >= MAX_SEGMENT_RECORDS / 4
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Adds a record.
    pub fn push(&mut self, record: Record) {
        // The common case: the record has exactly the columns so far, in their order.
        if record.fields.len() == self.columns.len()
            && record
                .fields
                .iter()
                .zip(&self.columns)
                .all(|((name, _), col)| col.name.is_some_and(|n| n.same(name)))
        {
            for ((_, value), col) in record.fields.into_iter().zip(&mut self.columns) {
                col.push(value);
            }
            self.records += 1;
            return;
        }
        let mut c = 0;
        for (name, value) in record.fields {
            // Columns before this field's that the record lacks.
            while let Some(col) = self.columns.get_mut(c)
                && !col.name.is_some_and(|n| n.same(&name))
                && col
                    .name
                    .is_some_and(|n| n.cmp_to(name.key, name.text).is_lt())
            {
                col.kinds.push(ABSENT);
                c += 1;
            }
            if !self
                .columns
                .get(c)
                .is_some_and(|col| col.name.is_some_and(|n| n.same(&name)))
            {
                // A new column: absent from every earlier record.
                self.columns.insert(
                    c,
                    Column {
                        name: Some(name),
                        kinds: vec![ABSENT; self.records],
                        ..Column::default()
                    },
                );
            }
            self.columns[c].push(value);
            c += 1;
        }
        for col in &mut self.columns[c..] {
            col.kinds.push(ABSENT);
        }
        self.records += 1;
    }

    /// The segment's bytes; the builder is empty again (it keeps its buffers, for the next
    /// segment).
    pub fn finish(&mut self) -> Vec<u8> {
        let n = std::mem::take(&mut self.records);
        // A column no record of this segment has (a column of an earlier segment) is left
        // out; a builder is reused across checkpoints.
        let present = |col: &Column| col.kinds.iter().any(|k| *k != ABSENT);
        let mut out = Vec::with_capacity(64 + n * 48);
        out.extend_from_slice(SEGMENT_MAGIC);
        put_varint(&mut out, n as u64);
        put_varint(
            &mut out,
            self.columns.iter().filter(|c| present(c)).count() as u64,
        );
        for col in &mut self.columns {
            if !present(col) {
                col.kinds.clear();
                continue;
            }
            put_bytes(&mut out, col.name.map_or("", |n| n.text).as_bytes());
            let kinds = &col.kinds;
            // The kinds: one byte when all are the same, else two bits each.
            if kinds.iter().all(|k| *k == kinds[0]) {
                out.push(kinds.first().copied().unwrap_or(ABSENT));
            } else {
                out.push(4);
                for chunk in kinds.chunks(4) {
                    out.push(
                        chunk
                            .iter()
                            .enumerate()
                            .fold(0u8, |b, (i, k)| b | (k << (2 * i))),
                    );
                }
            }
            if !col.numbers.is_empty() {
                encode_numbers(&mut out, &col.numbers);
            }
            if !col.texts.is_empty() {
                let texts: Vec<&str> = col.texts.iter().map(CompactString::as_str).collect();
                encode_texts(&mut out, &texts);
            }
            col.kinds.clear();
            col.numbers.clear();
            col.texts.clear();
        }
        out
    }
}

fn encode_texts(out: &mut Vec<u8>, texts: &[&str]) {
    if mostly_distinct(texts) {
        return encode_texts_plain(out, texts);
    }
    let mut index: std::collections::HashMap<&str, u32, Fnv> =
        std::collections::HashMap::with_capacity_and_hasher(256, Fnv);
    for t in texts {
        // Past either bound a dictionary cannot be chosen: stop counting.
        if index.len() > MAX_DICT || index.len() * 2 > texts.len() {
            break;
        }
        let next = index.len() as u32;
        index.entry(t).or_insert(next);
    }
    // A dictionary only pays when values repeat.
    if index.len() <= MAX_DICT && index.len() * 2 <= texts.len() {
        let mut dict: Vec<&str> = index.keys().copied().collect();
        dict.sort_unstable();
        for (i, d) in dict.iter().enumerate() {
            index.insert(d, i as u32);
        }
        out.push(TEXT_DICT);
        put_varint(out, dict.len() as u64);
        for d in &dict {
            put_bytes(out, d.as_bytes());
        }
        for t in texts {
            put_varint(out, u64::from(index.get(t).copied().unwrap_or(0)));
        }
    } else {
        encode_texts_plain(out, texts);
    }
}

/// Whether the first values of a long column are nearly all distinct (pseudonyms, shifted
/// dates): a dictionary would not pay, and counting every distinct value to find that out
/// costs more than the rest of the segment's encoding.
fn mostly_distinct(texts: &[&str]) -> bool {
    const SAMPLE: usize = 128;
    if texts.len() < 4 * SAMPLE {
        return false;
    }
    let mut sample: Vec<&str> = texts[..SAMPLE].to_vec();
    sample.sort_unstable();
    sample.dedup();
    sample.len() * 4 > SAMPLE * 3
}

/// A text column as hex bytes after a common prefix, or as raw texts.
fn encode_texts_plain(out: &mut Vec<u8>, texts: &[&str]) {
    if let Some((prefix, digits)) = hex_shape(texts) {
        // Decoded as checked, in one pass; a text that breaks the pattern undoes it.
        let start = out.len();
        out.push(TEXT_HEX);
        put_bytes(out, prefix.as_bytes());
        put_varint(out, digits as u64);
        out.reserve(texts.len() * digits / 2);
        let width = prefix.len() + digits;
        if texts.iter().all(|t| {
            t.len() == width
                && t.starts_with(prefix)
                && push_hex(out, &t.as_bytes()[prefix.len()..])
        }) {
            return;
        }
        out.truncate(start);
    }
    {
        out.push(TEXT_RAW);
        for t in texts {
            put_bytes(out, t.as_bytes());
        }
    }
}

/// FNV-1a, for the dictionary of a text column (short keys, no adversary: the node's
/// own de-identified values).
#[derive(Default, Clone, Copy)]
struct Fnv;

/// The running hash of [`Fnv`].
struct FnvHasher(u64);

impl std::hash::BuildHasher for Fnv {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Reads segment bytes; errors say where they are broken, never what they hold.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, what: &str) -> String {
        format!("a broken segment of records ({what} at byte {})", self.at)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.at).ok_or_else(|| self.fail("ends"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| self.fail("ends"))?;
        let b = &self.bytes[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(self.fail("an over-long number"))
    }

    /// A count of at most `max` (each item takes at least a byte, or a quarter for kinds).
    fn count(&mut self, max: usize) -> Result<usize, String> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| self.fail("an impossible count"))
    }

    fn text(&mut self) -> Result<&'a str, String> {
        let n = self.count(self.bytes.len())?;
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| self.fail("text that is not UTF-8"))
    }
}

/// Reads [`encode_segment`]'s bytes back into records.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<Record>, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != SEGMENT_MAGIC {
        return Err(r.fail("no segment header"));
    }
    // A column whose values are all of one kind takes one byte whatever the count: the
    // count is bounded by what a checkpoint can hold, not by the bytes.
    let n = r.count(MAX_SEGMENT_RECORDS)?;
    let columns = r.count(bytes.len())?;
    if n.saturating_mul(columns) > MAX_SEGMENT_VALUES {
        return Err(r.fail("more values than a segment holds"));
    }
    let mut records: Vec<Record> = (0..n).map(|_| Record::with_capacity(columns)).collect();
    let mut kinds = vec![ABSENT; n];
    for _ in 0..columns {
        let name = FieldName::new(r.text()?);
        match r.byte()? {
            k @ 0..=3 => kinds.iter_mut().for_each(|x| *x = k),
            4 => {
                let packed = r.take(n.div_ceil(4))?;
                for (i, k) in kinds.iter_mut().enumerate() {
                    *k = (packed[i / 4] >> (2 * (i % 4))) & 3;
                }
            }
            _ => return Err(r.fail("an unknown kind")),
        }
        let count = |kind: u8| kinds.iter().filter(|k| **k == kind).count();
        let mut numbers = Vec::with_capacity(count(NUMBER));
        if numbers.capacity() > 0 {
            match r.byte()? {
                NUM_DECIMAL => {
                    let s = r.byte()?;
                    let scale = *POW10
                        .get(usize::from(s))
                        .ok_or_else(|| r.fail("too many decimal places"))?;
                    for _ in 0..numbers.capacity() {
                        numbers.push(unzigzag(r.varint()?) as f64 / scale);
                    }
                }
                NUM_F64 => {
                    for _ in 0..numbers.capacity() {
                        let b = r.take(8)?;
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        numbers.push(f64::from_le_bytes(a));
                    }
                }
                _ => return Err(r.fail("an unknown number encoding")),
            }
        }
        let wanted = count(TEXT);
        let mut texts: Vec<CompactString> = Vec::with_capacity(wanted.min(bytes.len()));
        if wanted > 0 {
            match r.byte()? {
                TEXT_RAW => {
                    for _ in 0..wanted {
                        texts.push(r.text()?.into());
                    }
                }
                TEXT_DICT => {
                    let k = r.count(MAX_DICT)?;
                    let dict = (0..k)
                        .map(|_| r.text().map(CompactString::from))
                        .collect::<Result<Vec<_>, _>>()?;
                    for _ in 0..wanted {
                        let i = r.count(k.saturating_sub(1))?;
                        texts.push(
                            dict.get(i)
                                .cloned()
                                .ok_or_else(|| r.fail("no such entry"))?,
                        );
                    }
                }
                TEXT_HEX => {
                    let prefix = r.text()?.to_string();
                    let digits = r.count(bytes.len().saturating_mul(2))?;
                    if digits % 2 == 1 {
                        return Err(r.fail("an odd number of hex digits"));
                    }
                    for _ in 0..wanted {
                        let raw = r.take(digits / 2)?;
                        let mut t = String::with_capacity(prefix.len() + digits);
                        t.push_str(&prefix);
                        medfed_protocol::hex::encode_into(&mut t, raw);
                        texts.push(t.into());
                    }
                }
                _ => return Err(r.fail("an unknown text encoding")),
            }
        }
        let (mut numbers, mut texts) = (numbers.into_iter(), texts.into_iter());
        for (rec, kind) in records.iter_mut().zip(&kinds) {
            let value = match *kind {
                ABSENT => continue,
                MISSING => Value::Missing,
                NUMBER => Value::Number(numbers.next().unwrap_or(f64::NAN)),
                _ => Value::Text(texts.next().unwrap_or_default()),
            };
            // Columns come in name order: appending keeps each record sorted.
            if rec
                .fields
                .last()
                .is_some_and(|(k, _)| k.cmp_to(name.key, name.text).is_ge())
            {
                return Err(r.fail("columns out of order"));
            }
            rec.fields.push((name, value));
        }
    }
    if r.at != bytes.len() {
        return Err(r.fail("bytes after the last column"));
    }
    Ok(records)
}

/// The records in a stored value: a segment, or one record as [`Record::encode`] wrote it
/// (a store an earlier medfed wrote).
pub fn decode_stored(bytes: &[u8]) -> Result<Vec<Record>, String> {
    if is_segment(bytes) {
        decode_segment(bytes)
    } else {
        Record::decode(bytes).map(|r| vec![r])
    }
}

/// The most bytes of a segment stored under one key. The store keeps a large value in a
/// region of a power of two of pages, so a segment stored whole wastes up to half its
/// region, and a segment just past a power of two fragmented a test store to 3.8 times its
/// data; chunks just under 32 KiB fill their regions.
pub const SEGMENT_CHUNK: usize = 32 * 1024 - 512;

/// The first four bytes of every chunk of a segment after its first.
const CHUNK_MAGIC: &[u8; 4] = b"MFC1";

/// A segment's bytes as the values to store under its key and then under the key with the
/// chunk's number (big-endian `u32`, from 1) appended: at most [`SEGMENT_CHUNK`] bytes
/// each, the first the segment's beginning, the others `MFC1` and what follows.
/// [`decode_chunked`] puts them back together from the values in key order.
pub fn segment_chunks(segment: &[u8]) -> Vec<&[u8]> {
    let (first, mut rest) = segment.split_at(segment.len().min(SEGMENT_CHUNK));
    let mut chunks = vec![first];
    while !rest.is_empty() {
        let (c, r) = rest.split_at(rest.len().min(SEGMENT_CHUNK - CHUNK_MAGIC.len()));
        chunks.push(c);
        rest = r;
    }
    chunks
}

/// The value to store for chunk `i` of [`segment_chunks`].
pub fn chunk_value(i: usize, chunk: &[u8]) -> Vec<u8> {
    if i == 0 {
        return chunk.to_vec();
    }
    let mut v = Vec::with_capacity(CHUNK_MAGIC.len() + chunk.len());
    v.extend_from_slice(CHUNK_MAGIC);
    v.extend_from_slice(chunk);
    v
}

/// The records of an output stream's stored values, in key order: whole segments, chunked
/// segments ([`segment_chunks`]) and single records an earlier medfed wrote. A chunk with
/// no segment before it, or a segment missing a chunk, is an error.
pub fn decode_chunked<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Record>, String> {
    let mut decoder = ChunkedDecoder::default();
    let mut records = Vec::new();
    for v in values {
        records.extend(decoder.push(v)?);
    }
    records.extend(decoder.finish()?);
    Ok(records)
}

/// [`decode_chunked`] one stored value at a time, for reading an output stream without
/// holding it whole: each value gives the records it completes (those of the segment
/// before it, once a new one begins), [`ChunkedDecoder::finish`] the last segment's.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    /// The segment being put back together from its chunks.
    pending: Option<Vec<u8>>,
    /// Values seen, to name one in errors.
    values: usize,
}

/// What is done with each whole stored value (a segment put back together, or a single
/// record) of [`ChunkedDecoder::push_with`].
pub type Whole<'a> = dyn FnMut(&[u8]) -> Result<(), String> + 'a;

impl ChunkedDecoder {
    /// Takes the next value in key order.
    pub fn push(&mut self, value: &[u8]) -> Result<Vec<Record>, String> {
        let mut records = Vec::new();
        self.push_with(value, &mut |whole| {
            records.extend(decode_stored(whole)?);
            Ok(())
        })?;
        Ok(records)
    }

    /// The records of the segment still being put together, if any.
    pub fn finish(&mut self) -> Result<Vec<Record>, String> {
        let mut records = Vec::new();
        self.finish_with(&mut |whole| {
            records.extend(decode_segment(whole)?);
            Ok(())
        })?;
        Ok(records)
    }

    /// As [`ChunkedDecoder::push`], handing each whole stored value to `whole` instead of
    /// decoding it ([`stored_field_names`], say).
    pub fn push_with(&mut self, value: &[u8], whole: &mut Whole<'_>) -> Result<(), String> {
        let i = self.values;
        self.values += 1;
        if let Some(rest) = value.strip_prefix(CHUNK_MAGIC) {
            self.pending
                .as_mut()
                .ok_or_else(|| format!("value {i}: a chunk of a segment with no beginning"))?
                .extend_from_slice(rest);
            return Ok(());
        }
        self.finish_with(whole)?;
        if is_segment(value) {
            self.pending = Some(value.to_vec());
            Ok(())
        } else {
            whole(value).map_err(|e| format!("value {i}: {e}"))
        }
    }

    /// As [`ChunkedDecoder::finish`], handing the last segment to `whole`.
    pub fn finish_with(&mut self, whole: &mut Whole<'_>) -> Result<(), String> {
        match self.pending.take() {
            Some(segment) => whole(&segment),
            None => Ok(()),
        }
    }
}

/// The field names of the records in a stored value (a segment or a single record), read
/// without decoding the values: a segment's column names, walking past each column's
/// values. What else decoding would find wrong with the values is left to decoding.
pub fn stored_field_names(bytes: &[u8]) -> Result<Vec<String>, String> {
    if !is_segment(bytes) {
        return Record::decode(bytes).map(|r| r.names().map(str::to_string).collect());
    }
    let mut r = Reader { bytes, at: 0 };
    r.take(4)?;
    let n = r.count(MAX_SEGMENT_RECORDS)?;
    let columns = r.count(bytes.len())?;
    if n.saturating_mul(columns) > MAX_SEGMENT_VALUES {
        return Err(r.fail("more values than a segment holds"));
    }
    // Each column takes at least two bytes: a count of hostile bytes allocates no more.
    let mut names = Vec::with_capacity(columns.min(bytes.len() / 2));
    for _ in 0..columns {
        names.push(r.text()?.to_string());
        // How many numbers and texts the column holds, from its kinds.
        let (numbers, texts) = match r.byte()? {
            k @ 0..=3 => (
                if k == NUMBER { n } else { 0 },
                if k == TEXT { n } else { 0 },
            ),
            4 => {
                let packed = r.take(n.div_ceil(4))?;
                let kind = |i: usize| (packed[i / 4] >> (2 * (i % 4))) & 3;
                (
                    (0..n).filter(|i| kind(*i) == NUMBER).count(),
                    (0..n).filter(|i| kind(*i) == TEXT).count(),
                )
            }
            _ => return Err(r.fail("an unknown kind")),
        };
        if numbers > 0 {
            match r.byte()? {
                NUM_DECIMAL => {
                    r.byte()?;
                    for _ in 0..numbers {
                        r.varint()?;
                    }
                }
                NUM_F64 => {
                    r.take(numbers.saturating_mul(8))?;
                }
                _ => return Err(r.fail("an unknown number encoding")),
            }
        }
        if texts > 0 {
            match r.byte()? {
                TEXT_RAW => {
                    for _ in 0..texts {
                        r.text()?;
                    }
                }
                TEXT_DICT => {
                    let k = r.count(MAX_DICT)?;
                    for _ in 0..k {
                        r.text()?;
                    }
                    for _ in 0..texts {
                        r.count(k.saturating_sub(1))?;
                    }
                }
                TEXT_HEX => {
                    r.text()?;
                    let digits = r.count(bytes.len().saturating_mul(2))?;
                    if digits % 2 == 1 {
                        return Err(r.fail("an odd number of hex digits"));
                    }
                    r.take((digits / 2).saturating_mul(texts))?;
                }
                _ => return Err(r.fail("an unknown text encoding")),
            }
        }
    }
    if r.at != bytes.len() {
        return Err(r.fail("bytes after the last column"));
    }
    Ok(names)
}

/// How many records a stored value begins, read from its header without decoding the
/// rest: a segment's count, 1 for a single record, 0 for a later chunk of a segment. A
/// segment whose count cannot be read is an error; what else decoding would find wrong
/// with the value is left to decoding.
pub fn records_begun(value: &[u8]) -> Result<usize, String> {
    if value.starts_with(CHUNK_MAGIC) {
        return Ok(0);
    }
    if !is_segment(value) {
        return Ok(1);
    }
    let mut r = Reader {
        bytes: value,
        at: SEGMENT_MAGIC.len(),
    };
    r.count(MAX_SEGMENT_RECORDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_read_without_decoding_and_match_the_decoded_records() {
        let mut records = Vec::new();
        for i in 0..3000u32 {
            let mut r = Record::default();
            r.set("glu", Value::Number(f64::from(i % 200) + 0.5));
            r.set("x", Value::Number(f64::from(i).sqrt()));
            r.set(
                "sex",
                Value::Text(if i % 2 == 0 { "F" } else { "M" }.into()),
            );
            r.set(
                "patient",
                Value::Text(format!("v1:{:032x}", i * 7919).into()),
            );
            r.set("note", Value::Text(format!("n{i}").into()));
            if i % 3 == 0 {
                r.set("bp", Value::Missing);
            }
            if i == 2999 {
                r.set("zz_late", Value::Number(1.0));
            }
            records.push(r);
        }
        let bytes = encode_segment(&records);
        let mut want: Vec<String> = decode_segment(&bytes)
            .unwrap()
            .iter()
            .flat_map(|r| r.names().map(str::to_string).collect::<Vec<_>>())
            .collect();
        want.sort();
        want.dedup();
        assert_eq!(stored_field_names(&bytes).unwrap(), want);
        // Through the chunks a store keeps, put back together.
        let mut names = Vec::new();
        let mut decoder = ChunkedDecoder::default();
        let mut collect = |whole: &[u8]| {
            names.extend(stored_field_names(whole)?);
            Ok(())
        };
        let chunks = segment_chunks(&bytes);
        assert!(chunks.len() > 1);
        for (i, c) in chunks.iter().enumerate() {
            decoder.push_with(&chunk_value(i, c), &mut collect).unwrap();
        }
        decoder.finish_with(&mut collect).unwrap();
        assert_eq!(names, want);
        // A single record, and broken bytes: errors, not panics.
        let one = records[0].encode();
        assert_eq!(stored_field_names(&one).unwrap().len(), records[0].len());
        for cut in [5, bytes.len() / 2, bytes.len() - 1] {
            assert!(stored_field_names(&bytes[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn a_field_slot_finds_its_field_in_records_laid_out_otherwise() {
        let glu = FieldSlot::new("glu");
        let mut a = Record::default();
        a.set("age", Value::Number(40.0));
        a.set("glu", Value::Number(120.0));
        let mut b = Record::default();
        b.set("glu", Value::Number(99.0));
        // The slot remembers place 1 from `a`; in `b` the field is at 0, and in `c` absent.
        assert_eq!(a.number_slot(&glu), Some(120.0));
        assert_eq!(b.number_slot(&glu), Some(99.0));
        assert_eq!(a.number_slot(&glu), Some(120.0));
        let mut c = Record::default();
        c.set("bmi", Value::Number(30.0));
        c.set("zzz", Value::Number(1.0));
        assert_eq!(c.get_slot(&glu), None);
        // Another field at the remembered place is not taken for it.
        assert_eq!(c.remove_slot(&glu), None);
        c.set_slot(&glu, Value::Number(5.0));
        assert_eq!(c.names().collect::<Vec<_>>(), ["bmi", "glu", "zzz"]);
        assert_eq!(c.remove_slot(&glu), Some(Value::Number(5.0)));
        assert_eq!(c.names().collect::<Vec<_>>(), ["bmi", "zzz"]);
        if let Some(v) = b.get_slot_mut(&glu) {
            *v = Value::Missing;
        }
        assert_eq!(b.get("glu"), Some(&Value::Missing));
        a.set_slot(&glu, Value::Number(1.0));
        assert_eq!(a.number("glu"), Some(1.0));
    }

    fn rec(fields: &[(&str, Value)]) -> Record {
        let mut r = Record::default();
        for (k, v) in fields {
            r.set(k, v.clone());
        }
        r
    }

    #[test]
    fn fields_stay_sorted_and_unique() {
        let mut r = rec(&[("b", Value::Number(1.0)), ("a", Value::Missing)]);
        r.set("b", Value::Number(2.0));
        r.set_named(&FieldName::new("c"), Value::Text("x".into()));
        assert_eq!(r.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(r.number("b"), Some(2.0));
        assert_eq!(r.remove("a"), Some(Value::Missing));
        assert_eq!(r.len(), 2);
        assert_eq!(format!("{r:?}"), r#"{"b": Number(2.0), "c": Text("x")}"#);
        assert_eq!(Record::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn a_segment_gives_back_every_record_as_it_was() {
        let pseudonym = |i: u32| format!("p1-{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
        let records: Vec<Record> = (0..1000u32)
            .map(|i| {
                let mut r = rec(&[
                    ("patient", Value::Text(pseudonym(i).into())),
                    ("glu", Value::Number(f64::from(80 + i % 120))),
                    ("ped", Value::Number(f64::from(i % 1000) / 1000.0)),
                    ("z", Value::Number(f64::from(i) / 7.0 - 3.0)),
                    (
                        "sex",
                        Value::Text(if i % 2 == 0 { "F" } else { "M" }.into()),
                    ),
                    ("note", Value::Text(format!("free text {i}").into())),
                ]);
                if i % 10 == 0 {
                    r.set("glu", Value::Missing);
                }
                if i % 7 == 0 {
                    r.remove("ped");
                    r.set("extra", Value::Number(-1.5));
                }
                r
            })
            .collect();
        let bytes = encode_segment(&records);
        assert!(is_segment(&bytes));
        assert_eq!(decode_segment(&bytes).unwrap(), records);
        assert_eq!(decode_stored(&bytes).unwrap(), records);
        // About the bytes the values need: 16 for the pseudonym, 8 for z, a few others.
        let per_record = bytes.len() as f64 / records.len() as f64;
        assert!(per_record < 45.0, "{per_record} bytes a record");
        assert_eq!(decode_segment(&encode_segment(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_column_that_only_starts_like_pseudonyms_is_kept_as_text() {
        // The first text sets the shape; a later one breaks it at its last digit, its
        // length, its prefix or its case: the column falls back to plain texts, unchanged.
        let first = "p1-00112233445566778899aabbccddeeff";
        for other in [
            "p1-00112233445566778899aabbccddeefg",
            "p1-00112233445566778899aabbccddeef",
            "p2-00112233445566778899aabbccddeeff",
            "p1-00112233445566778899AABBCCDDEEFF",
            "p1-0011223344556677",
        ] {
            let records = vec![
                rec(&[("p", Value::Text(first.into()))]),
                rec(&[("p", Value::Text(other.into()))]),
            ];
            let bytes = encode_segment(&records);
            assert_eq!(decode_segment(&bytes).unwrap(), records, "{other}");
        }
        // Distinct pseudonyms (repeated ones would make a dictionary): 16 bytes each.
        let distinct: Vec<Record> = ["00", "01", "02"]
            .iter()
            .map(|end| {
                let p = format!("{}{end}", &first[..first.len() - 2]);
                rec(&[("p", Value::Text(p.into()))])
            })
            .collect();
        let bytes = encode_segment(&distinct);
        assert_eq!(decode_segment(&bytes).unwrap(), distinct);
        assert!(
            bytes.len() < 2 * first.len(),
            "pseudonyms are stored as bytes"
        );
    }

    #[test]
    fn a_slot_finds_its_field_wherever_records_put_it() {
        let slot = FieldSlot::new("m");
        let shapes = [
            vec!["a", "m", "z"],
            vec!["m"],
            vec!["a", "b"],
            vec!["x", "y"],
            vec![],
            vec!["a", "b", "c", "m"],
            vec!["n", "o", "p"],
            vec!["a", "m"],
        ];
        // Each shape twice, so the place remembered from one record is tried on the next
        // (found, absent here, absent elsewhere).
        for names in shapes.iter().flat_map(|s| [s, s]) {
            let mut r = Record::default();
            for n in names {
                r.set(n, Value::Number(1.0));
            }
            let has = names.contains(&"m");
            assert_eq!(r.get_slot(&slot).is_some(), has, "{names:?}");
            let mut with = r.clone();
            with.set_slot(&slot, Value::Number(2.0));
            assert_eq!(with.number("m"), Some(2.0));
            assert_eq!(with.len(), names.len() + usize::from(!has));
            assert!(
                with.names().is_sorted(),
                "{:?}",
                with.names().collect::<Vec<_>>()
            );
            let mut without = r.clone();
            assert_eq!(without.remove_slot(&slot).is_some(), has);
            assert_eq!(without.get("m"), None);
        }
    }

    #[test]
    fn numbers_are_exact_whatever_their_digits() {
        let xs = [
            0.1,
            -0.25,
            1e-7,
            123_456.654_321,
            f64::MAX,
            f64::MIN_POSITIVE,
            2.0f64.powi(60),
            -0.0,
            1.0 / 3.0,
        ];
        for x in xs {
            let r = vec![rec(&[("x", Value::Number(x))])];
            let back = decode_segment(&encode_segment(&r)).unwrap();
            let y = back[0].number("x").unwrap();
            // -0.0 comes back as 0.0 (equal, as numbers).
            assert!(
                y == x && (x == 0.0 || y.to_bits() == x.to_bits()),
                "{x} came back as {y}"
            );
        }
    }

    #[test]
    fn a_large_number_beside_a_precise_one_comes_back_exactly() {
        // Found by the record_segment fuzz target: four places for the column made
        // -3.5e15 overflow its integer and come back as -9.2e14.
        let records = vec![
            rec(&[("x", Value::Number(-3_542_272_897_318_814.0))]),
            rec(&[("x", Value::Number(153_271.381_9))]),
        ];
        assert_eq!(decode_segment(&encode_segment(&records)).unwrap(), records);
    }

    #[test]
    fn chunked_segments_read_back_whole_and_a_lost_chunk_is_an_error() {
        // Pseudonym-like texts: about 20 bytes a record, so this segment takes 3+ chunks.
        let records: Vec<Record> = (0..5_000)
            .map(|i| {
                rec(&[
                    ("n", Value::Number(f64::from(i))),
                    ("p", Value::Text(format!("p1-{:032x}", i * 7919).into())),
                ])
            })
            .collect();
        let mut b = SegmentBuilder::default();
        for r in &records {
            b.push(r.clone());
        }
        let bytes = b.finish();
        let chunks = segment_chunks(&bytes);
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        let values: Vec<Vec<u8>> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| chunk_value(i, c))
            .collect();
        assert!(values.iter().all(|v| v.len() <= SEGMENT_CHUNK));
        // Beside an old single-record value and a whole segment, in key order.
        let old = rec(&[("n", Value::Number(-1.0))]);
        let whole = encode_segment(&records[..3]);
        let mut stored: Vec<&[u8]> = vec![];
        let old_bytes = old.encode();
        stored.push(&old_bytes);
        stored.extend(values.iter().map(Vec::as_slice));
        stored.push(&whole);
        let mut expected = vec![old];
        expected.extend(records.iter().cloned());
        expected.extend(records[..3].iter().cloned());
        assert_eq!(decode_chunked(stored.iter().copied()).unwrap(), expected);
        // A lost middle chunk, a lost first chunk: errors, never fewer records.
        let mut lost = values.clone();
        lost.remove(1);
        assert!(decode_chunked(lost.iter().map(Vec::as_slice)).is_err());
        assert!(
            decode_chunked(values[1..].iter().map(Vec::as_slice))
                .unwrap_err()
                .contains("no beginning")
        );
        // The builder is reused: the next segment holds only its own records and columns.
        b.push(rec(&[("q", Value::Text("only".into()))]));
        assert_eq!(
            decode_segment(&b.finish()).unwrap(),
            vec![rec(&[("q", Value::Text("only".into()))])]
        );
    }

    #[test]
    fn broken_segments_are_errors_not_panics() {
        let records: Vec<Record> = (0..50)
            .map(|i| {
                rec(&[
                    ("a", Value::Number(f64::from(i))),
                    ("t", Value::Text("x".into())),
                ])
            })
            .collect();
        let bytes = encode_segment(&records);
        for cut in 0..bytes.len() {
            assert!(decode_segment(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode_segment(&extra).is_err());
        let mut huge = SEGMENT_MAGIC.to_vec();
        put_varint(&mut huge, u64::MAX);
        assert!(
            decode_segment(&huge)
                .unwrap_err()
                .contains("impossible count")
        );
        assert_eq!(
            decode_stored(br#"{"a":1}"#).unwrap(),
            vec![rec(&[("a", Value::Number(1.0))])]
        );
    }
}
