//! The SecAgg+ messages, their signatures and their byte encoding.
//!
//! Every message a device sends is signed with its Ed25519 key over
//! `"fedge-secagg-v1" ‖ kind ‖ round hash ‖ fields`, so a message cannot be moved to another
//! round, stage, sender or recipient, and the aggregator, which relays everything, cannot
//! forge or alter one. Key advertisements and share ciphertexts are signed one by one, so the
//! aggregator forwards each device only what is addressed to it and the device can still check
//! who wrote it. Integers are little-endian.

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use super::{SecAggError, Stage};

const DOMAIN: &[u8] = b"fedge-secagg-v1";

/// Stage 1: a device's X25519 public key for one neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKey {
    pub from: u32,
    pub to: u32,
    pub public: [u8; 32],
    pub signature: [u8; 64],
}

/// Stage 2: the shares a device gives one neighbour, encrypted to it, with commitments the
/// aggregator can check revealed shares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareItem {
    pub from: u32,
    pub to: u32,
    /// SHA-256 commitment to the self-mask seed share inside the ciphertext.
    pub commit_self: [u8; 32],
    /// SHA-256 commitment to the pairwise seed shares inside the ciphertext.
    pub commit_pair: [u8; 32],
    /// ChaCha20-Poly1305 ciphertext and tag.
    pub ciphertext: Vec<u8>,
    pub signature: [u8; 64],
}

/// Stage 3: the masked, quantised update, bit-packed at the round's modulus width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    pub from: u32,
    pub data: Vec<u8>,
    pub signature: [u8; 64],
}

/// Which secret of `owner` a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevealKind {
    /// The owner sent its masked input: its self-mask seed share.
    SelfMask,
    /// The owner dropped after sharing: its pairwise seed shares.
    PairMasks,
}

/// One revealed share (or set of pairwise shares) of `owner`'s secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reveal {
    pub owner: u32,
    pub kind: RevealKind,
    pub bytes: Vec<u8>,
}

/// Stage 5: the shares a device reveals so the aggregator can remove the masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reveals {
    pub from: u32,
    pub reveals: Vec<Reveal>,
    pub signature: [u8; 64],
}

/// Stage 4: a device's signature over the survivor list (U3) it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub from: u32,
    pub signature: [u8; 64],
}

impl Confirmation {
    pub(crate) fn body(round: &[u8; 32], survivors: &[u32]) -> Vec<u8> {
        let mut b = header(5, round);
        b.extend_from_slice(&encode_ids(survivors));
        b
    }
}

/// Encodes consistency-check signatures (a device's, or the set the aggregator relays).
pub fn encode_confirmations(c: &[Confirmation]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + c.len() * 68);
    b.extend_from_slice(&(c.len() as u32).to_le_bytes());
    for x in c {
        b.extend_from_slice(&x.from.to_le_bytes());
        b.extend_from_slice(&x.signature);
    }
    b
}

/// # Errors
/// [`SecAggError::Malformed`] on truncated, oversized or trailing input.
pub fn decode_confirmations(bytes: &[u8]) -> Result<Vec<Confirmation>, SecAggError> {
    let mut r = Reader { bytes };
    let n = r.count(68)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Confirmation {
            from: r.u32()?,
            signature: r.array()?,
        });
    }
    r.end()?;
    Ok(out)
}

pub(crate) fn sign(signer: &Ed25519KeyPair, body: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    out.copy_from_slice(signer.sign(body).as_ref());
    out
}

pub(crate) fn public_key(signer: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(signer.public_key().as_ref());
    out
}

pub(crate) fn verify(
    key: &[u8; 32],
    body: &[u8],
    sig: &[u8; 64],
    stage: Stage,
    claimed: u32,
) -> Result<(), SecAggError> {
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(body, sig)
        .map_err(|_| SecAggError::BadSignature { stage, claimed })
}

