//! Fixed-point encoding of real vectors into Z_2^32 or Z_2^64 for secure aggregation.
//!
//! Each coordinate is clipped to `[-clip, clip]`, multiplied by `2^scale_bits`, and rounded
//! stochastically (up with probability equal to the fractional part, so the encoding is
//! unbiased), then stored in two's complement modulo `2^modulus_bits`. Sums are taken modulo
//! the same power of two and decoded by sign extension.
//!
//! A sum of `n` encodings cannot wrap around when `n * (clip * 2^scale_bits + 1) < 2^(bits-1)`;
//! [`QuantParams::for_parties`] picks 32 bits when that holds, else 64, and refuses
//! parameters for which neither does. The decoded sum differs from the sum of the clipped
//! inputs by less than `n / 2^scale_bits` per coordinate ([`QuantParams::max_sum_error`]).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A fixed-point encoding: the clip bound, the fractional bits and the modulus.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantParams {
    /// Inputs are clipped to `[-clip, clip]` (positive, finite).
    pub clip: f64,
    /// Fractional bits: a step of the encoding is `2^-scale_bits` (at most 52).
    pub scale_bits: u8,
    /// 32 or 64.
    pub modulus_bits: u8,
}

/// Why encoding parameters cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The clip bound is not a positive finite number.
    #[error("clip must be a positive finite number, got {0}")]
    BadClip(f64),
    /// More than 52 fractional bits (beyond an `f64`'s precision).
    #[error("scale_bits must be at most 52, got {0}")]
    BadScale(u8),
    /// A modulus other than 32 or 64 bits.
    #[error("modulus_bits must be 32 or 64, got {0}")]
    BadModulus(u8),
    /// A sum over that many parties could wrap around the modulus.
    #[error(
        "a sum of {parties} inputs clipped to ±{clip} at 2^{scale_bits} could overflow \
         {modulus_bits}-bit arithmetic: lower clip or scale_bits"
    )]
    Overflow {
        /// The parties summed.
        parties: usize,
        /// The clip bound.
        clip: f64,
        /// The fractional bits.
        scale_bits: u8,
        /// The widest modulus tried or the one given.
        modulus_bits: u8,
    },
}

impl QuantParams {
    fn fits(parties: usize, clip: f64, scale_bits: u8, bits: u8) -> bool {
        let per_party = clip * 2f64.powi(i32::from(scale_bits)) + 1.0;
        // Compare in f64 with margin: 2^(bits-1) is exactly representable.
        (parties as f64) * per_party < 2f64.powi(i32::from(bits) - 1) * (1.0 - 1e-9)
    }

