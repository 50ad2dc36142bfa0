//! Update confidentiality: a device encrypts its update to a key the aggregator published for it
//! in the round announcement, so the broker (and anyone reading the broker's disk or a bridged
//! topic) sees only ciphertext. The envelope around the sealed payload is signed as usual.
//!
//! ring's X25519 private keys are single-use ([`ring::agreement::EphemeralPrivateKey`]); the
//! aggregator therefore holds one fresh key pair **per device and round** and lists the public
//! halves in the announcement ([`recipients`]). A device:
//!
//! 1. generates an ephemeral X25519 key pair,
//! 2. agrees with its recipient key → HKDF-SHA256 (salt [`SALT`], info = recipient key ‖ ephemeral
//!    key) → a 256-bit ChaCha20-Poly1305 key, used once (zero nonce),
//! 3. encrypts the postcard-encoded [`crate::msg::Update`] with the associated data
//!    `job ‖ 0 ‖ round ‖ device` ([`associated_data`]), so a ciphertext cannot be replayed into
//!    another job, round or device's envelope.
//!
//! The [`Sealed`] payload names the recipient key it was made for, so an aggregator that no
//! longer holds that key (a restart in between) refuses it without spending its current one.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// HKDF salt (domain separation).
pub const SALT: &[u8] = b"fedge-update-seal-v1";

/// Length of an X25519 public key.
pub const KEY_LEN: usize = 32;

/// Bytes a sealed update adds to its plaintext: two keys, the ciphertext's length prefix (at most
/// 5 bytes of varint) and the Poly1305 tag.
pub const OVERHEAD: usize = 2 * KEY_LEN + 5 + 16;

/// The payload of an encrypted [`crate::Kind::Update`] envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed<'a> {
    /// The aggregator key (from the announcement) this was sealed to.
    pub recipient: [u8; KEY_LEN],
    /// The device's ephemeral X25519 public key.
    pub ephemeral: [u8; KEY_LEN],
    /// ChaCha20-Poly1305 ciphertext of the encoded update, tag included.
    pub ciphertext: &'a [u8],
}

/// The associated data binding a sealed update to its job, round and sender.
#[cfg(feature = "alloc")]
pub fn associated_data(job: &str, round: u64, device: &str) -> alloc::vec::Vec<u8> {
    let mut aad = alloc::vec::Vec::with_capacity(job.len() + device.len() + 9);
    aad.extend_from_slice(job.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&round.to_le_bytes());
    aad.extend_from_slice(device.as_bytes());
    aad
}

/// Length of one [`recipients`] table entry for `device`.
#[cfg(feature = "alloc")]
fn entry_len(device: &str) -> usize {
    1 + device.len() + KEY_LEN
}

/// The recipient table of an announcement: for each device, `len(id) ‖ id ‖ key` (no allocation
/// needed to search it).
pub mod recipients {
    use super::KEY_LEN;
    #[cfg(feature = "alloc")]
    use super::entry_len;
    use crate::ProtoError;

    /// Appends the entry of `device` to `table`.
    ///
    /// # Errors
    /// [`ProtoError::BadId`] for an invalid device id.
    #[cfg(feature = "alloc")]
    pub fn push(
        table: &mut alloc::vec::Vec<u8>,
        device: &str,
        key: &[u8; KEY_LEN],
    ) -> Result<(), ProtoError> {
        crate::check_id(device)?;
        table.reserve(entry_len(device));
        table.push(device.len() as u8);
        table.extend_from_slice(device.as_bytes());
        table.extend_from_slice(key);
        Ok(())
    }

    /// The key listed for `device` in `table`, if any.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] for a table that does not parse to its end.
    pub fn find(table: &[u8], device: &str) -> Result<Option<[u8; KEY_LEN]>, ProtoError> {
        let mut found = None;
        let mut rest = table;
        while let Some((&n, tail)) = rest.split_first() {
            let n = usize::from(n);
            if tail.len() < n + KEY_LEN {
                return Err(ProtoError::Malformed);
            }
            let (id, tail) = tail.split_at(n);
            let (key, tail) = tail.split_at(KEY_LEN);
            if found.is_none() && id == device.as_bytes() {
                let mut k = [0u8; KEY_LEN];
                k.copy_from_slice(key);
                found = Some(k);
            }
            rest = tail;
        }
        Ok(found)
    }

