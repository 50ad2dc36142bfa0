//! The judgement of one update envelope, inside the batch's write transaction: the protocol's
//! receive order (bound, decode, sender, signature, kind, freshness, decryption for jobs that
//! seal updates), then the round rules,
//! then the delta. An accepted update is written to the transaction; its ack waits for the
//! commit.

use std::collections::BTreeMap;

use fedge_proto::msg::{Outcome, Reason, SecAggMsg, Update};
use fedge_proto::replay::{Freshness, freshness};
use fedge_proto::topic::Topic;
use fedge_proto::{Envelope, Kind, ProtoError, PublicKey};

use crate::engine::JobRun;
use crate::error::StoreError;
use crate::records::StoredUpdate;
use crate::rules::{Rejection, Timing};
use crate::store::Txn;

/// Bound on envelopes for jobs this aggregator does not run.
const UNKNOWN_JOB_BOUND: usize = 64 << 10;

/// What to answer, and to whom.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The device named by the topic (the ack goes to its `cmd` topic).
    pub device: String,
    /// The update envelope's sequence (0 when it could not be decoded).
    pub seq: u64,
    pub round: u64,
    pub outcome: Outcome,
    pub detail: String,
    /// The job whose round counted the update, when accepted.
    pub accepted_in: Option<String>,
    /// The sequence number was fresh and is now the sender's last.
    pub fresh: bool,
    /// The envelope's kind: `Update`, or `SecAgg` for secure aggregation messages (acked only
    /// when refused).
    pub kind: Kind,
}

enum Stop {
    Reject(Rejection),
    Store(StoreError),
}

impl From<Rejection> for Stop {
    fn from(r: Rejection) -> Self {
        Self::Reject(r)
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<ProtoError> for Stop {
    fn from(e: ProtoError) -> Self {
        Self::Reject(Rejection::new(Reason::of(e), e.to_string()))
    }
}

fn reject(reason: Reason, detail: impl Into<String>) -> Stop {
    Stop::Reject(Rejection::new(reason, detail))
}

/// Judges the envelope `wire` received on `topic`. `None`: not an update topic of `fleet`.
///
/// # Errors
/// Storage errors only; every refusal is a [`Verdict`].
pub fn judge(
    txn: &Txn,
    jobs: &mut BTreeMap<String, JobRun>,
    fleet: &str,
    topic: &str,
    wire: &[u8],
) -> Result<Option<Verdict>, StoreError> {
    let Some(Topic::JobUpdate {
        fleet: f,
        job,
        device,
    }) = Topic::parse(topic)
    else {
        return Ok(None);
    };
    if f != fleet {
        return Ok(None);
    }
    let mut v = Verdict {
        device: device.to_string(),
        seq: 0,
        round: 0,
        outcome: Outcome::Accepted,
        detail: String::new(),
        accepted_in: None,
        fresh: false,
        kind: Kind::Update,
    };
    match judge_envelope(txn, jobs, job, device, wire, &mut v) {
        Ok(()) => {}
        Err(Stop::Reject(r)) => {
            if v.fresh {
                txn.set_last_refusal(device, v.seq, r.reason)?;
            }
            v.outcome = Outcome::Rejected(r.reason);
            v.detail = r.detail;
        }
        Err(Stop::Store(e)) => return Err(e),
    }
    Ok(Some(v))
}

fn judge_envelope(
    txn: &Txn,
    jobs: &mut BTreeMap<String, JobRun>,
    job: &str,
    device: &str,
    wire: &[u8],
    v: &mut Verdict,
) -> Result<(), Stop> {
    let bound = jobs
        .get(job)
        .map_or(UNKNOWN_JOB_BOUND, JobRun::max_envelope);
    let env = authenticate(txn, device, wire, bound, v)?;
    if let Some((_, counted_in)) = txn.seen(device, env.seq)? {
        v.outcome = Outcome::Duplicate;
        v.detail = format!("already accepted in round {counted_in}");
        return Ok(());
    }
    if env.kind == Kind::SecAgg
        && txn.last_seq(device)? == Some(env.seq)
        && txn.last_refusal(device, env.seq)?.is_none()
    {
        // Delivered again (QoS 1): it was taken the first time.
        v.outcome = Outcome::Duplicate;
        v.detail = "secure aggregation message already taken".into();
        return Ok(());
    }
    check_fresh(txn, device, env.seq)?;
    v.fresh = true;
    if env.kind == Kind::SecAgg {
        return secure(jobs, job, device, env.payload);
    }
    if jobs
        .get(job)
        .is_some_and(|r| r.rec.spec.secure_aggregation.is_some())
    {
        return Err(reject(
            Reason::WrongKind,
            format!("job {job:?} runs secure aggregation: plain updates are not taken"),
        ));
    }
    let opened;
    let payload = match jobs.get_mut(job).filter(|r| r.rec.spec.encrypt_updates) {
        Some(run) => {
            opened = run.sealing.open(job, device, env.round, env.payload)?;
            opened.as_slice()
        }
        None => env.payload,
    };
    let update: Update<'_> = fedge_proto::envelope::decode(payload)?;
    v.round = update.round;
    if update.job != job {
        return Err(reject(
            Reason::WrongJob,
            format!("update names job {:?} on job {job:?}'s topic", update.job),
        ));
    }
    let run = jobs
        .get_mut(job)
        .ok_or_else(|| reject(Reason::WrongJob, format!("no job {job:?}")))?;
    admit(txn, run, env.round, device, env.seq, &update, v)
}

/// A secure aggregation message, after the envelope's checks: to the job's session.
fn secure(
    jobs: &mut BTreeMap<String, JobRun>,
    job: &str,
    device: &str,
    payload: &[u8],
) -> Result<(), Stop> {
    let m: SecAggMsg<'_> = fedge_proto::envelope::decode(payload)?;
    if m.job != job {
        return Err(reject(
            Reason::WrongJob,
            format!("message names job {:?} on job {job:?}'s topic", m.job),
        ));
    }
    let session = jobs
        .get_mut(job)
        .ok_or_else(|| reject(Reason::WrongJob, format!("no job {job:?}")))?
        .secure
        .as_mut()
        .ok_or_else(|| {
            reject(
                Reason::WrongRound,
                format!("no secure aggregation session of job {job:?} is running"),
            )
        })?;
    session.receive(device, &m).map_err(Stop::Reject)
}

/// Bound, decode, sender = topic device, registered, not revoked, signature, kind.
fn authenticate<'w>(
    txn: &Txn,
    device: &str,
    wire: &'w [u8],
    bound: usize,
    v: &mut Verdict,
) -> Result<Envelope<'w>, Stop> {
    let unverified = Envelope::open(wire, bound)?;
    v.seq = unverified.seq();
    let sender = unverified.sender();
    if sender != device {
        return Err(reject(
            Reason::Malformed,
            format!("sender {sender:?} on {device:?}'s topic"),
        ));
    }
    let rec = txn
        .device(sender)?
        .ok_or_else(|| reject(Reason::UnknownSender, format!("{sender} is not registered")))?;
    if rec.revoked {
        return Err(reject(Reason::Revoked, format!("{sender} is revoked")));
    }
    let key = PublicKey::from_hex(&rec.public_key)
        .map_err(|_| reject(Reason::Internal, "stored key is invalid"))?;
    let env = unverified.verify(&key)?;
    v.round = env.round;
    v.kind = env.kind;
    if !matches!(env.kind, Kind::Update | Kind::SecAgg) {
        return Err(reject(
            Reason::WrongKind,
            format!("{:?} on an update topic", env.kind),
        ));
    }
    Ok(env)
}

