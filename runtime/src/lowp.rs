//! ONNX's narrow element types — 4- and 2-bit integers, 8-bit floats (E4M3FN, E4M3FNUZ, E5M2,
//! E5M2FNUZ) and the 4-bit float E2M1 — held widened: the integers in `i8`/`u8` (each value
//! in its own byte), the floats in `f32` (the value it encodes, exactly). tract and fedge's
//! [`Tensor`](crate::Tensor) have no such types; every value of these types is exact in its
//! container, so widening loses nothing, and the narrowing casts (`Cast`, `QuantizeLinear`
//! to these types) round and saturate as ONNX defines them (`FedgeCastNarrow`).
//!
//! `FLOAT8E8M0` (a scale-only type with its own rounding modes) is not handled.

use tract_onnx::pb::TensorProto;

pub(crate) const FLOAT8E4M3FN: i32 = 17;
pub(crate) const FLOAT8E4M3FNUZ: i32 = 18;
pub(crate) const FLOAT8E5M2: i32 = 19;
pub(crate) const FLOAT8E5M2FNUZ: i32 = 20;
pub(crate) const UINT4: i32 = 21;
pub(crate) const INT4: i32 = 22;
pub(crate) const FLOAT4E2M1: i32 = 23;
pub(crate) const UINT2: i32 = 25;
pub(crate) const INT2: i32 = 26;

const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;

/// Whether `t` (an ONNX element type code) is one of the narrow types.
pub(crate) fn is_narrow(t: i32) -> bool {
    container(t).is_some()
}

/// The ONNX type that holds a narrow type's values.
pub(crate) fn container(t: i32) -> Option<i32> {
    Some(match t {
        INT4 | INT2 => INT8,
        UINT4 | UINT2 => UINT8,
        FLOAT8E4M3FN | FLOAT8E4M3FNUZ | FLOAT8E5M2 | FLOAT8E5M2FNUZ | FLOAT4E2M1 => FLOAT,
        _ => return None,
    })
}

/// The saturation range of a narrow integer type.
pub(crate) fn int_range(t: i32) -> Option<(f32, f32)> {
    Some(match t {
        INT4 => (-8.0, 7.0),
        UINT4 => (0.0, 15.0),
        INT2 => (-2.0, 1.0),
        UINT2 => (0.0, 3.0),
        _ => return None,
    })
}

/// Bits per element.
fn width(t: i32) -> usize {
    match t {
        INT2 | UINT2 => 2,
        INT4 | UINT4 | FLOAT4E2M1 => 4,
        _ => 8,
    }
}

/// How a float format treats its top codes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    /// E4M3FN: no infinities, NaN is every exponent and mantissa bit set.
    Fn,
    /// FNUZ: no infinities, no negative zero, NaN is the sign bit alone.
    Fnuz,
    /// E5M2: IEEE-like, infinities and NaNs in the top exponent.
    Ieee,
    /// E2M1: no infinities and no NaN.
    Finite,
}

/// Exponent bits, mantissa bits, bias, special values and largest finite value.
fn format(t: i32) -> Option<(u32, u32, i32, Special, f64)> {
    Some(match t {
        FLOAT8E4M3FN => (4, 3, 7, Special::Fn, 448.0),
        FLOAT8E4M3FNUZ => (4, 3, 8, Special::Fnuz, 240.0),
        FLOAT8E5M2 => (5, 2, 15, Special::Ieee, 57344.0),
        FLOAT8E5M2FNUZ => (5, 2, 16, Special::Fnuz, 57344.0),
        FLOAT4E2M1 => (2, 1, 1, Special::Finite, 6.0),
        _ => return None,
    })
}

