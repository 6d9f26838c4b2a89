//! The study's rules, each a pure function: what an update must be to enter the average,
//! how a differentially private average is cut, what a classification target must have,
//! and the scheduler's confidence.

use std::collections::BTreeMap;

use crate::messages::ModelUpdate;

/// The z of a one-sided normal confidence (0.9 → 1.28, 0.95 → 1.645, 0.99 → 2.33).
pub fn z_of(confidence: f64) -> f64 {
    // Acklam's rational approximation is overkill here: interpolate a few table values.
    let table = [
        (0.5, 0.0),
        (0.8, 0.842),
        (0.9, 1.282),
        (0.95, 1.645),
        (0.975, 1.960),
        (0.99, 2.326),
        (0.999, 3.090),
    ];
    for w in table.windows(2) {
        let ((c0, z0), (c1, z1)) = (w[0], w[1]);
        if confidence <= c1 {
            return z0 + (z1 - z0) * (confidence - c0) / (c1 - c0);
        }
    }
    3.090
}

/// Checks a classification study's target against the classes its sites name (each site
/// names the classes at least `min_cell` of its patients have): the positive class must be
/// named by some site, and the target must have another class. Otherwise the study would
/// train on an all-negative (or all-positive) target and report a perfect accuracy.
pub fn check_target(
    target: &str,
    positive_class: Option<&str>,
    named: &BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    let Some(positive) = positive_class else {
        return Ok(());
    };
    let all: std::collections::BTreeSet<&str> =
        named.values().flatten().map(String::as_str).collect();
    let listed = || {
        if all.is_empty() {
            "none".to_string()
        } else {
            all.iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let rule = "a site names a class only if at least min_cell of its patients have it, and \
        never says how many";
    if !all.contains(positive) {
        let near: Vec<&&str> = all
            .iter()
            .filter(|c| c.eq_ignore_ascii_case(positive))
            .collect();
        let fix = match near.first() {
            Some(c) => format!("fix: positive_class = {c:?} (classes are compared exactly, case included)"),
            None => "fix: set positive_class to one of the named classes, or check the study's target column".to_string(),
        };
        return Err(format!(
            "positive_class = {positive:?} is not a class of target '{}' at any of the {} accepting sites; \
                the classes they name: {} ({rule}); training would see no positive row. {fix}",
            target,
            named.len(),
            listed(),
        ));
    }
    if all.len() < 2 {
        return Err(format!(
            "target '{}' has a single class at the {} accepting sites ({}; {rule}): a classifier \
                cannot learn from it. fix: choose a target with both outcomes, or a site's data that has them",
            target,
            named.len(),
            listed(),
        ));
    }
    Ok(())
}

/// Checks a multinomial study's classes against the classes its sites name (each site
/// names the classes at least `min_cell` of its patients have). A site naming a class the
/// study does not list stops the study (its rows would fit none of the model's classes),
/// and so do fewer than two named classes (nothing to tell apart). A listed class no site
/// names may still be at every site, each below `min_cell`: that is a note for the
/// operator (`Ok(Some(note))`), not a failure.
pub fn check_classes(
    target: &str,
    classes: &[String],
    named: &BTreeMap<String, Vec<String>>,
) -> Result<Option<String>, String> {
    let all: std::collections::BTreeSet<&str> =
        named.values().flatten().map(String::as_str).collect();
    let quoted = |v: &mut dyn Iterator<Item = &str>| {
        let v: Vec<String> = v.map(|c| format!("{c:?}")).collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let rule = "a site names a class only if at least min_cell of its patients have it, and \
        never says how many";
    let extra: Vec<&str> = all
        .iter()
        .copied()
        .filter(|c| !classes.iter().any(|k| k == c))
        .collect();
    if !extra.is_empty() {
        return Err(format!(
            "the sites name classes of target '{target}' that the study does not list: {}; \
                their rows fit none of the model's classes. fix: add them to classes",
            quoted(&mut extra.iter().copied()),
        ));
    }
    if all.len() < 2 {
        return Err(format!(
            "target '{target}' has fewer than two of the study's classes named at the {} \
                accepting sites (they name: {}; {rule}): a classifier cannot learn from that. \
                fix: check the classes' spelling (compared exactly, case included), or the sites' data",
            named.len(),
            quoted(&mut all.iter().copied()),
        ));
    }
    let unnamed: Vec<&str> = classes
        .iter()
        .map(String::as_str)
        .filter(|c| !all.contains(c))
        .collect();
    Ok((!unnamed.is_empty()).then(|| {
        format!(
            "classes {} of target '{target}' are named by none of the {} accepting sites \
                ({rule}): if no site has them, the model cannot learn them, and their \
                per-class figures will say so",
            quoted(&mut unnamed.iter().copied()),
            named.len(),
        )
    }))
}

/// Largest weight an update may carry.
pub const MAX_WEIGHT: f64 = 1e6;

/// Most training rows a site may declare (a bound on its FedAvg weight and on every sum).
pub const MAX_ROWS: u64 = 1_000_000_000;

/// Checks a node's update before it can enter the average.
pub fn check_update(
    u: &ModelUpdate,
    study: &str,
    round: u32,
    width: usize,
    declared_rows: u64,
) -> Result<(), String> {
    if u.study_id != study || u.round != round {
        return Err(format!(
            "it is for study '{}' round {}, not '{study}' round {round}",
            u.study_id, u.round
        ));
    }
    if u.weights.len() != width {
        return Err(format!("{} weights, expected {width}", u.weights.len()));
    }
    if u.weights.iter().any(|w| !w.is_finite()) || !u.train_loss.is_finite() {
        return Err("non-finite weight or loss".into());
    }
    // Standardized-feature models have weights of a few units; a huge one can only be an
    // attempt to push the average to infinity.
    if u.weights.iter().any(|w| w.abs() > MAX_WEIGHT) {
        return Err(format!("a weight beyond ±{MAX_WEIGHT}"));
    }
    if declared_rows == 0 {
        // Under differential privacy no count is declared, and none is sent.
        return if u.num_samples == 0 {
            Ok(())
        } else {
            Err("a row count in a differentially private update".into())
        };
    }
    if u.num_samples == 0 || u.num_samples > declared_rows {
        return Err(format!(
            "claims {} training rows; the site declared {declared_rows}",
            u.num_samples
        ));
    }
    Ok(())
}

/// Differentially private training without secure aggregation: `global + Σ Δ_i / m`, each
/// `Δ_i` a site's delta with all of its noise already added by the site (nobody here adds
/// or removes any). Under DP-FedAvg a delta longer than an honest one can be (`C` plus its
/// noise's norm beyond eight standard deviations) is cut to that length, so one site cannot
/// push the model anywhere; under DP-SGD only the weights' bound applies.
pub fn dp_average(global: &[f64], deltas: Vec<Vec<f64>>, dp: &crate::dp::DpTraining) -> Vec<f64> {
    let m = deltas.len().max(1) as f64;
    let d = global.len() as f64;
    let bound = dp.clip_norm + dp.sigma() * (d.sqrt() + 8.0);
    let mut sum = vec![0.0; global.len()];
    for mut delta in deltas {
        if dp.sgd.is_none() {
            crate::dp::clip_l2(&mut delta, bound);
        }
        for (s, x) in sum.iter_mut().zip(&delta) {
            *s += x;
        }
    }
    global.iter().zip(&sum).map(|(g, s)| g + s / m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multinomial_study_needs_every_class_named_and_no_other() {
        let named = |v: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            v.iter()
                .map(|(s, c)| (s.to_string(), c.iter().map(|c| c.to_string()).collect()))
                .collect()
        };
        let classes: Vec<String> = ["Normal", "Chemical", "Overt"].map(String::from).to_vec();
        let ok = named(&[("a", &["Chemical", "Normal"]), ("b", &["Normal", "Overt"])]);
        assert_eq!(check_classes("group", &classes, &ok), Ok(None));
        // A class no site names may be rare everywhere: a note, not a failure.
        let missing = named(&[("a", &["Chemical", "Normal"]), ("b", &["Normal"])]);
        let note = check_classes("group", &classes, &missing).unwrap().unwrap();
        assert!(
            note.contains(r#"classes "Overt" of target 'group'"#),
            "{note}"
        );
        assert!(note.contains("min_cell"), "{note}");
        let one = named(&[("a", &["Normal"]), ("b", &["Normal"])]);
        let err = check_classes("group", &classes, &one).unwrap_err();
        assert!(err.contains("fewer than two"), "{err}");
        let extra = named(&[("a", &["Chemical", "Normal", "Overt", "overt"])]);
        let err = check_classes("group", &classes, &extra).unwrap_err();
        assert!(err.contains(r#"does not list: "overt""#), "{err}");
    }
    use crate::metrics::Evaluation;
    use crate::model::ModelKind;

    #[test]
    fn a_hostile_delta_is_cut_to_what_an_honest_noisy_one_can_be() {
        let dp = crate::dp::DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            sgd: None,
        };
        // σ = z·2C = 1; one coordinate: an honest noisy delta is at most C + 9σ = 10 long.
        let w = dp_average(&[0.0], vec![vec![1e6], vec![0.0]], &dp);
        assert!((w[0] - 5.0).abs() < 1e-9, "{w:?}");
        // Honest deltas (noise included) pass unchanged: the average of the two.
        let w = dp_average(&[1.0], vec![vec![2.5], vec![-0.5]], &dp);
        assert!((w[0] - 2.0).abs() < 1e-12, "{w:?}");
    }

    #[test]
    fn a_target_without_its_positive_class_or_with_one_class_stops_the_study() {
        let sites = |named: &[&[&str]]| -> BTreeMap<String, Vec<String>> {
            named
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("site-{i}"),
                        c.iter().map(|c| c.to_string()).collect(),
                    )
                })
                .collect()
        };
        let ok = sites(&[&["No", "Yes"], &["No"]]);
        assert!(check_target("type", Some("Yes"), &ok).is_ok());
        // The positive class at one site only is enough.
        assert!(check_target("type", Some("Yes"), &sites(&[&["No"], &["Yes"]])).is_ok());
        // The wrong case: named, with the fix.
        let err = check_target("type", Some("yes"), &ok).unwrap_err();
        assert!(
            err.contains(r#"the classes they name: "No", "Yes""#),
            "{err}"
        );
        assert!(err.contains(r#"fix: positive_class = "Yes""#), "{err}");
        // Absent everywhere.
        let err = check_target("diagnosis", Some("normal"), &sites(&[&["B", "M"]])).unwrap_err();
        assert!(
            err.contains("is not a class of target 'diagnosis'"),
            "{err}"
        );
        assert!(err.contains("set positive_class to one of"), "{err}");
        // One class in the whole federation.
        let err = check_target("type", Some("Yes"), &sites(&[&["Yes"], &["Yes"]])).unwrap_err();
        assert!(err.contains("a single class"), "{err}");
        // Nothing named (every class rarer than min_cell everywhere).
        let err = check_target("type", Some("Yes"), &sites(&[&[], &[]])).unwrap_err();
        assert!(err.contains("name: none"), "{err}");
        // A regression study has no classes to check.
        assert!(check_target("y", None, &sites(&[&[]])).is_ok());
    }

    fn update() -> ModelUpdate {
        ModelUpdate {
            study_id: "s".into(),
            round: 2,
            weights: vec![0.1, 0.2, 0.3],
            num_samples: 10,
            train_loss: 0.5,
            evaluation: Evaluation::empty(ModelKind::Logistic),
        }
    }

    #[test]
    fn hostile_updates_are_refused() {
        assert!(check_update(&update(), "s", 2, 3, 10).is_ok());
        assert!(
            check_update(&update(), "s", 3, 3, 10)
                .unwrap_err()
                .contains("round 2")
        );
        assert!(
            check_update(&update(), "s", 2, 4, 10)
                .unwrap_err()
                .contains("expected 4")
        );
        let mut nan = update();
        nan.weights[1] = f64::NAN;
        assert!(check_update(&nan, "s", 2, 3, 10).is_err());
        // A site may not inflate its FedAvg weight beyond the rows it declared.
        assert!(
            check_update(&update(), "s", 2, 3, 9)
                .unwrap_err()
                .contains("declared 9")
        );
        let mut zero = update();
        zero.num_samples = 0;
        assert!(check_update(&zero, "s", 2, 3, 10).is_err());
    }
}
