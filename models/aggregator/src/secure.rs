//! Secure aggregation (SecAgg+) over MQTT, for jobs with `secure_aggregation`: one
//! [`Session`] per run of a round drives `fedge_fl::secagg::Server` through its five stages.
//!
//! The session is announced with the round (roster, parameters and a random session number);
//! devices train, then send their stage messages on their update topics as envelopes of kind
//! `SecAgg`; the aggregator relays what each device needs on its `cmd` topic. A stage closes
//! when every device it waits for has answered or when its deadline passes, and the round
//! fails with the protocol's reason once too few devices are left: it never waits on a device
//! that is gone. Nothing of a session is stored: the devices' keys exist only in memory on both
//! sides, so an aggregator that restarts runs the round again under a new session, and the
//! devices rejoin with the update they already trained.

use std::sync::Arc;

use fedge_fl::secagg::{Aggregate, Params, RoundSetup, SecAggError, Server, Stage, wire};
use fedge_proto::msg::{Reason, SecAggMsg, SecAggSetup, SecAggStep};

use crate::config::SecureAggSpec;
use crate::rules::Rejection;

/// A message for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    pub device: String,
    pub step: SecAggStep,
    pub ids: Vec<u8>,
    pub body: Vec<u8>,
}

/// What [`Session::poll`] decided.
#[derive(Debug)]
pub enum Progress {
    /// Nothing to do yet.
    Wait,
    /// A stage closed: send these.
    Relay(Vec<Relay>),
    /// The round is unmasked.
    Done(Box<Aggregate>),
    /// The round failed; the reason is for the round history.
    Failed(String),
}

/// One run of the protocol for one round.
pub struct Session {
    pub job: String,
    pub round: u64,
    pub session: u64,
    setup: Arc<RoundSetup>,
    /// Device ids in roster order.
    devices: Vec<String>,
    roster_bytes: Vec<u8>,
    server: Server,
    deadline_unix_ms: u64,
    stage_ms: u64,
    done: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("job", &self.job)
            .field("round", &self.round)
            .field("session", &self.session)
            .field("devices", &self.devices.len())
            .field("stage", &self.server.stage())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a session for `roster` (device id and Ed25519 key, in any order: the roster is
    /// sorted by id). Devices must train and advertise by `deadline_unix_ms`.
    ///
    /// # Errors
    /// Too few devices or parameters the protocol refuses, as text for the log.
    pub fn start(
        job: &str,
        round: u64,
        mut roster: Vec<(String, [u8; 32])>,
        spec: &SecureAggSpec,
        len: usize,
        deadline_unix_ms: u64,
    ) -> Result<Self, String> {
        roster.sort();
        let params = spec
            .params(roster.len(), len)
            .map_err(|e| format!("{} devices: {e}", roster.len()))?;
        let session = session_number()?;
        let keys: Vec<[u8; 32]> = roster.iter().map(|(_, k)| *k).collect();
        let setup = Arc::new(
            RoundSetup::with_session(job, round, session, keys.clone(), params)
                .map_err(|e| e.to_string())?,
        );
        Ok(Self {
            job: job.into(),
            round,
            session,
            server: Server::new(Arc::clone(&setup)),
            setup,
            devices: roster.into_iter().map(|(d, _)| d).collect(),
            roster_bytes: keys.concat(),
            deadline_unix_ms,
            stage_ms: spec.stage_ms,
            done: false,
        })
    }

    /// The announcement's part.
    pub fn announced(&self) -> SecAggSetup<'_> {
        let p = self.setup.params();
        SecAggSetup {
            session: self.session,
            neighbours: p.neighbours as u32,
            threshold: p.threshold as u32,
            clip: p.clip,
            quant_bits: p.quant_bits as u8,
            mod_bits: p.mod_bits as u8,
            roster: &self.roster_bytes,
        }
    }

    pub fn params(&self) -> &Params {
        self.setup.params()
    }

    /// When the current stage closes at the latest.
    pub fn deadline(&self) -> u64 {
        self.deadline_unix_ms
    }

    pub fn stage(&self) -> Stage {
        self.server.stage()
    }

    /// Devices in the roster.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// The largest message a device sends in this session, with room for the envelope.
    pub fn max_envelope(&self) -> usize {
        let body = self.setup.params().max_message_bytes(self.devices.len());
        usize::try_from(body)
            .unwrap_or(usize::MAX)
            .saturating_add(4096)
    }

