//! Answering statistics queries: the site's policy, its smallest cell, differencing
//! protection across queries, its privacy budget, and the (noised) vector, summed with the
//! other sites' under secure aggregation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medfed_infra::json_state::{Contents, JsonFile};
use medfed_protocol::fedstats::{LeftOut, StatsQuery};
use medfed_protocol::messages::{QueryStep, StatisticsQuery, StatisticsReport, query_binding};
use medfed_protocol::{ErrorCode, Message};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::client::Node;
use crate::config::ExactRelease;
use crate::data::Table;
use crate::policy::Verdict;

type Reply = Result<Message, (ErrorCode, String)>;

/// A cohort this site released exact statistics of: the rows of a dataset, and the sites
/// whose cohorts were summed with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnsweredCohort {
    /// The query answered.
    pub query_id: String,
    /// The dataset its cohort is of.
    pub dataset: String,
    /// Where the dataset's rows came from (its file, or its ingestion pipeline): row ids
    /// compare only within one source. Empty in memories written before it was kept.
    #[serde(default)]
    pub source: String,
    /// The cohort's row ids (see [`crate::data::Table::row_id`]).
    pub rows: Vec<u32>,
    /// SHA-256 of the sum's parties (see `secure::parties_digest`); absent in memories
    /// written before it was kept.
    #[serde(default)]
    pub parties_sha256: Option<String>,
}

/// The cohorts of the exact statistics released so far, kept in the state directory
/// (written through). Queries with differential privacy are not remembered: their noise
/// protects them, and their budget bounds how often they can be asked.
pub struct CohortMemory(JsonFile<Vec<AnsweredCohort>>);

/// What the file of answered cohorts holds, for its errors.
const COHORTS: Contents = Contents {
    label: "",
    a: "a list of answered cohorts",
    the: "the answered cohorts",
    pretty: false,
};

impl CohortMemory {
    /// Where the memory is kept in the state directory `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("answered-cohorts.json")
    }

    /// Opens the memory kept at `path` (none yet is an empty memory).
    pub fn open(path: PathBuf) -> Result<CohortMemory, String> {
        JsonFile::open(path, COHORTS)
            .map(CohortMemory)
            .map_err(|e| e.to_string())
    }

    /// Records `cohort` unless answering it exactly would reveal patients through an earlier
    /// exact answer over the same dataset:
    ///
    /// - its rows differ from the earlier cohort's by at least 1 but fewer than
    ///   `min_difference` patients (the difference of the two answers is those patients);
    /// - its rows are the same but the sum's sites are not (the difference of the two sums
    ///   is the other sites' exact statistics).
    ///
    /// The same cohort with the same sites again is allowed.
    pub fn admit(&self, cohort: AnsweredCohort, min_difference: u64) -> Result<(), String> {
        let mut answered = self.0.lock();
        let mine: BTreeSet<u32> = cohort.rows.iter().copied().collect();
        for earlier in answered.iter().filter(|a| a.dataset == cohort.dataset) {
            if !earlier.source.is_empty() && earlier.source != cohort.source {
                return Err(format!(
                    "dataset '{}' now reads {}, but query '{}' was answered over {}: rows of \
                     different sources cannot be compared, so differencing protection cannot \
                     be checked (see docs/troubleshooting.md)",
                    cohort.dataset, cohort.source, earlier.query_id, earlier.source,
                ));
            }
            let theirs: BTreeSet<u32> = earlier.rows.iter().copied().collect();
            let differ = mine.symmetric_difference(&theirs).count() as u64;
            if differ > 0 && differ < min_difference {
                return Err(format!(
                    "its cohort differs from that of query '{}' by {differ} patient(s), fewer than {min_difference}: answering both would reveal them",
                    earlier.query_id
                ));
            }
            if differ == 0 && earlier.parties_sha256 != cohort.parties_sha256 {
                return Err(format!(
                    "its cohort is that of query '{}', which was summed with other sites: \
                     the difference of the two sums would be those sites' exact statistics",
                    earlier.query_id
                ));
            }
        }
        // The same answer again (each step of an iterative query): remembered once.
        if answered.contains(&cohort) {
            return Ok(());
        }
        answered.push(cohort);
        self.0.save(&answered).map_err(|e| {
            // Not on disk: not answered, and not remembered either.
            answered.pop();
            e.to_string()
        })
    }
}

