//! Store-side steps of the registry and of a job's life, each inside the caller's [`Txn`] so that
//! a step is all-or-nothing: register or revoke a device, create a job (model version 0 and
//! round 1 together), open a round, close a round (new model, strategy state, next round
//! together).

use fedge_proto::PublicKey;

use crate::config::JobSpec;
use crate::error::{ConfigError, StoreError};
use crate::records::{DeviceRecord, JobPhase, JobRecord, RoundRecord};
use crate::store::Txn;

/// Why a registry or job operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Registers `id` with `key`. An existing device keeps its revocation; a different key replaces
/// the stored one. Returns the record and whether anything changed.
///
/// # Errors
/// A bad id, or storage errors.
pub fn register(
    txn: &Txn,
    id: &str,
    key: &PublicKey,
    now: u64,
) -> Result<(DeviceRecord, bool), OpError> {
    fedge_proto::check_id(id)
        .map_err(|e| ConfigError::Invalid(format!("device id {id:?}: {e}")))?;
    let hex = key.to_hex().to_string();
    let rec = match txn.device(id)? {
        Some(old) if old.public_key == hex => return Ok((old, false)),
        Some(old) => DeviceRecord {
            public_key: hex,
            ..old
        },
        None => DeviceRecord {
            public_key: hex,
            revoked: false,
            registered_unix_ms: now,
        },
    };
    txn.put_device(id, &rec)?;
    Ok((rec, true))
}

/// Revokes `id`: from now on its messages are refused with reason `revoked`.
///
/// # Errors
/// `NotFound`, or storage errors.
pub fn revoke(txn: &Txn, id: &str) -> Result<DeviceRecord, OpError> {
    let mut rec = txn
        .device(id)?
        .ok_or_else(|| OpError::NotFound(format!("device {id}")))?;
    rec.revoked = true;
    txn.put_device(id, &rec)?;
    Ok(rec)
}

/// Creates a job: its record, model version 0 and round 1. `max_packet` is the broker packet
/// limit an f32 update of the model must fit in.
///
/// # Errors
/// `Exists`, an unreadable or too large model, or storage errors.
pub fn create_job(
    txn: &Txn,
    spec: JobSpec,
    max_packet: usize,
    now: u64,
) -> Result<(JobRecord, RoundRecord), OpError> {
    if txn.job(&spec.id)?.is_some() {
        return Err(OpError::Exists(format!("job {}", spec.id)));
    }
    let params = spec.initial_params()?;
    if params.len() * 4 + crate::engine::ENVELOPE_HEADROOM > max_packet {
        return Err(OpError::Invalid(ConfigError::Invalid(format!(
            "job {}: an f32 update of {} parameters does not fit broker.max_packet_bytes = {max_packet}",
            spec.id,
            params.len()
        ))));
    }
    let seed = spec.seed.unwrap_or_else(random_seed);
    let mut rec = JobRecord {
        param_count: params.len() as u32,
        spec,
        seed,
        current_round: 0,
        model_version: 0,
        phase: JobPhase::Running,
        created_unix_ms: now,
        finish_reason: None,
    };
    if let (Some(budget), Some(first)) = (rec.spec.dp_epsilon_budget, epsilon_after(&rec.spec, 1))
        && first > budget
    {
        return Err(OpError::Invalid(ConfigError::Invalid(format!(
            "job {}: one round already spends epsilon = {first:.4} > dp_epsilon_budget = {budget} \
             (raise hyper.noise_multiplier)",
            rec.spec.id
        ))));
    }
    txn.put_model(&rec.spec.id, 0, &params)?;
    let round = open_round(txn, &mut rec, 1, now)?;
    Ok((rec, round))
}

fn random_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // A failing system RNG only makes the sampling predictable, never wrong.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// Opens round `number` of `rec`: selects devices among those eligible now and stores the round
/// and the job.
///
/// # Errors
/// Storage errors.
pub fn open_round(
    txn: &Txn,
    rec: &mut JobRecord,
    number: u64,
    now: u64,
) -> Result<RoundRecord, StoreError> {
    let eligible = txn.eligible_devices()?;
    let ids: Vec<&str> = eligible.iter().map(String::as_str).collect();
    let s = &rec.spec;
    let (selection, selected) = crate::rules::select(
        &ids,
        &s.id,
        number,
        s.fraction,
        s.over_selection,
        s.min_devices,
        rec.seed,
    );
    let round = RoundRecord {
        round: number,
        base_version: number - 1,
        selection,
        selected,
        opened_unix_ms: now,
        deadline_unix_ms: now.saturating_add(s.deadline_ms),
        closed_unix_ms: None,
        accepted: 0,
        stale: 0,
        aggregate_ms: None,
        result_sha256: None,
        rejected: 0,
        train_loss: None,
        train_accuracy: None,
        epsilon: None,
        stopped: false,
        failed: None,
    };
    rec.current_round = number;
    txn.put_round(&s.id, &round)?;
    txn.put_job(rec)?;
    Ok(round)
}

