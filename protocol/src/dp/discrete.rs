//! Exact sampling of the discrete Gaussian `N_Z(0, σ²)` (Canonne, Kamath and Steinke 2020,
//! "The Discrete Gaussian for Differential Privacy", Algorithms 1–3), and noise on a fixed
//! grid built from it.
//!
//! Why not `σ · N(0, 1)` in floating point: the low bits of a floating-point sample depend
//! on the value it was added to, and Mironov (2012) recovered exact inputs from them. Here
//! every step is integer arithmetic on exact rationals, driven by uniform random bits; the
//! output is an integer whose law is exactly `P(x) ∝ exp(−x²/(2σ²))`. Values are put on a
//! grid of step `2^-bits` before the noise (an integer number of steps) is added, so the
//! noisy value is exact too.
//!
//! The discrete Gaussian has the Gaussian's Rényi-DP: `α·Δ²/(2σ²)` for integer queries of L2
//! sensitivity Δ (CKS 2020, Theorem 4 and Corollary 9), so [`super::accountant`] accounts it
//! unchanged. A sum of `n` independent discrete Gaussians (the distributed noise of secure
//! aggregation) is not itself a discrete Gaussian, but for a per-party σ of at least one grid
//! step it is one up to an RDP excess below `10·Σ_k exp(−2π²σ²·k/(k+1))` (Kairouz, Liu and
//! Steinke 2021, Theorem 1): with the σ of millions of steps used here, far below 10⁻¹⁰⁰⁰.

use num_bigint::BigUint;
use rand::Rng;

/// A nonnegative rational `num / den` (`den > 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ratio {
    /// The numerator.
    pub num: BigUint,
    /// The denominator (above 0).
    pub den: BigUint,
}

impl Ratio {
    /// `num / den`, unreduced; the caller ensures `den > 0`.
    pub fn new(num: impl Into<BigUint>, den: impl Into<BigUint>) -> Ratio {
        Ratio {
            num: num.into(),
            den: den.into(),
        }
    }

    /// The smallest rational with denominator `2^64` that is at least `x` (for a variance:
    /// rounding up only adds noise). `None` for a negative or non-finite `x`.
    pub fn at_least(x: f64) -> Option<Ratio> {
        if !(x.is_finite() && x >= 0.0) {
            return None;
        }
        // x = m · 2^e exactly (m < 2^53); scale to denominator 2^64 and round up.
        let (m, e) = decompose(x);
        let den = BigUint::from(1u8) << 64u32;
        let shift = e + 64;
        let num = if shift >= 0 {
            BigUint::from(m) << (shift as u32)
        } else {
            let d = BigUint::from(1u8) << ((-shift) as u32);
            let m = BigUint::from(m);
            let q = &m / &d;
            if &q * &d == m { q } else { q + 1u32 }
        };
        Some(Ratio { num, den })
    }
}

/// `x = m · 2^e` exactly, for finite `x >= 0`.
fn decompose(x: f64) -> (u64, i64) {
    if x == 0.0 {
        return (0, 0);
    }
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    }
}

/// A uniform integer in `[0, n)` (`n > 0`), by rejection from the fewest random bits.
fn uniform_below(n: &BigUint, rng: &mut impl Rng) -> BigUint {
    let bits = n.bits();
    let bytes = bits.div_ceil(8) as usize;
    let excess = (bytes as u64 * 8 - bits) as u32;
    let mut buf = vec![0u8; bytes];
    loop {
        rng.fill_bytes(&mut buf);
        buf[0] &= 0xffu8 >> excess;
        let x = BigUint::from_bytes_be(&buf);
        if &x < n {
            return x;
        }
    }
}

/// Bernoulli(`num / den`), `num <= den`.
fn bernoulli(num: &BigUint, den: &BigUint, rng: &mut impl Rng) -> bool {
    &uniform_below(den, rng) < num
}

