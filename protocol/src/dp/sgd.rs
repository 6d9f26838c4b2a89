//! DP-SGD inside one hospital (Abadi et al. 2016): record-level differential privacy for a
//! site's local training, whatever the aggregator or other sites do.
//!
//! Each step samples every record independently with probability `q` (Poisson sampling, from
//! the caller's secret generator), clips each sampled record's gradient to L2 norm `C`,
//! sums them, and adds discrete Gaussian noise of standard deviation `z·C`
//! ([`super::discrete`], on a grid of `C·2⁻²⁰`, so the noisy sum is exact). The step then
//! moves the weights by the learning rate times that noisy sum over the study's public lot
//! size `L`, plus the data-independent L2 and proximal terms. (Dividing by the site's own
//! expected batch `q·n`, as TensorFlow Privacy and Opacus do, would let the size of the
//! update tell the site's row count, outside the accounting.)
//!
//! One step is the sampled Gaussian mechanism with rate `q` and noise multiplier `z`, with
//! respect to adding or removing one record; a round's `T` steps compose to `T` of them
//! ([`super::accountant::RdpAccountant::compose_gaussian`]). Nothing in a step depends on
//! the data but through the clipped, noised sum. The site's update is private on its own: secure aggregation adds protection, it is not
//! needed for this guarantee.

use ndarray::{Array1, ArrayView1, ArrayView2};
use rand::Rng;

use super::discrete::noisy_on_grid;
use crate::model::{ModelKind, TrainError, TrainParams};

/// The residual `prediction − target` of one standardized row under `weights`, into `out`
/// (one entry, or one per class of a multinomial model); `None` for a multinomial target
/// that is not a class index (left out like a record whose gradient overflows).
fn residual(
    kind: ModelKind,
    w: &[f64],
    row: ArrayView1<'_, f64>,
    y: f64,
    out: &mut [f64],
) -> Option<()> {
    let d = row.len();
    let z = |block: &[f64]| row.dot(&ArrayView1::from(&block[..d])) + block[d];
    match kind {
        ModelKind::Logistic => out[0] = 1.0 / (1.0 + (-z(w)).exp()) - y,
        ModelKind::Linear => out[0] = z(w) - y,
        ModelKind::Multinomial { .. } => {
            let class = y as usize;
            if !(y >= 0.0 && y.fract() == 0.0 && class < out.len()) {
                return None;
            }
            for (o, block) in out.iter_mut().zip(w.chunks_exact(d + 1)) {
                *o = z(block);
            }
            let max = out.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
            out.iter_mut().for_each(|o| *o = (*o - max).exp());
            let sum: f64 = out.iter().sum();
            out.iter_mut().for_each(|o| *o /= sum);
            out[class] -= 1.0;
        }
    }
    Some(())
}

/// The grid of the noisy gradient sum, `C·2^-GRID_BITS`.
const GRID_BITS: u8 = 20;

