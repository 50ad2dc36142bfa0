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
    /// The masked input went out: from then on the device never joins another session of
    /// the round, or an aggregator could unmask sums over different sets of the same inputs.
    masked: bool,
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
        Ok((
            Self {
                trained,
                client,
                masked: false,
            },
            reply,
        ))
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

    /// The training result, to join a new session of the same round; `None` once the masked
    /// input was sent (see [`SecureTask`]).
    pub fn into_trained(self) -> Option<Trained> {
        (!self.masked).then_some(self.trained)
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
                .map(|x| {
                    self.masked = true;
                    Reply {
                        step: SecAggStep::Masked,
                        body: x.to_bytes(),
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fl::SecureSetup;
    use fedge_fl::secagg::{Params, RoundSetup, Server};
    use fedge_proto::Signer;

    fn relay<'a>(step: SecAggStep, ids: &'a [u8], body: &'a [u8]) -> SecAggMsg<'a> {
        SecAggMsg {
            job: "j",
            round: 1,
            session: 5,
            step,
            ids,
            body,
        }
    }

    /// Three devices; device 0 is the agent's task, the others bare clients.
    #[test]
    fn a_task_rejoins_a_new_session_only_before_its_masked_input_went_out() {
        let signers: Vec<Signer> = (0..3).map(|_| Signer::generate().expect("key").0).collect();
        let mut keyed: Vec<(Signer, [u8; 32])> = signers
            .into_iter()
            .map(|s| {
                let k = s.public_key().0;
                (s, k)
            })
            .collect();
        keyed.sort_by_key(|(_, k)| *k);
        let roster: Vec<[u8; 32]> = keyed.iter().map(|(_, k)| *k).collect();
        let params = Params::new(3, 4, 1.0).expect("params");
        let setup = Arc::new(RoundSetup::with_session("j", 1, 5, roster, params).expect("setup"));
        let trained = Trained {
            job: "j".into(),
            round: 1,
            version: 0,
            num_samples: 2,
            loss: 0.0,
            accuracy: 0.0,
            delta: Vec::new(),
            recipient: None,
            secagg: Some((SecureSetup(Arc::clone(&setup)), vec![0.1, -0.2, 0.3, 0.0])),
        };
        let (me, my_key) = (&keyed[0].0, keyed[0].1);
        let (mut task, keys) = SecureTask::start(trained, &my_key, me.key_pair()).expect("start");
        let mut server = Server::new(Arc::clone(&setup));
        server
            .receive_keys(wire::decode_keys(&keys.body).expect("keys"))
            .expect("mine");
        let mut others: Vec<Client> = keyed[1..]
            .iter()
            .map(|(s, k)| {
                let mut c = Client::new(Arc::clone(&setup), k).expect("client");
                server
                    .receive_keys(c.advertise(s.key_pair()).expect("advertise"))
                    .expect("theirs");
                c
            })
            .collect();
        server.close_keys().expect("stage 1");
        let mine = wire::encode_keys(&server.keys_for(0));
        let shares = task
            .step(&relay(SecAggStep::NeighbourKeys, &[], &mine), me.key_pair())
            .expect("share")
            .expect("a reply");
        assert_eq!(shares.step, SecAggStep::Shares);
        server
            .receive_shares(wire::decode_shares(&shares.body).expect("items"))
            .expect("my items");
        for (i, (c, (s, _))) in others.iter_mut().zip(&keyed[1..]).enumerate() {
            let items = c
                .share(s.key_pair(), &server.keys_for(i as u32 + 1))
                .expect("share");
            server.receive_shares(items).expect("their items");
        }
        let u2 = server.close_shares().expect("stage 2");
        // A relay of another step is not this stage's: nothing to send.
        assert!(
            task.step(&relay(SecAggStep::Keys, &[], &[]), me.key_pair())
                .expect("ignored")
                .is_none()
        );
        // Not yet masked: it could rejoin a new session with the same update.
        let ids = wire::encode_ids(&u2);
        let items = wire::encode_shares(&server.shares_for(0));
        let masked = task
            .step(
                &relay(SecAggStep::NeighbourShares, &ids, &items),
                me.key_pair(),
            )
            .expect("mask")
            .expect("a reply");
        assert_eq!(masked.step, SecAggStep::Masked);
        assert!(
            task.into_trained().is_none(),
            "after its masked input a device joins no other session of the round"
        );
    }

    #[test]
    fn a_relay_that_does_not_decode_makes_the_device_leave_with_a_reason() {
        let s = Signer::generate().expect("key").0;
        let others: Vec<[u8; 32]> = (0..2)
            .map(|_| Signer::generate().expect("key").0.public_key().0)
            .collect();
        let key = s.public_key().0;
        let roster = vec![key, others[0], others[1]];
        let params = Params::new(3, 2, 1.0).expect("params");
        let setup = Arc::new(RoundSetup::with_session("j", 1, 5, roster, params).expect("setup"));
        let trained = Trained {
            job: "j".into(),
            round: 1,
            version: 0,
            num_samples: 1,
            loss: 0.0,
            accuracy: 0.0,
            delta: Vec::new(),
            recipient: None,
            secagg: Some((SecureSetup(setup), vec![0.0, 0.0])),
        };
        let (mut task, _) = SecureTask::start(trained, &key, s.key_pair()).expect("start");
        let r = task
            .step(
                &relay(SecAggStep::NeighbourKeys, &[], &[1, 2, 3]),
                s.key_pair(),
            )
            .expect_err("garbage");
        assert_eq!(r.reason, Reason::Malformed);
        assert!(r.detail.contains("round 1 of j"), "{}", r.detail);
    }
}
