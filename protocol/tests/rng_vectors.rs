//! The draws every seeded random computation makes, pinned: noise (continuous and discrete
//! Gaussian), stochastic rounding, the mini-batch shuffle, the secure-aggregation graph,
//! Shamir shares and key generation. A change of `rand`, `rand_chacha` or `vsss-rs` (or of
//! how this crate calls them) that changes any draw fails here.

use medfed_protocol::dp::{self, discrete};
use medfed_protocol::model::{ModelKind, TrainParams, train_local};
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{Graph, crypto};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Recorded with rand 0.9 / rand_chacha 0.9 before the move to 0.10; unchanged since.
const PINNED: [&str; 7] = [
    "discrete Some(-2),Some(0),Some(-1),Some(0),Some(2),Some(-4),Some(2),Some(-3),Some(-7),Some(-1),Some(4),Some(1),Some(-3),Some(-2),Some(-2),Some(0)",
    "gaussian bfc62aa07fb20c84,bff6701eaeb9edcb,3fc953b98a7465a6,3ff277dded9a639e,bf9fd2afd9461874,bfeec1e411b11450",
    "quant [29385, 4294958274, 7361, 68296, 4294925075]",
    "train bfb9af39d61f7092,bfbbd41984ecd233,bfb570bcd405d034",
    "graph [3, 4, 8, 9]",
    "shares [1, 233, 74, 254, 95, 141, 28, 33, 176, 11, 131, 192, 110, 13]",
    "key [66, 191, 154, 8, 209, 188, 252, 1, 189, 46, 55, 6, 171, 136, 64, 137, 19, 50, 8, 90, 66, 26, 82, 88, 15, 147, 181, 193, 56, 109, 132, 95]",
];

#[test]
fn seeded_draws_are_pinned() {
    let mut out = Vec::new();

    let mut r = rng(1);
    let sigma2 = discrete::Ratio::new(9u8, 1u8);
    let d: Vec<String> = (0..16)
        .map(|_| format!("{:?}", discrete::sample_i64(&sigma2, &mut r)))
        .collect();
    out.push(format!("discrete {}", d.join(",")));

    let mut r = rng(2);
    let g: Vec<String> = (0..6)
        .map(|_| format!("{:016x}", dp::gaussian(&mut r, 1.0).to_bits()))
        .collect();
    out.push(format!("gaussian {}", g.join(",")));

    let q = QuantParams {
        clip: 1.0,
        scale_bits: 16,
        modulus_bits: 32,
    };
    let words = q
        .encode_noised(&[0.5, -0.25, 0.125, 0.9, -0.7], 0.1, 5, &mut rng(3))
        .unwrap();
    out.push(format!("quant {words:?}"));

    let x = Array2::from_shape_fn((12, 2), |(i, j)| (i * 3 + j) as f64 / 10.0 - 1.0);
    let y = Array1::from_shape_fn(12, |i| f64::from(u8::from(i % 3 == 0)));
    let params = TrainParams {
        local_epochs: 2,
        batch_size: 4,
        learning_rate: 0.1,
        l2: 0.0,
        seed: 4,
        prox_mu: 0.0,
    };
    let w = train_local(ModelKind::Logistic, &[0.0; 3], x.view(), y.view(), &params).unwrap();
    let w: Vec<String> = w.iter().map(|v| format!("{:016x}", v.to_bits())).collect();
    out.push(format!("train {}", w.join(",")));

    let graph = Graph::new(10, 4, 5);
    out.push(format!("graph {:?}", graph.neighbours(0)));

    let shares = crypto::shamir_split(b"pinned secret", 3, 5, &mut rng(6)).unwrap();
    out.push(format!("shares {:?}", shares[0]));

    let key = crypto::KeyPair::generate(&mut rng(7));
    out.push(format!("key {:?}", key.public));

    for (got, want) in out.iter().zip(PINNED) {
        assert_eq!(got, want);
    }
    assert_eq!(out.len(), PINNED.len());
}
