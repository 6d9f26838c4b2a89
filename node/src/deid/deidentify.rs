//! The de-identification task: the keyed pseudonym in place of the patient identifier, and
//! HIPAA Safe Harbor applied to every declared field by its class.

use super::pseudonym::Pseudonymizer;
use super::safe_harbor::{Date, RestrictedZip3, generalise_age, generalise_birth_date};
use super::{DatePolicy, DeidentifyConfig, FieldClass, FieldSpec, PATIENT, Record, Value};
use crate::runtime::record::{CompactString, FieldSlot};
use crate::runtime::{
    Envelope, KvState, MessageCollector, NEXT, Rejection, StreamTask, TaskCoordinator, TaskError,
};

/// The text a patient identifier is pseudonymized from: the same for the deidentify task
/// and for naming the patient of a quarantined record.
pub(crate) fn identifier_text(value: &Value) -> Option<String> {
    match value {
        Value::Text(s) if !s.trim().is_empty() => Some(s.to_string()),
        Value::Number(x) => Some(x.to_string()),
        _ => None,
    }
}

/// Pseudonymizes the patient identifier and applies Safe Harbor to every declared field by
/// its class: identifiers removed, ages over 89 aggregated, birth dates to the year, other
/// dates to the year or shifted per patient, ZIP codes to three digits.
pub struct Deidentify {
    /// The declared fields, each with its shared name.
    fields: Vec<(FieldSpec, FieldSlot)>,
    patient_id: Option<(String, FieldSlot)>,
    pseudonymizer: Option<Pseudonymizer>,
    restricted: RestrictedZip3,
    dates: DatePolicy,
    reference: Date,
    /// [`PATIENT`], shared by every record.
    patient_name: FieldSlot,
}

impl Deidentify {
    /// The task for the declared fields: at most one patient-id field, which needs
    /// `pseudonymizer`; date shifting needs a patient-id field; ages are computed on
    /// `reference_date`, else `today`.
    pub fn new(
        fields: &[FieldSpec],
        config: &DeidentifyConfig,
        pseudonymizer: Option<Pseudonymizer>,
        today: Date,
    ) -> Result<Deidentify, TaskError> {
        let err = |detail: String| TaskError {
            task: "deidentify".into(),
            detail,
        };
        let ids: Vec<&FieldSpec> = fields
            .iter()
            .filter(|f| f.class == FieldClass::PatientId)
            .collect();
        if ids.len() > 1 {
            return Err(err(format!(
                "fields '{}' and '{}' are both patient-id; declare one",
                ids[0].name, ids[1].name
            )));
        }
        if !ids.is_empty() && pseudonymizer.is_none() {
            return Err(err(format!(
                "field '{}' is a patient-id, but no pseudonym key was given",
                ids[0].name
            )));
        }
        if config.dates == DatePolicy::Shift && ids.is_empty() {
            return Err(err(
                "dates = \"shift\" needs a field of class patient-id to derive each patient's shift from".into(),
            ));
        }
        if fields.iter().any(|f| f.name == PATIENT) {
            return Err(err(format!(
                "a field may not be named '{PATIENT}': the pseudonym goes there"
            )));
        }
        let restricted = match &config.restricted_zip3 {
            Some(path) => RestrictedZip3::load(path).map_err(err)?,
            None => RestrictedZip3::shipped(),
        };
        let reference = match &config.reference_date {
            Some(d) => Date::parse(d).map_err(|e| err(format!("reference_date {d:?}: {e}")))?,
            None => today,
        };
        Ok(Deidentify {
            fields: fields
                .iter()
                .map(|f| (f.clone(), FieldSlot::new(&f.name)))
                .collect(),
            patient_id: ids
                .first()
                .map(|f| (f.name.clone(), FieldSlot::new(&f.name))),
            pseudonymizer,
            restricted,
            dates: config.dates,
            reference,
            patient_name: FieldSlot::new(PATIENT),
        })
    }

