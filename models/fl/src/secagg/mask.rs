//! Fixed-point quantisation, ChaCha20 mask expansion and bit packing over Z_(2^m).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{Params, SecAggError};

/// `2^m − 1`, the mask for reducing modulo `2^m` (`m ≤ 32`).
pub(crate) fn modulus_mask(mod_bits: u32) -> u32 {
    if mod_bits >= 32 {
        u32::MAX
    } else {
        (1u32 << mod_bits) - 1
    }
}

/// Clips each value to `[−clip, clip]` and maps it to `0..=2^q − 1` by rounding to nearest.
///
/// # Errors
/// [`SecAggError::ShapeMismatch`] or [`SecAggError::NonFinite`].
pub fn quantize(values: &[f32], params: &Params) -> Result<Vec<u32>, SecAggError> {
    if values.len() != params.len {
        return Err(SecAggError::ShapeMismatch {
            expected: params.len,
            got: values.len(),
        });
    }
    let levels = f64::from(modulus_mask(params.quant_bits));
    let clip = f64::from(params.clip);
    values
        .iter()
        .enumerate()
        .map(|(index, &v)| {
            if !v.is_finite() {
                return Err(SecAggError::NonFinite { index });
            }
            let x = f64::from(v).clamp(-clip, clip);
            Ok(((x + clip) / (2.0 * clip) * levels).round() as u32)
        })
        .collect()
}

/// The real-valued sum of `count` quantised vectors from their integer sum.
pub fn dequantize_sum(sum: &[u32], count: usize, params: &Params) -> Vec<f32> {
    let levels = f64::from(modulus_mask(params.quant_bits));
    let clip = f64::from(params.clip);
    let step = 2.0 * clip / levels;
    sum.iter()
        .map(|&s| (f64::from(s) * step - count as f64 * clip) as f32)
        .collect()
}

/// Adds (`add == true`) or subtracts the ChaCha20 stream keyed by `seed` to `acc`, modulo `2^m`.
/// The stream is the generator's `u32` words, each reduced modulo `2^m`: uniform, since `2^m`
/// divides `2^32`.
pub(crate) fn apply_mask(acc: &mut [u32], seed: &[u8; 32], add: bool, mod_bits: u32) {
    let mask = modulus_mask(mod_bits);
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u32; 64];
    for chunk in acc.chunks_mut(block.len()) {
        let words = &mut block[..chunk.len()];
        for w in words.iter_mut() {
            *w = rng.next_u32();
        }
        if add {
            for (a, w) in chunk.iter_mut().zip(words.iter()) {
                *a = a.wrapping_add(*w) & mask;
            }
        } else {
            for (a, w) in chunk.iter_mut().zip(words.iter()) {
                *a = a.wrapping_sub(*w) & mask;
            }
        }
    }
}

/// Packs values `< 2^bits` into `ceil(len · bits / 8)` bytes, least significant bit first.
pub(crate) fn pack(values: &[u32], bits: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((values.len() * bits as usize).div_ceil(8));
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    for &v in values {
        acc |= u64::from(v) << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `len` values of `bits` bits (a [`MaskedInput`](super::MaskedInput)'s data).
///
/// # Errors
/// [`SecAggError::Malformed`] unless `bits` is in `1..=32` and `bytes` is exactly
/// `ceil(len · bits / 8)` long with zero padding bits.
pub fn unpack(bytes: &[u8], len: usize, bits: u32) -> Result<Vec<u32>, SecAggError> {
    let expected = len
        .checked_mul(bits as usize)
        .filter(|_| (1..=32).contains(&bits))
        .ok_or_else(|| SecAggError::Malformed {
            reason: format!("cannot unpack {len} values of {bits} bits"),
        })?
        .div_ceil(8);
    if bytes.len() != expected {
        return Err(SecAggError::Malformed {
            reason: format!(
                "masked vector has {} bytes, {expected} expected",
                bytes.len()
            ),
        });
    }
    let mask = modulus_mask(bits);
    let mut out = Vec::with_capacity(len);
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mut it = bytes.iter();
    for _ in 0..len {
        while filled < bits {
            let b = it.next().copied().unwrap_or(0);
            acc |= u64::from(b) << filled;
            filled += 8;
        }
        out.push((acc as u32) & mask);
        acc >>= bits;
        filled -= bits;
    }
    if acc != 0 {
        return Err(SecAggError::Malformed {
            reason: "masked vector has non-zero padding bits".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_at_every_width() {
        for bits in [1, 7, 8, 13, 16, 22, 31, 32] {
            let mask = modulus_mask(bits);
            let values: Vec<u32> = (0..101u32)
                .map(|i| i.wrapping_mul(2_654_435_761) & mask)
                .collect();
            let bytes = pack(&values, bits);
            assert_eq!(bytes.len(), (101 * bits as usize).div_ceil(8));
            assert_eq!(unpack(&bytes, 101, bits).unwrap(), values, "{bits}");
        }
        assert!(unpack(&[0xff], 1, 4).is_err());
        assert!(unpack(&[0, 0], 1, 4).is_err());
    }

    #[test]
    fn masks_cancel() {
        let mut acc = vec![5u32; 1000];
        apply_mask(&mut acc, &[9; 32], true, 22);
        assert!(acc.iter().any(|&a| a != 5));
        apply_mask(&mut acc, &[9; 32], false, 22);
        assert!(acc.iter().all(|&a| a == 5));
    }
}