/// Bernoulli(`exp(−γ)`) for `γ = num / den` in `[0, 1]` (CKS Algorithm 1, first part).
fn bernoulli_exp_at_most_1(num: &BigUint, den: &BigUint, rng: &mut impl Rng) -> bool {
    let mut k = 1u32;
    loop {
        if bernoulli(num, &(den * k), rng) {
            k += 1;
        } else {
            return k % 2 == 1;
        }
    }
}

/// Bernoulli(`exp(−γ)`) for any `γ = num / den >= 0` (CKS Algorithm 1).
fn bernoulli_exp(num: &BigUint, den: &BigUint, rng: &mut impl Rng) -> bool {
    let one = BigUint::from(1u8);
    let mut rest = num.clone();
    while &rest > den {
        if !bernoulli_exp_at_most_1(&one, &one, rng) {
            return false;
        }
        rest -= den;
    }
    bernoulli_exp_at_most_1(&rest, den, rng)
}

/// The discrete Laplace with scale `t` (`P(x) ∝ exp(−|x|/t)`), CKS Algorithm 2 with `s = 1`.
fn discrete_laplace(t: &BigUint, rng: &mut impl Rng) -> (bool, BigUint) {
    let one = BigUint::from(1u8);
    loop {
        let u = uniform_below(t, rng);
        if !bernoulli_exp(&u, t, rng) {
            continue;
        }
        let mut v = BigUint::from(0u8);
        while bernoulli_exp_at_most_1(&one, &one, rng) {
            v += 1u8;
        }
        let magnitude = u + t * v;
        let negative = rng.next_u32() & 1 == 1;
        if negative && magnitude == BigUint::from(0u8) {
            continue;
        }
        return (negative, magnitude);
    }
}

/// One exact draw of the discrete Gaussian `N_Z(0, σ²)` with `σ² = sigma2` (CKS Algorithm 3):
/// the sign and the magnitude.
pub fn sample(sigma2: &Ratio, rng: &mut impl Rng) -> (bool, BigUint) {
    let zero = BigUint::from(0u8);
    if sigma2.num == zero {
        return (false, zero);
    }
    // t = ⌊σ⌋ + 1, and ⌊√(p/q)⌋ = ⌊√⌊p/q⌋⌋.
    let t = (&sigma2.num / &sigma2.den).sqrt() + 1u8;
    // Accept Y with probability exp(−(|Y| − σ²/t)² / (2σ²)); with σ² = p/q that exponent is
    // (|Y|·t·q − p)² / (2·p·q·t²).
    let den = BigUint::from(2u8) * &sigma2.num * &sigma2.den * &t * &t;
    loop {
        let (negative, y) = discrete_laplace(&t, rng);
        let a = &y * &t * &sigma2.den;
        let diff = if a >= sigma2.num {
            a - &sigma2.num
        } else {
            &sigma2.num - a
        };
        if bernoulli_exp(&(&diff * &diff), &den, rng) {
            return (negative, y);
        }
    }
}

/// One draw as an `i64` (`None` past ±2⁶³, which a σ below 2⁵⁰ reaches with probability
/// below `exp(−2¹⁵)`).
pub fn sample_i64(sigma2: &Ratio, rng: &mut impl Rng) -> Option<i64> {
    let (negative, magnitude) = sample(sigma2, rng);
    let m = i64::try_from(u64::try_from(&magnitude).ok()?).ok()?;
    Some(if negative { -m } else { m })
}

/// Why noise could not be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The standard deviation is negative, NaN or infinite.
    #[error("the noise's standard deviation {0} is not a finite number at least 0")]
    BadSigma(f64),
    /// The grid's exponent is above 52.
    #[error("a grid of 2^-{0} is finer than the noise can be drawn on (at most 2^-52)")]
    BadGrid(u8),
    /// The standard deviation exceeds 2^50 grid steps.
    #[error("the noise's standard deviation {sigma} is too large for a grid of 2^-{bits}")]
    TooLarge {
        /// The standard deviation asked for.
        sigma: f64,
        /// The grid's exponent: steps of `2^-bits`.
        bits: u8,
    },
}

