//! Message payloads. Each is carried postcard-encoded in an [`crate::Envelope`] of the matching
//! [`crate::Kind`]. Strings and byte fields borrow from the received buffer, so decoding needs no
//! allocator. Enum variants are encoded by index: append only.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkManifest;
use crate::keys::PublicKey;

/// Most reasons an [`Ack`] or a [`Telemetry`] event can carry.
pub const MAX_EVENTS: usize = 8;

/// A model version a device holds or a round distributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef<'a> {
    pub name: &'a str,
    pub version: u64,
    /// sha256 of the ONNX model bytes (bundles) or of the encoded parameters (FL rounds).
    pub sha256: [u8; 32],
}

/// Retained on `dev/{device}/status`. The device's MQTT last will is a signed `Status` with
/// `online: false`, sealed at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status<'a> {
    pub online: bool,
    pub agent_version: &'a str,
    pub model: Option<ModelRef<'a>>,
    /// The device's own public key, so an operator can cross-check the registry.
    pub public_key: PublicKey,
}

/// Why something was refused. Shared by acks, telemetry events and the aggregator's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    UnknownSender,
    Revoked,
    BadSignature,
    Replay,
    Oversize,
    Malformed,
    WrongKind,
    WrongJob,
    WrongRound,
    NotSelected,
    Late,
    WrongShape,
    NonFinite,
    NormAboveBound,
    HashMismatch,
    SelfTestFailed,
    LoadFailed,
    Storage,
    Duplicate,
    Internal,
    /// A sealed update that does not open, or a plaintext update where the round asks for
    /// encryption.
    Undecryptable,
}

impl Reason {
    /// Every reason, in encoding order.
    pub const ALL: [Reason; 21] = [
        Self::UnknownSender,
        Self::Revoked,
        Self::BadSignature,
        Self::Replay,
        Self::Oversize,
        Self::Malformed,
        Self::WrongKind,
        Self::WrongJob,
        Self::WrongRound,
        Self::NotSelected,
        Self::Late,
        Self::WrongShape,
        Self::NonFinite,
        Self::NormAboveBound,
        Self::HashMismatch,
        Self::SelfTestFailed,
        Self::LoadFailed,
        Self::Storage,
        Self::Duplicate,
        Self::Internal,
        Self::Undecryptable,
    ];

    /// A stable snake_case name (metrics labels, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownSender => "unknown_sender",
            Self::Revoked => "revoked",
            Self::BadSignature => "bad_signature",
            Self::Replay => "replay",
            Self::Oversize => "oversize",
            Self::Malformed => "malformed",
            Self::WrongKind => "wrong_kind",
            Self::WrongJob => "wrong_job",
            Self::WrongRound => "wrong_round",
            Self::NotSelected => "not_selected",
            Self::Late => "late",
            Self::WrongShape => "wrong_shape",
            Self::NonFinite => "non_finite",
            Self::NormAboveBound => "norm_above_bound",
            Self::HashMismatch => "hash_mismatch",
            Self::SelfTestFailed => "self_test_failed",
            Self::LoadFailed => "load_failed",
            Self::Storage => "storage",
            Self::Duplicate => "duplicate",
            Self::Internal => "internal",
            Self::Undecryptable => "undecryptable",
        }
    }

    /// The reason a protocol error stands for.
    pub fn of(e: crate::ProtoError) -> Self {
        use crate::ProtoError as E;
        match e {
            E::Oversize { .. } => Self::Oversize,
            E::BadSignature | E::BadKey => Self::BadSignature,
            E::Replay { .. } => Self::Replay,
            E::WrongKind => Self::WrongKind,
            E::HashMismatch => Self::HashMismatch,
            E::Decrypt => Self::Undecryptable,
            _ => Self::Malformed,
        }
    }
}

/// A notable event (mostly a refusal) with a short human-readable detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event<'a> {
    pub reason: Reason,
    pub detail: &'a str,
    /// Milliseconds since the Unix epoch, by the device's clock.
    pub at_ms: u64,
}

/// Inference latency over the last telemetry interval, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

