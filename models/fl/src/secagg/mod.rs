//! Secure aggregation in the style of SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020): the
//! aggregator learns the sum of the devices' updates and nothing about any one of them, and
//! the round survives devices dropping out at any stage down to a threshold.
//!
//! Sans-io like the rest of the crate: [`Client`] is one device's side, [`Server`] the
//! aggregator's; the caller moves their messages (the `wire` encodings) and decides when a
//! stage's deadline has passed by calling the `close_*` methods.
//!
//! # Protocol (one round)
//! 0. **Setup** ([`RoundSetup`]): the job, the round, the roster of devices (their Ed25519
//!    public keys, in order: a device's index is its position) and the [`Params`]. Its
//!    SHA-256 is the *round hash*, bound into every signature. The neighbour graph is a
//!    circulant `k`-regular graph over the roster in an order drawn from the round hash.
//! 1. **Advertise keys**: each device makes one fresh X25519 key pair per neighbour (`ring`'s
//!    X25519 keys are single-use, so one per pair) and sends the public halves, each signed.
//! 2. **Share keys**: with a neighbour's key, X25519 → HKDF-SHA256 (salt: the round hash) gives
//!    a 256-bit pairwise mask seed `s_uv` and a 256-bit ChaCha20-Poly1305 key. The device draws
//!    a self-mask seed `b_u` from the OS CSPRNG, Shamir-shares `b_u` and each `s_uv`
//!    `t`-of-`k` among its neighbours (Shamir over GF(2⁸)) and sends each neighbour
//!    its shares encrypted and signed, with SHA-256 commitments to them in the clear.
//! 3. **Masked input**: the device clips its update to `[−c, c]`, quantises it to `q` bits and
//!    sends `x + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) mod 2^m`, where the PRG is
//!    ChaCha20 keyed by the seed and the sums run over neighbours that shared in stage 2.
//! 4. **Consistency check**: each device signs the list of devices whose masked inputs the
//!    aggregator says it holds (U3); the aggregator relays the signatures.
//! 5. **Unmask**: once a quorum (more than half the roster, and at least `t`) has signed the very
//!    list it was given, a device reveals, for each neighbour, the self-mask share if the
//!    neighbour is in U3, the pairwise shares if it is not: never both. The aggregator checks
//!    every revealed share against its commitment, rebuilds the seeds (checking a second
//!    `t`-subset where it has more than `t` shares), removes the masks and dequantises the sum.
//!
//! Pairwise masks cancel in the sum; self-masks stop a late masked input from revealing the
//! update once the pairwise seeds of its sender have been reconstructed. The consistency check
//! stops the aggregator from telling different devices different U3s, and with one U3 and
//! `t > k/2` no device's self-mask and pairwise seeds can both be rebuilt.
//!
//! # What a malicious aggregator can and cannot do
//! It cannot forge, alter or replay any device message (all are signed with the round hash),
//! read shares (encrypted between devices), or learn a single update from one masked vector
//! (uniform over Z_(2^m)). It can drop devices, refuse to finish, or, with `t − 1` or more
//! colluding devices in a neighbourhood, learn what those devices' shares allow. It chooses the
//! roster (and so the neighbour graph), so a roster of devices it controls defeats any
//! threshold: devices should check the roster against the operator's registry. A device that
//! masks wrongly corrupts the sum without being detected; shares that do not match their
//! commitments, or (where more than `t` are revealed) do not lie on one polynomial, are named.