/// The integer variance, in grid steps of `2^-bits`, of noise with standard deviation at
/// least `sigma` (rounded up).
pub fn grid_variance(sigma: f64, bits: u8) -> Result<Ratio, NoiseError> {
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(NoiseError::BadSigma(sigma));
    }
    if bits > 52 {
        return Err(NoiseError::BadGrid(bits));
    }
    let steps = sigma * 2f64.powi(i32::from(bits));
    if steps > 2f64.powi(50) {
        return Err(NoiseError::TooLarge { sigma, bits });
    }
    // (steps)² as an exact rational (rounded up), then to a whole number of steps² so the
    // sampler's arithmetic stays small.
    let var = Ratio::at_least(steps * steps).ok_or(NoiseError::BadSigma(sigma))?;
    let whole = (&var.num + &var.den - 1u8) / &var.den;
    Ok(Ratio::new(whole, 1u8))
}

/// `n` independent discrete Gaussian draws, in grid steps of `2^-bits`, whose standard
/// deviation in value units is at least `sigma`.
pub fn noise_steps(
    n: usize,
    sigma: f64,
    bits: u8,
    rng: &mut impl Rng,
) -> Result<Vec<i64>, NoiseError> {
    let var = grid_variance(sigma, bits)?;
    (0..n)
        .map(|_| sample_i64(&var, rng).ok_or(NoiseError::TooLarge { sigma, bits }))
        .collect()
}

