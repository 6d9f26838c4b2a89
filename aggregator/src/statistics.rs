//! Running a statistics study: send the query, sum the sites' vectors (securely by
//! default), add central noise where the sites did not, and release the statistics with
//! small cells suppressed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use medfed_protocol::Message;
use medfed_protocol::fedstats::{ReleasePrivacy, StatsQuery, StatsRelease};
use medfed_protocol::messages::{QueryStep, StatisticsQuery, query_binding, step_binding};
use medfed_protocol::quant::QuantParams;
use serde::Serialize;
use tracing::{info, warn};

use crate::study::{Participant, StudyError, StudyRunner};

/// Largest entry of one site's vector, in units (a count of patients).
const MAX_SITE_ENTRY: f64 = 1e9;

/// The grid, `2^-bits` units, on which each site puts its noise without secure aggregation
/// (the node's `PLAIN_GRID_BITS`).
const PLAIN_GRID_BITS: u8 = 24;

/// The finest fixed point (bits below a unit, at most 24) that cannot overflow 64 bits for
/// the sum of `n` sites' entries.
fn bits_for(n: usize) -> u8 {
    let room = (2f64.powi(62) / (n as f64 * MAX_SITE_ENTRY)).log2().floor();
    room.clamp(0.0, 24.0) as u8
}

/// What `out/statistics/<id>.json` holds.
#[derive(Debug, Serialize)]
pub struct StatisticsFile<'a> {
    pub format: &'static str,
    pub query: &'a StatsQuery,
    /// Sites whose cohorts are in the statistics.
    pub sites: Vec<String>,
    pub secure_aggregation: bool,
    pub release: &'a StatsRelease,
}

impl StudyRunner {
    /// Runs the statistics study `query` (this runner's config is its study-shaped view).
    pub(crate) async fn run_statistics(
        &self,
        query: &StatsQuery,
        allowed: usize,
        delta: f64,
    ) -> Result<(StatsRelease, std::path::PathBuf), StudyError> {
        let cfg = &self.cfg;
        self.wait_for_sites(allowed).await?;
        let participants: BTreeMap<String, Participant> = self
            .registry
            .names()
            .into_iter()
            .map(|site| (site, Participant::for_query()))
            .collect();
        let secure_aggregation = cfg.secure_aggregation.enabled;
        let (release, sites) = if let Some(cox) = &query.cox {
            self.run_cox(query, cox, &participants).await?
        } else if let Some(trees) = &query.trees {
            self.run_trees(query, trees, &participants, delta).await?
        } else {
            self.sum_statistics(query, &participants, delta).await?
        };
        let file = StatisticsFile {
            format: "medfed-statistics/2",
            query,
            sites: sites.clone(),
            secure_aggregation,
            release: &release,
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| self.failed(format!("the release cannot be encoded: {e}")))?;
        let path = self
            .out_dir
            .join("statistics")
            .join(format!("{}.json", cfg.id));
        // Logged, then remembered as released (so a restart never releases it a second
        // time), then written: nothing is released the compliance log does not show.
        let event = medfed_protocol::audit::Event::Released {
            study: cfg.id.clone(),
            round: 0,
            sites: sites.clone(),
            sha256: medfed_protocol::audit::sha256_hex(&json),
        };
        let remember = || {
            crate::checkpoint::save_statistics(&*self.store, &cfg.id, &path)
                .map_err(|e| format!("cannot record the release in the store ({e})"))
        };
        crate::release::release(&self.audit, event, remember, &path, &json).map_err(
            |e| match e {
                crate::release::ReleaseError::Write { path, source } => StudyError::Export {
                    study: cfg.id.clone(),
                    path,
                    source,
                },
                e @ crate::release::ReleaseError::Unlogged(_) => self.unlogged(e),
                e => self.failed(e.to_string()),
            },
        )?;
        info!(study = %cfg.id, sites = sites.len(), path = %path.display(), "statistics released (read it with `medfed aggregator statistics show {}`)", path.display());
        if let Some(said) = release.left_out.as_ref().and_then(left_out_summary) {
            warn!(study = %cfg.id, "{said}");
        }
        Ok((release, path))
    }