//!
//! # Example
//! Four devices, one of which drops after sharing its keys:
//! ```
//! use std::sync::Arc;
//! use fedge_fl::secagg::{Client, Params, RoundSetup, Server};
//! use ring::signature::{Ed25519KeyPair, KeyPair};
//!
//! let signers: Vec<_> = (0u8..4)
//!     .map(|i| Ed25519KeyPair::from_seed_unchecked(&[i; 32]).unwrap())
//!     .collect();
//! let roster: Vec<[u8; 32]> = signers
//!     .iter()
//!     .map(|s| s.public_key().as_ref().try_into().unwrap())
//!     .collect();
//! let params = Params::new(4, 3, 1.0)?; // 4 devices, 3 values in [-1, 1]
//! let setup = Arc::new(RoundSetup::new("job", 1, roster.clone(), params)?);
//! let mut devices = roster
//!     .iter()
//!     .map(|k| Client::new(setup.clone(), k))
//!     .collect::<Result<Vec<_>, _>>()?;
//! let mut server = Server::new(setup);
//! let updates = [[0.5, -0.25, 1.0], [0.25, 0.25, 0.0], [-1.0, 0.5, 0.5], [0.125, 0.0, -0.5]];
//!
//! for (d, s) in devices.iter_mut().zip(&signers) {
//!     server.receive_keys(d.advertise(s)?)?;
//! }
//! server.close_keys()?;
//! for (i, (d, s)) in devices.iter_mut().zip(&signers).enumerate() {
//!     server.receive_shares(d.share(s, &server.keys_for(i as u32))?)?;
//! }
//! let shared = server.close_shares()?;
//! for (i, (d, s)) in devices.iter_mut().zip(&signers).enumerate().take(3) {
//!     server.receive_masked(d.mask(s, &shared, &server.shares_for(i as u32), &updates[i])?)?;
//! }
//! let survivors = server.close_masked()?; // device 3 dropped
//! for &i in &survivors {
//!     let i = i as usize;
//!     server.receive_confirmation(devices[i].confirm(&signers[i], &survivors)?)?;
//! }
//! let confirmations = server.close_confirmations()?;
//! for &i in &survivors {
//!     let i = i as usize;
//!     server.receive_reveals(devices[i].unmask(&signers[i], &confirmations)?)?;
//! }
//! let sum = server.finish()?.sum;
//! for (j, expected) in [-0.25f32, 0.5, 1.5].iter().enumerate() {
//!     assert!((sum[j] - expected).abs() < 1e-4); // 16-bit quantisation
//! }
//! # Ok::<(), fedge_fl::secagg::SecAggError>(())
//! ```

mod client;
mod mask;
mod server;
pub(crate) mod shamir;
pub mod wire;

use ring::{aead, digest, hkdf};
use thiserror::Error;

pub use client::Client;
pub use mask::{dequantize_sum, quantize, unpack};
pub use server::{Aggregate, Fault, Server};
pub use wire::{Confirmation, MaskedInput, Reveal, RevealKind, Reveals, ShareItem, SignedKey};

/// A protocol stage, for errors and faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Consistency,
    Unmask,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Consistency => "consistency-check",
            Stage::Unmask => "unmask",
        })
    }
}

/// Everything that can go wrong in a SecAgg+ round, as a value. A [`Server`] that rejects a
/// message is otherwise unchanged; a [`Client`] that returns an error has left the round.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum SecAggError {
    #[error("invalid secure aggregation parameters: {reason}")]
    InvalidParams { reason: String },
    #[error("this device's key is not in the round's roster")]
    NotInRoster,
    #[error("{claimed} is not a device of this round")]
    UnknownDevice { claimed: u32 },
    /// The signature does not verify with the key of the device the message names: it was
    /// forged or altered on the way (by the aggregator, the broker or the network).
    #[error("{stage}: message claiming to be from device {claimed} fails its signature check")]
    BadSignature { stage: Stage, claimed: u32 },
    /// A validly signed message that breaks the protocol: its sender is at fault.
    #[error("{stage}: device {device} misbehaved: {reason}")]
    Misbehaved {
        stage: Stage,
        device: u32,
        reason: String,
    },
    /// The aggregator sent this device something inconsistent.
    #[error("{stage}: inconsistent instruction from the aggregator: {reason}")]
    AggregatorMisbehaved { stage: Stage, reason: String },
    #[error("malformed message: {reason}")]
    Malformed { reason: String },
    #[error("{stage}: device {device} already sent this stage's message")]
    Duplicate { stage: Stage, device: u32 },
    #[error("{stage} message received while the round is at {at}")]
    WrongStage { stage: Stage, at: Stage },
    #[error("{stage}: {device} is not expected in this stage")]
    NotExpected { stage: Stage, device: u32 },
    /// Too few devices are left to go on: the round fails.
    #[error("{stage}: {survivors} devices left, the round needs at least {needed}")]
    BelowThreshold {
        stage: Stage,
        survivors: usize,
        needed: usize,
    },
    /// Too few of a device's neighbours are left to rebuild its masks: the round fails.
    #[error(
        "{stage}: the {what} of device {device} cannot be rebuilt: {shares} of its neighbours left, {threshold} needed"
    )]
    Unrecoverable {
        stage: Stage,
        device: u32,
        what: &'static str,
        shares: usize,
        threshold: usize,
    },
    #[error("update has {got} values, the round expects {expected}")]
    ShapeMismatch { expected: usize, got: usize },
    #[error("update holds a non-finite value at index {index}")]
    NonFinite { index: usize },
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// The most values an update may have (2²⁸: a 1 GiB sum on the aggregator).
pub const MAX_LEN: usize = 1 << 28;

