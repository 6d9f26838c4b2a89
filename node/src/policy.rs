//! Which studies this site serves: only those its operator approved, one by one (by the
//! study's hash, with `medfed node approve`) or by rules in the node's `[policy]`.
//! Everything else is refused with the reason, which goes to the aggregator and into both
//! parties' compliance logs.

use std::path::{Path, PathBuf};

use medfed_protocol::messages::StudyAnnouncement;
use medfed_protocol::model::ModelFamily;
use serde::{Deserialize, Serialize};

/// `[policy]` in `node.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// A file of approved study hashes, one per line (`medfed node approve` appends to it).
    #[serde(default = "default_approvals")]
    pub approvals: PathBuf,
    /// Studies matching every rule here are approved without a per-study approval.
    #[serde(default)]
    pub rules: Option<Rules>,
    /// Secure aggregation is joined only if this many sites colluding with the aggregator
    /// cannot unmask this site's update (its threshold must be above (holders + this) / 2).
    #[serde(default = "default_tolerated_colluders")]
    pub tolerated_colluders: u32,
    /// This site's differential-privacy budget (`[policy.privacy]`).
    #[serde(default)]
    pub privacy: PrivacyPolicy,
    /// The smallest cell (count of patients) a statistics query may release, and the
    /// smallest difference between two cohorts this site answers for (CMS: 11).
    #[serde(default = "default_min_cell")]
    pub min_cell: u64,
}

fn default_min_cell() -> u64 {
    11
}

/// `[policy.privacy]`: the most this site lets differentially private studies spend. The
/// node refuses a round that would exceed it, and tells the aggregator why.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// Most ε one study may spend.
    #[serde(default = "default_study_epsilon")]
    pub epsilon: f64,
    /// Most ε all studies together may spend.
    #[serde(default = "default_total_epsilon")]
    pub total_epsilon: f64,
    /// δ of every guarantee (keep it below 1 / the number of patients).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Refuse studies without differential privacy.
    #[serde(default)]
    pub require: bool,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        PrivacyPolicy {
            epsilon: default_study_epsilon(),
            total_epsilon: default_total_epsilon(),
            delta: default_delta(),
            require: false,
        }
    }
}

impl PrivacyPolicy {
    /// The privacy budget these limits set.
    pub fn budget(&self) -> medfed_protocol::dp::ledger::Budget {
        medfed_protocol::dp::ledger::Budget {
            study_epsilon: self.epsilon,
            total_epsilon: self.total_epsilon,
            delta: self.delta,
        }
    }

    /// Checks `0 < epsilon <= total_epsilon` and `0 < delta < 0.001`.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.epsilon > 0.0 && self.total_epsilon >= self.epsilon) {
            return Err("needs 0 < epsilon <= total_epsilon".into());
        }
        if !(self.delta > 0.0 && self.delta < 1e-3) {
            return Err(format!("delta {} must be in (0, 0.001)", self.delta));
        }
        Ok(())
    }
}

/// At δ = 10⁻⁶, ε 5 allows one statistics query at the default noise (ε 3.4) or a DP-SGD
/// study like the quickstart's (ε 3.6); 10 in all bounds what every release together tells
/// of a patient (an attacker using all of it tells a patient's presence apart at most
/// about 80% of the time: see tests/integration/attacks.rs).
fn default_study_epsilon() -> f64 {
    5.0
}
fn default_total_epsilon() -> f64 {
    10.0
}
fn default_delta() -> f64 {
    1e-6
}

fn default_tolerated_colluders() -> u32 {
    1
}

/// `[policy.rules]`: the studies and queries this site serves without its operator's
/// approval of each. Every rule must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Datasets a study may use (all, if absent).
    #[serde(default)]
    pub datasets: Option<Vec<String>>,
    /// Models a study may train (all, if absent).
    #[serde(default)]
    pub models: Option<Vec<ModelFamily>>,
    /// Columns a study may read as features or target, and a query as a statistic or in
    /// its cohort. Columns not named are refused (with none named, every study is).
    /// Identifiers, patient identifiers, dates and ZIP codes are refused even if named.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Most training rounds a study may run.
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Fewest training rows this site must hold for a study without differential privacy
    /// (small cohorts are refused). Not applied to DP studies: the refusal would release
    /// the count without noise.
    #[serde(default)]
    pub min_training_rows: Option<u64>,
    /// Whether studies without secure aggregation are served.
    #[serde(default)]
    pub allow_without_secure_aggregation: bool,
}

