//! Vector helpers shared by the device and the server.

use crate::FlError;

/// The L2 norm of `x`, accumulated in f64.
pub fn l2_norm(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales `x` in place so its L2 norm is at most `max_norm`, and returns the factor applied
/// (1 when `x` was already inside the ball).
///
/// # Errors
/// [`FlError::InvalidOption`] unless `max_norm` is finite and `> 0`;
/// [`FlError::NonFiniteValue`] when `x` holds NaN or ±Inf. `x` is then unchanged.
pub fn clip_l2(x: &mut [f32], max_norm: f32) -> Result<f32, FlError> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        let reason = format!("must be finite and > 0, got {max_norm}");
        return Err(FlError::InvalidOption {
            name: "max_norm",
            reason,
        });
    }
    check_finite(x)?;
    let norm = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if norm <= f64::from(max_norm) {
        return Ok(1.0);
    }
    let scale = f64::from(max_norm) / norm;
    for v in x.iter_mut() {
        *v = (f64::from(*v) * scale) as f32;
    }
    Ok(scale as f32)
}

/// `new − old`, element-wise: the update delta a device sends.
///
/// # Errors
/// [`FlError::LengthMismatch`] when the lengths differ.
pub fn delta(new: &[f32], old: &[f32]) -> Result<Vec<f32>, FlError> {
    same_len(new, old)?;
    Ok(new.iter().zip(old).map(|(n, o)| n - o).collect())
}

/// `base + delta`, element-wise: a client's new weights from the delta it sent.
///
/// # Errors
/// [`FlError::LengthMismatch`] when the lengths differ.
pub fn apply_delta(base: &[f32], delta: &[f32]) -> Result<Vec<f32>, FlError> {
    same_len(base, delta)?;
    Ok(base.iter().zip(delta).map(|(b, d)| b + d).collect())
}

fn same_len(a: &[f32], b: &[f32]) -> Result<(), FlError> {
    if a.len() != b.len() {
        return Err(FlError::LengthMismatch {
            left: a.len(),
            right: b.len(),
        });
    }
    Ok(())
}

/// [`FlError::NonFiniteValue`] at the first NaN or ±Inf.
pub(crate) fn check_finite(x: &[f32]) -> Result<(), FlError> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(FlError::NonFiniteValue { index }),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn clip_scales_onto_the_ball_and_reports_the_factor() {
        let mut x = vec![3.0, 4.0];
        let s = clip_l2(&mut x, 1.0).unwrap();
        assert!((s - 0.2).abs() < 1e-7);
        assert!((l2_norm(&x) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn clip_leaves_short_vectors_alone() {
        let mut x = vec![0.3, 0.4];
        assert_eq!(clip_l2(&mut x, 1.0).unwrap(), 1.0);
        assert_eq!(x, [0.3, 0.4]);
    }

    #[test]
    fn clip_rejects_bad_bounds_and_values_without_touching_the_input() {
        let mut x = vec![3.0, 4.0];
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                clip_l2(&mut x, bad),
                Err(FlError::InvalidOption { .. })
            ));
        }
        let mut y = vec![1.0, f32::NAN, 5.0];
        assert_eq!(
            clip_l2(&mut y, 1.0),
            Err(FlError::NonFiniteValue { index: 1 })
        );
        assert_eq!(x, [3.0, 4.0]);
    }

    #[test]
    fn delta_and_apply_delta_are_inverse_and_check_lengths() {
        let old = [1.0, 2.0, 3.0];
        let new = [1.5, 1.0, 3.25];
        let d = delta(&new, &old).unwrap();
        assert_eq!(d, [0.5, -1.0, 0.25]);
        assert_eq!(apply_delta(&old, &d).unwrap(), new);
        assert_eq!(
            delta(&new, &old[..2]),
            Err(FlError::LengthMismatch { left: 3, right: 2 })
        );
    }
}