    /// A Cox query: Newton–Raphson iterations, each a secure sum of the sites' terms at the
    /// fitter's coefficients, all from the same sites.
    async fn run_cox(
        &self,
        query: &StatsQuery,
        cox: &medfed_protocol::cox::Cox,
        participants: &BTreeMap<String, Participant>,
    ) -> Result<(StatsRelease, Vec<String>), StudyError> {
        use medfed_protocol::cox::{CoxFitter, CoxNext};
        if !self.cfg.secure_aggregation.enabled {
            return Err(
                self.failed("a Cox model is fitted under secure aggregation only".to_string())
            );
        }
        let mut fitter = CoxFitter::new(cox);
        let mut step = fitter.first();
        let mut first: Option<(Vec<f64>, Vec<String>)> = None;
        let fit = loop {
            let (q, s) = (query.clone(), step.clone());
            let secure = self
                .secure_sum(
                    step.iteration,
                    1,
                    participants,
                    query.dimension(),
                    |n, scale| {
                        let quant = QuantParams::for_parties(n, MAX_SITE_ENTRY, bits_for(n))
                            .map_err(|e| e.to_string())?;
                        Ok((quant, step_binding(&q, scale, &QueryStep::Cox(s))))
                    },
                    |secure| {
                        Message::StatisticsQuery(StatisticsQuery {
                            query: query.clone(),
                            secure: Some(secure),
                            step: Some(QueryStep::Cox(step.clone())),
                        })
                    },
                )
                .await
                .map_err(|e| self.failed(format!("Cox iteration {}: {e}", step.iteration)))?;
            match &first {
                None => first = Some((secure.sum.clone(), secure.sites.clone())),
                Some((_, sites)) if *sites != secure.sites => {
                    return Err(self.failed(format!(
                        "Cox iteration {} summed sites {} but iteration 0 summed {}: a fit needs \
                         the same sites at every iteration",
                        step.iteration,
                        secure.sites.join(", "),
                        sites.join(", ")
                    )));
                }
                Some(_) => {}
            }
            info!(study = %self.cfg.id, iteration = step.iteration, "Cox iteration summed");
            match fitter.observe(&secure.sum[..cox.dimension()]) {
                CoxNext::Evaluate(next) => step = next,
                CoxNext::Done(fit) => break fit,
                CoxNext::Failed(why) => return Err(self.failed(format!("the Cox model: {why}"))),
            }
        };
        let Some((first, sites)) = first else {
            return Err(self.failed("no Cox iteration was summed".to_string()));
        };
        if sites.len() < self.cfg.min_sites {
            return Err(StudyError::NoQuorum {
                study: self.cfg.id.clone(),
                got: sites.len(),
                need: self.cfg.min_sites,
                detail: "too few sites answered the Cox query".into(),
            });
        }
        let rounding =
            participants.len() as f64 * 2f64.powi(-i32::from(bits_for(participants.len())));
        let release = query
            .release_cox(&first, fit, rounding)
            .map_err(|e| self.failed(e))?;
        Ok((release, sites))
    }