fn default_approvals() -> PathBuf {
    "approved-studies.txt".into()
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            approvals: default_approvals(),
            rules: None,
            tolerated_colluders: default_tolerated_colluders(),
            privacy: PrivacyPolicy::default(),
            min_cell: default_min_cell(),
        }
    }
}

/// Records the operator's approval of a study (by hash) in the approvals file.
pub fn approve(policy: &Policy, hash: &str) -> std::io::Result<bool> {
    let hash = hash.trim().to_lowercase();
    if policy.approved_hashes().contains(&hash) {
        return Ok(false);
    }
    use std::io::Write;
    let mut f = medfed_infra::files::private_file_options()
        .create(true)
        .append(true)
        .open(&policy.approvals)?;
    writeln!(f, "{hash}")?;
    f.sync_all()?;
    Ok(true)
}

/// A study's identity for approvals: SHA-256 (hex) of its announcement's canonical bytes.
/// Any change to the study (features, rounds, model, ...) changes it.
pub fn study_hash(a: &StudyAnnouncement) -> String {
    a.approval_hash()
}

/// The hash a statistics query is approved by.
pub fn query_hash(q: &medfed_protocol::fedstats::StatsQuery) -> String {
    q.approval_hash()
}

/// The operator's decision on a study, with the reason for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Served; why (the operator's approval, or the rules).
    Approved(String),
    /// Refused; why, and how the operator can approve it anyway.
    Refused(String),
}

impl Policy {
    /// Makes the approvals file's path relative to the configuration file's directory.
    pub fn resolve(&mut self, config_path: &Path) {
        self.approvals = medfed_infra::config::resolve(config_path, &self.approvals);
    }