    /// De-identifies one record; `Err` is why it is quarantined (with the patient's
    /// pseudonym once the identifier is read; never a value).
    pub fn apply(&self, mut record: Record) -> Result<Record, Rejection> {
        let mut shift = None;
        if let (Some((id_field, id_name)), Some(pseudonymizer)) =
            (&self.patient_id, &self.pseudonymizer)
        {
            let pseudonym = match record.remove_slot(id_name) {
                Some(Value::Text(s)) if !s.trim().is_empty() => {
                    if self.dates == DatePolicy::Shift {
                        shift = Some(pseudonymizer.date_shift_days(&s));
                    }
                    pseudonymizer.pseudonym(&s)
                }
                Some(Value::Number(x)) => {
                    let id = x.to_string();
                    if self.dates == DatePolicy::Shift {
                        shift = Some(pseudonymizer.date_shift_days(&id));
                    }
                    pseudonymizer.pseudonym(&id)
                }
                _ => return Err(Rejection::in_field(id_field, "no patient identifier")),
            };
            record.set_slot(&self.patient_name, Value::Text(pseudonym.into()));
        }
        match self.generalise(&mut record, shift) {
            Ok(()) => Ok(record),
            Err((field, why)) => {
                let patient = record
                    .get(PATIENT)
                    .and_then(Value::as_str)
                    .map(str::to_string);
                Err(Rejection::in_field(field, why).with_patient(patient))
            }
        }
    }

    /// Safe Harbor, field by field, in place; `Err` names the field and why.
    fn generalise<'a>(
        &'a self,
        record: &mut Record,
        shift: Option<i64>,
    ) -> Result<(), (&'a str, String)> {
        for (f, field) in &self.fields {
            let name = f.name.as_str();
            match f.class {
                FieldClass::Value => continue,
                FieldClass::PatientId | FieldClass::Identifier => {
                    record.remove_slot(field);
                    continue;
                }
                FieldClass::Age | FieldClass::BirthDate | FieldClass::Date | FieldClass::Zip => {}
            }
            let Some(value) = record.get_slot_mut(field) else {
                continue;
            };
            if f.class == FieldClass::Age {
                match value {
                    Value::Missing => {}
                    Value::Number(age) if *age >= 0.0 => *age = generalise_age(*age),
                    _ => return Err((name, "not an age in years".into())),
                }
                continue;
            }
            let number_text;
            let text = match &*value {
                Value::Missing => continue,
                Value::Text(s) => s.as_str(),
                Value::Number(x) => {
                    number_text = x.to_string();
                    number_text.as_str()
                }
            };
            let generalised = match f.class {
                FieldClass::BirthDate => {
                    let birth = Date::parse(text).map_err(|e| (name, e.to_string()))?;
                    if birth > self.reference {
                        return Err((name, format!("a birth date after {}", self.reference)));
                    }
                    Value::Number(f64::from(generalise_birth_date(birth, self.reference)))
                }
                FieldClass::Date => {
                    let date = Date::parse(text).map_err(|e| (name, e.to_string()))?;
                    match shift {
                        Some(days) => Value::Text(date.shifted(days).to_string().into()),
                        None => Value::Number(f64::from(date.year)),
                    }
                }
                FieldClass::Zip => {
                    let digits = self
                        .restricted
                        .generalise_digits(text)
                        .map_err(|e| (name, e.to_string()))?;
                    match std::str::from_utf8(&digits) {
                        Ok(zip3) => Value::Text(CompactString::from(zip3)),
                        // Three ASCII digits are always UTF-8.
                        Err(_) => return Err((name, "not a ZIP code".into())),
                    }
                }
                FieldClass::Age
                | FieldClass::Value
                | FieldClass::PatientId
                | FieldClass::Identifier => continue,
            };
            *value = generalised;
        }
        Ok(())
    }
}

impl StreamTask for Deidentify {
    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        crate::runtime::process_as_record(self, env, state, out, coord)
    }

    fn process_record(
        &mut self,
        env: &Envelope,
        record: Record,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        match self.apply(record) {
            Ok(record) => out.send_record(NEXT, record),
            Err(why) => out.dead_letter(env, why),
        }
        Ok(())
    }
}
