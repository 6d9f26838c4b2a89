//! What each column of a dataset is, and which columns no study or query may ever use.
//!
//! A column classed `identifier`, `patient-id`, `birth-date`, `date` or `zip` is never read
//! by a cohort, a feature, a target or a statistic, whatever `[policy.rules]` or an
//! approval says. A column's class comes from, in order:
//!
//! 1. the dataset's `[dataset.classes]` table in `node.toml`;
//! 2. for a dataset read from an `[[ingest]]` pipeline, the pipeline's `[[ingest.field]]`
//!    classes (and the `patient` pseudonym field);
//! 3. for a column nobody classed, its name (`ssn`, `mrn`, `email`, `dob`,
//!    `admission_date`, `patient_id`, ...). A column misread this way is released by
//!    classing it `value` in `[dataset.classes]`.
//!
//! Values never decide (one patient's cell could then change what the aggregator sees);
//! columns whose values look like identifiers or dates (social security numbers, e-mail
//! addresses, phone numbers, dates, URLs, IP addresses, mostly unique text such as names)
//! are pointed out to the operator to class ([`value_warnings`]).
//!
//! Everything else is a clinical value, usable where the policy allows it.

use std::collections::{BTreeMap, BTreeSet};

use crate::data::Table;
use crate::deid::{FieldClass, PATIENT};

/// Why a column has its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `[dataset.classes]` in node.toml.
    Declared,
    /// The ingest pipeline's `[[ingest.field]]`.
    Pipeline,
    /// Its name looks like an identifier's or a date's.
    Name,
}

/// The classes of a dataset's columns that are not plain clinical values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColumnClasses {
    classes: BTreeMap<String, (FieldClass, Source)>,
    /// Columns whose missing values a pipeline fills from other patients' values
    /// (`missing = "mean"` or `"median"`): one patient's value then moves many records.
    imputed: BTreeMap<String, &'static str>,
    /// Columns that stay in the hospital whatever the policy: a pipeline's model scores
    /// (`[[ingest.score]]`).
    local: std::collections::BTreeSet<String>,
}

/// Whether a column of this class may be used by a study or a query.
pub fn usable(class: FieldClass) -> bool {
    matches!(class, FieldClass::Value | FieldClass::Age)
}

fn class_name(class: FieldClass) -> &'static str {
    match class {
        FieldClass::Value => "a clinical value",
        FieldClass::Age => "an age",
        FieldClass::PatientId => "a patient identifier",
        FieldClass::Identifier => "an identifier",
        FieldClass::BirthDate => "a birth date",
        FieldClass::Date => "a date",
        FieldClass::Zip => "a ZIP code",
    }
}

impl ColumnClasses {
    /// The classes of a dataset's columns: declared, else by their names. Never by their
    /// values: whether a column may be used would then depend on its patients (one more
    /// date-like cell can tip it), and the aggregator would see that in the site's column
    /// list and refusals. What the values look like is told to the operator instead
    /// ([`value_warnings`]).
    pub fn for_table(table: &Table, declared: &BTreeMap<String, FieldClass>) -> ColumnClasses {
        ColumnClasses::for_columns(&table.columns, declared)
    }

    /// [`ColumnClasses::for_table`] of a table with `columns`.
    pub fn for_columns(
        columns: &[String],
        declared: &BTreeMap<String, FieldClass>,
    ) -> ColumnClasses {
        let mut classes = BTreeMap::new();
        for name in columns {
            if let Some(class) = declared.get(name) {
                classes.insert(name.clone(), (*class, Source::Declared));
            } else if let Some(class) = by_name(name) {
                classes.insert(name.clone(), (class, Source::Name));
            }
        }
        ColumnClasses {
            classes,
            imputed: BTreeMap::new(),
            local: Default::default(),
        }
    }

