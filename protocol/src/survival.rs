//! Kaplan–Meier survival curves of a statistics query's cohort, summed across sites.
//!
//! A query with a [`Survival`] part asks each site, per stratum `s`, for its patients `n`
//! and, per bin `b` of a shared time grid, those whose follow-up ends in the bin with the
//! event (`d`) and without it (censored, `c`):
//!
//! ```text
//! per stratum: [ n | d₀ c₀ | d₁ c₁ | … ]
//! ```
//!
//! Every entry is a count, so the section sums across sites, under secure aggregation or
//! with noise, and one patient changes it by 1 in two entries (`n` and one bin). The number
//! at risk at the start of bin `b` is both `n − Σ_{b'<b}(d + c)` and `Σ_{b'≥b}(d + c)`:
//! exact counts give the same, and noisy ones are combined by the inverse of their
//! variances (`1 + 2b` and `2(B − b)` entries' noise), so that no number at risk carries
//! more noise than about `B/2` entries' (instead of `2B` at the start by one sum alone). The
//! curve is the product-limit estimate over the bins. With a grid that gives every
//! distinct follow-up time its own bin (whole days, say, for times in days) the curve is
//! the pooled data's Kaplan–Meier curve exactly; a coarser grid groups the times (a life
//! table), and each drop is drawn at its bin's start.
//!
//! Greenwood's variance gives the 95% confidence interval on the log(−log) scale (the
//! "exponential Greenwood" interval of lifelines and of R's `conf.type = "log-log"`); the
//! log-rank test compares the strata (`k − 1` degrees of freedom, the hypergeometric
//! variance with ties).

use serde::{Deserialize, Serialize};

use crate::fedstats::Released;

/// The most bins a time grid may have.
pub const MAX_BINS: usize = 20_000;

/// The most strata a query may compare.
pub const MAX_STRATA: usize = 32;

/// The normal quantile of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The survival part of a statistics query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Survival {
    /// The column holding each patient's follow-up time (from the start of follow-up to the
    /// event or the end of follow-up), in the grid's unit.
    pub time: String,
    /// The column saying whether follow-up ended with the event.
    pub event: String,
    /// The `event` column's values meaning the event happened (numbers compare as numbers).
    pub event_codes: Vec<String>,
    /// The `event` column's values meaning the patient was censored (event not seen).
    pub censored_codes: Vec<String>,
    /// The time grid's edges, strictly rising: bin `b` is `[grid[b], grid[b+1])`, the last
    /// bin includes its end. A time before the first edge is a data error (the row is left
    /// out and counted); a time after the last edge is censored at it.
    pub grid: Vec<f64>,
    /// Separate curves for the levels of a column, compared by the log-rank test.
    pub strata: Option<Strata>,
}

/// The strata of a survival query: one curve per level of `column`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strata {
    /// The column whose values name the strata.
    pub column: String,
    /// The levels, one curve each (a row with another value is left out and counted).
    pub levels: Vec<String>,
}

/// One row's part in a survival query: its bin, whether it ended with the event, and its
/// stratum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SurvivalRow {
    /// Its follow-up time (a time past the grid's end is that end, censored).
    pub time: f64,
    /// The bin its follow-up ends in.
    pub bin: usize,
    /// Whether follow-up ended with the event (else censored).
    pub event: bool,
    /// Its stratum's index (0 without strata).
    pub stratum: usize,
}

/// Which of a row's survival columns cannot be used: `[time, event, stratum]`.
pub type Lacks = [bool; 3];

/// Whether `cell` is one of `codes`: equal text (trimmed), or equal numbers where both
/// read as numbers (`2` is `2.0`).
fn matches(codes: &[String], cell: &str) -> bool {
    let cell = cell.trim();
    let number = cell.parse::<f64>().ok().filter(|x| x.is_finite());
    codes.iter().any(|c| {
        let c = c.trim();
        c == cell || matches!((number, c.parse::<f64>()), (Some(x), Ok(y)) if x == y)
    })
}