    /// A boosted-trees query: the bins, then each level of each tree, every step a secure
    /// sum of the sites' histograms, all from the same sites; the model is released to
    /// `models/<id>/final.json` (logged first, like every release).
    async fn run_trees(
        &self,
        query: &StatsQuery,
        spec: &medfed_protocol::trees::Boosting,
        participants: &BTreeMap<String, Participant>,
        delta: f64,
    ) -> Result<(StatsRelease, Vec<String>), StudyError> {
        use medfed_protocol::trees::{BoostNext, Booster};
        if !self.cfg.secure_aggregation.enabled {
            return Err(
                self.failed("boosted trees are grown under secure aggregation only".to_string())
            );
        }
        let mut booster = Booster::with_noise(spec, query.noise_multiplier.is_some());
        // The noise on step 0's sum (for its released counts): every site's share.
        let mut step0_noise = None;
        let mut step = booster.current();
        let mut first: Option<(Vec<f64>, Vec<String>)> = None;
        let mut entries: u64 = 0;
        let mut threshold = None;
        let (ensemble, losses) = loop {
            let qs = QueryStep::Trees(Box::new(step.clone()));
            let dimension = query.step_dimension(Some(&qs));
            let (q, binding_step) = (query.clone(), qs.clone());
            let secure = self
                .secure_sum(
                    step.step,
                    1,
                    participants,
                    dimension,
                    |n, scale| {
                        let quant = QuantParams::for_parties(n, MAX_SITE_ENTRY, bits_for(n))
                            .map_err(|e| e.to_string())?;
                        Ok((quant, step_binding(&q, scale, &binding_step)))
                    },
                    |secure| {
                        Message::StatisticsQuery(StatisticsQuery {
                            query: query.clone(),
                            secure: Some(secure),
                            step: Some(qs.clone()),
                        })
                    },
                )
                .await
                .map_err(|e| self.failed(format!("boosted trees, step {}: {e}", step.step)))?;
            entries += dimension as u64;
            if step.step == 0 {
                // m shares of σ²/(t − c) each.
                let m = secure.sites.len() as f64;
                step0_noise = query
                    .step_share_sigma(
                        Some(&qs),
                        bits_for(participants.len()),
                        secure.threshold,
                        self.cfg.secure_aggregation.tolerated_colluders,
                    )
                    .map(|share| share * m.sqrt());
            }
            // The provenance states the lowest threshold any step ran with.
            threshold = Some(threshold.map_or(secure.threshold, |t: u32| t.min(secure.threshold)));
            match &first {
                None => first = Some((secure.sum.clone(), secure.sites.clone())),
                Some((_, sites)) if *sites != secure.sites => {
                    return Err(self.failed(format!(
                        "boosted trees: step {} summed sites {} but step 0 summed {}: a model \
                         needs the same sites at every step",
                        step.step,
                        secure.sites.join(", "),
                        sites.join(", ")
                    )));
                }
                Some(_) => {}
            }
            if let Some((tree, 0)) = step.level {
                info!(study = %self.cfg.id, tree, "boosted trees: growing tree {} of {}", tree + 1, spec.trees);
            }
            match booster.observe(&secure.sum[..spec.dimension(&step)]) {
                BoostNext::Evaluate(next) => step = next,
                BoostNext::Done(model, losses) => break (model, losses),
                BoostNext::Failed(why) => {
                    return Err(self.failed(format!("boosted trees: {why}")));
                }
            }
        };
        let Some((first, sites)) = first else {
            return Err(self.failed("no step of the boosted trees was summed".to_string()));
        };
        ensemble
            .validate()
            .map_err(|e| self.failed(format!("the boosted trees cannot be released: {e}")))?;
        if sites.len() < self.cfg.min_sites {
            return Err(StudyError::NoQuorum {
                study: self.cfg.id.clone(),
                got: sites.len(),
                need: self.cfg.min_sites,
                detail: "too few sites answered the boosted-trees query".into(),
            });
        }
        let rows = first[0].round();
        if rows < query.suppress_below as f64 {
            return Err(self.failed(format!(
                "the model rests on fewer than {} rows, so it is not released",
                query.suppress_below
            )));
        }
        let steps = step.step + 1;
        let kind = match spec.loss {
            medfed_protocol::trees::Loss::Logistic => medfed_protocol::model::ModelKind::Logistic,
            medfed_protocol::trees::Loss::Squared => medfed_protocol::model::ModelKind::Linear,
        };
        let features: Vec<String> = spec.features.iter().map(|f| f.name.clone()).collect();
        let missing_sites = participants
            .keys()
            .filter(|s| !sites.contains(s))
            .map(|s| medfed_protocol::export::MissingSite {
                site: s.clone(),
                reason: "connected, but not in the secure sums".into(),
            })
            .collect();
        let exported = medfed_protocol::export::ExportedModel {
            format: medfed_protocol::export::TREES_MODEL_FORMAT.into(),
            study_id: self.cfg.id.clone(),
            round: steps,
            target: spec.target.clone(),
            positive_class: spec.positive_class.clone(),
            classes: Vec::new(),
            model: medfed_protocol::model::GlobalModel::zeros(
                kind,
                features.clone(),
                medfed_protocol::stats::Standardization::identity(features.len()),
            ),
            sites: sites.clone(),
            training_rows: rows as u64,
            train_loss: losses.last().copied().unwrap_or(f64::NAN),
            validation: None,
            missing_sites,
            stopped: None,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            provenance: Some(medfed_protocol::export::Provenance {
                study_sha256: query.approval_hash(),
                secure_aggregation: Some(medfed_protocol::export::SecureAggregationUsed {
                    threshold,
                    tolerated_colluders: self.cfg.secure_aggregation.tolerated_colluders,
                }),
                privacy: query.noise_multiplier.map(|z| {
                    let mut acc = medfed_protocol::dp::accountant::RdpAccountant::default();
                    acc.compose_gaussian(1.0, z, u64::from(steps));
                    medfed_protocol::export::PrivacyCost {
                        mechanism: "gaussian-histograms".into(),
                        // The largest of the steps' sensitivities (step 0's, a level's).
                        clip_norm: query
                            .step_sensitivity(Some(&QueryStep::Trees(Box::new(
                                Booster::new(spec).current(),
                            ))))
                            .max(query.step_sensitivity(Some(&QueryStep::Trees(Box::new(
                                booster.current(),
                            ))))),
                        noise_multiplier: z,
                        rounds: steps,
                        epsilon: acc.epsilon(delta).0,
                        delta,
                    }
                }),
            }),
            trees: Some(ensemble),
        };
        let json = serde_json::to_vec_pretty(&exported)
            .map_err(|e| self.failed(format!("the model cannot be encoded: {e}")))?;
        let path = self
            .out_dir
            .join("models")
            .join(&self.cfg.id)
            .join("final.json");
        let event = medfed_protocol::audit::Event::Released {
            study: self.cfg.id.clone(),
            round: steps,
            sites: sites.clone(),
            sha256: medfed_protocol::audit::sha256_hex(&json),
        };
        crate::release::release(&self.audit, event, || Ok(()), &path, &json).map_err(
            |e| match e {
                crate::release::ReleaseError::Write { path, source } => StudyError::Export {
                    study: self.cfg.id.clone(),
                    path,
                    source,
                },
                e @ crate::release::ReleaseError::Unlogged(_) => self.unlogged(e),
                e => self.failed(e.to_string()),
            },
        )?;
        info!(study = %self.cfg.id, path = %path.display(), "boosted-trees model released");
        let mut release = query
            .release_trees(
                &first,
                step0_noise,
                medfed_protocol::trees::TreesSummary {
                    trees: spec.trees,
                    steps,
                    train_loss: losses,
                    entries_per_site: entries,
                    model: path.display().to_string(),
                },
            )
            .map_err(|e| self.failed(e))?;
        // Every step is one Gaussian release at z, for each site's patients.
        release.privacy = query.noise_multiplier.map(|z| {
            let mut acc = medfed_protocol::dp::accountant::RdpAccountant::default();
            acc.compose_gaussian(1.0, z, u64::from(steps));
            ReleasePrivacy {
                noise_multiplier: z,
                epsilon: acc.epsilon(delta).0,
                delta,
            }
        });
        Ok((release, sites))
    }