/// `T` steps of DP-SGD from `start` on the rows `x`, `y`, each row its own unit: the new
/// weights (features, then the intercept), or why not. `stop` is asked before each step.
#[allow(clippy::too_many_arguments)]
pub fn train(
    kind: ModelKind,
    start: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    params: &TrainParams,
    dp: &super::DpTraining,
    rng: &mut impl Rng,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<f64>, TrainError> {
    train_patients(kind, start, x, y, None, params, dp, rng, stop)
}

/// [`train`] where the unit of privacy is the patient: `patients[i]` names row `i`'s
/// patient, and each step samples patients (with probability `q`), sums each sampled
/// patient's row gradients, and clips that sum to `C`. Removing a patient, however many
/// rows they have, changes a step's sum by at most `C`: the accounting is that of one
/// record, with `q` the patients' sampling rate. `None`: each row is its own patient.
#[allow(clippy::too_many_arguments)]
pub fn train_patients(
    kind: ModelKind,
    start: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    patients: Option<&[usize]>,
    params: &TrainParams,
    dp: &super::DpTraining,
    rng: &mut impl Rng,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<f64>, TrainError> {
    params.validate()?;
    let Some(sgd) = dp.sgd else {
        return Err(TrainError::InvalidParam {
            name: "privacy",
            why: "not a DP-SGD study".into(),
        });
    };
    let (n, d) = x.dim();
    let k = kind.outputs();
    let width = kind.width(d);
    if start.len() != width {
        return Err(TrainError::WidthMismatch {
            model: kind.features_of(start.len()).unwrap_or(start.len()),
            data: d,
        });
    }
    if y.len() != n {
        return Err(TrainError::LengthMismatch {
            rows: n,
            targets: y.len(),
        });
    }
    if n == 0 {
        return Err(TrainError::NoRows);
    }
    let c = dp.clip_norm;
    // Rounding a sum of vectors of norm ≤ 1 (in units of C) to the grid moves it by at most
    // one step per entry more: the noise is for that sensitivity.
    let sigma = super::grid_sigma(dp.noise_multiplier, 1.0, GRID_BITS, width, false);
    let threshold = sampling_threshold(sgd.sampling_rate);
    let lot = sgd.lot_size;
    let mut w = Array1::from(start.to_vec());
    let start_w = w.clone();
    let mut grad_sum = vec![0.0; width];
    let mut resid = vec![0.0; k];
    if patients.is_some_and(|p| p.len() != n) {
        return Err(TrainError::LengthMismatch {
            rows: n,
            targets: patients.map_or(0, <[usize]>::len),
        });
    }
    // The units sampled: each patient's rows (in order of their first row), or each row.
    let units: Vec<Vec<usize>> = match patients {
        None => (0..n).map(|i| vec![i]).collect(),
        Some(p) => {
            let mut index = std::collections::HashMap::new();
            let mut units: Vec<Vec<usize>> = Vec::new();
            for (i, patient) in p.iter().enumerate() {
                let u = *index.entry(*patient).or_insert_with(|| {
                    units.push(Vec::new());
                    units.len() - 1
                });
                units[u].push(i);
            }
            units
        }
    };
    let mut unit_grad = vec![0.0; width];
    for step in 0..sgd.steps {
        if stop() {
            return Err(TrainError::StoppedAtStep {
                step,
                of: sgd.steps,
            });
        }
        grad_sum.iter_mut().for_each(|g| *g = 0.0);
        for unit in &units {
            if rng.next_u64() > threshold {
                continue;
            }
            if unit.len() > 1 {
                // A patient of several rows: the sum of their gradients, clipped as one.
                unit_grad.iter_mut().for_each(|g| *g = 0.0);
                for &i in unit {
                    let row = x.row(i);
                    let Some(()) =
                        residual(kind, w.as_slice().unwrap_or(&[]), row, y[i], &mut resid)
                    else {
                        continue;
                    };
                    for (block, r) in unit_grad.chunks_exact_mut(d + 1).zip(&resid) {
                        for (g, v) in block.iter_mut().zip(row.iter()) {
                            *g += r * v;
                        }
                        block[d] += r;
                    }
                }
                let norm = unit_grad.iter().map(|g| g * g).sum::<f64>().sqrt();
                // Not a finite number: contributes nothing (as a record below).
                if !norm.is_finite() {
                    continue;
                }
                let scale = if norm > c { 1.0 / norm } else { 1.0 / c };
                for (g, u) in grad_sum.iter_mut().zip(&unit_grad) {
                    *g += u * scale;
                }
                continue;
            }
            let i = unit[0];
            let row = x.row(i);
            // Every loss here has gradient r ⊗ [x, 1], r = prediction − target (one-hot for
            // a multinomial model), of norm ‖r‖·√(‖x‖² + 1).
            let Some(()) = residual(kind, w.as_slice().unwrap_or(&[]), row, y[i], &mut resid)
            else {
                continue;
            };
            let norm =
                resid.iter().map(|r| r * r).sum::<f64>().sqrt() * (row.dot(&row) + 1.0).sqrt();
            // In units of C, clipped to norm 1.
            for r in &mut resid {
                *r = if norm > c { *r / norm } else { *r / c };
            }
            // A record whose gradient is not a finite number (its values overflow with these
            // weights or this standardization) contributes nothing: failing here would tell
            // the aggregator, without noise, that such a record exists. Still a function of
            // this record alone, of norm at most 1.
            if resid
                .iter()
                .any(|f| !f.is_finite() || row.iter().any(|v| !(f * v).is_finite()))
            {
                continue;
            }
            for (block, f) in grad_sum.chunks_exact_mut(d + 1).zip(&resid) {
                for (g, v) in block.iter_mut().zip(row.iter()) {
                    *g += f * v;
                }
                block[d] += f;
            }
        }
        let noisy = noisy_on_grid(&grad_sum, sigma, GRID_BITS, rng).map_err(|e| {
            TrainError::InvalidParam {
                name: "privacy",
                why: format!("differential-privacy noise: {e}"),
            }
        })?;
        let scale = params.learning_rate * c / lot;
        for j in 0..width {
            let mut g = noisy[j] * scale;
            if (j + 1) % (d + 1) != 0 {
                g += params.learning_rate * params.l2 * w[j];
            }
            if params.prox_mu > 0.0 {
                g += params.learning_rate * params.prox_mu * (w[j] - start_w[j]);
            }
            w[j] -= g;
        }
        if w.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
    }
    Ok(w.to_vec())
}

/// `u64` values at or below this are drawn with probability `q` (exact to 2⁻⁶⁴).
fn sampling_threshold(q: f64) -> u64 {
    if q >= 1.0 {
        u64::MAX
    } else {
        // q < 1: q·2⁶⁴ < 2⁶⁴; the draw is kept when next_u64() ≤ this, P = (t + 1)/2⁶⁴.
        ((q * 2f64.powi(64)) as u64).saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;
    use rand::SeedableRng;

    use super::*;
    use crate::dp::{DpSgd, DpTraining};

    fn params() -> TrainParams {
        TrainParams {
            local_epochs: 1,
            batch_size: 1,
            learning_rate: 0.5,
            l2: 0.0,
            seed: 0,
            prox_mu: 0.0,
        }
    }

    fn dp(z: f64, q: f64, steps: u32) -> DpTraining {
        DpTraining {
            clip_norm: 1.0,
            noise_multiplier: z,
            sgd: Some(DpSgd {
                sampling_rate: q,
                steps,
                lot_size: (q * 400.0).max(1.0),
            }),
        }
    }

    /// Separable data: with little noise DP-SGD learns the sign of the feature.
    #[test]
    fn learns_with_little_noise_and_is_random_with_much() {
        let n = 400;
        let x = Array2::from_shape_fn((n, 1), |(i, _)| if i % 2 == 0 { 1.0 } else { -1.0 });
        let y = Array1::from_shape_fn(n, |i| if i % 2 == 0 { 1.0 } else { 0.0 });
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let w = train(
            ModelKind::Logistic,
            &[0.0, 0.0],
            x.view(),
            y.view(),
            &params(),
            &dp(0.5, 0.2, 200),
            &mut rng,
            &|| false,
        )
        .unwrap();
        assert!(w[0] > 1.0, "{w:?}");
        // Fresh randomness every call: two runs differ.
        let again = train(
            ModelKind::Logistic,
            &[0.0, 0.0],
            x.view(),
            y.view(),
            &params(),
            &dp(0.5, 0.2, 200),
            &mut rng,
            &|| false,
        )
        .unwrap();
        assert_ne!(w, again);
    }

    /// One record's influence on one step is at most C (clipped), whatever its values: a
    /// step with no noise moves the weights by at most lr·C/(q·n) per record changed.
    #[test]
    fn a_record_moves_a_step_by_at_most_its_clipped_share() {
        let mut x = Array2::from_shape_fn((10, 2), |(i, j)| (i + j) as f64 * 0.1);
        let y = Array1::from_shape_fn(10, |i| f64::from(i as u32 % 2));
        // q = 1: every record every step, and no randomness but the noise.
        let tiny = DpTraining {
            clip_norm: 1.0,
            // The smallest allowed multiplier; the test subtracts two runs with the same
            // generator seed, so the noise cancels.
            noise_multiplier: 0.3,
            sgd: Some(DpSgd {
                sampling_rate: 1.0,
                steps: 1,
                lot_size: 10.0,
            }),
        };
        let run = |x: &Array2<f64>| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
            train(
                ModelKind::Linear,
                &[0.0, 0.0, 0.0],
                x.view(),
                y.view(),
                &params(),
                &tiny,
                &mut rng,
                &|| false,
            )
            .unwrap()
        };
        let a = run(&x);
        x[[3, 0]] = 1e9;
        x[[3, 1]] = -1e9;
        let b = run(&x);
        let moved = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).powi(2))
            .sum::<f64>()
            .sqrt();
        // lr · 2C / (q·n): the record's clipped gradient before and after, at most C each.
        assert!(moved <= 0.5 * 2.0 / 10.0 + 1e-6, "{moved}");
        assert!(moved > 0.0);
    }

    /// The same bound for a multinomial model: a record's gradient is a K × (d + 1) matrix,
    /// clipped as a whole, and a record whose class changes moves a step by at most its
    /// clipped share too.
    #[test]
    fn a_multinomial_record_moves_a_step_by_at_most_its_clipped_share() {
        let mut x = Array2::from_shape_fn((12, 2), |(i, j)| (i + 2 * j) as f64 * 0.1);
        let mut y = Array1::from_shape_fn(12, |i| f64::from(i as u32 % 3));
        let kind = ModelKind::Multinomial { classes: 3 };
        let tiny = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 0.3,
            sgd: Some(DpSgd {
                sampling_rate: 1.0,
                steps: 1,
                lot_size: 12.0,
            }),
        };
        let run = |x: &Array2<f64>, y: &Array1<f64>| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
            train(
                kind,
                &[0.3; 9],
                x.view(),
                y.view(),
                &params(),
                &tiny,
                &mut rng,
                &|| false,
            )
            .unwrap()
        };
        let a = run(&x, &y);
        x[[5, 0]] = 1e9;
        x[[5, 1]] = -1e9;
        y[5] = 0.0;
        let b = run(&x, &y);
        assert_eq!(a.len(), 9);
        let moved = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(moved <= 0.5 * 2.0 / 12.0 + 1e-6, "{moved}");
        assert!(moved > 0.0);
        // A target that is not a class index contributes nothing rather than failing.
        y[5] = 7.0;
        let c = run(&x, &y);
        assert!(c.iter().all(|w| w.is_finite()));
    }

    /// A patient of many rows is one unit: changing all of their rows moves a step by at
    /// most their clipped share, as one record's would; rows of other patients stay units
    /// of their own.
    #[test]
    fn a_patient_of_many_rows_moves_a_step_by_at_most_one_share() {
        let mut x = Array2::from_shape_fn((12, 2), |(i, j)| (i + j) as f64 * 0.1);
        let y = Array1::from_shape_fn(12, |i| f64::from(i as u32 % 2));
        // Rows 0..6 are one patient; rows 6..12 one each.
        let patients: Vec<usize> = (0..12).map(|i| if i < 6 { 0 } else { i }).collect();
        let tiny = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 0.3,
            sgd: Some(DpSgd {
                sampling_rate: 1.0,
                steps: 1,
                lot_size: 7.0,
            }),
        };
        let run = |x: &Array2<f64>| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
            train_patients(
                ModelKind::Linear,
                &[0.0, 0.0, 0.0],
                x.view(),
                y.view(),
                Some(&patients),
                &params(),
                &tiny,
                &mut rng,
                &|| false,
            )
            .unwrap()
        };
        let a = run(&x);
        for i in 0..6 {
            x[[i, 0]] = 1e6 * (i as f64 + 1.0);
            x[[i, 1]] = -1e6;
        }
        let b = run(&x);
        let moved = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).powi(2))
            .sum::<f64>()
            .sqrt();
        // lr · 2C / L: the patient's clipped sum before and after, at most C each.
        assert!(moved <= 0.5 * 2.0 / 7.0 + 1e-6, "{moved}");
        assert!(moved > 0.0);
        // Each row its own patient is `train` itself.
        let mut r1 = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut r2 = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let own: Vec<usize> = (0..12).collect();
        let one = train(
            ModelKind::Linear,
            &[0.0; 3],
            x.view(),
            y.view(),
            &params(),
            &tiny,
            &mut r1,
            &|| false,
        )
        .unwrap();
        let two = train_patients(
            ModelKind::Linear,
            &[0.0; 3],
            x.view(),
            y.view(),
            Some(&own),
            &params(),
            &tiny,
            &mut r2,
            &|| false,
        )
        .unwrap();
        assert_eq!(one, two);
    }

    /// Three separable classes: with little noise DP-SGD learns them.
    #[test]
    fn learns_three_classes_with_little_noise() {
        let n = 600;
        let centre = |c: usize| [(-3.0, 0.0), (3.0, 0.0), (0.0, 3.0)][c];
        let x = Array2::from_shape_fn((n, 2), |(i, j)| {
            let (a, b) = centre(i % 3);
            if j == 0 { a } else { b }
        });
        let y = Array1::from_shape_fn(n, |i| (i % 3) as f64);
        let kind = ModelKind::Multinomial { classes: 3 };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let dp = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            sgd: Some(DpSgd {
                sampling_rate: 0.2,
                steps: 200,
                lot_size: 120.0,
            }),
        };
        let w = train(
            kind,
            &[0.0; 9],
            x.view(),
            y.view(),
            &params(),
            &dp,
            &mut rng,
            &|| false,
        )
        .unwrap();
        let p = crate::model::predict_proba(kind, &w, x.view()).unwrap();
        let right = p
            .rows()
            .into_iter()
            .zip(&y)
            .filter(|(p, y)| crate::metrics::argmax(p.as_slice().unwrap()) == **y as usize)
            .count();
        assert_eq!(right, n, "{w:?}");
    }

    #[test]
    fn sampling_keeps_about_q_of_the_records() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let t = sampling_threshold(0.1);
        let kept = (0..100_000).filter(|_| rng.next_u64() <= t).count();
        assert!((9_500..10_500).contains(&kept), "{kept}");
        assert_eq!(sampling_threshold(1.0), u64::MAX);
    }

    /// Red team: the noisy sum is divided by the expected batch `q·n`, with the site's exact
    /// row count `n`. One record more or less changes how far the noise moves the weights,
    /// whether or not the record is ever sampled; the sampled-Gaussian accounting does not
    /// see it. With `q = 10⁻⁶` (a record is almost never sampled, and the accountant charges
    /// almost nothing), a site holding one record is told apart from one holding two by the
    /// size of the update alone, far more often than the charged ε allows.
    #[test]
    fn the_update_does_not_reveal_the_number_of_records() {
        let dpq = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 5.0,
            sgd: Some(DpSgd {
                sampling_rate: 1e-6,
                steps: 50,
                lot_size: 10.0,
            }),
        };
        let mut params = params();
        params.learning_rate = 1e-3;
        let one = (Array2::from_elem((1, 1), 0.5), Array1::from_elem(1, 1.0));
        let two = (Array2::from_elem((2, 1), 0.5), Array1::from_elem(2, 1.0));
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let norm = |data: &(Array2<f64>, Array1<f64>), rng: &mut rand_chacha::ChaCha20Rng| {
            let w = train(
                ModelKind::Linear,
                &[0.0, 0.0],
                data.0.view(),
                data.1.view(),
                &params,
                &dpq,
                rng,
                &|| false,
            )
            .unwrap();
            w.iter().map(|x| x * x).sum::<f64>().sqrt()
        };
        // The update's scale with one record: lr·C/q · z·√T per coordinate.
        let s = 1e-3 / 1e-6 * 5.0 * (50f64).sqrt();
        // The likelihood-ratio test between s and s/2 in two dimensions: r² > (8/3)·ln 4·(s/2)²
        // says "one record".
        let cut = ((8.0 / 3.0) * 4f64.ln()).sqrt() * s / 2.0;
        let trials = 400;
        let mut right = 0;
        for t in 0..trials {
            let (data, is_one) = if t % 2 == 0 {
                (&one, true)
            } else {
                (&two, false)
            };
            if (norm(data, &mut rng) > cut) == is_one {
                right += 1;
            }
        }
        let rate = f64::from(right) / f64::from(trials);
        let mut acc = crate::dp::accountant::RdpAccountant::default();
        acc.compose_gaussian(1e-6, 5.0, 50);
        let eps = acc.epsilon(1e-6).0;
        // (ε, δ)-DP bounds any test's accuracy between neighbours by e^ε/(1 + e^ε) + δ.
        let bound = eps.exp() / (1.0 + eps.exp()) + 1e-6;
        println!("right {rate:.3} of the time; the charged ε = {eps:.2e} allows {bound:.4}");
        let se = (0.25 / f64::from(trials)).sqrt();
        assert!(
            rate <= bound + 3.0 * se,
            "one record more or less is told apart {rate} of the time; ε = {eps:.2e} allows {bound}"
        );
    }

    /// A record whose gradient overflows contributes nothing instead of failing the round:
    /// the failure would tell, without noise, that such a record exists.
    #[test]
    fn a_record_that_overflows_does_not_fail_the_round() {
        let x = Array2::from_shape_vec((3, 1), vec![0.5, -0.5, 1e300]).unwrap();
        let y = Array1::from_vec(vec![1.0, 0.0, 1.0]);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let w = train(
            ModelKind::Linear,
            &[1e10, 0.0],
            x.view(),
            y.view(),
            &params(),
            &dp(1.0, 1.0, 3),
            &mut rng,
            &|| false,
        );
        assert!(w.is_ok(), "{w:?}");
    }
}