    /// Number of entries in a well-formed `table`.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] for a table that does not parse to its end.
    pub fn count(table: &[u8]) -> Result<usize, ProtoError> {
        let mut n = 0;
        let mut rest = table;
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len) + KEY_LEN;
            if tail.len() < len {
                return Err(ProtoError::Malformed);
            }
            rest = &tail[len..];
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(feature = "std")]
fn aead_key(
    shared: &[u8],
    recipient: &[u8; KEY_LEN],
    ephemeral: &[u8; KEY_LEN],
) -> Result<ring::aead::LessSafeKey, ProtoError> {
    use ring::{aead, hkdf};
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(shared);
    let info = [recipient.as_slice(), ephemeral.as_slice()];
    let okm = prk
        .expand(&info, &aead::CHACHA20_POLY1305)
        .map_err(|_| ProtoError::Decrypt)?;
    Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
}

/// Encrypts the encoded update `plaintext` to `recipient` and returns the encoded [`Sealed`]
/// payload.
///
/// # Errors
/// [`ProtoError::Rng`] when the system random generator fails, [`ProtoError::BadKey`] for a
/// recipient key that is not a valid X25519 point.
#[cfg(feature = "std")]
pub fn seal(
    recipient: &[u8; KEY_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<alloc::vec::Vec<u8>, ProtoError> {
    use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
    let rng = ring::rand::SystemRandom::new();
    let private = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| ProtoError::Rng)?;
    let public = private.compute_public_key().map_err(|_| ProtoError::Rng)?;
    let mut ephemeral = [0u8; KEY_LEN];
    ephemeral.copy_from_slice(public.as_ref());
    let key = agreement::agree_ephemeral(
        private,
        &UnparsedPublicKey::new(&X25519, recipient),
        |shared| aead_key(shared, recipient, &ephemeral),
    )
    .map_err(|_| ProtoError::BadKey)??;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key([0; 12]),
        ring::aead::Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| ProtoError::Decrypt)?;
    crate::envelope::encode(&Sealed {
        recipient: *recipient,
        ephemeral,
        ciphertext: &buf,
    })
}

/// One recipient key pair: the aggregator's side of one device's sealed update in one round.
/// Opening consumes it (ring's X25519 private keys are single-use).
#[cfg(feature = "std")]
pub struct OpeningKey {
    private: ring::agreement::EphemeralPrivateKey,
    public: [u8; KEY_LEN],
}

#[cfg(feature = "std")]
impl core::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OpeningKey")
            .field("public", &crate::hex::encode32(&self.public).as_str())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "std")]
impl OpeningKey {
    /// A fresh key pair from the system random generator.
    ///
    /// # Errors
    /// [`ProtoError::Rng`].
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ProtoError> {
        use ring::agreement::{EphemeralPrivateKey, X25519};
        let private = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| ProtoError::Rng)?;
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(
            private
                .compute_public_key()
                .map_err(|_| ProtoError::Rng)?
                .as_ref(),
        );
        Ok(Self { private, public })
    }

    /// The public half, to list in the announcement.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// Decrypts `sealed` (made for this key) and returns the encoded update.
    ///
    /// # Errors
    /// [`ProtoError::Decrypt`] when the ciphertext, the associated data or the ephemeral key was
    /// altered or the update was sealed to another key.
    pub fn open(self, sealed: &Sealed<'_>, aad: &[u8]) -> Result<alloc::vec::Vec<u8>, ProtoError> {
        use ring::agreement::{self, UnparsedPublicKey, X25519};
        if !ring_eq(&sealed.recipient, &self.public) {
            return Err(ProtoError::Decrypt);
        }
        let public = self.public;
        let key = agreement::agree_ephemeral(
            self.private,
            &UnparsedPublicKey::new(&X25519, &sealed.ephemeral),
            |shared| aead_key(shared, &public, &sealed.ephemeral),
        )
        .map_err(|_| ProtoError::Decrypt)??;
        let mut buf = sealed.ciphertext.to_vec();
        let n = key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key([0; 12]),
                ring::aead::Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| ProtoError::Decrypt)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