/// Replay protection: `seq` must be above the last verified one, which it then becomes. The
/// retransmission of the last envelope, refused before, gets the same answer again.
fn check_fresh(txn: &Txn, device: &str, seq: u64) -> Result<(), Stop> {
    let last = txn.last_seq(device)?;
    match freshness(last, seq) {
        Freshness::Fresh => {
            txn.set_last_seq(device, seq)?;
            Ok(())
        }
        Freshness::Duplicate => {
            let reason = txn.last_refusal(device, seq)?.unwrap_or(Reason::Replay);
            Err(reject(reason, "retransmission of a refused update"))
        }
        Freshness::Replay => Err(reject(
            Reason::Replay,
            format!("seq {seq} not above {}", last.unwrap_or(0)),
        )),
    }
}

/// The round rules and the delta checks; on success stores the update in the open round.
fn admit(
    txn: &Txn,
    run: &mut JobRun,
    envelope_round: u64,
    device: &str,
    seq: u64,
    u: &Update<'_>,
    v: &mut Verdict,
) -> Result<(), Stop> {
    let job = run.rec.spec.id.clone();
    let Some(ctx) = run.ctx() else {
        return Err(if u.round <= run.rec.current_round {
            reject(Reason::Late, "the job has finished")
        } else {
            reject(Reason::WrongRound, "the job has finished")
        });
    };
    let timing = crate::rules::timing(&ctx, envelope_round, u)?;
    let selection = match timing {
        Timing::OnTime => run.round.as_ref().map(|r| r.selection),
        Timing::Stale { .. } => txn.round(&job, u.round)?.map(|r| r.selection),
    }
    .ok_or_else(|| reject(Reason::Internal, format!("round {} is not stored", u.round)))?;
    if !selection.includes(&job, u.round, device) {
        return Err(reject(
            Reason::NotSelected,
            format!("not selected for round {}", u.round),
        ));
    }
    if let Some(prev) = txn.contribution(&job, u.round, device)? {
        return Err(reject(
            Reason::Duplicate,
            format!("round {} already counts update seq {prev}", u.round),
        ));
    }
    if u.num_samples == 0 {
        return Err(reject(Reason::Malformed, "num_samples is 0"));
    }
    let delta = crate::rules::check_delta(&ctx, u.delta)?;
    let factor = match timing {
        Timing::OnTime => 1.0,
        Timing::Stale { factor, .. } => factor,
    };
    let stored = StoredUpdate {
        device: device.to_string(),
        for_round: u.round,
        seq,
        num_samples: u.num_samples,
        staleness_weight: factor as f32,
        loss: u.loss,
        accuracy: u.accuracy,
        delta,
    };
    let open = run
        .round
        .as_mut()
        .ok_or_else(|| reject(Reason::Internal, "no open round"))?;
    txn.put_update(&job, open.round, &stored)?;
    open.accepted += 1;
    if let Timing::Stale { staleness, .. } = timing {
        open.stale += 1;
        v.detail = format!("counted in round {} with staleness {staleness}", open.round);
    }
    txn.put_round(&job, open)?;
    v.accepted_in = Some(job);
    Ok(())
}
