//! Differential privacy: DP-FedAvg clipping and Gaussian noise for training rounds
//! (McMahan et al. 2018), Rényi-DP accounting, and the per-site budget ledger.
//!
//! A site's contribution to a round is its model delta clipped to L2 norm `C`. Replacing all
//! of one site's data (so any one patient's) moves the sum of the clipped deltas by at most
//! `2C`: the L2 sensitivity. The released sum carries Gaussian noise of standard deviation
//! `σ = z · 2C` (`z`: the noise multiplier), so each round is the Gaussian mechanism with
//! RDP `α / (2z²)` at every order α (Mironov 2017), composed over rounds by the
//! [`accountant`].
//!
//! With secure aggregation the noise is distributed: each site adds `N(0, σ² / h)` where
//! `h = t − c` is the fewest honest contributors a decoded sum can have (`t` the threshold,
//! `c` the colluding sites tolerated). The noise of any `h` honest sites adds up to at
//! least `σ²`, whatever the others do. Without secure aggregation the aggregator adds
//! `N(0, σ²)` itself, and the sites must trust it to.

pub mod accountant;
pub mod discrete;
pub mod ledger;
pub mod sgd;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// A study's differential privacy for training.
///
/// - DP-FedAvg (`sgd` absent; McMahan et al. 2018): each round, each site's model delta is
///   clipped to L2 norm `C` and the sum carries Gaussian noise of standard deviation
///   `z·2C`. It protects all of one hospital's data at once (so every patient), one
///   Gaussian mechanism per round.
/// - DP-SGD (`sgd` present; Abadi et al. 2016, [`sgd`]): inside each site, every local step
///   clips each sampled record's gradient to `C` and adds noise `z·C`. It protects one
///   record, `T` sampled Gaussian mechanisms per round, and needs no trust in the
///   aggregator or the other sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpTraining {
    /// `C`: the L2 bound of each site's model delta per round (DP-FedAvg), or of each
    /// record's gradient (DP-SGD).
    pub clip_norm: f64,
    /// `z`: the noise's standard deviation over the sensitivity (`2C` for DP-FedAvg, `C`
    /// for DP-SGD).
    pub noise_multiplier: f64,
    /// Record-level DP-SGD inside each site instead of DP-FedAvg.
    pub sgd: Option<DpSgd>,
}

/// DP-SGD's sampling: each local step takes each record with probability `sampling_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpSgd {
    /// `q`: the Poisson sampling rate of each step.
    pub sampling_rate: f64,
    /// `T`: noisy steps per round.
    pub steps: u32,
    /// `L`: what each step divides its noisy gradient sum by. Public and the same at every
    /// site (never the site's own `q·n`, whose size the update would then reveal): about
    /// the records a step samples at a typical site.
    pub lot_size: f64,
}

/// What one round of a study costs a site's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Charge {
    /// One Gaussian mechanism with this noise multiplier.
    Gaussian {
        /// The noise's standard deviation over the sensitivity.
        z: f64,
    },
    /// `steps` sampled Gaussian mechanisms with rate `q` and noise multiplier `z`.
    Sampled {
        /// The Poisson sampling rate of each step.
        q: f64,
        /// The noise's standard deviation over the sensitivity.
        z: f64,
        /// Noisy steps.
        steps: u64,
    },
}

impl DpTraining {
    /// Checks the parameters a study announces: a positive clip norm, a noise multiplier of at
    /// least 0.3, and for DP-SGD a sampling rate in (0, 1], 1 to 100,000 steps and a lot size of
    /// at least 1. The error says which, in words.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(format!("clip_norm {} must be above 0", self.clip_norm));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.3) {
            return Err(format!(
                "noise_multiplier {} must be at least 0.3 (below it one round costs ε > 10)",
                self.noise_multiplier
            ));
        }
        if let Some(sgd) = &self.sgd {
            if !(sgd.sampling_rate > 0.0 && sgd.sampling_rate <= 1.0) {
                return Err(format!(
                    "sampling_rate {} must be in (0, 1]",
                    sgd.sampling_rate
                ));
            }
            if !(1..=100_000).contains(&sgd.steps) {
                return Err(format!("local_steps {} must be 1 to 100000", sgd.steps));
            }
            if !(sgd.lot_size.is_finite() && sgd.lot_size >= 1.0) {
                return Err(format!("lot_size {} must be at least 1", sgd.lot_size));
            }
        }
        Ok(())
    }

    /// What one round costs a site's budget.
    pub fn charge(&self) -> Charge {
        match self.sgd {
            None => Charge::Gaussian {
                z: self.noise_multiplier,
            },
            Some(s) => Charge::Sampled {
                q: s.sampling_rate,
                z: self.noise_multiplier,
                steps: u64::from(s.steps),
            },
        }
    }

    /// L2 sensitivity of the sum of clipped deltas to replacing one site's data (DP-FedAvg).
    pub fn sensitivity(&self) -> f64 {
        2.0 * self.clip_norm
    }

    /// Standard deviation of the noise the released sum carries.
    pub fn sigma(&self) -> f64 {
        self.noise_multiplier * self.sensitivity()
    }

    /// [`DpTraining::sigma`] for a delta of `dim` entries on a grid of `2^-bits`
    /// ([`grid_sigma`]).
    pub fn sigma_on_grid(&self, bits: u8, dim: usize, stochastic: bool) -> f64 {
        grid_sigma(
            self.noise_multiplier,
            self.sensitivity(),
            bits,
            dim,
            stochastic,
        )
    }

    /// The standard deviation each site adds under secure aggregation so that any
    /// `min_honest` of them together carry [`DpTraining::sigma`].
    pub fn share_sigma(&self, min_honest: u32) -> f64 {
        self.sigma() / f64::from(min_honest.max(1)).sqrt()
    }
}