/// The value a code of narrow type `t` encodes.
pub(crate) fn decode(t: i32, code: u8) -> f64 {
    if let Some((e, m, bias, special, _)) = format(t) {
        let sign_bit = 1u32 << (e + m);
        let code = u32::from(code) & ((sign_bit << 1) - 1);
        if special == Special::Fnuz && code == sign_bit {
            return f64::NAN;
        }
        let (ex, man) = ((code >> m) & ((1 << e) - 1), code & ((1 << m) - 1));
        let top = (1 << e) - 1;
        if special == Special::Fn && ex == top && man == (1 << m) - 1 {
            return f64::NAN;
        }
        if special == Special::Ieee && ex == top {
            return if man != 0 {
                f64::NAN
            } else if code & sign_bit != 0 {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
        }
        let mag = if ex == 0 {
            f64::from(man) * 2f64.powi(1 - bias - m as i32)
        } else {
            f64::from((1 << m) + man) * 2f64.powi(ex as i32 - bias - m as i32)
        };
        if code & sign_bit != 0 { -mag } else { mag }
    } else {
        let bits = width(t);
        let v = i32::from(code) & ((1 << bits) - 1);
        if matches!(t, INT4 | INT2) && v >= 1 << (bits - 1) {
            f64::from(v - (1 << bits))
        } else {
            f64::from(v)
        }
    }
}

/// ONNX `Cast` of `v` to narrow type `t`, as the value it gives: integers truncate toward zero
/// and wrap (two's complement), non-finite values giving 0; floats round to nearest even, and
/// values past the largest finite one become it with `saturate`, else infinity (E5M2) or NaN
/// (E4M3FN, FNUZ). E2M1 has neither: it always saturates, and NaN becomes -0 (as onnx's
/// reference and `ml_dtypes` do).
pub(crate) fn narrow(t: i32, v: f64, saturate: bool) -> f64 {
    let Some((_, m, bias, special, max)) = format(t) else {
        if !v.is_finite() {
            return 0.0;
        }
        let bits = width(t) as u32;
        let span = 1i64 << bits;
        let w = (v.trunc() as i64).rem_euclid(span);
        return if matches!(t, INT4 | INT2) && w >= span / 2 {
            (w - span) as f64
        } else {
            w as f64
        };
    };
    if v.is_nan() {
        return if special == Special::Finite {
            -0.0
        } else {
            f64::NAN
        };
    }
    let saturate = saturate || special == Special::Finite;
    let overflow = |neg: bool| -> f64 {
        let r = if saturate {
            max
        } else if special == Special::Ieee {
            f64::INFINITY
        } else {
            return f64::NAN;
        };
        if neg { -r } else { r }
    };
    let neg = v.is_sign_negative();
    let a = v.abs();
    if a.is_infinite() {
        return overflow(neg);
    }
    let zero = if neg && special != Special::Fnuz {
        -0.0
    } else {
        0.0
    };
    if a == 0.0 {
        return zero;
    }
    // The quantum of `a`'s binade (normal numbers) or of the subnormals.
    let exp = ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let exp = exp.max(1 - bias);
    let q = 2f64.powi(exp - m as i32);
    let r = (a / q).round_ties_even() * q;
    if r > max {
        return overflow(neg);
    }
    if r == 0.0 {
        return zero;
    }
    if neg { -r } else { r }
}

/// The codes of a narrow tensor, one per element: from `raw_data` (packed, low bits first),
/// or `int32_data` (one packed byte per entry for 4- and 2-bit types, one element per entry
/// for 8-bit floats). `None` when the data is missing, short, or stored externally.
fn codes(t: &TensorProto) -> Option<Vec<u8>> {
    let n = usize::try_from(
        t.dims
            .iter()
            .try_fold(1i64, |a, &d| (d >= 0).then(|| a.checked_mul(d)).flatten())?,
    )
    .ok()?;
    let bits = width(t.data_type);
    let per = 8 / bits;
    let bytes: Vec<u8> = if !t.raw_data.is_empty() {
        t.raw_data.clone()
    } else if !t.int32_data.is_empty() {
        t.int32_data.iter().map(|&v| v as u8).collect()
    } else if n == 0 {
        Vec::new()
    } else {
        return None;
    };
    if bytes.len() < n.div_ceil(per) {
        return None;
    }
    let mask = ((1u16 << bits) - 1) as u8;
    Some(
        (0..n)
            .map(|i| (bytes[i / per] >> ((i % per) * bits)) & mask)
            .collect(),
    )
}

/// A narrow tensor as its container type (same name and shape); `None` if `t` is not narrow
/// or its data cannot be read.
pub(crate) fn widen(t: &TensorProto) -> Option<TensorProto> {
    let to = container(t.data_type)?;
    let codes = codes(t)?;
    let raw: Vec<u8> = if to == FLOAT {
        codes
            .iter()
            .flat_map(|&c| (decode(t.data_type, c) as f32).to_le_bytes())
            .collect()
    } else {
        codes
            .iter()
            .map(|&c| decode(t.data_type, c) as i8 as u8)
            .collect()
    };
    Some(TensorProto {
        name: t.name.clone(),
        data_type: to,
        dims: t.dims.clone(),
        raw_data: raw,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_decodes_and_narrows_back_to_itself() {
        for t in [
            FLOAT8E4M3FN,
            FLOAT8E4M3FNUZ,
            FLOAT8E5M2,
            FLOAT8E5M2FNUZ,
            FLOAT4E2M1,
            INT4,
            UINT4,
            INT2,
            UINT2,
        ] {
            for code in 0..(1u16 << width(t)) {
                let v = decode(t, code as u8);
                let back = narrow(t, v, false);
                assert!(
                    (v.is_nan() && back.is_nan()) || v.to_bits() == back.to_bits(),
                    "type {t} code {code:#x}: {v} -> {back}"
                );
            }
        }
    }

    #[test]
    fn known_values_of_each_format() {
        assert_eq!(decode(FLOAT8E4M3FN, 0x7e), 448.0);
        assert!(decode(FLOAT8E4M3FN, 0x7f).is_nan());
        assert_eq!(decode(FLOAT8E4M3FN, 0x01), 2f64.powi(-9));
        assert_eq!(decode(FLOAT8E4M3FNUZ, 0x7f), 240.0);
        assert!(decode(FLOAT8E4M3FNUZ, 0x80).is_nan());
        assert_eq!(decode(FLOAT8E5M2, 0x7b), 57344.0);
        assert_eq!(decode(FLOAT8E5M2, 0x7c), f64::INFINITY);
        assert!(decode(FLOAT8E5M2, 0x7d).is_nan());
        assert_eq!(decode(FLOAT8E5M2FNUZ, 0x7f), 57344.0);
        assert_eq!(decode(FLOAT4E2M1, 0x7), 6.0);
        assert_eq!(decode(FLOAT4E2M1, 0x1), 0.5);
        assert_eq!(decode(FLOAT4E2M1, 0xf), -6.0);
        assert_eq!(decode(INT4, 0x8), -8.0);
        assert_eq!(decode(INT2, 0x3), -1.0);
        assert_eq!(decode(UINT2, 0x3), 3.0);
    }

    #[test]
    fn narrowing_rounds_to_even_and_saturates_as_onnx_does() {
        // Ties between two codes go to the even mantissa.
        assert_eq!(narrow(FLOAT4E2M1, 2.5, true), 2.0);
        assert_eq!(narrow(FLOAT4E2M1, 3.5, true), 4.0);
        assert_eq!(narrow(FLOAT4E2M1, 0.25, true), 0.0);
        assert_eq!(narrow(FLOAT4E2M1, 0.75, true), 1.0);
        assert_eq!(narrow(FLOAT4E2M1, f64::INFINITY, false), 6.0);
        assert_eq!(
            narrow(FLOAT4E2M1, f64::NAN, true).to_bits(),
            (-0.0f64).to_bits()
        );
        assert_eq!(narrow(FLOAT8E4M3FN, 464.0, false), 448.0);
        assert!(narrow(FLOAT8E4M3FN, 470.0, false).is_nan());
        assert_eq!(narrow(FLOAT8E4M3FN, 470.0, true), 448.0);
        assert_eq!(narrow(FLOAT8E4M3FN, f64::NEG_INFINITY, true), -448.0);
        assert_eq!(narrow(FLOAT8E4M3FN, 0.4789254665374756, false), 0.46875);
        assert_eq!(narrow(FLOAT8E5M2, 1e9, false), f64::INFINITY);
        assert_eq!(narrow(FLOAT8E5M2, 470.0, false), 448.0);
        assert_eq!(narrow(FLOAT8E4M3FNUZ, -1e-7, false).to_bits(), 0);
        assert_eq!(
            narrow(FLOAT8E4M3FN, -1e-7, false).to_bits(),
            (-0.0f64).to_bits()
        );
        // Integers truncate and wrap.
        assert_eq!(narrow(INT4, -9.0, true), 7.0);
        assert_eq!(narrow(INT4, 8.0, true), -8.0);
        assert_eq!(narrow(INT4, -7.9, true), -7.0);
        assert_eq!(narrow(UINT2, -3.0, true), 1.0);
        assert_eq!(narrow(INT2, 2.0, true), -2.0);
        assert_eq!(narrow(UINT4, f64::NAN, true), 0.0);
    }

    #[test]
    fn packed_tensors_widen_and_bad_ones_are_refused() {
        let t = TensorProto {
            data_type: INT4,
            dims: vec![3],
            raw_data: vec![0x8f, 0x07],
            ..Default::default()
        };
        let w = widen(&t).expect("widen");
        assert_eq!(w.data_type, INT8);
        assert_eq!(w.raw_data, vec![0xff, 0xf8, 0x07]);
        let t = TensorProto {
            data_type: UINT2,
            dims: vec![5],
            int32_data: vec![0b1110_0100, 0b11],
            ..Default::default()
        };
        assert_eq!(widen(&t).expect("widen").raw_data, vec![0, 1, 2, 3, 3]);
        let t = TensorProto {
            data_type: FLOAT8E5M2,
            dims: vec![2],
            raw_data: vec![0x3c, 0xc0],
            ..Default::default()
        };
        let w = widen(&t).expect("widen");
        assert_eq!(w.data_type, FLOAT);
        let f: Vec<f32> = w
            .raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        assert_eq!(f, vec![1.0, -2.0]);
        // Too little data for the shape, no data at all, a negative dimension.
        for (dims, raw) in [
            (vec![5], vec![0u8; 2]),
            (vec![2], vec![]),
            (vec![-1], vec![0]),
        ] {
            let t = TensorProto {
                data_type: INT4,
                dims,
                raw_data: raw,
                ..Default::default()
            };
            assert!(widen(&t).is_none());
        }
        assert!(
            widen(&TensorProto {
                data_type: FLOAT,
                ..Default::default()
            })
            .is_none()
        );
    }
}
