//! The cryptographic building blocks of secure aggregation, each a thin wrapper over an
//! audited primitive: X25519 (x25519-dalek, exportable keys), HKDF-SHA256 and AES-256-GCM
//! (ring), Shamir secret sharing over GF(2^8) (vsss-rs), and mask expansion with the
//! ChaCha20 keystream (rand_chacha) seeded through HKDF.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::{aead, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};

use super::SecAggError;

/// Domain separation for every key this protocol derives.
const DOMAIN: &[u8] = b"medfed-secagg-v1";

/// An X25519 key pair whose secret can be exported (and so secret-shared).
pub struct KeyPair {
    /// The secret scalar (exportable, so it can be secret-shared).
    pub secret: StaticSecret,
    /// The public key, `secret · G`.
    pub public: [u8; 32],
}

impl KeyPair {
    /// A key pair from 32 bytes of `rng` (seeded by the caller: this crate draws no OS
    /// randomness).
    pub fn generate(rng: &mut ChaCha20Rng) -> KeyPair {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        KeyPair::from_secret(bytes)
    }

    /// The key pair of a known secret (e.g. one reconstructed from Shamir shares).
    pub fn from_secret(bytes: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }
}

/// X25519 agreement. Refuses a peer key of small order (the shared secret would be known to
/// anyone).
pub fn agree(secret: &StaticSecret, peer_public: &[u8; 32]) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(SecAggError::WeakPublicKey);
    }
    Ok(shared.to_bytes())
}

/// Whether `public` is of small order: any agreement with it gives a secret everybody knows.
pub fn is_weak_public_key(public: &[u8; 32]) -> bool {
    // The result's contributoriness depends on the peer key only, not on the secret.
    !StaticSecret::from([0x5a; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// HKDF-SHA256 with the round context as salt: 32 bytes for `label` and `parts`. Fails
/// closed: an error of the derivation is an error, never a fixed key (32 bytes are always
/// within HKDF-SHA256's limit, so it does not happen with ring as it is).
pub fn derive(
    ikm: &[u8],
    context: &[u8; 32],
    label: &[u8],
    parts: &[&[u8]],
) -> Result<[u8; 32], SecAggError> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, context);
    let prk = salt.extract(ikm);
    let mut info: Vec<&[u8]> = vec![DOMAIN, label];
    info.extend_from_slice(parts);
    let mut out = [0u8; 32];
    prk.expand(&info, Len32)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| SecAggError::KeyDerivation)?;
    Ok(out)
}

/// AES-256-GCM with a key used for exactly one message (so a fixed nonce is safe). Fails
/// closed: any error of the cipher is an error, never the plaintext.
pub fn seal_once(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SecAggError> {
    seal_with(&aead::AES_256_GCM, key, aad, plaintext)
}

fn seal_with(
    algorithm: &'static aead::Algorithm,
    key: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let unbound = aead::UnboundKey::new(algorithm, key).map_err(|_| SecAggError::Sealing)?;
    let key = aead::LessSafeKey::new(unbound);
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0; 12]),
        aead::Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| SecAggError::Sealing)?;
    Ok(buf)
}

/// Decrypts what [`seal_once`] sealed with the same key and `aad`. Fails closed: a wrong
/// key, altered ciphertext or altered `aad` gives [`SecAggError::Decryption`], never
/// unauthenticated bytes.
pub fn open_once(key: &[u8; 32], aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, SecAggError> {
    let unbound =
        aead::UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| SecAggError::Decryption)?;
    let key = aead::LessSafeKey::new(unbound);
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| SecAggError::Decryption)?;
    Ok(plain.to_vec())
}

/// Adds (`sign` = +1) or subtracts (-1) the mask expanded from `seed` to `acc`, modulo
/// 2^`bits`: word i of the mask is the i-th `u32` (bits = 32) or `u64` (bits = 64) of the
/// ChaCha20 keystream keyed by `seed` (nonce 0).
pub fn apply_mask(acc: &mut [u64], seed: &[u8; 32], bits: u8, sign: i8) {
    apply_mask_from(acc, 0, seed, bits, sign);
}