/// Published on `dev/{device}/telemetry` at the configured interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry<'a> {
    pub uptime_s: u64,
    #[serde(borrow)]
    pub model: Option<ModelRef<'a>>,
    pub inferences: u64,
    pub infer_errors: u64,
    pub latency: Latency,
    /// Resident set size of the agent process.
    pub rss_bytes: u64,
    /// Bytes waiting in the store-and-forward outbox.
    pub outbox_bytes: u64,
    /// Cumulative refusals since start, per reason (only non-zero ones).
    pub rejected: heapless::Vec<(Reason, u64), 21>,
    /// The latest events since the previous telemetry message.
    #[serde(borrow)]
    pub events: heapless::Vec<Event<'a>, MAX_EVENTS>,
}

/// Operator commands on `dev/{device}/cmd`, accepted only when signed by the pinned operator key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command<'a> {
    /// Fetch the bundle whose chunks are retained on `bundle/{sha256}/{i}`, verify, install.
    Install {
        name: &'a str,
        version: u64,
        bundle: ChunkManifest,
    },
    /// Go back to the previous healthy version.
    Rollback,
    /// Answer with a telemetry message now.
    Ping,
    /// Change the telemetry interval.
    SetTelemetryInterval { seconds: u32 },
}

/// A model release, sealed in an operator envelope of kind [`crate::Kind::Bundle`] and shipped in
/// chunks. The device installs it only if the operator signature verifies, the model loads and
/// the model reproduces `test_output` from `test_input` within `tolerance`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bundle<'a> {
    pub name: &'a str,
    pub version: u64,
    pub created_unix_s: u64,
    /// The ONNX model.
    pub model: &'a [u8],
    /// `.npz` of the test inputs (`.npy` members named like the model inputs, or in order).
    pub test_input: &'a [u8],
    /// `.npz` of the expected outputs.
    pub test_output: &'a [u8],
    /// Largest accepted absolute difference, relative to the reference's max |x| (0 = exact).
    pub tolerance: f32,
}

/// Which devices take part in a round: every registered device, or a deterministic sample of them
/// that both the aggregator and each device can compute ([`Selection::includes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selection {
    All,
    /// Selected when `sha256("fedge-select" ‖ seed ‖ job ‖ round ‖ device)` falls below
    /// `fraction_ppm` parts per million.
    Sample {
        seed: u64,
        fraction_ppm: u32,
    },
}

impl Selection {
    /// Whether `device` is selected for `round` of `job`.
    pub fn includes(&self, job: &str, round: u64, device: &str) -> bool {
        match *self {
            Self::All => true,
            Self::Sample { seed, fraction_ppm } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(b"fedge-select");
                ctx.update(&seed.to_le_bytes());
                ctx.update(job.as_bytes());
                ctx.update(&[0]);
                ctx.update(&round.to_le_bytes());
                ctx.update(device.as_bytes());
                let d = ctx.finish();
                let mut x = [0u8; 4];
                x.copy_from_slice(&d.as_ref()[..4]);
                (u64::from(u32::from_le_bytes(x)) * 1_000_000) >> 32 < u64::from(fraction_ppm)
            }
        }
    }
}

/// How update parameters are encoded (the codecs of `fedge-fl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    F32,
    F16,
    /// int8 with one f32 scale per block.
    Int8Block,
}

/// Client hyper-parameters for a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub learning_rate: f32,
    pub epochs: u32,
    pub batch_size: u32,
    /// FedProx proximal term μ (0: plain local SGD).
    pub proximal_mu: f32,
    /// L2 bound a device clips its update to before sending (0: no clipping).
    pub clip_norm: f32,
    /// Gaussian noise standard deviation as a multiple of `clip_norm` (0: none).
    pub noise_multiplier: f32,
}

/// Where a round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Collecting updates until the deadline.
    Open,
    /// Aggregating; updates now are late.
    Closed,
    /// The job has finished; `model` is the final model.
    Finished,
}