    /// A device's message, already authenticated as `device`'s by its envelope. The protocol
    /// checks it again (every message is signed inside by its author's roster key).
    ///
    /// # Errors
    /// A [`Rejection`] with the reason and the protocol's error.
    pub fn receive(&mut self, device: &str, m: &SecAggMsg<'_>) -> Result<(), Rejection> {
        if m.session != self.session || m.round != self.round || self.done {
            return Err(Rejection::new(
                Reason::WrongRound,
                format!(
                    "secure aggregation session {} of round {} is not running (now: session {} of round {})",
                    m.session, m.round, self.session, self.round
                ),
            ));
        }
        let Some(me) = self.devices.iter().position(|d| d == device) else {
            return Err(Rejection::new(
                Reason::NotSelected,
                format!("{device} is not in the roster of round {}", self.round),
            ));
        };
        let me = me as u32;
        // The message must be the sender's own: the envelope (signed by the topic's device)
        // and the protocol message (signed by its author) name the same device.
        let own = |from: &mut dyn Iterator<Item = u32>| -> Result<(), SecAggError> {
            for other in from {
                if other != me {
                    return Err(SecAggError::Malformed {
                        reason: format!("device {me} sent a message of device {other}"),
                    });
                }
            }
            Ok(())
        };
        let r = match m.step {
            SecAggStep::Keys => wire::decode_keys(m.body).and_then(|k| {
                own(&mut k.iter().map(|x| x.from))?;
                self.server.receive_keys(k)
            }),
            SecAggStep::Shares => wire::decode_shares(m.body).and_then(|s| {
                own(&mut s.iter().map(|x| x.from))?;
                self.server.receive_shares(s)
            }),
            SecAggStep::Masked => wire::MaskedInput::from_bytes(m.body).and_then(|x| {
                own(&mut std::iter::once(x.from))?;
                self.server.receive_masked(x)
            }),
            SecAggStep::Confirmation => {
                // A confirmation travels alone; the relay of every confirmation reuses the list
                // encoding.
                wire::decode_confirmations(m.body).and_then(|mut c| match (c.pop(), c.is_empty()) {
                    (Some(one), true) => {
                        own(&mut std::iter::once(one.from))?;
                        self.server.receive_confirmation(one)
                    }
                    _ => Err(SecAggError::Malformed {
                        reason: "a confirmation message carries exactly one confirmation".into(),
                    }),
                })
            }
            SecAggStep::Reveals => wire::Reveals::from_bytes(m.body).and_then(|r| {
                own(&mut std::iter::once(r.from))?;
                self.server.receive_reveals(r)
            }),
            other => Err(SecAggError::Malformed {
                reason: format!("{other:?} is sent by the aggregator, not by devices"),
            }),
        };
        r.map_err(|e| {
            tracing::info!(job = %self.job, round = self.round, device, error = %e, "secure aggregation message refused");
            Rejection::new(reason_of(&e), e.to_string())
        })
    }

    /// Closes the current stage when every device it waits for has answered or its deadline
    /// has passed, and says what follows.
    pub fn poll(&mut self, now: u64) -> Progress {
        if self.done {
            return Progress::Wait;
        }
        let (heard, expected) = self.server.progress();
        if heard < expected && now < self.deadline_unix_ms {
            return Progress::Wait;
        }
        let stage = self.server.stage();
        tracing::info!(job = %self.job, round = self.round, %stage, heard, expected, "secure aggregation stage closes");
        let out = match self.close(stage) {
            Ok(p) => p,
            Err(e) => {
                self.done = true;
                let why = format!("secure aggregation failed: {e}");
                tracing::warn!(job = %self.job, round = self.round, reason = %why, "round failed");
                return Progress::Failed(why);
            }
        };
        self.deadline_unix_ms = now.saturating_add(self.stage_ms);
        if matches!(out, Progress::Done(_)) {
            self.done = true;
        }
        out
    }

    fn close(&mut self, stage: Stage) -> Result<Progress, SecAggError> {
        let relay = |device: u32, step, ids: Vec<u8>, body: Vec<u8>| Relay {
            device: self.devices[device as usize].clone(),
            step,
            ids,
            body,
        };
        Ok(match stage {
            Stage::AdvertiseKeys => {
                let u1 = self.server.close_keys()?;
                Progress::Relay(
                    u1.iter()
                        .map(|&d| {
                            let keys = wire::encode_keys(&self.server.keys_for(d));
                            relay(d, SecAggStep::NeighbourKeys, Vec::new(), keys)
                        })
                        .collect(),
                )
            }
            Stage::ShareKeys => {
                let u2 = self.server.close_shares()?;
                let ids = wire::encode_ids(&u2);
                Progress::Relay(
                    u2.iter()
                        .map(|&d| {
                            let items = wire::encode_shares(&self.server.shares_for(d));
                            relay(d, SecAggStep::NeighbourShares, ids.clone(), items)
                        })
                        .collect(),
                )
            }
            Stage::MaskedInput => {
                let u3 = self.server.close_masked()?;
                let ids = wire::encode_ids(&u3);
                Progress::Relay(
                    u3.iter()
                        .map(|&d| relay(d, SecAggStep::Survivors, ids.clone(), Vec::new()))
                        .collect(),
                )
            }
            Stage::Consistency => {
                let confs = self.server.close_confirmations()?;
                let body = wire::encode_confirmations(&confs);
                Progress::Relay(
                    confs
                        .iter()
                        .map(|c| relay(c.from, SecAggStep::Confirmations, Vec::new(), body.clone()))
                        .collect(),
                )
            }
            Stage::Unmask => Progress::Done(Box::new(self.server.finish()?)),
        })
    }
}

/// The protocol's error as a wire reason.
fn reason_of(e: &SecAggError) -> Reason {
    match e {
        SecAggError::BadSignature { .. } => Reason::BadSignature,
        SecAggError::Duplicate { .. } => Reason::Duplicate,
        SecAggError::WrongStage { .. } => Reason::Late,
        SecAggError::NotExpected { .. } | SecAggError::UnknownDevice { .. } => Reason::NotSelected,
        SecAggError::ShapeMismatch { .. } => Reason::WrongShape,
        SecAggError::NonFinite { .. } => Reason::NonFinite,
        _ => Reason::Malformed,
    }
}

/// A random session number from the system CSPRNG.
fn session_number() -> Result<u64, String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "system random generator failed".to_string())?;
    Ok(u64::from_le_bytes(b))
}

/// The mean of the survivors' updates, from the unmasked sum.
pub fn mean(agg: &Aggregate) -> Vec<f32> {
    let n = agg.survivors.len().max(1) as f32;
    agg.sum.iter().map(|s| s / n).collect()
}
