//! What the aggregator has asked of this site: every study and statistics query announced,
//! with what it would read, train or release, and what it would cost this site's privacy
//! budget; kept in the state directory so the operator sees what a hash stands for before
//! approving it (`medfed node studies`, `medfed node approve`).

use std::path::{Path, PathBuf};

use medfed_infra::json_state::{Contents, JsonFile};
use medfed_protocol::dp::accountant::RdpAccountant;
use medfed_protocol::fedstats::StatsQuery;
use medfed_protocol::messages::StudyAnnouncement;
use serde::{Deserialize, Serialize};

/// The most announcements kept (the oldest go first).
const KEPT: usize = 1000;

/// One study or query as announced to this site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announced {
    /// The hash an approval names.
    pub hash: String,
    /// "study" or "statistics query".
    pub kind: String,
    /// The study's or query's id.
    pub id: String,
    /// The dataset of this site it reads.
    pub dataset: String,
    /// Features (a study) or described columns (a query).
    pub columns: Vec<String>,
    /// A query's cohort conditions, as written.
    #[serde(default)]
    pub cohort: Vec<String>,
    /// A study's target column.
    #[serde(default)]
    pub target: Option<String>,
    /// A study's model (`"logistic"` or `"linear"`).
    #[serde(default)]
    pub model: Option<String>,
    /// A study's training rounds.
    #[serde(default)]
    pub rounds: Option<u32>,
    /// Whether its contributions are summed with secure aggregation (the aggregator sees only
    /// sums).
    pub secure_aggregation: bool,
    /// How its releases are protected, in words.
    pub privacy: String,
    /// What all of it would cost this site's budget (ε at the site's δ); none for an exact
    /// release.
    pub epsilon: Option<f64>,
    /// When it was last announced (ms since the UNIX epoch), and this site's answer.
    pub announced_unix_ms: u64,
    /// This site's answer when last announced: `"accepted"`, or the refusal and why.
    pub decision: String,
}

impl Announced {
    /// A study's summary; `delta` is this site's.
    pub fn of_study(a: &StudyAnnouncement, hash: String, delta: f64) -> Announced {
        let (privacy, epsilon) = match &a.privacy {
            None => ("NONE: exact models and evaluations".to_string(), None),
            Some(dp) => {
                let mut acc = RdpAccountant::default();
                let text = match dp.sgd {
                    Some(s) => {
                        acc.compose_gaussian(
                            s.sampling_rate,
                            dp.noise_multiplier,
                            u64::from(a.rounds) * u64::from(s.steps),
                        );
                        format!(
                            "DP-SGD (record-level): clip {}, noise multiplier {}, sampling rate {}, {} steps a round",
                            dp.clip_norm, dp.noise_multiplier, s.sampling_rate, s.steps
                        )
                    }
                    None => {
                        acc.compose_gaussian(1.0, dp.noise_multiplier, u64::from(a.rounds));
                        format!(
                            "DP-FedAvg (the whole site): clip {}, noise multiplier {}",
                            dp.clip_norm, dp.noise_multiplier
                        )
                    }
                };
                (text, Some(acc.epsilon(delta).0))
            }
        };
        Announced {
            hash,
            kind: "study".into(),
            id: a.study_id.clone(),
            dataset: a.dataset.clone(),
            columns: a.features.clone(),
            cohort: Vec::new(),
            target: Some(a.target.clone()),
            model: Some(a.model.to_string()),
            rounds: Some(a.rounds),
            secure_aggregation: a.secure_aggregation,
            privacy,
            epsilon,
            announced_unix_ms: now_ms(),
            decision: String::new(),
        }
    }

    /// A statistics query's summary; `delta` is this site's.
    pub fn of_query(q: &StatsQuery, hash: String, secure: bool, delta: f64) -> Announced {
        let (privacy, epsilon) = match q.noise_multiplier {
            None => ("NONE: exact statistics".to_string(), None),
            Some(z) => {
                let mut acc = RdpAccountant::default();
                acc.compose_gaussian(1.0, z, 1);
                (
                    format!("noise multiplier {z} (one release)"),
                    Some(acc.epsilon(delta).0),
                )
            }
        };
        Announced {
            hash,
            kind: "statistics query".into(),
            id: q.query_id.clone(),
            dataset: q.dataset.clone(),
            columns: q.columns.iter().map(|c| c.name.clone()).collect(),
            cohort: q
                .cohort
                .iter()
                .map(|c| {
                    let op = serde_json::to_value(c.op)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    match (&c.value, &c.text) {
                        (Some(v), _) => format!("{} {op} {v}", c.column),
                        (_, Some(t)) => format!("{} {op} {t:?}", c.column),
                        _ => c.column.clone(),
                    }
                })
                .collect(),
            target: None,
            model: None,
            rounds: None,
            secure_aggregation: secure,
            privacy,
            epsilon,
            announced_unix_ms: now_ms(),
            decision: String::new(),
        }
    }

