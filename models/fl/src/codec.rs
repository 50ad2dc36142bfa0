//! Update codecs: f32, f16 and int8 with one f32 scale per block.
//!
//! Every encoding starts with an 8-byte little-endian header:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | codec id: 1 = f32, 2 = f16, 3 = int8-block |
//! | 1 | format version, 1 |
//! | 2..4 | u16 block size (0 for f32 and f16, 1..=65535 for int8) |
//! | 4..8 | u32 value count `n` |
//!
//! then the body: `n` f32 (f32), `n` f16 bits (f16), or `⌈n / block⌉` f32 scales followed by
//! `n` i8 (int8-block). [`decode`] checks the whole buffer against the header before
//! allocating, so a short, long or lying buffer is an error, never a panic or a huge allocation.
//!
//! Error bounds, per value `x` and decoded `x̂`:
//! - f32: exact.
//! - f16: `|x − x̂| ≤ |x|·2⁻¹¹` for `|x| ≥ 2⁻¹⁴`, `≤ 2⁻²⁵` below; `|x| > 65504` is refused.
//! - int8-block: `|x − x̂| ≤ s/2 + ulp(x)` with the block's scale `s = max|x_block| / 127`, so
//!   at most `max|x_block| / 254` plus f32 rounding.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::FlError;
use crate::vector::check_finite;

/// Bytes in the header.
pub const HEADER_LEN: usize = 8;
/// The int8 block size of [`Codec::int8`].
pub const DEFAULT_BLOCK: u16 = 256;
const VERSION: u8 = 1;
const F32_ID: u8 = 1;
const F16_ID: u8 = 2;
const INT8_ID: u8 = 3;

/// An update encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Little-endian f32, lossless.
    F32,
    /// IEEE half precision.
    F16,
    /// Symmetric int8 with one f32 scale (`max|x| / 127`) per `block` values.
    Int8Block { block: u16 },
}

impl Codec {
    /// int8 with [`DEFAULT_BLOCK`]-value blocks.
    pub const fn int8() -> Self {
        Self::Int8Block {
            block: DEFAULT_BLOCK,
        }
    }

    /// The id written in the header.
    pub const fn id(self) -> u8 {
        match self {
            Self::F32 => F32_ID,
            Self::F16 => F16_ID,
            Self::Int8Block { .. } => INT8_ID,
        }
    }

    /// The encoded size of `n` values, header included.
    pub fn encoded_len(self, n: usize) -> u64 {
        let n = n as u64;
        HEADER_LEN as u64
            + match self {
                Self::F32 => 4 * n,
                Self::F16 => 2 * n,
                Self::Int8Block { block } => 4 * n.div_ceil(u64::from(block.max(1))) + n,
            }
    }

    /// Encodes `values` with a header.
    ///
    /// # Errors
    /// [`FlError::NonFiniteValue`] for NaN or ±Inf, [`FlError::OutOfRange`] for an f16 value
    /// beyond ±65504, [`FlError::TooManyValues`] past `u32::MAX` values,
    /// [`FlError::InvalidBlockSize`] for an int8 block of 0.
    pub fn encode(self, values: &[f32]) -> Result<Vec<u8>, FlError> {
        check_finite(values)?;
        let n = u32::try_from(values.len()).map_err(|_| FlError::TooManyValues {
            len: values.len(),
            max: u32::MAX as usize,
        })?;
        let block = match self {
            Self::Int8Block { block: 0 } => {
                return Err(FlError::InvalidBlockSize {
                    codec: INT8_ID,
                    block: 0,
                });
            }
            Self::Int8Block { block } => block,
            Self::F32 | Self::F16 => 0,
        };
        let mut out =
            Vec::with_capacity(usize::try_from(self.encoded_len(values.len())).unwrap_or(0));
        out.extend_from_slice(&[self.id(), VERSION]);
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => encode_f16(values, &mut out)?,
            Self::Int8Block { .. } => encode_int8(values, usize::from(block), &mut out),
        }
        Ok(out)
    }
}

fn encode_f16(values: &[f32], out: &mut Vec<u8>) -> Result<(), FlError> {
    for (index, &value) in values.iter().enumerate() {
        let h = f16::from_f32(value);
        if h.is_infinite() {
            return Err(FlError::OutOfRange { index, value });
        }
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(())
}

fn encode_int8(values: &[f32], block: usize, out: &mut Vec<u8>) {
    let scales: Vec<f32> = values
        .chunks(block)
        .map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0)
        .collect();
    scales
        .iter()
        .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
    for (b, &scale) in values.chunks(block).zip(&scales) {
        for &x in b {
            // f64 keeps x / scale finite even when scale is subnormal.
            let q = if scale > 0.0 {
                (f64::from(x) / f64::from(scale)).round()
            } else {
                0.0
            };
            out.push((q.clamp(-127.0, 127.0) as i8).to_le_bytes()[0]);
        }
    }
}

/// The codec and value count an encoded buffer declares, after checking its header.
///
/// # Errors
/// [`FlError::Truncated`] for fewer than [`HEADER_LEN`] bytes, [`FlError::UnknownCodec`],
/// [`FlError::UnsupportedVersion`], [`FlError::InvalidBlockSize`].
pub fn header(bytes: &[u8]) -> Result<(Codec, usize), FlError> {
    let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(FlError::Truncated {
            expected: HEADER_LEN as u64,
            got: bytes.len(),
        });
    };
    let (id, version) = (h[0], h[1]);
    let block = u16::from_le_bytes([h[2], h[3]]);
    let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if !matches!(id, F32_ID | F16_ID | INT8_ID) {
        return Err(FlError::UnknownCodec(id));
    }
    if version != VERSION {
        return Err(FlError::UnsupportedVersion(version));
    }
    let codec = match (id, block) {
        (F32_ID, 0) => Codec::F32,
        (F16_ID, 0) => Codec::F16,
        (INT8_ID, b) if b > 0 => Codec::Int8Block { block: b },
        _ => return Err(FlError::InvalidBlockSize { codec: id, block }),
    };
    Ok((codec, n))
}

/// Decodes a buffer made by [`Codec::encode`].
///
/// # Errors
/// The [`header`] errors; [`FlError::Truncated`] or [`FlError::TrailingBytes`] when the
/// buffer's length differs from the header's; [`FlError::InvalidScale`] for a negative or
/// non-finite int8 scale; [`FlError::NonFiniteValue`] for a NaN or ±Inf f32 or f16 value.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, FlError> {
    let (codec, n) = header(bytes)?;
    let expected = codec.encoded_len(n);
    let got = bytes.len();
    if (got as u64) < expected {
        return Err(FlError::Truncated { expected, got });
    }
    if (got as u64) > expected {
        return Err(FlError::TrailingBytes { expected, got });
    }
    let body = &bytes[HEADER_LEN..];
    let values: Vec<f32> = match codec {
        Codec::F32 => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Codec::F16 => body
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Codec::Int8Block { block } => decode_int8(body, n, usize::from(block))?,
    };
    check_finite(&values)?;
    Ok(values)
}

fn decode_int8(body: &[u8], n: usize, block: usize) -> Result<Vec<f32>, FlError> {
    let (scale_bytes, q) = body.split_at(4 * n.div_ceil(block));
    let mut out = Vec::with_capacity(n);
    for (i, (s, b)) in scale_bytes.chunks_exact(4).zip(q.chunks(block)).enumerate() {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(FlError::InvalidScale { block: i });
        }
        out.extend(b.iter().map(|&q| f32::from(i8::from_le_bytes([q])) * scale));
    }
    Ok(out)
}
