//! Byte layouts of parameter vectors: the global model on the wire and in the store is the
//! concatenation of its f32 values, little-endian.

/// Little-endian bytes of `values`.
pub fn f32_to_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The f32 values of little-endian `bytes` (a trailing partial value is ignored).
pub fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// sha256 of the model's wire bytes ([`f32_to_le`]): the `ModelRef::sha256` of a version.
pub fn model_sha256(values: &[f32]) -> [u8; 32] {
    fedge_proto::chunk::sha256(&f32_to_le(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_round_trip() {
        let v = [1.0f32, -2.5, f32::INFINITY, 0.0];
        assert_eq!(f32_from_le(&f32_to_le(&v)), v);
        assert_eq!(f32_to_le(&[1.0])[..], [0, 0, 0x80, 0x3f]);
    }
}