/// Public keys are not secret, but compare them without branching on content anyway.
#[cfg(feature = "std")]
fn ring_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn key() -> OpeningKey {
        OpeningKey::generate(&ring::rand::SystemRandom::new()).expect("key")
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let k = key();
        let aad = associated_data("job", 3, "dev-1");
        let msg = b"the update: job name and delta bytes".repeat(4);
        let wire = seal(k.public(), &aad, &msg).expect("seal");
        assert!(!wire.windows(16).any(|w| msg.windows(16).any(|m| m == w)));
        let s: Sealed<'_> = crate::envelope::decode(&wire).expect("decode");
        assert_eq!(&s.recipient, k.public());
        assert!(wire.len() <= msg.len() + OVERHEAD);
        assert_eq!(k.open(&s, &aad).expect("open"), msg);
    }

    #[test]
    fn any_change_is_refused() {
        let msg = b"0123456789abcdef".to_vec();
        let aad = associated_data("job", 3, "dev-1");
        let other_aads = [
            associated_data("job", 4, "dev-1"),
            associated_data("job", 3, "dev-2"),
            associated_data("jo", 3, "bdev-1"),
        ];
        for case in 0..6 {
            let k = key();
            let wire = seal(k.public(), &aad, &msg).expect("seal");
            let mut s: Sealed<'_> = crate::envelope::decode(&wire).expect("decode");
            let mut ct = s.ciphertext.to_vec();
            let mut use_aad = aad.clone();
            match case {
                0 => ct[0] ^= 1,
                1 => *ct.last_mut().expect("tag") ^= 0x80,
                2 => s.ephemeral[5] ^= 1,
                3 => s.recipient[0] ^= 1,
                4 => use_aad = other_aads[0].clone(),
                _ => use_aad = other_aads[1].clone(),
            }
            s.ciphertext = &ct;
            assert_eq!(
                k.open(&s, &use_aad),
                Err(ProtoError::Decrypt),
                "case {case}"
            );
        }
        assert_ne!(aad, other_aads[2], "ids are separated");
        // Sealed to another key.
        let (a, b) = (key(), key());
        let wire = seal(a.public(), &aad, &msg).expect("seal");
        let mut s: Sealed<'_> = crate::envelope::decode(&wire).expect("decode");
        s.recipient = *b.public();
        assert_eq!(b.open(&s, &aad), Err(ProtoError::Decrypt));
    }

    #[test]
    fn a_low_order_recipient_key_is_refused() {
        assert_eq!(
            seal(&[0u8; KEY_LEN], b"", b"x").map(|_| ()),
            Err(ProtoError::BadKey)
        );
    }

    #[test]
    fn recipient_tables() {
        let mut t = Vec::new();
        recipients::push(&mut t, "a", &[1; KEY_LEN]).expect("push");
        recipients::push(&mut t, "dev-22", &[2; KEY_LEN]).expect("push");
        assert_eq!(recipients::count(&t), Ok(2));
        assert_eq!(recipients::find(&t, "dev-22"), Ok(Some([2; KEY_LEN])));
        assert_eq!(recipients::find(&t, "a"), Ok(Some([1; KEY_LEN])));
        assert_eq!(recipients::find(&t, "dev-2"), Ok(None));
        assert_eq!(recipients::find(&[], "a"), Ok(None));
        assert!(recipients::push(&mut t, "a/b", &[0; KEY_LEN]).is_err());
        for cut in 1..t.len() {
            if cut == 1 + "a".len() + KEY_LEN {
                continue;
            }
            assert_eq!(
                recipients::find(&t[..cut], "zz"),
                Err(ProtoError::Malformed),
                "{cut}"
            );
        }
    }
}