    /// The classes of a pipeline's kept records: the pipeline's own for its fields, the
    /// pseudonym field, then as for a table (declared first, then names and values).
    pub fn for_pipeline(
        columns: &[String],
        fields: &[crate::deid::FieldSpec],
        declared: &BTreeMap<String, FieldClass>,
    ) -> ColumnClasses {
        let mut out = ColumnClasses::for_columns(columns, declared);
        for f in fields {
            // A pipeline's identifier classes cannot be relaxed by a declaration: the
            // stricter one holds.
            if !usable(f.class) {
                out.classes
                    .insert(f.name.clone(), (f.class, Source::Pipeline));
            }
        }
        out.classes.insert(
            PATIENT.to_string(),
            (FieldClass::PatientId, Source::Pipeline),
        );
        for f in fields {
            let how = match f.missing {
                crate::deid::MissingPolicy::Mean => "mean",
                crate::deid::MissingPolicy::Median => "median",
                _ => continue,
            };
            out.imputed.insert(f.name.clone(), how);
        }
        out
    }

    /// Marks `columns` (a pipeline's score outputs) as never to be read by a study or a
    /// query.
    pub fn with_local_only<'a>(mut self, columns: impl IntoIterator<Item = &'a str>) -> Self {
        self.local.extend(columns.into_iter().map(str::to_string));
        self
    }

    /// Refuses the first of `columns` a differentially private release cannot read: one
    /// whose missing values are filled from other patients' values. Differential privacy's
    /// noise is for one patient changing one record; a running mean or median copies one
    /// patient's value into every later record missing it.
    pub fn check_private<'a>(
        &self,
        dataset: &str,
        columns: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for c in columns {
            if let Some(how) = self.imputed.get(c) {
                return Err(format!(
                    "column '{c}' of dataset '{dataset}' fills missing values with the {how} of \
                     other patients' (missing = \"{how}\"), so one patient moves many records: \
                     differential privacy does not cover it; use missing = \"indicator\" or \
                     \"drop\" for columns that differentially private studies read"
                ));
            }
        }
        Ok(())
    }

    /// The column naming each row's patient, if any (classed `patient-id`: the `patient`
    /// pseudonym of an ingest pipeline, or a declared or named one), by which differentially
    /// private releases count each patient once.
    pub fn patient_key(&self) -> Option<&str> {
        self.classes
            .iter()
            .filter(|(_, (class, _))| *class == FieldClass::PatientId)
            .map(|(name, (_, source))| (name.as_str(), source))
            // The pipeline's pseudonym first, then a declared column, then one by name.
            .min_by_key(|(name, source)| match source {
                Source::Pipeline if *name == PATIENT => 0,
                Source::Pipeline => 1,
                Source::Declared => 2,
                Source::Name => 3,
            })
            .map(|(name, _)| name)
    }

    /// The class of a column, and why (`None`: a clinical value nobody classed).
    pub fn class(&self, column: &str) -> Option<&(FieldClass, Source)> {
        self.classes.get(column)
    }

    /// Refuses the first of `columns` that no study may use, saying why.
    pub fn check<'a>(
        &self,
        dataset: &str,
        columns: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for c in columns {
            if self.local.contains(c) {
                return Err(format!(
                    "column '{c}' of dataset '{dataset}' is a model's score ([[ingest.score]]): \
                     scores stay in the hospital, no study or query reads them"
                ));
            }
            if let Some((class, source)) = self.classes.get(c)
                && !usable(*class)
            {
                let why = match source {
                    Source::Declared => "declared so in [dataset.classes]".to_string(),
                    Source::Pipeline => "so classed by its ingest pipeline".to_string(),
                    Source::Name => "by its name".to_string(),
                };
                return Err(format!(
                    "column '{c}' of dataset '{dataset}' is {} ({why}): identifiers, patient \
                     identifiers, dates and ZIP codes are never used by a study or a query",
                    class_name(*class)
                ));
            }
        }
        Ok(())
    }

    /// The columns no study may use, with their class and why, for `node check`.
    pub fn unusable(&self) -> Vec<(String, String)> {
        self.classes
            .iter()
            .filter(|(_, (class, _))| !usable(*class))
            .map(|(name, (class, source))| {
                let why = match source {
                    Source::Declared => "declared".to_string(),
                    Source::Pipeline => "pipeline".to_string(),
                    Source::Name => "by name".to_string(),
                };
                (name.clone(), format!("{} ({why})", class_name(*class)))
            })
            .collect()
    }
}