    /// A one-shot statistics query: one sum (secure, or of the sites' noisy vectors), with
    /// the noise the sites added, released.
    async fn sum_statistics(
        &self,
        query: &StatsQuery,
        participants: &BTreeMap<String, Participant>,
        delta: f64,
    ) -> Result<(StatsRelease, Vec<String>), StudyError> {
        let cfg = &self.cfg;
        let participants = participants.clone();
        // The noise is the sites': each adds its share (a discrete Gaussian on its grid), so
        // that the honest ones' shares carry at least σ together, and charges its budget.
        // Nobody here adds or sees any noise alone.
        let (sum, sites, noise_sd, rounding) = if cfg.secure_aggregation.enabled {
            let q = query.clone();
            let secure = self
                .secure_sum(
                    0,
                    1,
                    &participants,
                    query.dimension(),
                    |n, scale| {
                        // The finest fixed point that cannot overflow 64 bits for n sites.
                        let quant = QuantParams::for_parties(n, MAX_SITE_ENTRY, bits_for(n))
                            .map_err(|e| e.to_string())?;
                        Ok((quant, query_binding(&q, scale)))
                    },
                    |secure| {
                        Message::StatisticsQuery(StatisticsQuery {
                            query: query.clone(),
                            secure: Some(secure),
                            step: None,
                        })
                    },
                )
                .await
                .map_err(|e| self.failed(e))?;
            let n = participants.len();
            let bits = bits_for(n);
            let m = secure.sites.len() as f64;
            let honest = secure
                .threshold
                .saturating_sub(cfg.secure_aggregation.tolerated_colluders)
                .max(1);
            // m shares of σ²/(t − c) each.
            let noise_sd = query
                .sigma_on_grid(bits, true)
                .map(|s| s * (m / f64::from(honest)).sqrt());
            // Each site's entries are rounded to the fixed point (at most one step each).
            let rounding = n as f64 * 2f64.powi(-i32::from(bits));
            (secure.sum, secure.sites, noise_sd, rounding)
        } else {
            let (sum, sites) = self.plain_statistics(query, &participants).await;
            // Each site adds all of σ itself.
            let noise_sd = query
                .sigma_on_grid(PLAIN_GRID_BITS, false)
                .map(|s| s * (sites.len() as f64).sqrt());
            (sum, sites, noise_sd, 0.0)
        };
        if sites.len() < cfg.min_sites {
            return Err(StudyError::NoQuorum {
                study: cfg.id.clone(),
                got: sites.len(),
                need: cfg.min_sites,
                detail: "too few sites answered the statistics query".into(),
            });
        }
        let mut release = query
            .release(&sum, noise_sd, rounding)
            .map_err(|e| self.failed(e))?;
        release.privacy = query.noise_multiplier.map(|z| ReleasePrivacy::of(z, delta));
        Ok((release, sites))
    }