impl Survival {
    /// Checks the survival part: distinct columns, codes given and disjoint, a rising
    /// finite grid of at most [`MAX_BINS`] bins, and 2 to [`MAX_STRATA`] distinct levels.
    pub fn validate(&self) -> Result<(), String> {
        if self.time.is_empty() || self.event.is_empty() || self.time == self.event {
            return Err("survival: time and event must name two different columns".into());
        }
        if self.event_codes.is_empty() || self.censored_codes.is_empty() {
            return Err("survival: give the event column's event_codes and censored_codes".into());
        }
        if let Some(c) = self
            .event_codes
            .iter()
            .find(|c| matches(&self.censored_codes, c))
        {
            return Err(format!(
                "survival: {c:?} is both an event code and a censored code"
            ));
        }
        let g = &self.grid;
        if g.len() < 2
            || g.len() > MAX_BINS + 1
            || g.iter().any(|x| !x.is_finite())
            || g.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(format!(
                "survival: the time grid needs 2 to {} strictly rising finite edges (it has {})",
                MAX_BINS + 1,
                g.len()
            ));
        }
        if let Some(s) = &self.strata {
            if s.column.is_empty() || s.column == self.time || s.column == self.event {
                return Err(
                    "survival: the strata column must be a column other than time and event".into(),
                );
            }
            if s.levels.len() < 2 || s.levels.len() > MAX_STRATA {
                return Err(format!(
                    "survival: strata need 2 to {MAX_STRATA} levels (got {})",
                    s.levels.len()
                ));
            }
            for (i, l) in s.levels.iter().enumerate() {
                if matches(&s.levels[..i], l) {
                    return Err(format!("survival: stratum level {l:?} is listed twice"));
                }
            }
        }
        Ok(())
    }

    /// The grid's bins.
    pub fn bins(&self) -> usize {
        self.grid.len().saturating_sub(1)
    }

    /// The number of curves: the strata's levels, or 1.
    pub fn strata_count(&self) -> usize {
        self.strata.as_ref().map_or(1, |s| s.levels.len())
    }

    /// The columns the survival part reads: time, event, and the strata column if any.
    pub fn columns(&self) -> Vec<&str> {
        let mut c = vec![self.time.as_str(), self.event.as_str()];
        if let Some(s) = &self.strata {
            c.push(&s.column);
        }
        c
    }

    /// The section's length in a site's vector.
    pub fn dimension(&self) -> usize {
        self.strata_count() * (1 + 2 * self.bins())
    }

    /// A row's part from its cells (`stratum` is `None` without strata), or which of them
    /// cannot be used: a time that is not a number or lies before the grid, an event value
    /// that is neither code, a stratum value not listed.
    pub fn row(
        &self,
        time: &str,
        event: &str,
        stratum: Option<&str>,
    ) -> Result<SurvivalRow, Lacks> {
        let mut lacks = [false; 3];
        let t = time.trim().parse::<f64>().ok().filter(|t| t.is_finite());
        let first = self.grid[0];
        lacks[0] = !t.is_some_and(|t| t >= first);
        let ended = if matches(&self.event_codes, event) {
            Some(true)
        } else if matches(&self.censored_codes, event) {
            Some(false)
        } else {
            lacks[1] = true;
            None
        };
        let level = match (&self.strata, stratum) {
            (None, _) => Some(0),
            (Some(s), Some(cell)) => s
                .levels
                .iter()
                .position(|l| matches(std::slice::from_ref(l), cell)),
            (Some(_), None) => None,
        };
        lacks[2] = level.is_none();
        match (t, ended, level) {
            (Some(t), Some(ended), Some(stratum)) if !lacks[0] => {
                let last = self.grid[self.grid.len() - 1];
                // Past the grid: alive (event-free) at its end, so censored there.
                let (time, bin, event) = if t > last {
                    (last, self.bins() - 1, false)
                } else {
                    let i = self.grid.partition_point(|e| *e <= t);
                    (t, i.clamp(1, self.bins()) - 1, ended)
                };
                Ok(SurvivalRow {
                    time,
                    bin,
                    event,
                    stratum,
                })
            }
            _ => Err(lacks),
        }
    }

    /// Adds `rows` to the section `v` (in counts).
    pub fn encode_into(&self, v: &mut [f64], rows: &[SurvivalRow]) {
        let per = 1 + 2 * self.bins();
        for r in rows {
            v[r.stratum * per] += 1.0;
            v[r.stratum * per + 1 + 2 * r.bin + usize::from(!r.event)] += 1.0;
        }
    }

    /// The curves and the log-rank test from the section summed over sites. `sigma` is the
    /// noise's standard deviation per entry (`None`: exact counts, rounded to whole numbers
    /// when the fixed point's `rounding` per entry is below 0.5). Each stated error holds
    /// while every count, and every sum of counts giving a number at risk, lies within
    /// [`crate::fedstats::Z`] standard deviations of its noise plus its rounding. No point
    /// of a curve is released from fewer than `threshold` patients at risk: a curve stops
    /// where its number at risk first falls below it. The log-rank test is computed from
    /// exact counts only (its p-value would not account for the noise).
    pub fn release(
        &self,
        section: &[f64],
        sigma: Option<f64>,
        rounding: f64,
        threshold: f64,
    ) -> Result<SurvivalRelease, String> {
        if section.len() != self.dimension() {
            return Err(format!(
                "the survival section has {} entries, the query {}",
                section.len(),
                self.dimension()
            ));
        }
        let exact = sigma.is_none();
        let whole = exact && rounding < 0.5;
        let counts: Vec<f64> = section
            .iter()
            .map(|x| if whole { x.round() } else { *x })
            .collect();
        let noise = Noise {
            sd: sigma.unwrap_or(0.0),
            rounding: if whole { 0.0 } else { rounding },
        };
        let per = 1 + 2 * self.bins();
        let tables: Vec<Table> = (0..self.strata_count())
            .map(|s| Table::new(&counts[s * per..(s + 1) * per], whole))
            .collect();
        let strata = tables
            .iter()
            .enumerate()
            .map(|(s, t)| self.curve(s, t, noise, exact, threshold))
            .collect();
        // From exact counts only, and only where every stratum is released.
        let log_rank =
            (exact && self.strata_count() > 1 && tables.iter().all(|t| t.n >= threshold))
                .then(|| log_rank(&tables))
                .flatten();
        Ok(SurvivalRelease {
            time: self.time.clone(),
            confidence: 0.95,
            noisy: !exact,
            strata,
            log_rank,
        })
    }

    fn curve(
        &self,
        s: usize,
        t: &Table,
        noise: Noise,
        exact: bool,
        threshold: f64,
    ) -> StratumCurve {
        let bins = self.bins();
        let radius = noise.radius(1);
        let level = self.strata.as_ref().map(|st| st.levels[s].clone());
        let mut points = Vec::new();
        let (mut surv, mut greenwood) = (1.0f64, 0.0f64);
        let (mut surv_low, mut surv_high) = (1.0f64, 1.0f64);
        let mut shown = t.n >= threshold;
        let mut cut = false;
        let mut median = None;
        for b in 0..self.bins() {
            let (r, d, c) = (t.at_risk[b], t.events[b], t.censored[b]);
            // Exact counts: a point is shown only while at least `threshold` stay at risk
            // after it too (else the last point's at-risk less its events and censorings
            // would be a small count); past it nothing is listed, not even the times.
            shown = shown && r >= threshold && (!exact || r - d - c >= threshold);
            if exact && !shown {
                cut = true;
                break;
            }
            if exact && d == 0.0 && c == 0.0 {
                // Nothing happens in the bin: the curve holds (exact counts only; every
                // noisy bin is listed).
                continue;
            }
            let factor = if r > 0.0 {
                (1.0 - d.max(0.0) / r).clamp(0.0, 1.0)
            } else {
                1.0
            };
            surv *= factor;
            if r > d && d > 0.0 {
                greenwood += d / (r * (r - d));
            }
            // The range the exact curve lies in while each count and each number at risk
            // (a sum of 2(B − b) counts) is within its radius.
            let r_err = noise.combined_radius(b, bins);
            let low_f = if r - r_err > 0.0 {
                (1.0 - (d + radius) / (r - r_err)).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let high_f =
                (1.0 - (d - radius).max(0.0) / (r + r_err).max(f64::MIN_POSITIVE)).clamp(0.0, 1.0);
            surv_low *= low_f;
            surv_high *= high_f;
            let error = (surv - surv_low).max(surv_high - surv).max(0.0);
            let ci = (shown && surv > 0.0 && surv < 1.0 && greenwood.is_finite()).then(|| {
                let se = greenwood.sqrt() / surv.ln().abs();
                let (a, b) = (surv.powf((Z95 * se).exp()), surv.powf((-Z95 * se).exp()));
                (a.min(b), a.max(b))
            });
            if shown && median.is_none() && surv <= 0.5 {
                median = Some(self.grid[b]);
            }
            points.push(SurvivalPoint {
                start: self.grid[b],
                end: self.grid[b + 1],
                at_risk: Released::new(r, r_err, shown),
                events: Released::new(d, radius, shown),
                censored: Released::new(c, radius, shown),
                survival: Released::new(surv, error, shown),
                ci,
            });
        }
        let events: f64 = t.events.iter().sum();
        // Exact: the total is hidden where the curve was cut (the total less the events
        // shown would count the tail's), and where it is small.
        let events_shown =
            t.n >= threshold && (!exact || (!cut && (events == 0.0 || events >= threshold)));
        StratumCurve {
            level,
            patients: Released::new(t.n, noise.radius(1), t.n >= threshold),
            events: Released::new(events, noise.radius(bins), events_shown),
            median,
            points,
        }
    }
}

