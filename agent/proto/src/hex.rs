//! Lower-case hex for keys and digests, without allocation.

use crate::ProtoError;

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lower-case hex into `out` (which must be `2 * bytes.len()` long) and returns
/// it as a `&str`.
pub fn encode<'o>(bytes: &[u8], out: &'o mut [u8]) -> Result<&'o str, ProtoError> {
    if out.len() < bytes.len() * 2 {
        return Err(ProtoError::BufferFull);
    }
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    core::str::from_utf8(&out[..bytes.len() * 2]).map_err(|_| ProtoError::Malformed)
}

/// Hex of a 32-byte digest or key, as a fixed-capacity string.
pub fn encode32(bytes: &[u8; 32]) -> heapless::String<64> {
    let mut buf = [0u8; 64];
    let mut s = heapless::String::new();
    if let Ok(text) = encode(bytes, &mut buf) {
        // Capacity is exactly 64: cannot fail.
        let _ = s.push_str(text);
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn decode<const N: usize>(text: &str) -> Result<[u8; N], ProtoError> {
    let t = text.trim().as_bytes();
    if t.len() != 2 * N {
        return Err(ProtoError::Malformed);
    }
    let mut out = [0u8; N];
    for (i, pair) in t.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn nibble(c: u8) -> Result<u8, ProtoError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(ProtoError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let k = [0xabu8; 32];
        let h = encode32(&k);
        assert_eq!(&h[..4], "abab");
        assert_eq!(decode::<32>(&h).expect("hex"), k);
        assert_eq!(decode::<2>("zz00"), Err(ProtoError::Malformed));
        assert_eq!(decode::<2>("00"), Err(ProtoError::Malformed));
    }
}
