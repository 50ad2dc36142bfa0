//! The signed envelope around every message.
//!
//! Wire form: `body || signature`, where `body` is the postcard encoding of [`Envelope`] (protocol
//! version, kind, sender, sequence, round, payload) and `signature` is the 64-byte Ed25519
//! signature of `body` by the sender's key. Receivers bound the length first, decode without
//! copying ([`Envelope::open`]), look the sender up, and only a verified envelope
//! ([`Unverified::verify`]) exposes its payload.

use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, Signer};
use crate::{PROTOCOL_VERSION, ProtoError, SIGNATURE_LEN, check_id};

/// What the payload is. Encoded as its index: append new kinds at the end only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`crate::msg::Status`], retained on `dev/{device}/status`.
    Status,
    /// [`crate::msg::Telemetry`] on `dev/{device}/telemetry`.
    Telemetry,
    /// [`crate::msg::Command`] on `dev/{device}/cmd`, signed by the operator.
    Command,
    /// [`crate::msg::RoundAnnounce`], retained on `job/{job}/round`.
    RoundAnnounce,
    /// [`crate::chunk::Chunk`] of a model or bundle.
    Chunk,
    /// [`crate::msg::Update`] on `job/{job}/update/{device}`.
    Update,
    /// [`crate::msg::Ack`] of an update or command, on `dev/{device}/cmd`.
    Ack,
    /// [`crate::msg::Bundle`]: a model release signed by the operator (carried in chunks).
    Bundle,
    /// [`crate::msg::SecAggMsg`]: a secure-aggregation message, from a device on
    /// `job/{job}/update/{device}` or relayed by the aggregator on `dev/{device}/cmd`.
    SecAgg,
    /// [`crate::msg::AggregatorCert`]: the operator certifies an aggregator key, retained on
    /// `aggregator`.
    Certificate,
}

/// A decoded envelope. The payload is the postcard encoding of the message its [`Kind`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    pub kind: Kind,
    /// Who signed it: a device id, or an operator / aggregator id.
    pub sender: &'a str,
    /// Strictly increasing per sender (see [`crate::replay`]).
    pub seq: u64,
    /// The FL round this message belongs to, 0 outside rounds.
    pub round: u64,
    pub payload: &'a [u8],
}

/// An envelope whose shape is valid but whose signature has not been checked yet. Only
/// [`Unverified::verify`] hands out the payload.
#[derive(Debug, Clone, Copy)]
pub struct Unverified<'a> {
    env: Envelope<'a>,
    body: &'a [u8],
    signature: &'a [u8],
}

impl<'a> Unverified<'a> {
    /// The claimed sender, to look its key up.
    pub fn sender(&self) -> &'a str {
        self.env.sender
    }
    pub fn kind(&self) -> Kind {
        self.env.kind
    }
    pub fn seq(&self) -> u64 {
        self.env.seq
    }
    /// The payload before its signature is checked. Only for a holder that cannot check it and
    /// relays it (an aggregator sanity-checking the operator's certificate of its own key before
    /// publishing it): never act on what it says.
    pub fn claimed_payload(&self) -> &'a [u8] {
        self.env.payload
    }

    /// Checks the signature with the sender's key and returns the envelope.
    pub fn verify(&self, key: &PublicKey) -> Result<Envelope<'a>, ProtoError> {
        key.verify(self.body, self.signature)?;
        Ok(self.env)
    }

    /// For a message that names its own key (a device's `Status`): `key_of` reads the key from
    /// the unverified payload, and the envelope is returned only if that key signed it. This
    /// binds the message to the key, not the key to the sender: check the key against a registry
    /// before trusting the sender's identity.
    pub fn verify_self_signed(
        &self,
        key_of: impl FnOnce(&'a [u8]) -> Option<PublicKey>,
    ) -> Result<Envelope<'a>, ProtoError> {
        let key = key_of(self.env.payload).ok_or(ProtoError::Malformed)?;
        self.verify(&key)
    }
}