/// Columns nobody classed whose values mostly look like identifiers or dates (a column of
/// SSNs named `code`, say), with what they look like: for the operator to class
/// (`[dataset.classes]`), in `medfed node check` and the node's log. They decide nothing by
/// themselves.
pub fn value_warnings(
    table: &Table,
    declared: &BTreeMap<String, FieldClass>,
) -> Vec<(String, &'static str)> {
    table
        .columns
        .iter()
        .enumerate()
        .filter(|(_, name)| !declared.contains_key(*name) && by_name(name).is_none())
        .filter_map(|(j, name)| by_values(table, j).map(|(_, what)| (name.clone(), what)))
        .collect()
}

/// The words of a column name: split at non-alphanumerics and lower-to-upper case changes,
/// lower-cased.
fn words(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut prev_lower = false;
    for ch in name.chars() {
        if !ch.is_alphanumeric() {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            prev_lower = false;
            continue;
        }
        if ch.is_uppercase() && prev_lower && !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
        word.extend(ch.to_lowercase());
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The class a column's name suggests, if any.
fn by_name(name: &str) -> Option<FieldClass> {
    let w = words(name);
    let has = |x: &str| w.iter().any(|v| v == x);
    const IDENTIFIER: &[&str] = &[
        "ssn",
        "email",
        "mail",
        "phone",
        "telephone",
        "tel",
        "mobile",
        "cell",
        "fax",
        "address",
        "addr",
        "street",
        "city",
        "county",
        "url",
        "ip",
        "account",
        "acct",
        "license",
        "licence",
        "plate",
        "vin",
        "serial",
        "device",
        "uuid",
        "guid",
        "passport",
        "beneficiary",
        "insurance",
        "medicare",
        "medicaid",
        "nhs",
        "firstname",
        "lastname",
        "surname",
        "fullname",
        "givenname",
        "familyname",
        "maidenname",
        "initials",
    ];
    const PATIENT_ID: &[&str] = &["mrn", "id", "identifier", "patientid", "pid", "nhi"];
    const NAME_WITH: &[&str] = &[
        "first", "last", "given", "family", "full", "middle", "maiden", "patient", "sur",
    ];
    if has("dob") || has("birthdate") || has("birthday") || (has("birth") && !has("weight")) {
        return Some(FieldClass::BirthDate);
    }
    if has("date")
        || has("datetime")
        || has("timestamp")
        || has("admitted")
        || has("admission")
        || has("discharged")
        || has("discharge")
        || has("dod")
    {
        return Some(FieldClass::Date);
    }
    if w.iter().any(|v| v.starts_with("zip")) || has("postcode") || has("postal") {
        return Some(FieldClass::Zip);
    }
    // "medical_record_number", "patient_no", "chart_nr", "case_number": a number naming a
    // record, a patient, a chart or a case.
    const NUMBER: &[&str] = &["number", "no", "num", "nr", "nbr", "code", "key"];
    if w.iter().any(|v| PATIENT_ID.contains(&v.as_str()))
        || ((has("record") || has("patient") || has("chart") || has("case"))
            && w.iter().any(|v| NUMBER.contains(&v.as_str())))
    {
        return Some(FieldClass::PatientId);
    }
    if w.iter().any(|v| IDENTIFIER.contains(&v.as_str()))
        || (has("name") && (w.len() == 1 || w.iter().any(|v| NAME_WITH.contains(&v.as_str()))))
        || name.eq_ignore_ascii_case(PATIENT)
    {
        return Some(FieldClass::Identifier);
    }
    None
}

/// A test of a cell, the class it suggests, and what it looks like.
type Pattern = (fn(&str) -> bool, FieldClass, &'static str);

/// Cells of a column looked at to guess its class.
const SAMPLE: usize = 500;

/// The class a column's values suggest, if most of its non-empty cells look like
/// identifiers or dates, with the pattern's name.
fn by_values(table: &Table, column: usize) -> Option<(FieldClass, &'static str)> {
    let cells: Vec<&str> = (0..table.len())
        .map(|i| table.cell(i, column).trim())
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("na"))
        .take(SAMPLE)
        .collect();
    if cells.is_empty() {
        return None;
    }
    let most = |f: fn(&str) -> bool| cells.iter().filter(|c| f(c)).count() * 5 >= cells.len() * 4;
    let patterns: [Pattern; 8] = [
        (is_ssn, FieldClass::Identifier, "social security numbers"),
        (is_email, FieldClass::Identifier, "e-mail addresses"),
        (is_url, FieldClass::Identifier, "URLs"),
        (is_ip, FieldClass::Identifier, "IP addresses"),
        (is_date, FieldClass::Date, "dates"),
        (is_compact_date, FieldClass::Date, "dates written yyyymmdd"),
        (is_phone, FieldClass::Identifier, "phone numbers"),
        (is_long_code, FieldClass::Identifier, "identifying numbers"),
    ];
    for (test, class, what) in patterns {
        if most(test) {
            return Some((class, what));
        }
    }
    // Mostly unique text (names, addresses, free text): categories repeat, identifiers do
    // not.
    let text: Vec<&&str> = cells.iter().filter(|c| c.parse::<f64>().is_err()).collect();
    let distinct: BTreeSet<&&&str> = text.iter().collect();
    if text.len() >= 20 && text.len() * 5 >= cells.len() * 4 && distinct.len() * 2 >= text.len() {
        return Some((FieldClass::Identifier, "names or other unique text"));
    }
    None
}

fn digits(s: &str) -> usize {
    s.chars().filter(char::is_ascii_digit).count()
}

fn is_ssn(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 11
        && b[3] == b'-'
        && b[6] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 3 || i == 6 || c.is_ascii_digit())
}

fn is_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !s.contains(char::is_whitespace)
        }
        None => false,
    }
}