/// Retained on `job/{job}/round`, signed by the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnounce<'a> {
    pub job: &'a str,
    pub round: u64,
    pub phase: Phase,
    /// The global model of this round; its chunks are retained on
    /// `job/{job}/model/{version}/{i}`, and `manifest.sha256 == model.sha256`.
    #[serde(borrow)]
    pub model: ModelRef<'a>,
    pub manifest: ChunkManifest,
    /// Number of f32 parameters the update must carry.
    pub param_count: u32,
    pub codec: Codec,
    pub selection: Selection,
    pub hyper: Hyper,
    /// Updates after this instant (ms since the Unix epoch) follow the job's late policy.
    pub deadline_unix_ms: u64,
    /// `None`: updates travel in clear (signed). `Some`: a [`crate::seal::recipients`] table;
    /// each listed device must seal its update to its key, an unlisted one sits the round out.
    #[serde(borrow)]
    pub recipients: Option<&'a [u8]>,
    /// `Some`: the round runs secure aggregation (SecAgg+) among the listed devices instead of
    /// collecting updates; see [`SecAggSetup`].
    #[serde(borrow)]
    pub secagg: Option<SecAggSetup<'a>>,
}

/// The secure-aggregation session of a round, as announced. With the job and round it fixes the
/// `fedge_fl::secagg::RoundSetup` every party computes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup<'a> {
    /// Chosen by the aggregator for each run of the protocol: a round run again after an
    /// aggregator restart has a new session, and messages of the old one verify in neither.
    pub session: u64,
    /// Neighbours per device (k).
    pub neighbours: u32,
    /// Shares needed to rebuild a seed (t).
    pub threshold: u32,
    /// Each value of an update is clipped to `[-clip, clip]` before quantisation.
    pub clip: f32,
    pub quant_bits: u8,
    pub mod_bits: u8,
    /// The devices' Ed25519 public keys, 32 bytes each, in roster order (a device's index is
    /// its position).
    pub roster: &'a [u8],
}

/// One step of the SecAgg+ protocol. Devices send the first five; the aggregator relays the
/// last four to each device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecAggStep {
    /// Stage 1, device: its signed keys, one per neighbour.
    Keys,
    /// Stage 2, device: its share items, one per neighbour.
    Shares,
    /// Stage 3, device: its masked input.
    Masked,
    /// Stage 4, device: its signature over the survivor list.
    Confirmation,
    /// Stage 5, device: its revealed shares.
    Reveals,
    /// To a device: its neighbours' keys addressed to it.
    NeighbourKeys,
    /// To a device: the devices that shared (`ids`) and the share items addressed to it.
    NeighbourShares,
    /// To a device: the devices whose masked inputs arrived (`ids`).
    Survivors,
    /// To a device: every survivor's confirmation.
    Confirmations,
}

/// A SecAgg+ message in an envelope of kind [`crate::Kind::SecAgg`]. `body` is the
/// `fedge_fl::secagg::wire` encoding of the step's message, signed inside by its author.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggMsg<'a> {
    pub job: &'a str,
    pub round: u64,
    pub session: u64,
    pub step: SecAggStep,
    /// Device indices (`fedge_fl::secagg::wire::encode_ids`), for the steps that carry a list.
    pub ids: &'a [u8],
    pub body: &'a [u8],
}

/// The operator's certificate of an aggregator key, in an envelope of kind
/// [`crate::Kind::Certificate`] signed by the operator (its `seq` is the issue time in
/// milliseconds, so a newer certificate supersedes an older one). The aggregator publishes it retained on
/// `aggregator`; a device that pins only the operator key learns the aggregator's key from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregatorCert<'a> {
    pub fleet: &'a str,
    /// The aggregator's sender id in its envelopes.
    pub aggregator: &'a str,
    pub public_key: PublicKey,
    /// Not valid after this instant (seconds since the Unix epoch).
    pub not_after_unix_s: u64,
}

/// A device's contribution on `job/{job}/update/{device}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Update<'a> {
    pub job: &'a str,
    pub round: u64,
    /// The global model version the device trained from.
    pub base_version: u64,
    pub num_samples: u64,
    /// Local training loss and accuracy after training (NaN when not measured).
    pub loss: f32,
    pub accuracy: f32,
    /// The parameter delta (new − global) in the round's codec.
    pub delta: &'a [u8],
}