/// The noise on the summed counts.
#[derive(Debug, Clone, Copy)]
struct Noise {
    /// Standard deviation per entry.
    sd: f64,
    /// Fixed-point rounding per entry.
    rounding: f64,
}

impl Noise {
    /// How far a sum of `k` entries may lie from its exact value: Z standard deviations of
    /// its (Gaussian) noise, plus each entry's rounding.
    fn radius(self, k: usize) -> f64 {
        crate::fedstats::Z * self.sd * (k as f64).sqrt() + self.rounding * k as f64
    }

    /// How far the number at risk at bin `b` of `bins` (see [`Table::new`]) may lie from
    /// its exact value: Z standard deviations of the combination's noise, plus its rounding.
    fn combined_radius(self, b: usize, bins: usize) -> f64 {
        let (w_pre, w_suf) = weights(b, bins);
        let var = 1.0 / (w_pre + w_suf);
        crate::fedstats::Z * self.sd * var.sqrt() + self.rounding * 2.0 * var
    }
}

/// The weights of the two estimates of the number at risk at bin `b` of `bins`: from the
/// stratum's size less the earlier bins (`1 + 2b` entries), and from the later bins
/// (`2(bins − b)` entries), each the inverse of its noise's variance in entries.
fn weights(b: usize, bins: usize) -> (f64, f64) {
    (1.0 / (1 + 2 * b) as f64, 1.0 / (2 * (bins - b)) as f64)
}