fn is_url(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://") || l.starts_with("www.")
}

fn is_ip(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.parse::<u8>().is_ok())
}

/// `yyyy-mm-dd`, `yyyy/mm/dd`, `dd/mm/yyyy`, `mm/dd/yyyy`, `dd.mm.yyyy`, `dd-mm-yyyy` (or a
/// two-digit year after `/`), with an optional time after a space or `T`.
fn is_date(s: &str) -> bool {
    let day = s.split(['T', ' ']).next().unwrap_or("");
    let parts: Vec<&str> = day.split(['-', '/', '.']).collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let n: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    match n.as_slice() {
        [4, 1..=2, 1..=2] | [1..=2, 1..=2, 4] => true,
        [1..=2, 1..=2, 2] => day.contains('/'),
        _ => false,
    }
}

/// `yyyymmdd` (years 1900 to 2099): no clinical measurement is an 8-digit number that
/// reads as a calendar date.
fn is_compact_date(s: &str) -> bool {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let (y, m, d) = (&s[..4], &s[4..6], &s[6..]);
    let n = |x: &str| x.parse::<u32>().unwrap_or(0);
    (1900..=2099).contains(&n(y)) && (1..=12).contains(&n(m)) && (1..=31).contains(&n(d))
}

/// Digits with phone separators (`+`, spaces, `-`, `.`, parentheses), 10 to 15 digits, and
/// at least one separator.
fn is_phone(s: &str) -> bool {
    let allowed = s
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '.' | '(' | ')'));
    let n = digits(s);
    allowed && (10..=15).contains(&n) && n < s.chars().count() && !s.contains("..")
}