/// The steps of iterative queries (a Cox model's iterations, boosted trees' levels) this
/// site answered, per query: the aggregator chooses each step's contents (coefficients, an
/// ensemble), and sums at many chosen points could be solved for the patients' values, so a
/// query gets at most its approved number of steps, one answer per step number.
pub struct AnsweredSteps(JsonFile<std::collections::BTreeMap<String, QuerySteps>>);

/// The steps answered of one query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuerySteps {
    /// Each answered step's number and the SHA-256 of its contents.
    pub steps: Vec<(u32, String)>,
    /// For boosted trees: the last step answered, which the next must follow.
    pub last_trees: Option<medfed_protocol::trees::TreeStep>,
}

const ANSWERED_STEPS: Contents = Contents {
    label: "",
    a: "a map of answered query steps",
    the: "the answered query steps",
    pretty: false,
};

impl AnsweredSteps {
    /// Where they are kept in the state directory `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("answered-steps.json")
    }

    /// Opens the record kept at `path` (none yet is an empty one).
    pub fn open(path: PathBuf) -> Result<AnsweredSteps, String> {
        JsonFile::open(path, ANSWERED_STEPS)
            .map(AnsweredSteps)
            .map_err(|e| e.to_string())
    }

    /// Records `step` of query `q`, unless that step number was answered with other
    /// contents, `q`'s steps are all answered, or (boosted trees) the step does not follow
    /// the last one answered. Answering a step again with the same contents (a retried
    /// round) is allowed. Queries are told apart by their approval hash.
    pub fn admit(
        &self,
        q: &medfed_protocol::fedstats::StatsQuery,
        step: &medfed_protocol::messages::QueryStep,
    ) -> Result<(), String> {
        use medfed_protocol::messages::QueryStep;
        let digest =
            medfed_protocol::audit::sha256_hex(&postcard::to_allocvec(step).unwrap_or_default());
        let key = q.approval_hash();
        let mut all = self.0.lock();
        let answered = all.entry(key.clone()).or_default();
        if let Some((n, before)) = answered.steps.iter().find(|(n, _)| *n == step.round()) {
            if *before == digest {
                return Ok(());
            }
            return Err(format!(
                "step {n} was answered with other contents: a second answer would let the \
                 aggregator compare sums at points of its choosing"
            ));
        }
        if answered.steps.len() >= q.max_steps() as usize {
            return Err(format!(
                "{} steps were answered already, all the query may take",
                answered.steps.len()
            ));
        }
        if let (Some(spec), QueryStep::Trees(next)) = (&q.trees, step) {
            match &answered.last_trees {
                Some(prev) => spec.check_follows(prev, next)?,
                None if next.step == 0 => {}
                None => return Err(format!("step {} comes before step 0", next.step)),
            }
        }
        let before = answered.clone();
        answered.steps.push((step.round(), digest));
        if let QueryStep::Trees(next) = step {
            answered.last_trees = Some((**next).clone());
        }
        let snapshot = all.clone();
        self.0.save(&snapshot).map_err(|e| {
            // Not on disk: not answered, and not remembered either.
            all.insert(key, before);
            e.to_string()
        })
    }
}

/// A query's cohort at a site: the rows' ids and values, and the rows left out for a
/// missing value.
#[derive(Debug, Clone, PartialEq)]
pub struct Cohort {
    /// The cohort's row ids (see [`crate::data::Table::row_id`]).
    pub ids: Vec<u32>,
    /// Each row's values of the query's columns, in the query's order.
    pub rows: Vec<Vec<f64>>,
    /// Each row's survival part (empty for a query without one).
    pub survival: Vec<medfed_protocol::survival::SurvivalRow>,
    /// Each row's target, for boosted trees (1 or 0 for the logistic loss; empty for other
    /// queries).
    pub targets: Vec<f64>,
    /// The rows left out for a missing value, in all and per column.
    pub left_out: LeftOut,
}

/// Whether `cell` is missing for `c`: empty or `NA`, or not a number where `c` compares
/// numbers.
fn missing_for(c: &medfed_protocol::fedstats::Condition, cell: &str) -> bool {
    let cell = cell.trim();
    cell.is_empty()
        || cell.eq_ignore_ascii_case("na")
        || (c.text.is_none() && !cell.parse::<f64>().is_ok_and(f64::is_finite))
}