    fn approved_hashes(&self) -> Vec<String> {
        std::fs::read_to_string(&self.approvals)
            .map(|t| {
                t.lines()
                    .map(|l| l.trim().to_lowercase())
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Decides on a study before any data is read; `training_rows` is checked later by
    /// [`Policy::check_cohort`].
    pub fn decide(&self, a: &StudyAnnouncement) -> Verdict {
        let hash = study_hash(a);
        if self.approved_hashes().contains(&hash) {
            return Verdict::Approved(format!(
                "approved by the site's operator (study hash {hash})"
            ));
        }
        let Some(rules) = &self.rules else {
            return Verdict::Refused(format!(
                "study '{}' (hash {hash}) is not approved at this site; its operator can approve it with \
                 `medfed node approve --config node.toml --study {hash}`",
                a.study_id
            ));
        };
        match rules.violation(a) {
            None => Verdict::Approved("matches the site's policy rules".into()),
            Some(why) => Verdict::Refused(format!(
                "study '{}' (hash {hash}) breaks the site's policy: {why}; its operator can still approve it with \
                 `medfed node approve --config node.toml --study {hash}`",
                a.study_id
            )),
        }
    }

    /// Whether a statistics query is served: approved by hash, or within the rules'
    /// datasets and columns (its columns and its cohort's), and with small cells suppressed
    /// at least as strictly as this site's `min_cell`.
    pub fn decide_query(&self, q: &medfed_protocol::fedstats::StatsQuery, secure: bool) -> Verdict {
        if q.suppress_below < self.min_cell {
            return Verdict::Refused(format!(
                "query '{}' suppresses cells below {}; this site requires at least {} ([policy] min_cell)",
                q.query_id, q.suppress_below, self.min_cell
            ));
        }
        let hash = query_hash(q);
        if self.approved_hashes().contains(&hash) {
            return Verdict::Approved(format!(
                "approved by the site's operator (query hash {hash})"
            ));
        }
        let how = format!(
            "its operator can approve it with `medfed node approve --config node.toml --study {hash}`"
        );
        let Some(rules) = &self.rules else {
            return Verdict::Refused(format!(
                "query '{}' (hash {hash}) is not approved at this site; {how}",
                q.query_id
            ));
        };
        let why = if let Some(ds) = &rules.datasets
            && !ds.contains(&q.dataset)
        {
            Some(format!("dataset '{}' is not allowed", q.dataset))
        } else if let Some(why) = rules.column_violation(
            q.columns
                .iter()
                .map(|c| &c.name)
                .chain(q.survival.iter().flat_map(|s| {
                    [&s.time, &s.event]
                        .into_iter()
                        .chain(s.strata.iter().map(|st| &st.column))
                }))
                .chain(q.cox.iter().flat_map(|c| c.covariates.iter()))
                .chain(q.trees.iter().flat_map(|t| {
                    t.features
                        .iter()
                        .map(|f| &f.name)
                        .chain(std::iter::once(&t.target))
                }))
                .chain(q.cohort.iter().map(|c| &c.column)),
        ) {
            Some(why)
        } else if !secure && !rules.allow_without_secure_aggregation {
            Some("the query does not use secure aggregation".into())
        } else {
            None
        };
        match why {
            None => Verdict::Approved("matches the site's policy rules".into()),
            Some(why) => Verdict::Refused(format!(
                "query '{}' (hash {hash}) breaks the site's policy: {why}; {how}",
                q.query_id
            )),
        }
    }

    /// Whether the site's operator approved this exact hash (`medfed node approve`), as
    /// opposed to a rule.
    pub fn approved_by_hash(&self, hash: &str) -> bool {
        self.approved_hashes().iter().any(|h| h == hash)
    }

    /// Refuses a study whose cohort at this site is below the policy's minimum.
    pub fn check_cohort(&self, training_rows: u64) -> Result<(), String> {
        match self.rules.as_ref().and_then(|r| r.min_training_rows) {
            Some(min) if training_rows < min => Err(format!(
                "the cohort here has {training_rows} training rows; the site's policy requires at least {min}"
            )),
            _ => Ok(()),
        }
    }
}

impl Rules {
    /// The first of `used` that the rules do not name (default deny).
    fn column_violation<'a>(&self, mut used: impl Iterator<Item = &'a String>) -> Option<String> {
        match &self.columns {
            None => Some(
                "[policy.rules] names no columns, so none may be used: list the columns \
                 studies and queries may read in columns = [...]"
                    .into(),
            ),
            Some(cols) => used
                .find(|c| !cols.contains(c))
                .map(|c| format!("column '{c}' is not allowed")),
        }
    }

    fn violation(&self, a: &StudyAnnouncement) -> Option<String> {
        if let Some(ds) = &self.datasets
            && !ds.contains(&a.dataset)
        {
            return Some(format!("dataset '{}' is not allowed", a.dataset));
        }
        if let Some(models) = &self.models
            && !models.contains(&a.model.family())
        {
            return Some(format!("{} models are not allowed", a.model));
        }
        if let Some(why) =
            self.column_violation(a.features.iter().chain(std::iter::once(&a.target)))
        {
            return Some(why);
        }
        if let Some(max) = self.max_rounds
            && a.rounds > max
        {
            return Some(format!("{} rounds exceed the allowed {max}", a.rounds));
        }
        if !a.secure_aggregation && !self.allow_without_secure_aggregation {
            return Some("the study does not use secure aggregation".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfed_protocol::model::ModelKind;

    fn study() -> StudyAnnouncement {
        StudyAnnouncement {
            study_id: "pima".into(),
            description: String::new(),
            dataset: "pima".into(),
            features: vec!["glu".into(), "bmi".into()],
            target: "type".into(),
            model: ModelKind::Logistic,
            positive_class: Some("Yes".into()),
            classes: Vec::new(),
            preprocess: Default::default(),
            validation_fraction: 0.25,
            rounds: 10,
            secure_aggregation: true,
            privacy: None,
        }
    }

    /// A study approved under protocol 3 keeps its hash, so its approval stands: the hash
    /// of the pinned protocol-3 announcement (its body as protocol 3's wire vector had it)
    /// is what this build computes for it. A multinomial study hashes its classes too.
    #[test]
    fn approvals_made_before_multinomial_models_still_hold() {
        use medfed_protocol::dp::{DpSgd, DpTraining};
        let v3 = "017301640470696d610103676c750474797065000103596573000000000000d03f020001000000000000f03f000000000000004001000000000000c03f0a0000000000003040";
        let bytes: Vec<u8> = (0..v3.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v3[i..i + 2], 16).unwrap())
            .collect();
        let a = StudyAnnouncement {
            study_id: "s".into(),
            description: "d".into(),
            dataset: "pima".into(),
            features: vec!["glu".into()],
            target: "type".into(),
            model: ModelKind::Logistic,
            positive_class: Some("Yes".into()),
            classes: Vec::new(),
            preprocess: Default::default(),
            validation_fraction: 0.25,
            rounds: 2,
            secure_aggregation: false,
            privacy: Some(DpTraining {
                clip_norm: 1.0,
                noise_multiplier: 2.0,
                sgd: Some(DpSgd {
                    sampling_rate: 0.125,
                    steps: 10,
                    lot_size: 16.0,
                }),
            }),
        };
        assert_eq!(study_hash(&a), medfed_protocol::audit::sha256_hex(&bytes));
        let mut multi = a.clone();
        multi.model = ModelKind::Multinomial { classes: 3 };
        multi.positive_class = None;
        multi.classes = vec!["a".into(), "b".into(), "c".into()];
        let mut renamed = multi.clone();
        renamed.classes[2] = "d".into();
        assert_ne!(study_hash(&multi), study_hash(&renamed));
    }

    #[test]
    fn nothing_is_served_without_an_approval_or_a_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy {
            approvals: dir.path().join("approved.txt"),
            rules: None,
            tolerated_colluders: 1,
            privacy: PrivacyPolicy::default(),
            min_cell: 11,
        };
        let Verdict::Refused(why) = p.decide(&study()) else {
            panic!()
        };
        assert!(
            why.contains("medfed node approve") && why.contains(&study_hash(&study())),
            "{why}"
        );
        std::fs::write(
            &p.approvals,
            format!("# approved 2026-11-24\n{}\n", study_hash(&study())),
        )
        .unwrap();
        assert!(matches!(p.decide(&study()), Verdict::Approved(_)));
        // Any change to the study needs a new approval.
        let mut longer = study();
        longer.rounds = 11;
        assert!(matches!(p.decide(&longer), Verdict::Refused(_)));
        p.rules = Some(Rules {
            max_rounds: Some(20),
            columns: Some(vec!["glu".into(), "bmi".into(), "type".into()]),
            ..Default::default()
        });
        assert!(matches!(p.decide(&longer), Verdict::Approved(_)));
        // Rules that name no columns allow none.
        p.rules = Some(Rules {
            max_rounds: Some(20),
            ..Default::default()
        });
        let Verdict::Refused(why) = p.decide(&longer) else {
            panic!()
        };
        assert!(why.contains("names no columns"), "{why}");
    }

    #[test]
    fn rules_name_what_they_refuse() {
        let rules = Rules {
            datasets: Some(vec!["pima".into()]),
            models: Some(vec![ModelFamily::Logistic]),
            columns: Some(vec!["glu".into(), "bmi".into(), "type".into()]),
            max_rounds: Some(20),
            min_training_rows: Some(11),
            allow_without_secure_aggregation: false,
        };
        let p = Policy {
            approvals: "/nonexistent".into(),
            rules: Some(rules),
            tolerated_colluders: 1,
            privacy: PrivacyPolicy::default(),
            min_cell: 11,
        };
        assert!(matches!(p.decide(&study()), Verdict::Approved(_)));
        let mut s = study();
        s.features.push("age".into());
        let Verdict::Refused(why) = p.decide(&s) else {
            panic!()
        };
        assert!(why.contains("column 'age' is not allowed"), "{why}");
        let mut s = study();
        s.secure_aggregation = false;
        assert!(matches!(p.decide(&s), Verdict::Refused(w) if w.contains("secure aggregation")));
        assert!(p.check_cohort(10).unwrap_err().contains("at least 11"));
        assert!(p.check_cohort(11).is_ok());
    }
}
