//! Everything the aggregator publishes, sealed with its key: model chunks and announcements
//! (retained), acks and secure aggregation relays (not retained), and the clearing of old
//! retained chunks.

use std::sync::Arc;

use fedge_proto::chunk::ChunkManifest;
use fedge_proto::msg::{Ack, ModelRef, Outcome, Phase, RoundAnnounce, SecAggMsg, SecAggSetup};
use fedge_proto::{Envelope, Kind, Signer, topic};

use crate::error::AggregatorError;
use crate::records::{JobPhase, JobRecord, RoundRecord};
use crate::store::Store;

/// Sequence numbers reserved per store commit.
const SEQ_BLOCK: u64 = 4096;

/// One MQTT publish (QoS 1).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
}

/// Seals envelopes as the aggregator. Its sequence numbers come from blocks reserved in the
/// store, so they increase across restarts. Reserving writes to the store: never seal while a
/// [`crate::store::Txn`] is open (redb has one writer).
#[derive(Debug)]
pub struct Sealer {
    signer: Signer,
    id: String,
    store: Arc<Store>,
    next: u64,
    end: u64,
}

impl Sealer {
    pub fn new(signer: Signer, id: String, store: Arc<Store>) -> Self {
        Self {
            signer,
            id,
            store,
            next: 0,
            end: 0,
        }
    }

    pub fn public_key(&self) -> fedge_proto::PublicKey {
        self.signer.public_key()
    }

    /// Signs `payload` as a `kind` envelope of `round`.
    ///
    /// # Errors
    /// The sequence reservation failed, or the id is invalid.
    pub fn seal(
        &mut self,
        kind: Kind,
        round: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, AggregatorError> {
        if self.next >= self.end {
            self.next = self.store.reserve_seq(SEQ_BLOCK)?;
            self.end = self.next + SEQ_BLOCK;
        }
        let seq = self.next;
        self.next += 1;
        Ok(Envelope::new(kind, &self.id, seq, round, payload).seal(&self.signer)?)
    }
}

/// The retained chunks of a model version, and its manifest.
///
/// # Errors
/// Sealing errors.
pub fn model(
    sealer: &mut Sealer,
    fleet: &str,
    rec: &JobRecord,
    params: &[f32],
    round: u64,
) -> Result<(Vec<Outgoing>, ChunkManifest), AggregatorError> {
    let bytes = crate::codec::f32_to_le(params);
    let manifest = ChunkManifest::of(&bytes, rec.spec.chunk_size)?;
    let mut out = Vec::with_capacity(manifest.chunk_count as usize);
    for chunk in manifest.split(&bytes) {
        let payload = fedge_proto::envelope::encode(&chunk)?;
        out.push(Outgoing {
            topic: topic::job_model_chunk(fleet, &rec.spec.id, rec.model_version, chunk.index)?
                .to_string(),
            retain: true,
            payload: sealer.seal(Kind::Chunk, round, &payload)?,
        });
    }
    Ok((out, manifest))
}

/// Empty retained payloads that clear the chunks of an older `version` from the broker.
///
/// # Errors
/// Bad ids.
pub fn clear_model(
    fleet: &str,
    job: &str,
    version: u64,
    chunks: u32,
) -> Result<Vec<Outgoing>, AggregatorError> {
    (0..chunks)
        .map(|i| {
            Ok(Outgoing {
                topic: topic::job_model_chunk(fleet, job, version, i)?.to_string(),
                retain: true,
                payload: Vec::new(),
            })
        })
        .collect()
}

/// The retained announcement of the open round, or of the finished job with its final model.
///
/// # Errors
/// Sealing errors.
pub fn announce(
    sealer: &mut Sealer,
    fleet: &str,
    rec: &JobRecord,
    round: Option<&RoundRecord>,
    manifest: ChunkManifest,
    recipients: Option<&[u8]>,
    secure: Option<(SecAggSetup<'_>, u64)>,
) -> Result<Outgoing, AggregatorError> {
    let s = &rec.spec;
    // A secure job's round is announced open only with its session: devices that took it for a
    // plain round would send their updates in clear.
    let open = if s.secure_aggregation.is_some() && secure.is_none() {
        Phase::Closed
    } else {
        Phase::Open
    };
    let (number, phase, selection, deadline) = match (round, rec.phase) {
        (Some(r), JobPhase::Running) => (
            r.round,
            open,
            r.selection,
            secure.map_or(r.deadline_unix_ms, |(_, d)| d),
        ),
        _ => (
            rec.current_round,
            Phase::Finished,
            fedge_proto::msg::Selection::All,
            0,
        ),
    };
    let a = RoundAnnounce {
        job: &s.id,
        round: number,
        phase,
        model: ModelRef {
            name: s.model_name(),
            version: rec.model_version,
            sha256: manifest.sha256,
        },
        manifest,
        param_count: rec.param_count,
        codec: s.codec.to_proto(),
        selection,
        hyper: s.hyper.to_proto(),
        deadline_unix_ms: deadline,
        recipients: recipients.filter(|_| phase == Phase::Open),
        secagg: secure.map(|(a, _)| a).filter(|_| phase == Phase::Open),
    };
    let payload = fedge_proto::envelope::encode(&a)?;
    Ok(Outgoing {
        topic: topic::job_round(fleet, &s.id)?.to_string(),
        retain: true,
        payload: sealer.seal(Kind::RoundAnnounce, number, &payload)?,
    })
}

/// A secure aggregation relay to one device, on its `cmd` topic.
///
/// # Errors
/// Sealing errors.
pub fn secagg(
    sealer: &mut Sealer,
    fleet: &str,
    job: &str,
    round: u64,
    session: u64,
    r: &crate::secure::Relay,
) -> Result<Outgoing, AggregatorError> {
    let m = SecAggMsg {
        job,
        round,
        session,
        step: r.step,
        ids: &r.ids,
        body: &r.body,
    };
    let payload = fedge_proto::envelope::encode(&m)?;
    Ok(Outgoing {
        topic: topic::dev_cmd(fleet, &r.device)?.to_string(),
        retain: false,
        payload: sealer.seal(Kind::SecAgg, round, &payload)?,
    })
}

/// The ack of the update envelope `seq` from `device`.
///
/// # Errors
/// Sealing errors.
pub fn ack(
    sealer: &mut Sealer,
    fleet: &str,
    device: &str,
    seq: u64,
    round: u64,
    outcome: Outcome,
    detail: &str,
) -> Result<Outgoing, AggregatorError> {
    ack_of(
        sealer,
        fleet,
        device,
        (Kind::Update, seq, round),
        outcome,
        detail,
    )
}

/// The ack of an envelope of `kind`.
///
/// # Errors
/// Sealing errors.
pub fn ack_of(
    sealer: &mut Sealer,
    fleet: &str,
    device: &str,
    (kind, seq, round): (Kind, u64, u64),
    outcome: Outcome,
    detail: &str,
) -> Result<Outgoing, AggregatorError> {
    let detail = truncate(detail, 200);
    let a = Ack {
        kind,
        seq,
        round,
        outcome,
        detail,
    };
    let payload = fedge_proto::envelope::encode(&a)?;
    Ok(Outgoing {
        topic: topic::dev_cmd(fleet, device)?.to_string(),
        retain: false,
        payload: sealer.seal(Kind::Ack, round, &payload)?,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