/// The query's cohort in `table`: rows meeting every condition with a number in every
/// requested column; and those numbers. A row that meets every condition it can be
/// checked on but lacks a value (a condition's column, or a requested column: empty, `NA`
/// or not a number) is left out, and counted, in all and per column it lacks. With a
/// `patient_key` column, each patient counts once (their first row in the cohort or left
/// out): the unit the noise protects is the patient.
pub fn cohort(table: &Table, q: &StatsQuery, patient_key: Option<&str>) -> Result<Cohort, String> {
    let col = |name: &str| {
        table
            .column(name)
            .map_err(|_| format!("dataset '{}' has no column '{name}'", q.dataset))
    };
    let conds = q
        .cohort
        .iter()
        .map(|c| Ok((col(&c.column)?, c)))
        .collect::<Result<Vec<_>, String>>()?;
    // The described columns, then a Cox query's covariates: numbers each row must have.
    let numeric: Vec<&str> = q
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .chain(
            q.cox
                .iter()
                .flat_map(|c| c.covariates.iter().map(String::as_str)),
        )
        .chain(
            q.trees
                .iter()
                .flat_map(|t| t.features.iter().map(|f| f.name.as_str())),
        )
        .collect();
    let target = q
        .trees
        .as_ref()
        .map(|t| col(&t.target).map(|j| (j, t)))
        .transpose()?;
    let cols = numeric
        .iter()
        .map(|name| col(name))
        .collect::<Result<Vec<_>, String>>()?;
    // The survival part's columns: time, event, and the strata column if any.
    let survival_cols = q
        .survival
        .iter()
        .flat_map(|s| s.columns())
        .map(col)
        .collect::<Result<Vec<_>, String>>()?;
    let missing_names = q.missing_columns();
    let slot = |name: &str| missing_names.iter().position(|n| n == name);
    let key = patient_key.and_then(|k| table.column(k).ok());
    let mut seen = std::collections::HashSet::new();
    let mut out = Cohort {
        ids: Vec::new(),
        rows: Vec::new(),
        survival: Vec::new(),
        targets: Vec::new(),
        left_out: LeftOut::none(q),
    };
    let mut lacks = vec![false; missing_names.len()];
    'row: for i in 0..table.len() {
        lacks.iter_mut().for_each(|l| *l = false);
        for (j, c) in &conds {
            let cell = table.cell(i, *j);
            if missing_for(c, cell) {
                if let Some(m) = slot(&c.column) {
                    lacks[m] = true;
                }
            } else if !c.holds(cell) {
                continue 'row;
            }
        }
        let mut values = Vec::with_capacity(cols.len());
        for (name, &j) in numeric.iter().zip(&cols) {
            match table.cell(i, j).trim().parse::<f64>() {
                Ok(x) if x.is_finite() => values.push(x),
                _ => {
                    if let Some(m) = slot(name) {
                        lacks[m] = true;
                    }
                }
            }
        }
        let mut y = None;
        if let Some((j, t)) = target {
            let cell = table.cell(i, j).trim();
            y = match &t.positive_class {
                _ if cell.is_empty() || cell.eq_ignore_ascii_case("na") => None,
                Some(positive) => Some(f64::from(u8::from(cell == positive.trim()))),
                None => cell.parse::<f64>().ok().filter(|x| x.is_finite()),
            };
            if y.is_none()
                && let Some(m) = slot(&t.target)
            {
                lacks[m] = true;
            }
        }
        let mut survival_row = None;
        if let Some(s) = &q.survival {
            let cell = |k: usize| survival_cols.get(k).map(|&j| table.cell(i, j));
            match s.row(cell(0).unwrap_or(""), cell(1).unwrap_or(""), cell(2)) {
                Ok(r) => survival_row = Some(r),
                Err(why) => {
                    for (name, lacking) in s.columns().iter().zip(why) {
                        if lacking && let Some(m) = slot(name) {
                            lacks[m] = true;
                        }
                    }
                }
            }
        }
        if let Some(k) = key {
            let patient = table.cell(i, k).trim();
            if !patient.is_empty() && !seen.insert(patient.to_string()) {
                continue;
            }
        }
        if lacks.iter().any(|l| *l) {
            out.left_out.rows += 1;
            for (n, l) in out.left_out.per_column.iter_mut().zip(&lacks) {
                *n += u64::from(*l);
            }
            continue;
        }
        out.ids.push(table.row_id(i));
        out.rows.push(values);
        out.survival.extend(survival_row);
        out.targets.extend(y);
    }
    Ok(out)
}

/// What the aggregator is told when a site declines a query for a reason that depends on
/// its data (the cohort's size here, or its overlap with an earlier exact answer): the same
/// words whatever the data, the details in the site's own log only.
pub const DECLINED: &str =
    "this site's policy does not serve this query (its reasons stay in its own log)";