/// One stratum's counts per bin, with the number at risk at each bin's start.
struct Table {
    n: f64,
    at_risk: Vec<f64>,
    events: Vec<f64>,
    censored: Vec<f64>,
}

impl Table {
    /// From a stratum's `[n | d₀ c₀ | …]`. At risk at a bin's start: everyone whose
    /// follow-up ends in it or later; from exact counts the sum of the later bins, from
    /// noisy ones the combination of both estimates.
    fn new(section: &[f64], exact: bool) -> Table {
        let n = section[0];
        let events: Vec<f64> = section[1..].iter().step_by(2).copied().collect();
        let censored: Vec<f64> = section[1..].iter().skip(1).step_by(2).copied().collect();
        let bins = events.len();
        let mut later = vec![0.0; bins];
        let mut r = 0.0;
        for b in (0..bins).rev() {
            r += events[b] + censored[b];
            later[b] = r;
        }
        let mut left = n;
        let at_risk = (0..bins)
            .map(|b| {
                if exact {
                    return later[b];
                }
                let (w_pre, w_suf) = weights(b, bins);
                let combined = (w_pre * left + w_suf * later[b]) / (w_pre + w_suf);
                left -= events[b] + censored[b];
                combined
            })
            .collect();
        Table {
            n,
            at_risk,
            events,
            censored,
        }
    }
}