/// The outcome of an update or command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Durably stored; it will count exactly once.
    Accepted,
    /// Already stored earlier (a retransmission); it counts once.
    Duplicate,
    Rejected(Reason),
}

/// Sent back on `dev/{device}/cmd` for an update (by the aggregator) or a command (by the device
/// in its telemetry events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack<'a> {
    pub kind: crate::Kind,
    /// The sequence number of the acknowledged envelope.
    pub seq: u64,
    pub round: u64,
    pub outcome: Outcome,
    pub detail: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{decode, encode_into};

    #[test]
    fn payloads_round_trip_without_alloc() {
        let mut buf = [0u8; 512];
        let m = ChunkManifest {
            sha256: [7; 32],
            total_len: 1000,
            chunk_size: 256,
            chunk_count: 4,
        };
        let a = RoundAnnounce {
            job: "digits",
            round: 3,
            phase: Phase::Open,
            model: ModelRef {
                name: "head",
                version: 3,
                sha256: [7; 32],
            },
            manifest: m,
            param_count: 650,
            codec: Codec::F32,
            selection: Selection::Sample {
                seed: 1,
                fraction_ppm: 500_000,
            },
            hyper: Hyper {
                learning_rate: 0.1,
                epochs: 1,
                batch_size: 32,
                proximal_mu: 0.0,
                clip_norm: 0.0,
                noise_multiplier: 0.0,
            },
            deadline_unix_ms: 1,
            recipients: Some(&[
                2, b'd', b'1', 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
                7, 7, 7, 7, 7, 7, 7, 7, 7,
            ]),
            secagg: Some(SecAggSetup {
                session: 9,
                neighbours: 2,
                threshold: 2,
                clip: 0.5,
                quant_bits: 16,
                mod_bits: 18,
                roster: &[5; 96],
            }),
        };
        let n = encode_into(&a, &mut buf).expect("encode").len();
        assert_eq!(decode::<RoundAnnounce<'_>>(&buf[..n]), Ok(a));
        let c = AggregatorCert {
            fleet: "f1",
            aggregator: "agg",
            public_key: PublicKey([4; 32]),
            not_after_unix_s: 1 << 40,
        };
        let m = encode_into(&c, &mut buf).expect("encode").len();
        assert_eq!(decode::<AggregatorCert<'_>>(&buf[..m]), Ok(c));
        assert!(decode::<RoundAnnounce<'_>>(&buf[..n - 1]).is_err());

        let mut t = Telemetry {
            uptime_s: 5,
            model: None,
            inferences: 10,
            infer_errors: 0,
            latency: Latency::default(),
            rss_bytes: 1 << 20,
            outbox_bytes: 0,
            rejected: heapless::Vec::new(),
            events: heapless::Vec::new(),
        };
        t.rejected.push((Reason::Replay, 2)).expect("room");
        t.events
            .push(Event {
                reason: Reason::BadSignature,
                detail: "bundle v3",
                at_ms: 9,
            })
            .expect("room");
        let n = encode_into(&t, &mut buf).expect("encode").len();
        assert_eq!(decode::<Telemetry<'_>>(&buf[..n]), Ok(t));
    }

    #[test]
    fn sampling_is_deterministic_and_roughly_fair() {
        let s = Selection::Sample {
            seed: 42,
            fraction_ppm: 250_000,
        };
        let mut names = [[0u8; 8]; 1];
        let mut picked = 0;
        for i in 0..2000u32 {
            names[0] = *b"dev-0000";
            let d = i.to_le_bytes();
            for (k, b) in d.iter().enumerate() {
                names[0][4 + k] = b'a' + (b % 26);
            }
            let name = core::str::from_utf8(&names[0]).expect("ascii");
            let x = s.includes("job", 1, name);
            assert_eq!(x, s.includes("job", 1, name));
            picked += usize::from(x);
        }
        assert!((350..650).contains(&picked), "{picked}");
        assert!(Selection::All.includes("j", 1, "d"));
        assert!(
            !Selection::Sample {
                seed: 1,
                fraction_ppm: 0
            }
            .includes("j", 1, "d")
        );
    }
}