    /// The narrowest modulus in which a sum of `parties` inputs cannot overflow.
    pub fn for_parties(
        parties: usize,
        clip: f64,
        scale_bits: u8,
    ) -> Result<QuantParams, QuantError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantError::BadClip(clip));
        }
        if scale_bits > 52 {
            return Err(QuantError::BadScale(scale_bits));
        }
        for bits in [32, 64] {
            if Self::fits(parties, clip, scale_bits, bits) {
                return Ok(QuantParams {
                    clip,
                    scale_bits,
                    modulus_bits: bits,
                });
            }
        }
        Err(QuantError::Overflow {
            parties,
            clip,
            scale_bits,
            modulus_bits: 64,
        })
    }

    /// The parameters for a sum whose entries carry counts scaled by `1 / total` (a training
    /// round's vector, [`crate::update_vector`]): at least `scale_bits`, and more where
    /// needed so that the summed rounding error in count units, below
    /// `parties · total / 2^bits`, stays under 1/4 and counts decode exactly; at most what
    /// `modulus` 64 can hold for `clip`. The second value says whether counts are exact.
    pub fn for_scaled_counts(
        parties: usize,
        clip: f64,
        scale_bits: u8,
        total: f64,
    ) -> Result<(QuantParams, bool), QuantError> {
        let needed = ((4.0 * parties as f64 * total.max(1.0)).log2().ceil()).clamp(0.0, 52.0) as u8;
        let mut bits = scale_bits.max(needed);
        while bits > scale_bits && !Self::fits(parties, clip, bits, 64) {
            bits -= 1;
        }
        let params = Self::for_parties(parties, clip, bits)?;
        Ok((params, bits >= needed))
    }

    /// Checks parameters received from a peer against the number of parties.
    pub fn check(&self, parties: usize) -> Result<(), QuantError> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(QuantError::BadClip(self.clip));
        }
        if self.scale_bits > 52 {
            return Err(QuantError::BadScale(self.scale_bits));
        }
        if self.modulus_bits != 32 && self.modulus_bits != 64 {
            return Err(QuantError::BadModulus(self.modulus_bits));
        }
        if !Self::fits(parties, self.clip, self.scale_bits, self.modulus_bits) {
            return Err(QuantError::Overflow {
                parties,
                clip: self.clip,
                scale_bits: self.scale_bits,
                modulus_bits: self.modulus_bits,
            });
        }
        Ok(())
    }

    fn scale(&self) -> f64 {
        2f64.powi(i32::from(self.scale_bits))
    }

    /// `2^modulus_bits − 1`: the mask that reduces a word modulo the modulus.
    pub fn mask(&self) -> u64 {
        if self.modulus_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }

    /// Encodes `x` (NaN encodes as 0).
    pub fn encode(&self, x: &[f64], rng: &mut impl Rng) -> Vec<u64> {
        let scale = self.scale();
        let mask = self.mask();
        let mut out = Vec::with_capacity(x.len());
        // 32 random bits per coordinate (rounding probabilities to 2^-32), drawn a block at a
        // time.
        let mut random = [0u8; 4096];
        for chunk in x.chunks(random.len() / 4) {
            let bytes = &mut random[..chunk.len() * 4];
            rng.fill_bytes(bytes);
            out.extend(chunk.iter().zip(bytes.chunks_exact(4)).map(|(v, r)| {
                let v = if v.is_nan() {
                    0.0
                } else {
                    v.clamp(-self.clip, self.clip)
                } * scale;
                // |v| <= clip * 2^scale_bits < 2^63 (checked by `check`), so the casts are
                // exact; truncation toward zero, corrected to the floor for negatives.
                let t = v as i64;
                let floor = t - i64::from((t as f64) > v);
                let u = f64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]]))
                    * (1.0 / 4_294_967_296.0);
                let q = floor + i64::from(u < v - floor as f64);
                (q as u64) & mask
            }));
        }
        out
    }

    /// Encodes `x` as [`QuantParams::encode`] does, then adds discrete Gaussian noise
    /// ([`crate::dp::discrete`]) of standard deviation at least `sigma` (in value units),
    /// drawn in steps of this encoding's grid, so the noisy words are exact. Refuses noise
    /// that could make a sum over `parties` wrap around (beyond 40 standard deviations,
    /// probability below `e^-800`).
    pub fn encode_noised(
        &self,
        x: &[f64],
        sigma: f64,
        parties: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<u64>, crate::dp::discrete::NoiseError> {
        let mut words = self.encode(x, rng);
        if sigma == 0.0 {
            return Ok(words);
        }
        let room = QuantParams {
            clip: self.clip + 40.0 * sigma,
            ..*self
        };
        if !Self::fits(parties, room.clip, self.scale_bits, self.modulus_bits) {
            return Err(crate::dp::discrete::NoiseError::TooLarge {
                sigma,
                bits: self.scale_bits,
            });
        }
        let noise = crate::dp::discrete::noise_steps(x.len(), sigma, self.scale_bits, rng)?;
        let mask = self.mask();
        for (w, e) in words.iter_mut().zip(noise) {
            *w = w.wrapping_add(e as u64) & mask;
        }
        Ok(words)
    }

    /// Decodes a sum (or a single encoding) modulo 2^bits.
    pub fn decode(&self, sum: &[u64]) -> Vec<f64> {
        let scale = self.scale();
        let shift = 64 - u32::from(self.modulus_bits);
        sum.iter()
            .map(|&w| {
                // Sign-extend from `modulus_bits`.
                let signed = ((w << shift) as i64) >> shift;
                signed as f64 / scale
            })
            .collect()
    }

    /// Bound on |decoded sum - sum of clipped inputs| per coordinate, for `parties` inputs.
    pub fn max_sum_error(&self, parties: usize) -> f64 {
        parties as f64 / self.scale()
    }

    /// Wire size of one encoded coordinate.
    pub fn word_bytes(&self) -> usize {
        usize::from(self.modulus_bits / 8)
    }
}