fn header(kind: u8, round: &[u8; 32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(DOMAIN);
    b.push(kind);
    b.extend_from_slice(round);
    b
}

impl SignedKey {
    pub(crate) fn body(round: &[u8; 32], from: u32, to: u32, public: &[u8; 32]) -> Vec<u8> {
        let mut b = header(1, round);
        b.extend_from_slice(&from.to_le_bytes());
        b.extend_from_slice(&to.to_le_bytes());
        b.extend_from_slice(public);
        b
    }

    pub(crate) fn signed_body(&self, round: &[u8; 32]) -> Vec<u8> {
        Self::body(round, self.from, self.to, &self.public)
    }
}

impl ShareItem {
    pub(crate) fn body(
        round: &[u8; 32],
        from: u32,
        to: u32,
        commit_self: &[u8; 32],
        commit_pair: &[u8; 32],
        ciphertext: &[u8],
    ) -> Vec<u8> {
        let mut b = header(2, round);
        b.extend_from_slice(&from.to_le_bytes());
        b.extend_from_slice(&to.to_le_bytes());
        b.extend_from_slice(commit_self);
        b.extend_from_slice(commit_pair);
        b.extend_from_slice(ciphertext);
        b
    }

    pub(crate) fn signed_body(&self, round: &[u8; 32]) -> Vec<u8> {
        Self::body(
            round,
            self.from,
            self.to,
            &self.commit_self,
            &self.commit_pair,
            &self.ciphertext,
        )
    }
}

impl MaskedInput {
    pub(crate) fn body(round: &[u8; 32], from: u32, data: &[u8]) -> Vec<u8> {
        let mut b = header(3, round);
        b.extend_from_slice(&from.to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    pub(crate) fn signed_body(&self, round: &[u8; 32]) -> Vec<u8> {
        Self::body(round, self.from, &self.data)
    }
}

impl Reveals {
    pub(crate) fn body(round: &[u8; 32], from: u32, reveals: &[Reveal]) -> Vec<u8> {
        let mut b = header(4, round);
        b.extend_from_slice(&from.to_le_bytes());
        encode_reveals(&mut b, reveals);
        b
    }

    pub(crate) fn signed_body(&self, round: &[u8; 32]) -> Vec<u8> {
        Self::body(round, self.from, &self.reveals)
    }
}

fn encode_reveals(b: &mut Vec<u8>, reveals: &[Reveal]) {
    b.extend_from_slice(&(reveals.len() as u32).to_le_bytes());
    for r in reveals {
        b.extend_from_slice(&r.owner.to_le_bytes());
        b.push(match r.kind {
            RevealKind::SelfMask => 0,
            RevealKind::PairMasks => 1,
        });
        b.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&r.bytes);
    }
}

/// A bounds-checked reader: every short read is [`SecAggError::Malformed`].
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SecAggError> {
        if self.bytes.len() < n {
            return Err(SecAggError::Malformed {
                reason: format!("truncated: {n} bytes needed, {} left", self.bytes.len()),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, SecAggError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SecAggError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A count of items each at least `min_item` bytes long, checked against what is left.
    fn count(&mut self, min_item: usize) -> Result<usize, SecAggError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.bytes.len() {
            return Err(SecAggError::Malformed {
                reason: format!("{n} items cannot fit in {} bytes", self.bytes.len()),
            });
        }
        Ok(n)
    }

    fn vec(&mut self) -> Result<Vec<u8>, SecAggError> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }

    fn end(self) -> Result<(), SecAggError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(SecAggError::Malformed {
                reason: format!("{} trailing bytes", self.bytes.len()),
            })
        }
    }
}

/// Encodes stage-1 keys (a device's advertisement, or what the aggregator forwards to one).
pub fn encode_keys(keys: &[SignedKey]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + keys.len() * 104);
    b.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        b.extend_from_slice(&k.from.to_le_bytes());
        b.extend_from_slice(&k.to.to_le_bytes());
        b.extend_from_slice(&k.public);
        b.extend_from_slice(&k.signature);
    }
    b
}

/// # Errors
/// [`SecAggError::Malformed`] on truncated, oversized or trailing input.
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<SignedKey>, SecAggError> {
    let mut r = Reader { bytes };
    let n = r.count(104)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(SignedKey {
            from: r.u32()?,
            to: r.u32()?,
            public: r.array()?,
            signature: r.array()?,
        });
    }
    r.end()?;
    Ok(out)
}

/// Encodes stage-2 share items.
pub fn encode_shares(items: &[ShareItem]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for i in items {
        b.extend_from_slice(&i.from.to_le_bytes());
        b.extend_from_slice(&i.to.to_le_bytes());
        b.extend_from_slice(&i.commit_self);
        b.extend_from_slice(&i.commit_pair);
        b.extend_from_slice(&(i.ciphertext.len() as u32).to_le_bytes());
        b.extend_from_slice(&i.ciphertext);
        b.extend_from_slice(&i.signature);
    }
    b
}

/// # Errors
/// [`SecAggError::Malformed`] on truncated, oversized or trailing input.
pub fn decode_shares(bytes: &[u8]) -> Result<Vec<ShareItem>, SecAggError> {
    let mut r = Reader { bytes };
    let n = r.count(4 + 4 + 64 + 4 + 64)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(ShareItem {
            from: r.u32()?,
            to: r.u32()?,
            commit_self: r.array()?,
            commit_pair: r.array()?,
            ciphertext: r.vec()?,
            signature: r.array()?,
        });
    }
    r.end()?;
    Ok(out)
}

impl MaskedInput {
    /// The message's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.data.len() + 72);
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.data);
        b.extend_from_slice(&self.signature);
        b
    }

    /// # Errors
    /// [`SecAggError::Malformed`] on truncated, oversized or trailing input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecAggError> {
        let mut r = Reader { bytes };
        let from = r.u32()?;
        let data = r.vec()?;
        let signature = r.array()?;
        r.end()?;
        Ok(Self {
            from,
            data,
            signature,
        })
    }
}

impl Reveals {
    /// The message's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.from.to_le_bytes());
        encode_reveals(&mut b, &self.reveals);
        b.extend_from_slice(&self.signature);
        b
    }

    /// # Errors
    /// [`SecAggError::Malformed`] on truncated, oversized or trailing input or an unknown kind.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecAggError> {
        let mut r = Reader { bytes };
        let from = r.u32()?;
        let n = r.count(9)?;
        let mut reveals = Vec::with_capacity(n);
        for _ in 0..n {
            let owner = r.u32()?;
            let kind = match r.take(1)?[0] {
                0 => RevealKind::SelfMask,
                1 => RevealKind::PairMasks,
                k => {
                    return Err(SecAggError::Malformed {
                        reason: format!("unknown reveal kind {k}"),
                    });
                }
            };
            reveals.push(Reveal {
                owner,
                kind,
                bytes: r.vec()?,
            });
        }
        let signature = r.array()?;
        r.end()?;
        Ok(Self {
            from,
            reveals,
            signature,
        })
    }
}

/// Encodes a list of device indices (the aggregator's U1, U2 or U3 announcement).
pub fn encode_ids(ids: &[u32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + ids.len() * 4);
    b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for i in ids {
        b.extend_from_slice(&i.to_le_bytes());
    }
    b
}

/// # Errors
/// [`SecAggError::Malformed`] on truncated, oversized or trailing input.
pub fn decode_ids(bytes: &[u8]) -> Result<Vec<u32>, SecAggError> {
    let mut r = Reader { bytes };
    let n = r.count(4)?;
    let ids = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
    r.end()?;
    Ok(ids)
}
