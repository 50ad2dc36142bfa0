//! Update codecs: round trips within the documented error bounds, and typed errors for every
//! malformed buffer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedge_fl::FlError;
use fedge_fl::codec::{Codec, DEFAULT_BLOCK, HEADER_LEN, decode, header};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Weights spanning several magnitudes, with zeros and a partial last block.
fn weights(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| match i % 7 {
            0 => 0.0,
            1 => rng.random_range(-1e-3f32..1e-3),
            2 => rng.random_range(-100.0f32..100.0),
            _ => rng.random_range(-1.0f32..1.0),
        })
        .collect()
}

fn codecs() -> [Codec; 4] {
    [
        Codec::F32,
        Codec::F16,
        Codec::int8(),
        Codec::Int8Block { block: 7 },
    ]
}

#[test]
fn encoded_length_matches_the_header_arithmetic() {
    let x = weights(1, 1000);
    for codec in codecs() {
        let bytes = codec.encode(&x).unwrap();
        assert_eq!(bytes.len() as u64, codec.encoded_len(x.len()), "{codec:?}");
        assert_eq!(header(&bytes).unwrap(), (codec, 1000));
    }
    assert_eq!(Codec::int8().encoded_len(1000), 8 + 4 * 4 + 1000);
}

#[test]
fn f32_round_trips_exactly() {
    let x = weights(2, 1001);
    assert_eq!(decode(&Codec::F32.encode(&x).unwrap()).unwrap(), x);
    assert_eq!(
        decode(&Codec::F32.encode(&[]).unwrap()).unwrap(),
        Vec::<f32>::new()
    );
}

#[test]
fn f16_error_is_within_half_an_f16_ulp() {
    let x = weights(3, 5000);
    let y = decode(&Codec::F16.encode(&x).unwrap()).unwrap();
    let mut worst_rel = 0.0f32;
    for (a, b) in x.iter().zip(&y) {
        let err = (a - b).abs();
        let bound = if a.abs() >= 2f32.powi(-14) {
            a.abs() * 2f32.powi(-11)
        } else {
            2f32.powi(-25)
        };
        assert!(err <= bound, "{a} -> {b}");
        if a.abs() >= 2f32.powi(-14) {
            worst_rel = worst_rel.max(err / a.abs());
        }
    }
    eprintln!("f16: worst relative error {worst_rel:e} (bound 2^-11 = 4.88e-4)");
    assert!(
        worst_rel > 2f32.powi(-12),
        "suspiciously exact: {worst_rel}"
    );
}

#[test]
fn int8_error_is_within_half_a_block_scale() {
    let x = weights(4, 5000);
    for block in [1u16, 7, 64, DEFAULT_BLOCK, 4096] {
        let y = decode(&Codec::Int8Block { block }.encode(&x).unwrap()).unwrap();
        let mut worst = 0.0f32;
        for (xs, ys) in x
            .chunks(usize::from(block))
            .zip(y.chunks(usize::from(block)))
        {
            let max = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let bound = max / 254.0 * (1.0 + 1e-5);
            for (a, b) in xs.iter().zip(ys) {
                assert!(
                    (a - b).abs() <= bound,
                    "block {block}: {a} -> {b}, bound {bound}"
                );
                if max > 0.0 {
                    worst = worst.max((a - b).abs() / max);
                }
            }
        }
        eprintln!("int8 block {block}: worst error {worst:e} × block max (bound 1/254 = 3.94e-3)");
    }
}

#[test]
fn int8_keeps_zero_blocks_and_block_maxima_exact_in_sign() {
    let mut x = vec![0.0f32; 300];
    x[260] = -2.5;
    let y = decode(&Codec::int8().encode(&x).unwrap()).unwrap();
    assert!(y[..256].iter().all(|v| *v == 0.0));
    assert!((y[260] + 2.5).abs() <= 2.5 / 254.0);
}

#[test]
fn encode_refuses_non_finite_and_out_of_range_values() {
    for codec in codecs() {
        assert_eq!(
            codec.encode(&[1.0, f32::NAN]),
            Err(FlError::NonFiniteValue { index: 1 })
        );
        assert_eq!(
            codec.encode(&[f32::INFINITY]),
            Err(FlError::NonFiniteValue { index: 0 })
        );
    }
    assert_eq!(
        Codec::F16.encode(&[1.0, 70000.0]),
        Err(FlError::OutOfRange {
            index: 1,
            value: 70000.0
        })
    );
    assert!(Codec::F16.encode(&[65504.0, -65504.0]).is_ok());
    assert_eq!(
        Codec::Int8Block { block: 0 }.encode(&[1.0]),
        Err(FlError::InvalidBlockSize { codec: 3, block: 0 })
    );
}

#[test]
fn truncated_and_oversized_buffers_are_typed_errors() {
    let x = weights(5, 300);
    for codec in codecs() {
        let bytes = codec.encode(&x).unwrap();
        let expected = bytes.len() as u64;
        for cut in [0, 3, HEADER_LEN, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            let short = if cut < HEADER_LEN {
                HEADER_LEN as u64
            } else {
                expected
            };
            assert_eq!(
                err,
                FlError::Truncated {
                    expected: short,
                    got: cut
                },
                "{codec:?}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(FlError::TrailingBytes {
                expected,
                got: long.len()
            })
        );
    }
}

#[test]
fn a_lying_header_cannot_make_decode_allocate() {
    let mut bytes = Codec::F32.encode(&[1.0, 2.0]).unwrap();
    bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let expected = 8 + 4 * u64::from(u32::MAX);
    assert_eq!(
        decode(&bytes),
        Err(FlError::Truncated { expected, got: 16 })
    );
}

#[test]
fn bad_headers_are_typed_errors() {
    let good = Codec::int8().encode(&[1.0, -1.0]).unwrap();
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        decode(&b).unwrap_err()
    };
    assert_eq!(with(0, 9), FlError::UnknownCodec(9));
    assert_eq!(with(1, 2), FlError::UnsupportedVersion(2));
    assert_eq!(with(3, 0), FlError::InvalidBlockSize { codec: 3, block: 0 });
    let mut f32_with_block = Codec::F32.encode(&[1.0]).unwrap();
    f32_with_block[2] = 4;
    assert_eq!(
        decode(&f32_with_block),
        Err(FlError::InvalidBlockSize { codec: 1, block: 4 })
    );
}

#[test]
fn nan_negative_or_infinite_int8_scales_are_rejected() {
    let good = Codec::Int8Block { block: 2 }
        .encode(&[1.0, -1.0, 0.5, 0.25])
        .unwrap();
    for bad in [f32::NAN, -1.0, f32::INFINITY] {
        let mut b = good.clone();
        b[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(decode(&b), Err(FlError::InvalidScale { block: 1 }), "{bad}");
    }
}

#[test]
fn non_finite_f32_and_f16_payloads_are_rejected() {
    let mut b = Codec::F32.encode(&[1.0, 2.0]).unwrap();
    b[HEADER_LEN + 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(decode(&b), Err(FlError::NonFiniteValue { index: 1 }));
    let mut h = Codec::F16.encode(&[1.0, 2.0]).unwrap();
    h[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&0x7c00u16.to_le_bytes()); // f16 +Inf
    assert_eq!(decode(&h), Err(FlError::NonFiniteValue { index: 0 }));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..20_000 {
        let len = rng.random_range(0..40);
        let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 2 {
            b[0] = rng.random_range(0..5);
            b[1] = 1;
        }
        let _ = decode(&b);
    }
}
