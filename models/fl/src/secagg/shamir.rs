//! Shamir secret sharing of 32-byte secrets over GF(2⁸), byte by byte.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree
//! `t − 1`; a share is the 32 evaluations at one non-zero point `x ∈ 1..=255`. Any `t` shares
//! give the secret back by Lagrange interpolation at 0; `t − 1` shares say nothing about it.
//! Field multiplication is the carry-less shift-and-add loop with masks instead of branches
//! or table lookups, so its timing does not depend on the bytes (the polynomial is
//! x⁸ + x⁴ + x³ + x + 1, as in AES). Inverses are `a²⁵⁴`.

use super::SecAggError;

/// A 32-byte secret (a mask seed).
pub type Secret = [u8; 32];

/// `a · b` in GF(2⁸), constant time.
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// `a⁻¹` in GF(2⁸) (`0⁻¹ = 0`), constant time.
fn inv(a: u8) -> u8 {
    // a^254 by square-and-multiply over the fixed exponent 0b1111_1110.
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// Splits `secret` into one share per point of `xs` (distinct, non-zero), any `threshold` of
/// which recover it. `coefficients` supplies `32 · (threshold − 1)` random bytes.
pub(crate) fn split(
    secret: &Secret,
    threshold: usize,
    xs: &[u8],
    coefficients: &mut dyn FnMut(&mut [u8]) -> Result<(), SecAggError>,
) -> Result<Vec<Secret>, SecAggError> {
    if threshold == 0 || threshold > xs.len() || xs.contains(&0) {
        return Err(SecAggError::InvalidParams {
            reason: format!(
                "cannot split a secret {threshold}-of-{} over points {xs:?}",
                xs.len()
            ),
        });
    }
    let mut coeffs = vec![0u8; 32 * (threshold - 1)];
    coefficients(&mut coeffs)?;
    let shares = xs
        .iter()
        .map(|&x| {
            let mut share = [0u8; 32];
            for (byte, out) in share.iter_mut().enumerate() {
                // Horner from the highest coefficient down to the secret byte.
                let mut acc = 0u8;
                for c in (0..threshold - 1).rev() {
                    acc = mul(acc, x) ^ coeffs[c * 32 + byte];
                }
                *out = mul(acc, x) ^ secret[byte];
            }
            share
        })
        .collect();
    coeffs.fill(0);
    Ok(shares)
}

/// Recovers the secret from `(x, share)` pairs with distinct non-zero `x`. All pairs given
/// are used, so pass exactly `threshold` of them (more is fine when they are all honest).
pub(crate) fn combine(shares: &[(u8, Secret)]) -> Result<Secret, SecAggError> {
    for (i, (x, _)) in shares.iter().enumerate() {
        if *x == 0 || shares[..i].iter().any(|(y, _)| y == x) {
            return Err(SecAggError::InvalidParams {
                reason: format!("share point {x} is zero or repeated"),
            });
        }
    }
    let mut secret = [0u8; 32];
    for (j, (xj, yj)) in shares.iter().enumerate() {
        // Lagrange basis at 0: Π_{m≠j} x_m / (x_m − x_j); subtraction is xor.
        let mut num = 1u8;
        let mut den = 1u8;
        for (m, (xm, _)) in shares.iter().enumerate() {
            if m != j {
                num = mul(num, *xm);
                den = mul(den, xm ^ xj);
            }
        }
        let lambda = mul(num, inv(den));
        for (s, y) in secret.iter_mut().zip(yj) {
            *s ^= mul(lambda, *y);
        }
    }
    Ok(secret)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn field_inverse_and_known_product() {
        assert_eq!(mul(0x57, 0x83), 0xc1); // FIPS-197 §4.2
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn any_threshold_subset_recovers_and_fewer_do_not() {
        let secret: Secret = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let mut counter = 0u8;
        let mut rng = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                counter = counter.wrapping_mul(31).wrapping_add(17);
                *b = counter;
            }
            Ok(())
        };
        let xs: Vec<u8> = (1..=7).collect();
        let shares = split(&secret, 4, &xs, &mut rng).unwrap();
        let pairs: Vec<(u8, Secret)> = xs.iter().copied().zip(shares).collect();
        for start in 0..4 {
            assert_eq!(combine(&pairs[start..start + 4]).unwrap(), secret);
        }
        assert_eq!(combine(&pairs).unwrap(), secret);
        assert_ne!(combine(&pairs[..3]).unwrap(), secret);
        assert!(combine(&[(1, secret), (1, secret)]).is_err());
        assert!(split(&secret, 8, &xs, &mut rng).is_err());
    }
}