/// As [`apply_mask`] for the coordinates `first..first + acc.len()` of the mask.
fn apply_mask_from(acc: &mut [u64], first: usize, seed: &[u8; 32], bits: u8, sign: i8) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    // The keystream position of coordinate `first`, in 32-bit words.
    rng.set_word_pos((first * usize::from(bits / 32).max(1)) as u128);
    // Keystream in blocks of 4 KiB: far fewer calls into the generator than a word at a
    // time, and the conversion loop vectorizes.
    let mut block = [0u8; 4096];
    let word = usize::from(bits / 8).max(4);
    for chunk in acc.chunks_mut(block.len() / word) {
        let bytes = &mut block[..chunk.len() * word];
        rng.fill_bytes(bytes);
        match (word, sign >= 0) {
            (4, true) => chunk
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(a, b)| {
                    *a = a.wrapping_add(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                }),
            (4, false) => chunk
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(a, b)| {
                    *a = a.wrapping_sub(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                }),
            (_, true) => chunk
                .iter_mut()
                .zip(bytes.chunks_exact(8))
                .for_each(|(a, b)| {
                    *a = a.wrapping_add(u64::from_le_bytes([
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                    ]));
                }),
            (_, false) => chunk
                .iter_mut()
                .zip(bytes.chunks_exact(8))
                .for_each(|(a, b)| {
                    *a = a.wrapping_sub(u64::from_le_bytes([
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                    ]));
                }),
        }
    }
}

/// Applies every `(seed, sign)` mask to `acc`, splitting the coordinates among the
/// machine's cores (each thread seeks the keystreams to its range, so no extra memory).
pub fn apply_masks_parallel(acc: &mut [u64], masks: &[([u8; 32], i8)], bits: u8) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = acc.len().div_ceil(threads).max(4096);
    if threads == 1 || acc.len() <= chunk || masks.is_empty() {
        for (seed, sign) in masks {
            apply_mask(acc, seed, bits, *sign);
        }
        return;
    }
    std::thread::scope(|scope| {
        for (i, part) in acc.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (seed, sign) in masks {
                    apply_mask_from(part, i * chunk, seed, bits, *sign);
                }
            });
        }
    });
}