/// The grid, 2^-bits units, on which a site puts the noise of a query answered without
/// secure aggregation.
const PLAIN_GRID_BITS: u8 = 24;

impl Node {
    /// Answers a statistics query, or refuses it with the reason.
    ///
    /// By default every answer is differentially private: the site adds its share of the
    /// noise (a discrete Gaussian; under secure aggregation σ²/(t − c), else σ² itself) and
    /// charges the release to its budget first; no check that depends on the data decides
    /// anything. Exact answers exist only for a dataset that opts in with
    /// `exact_releases = ["statistics"]`, and only under secure aggregation; they are
    /// declined, in words that do not depend on the data, when this site's cohort is below
    /// its smallest cell or would reveal patients through an earlier exact answer.
    pub(crate) fn answer_query(&self, sq: StatisticsQuery) -> Reply {
        let q = &sq.query;
        let refuse = |code: ErrorCode, why: String| {
            warn!(query = %q.query_id, "refusing statistics query: {why}");
            self.log_decision(&q.query_id, false, &why)?;
            Err((code, why))
        };
        // Declined for a reason that depends on the data: the aggregator gets DECLINED.
        let decline = |why: String| {
            warn!(query = %q.query_id, "declining statistics query: {why}");
            self.log_decision(&q.query_id, false, &why)?;
            Err((ErrorCode::CannotServe, DECLINED.to_string()))
        };
        if let Err(why) = q.validate() {
            return refuse(
                ErrorCode::InvalidContent,
                format!("query '{}': {why}", q.query_id),
            );
        }
        // An iterative query (Cox, trees) is answered one step at a time, each its own round.
        if let Err(why) = q.check_step(sq.step.as_ref()) {
            return refuse(
                ErrorCode::InvalidContent,
                format!("query '{}': {why}", q.query_id),
            );
        }
        if sq.step.is_some() && sq.secure.is_none() {
            return refuse(
                ErrorCode::CannotServe,
                format!(
                    "query '{}': the steps of a Cox model or boosted trees are answered under \
                     secure aggregation only",
                    q.query_id
                ),
            );
        }
        let round = sq.step.as_ref().map_or(0, |s| s.round());
        let dimension = q.step_dimension(sq.step.as_ref());
        let binding_of = |scale: f64| match &sq.step {
            Some(step) => medfed_protocol::messages::step_binding(q, scale, step),
            None => query_binding(q, scale),
        };
        match self.config.policy.decide_query(q, sq.secure.is_some()) {
            Verdict::Approved(_) => {}
            Verdict::Refused(why) => return refuse(ErrorCode::CannotServe, why),
        }
        let Some(dataset) = self.dataset_config(&q.dataset) else {
            return refuse(
                ErrorCode::CannotServe,
                format!("this site serves no dataset named '{}'", q.dataset),
            );
        };
        let exact = q.noise_multiplier.is_none();
        if exact {
            if !dataset.allows_exact(ExactRelease::Statistics) {
                return refuse(
                    ErrorCode::CannotServe,
                    format!(
                        "this site releases statistics of dataset '{}' only with differential \
                         privacy: give the query a noise_multiplier",
                        q.dataset
                    ),
                );
            }
            if self.config.policy.privacy.require {
                return refuse(
                    ErrorCode::CannotServe,
                    "this site answers only differentially private queries ([policy.privacy] require = true)".into(),
                );
            }
            if sq.secure.is_none() {
                return refuse(
                    ErrorCode::CannotServe,
                    "this site releases exact statistics only under secure aggregation".into(),
                );
            }
            // No rule tells a tracker (`glu <= v`, `glu >= v`, all rows: ordinary queries,
            // far apart, whose sum minus the third is one patient) from an ordinary query:
            // every exact query is read and approved by the site's operator, one by one.
            let hash = crate::policy::query_hash(q);
            if !self.config.policy.approved_by_hash(&hash) {
                return refuse(
                    ErrorCode::CannotServe,
                    format!(
                        "exact statistics are answered only for queries this site's operator \
                         approved one by one (no rule can tell a tracker from an ordinary \
                         query): query '{}' (hash {hash}) can be approved with \
                         `medfed node approve --config node.toml --study {hash}` after \
                         `medfed node studies`",
                        q.query_id
                    ),
                );
            }
        }
        if let Some(sr) = &sq.secure {
            // Checked before anything is remembered or charged.
            let binding = binding_of(sr.scale);
            if sr.setup.binding != binding || sr.setup.dimension as usize != dimension {
                return refuse(
                    ErrorCode::InvalidContent,
                    "the secure-aggregation setup does not match the query".into(),
                );
            }
            if let Err(e) = sr.setup.validate() {
                return refuse(ErrorCode::InvalidContent, e.to_string());
            }
            if let Err(why) = self.noise_colluders(sr) {
                return refuse(ErrorCode::CannotServe, why);
            }
            if let Err((code, why)) = self.check_join(&q.query_id, round, sr, &binding, dimension) {
                return refuse(code, why);
            }
        }
        let (table, classes) = match self.table_with_classes(&q.dataset) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return refuse(
                    ErrorCode::CannotServe,
                    format!("this site serves no dataset named '{}'", q.dataset),
                );
            }
            Err(e) => {
                tracing::warn!(query = %q.query_id, "{e}");
                return refuse(
                    ErrorCode::CannotServe,
                    format!("this site cannot read dataset '{}' now", q.dataset),
                );
            }
        };
        let used = q
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .chain(q.survival.iter().flat_map(|s| s.columns()))
            .chain(
                q.cox
                    .iter()
                    .flat_map(|c| c.covariates.iter().map(String::as_str)),
            )
            .chain(q.trees.iter().flat_map(|t| {
                t.features
                    .iter()
                    .map(|f| f.name.as_str())
                    .chain(std::iter::once(t.target.as_str()))
            }))
            .chain(q.cohort.iter().map(|c| c.column.as_str()));
        if let Err(why) = classes.check(&q.dataset, used.clone()) {
            return refuse(ErrorCode::CannotServe, why);
        }
        if !exact && let Err(why) = classes.check_private(&q.dataset, used) {
            return refuse(ErrorCode::CannotServe, why);
        }
        let Cohort {
            ids,
            rows,
            survival,
            targets,
            left_out,
        } = match cohort(&table, q, classes.patient_key()) {
            Ok(c) => c,
            Err(why) => return refuse(ErrorCode::CannotServe, why),
        };
        if left_out.rows > 0 {
            // Exact, for this site's operator only: the release has them noisy (or, exact,
            // suppressed when small).
            let per_column: Vec<String> = q
                .missing_columns()
                .iter()
                .zip(&left_out.per_column)
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            warn!(query = %q.query_id, left_out = left_out.rows, "{} of the cohort's rows are left out for a missing or non-numeric value ({})", left_out.rows, per_column.join(", "));
        }
        let mut noise_sigma = 0.0;
        let mut noise_charge = None;
        let mut vector = match &sq.step {
            Some(QueryStep::Trees(step)) => {
                let described = q.columns.len();
                let tree_rows: Vec<medfed_protocol::trees::TreeRow> = rows
                    .iter()
                    .zip(&targets)
                    .map(|(values, y)| medfed_protocol::trees::TreeRow {
                        x: values[described..].to_vec(),
                        y: *y,
                    })
                    .collect();
                q.encode_trees(step, &tree_rows, &left_out)
            }
            Some(QueryStep::Cox(step)) => {
                let described = q.columns.len();
                let cox_rows: Vec<medfed_protocol::cox::CoxRow> = rows
                    .iter()
                    .zip(&survival)
                    .map(|(values, s)| medfed_protocol::cox::CoxRow {
                        time: s.time,
                        event: s.event,
                        stratum: s.stratum,
                        x: values[described..].to_vec(),
                    })
                    .collect();
                q.encode_cox(&cox_rows, &step.beta, &left_out)
            }
            None => q.encode_all(&rows, &survival, &left_out),
        };
        match q.noise_multiplier {
            None => {
                // An entry the secure sum's fixed point cannot carry would be clipped (or a
                // non-finite one zeroed): the sum would be silently wrong. Declined, in the
                // words that do not depend on the data.
                if let Some(sr) = &sq.secure
                    && let Some(x) = vector
                        .iter()
                        .find(|x| !x.is_finite() || x.abs() > sr.setup.quant.clip)
                {
                    return decline(format!(
                        "an entry of this site's answer ({x:e}) is outside what secure \
                         aggregation carries (±{:e}): the sum would be wrong; rescale the \
                         columns (e.g. a covariate in other units)",
                        sr.setup.quant.clip
                    ));
                }
                let min_cell = self.config.policy.min_cell.max(q.suppress_below);
                if (rows.len() as u64) < min_cell {
                    // Even summed with others, a cohort this small here would be a small
                    // cell to the aggregator's colluders.
                    return decline(format!(
                        "the cohort at this site is smaller than {min_cell} patients"
                    ));
                }
                let parties = sq
                    .secure
                    .as_ref()
                    .map(|sr| crate::secure::parties_digest(&sr.setup.parties));
                let answered = AnsweredCohort {
                    query_id: q.query_id.clone(),
                    dataset: q.dataset.clone(),
                    source: table.source(),
                    rows: ids,
                    parties_sha256: parties,
                };
                if let Err(why) = self.cohorts.admit(answered, min_cell) {
                    return decline(format!("differencing protection: {why}"));
                }
                if let Some(step) = &sq.step
                    && let Err(why) = self.answered_steps.admit(q, step)
                {
                    return refuse(
                        ErrorCode::CannotServe,
                        format!("query '{}': {why}", q.query_id),
                    );
                }
                self.record_exact_release(&q.query_id, &q.dataset)?;
            }
            Some(z) => {
                // Each step is charged anyway; the order is checked as for exact steps, so
                // that the aggregator cannot go back to ask about the same rows again.
                if let Some(step) = &sq.step
                    && let Err(why) = self.answered_steps.admit(q, step)
                {
                    return refuse(
                        ErrorCode::CannotServe,
                        format!("query '{}': {why}", q.query_id),
                    );
                }
                let charge = medfed_protocol::dp::Charge::Gaussian { z };
                if sq.secure.is_some() {
                    // Charged when the masked input leaves (see `secure_step`).
                    self.check_budget(&q.query_id, &charge)?;
                    noise_charge = Some(charge);
                } else {
                    self.spend_budget(&q.query_id, 0, charge)?;
                }
                match &sq.secure {
                    Some(sr) => {
                        noise_sigma = q
                            .step_share_sigma(
                                sq.step.as_ref(),
                                sr.setup.quant.scale_bits,
                                sr.setup.threshold,
                                sr.colluders,
                            )
                            .unwrap_or(0.0);
                    }
                    None => {
                        let sigma = q.sigma_on_grid(PLAIN_GRID_BITS, false).unwrap_or(0.0);
                        vector = Node::noisy(vector, sigma, PLAIN_GRID_BITS)?;
                    }
                }
            }
        }
        info!(query = %q.query_id, rows = rows.len(), exact, "statistics query answered");
        self.log_decision(
            &q.query_id,
            true,
            &format!(
                "statistics query answered over {} patients ({})",
                rows.len(),
                if exact {
                    "EXACT: no noise"
                } else {
                    "with differential privacy"
                }
            ),
        )?;
        match sq.secure {
            Some(sr) => {
                let binding = binding_of(sr.scale);
                self.join_secure(
                    q.query_id.clone(),
                    round,
                    sr,
                    vector,
                    binding,
                    crate::secure::Noise {
                        sigma: noise_sigma,
                        all_must_survive: exact,
                        charge: noise_charge,
                    },
                )
            }
            None => Ok(Message::StatisticsReport(StatisticsReport {
                query_id: q.query_id.clone(),
                vector,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use medfed_protocol::fedstats::{CmpOp, Condition, StatColumn};

    use super::*;

    #[test]
    fn an_iterative_query_gets_at_most_its_steps_one_answer_each() {
        use medfed_protocol::cox::{Cox, CoxStep, Ties};
        use medfed_protocol::messages::QueryStep;
        let dir = tempfile::tempdir().unwrap();
        let path = AnsweredSteps::path(dir.path());
        let steps = AnsweredSteps::open(path.clone()).unwrap();
        let cox = |id: &str| StatsQuery {
            query_id: id.into(),
            dataset: "lung".into(),
            cohort: vec![],
            columns: vec![],
            correlations: false,
            noise_multiplier: None,
            suppress_below: 11,
            survival: None,
            cox: Some(Cox {
                covariates: vec!["age".into()],
                ties: Ties::Efron,
                max_iterations: 2,
            }),
            trees: None,
        };
        let (q, other) = (cox("q"), cox("other"));
        let step = |iteration, b| {
            QueryStep::Cox(CoxStep {
                iteration,
                beta: vec![b],
            })
        };
        steps.admit(&q, &step(0, 0.0)).unwrap();
        // A retried round with the same contents is the same answer.
        steps.admit(&q, &step(0, 0.0)).unwrap();
        let e = steps.admit(&q, &step(0, 0.5)).unwrap_err();
        assert!(e.contains("other contents"), "{e}");
        steps.admit(&q, &step(1, 0.5)).unwrap();
        let e = steps.admit(&q, &step(2, 0.7)).unwrap_err();
        assert!(e.contains("all the query may take"), "{e}");
        // Another query has its own count, and the record survives a restart.
        steps.admit(&other, &step(0, 0.1)).unwrap();
        drop(steps);
        let steps = AnsweredSteps::open(path).unwrap();
        assert!(steps.admit(&q, &step(5, 0.0)).is_err());
    }

    /// A boosted-trees step is answered only where it follows the last one this site
    /// answered.
    #[test]
    fn a_trees_step_must_follow_the_last_one_answered() {
        use medfed_protocol::messages::QueryStep;
        use medfed_protocol::trees::{Booster, Boosting, FeatureRange, Loss};
        let spec = Boosting {
            target: "type".into(),
            positive_class: Some("Yes".into()),
            loss: Loss::Logistic,
            features: vec![FeatureRange {
                name: "glu".into(),
                low: 40.0,
                high: 200.0,
            }],
            trees: 2,
            depth: 2,
            learning_rate: 0.1,
            max_bins: 8,
            l2: 0.0,
            min_child_weight: 1e-3,
            min_child_samples: 5,
        };
        let q = StatsQuery {
            query_id: "t".into(),
            dataset: "pima".into(),
            cohort: vec![],
            columns: vec![],
            correlations: false,
            noise_multiplier: None,
            suppress_below: 11,
            survival: None,
            cox: None,
            trees: Some(Box::new(spec.clone())),
        };
        let dir = tempfile::tempdir().unwrap();
        let steps = AnsweredSteps::open(AnsweredSteps::path(dir.path())).unwrap();
        let mut booster = Booster::new(&spec);
        let step0 = booster.current();
        // Step 1 before step 0: refused.
        let rows: Vec<medfed_protocol::trees::TreeRow> = (0..100)
            .map(|i| medfed_protocol::trees::TreeRow {
                x: vec![40.0 + f64::from(i) * 1.6],
                y: f64::from(u8::from(i > 60)),
            })
            .collect();
        let medfed_protocol::trees::BoostNext::Evaluate(step1) =
            booster.observe(&spec.encode(&step0, &rows))
        else {
            panic!("no step 1")
        };
        let e = steps
            .admit(&q, &QueryStep::Trees(Box::new(step1.clone())))
            .unwrap_err();
        assert!(e.contains("before step 0"), "{e}");
        steps.admit(&q, &QueryStep::Trees(Box::new(step0))).unwrap();
        // Step 1 with its bins moved: refused; as the booster made it: answered.
        let mut moved = step1.clone();
        moved.model.base_score += 1.0;
        steps.admit(&q, &QueryStep::Trees(Box::new(step1))).unwrap();
        let e = steps
            .admit(&q, &QueryStep::Trees(Box::new(moved.clone())))
            .unwrap_err();
        assert!(e.contains("other contents"), "{e}");
        moved.step = 2;
        let e = steps
            .admit(&q, &QueryStep::Trees(Box::new(moved)))
            .unwrap_err();
        assert!(e.contains("does not follow"), "{e}");
    }

    fn cohort_of(rows: &[u32]) -> AnsweredCohort {
        AnsweredCohort {
            query_id: format!("q{}", rows.len()),
            dataset: "pima".into(),
            source: "a CSV file".into(),
            rows: rows.to_vec(),
            parties_sha256: Some("a,b,c".into()),
        }
    }

    #[test]
    fn two_cohorts_that_differ_by_one_patient_cannot_both_be_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = CohortMemory::path(dir.path());
        let memory = CohortMemory::open(path.clone()).unwrap();
        let all: Vec<u32> = (0..100).collect();
        memory.admit(cohort_of(&all), 11).unwrap();
        // The same cohort again is a new release (charged to the budget), not a difference.
        memory.admit(cohort_of(&all), 11).unwrap();
        // All but one patient: answering would reveal that patient.
        let err = memory.admit(cohort_of(&all[1..]), 11).unwrap_err();
        assert!(
            err.contains("differs from that of query 'q100' by 1 patient(s)"),
            "{err}"
        );
        // 11 fewer is allowed (a cell of 11 may be released).
        memory.admit(cohort_of(&all[11..]), 11).unwrap();
        // Remembered across restarts.
        let again = CohortMemory::open(path).unwrap();
        assert!(again.admit(cohort_of(&all[..99]), 11).is_err());
        // Another dataset is another matter.
        let mut other = cohort_of(&all[1..]);
        other.dataset = "breast-cancer".into();
        again.admit(other, 11).unwrap();
        // The same cohort summed with other sites: the difference of the two sums would be
        // those sites' exact statistics.
        let mut fewer_sites = cohort_of(&all);
        fewer_sites.parties_sha256 = Some("a,b".into());
        let err = again.admit(fewer_sites, 11).unwrap_err();
        assert!(err.contains("summed with other sites"), "{err}");
        // The same dataset read from another source: its row ids mean other rows, so the
        // check cannot be made and the query is refused.
        let mut moved = cohort_of(&all);
        moved.source = "ingest pipeline 'extract'".into();
        let err = again.admit(moved, 11).unwrap_err();
        assert!(
            err.contains("rows of different sources cannot be compared"),
            "{err}"
        );
    }

    #[test]
    fn the_cohort_is_the_rows_meeting_every_condition_with_numbers() {
        let table = Table::from_reader(
            Path::new("t.csv"),
            "age,glu,type\n25,100,No\n35,NA,Yes\n45,150,Yes\n55,160,No\n".as_bytes(),
        )
        .unwrap();
        let q = StatsQuery {
            query_id: "q".into(),
            dataset: "t".into(),
            cohort: vec![Condition {
                column: "age".into(),
                op: CmpOp::Ge,
                value: Some(30.0),
                text: None,
            }],
            columns: vec![StatColumn {
                name: "glu".into(),
                low: 0.0,
                high: 200.0,
                edges: vec![0.0, 200.0],
            }],
            correlations: false,
            noise_multiplier: None,
            suppress_below: 1,
            survival: None,
            cox: None,
            trees: None,
        };
        let c = cohort(&table, &q, None).unwrap();
        assert_eq!(c.ids, vec![2, 3], "row 1 has no glucose value");
        assert_eq!(c.rows, vec![vec![150.0], vec![160.0]]);
        // It is left out, and counted: one row, lacking glu.
        assert_eq!(
            c.left_out,
            LeftOut {
                rows: 1,
                per_column: vec![1, 0]
            }
        );
        assert_eq!(q.missing_columns(), ["glu", "age"]);
        // A row whose condition column is missing is left out too (whether it belongs is
        // not known); one that fails a condition it can be checked on is not in the cohort.
        let gaps = Table::from_reader(
            Path::new("t.csv"),
            "age,glu
,100
NA,
20,
40,x
45,150
"
            .as_bytes(),
        )
        .unwrap();
        let c = cohort(&gaps, &q, None).unwrap();
        assert_eq!(c.ids, vec![4]);
        assert_eq!(
            c.left_out,
            LeftOut {
                rows: 3,
                per_column: vec![2, 2]
            },
            "rows 0 (age), 1 (age, glu), 3 (glu: not a number); row 2 fails age >= 30"
        );
        let mut missing = q.clone();
        missing.columns[0].name = "hba1c".into();
        assert_eq!(
            cohort(&table, &missing, None).unwrap_err(),
            "dataset 't' has no column 'hba1c'"
        );

        // With a patient key a patient counts once (their first row in the cohort), so a
        // patient of many rows moves the vector no more than the noise is for.
        let keyed = Table::from_reader(
            Path::new("t.csv"),
            "patient,age,glu\np1,40,100\np1,41,150\np1,42,160\np2,50,120\n".as_bytes(),
        )
        .unwrap();
        let c = cohort(&keyed, &q, Some("patient")).unwrap();
        assert_eq!(c.ids, vec![0, 3]);
        assert_eq!(c.rows, vec![vec![100.0], vec![120.0]]);

        // Ingested records carry stable ids (partition in the high bits): a record
        // appended to partition 0 later does not renumber partition 1's, so an answered
        // cohort still compares with a new one patient by patient.
        use crate::deid::{Record, Value};
        let record = |glu: f64| {
            let mut r = Record::default();
            r.set("age", Value::Number(50.0));
            r.set("glu", Value::Number(glu));
            r
        };
        let before = vec![(0, record(100.0)), (1 << 24, record(150.0))];
        let mut after = before.clone();
        after.insert(1, (1, record(120.0)));
        let ids = |records: &[(u32, Record)]| {
            cohort(&Table::from_records(Path::new("ingest"), records), &q, None)
                .unwrap()
                .ids
        };
        assert_eq!(ids(&before), vec![0, 1 << 24]);
        assert_eq!(ids(&after), vec![0, 1, 1 << 24]);
    }
}