/// Stops a running job: its open round is closed without a model (`stopped`), the job is
/// finished. Returns the stopped round.
///
/// # Errors
/// [`OpError::NotFound`], [`OpError::Exists`] when it is already finished, or the store's.
pub fn stop_job(
    txn: &Txn,
    rec: &mut JobRecord,
    round: Option<&mut RoundRecord>,
    now: u64,
) -> Result<(), OpError> {
    if rec.phase == JobPhase::Finished {
        return Err(OpError::Conflict(format!(
            "job {} has already finished",
            rec.spec.id
        )));
    }
    if let Some(r) = round {
        r.closed_unix_ms = Some(now);
        r.stopped = true;
        txn.put_round(&rec.spec.id, r)?;
        txn.delete_updates(&rec.spec.id, r.round)?;
    }
    rec.phase = JobPhase::Finished;
    rec.finish_reason = Some("stopped by the operator".into());
    txn.put_job(rec)?;
    Ok(())
}

/// ε (at the job's `dp_delta`) of any device after `rounds` rounds of the devices' Gaussian noise,
/// from the RDP accountant with sampling rate 1 (no amplification by sampling is claimed: the
/// aggregator knows who took part). `None` without noise.
///
/// Central DP noise counts with the job's selection fraction as sampling rate (the devices'
/// participation is hidden by the aggregator's noise from whoever sees the models); both kinds
/// compose when both are configured.
pub fn epsilon_after(spec: &JobSpec, rounds: u64) -> Option<f64> {
    use fedge_fl::dp::{RdpAccountant, SampledGaussian};
    let h = &spec.hyper;
    if !spec.has_noise() || rounds == 0 {
        return None;
    }
    let mut acc = RdpAccountant::new();
    if h.noise_multiplier > 0.0 && h.clip_norm > 0.0 {
        acc.compose(
            &SampledGaussian::new(f64::from(h.noise_multiplier), 1.0).ok()?,
            rounds,
        );
    }
    if let Some(c) = spec.central_dp {
        let q = spec.fraction.clamp(0.0, 1.0);
        acc.compose(
            &SampledGaussian::new(f64::from(c.noise_multiplier), q).ok()?,
            rounds,
        );
    }
    acc.epsilon_and_order(spec.dp_delta)
        .ok()
        .map(|(e, _)| e)
        .filter(|e| e.is_finite())
}

/// Closes `round` with the aggregated `model` and the strategy's `state`: stores both, drops
/// the round's update bodies, and opens the next round or finishes the job. Returns the next
/// round, if any.
///
/// # Errors
/// Storage errors.
pub fn close_round(
    txn: &Txn,
    rec: &mut JobRecord,
    round: &mut RoundRecord,
    model: &[f32],
    state: &[u8],
    now: u64,
) -> Result<Option<RoundRecord>, StoreError> {
    let job = rec.spec.id.clone();
    round.closed_unix_ms = Some(now);
    round.result_sha256 =
        Some(fedge_proto::hex::encode32(&crate::codec::model_sha256(model)).to_string());
    txn.put_round(&job, round)?;
    txn.put_model(&job, round.round, model)?;
    txn.put_strategy_state(&job, state)?;
    txn.delete_updates(&job, round.round)?;
    rec.model_version = round.round;
    if round.round >= rec.spec.rounds {
        rec.phase = JobPhase::Finished;
        txn.put_job(rec)?;
        return Ok(None);
    }
    let next = round.round + 1;
    if let (Some(budget), Some(e)) = (rec.spec.dp_epsilon_budget, epsilon_after(&rec.spec, next))
        && e > budget
    {
        rec.phase = JobPhase::Finished;
        rec.finish_reason = Some(format!(
            "privacy budget: round {next} would spend epsilon = {e:.4} > {budget}"
        ));
        tracing::info!(job = %rec.spec.id, round = next, epsilon = e, budget, "privacy budget reached; job finished");
        txn.put_job(rec)?;
        return Ok(None);
    }
    open_round(txn, rec, round.round + 1, now).map(Some)
}