/// `values`, each rounded to the nearest multiple of `2^-bits`, plus discrete Gaussian noise
/// of standard deviation at least `sigma` on the same grid. Every output is an exact
/// multiple of `2^-bits` (below 2⁵³ steps), so nothing in its low bits depends on the input.
pub fn noisy_on_grid(
    values: &[f64],
    sigma: f64,
    bits: u8,
    rng: &mut impl Rng,
) -> Result<Vec<f64>, NoiseError> {
    let noise = noise_steps(values.len(), sigma, bits, rng)?;
    let scale = 2f64.powi(i32::from(bits));
    Ok(values
        .iter()
        .zip(noise)
        .map(|(x, e)| {
            let steps = (x * scale).round().clamp(-(2f64.powi(52)), 2f64.powi(52));
            (steps + e as f64) / scale
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(seed)
    }

    /// `P(x) = exp(−x²/(2σ²)) / Σ_y exp(−y²/(2σ²))`.
    fn pmf(sigma2: f64, x: i64) -> f64 {
        let norm: f64 = (-200..=200)
            .map(|y: i64| (-(y * y) as f64 / (2.0 * sigma2)).exp())
            .sum();
        (-(x * x) as f64 / (2.0 * sigma2)).exp() / norm
    }

    /// Chi-square goodness of fit of 40,000 draws against the exact law, for a small, a
    /// fractional and a larger σ²; and the moments.
    #[test]
    fn draws_follow_the_discrete_gaussian_law() {
        for (num, den, seed) in [(1u32, 2u32, 1u64), (5, 2, 2), (49, 1, 3)] {
            let sigma2 = f64::from(num) / f64::from(den);
            let ratio = Ratio::new(num, den);
            let mut r = rng(seed);
            let n = 40_000;
            let draws: Vec<i64> = (0..n)
                .map(|_| sample_i64(&ratio, &mut r).unwrap())
                .collect();
            let mean = draws.iter().sum::<i64>() as f64 / n as f64;
            let var = draws
                .iter()
                .map(|x| (*x as f64 - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            // The discrete Gaussian's variance is below σ² (and close to it for σ ≥ 1).
            let exact_var: f64 = (-200..=200i64)
                .map(|x| (x * x) as f64 * pmf(sigma2, x))
                .sum();
            assert!(
                mean.abs() < 5.0 * (exact_var / n as f64).sqrt(),
                "mean {mean}"
            );
            assert!(
                (var - exact_var).abs() < 0.05 * exact_var,
                "σ² = {sigma2}: variance {var}, exact {exact_var}"
            );
            // Chi-square over the cells with an expected count of at least 20, plus the
            // tails as one cell.
            let mut chi2 = 0.0;
            let mut cells = 0;
            let (mut tail_seen, mut tail_expected) = (0.0, 0.0);
            for x in -200..=200i64 {
                let expected = pmf(sigma2, x) * n as f64;
                let seen = draws.iter().filter(|d| **d == x).count() as f64;
                if expected >= 20.0 {
                    chi2 += (seen - expected).powi(2) / expected;
                    cells += 1;
                } else {
                    tail_seen += seen;
                    tail_expected += expected;
                }
            }
            if tail_expected > 0.0 {
                chi2 += (tail_seen - tail_expected).powi(2) / tail_expected.max(1.0);
                cells += 1;
            }
            // For k − 1 degrees of freedom (at most ~50 here), the 0.9999 quantile is below
            // k + 6·√(2k) + 20.
            let k = f64::from(cells - 1);
            assert!(
                chi2 < k + 6.0 * (2.0 * k).sqrt() + 20.0,
                "σ² = {sigma2}: χ² = {chi2} over {cells} cells"
            );
        }
    }

    #[test]
    fn a_zero_variance_draws_zero_and_bad_parameters_are_refused() {
        let mut r = rng(9);
        assert_eq!(sample_i64(&Ratio::new(0u8, 1u8), &mut r), Some(0));
        assert!(matches!(
            grid_variance(f64::NAN, 10),
            Err(NoiseError::BadSigma(_))
        ));
        assert!(matches!(
            grid_variance(-1.0, 10),
            Err(NoiseError::BadSigma(_))
        ));
        assert!(matches!(
            grid_variance(1.0, 53),
            Err(NoiseError::BadGrid(53))
        ));
        assert!(matches!(
            grid_variance(1e9, 40),
            Err(NoiseError::TooLarge { .. })
        ));
    }

    #[test]
    fn exact_rationals_round_up() {
        assert_eq!(
            Ratio::at_least(0.5).unwrap(),
            Ratio::new(1u64 << 63, BigUint::from(1u8) << 64u32)
        );
        let third = Ratio::at_least(1.0 / 3.0).unwrap();
        // 1/3 as a double is 6004799503160661 · 2^-54: exact at denominator 2^64.
        assert_eq!(third.num, BigUint::from(6_004_799_503_160_661u64) << 10u32);
        // A value below 2^-64 rounds up to one 2^-64.
        assert_eq!(Ratio::at_least(1e-30).unwrap().num, BigUint::from(1u8));
        assert!(Ratio::at_least(-0.1).is_none());
        assert_eq!(grid_variance(1.5, 1).unwrap(), Ratio::new(9u8, 1u8));
        assert_eq!(grid_variance(1.1, 0).unwrap(), Ratio::new(2u8, 1u8));
    }

    /// Noise on a grid: outputs are exact multiples of the step, and the noise has the
    /// standard deviation asked for (in value units), for a σ of millions of steps.
    #[test]
    fn noise_on_a_grid_is_exact_and_calibrated() {
        let mut r = rng(4);
        let bits = 24;
        let values: Vec<f64> = (0..4000).map(|i| f64::from(i) * 0.123_456_789).collect();
        let noisy = noisy_on_grid(&values, 2.5, bits, &mut r).unwrap();
        let step = 2f64.powi(-i32::from(bits));
        for y in &noisy {
            assert_eq!((y / step).fract(), 0.0, "{y} is not on the grid");
        }
        let errors: Vec<f64> = noisy.iter().zip(&values).map(|(y, x)| y - x).collect();
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        let sd =
            (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / errors.len() as f64).sqrt();
        assert!((sd - 2.5).abs() < 0.1, "sd {sd}");
        assert!(mean.abs() < 0.2, "mean {mean}");
    }
}