/// The numbers a round runs with; the same on every device and the aggregator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    /// Values per update.
    pub len: usize,
    /// Neighbours per device, `k` (even, or `devices − 1` for the complete graph).
    pub neighbours: usize,
    /// Shares needed to rebuild a seed, `t`, with `k/2 < t ≤ k`.
    pub threshold: usize,
    /// Values are clipped to `[−clip, clip]` before quantisation.
    pub clip: f32,
    /// Bits per quantised value, `q`.
    pub quant_bits: u32,
    /// Bits of the modulus the masked sum lives in, `m ≥ q + ⌈log₂ devices⌉`, at most 32.
    pub mod_bits: u32,
}

impl Params {
    /// Defaults for `devices` devices and `len` values clipped to `[−clip, clip]`: 16-bit
    /// quantisation, the smallest modulus that holds the sum, `k = 2⌈3.5 log₂ n⌉` neighbours
    /// (all devices when that is more) and `t = ⌊k/2⌋ + 1`. A device's masks can be rebuilt
    /// while at most `k − t` of its neighbours have dropped: for 50 devices `k = 40`, `t = 21`,
    /// so any 19 devices may drop; for 1000 devices `k = 70`, `t = 36`, and with 30 % dropping
    /// at random some neighbourhood may fall short with probability up to 0.36: use
    /// [`for_dropout`](Self::for_dropout) there.
    ///
    /// # Errors
    /// [`SecAggError::InvalidParams`] for fewer than 3 devices, no values or a bad `clip`.
    pub fn new(devices: usize, len: usize, clip: f32) -> Result<Self, SecAggError> {
        let log = (devices.max(2) as f64).log2();
        let k = (2 * (3.5 * log).ceil() as usize).min(devices.saturating_sub(1));
        let params = Self {
            len,
            neighbours: k,
            threshold: k / 2 + 1,
            clip,
            quant_bits: 16,
            mod_bits: 16 + log.ceil() as u32,
        };
        params.validate(devices)?;
        Ok(params)
    }

    /// Like [`new`](Self::new), but with the smallest even `k` (and `t = ⌊k/2⌋ + 1`) for which
    /// [`failure_probability`](Self::failure_probability) is at most `failure` when each device
    /// drops out of the round with probability `dropout`; the complete graph when none is.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`SecAggError::InvalidParams`] for `dropout` outside `[0, 1)` or
    /// `failure` outside `(0, 1)`.
    pub fn for_dropout(
        devices: usize,
        len: usize,
        clip: f32,
        dropout: f64,
        failure: f64,
    ) -> Result<Self, SecAggError> {
        if !((0.0..1.0).contains(&dropout) && failure > 0.0 && failure < 1.0) {
            return Err(SecAggError::InvalidParams {
                reason: format!("dropout {dropout} must be in [0, 1), failure {failure} in (0, 1)"),
            });
        }
        let mut params = Self::new(devices, len, clip)?;
        let full = devices - 1;
        let mut k = 2;
        loop {
            let k_here = if k >= full { full } else { k };
            params.neighbours = k_here;
            params.threshold = k_here / 2 + 1;
            if k_here == full
                || k_here >= 254
                || params.failure_probability(devices, dropout) <= failure
            {
                break;
            }
            k += 2;
        }
        params.neighbours = params.neighbours.min(254);
        params.threshold = params.neighbours / 2 + 1;
        params.validate(devices)?;
        Ok(params)
    }