/// An integer of 9 or more digits (record, account or card numbers): no clinical
/// measurement looks like one.
fn is_long_code(s: &str) -> bool {
    s.len() >= 9 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A pipeline's model scores stay in the hospital: no study or query may read them,
    /// whatever the policy lists.
    #[test]
    fn a_score_column_is_never_read() {
        let t = Table::from_reader(
            std::path::Path::new("kept"),
            "glu,risk\n120,0.4\n".as_bytes(),
        )
        .unwrap();
        let classes = ColumnClasses::for_table(&t, &BTreeMap::new()).with_local_only(["risk"]);
        assert!(classes.check("pima", ["glu"]).is_ok());
        let err = classes.check("pima", ["glu", "risk"]).unwrap_err();
        assert!(
            err.contains("model's score") && err.contains("'risk'"),
            "{err}"
        );
    }

    fn table(text: &str) -> Table {
        Table::from_reader(Path::new("t.csv"), text.as_bytes()).unwrap()
    }

    #[test]
    fn names_that_say_identifier_or_date() {
        for (name, class) in [
            ("ssn", FieldClass::Identifier),
            ("SSN", FieldClass::Identifier),
            ("patient_id", FieldClass::PatientId),
            ("PatientID", FieldClass::PatientId),
            ("mrn", FieldClass::PatientId),
            ("id", FieldClass::PatientId),
            ("email", FieldClass::Identifier),
            ("home_phone", FieldClass::Identifier),
            ("name", FieldClass::Identifier),
            ("first_name", FieldClass::Identifier),
            ("lastName", FieldClass::Identifier),
            ("street_address", FieldClass::Identifier),
            ("dob", FieldClass::BirthDate),
            ("birth_date", FieldClass::BirthDate),
            ("admission_date", FieldClass::Date),
            ("zip", FieldClass::Zip),
            ("patient", FieldClass::Identifier),
        ] {
            assert_eq!(by_name(name), Some(class), "{name}");
        }
        // Clinical columns, including words that only contain an identifier's letters.
        for name in [
            "glu",
            "bmi",
            "age",
            "type",
            "mean_radius",
            "time",
            "status",
            "inst",
            "drug_name",
            "hotel_days",
            "birth_weight",
            "bp",
            "diagnosis",
            "ped",
            "npreg",
            "progression",
        ] {
            assert_eq!(by_name(name), None, "{name}");
        }
    }

    #[test]
    fn values_that_look_like_identifiers_or_dates_are_pointed_out() {
        let t = table(
            "a,b,c,d,e,f,g,h\n\
             123-45-6789,x@y.org,1999-02-03,(555) 123-4567,http://a.b,10.0.0.1,1234567890,Yes\n\
             987-65-4321,u@v.com,2001-12-31,+1 555 987 6543,https://c.d,192.168.1.20,9876543210,No\n",
        );
        let warned: Vec<(String, &str)> = value_warnings(&t, &BTreeMap::new());
        let names: Vec<&str> = warned.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, vec!["a", "b", "c", "d", "e", "f", "g"]);
        assert_eq!(warned[0].1, "social security numbers");
        assert_eq!(warned[2].1, "dates");
        // They decide nothing: the class is the name's (none here) or the declaration's.
        assert_eq!(
            ColumnClasses::for_table(&t, &BTreeMap::new()),
            ColumnClasses::default()
        );
        let declared = BTreeMap::from([("a".to_string(), FieldClass::Identifier)]);
        assert!(value_warnings(&t, &declared).iter().all(|(c, _)| c != "a"));
        assert!(
            ColumnClasses::for_table(&t, &declared)
                .check("d", ["a"])
                .is_err()
        );
        // Mostly unique text (names) is pointed out; repeating categories are not.
        let names: String = (0..30)
            .map(|i| format!("Person{i} Smith,{}\n", ["Yes", "No"][i % 2]))
            .collect();
        let t = table(&format!("who,answer\n{names}"));
        let warned = value_warnings(&t, &BTreeMap::new());
        assert_eq!(
            warned,
            vec![("who".to_string(), "names or other unique text")]
        );
        // Numbers, including decimals, are not.
        let t = table("glu,ped,x\n148,0.627,12.5\n85,0.351,7.25\n");
        assert!(value_warnings(&t, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn declarations_win_and_pipelines_are_strict() {
        let t = table("ssn,glu\n123-45-6789,100\n987-65-4321,120\n");
        // A declared class replaces the guess (here wrongly, as an operator may).
        let declared = BTreeMap::from([("ssn".to_string(), FieldClass::Value)]);
        assert!(
            ColumnClasses::for_table(&t, &declared)
                .check("d", ["ssn"])
                .is_ok()
        );
        let declared = BTreeMap::from([("glu".to_string(), FieldClass::Identifier)]);
        let err = ColumnClasses::for_table(&t, &declared)
            .check("d", ["glu"])
            .unwrap_err();
        assert!(err.contains("declared so in [dataset.classes]"), "{err}");
        // A pipeline's patient field and its non-value fields are never usable, whatever is
        // declared.
        let t = table("patient,birth_year,glu\np1-ab,1980,100\n");
        let fields: Vec<crate::deid::FieldSpec> = toml::from_str::<Fields>(
            "[[field]]\nname = \"birth_year\"\nclass = \"birth-date\"\n[[field]]\nname = \"glu\"\n",
        )
        .unwrap()
        .field;
        let declared = BTreeMap::from([("birth_year".to_string(), FieldClass::Value)]);
        let classes = ColumnClasses::for_pipeline(&t.columns, &fields, &declared);
        let err = classes.check("d", ["glu", "patient"]).unwrap_err();
        assert!(
            err.contains("column 'patient'") && err.contains("a patient identifier"),
            "{err}"
        );
        assert!(classes.check("d", ["birth_year"]).is_err());
        assert!(classes.check("d", ["glu"]).is_ok());
    }

    /// Red team: identifiers written as HIPAA lists them but not as the guesser expects.
    /// A medical record number, a patient number, an admission date written yyyymmdd and a
    /// 5-digit ZIP code all read as clinical values today, so a rule that names them by
    /// mistake (as the attack suite's SSN) lets a cohort or a statistic use them.
    #[test]
    fn identifiers_under_other_names_and_formats_are_caught() {
        let rows: String = (0..30)
            .map(|i| {
                format!(
                    "{},{},{},{:05},{}\n",
                    4_471_230 + 17 * i,
                    100_200 + i,
                    20_230_101 + 100 * (i % 12) + i % 28,
                    2139 + 3 * i,
                    80 + i
                )
            })
            .collect();
        let t = table(&format!(
            "medical_record_number,patient_no,admitted,zip5,glu\n{rows}"
        ));
        let classes = ColumnClasses::for_table(&t, &BTreeMap::new());
        for c in ["medical_record_number", "patient_no", "admitted", "zip5"] {
            assert!(
                classes.check("d", [c]).is_err(),
                "column '{c}' is usable: {:?}",
                classes.class(c)
            );
        }
        assert!(classes.check("d", ["glu"]).is_ok());
    }

    /// Red team: whether a column may be used (and so whether it is in the hello's column
    /// list, and whether a query is refused "its values look like dates") is decided by
    /// its values, one patient's included: four dates and one other cell make a date
    /// column (80%), one more non-date patient makes it a clinical value. An ingested
    /// dataset's classes are guessed again for every query, as records arrive.
    #[test]
    fn one_patients_value_does_not_decide_whether_a_column_is_usable() {
        let base =
            "visit,glu\n2023-01-05,90\n2023-02-11,95\n2023-03-09,99\n2023-04-01,101\nlate,120\n";
        let usable = |text: &str| {
            ColumnClasses::for_table(&table(text), &BTreeMap::new())
                .check("d", ["visit"])
                .is_ok()
        };
        assert_eq!(
            usable(base),
            usable(&format!("{base}soon,130\n")),
            "one patient's cell decides whether the column is usable"
        );
    }

    #[derive(serde::Deserialize)]
    struct Fields {
        field: Vec<crate::deid::FieldSpec>,
    }
}