/// The log-rank test of equal hazards across the strata (`None` when there is nothing to
/// compare: fewer than two strata with events, or a singular covariance). Noisy counts are
/// taken as they are, with negative ones as 0.
fn log_rank(tables: &[Table]) -> Option<LogRank> {
    let k = tables.len();
    let bins = tables[0].events.len();
    let mut o_minus_e = vec![0.0; k];
    let mut var = vec![0.0; k * k];
    for b in 0..bins {
        let r: Vec<f64> = tables.iter().map(|t| t.at_risk[b].max(0.0)).collect();
        let d: Vec<f64> = tables
            .iter()
            .zip(&r)
            .map(|(t, r)| t.events[b].clamp(0.0, *r))
            .collect();
        let (rt, dt): (f64, f64) = (r.iter().sum(), d.iter().sum());
        if rt <= 0.0 || dt <= 0.0 {
            continue;
        }
        let ties = if rt > 1.0 {
            (rt - dt) / (rt - 1.0)
        } else {
            0.0
        };
        for i in 0..k {
            o_minus_e[i] += d[i] - dt * r[i] / rt;
            for j in 0..k {
                let delta = if i == j { 1.0 } else { 0.0 };
                var[i * k + j] += dt * (r[i] / rt) * (delta - r[j] / rt) * ties;
            }
        }
    }
    // The first k − 1 strata (the last is their complement).
    let m = k - 1;
    let sub: Vec<f64> = (0..m)
        .flat_map(|i| (0..m).map(move |j| (i, j)))
        .map(|(i, j)| var[i * k + j])
        .collect();
    let inv = crate::linalg::inverse(&sub, m)?;
    let chi2 = crate::linalg::quadratic_form(&inv, &o_minus_e[..m]);
    if !chi2.is_finite() || chi2 < 0.0 {
        return None;
    }
    Some(LogRank {
        chi2,
        df: m as u32,
        p_value: chi2_sf(chi2, m as f64),
    })
}

/// `P(X > x)` for a χ² variable with `df` degrees of freedom.
pub fn chi2_sf(x: f64, df: f64) -> f64 {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    ChiSquared::new(df).map_or(f64::NAN, |d| d.sf(x))
}

/// One bin of a released curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurvivalPoint {
    /// The bin's start (where the curve's drop is drawn).
    pub start: f64,
    /// The bin's end.
    pub end: f64,
    /// Patients at risk at the bin's start.
    pub at_risk: Released,
    /// Events in the bin.
    pub events: Released,
    /// Censored in the bin.
    pub censored: Released,
    /// The Kaplan–Meier estimate after the bin; its `error` bounds the noise's effect (not
    /// the sampling error: that is `ci`).
    pub survival: Released,
    /// The 95% confidence interval (Greenwood, log(−log) scale); `None` where the estimate is
    /// 0 or 1 or not released.
    pub ci: Option<(f64, f64)>,
}

/// One stratum's released curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StratumCurve {
    /// The stratum's level (`None` without strata).
    pub level: Option<String>,
    /// The stratum's patients.
    pub patients: Released,
    /// The stratum's events, in all.
    pub events: Released,
    /// The start of the first bin where the released curve reaches 0.5 (`None`: not within
    /// the released part of the curve).
    pub median: Option<f64>,
    /// The bins, in time order (for exact counts, only those with an event or a censoring).
    pub points: Vec<SurvivalPoint>,
}

/// The log-rank test across strata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRank {
    /// The test statistic.
    pub chi2: f64,
    /// Its degrees of freedom (strata − 1).
    pub df: u32,
    /// The p-value of equal hazards.
    pub p_value: f64,
}