/// Splits `secret` into `holders` Shamir shares (threshold `t`); share i has x = i + 1,
/// stored in its first byte.
pub fn shamir_split(
    secret: &[u8],
    t: usize,
    holders: usize,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<Vec<u8>>, SecAggError> {
    vsss_rs::Gf256::split_bytes(t, holders, secret, rng)
        .map_err(|e| SecAggError::Sharing(e.to_string()))
}

/// Reconstructs a secret from at least the threshold of distinct shares.
pub fn shamir_combine(shares: &[Vec<u8>]) -> Result<Vec<u8>, SecAggError> {
    vsss_rs::Gf256::combine_bytes(shares).map_err(|e| SecAggError::Sharing(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chacha20_keystream_is_the_rfc_8439_one() {
        // RFC 8439 appendix A.1, test vector 1: key 0, nonce 0, block 0 keystream starts
        // 76 b8 e0 ad a0 f1 3d 90.
        let mut acc = [0u64; 2];
        apply_mask(&mut acc, &[0; 32], 32, 1);
        assert_eq!(acc, [0xade0_b876, 0x903d_f1a0]);
        let mut acc = [0u64; 1];
        apply_mask(&mut acc, &[0; 32], 64, 1);
        assert_eq!(acc, [0x903d_f1a0_ade0_b876]);
        apply_mask(&mut acc, &[0; 32], 64, -1);
        assert_eq!(acc, [0]);
    }

    #[test]
    fn parallel_masking_equals_sequential_masking() {
        for bits in [32, 64] {
            let masks: Vec<([u8; 32], i8)> = (0..5)
                .map(|i| ([i as u8; 32], if i % 2 == 0 { 1 } else { -1 }))
                .collect();
            let mut seq = vec![7u64; 50_001];
            for (seed, sign) in &masks {
                apply_mask(&mut seq, seed, bits, *sign);
            }
            let mut par = vec![7u64; 50_001];
            apply_masks_parallel(&mut par, &masks, bits);
            assert_eq!(seq, par, "{bits} bits");
        }
    }

    #[test]
    fn x25519_matches_rfc_7748() {
        // RFC 7748 section 6.1.
        let hex = |s: &str| -> [u8; 32] { crate::hex::decode_array(s).unwrap() };
        let alice = KeyPair::from_secret(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = KeyPair::from_secret(hex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.public,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(agree(&alice.secret, &bob.public).unwrap(), shared);
        assert_eq!(agree(&bob.secret, &alice.public).unwrap(), shared);
        // A small-order point is refused.
        assert_eq!(
            agree(&alice.secret, &[0; 32]),
            Err(SecAggError::WeakPublicKey)
        );
    }

    #[test]
    fn shamir_any_threshold_subset_reconstructs() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let secret: Vec<u8> = (0..32).collect();
        let shares = shamir_split(&secret, 3, 5, &mut rng).unwrap();
        assert_eq!(
            shares.iter().map(|s| s[0]).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        for subset in [[0, 1, 2], [0, 2, 4], [1, 3, 4], [2, 3, 4]] {
            let picked: Vec<_> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(shamir_combine(&picked).unwrap(), secret);
        }
        // Two shares of a threshold-3 sharing give a wrong value, not the secret.
        assert_ne!(shamir_combine(&shares[..2]).unwrap_or_default(), secret);
    }

    #[test]
    fn shamir_below_threshold_reveals_nothing() {
        // For t = 2, one share's value bytes are uniform whatever the secret: compare the
        // byte histograms of share 1 for two very different secrets.
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut hist = [[0u32; 256]; 2];
        for (h, secret) in hist.iter_mut().zip([[0u8; 64], [0xff; 64]]) {
            for _ in 0..400 {
                let shares = shamir_split(&secret, 2, 3, &mut rng).unwrap();
                for b in &shares[0][1..] {
                    h[*b as usize] += 1;
                }
            }
        }
        // Chi-square against uniform (255 degrees of freedom; 99.9% quantile about 330).
        for h in hist {
            let expected = 400.0 * 64.0 / 256.0;
            let chi2: f64 = h
                .iter()
                .map(|&o| (f64::from(o) - expected).powi(2) / expected)
                .sum();
            assert!(chi2 < 330.0, "chi2 {chi2}");
        }
    }

    /// A key the cipher cannot take is an error, not the plaintext (the fallback this
    /// replaced returned the share unencrypted).
    #[test]
    fn sealing_fails_closed() {
        let share = b"a secret share";
        assert_eq!(
            seal_with(&aead::AES_256_GCM, &[7u8; 16], b"ctx", share),
            Err(SecAggError::Sealing)
        );
        let ct = seal_once(&[7u8; 32], b"ctx", share).unwrap();
        assert_eq!(ct.len(), share.len() + 16);
        assert!(!ct.windows(share.len()).any(|w| w == share));
    }

    #[test]
    fn sealed_shares_open_only_with_the_right_key_and_context() {
        let key = [7u8; 32];
        let ct = seal_once(&key, b"ctx", b"share").unwrap();
        assert_eq!(open_once(&key, b"ctx", &ct).unwrap(), b"share");
        assert_eq!(open_once(&key, b"other", &ct), Err(SecAggError::Decryption));
        assert_eq!(
            open_once(&[8u8; 32], b"ctx", &ct),
            Err(SecAggError::Decryption)
        );
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert_eq!(
            open_once(&key, b"ctx", &tampered),
            Err(SecAggError::Decryption)
        );
    }
}