    /// An upper bound (union bound over the devices) on the probability that some device keeps
    /// fewer than `t` of its `k` neighbours, so that the round fails, when each device drops
    /// independently with probability `dropout` at some point of the round.
    pub fn failure_probability(&self, devices: usize, dropout: f64) -> f64 {
        let k = self.neighbours;
        let (p, q) = (dropout.clamp(0.0, 1.0), 1.0 - dropout.clamp(0.0, 1.0));
        // P(Binomial(k, q) < t), term by term in logs.
        let ln_choose = |i: usize| -> f64 {
            (1..=k).map(|x| (x as f64).ln()).sum::<f64>()
                - (1..=i).map(|x| (x as f64).ln()).sum::<f64>()
                - (1..=k - i).map(|x| (x as f64).ln()).sum::<f64>()
        };
        let tail: f64 = (0..self.threshold.min(k + 1))
            .map(|i| {
                let ln = ln_choose(i) + i as f64 * q.ln() + (k - i) as f64 * p.ln();
                if ln.is_nan() { 0.0 } else { ln.exp() }
            })
            .sum();
        (tail * devices as f64).min(1.0)
    }

    /// The bytes a device sends in a round in which nobody drops: its keys, share items,
    /// masked vector, confirmation and reveals, in the `wire` encodings.
    pub fn sent_bytes(&self) -> u64 {
        let k = self.neighbours as u64;
        let keys = 4 + k * 104;
        let item = 4 + 4 + 32 + 32 + 4 + (32 + 4 + 36 * k + 16) + 64;
        let shares = 4 + k * item;
        let masked = 4 + 4 + (self.len as u64 * u64::from(self.mod_bits)).div_ceil(8) + 64;
        let confirmation = 4 + 68;
        let reveals = 4 + 4 + k * (4 + 1 + 4 + 32) + 64;
        keys + shares + masked + confirmation + reveals
    }

    /// The largest `wire` body of any one message in a round of `devices` devices, sent by a
    /// device or relayed to one (a list of device indices included): what a transport must let
    /// through.
    pub fn max_message_bytes(&self, devices: usize) -> u64 {
        let (k, n) = (self.neighbours as u64, devices as u64);
        let keys = 4 + k * 104;
        let item = 4 + 4 + 32 + 32 + 4 + (32 + 4 + 36 * k + 16) + 64;
        let shares = 4 + k * item;
        let masked = 4 + 4 + (self.len as u64 * u64::from(self.mod_bits)).div_ceil(8) + 64;
        let confirmations = 4 + n * 68;
        let reveals = 4 + 4 + k * (4 + 1 + 4 + 32) + 64;
        let ids = 4 + n * 4;
        keys.max(shares).max(masked).max(confirmations).max(reveals) + ids
    }