/// The noise standard deviation that keeps noise multiplier `z` for a query of L2
/// sensitivity `sensitivity` whose `dim` entries are put on a grid of `2^-bits` before the
/// noise: rounding to the nearest grid point can move two neighbouring vectors apart by up
/// to one step per entry more (two steps with stochastic rounding), so the sensitivity
/// accounted is `sensitivity + k·2^-bits·√dim`.
pub fn grid_sigma(z: f64, sensitivity: f64, bits: u8, dim: usize, stochastic: bool) -> f64 {
    let k = if stochastic { 2.0 } else { 1.0 };
    z * (sensitivity + k * 2f64.powi(-i32::from(bits)) * (dim as f64).sqrt())
}

/// Scales `v` down to L2 norm `bound` if it is longer; returns its norm before.
pub fn clip_l2(v: &mut [f64], bound: f64) -> f64 {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > bound {
        let f = bound / norm;
        v.iter_mut().for_each(|x| *x *= f);
    }
    norm
}

/// One draw of `N(0, sigma²)` (Box–Muller over two uniform doubles).
pub fn gaussian(rng: &mut impl Rng, sigma: f64) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Adds independent `N(0, sigma²)` noise to every entry.
pub fn add_gaussian(v: &mut [f64], sigma: f64, rng: &mut impl Rng) {
    for x in v {
        *x += gaussian(rng, sigma);
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn sd(xs: &[f64]) -> f64 {
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
    }

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut v = vec![3.0, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-12 && (v[1] - 0.8).abs() < 1e-12);
        let mut short = vec![0.3, 0.4];
        clip_l2(&mut short, 1.0);
        assert_eq!(short, vec![0.3, 0.4]);
    }

    /// The released sum's noise has the stated standard deviation, within 5%, both when
    /// the aggregator adds it and when the honest minimum of sites add their shares.
    #[test]
    fn noise_is_calibrated_for_central_and_distributed_release() {
        let dp = DpTraining {
            clip_norm: 0.5,
            noise_multiplier: 1.1,
            sgd: None,
        };
        let stated = dp.sigma();
        assert!((stated - 1.1).abs() < 1e-12);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let draws = 20_000;
        let central: Vec<f64> = (0..draws).map(|_| gaussian(&mut rng, stated)).collect();
        let got = sd(&central);
        assert!(
            (got / stated - 1.0).abs() < 0.05,
            "central: {got} vs {stated}"
        );
        // t = 5, c = 1: four honest sites are enough; the sum of their shares.
        let share = dp.share_sigma(4);
        let distributed: Vec<f64> = (0..draws)
            .map(|_| (0..4).map(|_| gaussian(&mut rng, share)).sum())
            .collect();
        let got = sd(&distributed);
        assert!(
            (got / stated - 1.0).abs() < 0.05,
            "distributed: {got} vs {stated}"
        );
        // More contributors than the minimum only add noise.
        let more: Vec<f64> = (0..draws)
            .map(|_| (0..6).map(|_| gaussian(&mut rng, share)).sum())
            .collect();
        assert!(sd(&more) > stated);
        // And the mean is 0.
        let mean = central.iter().sum::<f64>() / draws as f64;
        assert!(mean.abs() < 4.0 * stated / (draws as f64).sqrt(), "{mean}");
    }

    #[test]
    fn parameters_are_checked() {
        let ok = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            sgd: None,
        };
        assert!(ok.validate().is_ok());
        assert!(
            DpTraining {
                clip_norm: 0.0,
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(
            DpTraining {
                noise_multiplier: 0.1,
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(
            DpTraining {
                noise_multiplier: f64::NAN,
                ..ok
            }
            .validate()
            .is_err()
        );
    }
}