    /// Several lines for a person.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} '{}' (hash {})\n  dataset:  {}\n  columns:  {}\n",
            self.kind,
            self.id,
            self.hash,
            self.dataset,
            self.columns.join(", ")
        );
        if !self.cohort.is_empty() {
            s += &format!("  cohort:   {}\n", self.cohort.join(" and "));
        }
        if let (Some(t), Some(m), Some(r)) = (&self.target, &self.model, self.rounds) {
            s += &format!("  model:    {m}, target {t}, {r} rounds\n");
        }
        s += &format!(
            "  secure aggregation: {}\n  privacy:  {}\n  costs this site: {}\n",
            if self.secure_aggregation {
                "on (the aggregator sees only sums)"
            } else {
                "OFF (the aggregator sees this site's answers)"
            },
            self.privacy,
            match self.epsilon {
                Some(e) => format!("ε = {e:.3} (at this site's δ)"),
                None => "no ε: EXACT, allowed only by a dataset's exact_releases".into(),
            }
        );
        if !self.decision.is_empty() {
            s += &format!("  decision: {}\n", self.decision);
        }
        s
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The file of announcements in a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("announced.json")
}

/// What the file of announcements holds, for its errors.
const ANNOUNCED: Contents = Contents {
    label: "",
    a: "a list of announced studies",
    the: "the announced studies",
    pretty: true,
};

/// Reads the announcements kept in `path` (none if it does not exist yet).
pub fn load(path: &Path) -> Result<Vec<Announced>, String> {
    JsonFile::read(path, ANNOUNCED).map_err(|e| e.to_string())
}

/// The announcements, kept in memory and written through.
pub struct AnnouncedStudies(JsonFile<Vec<Announced>>);

impl AnnouncedStudies {
    /// Opens the list kept at `path` (a JSON file; none yet is an empty list).
    pub fn open(path: PathBuf) -> Result<AnnouncedStudies, String> {
        JsonFile::open(path, ANNOUNCED)
            .map(AnnouncedStudies)
            .map_err(|e| e.to_string())
    }

    /// Records `a` (replacing an earlier announcement of the same hash) with this site's
    /// decision.
    pub fn note(&self, mut a: Announced, decision: &str) -> Result<(), String> {
        a.decision = decision.to_string();
        let mut list = self.0.lock();
        list.retain(|x| x.hash != a.hash);
        list.push(a);
        if list.len() > KEPT {
            let extra = list.len() - KEPT;
            list.drain(..extra);
        }
        self.0.save(&list).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use medfed_protocol::dp::{DpSgd, DpTraining};
    use medfed_protocol::model::ModelKind;

    use super::*;

    fn study(privacy: Option<DpTraining>) -> StudyAnnouncement {
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
            rounds: 5,
            secure_aggregation: true,
            privacy,
        }
    }

    #[test]
    fn a_summary_says_what_a_study_reads_and_costs_and_is_kept() {
        let dp = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 3.0,
            sgd: Some(DpSgd {
                sampling_rate: 0.2,
                steps: 20,
                lot_size: 16.0,
            }),
        };
        let a = Announced::of_study(&study(Some(dp)), "ab".repeat(32), 1e-6);
        // 5 rounds of 20 steps at q = 0.2, z = 3: the quickstart's ε ≈ 3.6.
        assert!((a.epsilon.unwrap() - 3.64).abs() < 0.05, "{a:?}");
        let text = a.describe();
        assert!(
            text.contains("columns:  glu, bmi") && text.contains("DP-SGD"),
            "{text}"
        );
        let exact = Announced::of_study(&study(None), "cd".repeat(32), 1e-6);
        assert!(exact.describe().contains("EXACT"), "{}", exact.describe());

        let dir = tempfile::tempdir().unwrap();
        let kept = AnnouncedStudies::open(path(dir.path())).unwrap();
        kept.note(a.clone(), "refused: not approved").unwrap();
        kept.note(exact, "refused").unwrap();
        kept.note(a.clone(), "accepted").unwrap();
        let back = load(&path(dir.path())).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].hash, a.hash);
        assert_eq!(back[1].decision, "accepted");
    }
}