    /// # Errors
    /// [`SecAggError::InvalidParams`] naming the first rule broken.
    pub fn validate(&self, devices: usize) -> Result<(), SecAggError> {
        let bad = |reason: String| Err(SecAggError::InvalidParams { reason });
        if devices < 3 || devices > u32::MAX as usize {
            return bad(format!("{devices} devices: at least 3 needed"));
        }
        if self.len == 0 || self.len > MAX_LEN {
            return bad(format!(
                "update length {} out of range 1..={MAX_LEN}",
                self.len
            ));
        }
        let full = devices - 1;
        if self.neighbours < 2
            || self.neighbours > full
            || (self.neighbours < full && self.neighbours % 2 == 1)
            || self.neighbours > 254
        {
            return bad(format!(
                "{} neighbours: must be even and in 2..={}, or {full} (all)",
                self.neighbours,
                full.min(254)
            ));
        }
        if self.threshold <= self.neighbours / 2 || self.threshold > self.neighbours {
            return bad(format!(
                "threshold {} must be in {}..={}",
                self.threshold,
                self.neighbours / 2 + 1,
                self.neighbours
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip {} must be finite and > 0", self.clip));
        }
        if !(1..=24).contains(&self.quant_bits) {
            return bad(format!("quant_bits {} not in 1..=24", self.quant_bits));
        }
        let need = self.quant_bits + (devices as f64).log2().ceil() as u32;
        if self.mod_bits < need || self.mod_bits > 32 {
            return bad(format!(
                "mod_bits {} cannot hold a sum of {devices} {}-bit values: {need}..=32 needed",
                self.mod_bits, self.quant_bits
            ));
        }
        Ok(())
    }
}

/// What every party agrees on before a round: its identity, roster and parameters.
#[derive(Debug, Clone)]
pub struct RoundSetup {
    job: String,
    round: u64,
    session: u64,
    roster: Vec<[u8; 32]>,
    params: Params,
    hash: [u8; 32],
    neighbours: Vec<Vec<u32>>,
}

/// Two setups are the same round when their hashes are.
impl PartialEq for RoundSetup {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl Eq for RoundSetup {}

impl RoundSetup {
    /// # Errors
    /// [`SecAggError::InvalidParams`] for bad parameters or a roster with repeated keys.
    pub fn new(
        job: &str,
        round: u64,
        roster: Vec<[u8; 32]>,
        params: Params,
    ) -> Result<Self, SecAggError> {
        Self::with_session(job, round, 0, roster, params)
    }

    /// As [`RoundSetup::new`], for one run (`session`) of a round: a round run again (after an
    /// aggregator restart) gets a new session, so no message of the earlier run is valid in it.
    ///
    /// # Errors
    /// As [`RoundSetup::new`].
    pub fn with_session(
        job: &str,
        round: u64,
        session: u64,
        roster: Vec<[u8; 32]>,
        params: Params,
    ) -> Result<Self, SecAggError> {
        params.validate(roster.len())?;
        let mut sorted = roster.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(SecAggError::InvalidParams {
                reason: "the roster repeats a device key".into(),
            });
        }
        let mut h = digest::Context::new(&digest::SHA256);
        h.update(b"fedge-secagg-v1 round");
        h.update(&(job.len() as u64).to_le_bytes());
        h.update(job.as_bytes());
        h.update(&round.to_le_bytes());
        h.update(&session.to_le_bytes());
        for field in [
            params.len as u64,
            params.neighbours as u64,
            params.threshold as u64,
            u64::from(params.clip.to_bits()),
            u64::from(params.quant_bits),
            u64::from(params.mod_bits),
            roster.len() as u64,
        ] {
            h.update(&field.to_le_bytes());
        }
        for key in &roster {
            h.update(key);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(h.finish().as_ref());
        let neighbours = graph(&hash, roster.len(), params.neighbours);
        Ok(Self {
            job: job.to_owned(),
            round,
            session,
            roster,
            params,
            hash,
            neighbours,
        })
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    /// The run of the round ([`RoundSetup::with_session`]; 0 for [`RoundSetup::new`]).
    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn roster(&self) -> &[[u8; 32]] {
        &self.roster
    }

    /// The SHA-256 every signature in the round is bound to.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// A device's neighbours, sorted.
    pub fn neighbours(&self, device: u32) -> &[u32] {
        self.neighbours
            .get(device as usize)
            .map_or(&[], |v| v.as_slice())
    }

    /// Consistency-check signatures a device needs before it unmasks: more than half the
    /// roster, and at least `t`.
    pub fn quorum(&self) -> usize {
        (self.roster.len() / 2 + 1).max(self.params.threshold)
    }

    /// The index of a device key in the roster.
    pub fn index_of(&self, key: &[u8; 32]) -> Option<u32> {
        self.roster.iter().position(|k| k == key).map(|i| i as u32)
    }

    pub(crate) fn key(&self, device: u32) -> Result<&[u8; 32], SecAggError> {
        self.roster
            .get(device as usize)
            .ok_or(SecAggError::UnknownDevice { claimed: device })
    }

    /// The Shamir point a holder gets for an owner's secrets: 1 + its place among the owner's
    /// neighbours.
    pub(crate) fn share_point(&self, owner: u32, holder: u32) -> Option<u8> {
        self.neighbours(owner)
            .binary_search(&holder)
            .ok()
            .map(|i| (i + 1) as u8)
    }

    pub(crate) fn are_neighbours(&self, a: u32, b: u32) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }
}

/// The circulant graph: devices placed on a ring in the order of SHA-256(round hash ‖ index),
/// each joined to the `k/2` nearest on either side (all others when `k = n − 1`).
fn graph(hash: &[u8; 32], n: usize, k: usize) -> Vec<Vec<u32>> {
    if k >= n - 1 {
        return (0..n as u32)
            .map(|i| (0..n as u32).filter(|&j| j != i).collect())
            .collect();
    }
    let mut order: Vec<(digest::Digest, u32)> = (0..n as u32)
        .map(|i| {
            let mut h = digest::Context::new(&digest::SHA256);
            h.update(b"fedge-secagg-v1 graph");
            h.update(hash);
            h.update(&i.to_le_bytes());
            (h.finish(), i)
        })
        .collect();
    order.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
    let ring: Vec<u32> = order.into_iter().map(|(_, i)| i).collect();
    let mut out = vec![Vec::with_capacity(k); n];
    for (pos, &dev) in ring.iter().enumerate() {
        for d in 1..=k / 2 {
            out[dev as usize].push(ring[(pos + d) % n]);
            out[dev as usize].push(ring[(pos + n - d) % n]);
        }
        out[dev as usize].sort_unstable();
    }
    out
}

/// The pairwise mask seed and share-encryption key two neighbours derive from their X25519
/// secret.
pub(crate) struct PairKeys {
    pub(crate) mask_seed: [u8; 32],
    pub(crate) share_key: [u8; 32],
}

impl Drop for PairKeys {
    fn drop(&mut self) {
        wipe(&mut self.mask_seed);
        wipe(&mut self.share_key);
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

pub(crate) fn derive_pair(
    round: &[u8; 32],
    a: u32,
    b: u32,
    shared: &[u8],
) -> Result<PairKeys, SecAggError> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(32);
    info.extend_from_slice(b"fedge-secagg-v1 pair");
    info.extend_from_slice(&lo.to_le_bytes());
    info.extend_from_slice(&hi.to_le_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, round).extract(shared);
    let mut out = [0u8; 64];
    prk.expand(&[&info], Len(64))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| SecAggError::Crypto("hkdf"))?;
    let mut keys = PairKeys {
        mask_seed: [0; 32],
        share_key: [0; 32],
    };
    keys.mask_seed.copy_from_slice(&out[..32]);
    keys.share_key.copy_from_slice(&out[32..]);
    wipe(&mut out);
    Ok(keys)
}

/// The commitment to a share: SHA-256(domain ‖ kind ‖ round ‖ owner ‖ holder ‖ bytes). A share
/// of a 256-bit seed is uniform, so the hash hides it.
pub(crate) fn commit(
    round: &[u8; 32],
    kind: wire::RevealKind,
    owner: u32,
    holder: u32,
    bytes: &[u8],
) -> [u8; 32] {
    let mut h = digest::Context::new(&digest::SHA256);
    h.update(b"fedge-secagg-v1 commit");
    h.update(&[kind as u8]);
    h.update(round);
    h.update(&owner.to_le_bytes());
    h.update(&holder.to_le_bytes());
    h.update(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// Parses an owner's pairwise shares for one holder: `count ‖ (neighbour, share)*`, one share
/// per neighbour in increasing order, as an honest owner writes them.
pub(crate) fn parse_pair_part(bytes: &[u8]) -> Option<Vec<(u32, [u8; 32])>> {
    let (count, rest) = bytes.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    if rest.len() != count.checked_mul(36)? {
        return None;
    }
    let parsed: Vec<(u32, [u8; 32])> = rest
        .chunks_exact(36)
        .map(|c| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&c[..4]);
            let mut s = [0u8; 32];
            s.copy_from_slice(&c[4..]);
            (u32::from_le_bytes(v), s)
        })
        .collect();
    parsed.windows(2).all(|w| w[0].0 < w[1].0).then_some(parsed)
}

/// Overwrites a secret with zeros (best effort: the write is kept by `black_box`).
pub(crate) fn wipe(secret: &mut [u8]) {
    secret.fill(0);
    std::hint::black_box(secret);
}

/// Constant-time equality for commitments.
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn share_cipher(key: &[u8; 32]) -> Result<aead::LessSafeKey, SecAggError> {
    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| SecAggError::Crypto("aead key"))
}

/// Each direction of a pair uses its key once; the nonce is the sender's index.
fn share_nonce(from: u32) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn share_aad(round: &[u8; 32], from: u32, to: u32) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..32].copy_from_slice(round);
    a[32..36].copy_from_slice(&from.to_le_bytes());
    a[36..].copy_from_slice(&to.to_le_bytes());
    a
}

