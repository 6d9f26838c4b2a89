//! Small dense linear algebra for the statistics the aggregator computes from released
//! sums (a log-rank test's covariance, a Cox model's Hessian): a few dozen unknowns at most,
//! so plain Gaussian elimination with partial pivoting, in f64.

/// The inverse of the square matrix `a` (row-major, `n × n`), or `None` when it is singular
/// (a pivot below `1e-12` of the largest entry) or not finite.
pub fn inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    if a.len() != n * n || a.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if scale == 0.0 {
        return None;
    }
    // [a | I], reduced to [I | a⁻¹].
    let w = 2 * n;
    let mut m = vec![0.0; n * w];
    for i in 0..n {
        m[i * w..i * w + n].copy_from_slice(&a[i * n..(i + 1) * n]);
        m[i * w + n + i] = 1.0;
    }
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&r, &s| m[r * w + col].abs().total_cmp(&m[s * w + col].abs()))?;
        if m[pivot * w + col].abs() <= 1e-12 * scale {
            return None;
        }
        if pivot != col {
            for k in 0..w {
                m.swap(pivot * w + k, col * w + k);
            }
        }
        let p = m[col * w + col];
        for k in 0..w {
            m[col * w + k] /= p;
        }
        for r in 0..n {
            if r != col {
                let f = m[r * w + col];
                if f != 0.0 {
                    for k in 0..w {
                        m[r * w + k] -= f * m[col * w + k];
                    }
                }
            }
        }
    }
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        out[i * n..(i + 1) * n].copy_from_slice(&m[i * w + n..(i + 1) * w]);
    }
    Some(out)
}

/// `a · x` for the `n × n` matrix `a` (row-major).
pub fn mul_vec(a: &[f64], x: &[f64]) -> Vec<f64> {
    let n = x.len();
    (0..n)
        .map(|i| (0..n).map(|j| a[i * n + j] * x[j]).sum())
        .collect()
}

/// The quadratic form `xᵀ a x`.
pub fn quadratic_form(a: &[f64], x: &[f64]) -> f64 {
    mul_vec(a, x).iter().zip(x).map(|(y, x)| y * x).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverts_and_refuses_singular_matrices() {
        let a = [4.0, 7.0, 2.0, 6.0];
        let inv = inverse(&a, 2).unwrap();
        let expect = [0.6, -0.7, -0.2, 0.4];
        for (x, e) in inv.iter().zip(expect) {
            assert!((x - e).abs() < 1e-12, "{inv:?}");
        }
        // A pivot of 0 in the first column needs the row swap.
        let b = [0.0, 1.0, 2.0, 1.0, 0.0, 3.0, 4.0, -3.0, 8.0];
        let inv = inverse(&b, 3).unwrap();
        for i in 0..3 {
            let row: Vec<f64> = (0..3)
                .map(|j| (0..3).map(|k| b[i * 3 + k] * inv[k * 3 + j]).sum())
                .collect();
            for (j, x) in row.iter().enumerate() {
                assert!((x - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
        assert!(inverse(&[1.0, 2.0, 2.0, 4.0], 2).is_none());
        assert!(inverse(&[0.0; 4], 2).is_none());
        assert!(inverse(&[f64::NAN, 0.0, 0.0, 1.0], 2).is_none());
        assert_eq!(quadratic_form(&[2.0, 0.0, 0.0, 3.0], &[1.0, 2.0]), 14.0);
    }
}