    /// Without secure aggregation: each site's vector, summed here.
    async fn plain_statistics(
        &self,
        query: &StatsQuery,
        participants: &BTreeMap<String, Participant>,
    ) -> (Vec<f64>, Vec<String>) {
        let msg = Arc::new(Message::StatisticsQuery(StatisticsQuery {
            query: query.clone(),
            secure: None,
            step: None,
        }));
        let timeout = Duration::from_secs(self.cfg.round_timeout_secs);
        let mut tasks = self.ask_all(msg, participants.keys(), timeout);
        let mut sum = vec![0.0; query.dimension()];
        let mut sites = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let Ok((site, answer, _)) = joined else {
                continue;
            };
            match answer {
                Ok(Message::StatisticsReport(r))
                    if r.query_id == query.query_id
                        && r.vector.len() == sum.len()
                        && r.vector
                            .iter()
                            .all(|x| x.is_finite() && x.abs() <= MAX_SITE_ENTRY) =>
                {
                    sum.iter_mut().zip(&r.vector).for_each(|(s, x)| *s += x);
                    sites.push(site);
                }
                Ok(other) => warn!(%site, "statistics query: unusable answer ({})", other.kind()),
                Err(e) => warn!(%site, "statistics query: no answer: {e}"),
            }
        }
        sites.sort();
        (sum, sites)
    }
}

/// What the operator is told about the rows the sites left out for missing values: `None`
/// when the release shows none (every released count 0, the noise aside).
pub fn left_out_summary(out: &medfed_protocol::fedstats::LeftOutRelease) -> Option<String> {
    let count = |r: &medfed_protocol::fedstats::Released| match r.value {
        Some(v) if r.error > 0.0 => format!("{:.0} ± {:.0}", v.max(0.0), r.error),
        Some(v) => format!("{v:.0}"),
        None => "a small number (suppressed)".to_string(),
    };
    // Nothing to say when every count is shown and within its error of 0.
    let none = |r: &medfed_protocol::fedstats::Released| {
        r.value.is_some_and(|v| v.abs() <= r.error.max(0.5))
    };
    if none(&out.rows) && out.columns.iter().all(|(_, r)| none(r)) {
        return None;
    }
    let per_column: Vec<String> = out
        .columns
        .iter()
        .filter(|(_, r)| !none(r))
        .map(|(c, r)| format!("{c}: {}", count(r)))
        .collect();
    Some(format!(
        "rows left out of the statistics for a missing or non-numeric value: {} ({}); the \
         statistics describe the other rows only",
        count(&out.rows),
        per_column.join(", ")
    ))
}