/// What a survival query releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurvivalRelease {
    /// The time column.
    pub time: String,
    /// The confidence level of the intervals.
    pub confidence: f64,
    /// Whether the counts carry differential-privacy noise: each point's `survival.error`
    /// then bounds the noise's effect, and no log-rank test is given.
    pub noisy: bool,
    /// One curve per stratum.
    pub strata: Vec<StratumCurve>,
    /// The log-rank test between the strata (absent without strata, and for noisy counts).
    pub log_rank: Option<LogRank>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Survival {
        Survival {
            time: "time".into(),
            event: "status".into(),
            event_codes: vec!["2".into()],
            censored_codes: vec!["1".into()],
            grid: (0..=10).map(f64::from).collect(),
            strata: Some(Strata {
                column: "sex".into(),
                levels: vec!["1".into(), "2".into()],
            }),
        }
    }

    #[test]
    fn rows_find_their_bin_event_and_stratum() {
        let s = spec();
        s.validate().unwrap();
        assert_eq!(
            s.row("3", "2", Some("1")),
            Ok(SurvivalRow {
                time: 3.0,
                bin: 3,
                event: true,
                stratum: 0
            })
        );
        // Codes compare as numbers; the last edge is in the last bin; past it, censored.
        assert_eq!(
            s.row("10", "2.0", Some("2.0"))
                .map(|r| (r.bin, r.event, r.stratum)),
            Ok((9, true, 1))
        );
        assert_eq!(
            s.row("12.5", "2", Some("2")).map(|r| (r.bin, r.event)),
            Ok((9, false))
        );
        assert_eq!(s.row("-1", "3", Some("x")), Err([true, true, true]));
        assert_eq!(s.row("NA", "1", Some("1")), Err([true, false, false]));
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let bad = |f: fn(&mut Survival)| {
            let mut s = spec();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(|s| s.grid = vec![0.0, 2.0, 1.0]).contains("rising"));
        assert!(bad(|s| s.censored_codes = vec!["2".into()]).contains("both"));
        assert!(
            bad(|s| s.strata.as_mut().unwrap().levels = vec!["1".into(), "1.0".into()])
                .contains("twice")
        );
        assert!(bad(|s| s.event = "time".into()).contains("different"));
    }

    /// A textbook example: times 1..6 in one stratum, checked by hand.
    #[test]
    fn the_curve_is_the_product_limit_estimate() {
        let s = Survival {
            strata: None,
            ..spec()
        };
        // (time, event): 1 d, 2 c, 3 d, 3 d, 4 c, 5 d
        let rows: Vec<SurvivalRow> = [(1, "2"), (2, "1"), (3, "2"), (3, "2"), (4, "1"), (5, "2")]
            .iter()
            .map(|(t, e)| s.row(&t.to_string(), e, None).unwrap())
            .collect();
        let mut v = vec![0.0; s.dimension()];
        s.encode_into(&mut v, &rows);
        let r = s.release(&v, None, 1e-7, 1.0).unwrap();
        let c = &r.strata[0];
        let surv: Vec<(f64, f64)> = c
            .points
            .iter()
            .map(|p| (p.start, p.survival.value.unwrap()))
            .collect();
        let expect = [
            (1.0, 5.0 / 6.0),
            (2.0, 5.0 / 6.0),
            (3.0, 5.0 / 6.0 * 2.0 / 4.0),
            (4.0, 5.0 / 12.0),
            (5.0, 0.0),
        ];
        for ((t, s), (et, es)) in surv.iter().zip(expect) {
            assert_eq!(*t, et);
            assert!((s - es).abs() < 1e-12, "{surv:?}");
        }
        assert_eq!(c.median, Some(3.0));
        assert_eq!(c.points[2].at_risk.value, Some(4.0));
        // Greenwood at t = 3: 1/(6·5) + 2/(4·2).
        let gw: f64 = 1.0 / 30.0 + 2.0 / 8.0;
        let s3 = 5.0 / 12.0f64;
        let se = gw.sqrt() / s3.ln().abs();
        let (lo, hi) = c.points[2].ci.unwrap();
        assert!((lo - s3.powf((Z95 * se).exp())).abs() < 1e-12);
        assert!((hi - s3.powf((-Z95 * se).exp())).abs() < 1e-12);
        assert!(lo < s3 && s3 < hi);
        // A threshold of 3: the curve stops before fewer than 3 are left at risk after a
        // point, and lists nothing past it (not even when the others ended); the total of
        // events is hidden with the tail.
        let r = s.release(&v, None, 1e-7, 3.0).unwrap();
        let starts: Vec<f64> = r.strata[0].points.iter().map(|p| p.start).collect();
        assert_eq!(starts, [1.0, 2.0]);
        assert!(
            r.strata[0]
                .points
                .iter()
                .all(|p| p.survival.value.is_some())
        );
        assert_eq!(r.strata[0].events.value, None);
        assert_eq!(r.strata[0].patients.value, Some(6.0));
        // A stratum smaller than the threshold: nothing but that it is small.
        let r = s.release(&v, None, 1e-7, 7.0).unwrap();
        assert!(r.strata[0].points.is_empty() && r.strata[0].patients.value.is_none());
    }

    #[test]
    fn noise_error_contains_the_exact_curve() {
        use rand::{RngExt, SeedableRng};
        let s = Survival {
            strata: None,
            ..spec()
        };
        let mut v = vec![0.0; s.dimension()];
        let rows: Vec<SurvivalRow> = (0..200)
            .map(|i| {
                s.row(
                    &(i % 10).to_string(),
                    if i % 3 == 0 { "1" } else { "2" },
                    None,
                )
                .unwrap()
            })
            .collect();
        s.encode_into(&mut v, &rows);
        let exact = s.release(&v, None, 0.0, 1.0).unwrap();
        assert!(!exact.noisy);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let sigma = 3.0;
        for _ in 0..200 {
            // Gaussian noise (Box–Muller) on every count.
            let noisy: Vec<f64> = v
                .iter()
                .map(|x| {
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                    x + sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                })
                .collect();
            let r = s.release(&noisy, Some(sigma), 0.0, 1.0).unwrap();
            assert!(r.noisy && r.log_rank.is_none());
            for (p, e) in r.strata[0].points.iter().zip(&exact.strata[0].points) {
                let (x, err) = (p.survival.value.unwrap(), p.survival.error);
                assert!(
                    (x - e.survival.value.unwrap()).abs() <= err + 1e-12,
                    "{p:?} vs {e:?}"
                );
                let at_risk = e.at_risk.value.unwrap();
                assert!((p.at_risk.value.unwrap() - at_risk).abs() <= p.at_risk.error);
            }
        }
    }

    #[test]
    fn log_rank_matches_a_two_group_example_by_hand() {
        // Group A: deaths at 1 and 2; group B: deaths at 3, censored at 4.
        let s = Survival {
            grid: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            ..spec()
        };
        let rows: Vec<SurvivalRow> = [(1, "2", "1"), (2, "2", "1"), (3, "2", "2"), (4, "1", "2")]
            .iter()
            .map(|(t, e, g)| s.row(&t.to_string(), e, Some(g)).unwrap())
            .collect();
        let mut v = vec![0.0; s.dimension()];
        s.encode_into(&mut v, &rows);
        let r = s.release(&v, None, 0.0, 1.0).unwrap();
        // t=1: 4 at risk (2 A), 1 death in A: O−E = 1 − 1/2, V = 1·(1/2)(1/2)·1 = 1/4.
        // t=2: 3 at risk (1 A): O−E = 1 − 1/3, V = (1/3)(2/3) = 2/9.
        // t=3: 2 at risk (0 A): O−E = 0, V = 0.
        let oe: f64 = 0.5 + 2.0 / 3.0;
        let var = 0.25 + 2.0 / 9.0;
        let lr = r.log_rank.unwrap();
        assert!((lr.chi2 - oe * oe / var).abs() < 1e-12);
        assert_eq!(lr.df, 1);
        // χ²₁ survival: erfc(√(x/2)).
        assert!((lr.p_value - libm::erfc((lr.chi2 / 2.0).sqrt())).abs() < 1e-12);
    }
}