/// Packs words into little-endian bytes of `bits / 8` each.
pub fn pack(words: &[u64], bits: u8) -> Vec<u8> {
    match bits {
        32 => words
            .iter()
            .flat_map(|w| (*w as u32).to_le_bytes())
            .collect(),
        _ => words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

/// The inverse of [`pack`]; `None` if the length is not a whole number of words.
pub fn unpack(bytes: &[u8], bits: u8) -> Option<Vec<u64>> {
    match bits {
        32 if bytes.len().is_multiple_of(4) => Some(
            bytes
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        64 if bytes.len().is_multiple_of(8) => Some(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        _ => None,
    }
}

/// Adds packed words to `acc` (wrapping); false if `bytes` is not `acc.len()` words.
pub fn add_packed(acc: &mut [u64], bytes: &[u8], bits: u8) -> bool {
    match bits {
        32 if bytes.len() == acc.len() * 4 => {
            acc.iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(a, c)| {
                    *a = a.wrapping_add(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                });
            true
        }
        64 if bytes.len() == acc.len() * 8 => {
            acc.iter_mut()
                .zip(bytes.chunks_exact(8))
                .for_each(|(a, c)| {
                    *a = a.wrapping_add(u64::from_le_bytes([
                        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                    ]));
                });
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn picks_the_narrowest_safe_modulus() {
        assert_eq!(
            QuantParams::for_parties(3, 100.0, 20).unwrap().modulus_bits,
            32
        );
        assert_eq!(
            QuantParams::for_parties(100, 100.0, 20)
                .unwrap()
                .modulus_bits,
            64
        );
        assert!(matches!(
            QuantParams::for_parties(1 << 20, 1e6, 40),
            Err(QuantError::Overflow { .. })
        ));
        let p = QuantParams {
            clip: 100.0,
            scale_bits: 20,
            modulus_bits: 32,
        };
        assert!(p.check(3).is_ok());
        assert!(matches!(p.check(100), Err(QuantError::Overflow { .. })));
        assert!(matches!(
            QuantParams {
                modulus_bits: 16,
                ..p
            }
            .check(1),
            Err(QuantError::BadModulus(16))
        ));
    }

    #[test]
    fn sums_decode_within_the_stated_error_at_the_extremes() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        for parties in [1usize, 3, 1000] {
            let p = QuantParams::for_parties(parties, 4.0, 16).unwrap();
            let inputs: Vec<Vec<f64>> = (0..parties)
                .map(|i| {
                    vec![
                        4.0,
                        -4.0,
                        1e9,
                        -1e9,
                        f64::NAN,
                        0.3 * i as f64 - 1.0,
                        -3.999_99,
                    ]
                })
                .collect();
            let mut sum = vec![0u64; 7];
            for x in &inputs {
                for (s, w) in sum.iter_mut().zip(p.encode(x, &mut rng)) {
                    *s = s.wrapping_add(w) & p.mask();
                }
            }
            let decoded = p.decode(&sum);
            for j in 0..7 {
                let want: f64 = inputs
                    .iter()
                    .map(|x| {
                        if x[j].is_nan() {
                            0.0
                        } else {
                            x[j].clamp(-4.0, 4.0)
                        }
                    })
                    .sum();
                assert!(
                    (decoded[j] - want).abs() <= p.max_sum_error(parties),
                    "coordinate {j}: {} vs {want}",
                    decoded[j]
                );
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let p = QuantParams {
            clip: 1.0,
            scale_bits: 2,
            modulus_bits: 32,
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let n = 20_000;
        let mean: f64 = (0..n)
            .map(|_| p.decode(&p.encode(&[0.1], &mut rng))[0])
            .sum::<f64>()
            / n as f64;
        // 0.1 lies between grid points 0 and 0.25; the mean must be 0.1, not 0 or 0.25.
        assert!((mean - 0.1).abs() < 0.01, "{mean}");
    }

    #[test]
    fn packing_round_trips_and_refuses_ragged_input() {
        let words = vec![0, 1, 0xffff_ffff, 42];
        assert_eq!(unpack(&pack(&words, 32), 32).unwrap(), words);
        let words = vec![0, u64::MAX, 1 << 40];
        assert_eq!(unpack(&pack(&words, 64), 64).unwrap(), words);
        assert_eq!(unpack(&[1, 2, 3], 32), None);
        let mut acc = vec![1u64, 2];
        assert!(add_packed(&mut acc, &pack(&[10, 20], 64), 64));
        assert_eq!(acc, vec![11, 22]);
        assert!(!add_packed(&mut acc, &pack(&[1], 32), 32));
        assert_eq!(unpack(&[1, 2, 3, 4], 16), None);
    }
}