pub(crate) fn seal_shares(
    round: &[u8; 32],
    key: &[u8; 32],
    from: u32,
    to: u32,
    mut plaintext: Vec<u8>,
) -> Result<Vec<u8>, SecAggError> {
    share_cipher(key)?
        .seal_in_place_append_tag(
            share_nonce(from),
            aead::Aad::from(share_aad(round, from, to)),
            &mut plaintext,
        )
        .map_err(|_| SecAggError::Crypto("seal"))?;
    Ok(plaintext)
}

pub(crate) fn open_shares(
    round: &[u8; 32],
    key: &[u8; 32],
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let mut buf = ciphertext.to_vec();
    let cipher = share_cipher(key).ok()?;
    let len = cipher
        .open_in_place(
            share_nonce(from),
            aead::Aad::from(share_aad(round, from, to)),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_params_hold_the_sum() {
        let p = Params::new(50, 10, 1.0).unwrap();
        assert_eq!((p.neighbours, p.threshold, p.mod_bits), (40, 21, 22));
        let p = Params::new(5, 10, 1.0).unwrap();
        assert_eq!((p.neighbours, p.threshold), (4, 3));
        let p = Params::new(1000, 10, 1.0).unwrap();
        assert_eq!((p.neighbours, p.threshold, p.mod_bits), (70, 36, 26));
        assert!(Params::new(2, 10, 1.0).is_err());
        let mut bad = Params::new(50, 10, 1.0).unwrap();
        bad.threshold = 20;
        assert!(bad.validate(50).is_err());
        bad.threshold = 21;
        bad.mod_bits = 21;
        assert!(bad.validate(50).is_err());
    }

    #[test]
    fn planning_for_dropout_and_bytes() {
        let p = Params::new(1000, 100_000, 1.0).unwrap();
        let f = p.failure_probability(1000, 0.3);
        assert!((0.3..0.4).contains(&f), "{f}"); // 1000 × 3.6e-4
        assert_eq!(p.sent_bytes(), 525_214); // measured by the bench_secagg example
        let q = Params::for_dropout(1000, 100_000, 1.0, 0.3, 1e-6).unwrap();
        assert!(q.failure_probability(1000, 0.3) <= 1e-6);
        assert!(q.neighbours > p.neighbours && q.neighbours.is_multiple_of(2));
        let mut smaller = q.clone();
        smaller.neighbours -= 2;
        smaller.threshold = smaller.neighbours / 2 + 1;
        assert!(smaller.failure_probability(1000, 0.3) > 1e-6);
        // Small fleets get the complete graph.
        assert_eq!(
            Params::for_dropout(10, 5, 1.0, 0.3, 1e-9)
                .unwrap()
                .neighbours,
            9
        );
        assert!(Params::for_dropout(10, 5, 1.0, 1.0, 1e-9).is_err());
    }

    #[test]
    fn graph_is_regular_and_symmetric() {
        for (n, k) in [(50, 40), (9, 4), (7, 6), (1000, 70)] {
            let g = graph(&[3; 32], n, k);
            for (i, nb) in g.iter().enumerate() {
                assert_eq!(nb.len(), k, "n={n} k={k}");
                assert!(!nb.contains(&(i as u32)));
                for &j in nb {
                    assert!(g[j as usize].contains(&(i as u32)));
                }
            }
        }
    }
}
