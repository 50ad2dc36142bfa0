//! What the store holds, record by record. Small records are JSON (readable with any redb
//! tool, and forward-compatible through `serde(default)`); parameter vectors are raw
//! little-endian f32 behind a fixed header.

use fedge_proto::msg::Selection;
use serde::{Deserialize, Serialize};

use crate::config::JobSpec;
use crate::error::StoreError;

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Lower-case hex of the Ed25519 public key.
    pub public_key: String,
    pub revoked: bool,
    pub registered_unix_ms: u64,
}

/// Whether a job still runs rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    Running,
    Finished,
}

/// A job and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    /// The sampling seed (the spec's, or drawn at creation).
    pub seed: u64,
    pub param_count: u32,
    /// The open round (1-based), or the last one once finished.
    pub current_round: u64,
    /// The latest global model version (0: the initial model; round `r` produces version `r`).
    pub model_version: u64,
    pub phase: JobPhase,
    pub created_unix_ms: u64,
    /// Why a job finished before its last round (operator stop, privacy budget).
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// One round of a job. Created open (`closed_unix_ms: None`) and closed by the aggregation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// The model version devices train from (`round - 1`).
    pub base_version: u64,
    pub selection: Selection,
    /// Registered, non-revoked devices the selection included when the round opened.
    pub selected: u32,
    pub opened_unix_ms: u64,
    pub deadline_unix_ms: u64,
    #[serde(default)]
    pub closed_unix_ms: Option<u64>,
    /// Updates counted in this round (on time and stale).
    #[serde(default)]
    pub accepted: u32,
    /// Of which stale updates from earlier rounds (late policy `down_weight`).
    #[serde(default)]
    pub stale: u32,
    /// Wall time of the strategy's aggregation.
    #[serde(default)]
    pub aggregate_ms: Option<f64>,
    /// sha256 (hex) of the model this round produced.
    #[serde(default)]
    pub result_sha256: Option<String>,
    /// Updates for this job refused while the round was open (any reason but duplicate).
    #[serde(default)]
    pub rejected: u32,
    /// Sample-weighted mean of the training loss and accuracy the devices reported with the
    /// aggregated updates (on their own data, before training).
    #[serde(default)]
    pub train_loss: Option<f64>,
    #[serde(default)]
    pub train_accuracy: Option<f64>,
    /// ε (at the job's `dp_delta`) of any device after this round, when the devices add
    /// Gaussian noise: the RDP accountant composed over every round so far, without
    /// amplification by sampling (the aggregator knows which devices took part).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// Set when an operator stopped the job during this round (no model produced).
    #[serde(default)]
    pub stopped: bool,
    /// Why the round produced no new model (a secure aggregation round that lost too many
    /// devices); the model stays as it was.
    #[serde(default)]
    pub failed: Option<String>,
}

/// An accepted, decoded update waiting for its round to close.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUpdate {
    pub device: String,
    /// The round it was trained for (below the counting round when stale).
    pub for_round: u64,
    pub seq: u64,
    pub num_samples: u64,
    /// The late policy's factor on the sample weight (1 when on time).
    pub staleness_weight: f32,
    pub loss: f32,
    pub accuracy: f32,
    pub delta: Vec<f32>,
}

const UPDATE_HEADER: usize = 1 + 8 + 8 + 4 + 4 + 4;

impl StoredUpdate {
    /// `version (1) ‖ seq ‖ num_samples ‖ staleness_weight f32 ‖ loss f32 ‖ accuracy f32 ‖
    /// delta f32...`,
    /// little-endian; `device` and `for_round` are in the key.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(UPDATE_HEADER + 4 * self.delta.len());
        out.push(1);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.num_samples.to_le_bytes());
        out.extend_from_slice(&self.staleness_weight.to_le_bytes());
        out.extend_from_slice(&self.loss.to_le_bytes());
        out.extend_from_slice(&self.accuracy.to_le_bytes());
        out.extend(crate::codec::f32_to_le(&self.delta));
        out
    }

    /// Parses [`StoredUpdate::to_bytes`].
    ///
    /// # Errors
    /// `Corrupt` on a wrong version or length.
    pub fn from_bytes(device: &str, for_round: u64, b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |d: &str| StoreError::Corrupt {
            what: format!("update of {device}"),
            detail: d.into(),
        };
        if b.len() < UPDATE_HEADER || b[0] != 1 || !(b.len() - UPDATE_HEADER).is_multiple_of(4) {
            return Err(corrupt("bad header or length"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let f32_at = |i: usize| f32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        Ok(Self {
            device: device.into(),
            for_round,
            seq: u64_at(1),
            num_samples: u64_at(9),
            staleness_weight: f32_at(17),
            loss: f32_at(21),
            accuracy: f32_at(25),
            delta: crate::codec::f32_from_le(&b[UPDATE_HEADER..]),
        })
    }
}

/// JSON encoding of a record.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db(e.to_string()))
}

/// JSON decoding of a record named `what`.
pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(
    what: &str,
    b: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
        what: what.into(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_update_round_trips_bit_exactly() {
        let u = StoredUpdate {
            device: "d1".into(),
            for_round: 3,
            seq: 42,
            num_samples: 17,
            staleness_weight: 0.5,
            loss: f32::NAN,
            accuracy: 0.75,
            delta: vec![1.5, -0.0, f32::MIN_POSITIVE],
        };
        let back = StoredUpdate::from_bytes("d1", 3, &u.to_bytes()).expect("parse");
        assert_eq!(
            back.delta.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            u.delta.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            (
                back.seq,
                back.num_samples,
                back.staleness_weight,
                back.accuracy
            ),
            (42, 17, 0.5, 0.75)
        );
        assert!(back.loss.is_nan());
        assert!(StoredUpdate::from_bytes("d1", 3, &u.to_bytes()[..20]).is_err());
    }
}
