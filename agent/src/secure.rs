//! The device's side of a secure aggregation (SecAgg+) round: one [`SecureTask`] per round in
//! progress wraps `fedge_fl::secagg::Client` and turns each relay of the aggregator into the
//! next stage's message. The update stays in memory, in clear only here; what leaves the
//! device is masked (`docs/secagg.md`).

use std::sync::Arc;

use fedge_fl::secagg::{Client, SecAggError, wire};
use fedge_proto::msg::{Reason, SecAggMsg, SecAggStep};
use ring::signature::Ed25519KeyPair;

use crate::fl::Trained;
use crate::trust::Rejection;

/// A message for the aggregator.
#[derive(Debug)]
pub struct Reply {
    pub step: SecAggStep,
    pub body: Vec<u8>,
}

/// A round in progress.
pub struct SecureTask {
    trained: Trained,
    client: Client,
}

impl std::fmt::Debug for SecureTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureTask")
            .field("job", &self.trained.job)
            .field("round", &self.trained.round)
            .field("session", &self.session())
            .finish_non_exhaustive()
    }
}

impl SecureTask {
    /// Joins the session of `t` (which must carry one) as the device with public key `key`:
    /// returns the task and its stage 1 message (signed keys).
    ///
    /// # Errors
    /// Not in the roster, or the random generator failed.
    pub fn start(
        trained: Trained,
        key: &[u8; 32],
        signer: &Ed25519KeyPair,
    ) -> Result<(Self, Reply), Rejection> {
        let Some((setup, _)) = &trained.secagg else {
            return Err(Rejection::new(
                Reason::Internal,
                "not a secure aggregation round",
            ));
        };
        let mut client =
            Client::new(Arc::clone(&setup.0), key).map_err(|e| rejection(&trained, e))?;
        let keys = client
            .advertise(signer)
            .map_err(|e| rejection(&trained, e))?;
        let reply = Reply {
            step: SecAggStep::Keys,
            body: wire::encode_keys(&keys),
        };
        Ok((Self { trained, client }, reply))
    }

    pub fn job(&self) -> &str {
        &self.trained.job
    }

    pub fn round(&self) -> u64 {
        self.trained.round
    }

    pub fn session(&self) -> u64 {
        self.trained
            .secagg
            .as_ref()
            .map_or(0, |(s, _)| s.0.session())
    }

    /// The largest relay this task waits for, with room for the envelope.
    pub fn max_relay(&self) -> usize {
        self.trained.secagg.as_ref().map_or(0, |(s, _)| {
            let body = s.0.params().max_message_bytes(s.0.roster().len());
            usize::try_from(body)
                .unwrap_or(usize::MAX)
                .saturating_add(4096)
        })
    }

    /// The training result, to join a new session of the same round.
    pub fn into_trained(self) -> Trained {
        self.trained
    }

    /// The next stage's message for the relay `m`; `None` for a relay not meant for this stage.
    ///
    /// # Errors
    /// The relay is malformed or the protocol refuses it (tampering, an inconsistent
    /// aggregator, too few neighbours left): the device leaves the round.
    pub fn step(
        &mut self,
        m: &SecAggMsg<'_>,
        signer: &Ed25519KeyPair,
    ) -> Result<Option<Reply>, Rejection> {
        let Some((_, update)) = &self.trained.secagg else {
            return Ok(None);
        };
        let c = &mut self.client;
        let r = match m.step {
            SecAggStep::NeighbourKeys => wire::decode_keys(m.body)
                .and_then(|keys| c.share(signer, &keys))
                .map(|items| Reply {
                    step: SecAggStep::Shares,
                    body: wire::encode_shares(&items),
                }),
            SecAggStep::NeighbourShares => wire::decode_ids(m.ids)
                .and_then(|u2| Ok((u2, wire::decode_shares(m.body)?)))
                .and_then(|(u2, items)| c.mask(signer, &u2, &items, update))
                .map(|x| Reply {
                    step: SecAggStep::Masked,
                    body: x.to_bytes(),
                }),
            SecAggStep::Survivors => wire::decode_ids(m.ids)
                .and_then(|u3| c.confirm(signer, &u3))
                .map(|conf| Reply {
                    step: SecAggStep::Confirmation,
                    body: wire::encode_confirmations(&[conf]),
                }),
            SecAggStep::Confirmations => wire::decode_confirmations(m.body)
                .and_then(|confs| c.unmask(signer, &confs))
                .map(|r| Reply {
                    step: SecAggStep::Reveals,
                    body: r.to_bytes(),
                }),
            _ => return Ok(None),
        };
        r.map(Some).map_err(|e| {
            tracing::warn!(job = %self.trained.job, round = self.trained.round, error = %e, "secure aggregation: leaving the round");
            rejection(&self.trained, e)
        })
    }
}

fn rejection(t: &Trained, e: SecAggError) -> Rejection {
    let reason = match e {
        SecAggError::BadSignature { .. } => Reason::BadSignature,
        SecAggError::ShapeMismatch { .. } => Reason::WrongShape,
        SecAggError::NonFinite { .. } => Reason::NonFinite,
        SecAggError::Crypto(_) => Reason::Internal,
        _ => Reason::Malformed,
    };
    Rejection::new(
        reason,
        format!("secure aggregation, round {} of {}: {e}", t.round, t.job),
    )
}
