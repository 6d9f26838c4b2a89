//! Why a record was quarantined, as the dead-letter stream keeps it: the reason, the field
//! and the patient's pseudonym, never a value of the record. A dead letter is kept in the
//! node's store for as long as the store, so it must hold nothing identifying beyond what
//! the de-identified records hold.

use serde::{Deserialize, Serialize};

/// The reason, field and pseudonym of one quarantined record. Stored as a small JSON
/// object, `{"reason": ..., "field": ..., "patient": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// What is wrong, in words that quote no value of the record ("not a number",
    /// "above the declared maximum 45").
    pub reason: String,
    /// The field (column) at fault, if one is.
    pub field: Option<String>,
    /// The patient's keyed pseudonym (the one the deidentify task gives), where the
    /// pipeline declares a patient-id field and the record's identifier could be read.
    pub patient: Option<String>,
}

impl Rejection {
    /// The reason of a dead letter whose text (from an earlier medfed) was removed.
    pub const EARLIER: &'static str = "quarantined by an earlier medfed version; its reason, which could quote a value, was removed";

    /// A reason about the whole record. It must not quote the record's values.
    pub fn new(reason: impl Into<String>) -> Rejection {
        Rejection {
            reason: reason.into(),
            field: None,
            patient: None,
        }
    }

    /// A reason about one field. It must not quote the field's value.
    pub fn in_field(field: impl Into<String>, reason: impl Into<String>) -> Rejection {
        Rejection {
            reason: reason.into(),
            field: Some(field.into()),
            patient: None,
        }
    }

    /// With the patient's pseudonym, if known.
    pub fn with_patient(mut self, patient: Option<String>) -> Rejection {
        self.patient = patient;
        self
    }

    /// The stored form: a JSON object.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of three optional strings serializes to JSON")
    }

    /// Reads a stored dead letter. One written by an earlier medfed (plain text, which could
    /// quote a value) is read as [`Rejection::earlier`], without its text.
    pub fn decode(bytes: &[u8]) -> Rejection {
        serde_json::from_slice(bytes).unwrap_or_else(|_| Rejection::earlier(bytes))
    }

    /// Whether `bytes` is a dead letter as this version stores it.
    pub fn is_current(bytes: &[u8]) -> bool {
        serde_json::from_slice::<Rejection>(bytes).is_ok()
    }

    /// What is kept of a dead letter an earlier medfed wrote as text: the field it named
    /// ("column 'bmi': ..."), and a reason that says the rest was removed.
    pub fn earlier(text: &[u8]) -> Rejection {
        let text = String::from_utf8_lossy(text);
        let field = text
            .strip_prefix("column '")
            .and_then(|rest| rest.split_once("':"))
            .map(|(name, _)| name.to_string());
        Rejection {
            reason: Rejection::EARLIER.into(),
            field,
            patient: None,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field '{field}': {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl From<&str> for Rejection {
    fn from(reason: &str) -> Rejection {
        Rejection::new(reason)
    }
}

impl From<String> for Rejection {
    fn from(reason: String) -> Rejection {
        Rejection::new(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_is_stored_as_a_small_json_object() {
        let r = Rejection::in_field("bmi", "above the declared maximum 45")
            .with_patient(Some("p1-00ff".into()));
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"reason":"above the declared maximum 45","field":"bmi","patient":"p1-00ff"}"#
        );
        assert_eq!(Rejection::decode(&r.encode()), r);
        assert!(Rejection::is_current(&r.encode()));
        assert_eq!(r.to_string(), "field 'bmi': above the declared maximum 45");
    }

    #[test]
    fn an_earlier_text_reason_keeps_its_field_and_loses_its_value() {
        let old = b"column 'bmi': 52.9 is outside 0..=45";
        assert!(!Rejection::is_current(old));
        let r = Rejection::decode(old);
        assert_eq!(r.field.as_deref(), Some("bmi"));
        assert_eq!(r.reason, Rejection::EARLIER);
        assert!(!r.encode().windows(4).any(|w| w == b"52.9"));
        assert_eq!(Rejection::decode(b"not UTF-8 text").field, None);
    }
}