impl<'a> Envelope<'a> {
    /// A new envelope of the current protocol version.
    pub fn new(kind: Kind, sender: &'a str, seq: u64, round: u64, payload: &'a [u8]) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            kind,
            sender,
            seq,
            round,
            payload,
        }
    }

    /// Encodes and signs into `out`; returns the wire length.
    pub fn seal_into(&self, signer: &Signer, out: &mut [u8]) -> Result<usize, ProtoError> {
        check_id(self.sender)?;
        let n = postcard::to_slice(self, out)?.len();
        let sig = signer.sign(&out[..n]);
        out.get_mut(n..n + SIGNATURE_LEN)
            .ok_or(ProtoError::BufferFull)?
            .copy_from_slice(&sig);
        Ok(n + SIGNATURE_LEN)
    }

    /// Encodes and signs into a new vector.
    #[cfg(feature = "alloc")]
    pub fn seal(&self, signer: &Signer) -> Result<alloc::vec::Vec<u8>, ProtoError> {
        check_id(self.sender)?;
        let mut out = postcard::to_allocvec(self)?;
        let sig = signer.sign(&out);
        out.extend_from_slice(&sig);
        Ok(out)
    }

    /// Bounds, splits and decodes `wire` without copying. `max_len` is checked before anything
    /// is decoded.
    pub fn open(wire: &'a [u8], max_len: usize) -> Result<Unverified<'a>, ProtoError> {
        if wire.len() > max_len {
            return Err(ProtoError::Oversize {
                len: wire.len(),
                max: max_len,
            });
        }
        // version, kind, sender length, seq, round, payload length: at least 6 bytes.
        if wire.len() < SIGNATURE_LEN + 6 {
            return Err(ProtoError::Malformed);
        }
        let (body, signature) = wire.split_at(wire.len() - SIGNATURE_LEN);
        // The version is the first byte (a varint below 128): check it before the rest so a
        // future version's layout is reported as such, not as garbage.
        if body[0] != PROTOCOL_VERSION {
            return Err(ProtoError::Version { got: body[0] });
        }
        let (env, rest): (Envelope<'a>, _) = postcard::take_from_bytes(body)?;
        if !rest.is_empty() {
            return Err(ProtoError::Malformed);
        }
        check_id(env.sender)?;
        Ok(Unverified {
            env,
            body,
            signature,
        })
    }
}

/// Decodes a payload of type `T` (borrowing from it), rejecting trailing bytes.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtoError> {
    let (v, rest) = postcard::take_from_bytes(payload)?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(ProtoError::Malformed)
    }
}

/// Encodes a payload into `out`; returns the used prefix.
pub fn encode_into<'o, T: Serialize>(
    value: &T,
    out: &'o mut [u8],
) -> Result<&'o mut [u8], ProtoError> {
    Ok(postcard::to_slice(value, out)?)
}

/// Encodes a payload into a new vector.
#[cfg(feature = "alloc")]
pub fn encode<T: Serialize>(value: &T) -> Result<alloc::vec::Vec<u8>, ProtoError> {
    Ok(postcard::to_allocvec(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let mut doc = [0u8; 128];
        let n = Signer::generate_pkcs8(&mut doc).expect("keygen");
        Signer::from_pkcs8(&doc[..n]).expect("load")
    }

    #[test]
    fn seal_open_verify_without_alloc() {
        let s = signer();
        let mut buf = [0u8; 256];
        let env = Envelope::new(Kind::Telemetry, "dev-1", 7, 3, b"payload");
        let n = env.seal_into(&s, &mut buf).expect("seal");
        let u = Envelope::open(&buf[..n], 256).expect("open");
        assert_eq!(
            (u.sender(), u.kind(), u.seq()),
            ("dev-1", Kind::Telemetry, 7)
        );
        assert_eq!(u.verify(&s.public_key()), Ok(env));
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let s = signer();
        let mut buf = [0u8; 128];
        let n = Envelope::new(Kind::Update, "dev-1", 1, 1, b"abc")
            .seal_into(&s, &mut buf)
            .expect("seal");
        for i in 0..n * 8 {
            let mut w = buf;
            w[i / 8] ^= 1 << (i % 8);
            let r = Envelope::open(&w[..n], 128).and_then(|u| u.verify(&s.public_key()));
            assert!(r.is_err(), "bit {i} flipped but accepted");
        }
    }

    #[test]
    fn bounds_and_garbage() {
        let s = signer();
        let mut buf = [0u8; 128];
        let n = Envelope::new(Kind::Ack, "agg", 1, 0, b"")
            .seal_into(&s, &mut buf)
            .expect("seal");
        assert_eq!(
            Envelope::open(&buf[..n], n - 1).err(),
            Some(ProtoError::Oversize { len: n, max: n - 1 })
        );
        assert_eq!(
            Envelope::open(&buf[..10], 128).err(),
            Some(ProtoError::Malformed)
        );
        let mut v2 = buf;
        v2[0] = 2;
        assert_eq!(
            Envelope::open(&v2[..n], 128).err(),
            Some(ProtoError::Version { got: 2 })
        );
        // Wrong signer.
        let other = signer();
        let u = Envelope::open(&buf[..n], 128).expect("open");
        assert_eq!(u.verify(&other.public_key()), Err(ProtoError::BadSignature));
        // Bad sender id is refused on both sides.
        assert_eq!(
            Envelope::new(Kind::Ack, "a/b", 1, 0, b"").seal_into(&s, &mut buf),
            Err(ProtoError::BadId)
        );
        // Too small an output buffer.
        let mut small = [0u8; 40];
        assert_eq!(
            Envelope::new(Kind::Ack, "agg", 1, 0, &[0; 8]).seal_into(&s, &mut small),
            Err(ProtoError::BufferFull)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let mut w = [0u8; 300];
            for b in w.iter_mut().take(len) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            w[0] = PROTOCOL_VERSION;
            let _ = Envelope::open(&w[..len], 300);
        }
    }
}
