//! The agent's core: a synchronous state machine with no network and no async runtime. It is fed
//! link events, timer ticks and the outcomes of blocking jobs, and answers with [`Action`]s for
//! the service to carry out (publish, subscribe, run an install off the reactor, ...). It owns the
//! device's disk state: outbox, transfers, replay guard, sequence numbers.
//!
//! Every inbound message goes through [`Trust::open`] and, for commands and acks, the persisted
//! replay guard, before it is acted on. Refusals are counted and reported as telemetry events.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use fedge_proto::chunk::{Chunk, ChunkManifest};
use fedge_proto::envelope::{decode, encode};
use fedge_proto::msg::{
    Ack, AggregatorCert, Command, Outcome, Phase, Reason, RoundAnnounce, SecAggMsg, Status, Update,
};
use fedge_proto::replay::Freshness;
use fedge_proto::topic::{self, Topic};
use fedge_proto::{Envelope, Kind, ProtoError, Signer, check_id};

use crate::config::{CHUNK_OVERHEAD, Config, Limits};
use crate::fl::{Learner, TrainJob, Trained};
use crate::inflight::{Inflight, Tag};
use crate::outbox::{Class, Outbox};
use crate::seq::Sequencer;
use crate::state::StateFile;
use crate::store::{Failure, ModelInfo};
use crate::telemetry::{Recorder, Snapshot, Stats, rss_bytes};
use crate::transfer::{StoreError, Transfer, Want, next_window};
use crate::trust::{Rejection, Trust};

/// The two clocks the core needs: a monotonic one for scheduling and the wall clock for event
/// timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub unix_ms: u64,
}

/// What the core asks the service to do.
#[derive(Debug)]
pub enum Action {
    /// QoS 1 publish; report a refusal with [`Agent::on_refused`] (and refuse the rest of the
    /// batch's publishes too, to keep them in order).
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        tag: Tag,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// Assemble, verify and install the completed transfer, off the reactor; then call
    /// [`Agent::on_install_done`].
    Install(Transfer),
    /// Switch to the previous healthy version, off the reactor; then call
    /// [`Agent::on_rollback_done`].
    Rollback,
    /// Train on the local data for a federated round, off the reactor; then call
    /// [`Agent::on_train_done`].
    Train(Box<TrainJob>),
    /// Disconnect cleanly (after the offline status was acknowledged).
    Disconnect,
}

/// What the core is built from (opened by the service).
#[derive(Debug)]
pub struct Parts {
    pub signer: Arc<Signer>,
    pub seq: Arc<Mutex<Sequencer>>,
    pub outbox: Outbox,
    pub state: StateFile,
    pub chunks_root: PathBuf,
    pub model: Option<ModelInfo>,
    pub stats: Arc<Stats>,
    /// The federated-learning client, when the configuration has a `[learn]` section.
    pub learner: Option<Learner>,
}

/// The core state machine; see the module docs.
#[derive(Debug)]
pub struct Agent {
    device: String,
    fleet: String,
    cmd_topic: String,
    desired_topic: String,
    /// The operator's certificate of the aggregator key (retained).
    aggregator_topic: String,
    status_topic: String,
    telemetry_topic: String,
    signer: Arc<Signer>,
    trust: Trust,
    limits: Limits,
    event_delay_ms: u64,
    default_interval_s: u32,
    seq: Arc<Mutex<Sequencer>>,
    outbox: Outbox,
    inflight: Inflight,
    state: StateFile,
    chunks_root: PathBuf,
    transfer: Option<Transfer>,
    chunk_subs: BTreeSet<u32>,
    /// The transfer a running install job works on.
    installing: Option<Want>,
    /// An install or rollback job is running.
    busy: bool,
    model: Option<ModelInfo>,
    connected: bool,
    cmd_subscribed: bool,
    closing: bool,
    started_ms: u64,
    next_telemetry_ms: u64,
    flush_at_ms: Option<u64>,
    recorder: Recorder,
    stats: Arc<Stats>,
    learner: Option<Learner>,
    learn_subscribed: bool,
    max_packet: usize,
    /// Sealed updates not yet acknowledged, per job: (seq, the update), kept to seal again if
    /// the aggregator announces the same round with a new key (it restarted). Memory only.
    resealable: std::collections::BTreeMap<String, (u64, Trained)>,
    /// Secure aggregation rounds in progress, per job. Memory only: the session keys never
    /// touch the disk.
    secure: std::collections::BTreeMap<String, crate::secure::SecureTask>,
    /// The latest secure aggregation session announced per job: training that ends after a
    /// newer session of its round was announced joins that one.
    sessions: std::collections::BTreeMap<String, crate::fl::SecureSetup>,
    /// The latest announcement per job that arrived while no aggregator key was known (one per
    /// job, each within `max_message_bytes`), checked again when a certificate brings the key.
    unverified_rounds: std::collections::BTreeMap<String, Vec<u8>>,
    /// The aggregator key and id the configuration pins, trusted again when a certified key
    /// expires.
    pinned: (Option<fedge_proto::PublicKey>, Option<String>),
}

/// A signed `Status` envelope (the retained status and the last will).
///
/// # Errors
/// Encoding errors (an invalid device id).
pub fn seal_status(
    signer: &Signer,
    device: &str,
    seq: u64,
    online: bool,
    model: Option<&ModelInfo>,
) -> Result<Vec<u8>, ProtoError> {
    let status = Status {
        online,
        agent_version: env!("CARGO_PKG_VERSION"),
        model: model.map(ModelInfo::as_ref),
        public_key: signer.public_key(),
    };
    Envelope::new(Kind::Status, device, seq, 0, &encode(&status)?).seal(signer)
}

impl Agent {
    /// Builds the core, resuming a transfer a previous run left unfinished.
    ///
    /// # Errors
    /// When a topic name cannot be built (invalid ids are refused by config validation first).
    pub fn new(cfg: &Config, trust: Trust, parts: Parts, now: Now) -> Result<Self, ProtoError> {
        let (fleet, device) = (cfg.fleet.as_str(), cfg.device_id.as_str());
        let key = parts.signer.public_key().0;
        let pinned = (trust.aggregator, trust.aggregator_id.clone());
        let mut trust = trust;
        if let Some(c) = &parts.state.state.aggregator
            && c.not_after_unix_s.saturating_mul(1000) > now.unix_ms
            && let Ok(k) = fedge_proto::PublicKey::from_hex(&c.public_key)
        {
            trust.aggregator = Some(k);
            trust.aggregator_id = Some(c.id.clone());
        }
        let transfer = Transfer::resume(&parts.chunks_root).and_then(|t| {
            let done = parts
                .model
                .as_ref()
                .is_some_and(|m| m.bundle_sha256 == t.want().sha256);
            if done {
                t.remove();
                return None;
            }
            Some(t)
        });
        let interval = parts
            .state
            .state
            .telemetry_interval_s
            .unwrap_or(cfg.telemetry.interval_s);
        Ok(Self {
            device: device.into(),
            fleet: fleet.into(),
            cmd_topic: topic::dev_cmd(fleet, device)?.to_string(),
            desired_topic: topic::dev_desired(fleet, device)?.to_string(),
            aggregator_topic: topic::aggregator(fleet)?.to_string(),
            status_topic: topic::dev_status(fleet, device)?.to_string(),
            telemetry_topic: topic::dev_telemetry(fleet, device)?.to_string(),
            signer: parts.signer,
            trust,
            limits: cfg.limits.clone(),
            event_delay_ms: cfg.telemetry.event_delay_ms,
            default_interval_s: cfg.telemetry.interval_s,
            seq: parts.seq,
            outbox: parts.outbox,
            inflight: Inflight::default(),
            state: parts.state,
            chunks_root: parts.chunks_root,
            transfer,
            chunk_subs: BTreeSet::new(),
            installing: None,
            busy: false,
            model: parts.model,
            connected: false,
            cmd_subscribed: false,
            closing: false,
            started_ms: now.mono_ms,
            next_telemetry_ms: now.mono_ms + u64::from(interval) * 1000,
            flush_at_ms: None,
            recorder: Recorder::default(),
            stats: parts.stats,
            learner: parts.learner.map(|l| l.with_key(key)),
            learn_subscribed: false,
            max_packet: cfg.broker.max_packet_bytes,
            resealable: std::collections::BTreeMap::new(),
            secure: std::collections::BTreeMap::new(),
            sessions: std::collections::BTreeMap::new(),
            unverified_rounds: std::collections::BTreeMap::new(),
            pinned,
        })
    }

    /// The model being served.
    pub fn model(&self) -> Option<&ModelInfo> {
        self.model.as_ref()
    }

    /// Bytes waiting in the outbox.
    pub fn outbox_bytes(&self) -> u64 {
        self.outbox.bytes()
    }

    /// Messages waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// When [`Agent::on_tick`] has something to do next (monotonic ms).
    pub fn next_deadline(&self) -> u64 {
        self.flush_at_ms
            .map_or(self.next_telemetry_ms, |f| f.min(self.next_telemetry_ms))
    }

    /// Reports failures found before the core existed (the store's load at start).
    pub fn report(&mut self, failures: &[Failure], now: Now) {
        for f in failures {
            self.reject(
                Rejection::new(f.reason, format!("at start: {}", f.detail)),
                now,
            );
        }
    }

    /// At start: installs a transfer a previous run completed but did not install.
    pub fn on_start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.maybe_install(&mut out);
        out
    }

    /// A connection is up: subscribe, publish the online status, resume the transfer and the
    /// outbox.
    pub fn on_connected(&mut self, now: Now) -> Vec<Action> {
        Stats::bump(&self.stats.connects);
        self.connected = true;
        self.inflight.reset();
        self.chunk_subs.clear();
        self.cmd_subscribed = true;
        let mut out = vec![
            Action::Subscribe(self.aggregator_topic.clone()),
            Action::Subscribe(self.cmd_topic.clone()),
            Action::Subscribe(self.desired_topic.clone()),
        ];
        if let Some(l) = &self.learner {
            l.on_connected(&mut out);
            self.learn_subscribed = true;
        }
        if let Some(wire) = self.sealed_status(true, now) {
            self.inflight.queued(Tag::Status);
            out.push(Action::Publish {
                topic: self.status_topic.clone(),
                payload: wire,
                retain: true,
                tag: Tag::Status,
            });
        }
        self.subscribe_window(&mut out);
        self.maybe_install(&mut out);
        self.pump(&mut out);
        out
    }

    /// The connection dropped: nothing is in flight or subscribed any more.
    pub fn on_disconnected(&mut self) {
        if self.connected {
            Stats::bump(&self.stats.disconnects);
        }
        self.connected = false;
        self.inflight.reset();
        self.chunk_subs.clear();
    }

    /// A publish was written with `pkid`.
    pub fn on_written(&mut self, pkid: u16) {
        self.inflight.written(pkid);
    }

    /// A publish waits for `pkid` to be acknowledged.
    pub fn on_await_ack(&mut self, pkid: u16) {
        self.inflight.collided(pkid);
    }

    /// The broker acknowledged `pkid`: a delivered outbox message leaves the disk.
    pub fn on_acked(&mut self, pkid: u16) -> Vec<Action> {
        let mut out = Vec::new();
        match self.inflight.acked(pkid) {
            Some(Tag::Outbox(id)) => {
                self.outbox.remove(id);
                Stats::bump(&self.stats.outbox_acked);
            }
            Some(Tag::Status) if self.closing => out.push(Action::Disconnect),
            _ => {}
        }
        self.pump(&mut out);
        out
    }

    /// The service could not queue a publish; it is sent again later.
    pub fn on_refused(&mut self, tag: Tag) {
        self.inflight.refused(tag);
    }

    /// The service could not queue a subscription; it is retried on the next tick.
    pub fn on_subscribe_refused(&mut self, filter: &str) {
        if filter == self.cmd_topic || filter == self.desired_topic {
            self.cmd_subscribed = false;
        } else if matches!(Topic::parse(filter), Some(Topic::JobRound { .. }))
            || filter.contains("/model/")
        {
            self.learn_subscribed = false;
        } else if let Some(Topic::BundleChunk { index, .. }) = Topic::parse(filter) {
            self.chunk_subs.remove(&index);
        }
    }

    /// Timers: telemetry when due, and retries of what the link refused.
    pub fn on_tick(&mut self, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        self.expire_certificate(now);
        if now.mono_ms >= self.next_deadline() {
            self.queue_telemetry(now);
            let interval = self
                .state
                .state
                .telemetry_interval_s
                .unwrap_or(self.default_interval_s);
            self.next_telemetry_ms = now.mono_ms + u64::from(interval) * 1000;
            self.flush_at_ms = None;
        }
        if self.connected && !self.cmd_subscribed {
            self.cmd_subscribed = true;
            out.push(Action::Subscribe(self.aggregator_topic.clone()));
            out.push(Action::Subscribe(self.cmd_topic.clone()));
            out.push(Action::Subscribe(self.desired_topic.clone()));
        }
        if self.connected
            && !self.learn_subscribed
            && let Some(l) = &self.learner
        {
            self.learn_subscribed = true;
            l.on_connected(&mut out);
        }
        self.subscribe_window(&mut out);
        self.pump(&mut out);
        out
    }

    /// Results of local inference.
    pub fn on_inferences(&mut self, results: &[(u32, bool)]) {
        for &(us, ok) in results {
            self.recorder.inference(us, ok);
            Stats::bump(if ok {
                &self.stats.inferences
            } else {
                &self.stats.infer_errors
            });
        }
    }

    /// Shutting down: publish the offline status; [`Action::Disconnect`] follows its PUBACK.
    pub fn shutdown(&mut self, now: Now) -> Vec<Action> {
        self.closing = true;
        let mut out = Vec::new();
        if self.connected
            && let Some(wire) = self.sealed_status(false, now)
        {
            self.inflight.queued(Tag::Status);
            out.push(Action::Publish {
                topic: self.status_topic.clone(),
                payload: wire,
                retain: true,
                tag: Tag::Status,
            });
        }
        out
    }

    /// A message arrived on a subscribed topic.
    pub fn on_message(&mut self, name: &str, payload: &[u8], now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match Topic::parse(name) {
            Some(t @ Topic::DevCmd { fleet, device })
                if fleet == self.fleet && device == self.device =>
            {
                self.on_cmd(&t, payload, now, &mut out);
            }
            Some(t @ Topic::DevDesired { fleet, device })
                if fleet == self.fleet && device == self.device =>
            {
                self.on_desired(&t, payload, now, &mut out);
            }
            Some(t @ Topic::Aggregator { fleet }) if fleet == self.fleet => {
                self.on_certificate(&t, payload, now, &mut out);
            }
            Some(Topic::BundleChunk {
                fleet,
                sha256,
                index,
            }) if fleet == self.fleet => {
                self.on_chunk(sha256, index, payload, now, &mut out);
            }
            Some(t @ Topic::JobRound { fleet, job }) if fleet == self.fleet => {
                self.on_round(&t, job, payload, now, &mut out);
            }
            Some(
                t @ Topic::JobModelChunk {
                    fleet,
                    job,
                    version,
                    index,
                },
            ) if fleet == self.fleet => {
                self.on_model_chunk(&t, (job, version, index), payload, now, &mut out);
            }
            _ => tracing::debug!(topic = name, "message on an unexpected topic ignored"),
        }
        out
    }

    fn on_cmd(&mut self, t: &Topic<'_>, payload: &[u8], now: Now, out: &mut Vec<Action>) {
        let bound = self
            .secure
            .values()
            .map(crate::secure::SecureTask::max_relay)
            .fold(self.limits.max_message_bytes, usize::max);
        let env = match self.trust.open(payload, bound, Some(t)) {
            Ok(env) => env,
            Err(r) => return self.reject(r, now),
        };
        match self.state.state.replay.check(env.sender, env.seq) {
            Freshness::Fresh => {
                if let Err(e) = self.state.save() {
                    return self.reject(
                        Rejection::new(Reason::Storage, format!("replay state: {e}")),
                        now,
                    );
                }
            }
            Freshness::Duplicate => {
                self.stats.reject(Reason::Duplicate);
                return tracing::debug!(sender = env.sender, seq = env.seq, "duplicate ignored");
            }
            Freshness::Replay => {
                let last = self.state.state.replay.last(env.sender).unwrap_or(0);
                let detail = format!(
                    "{:?} seq {} from {} (last accepted {last})",
                    env.kind, env.seq, env.sender
                );
                return self.reject(Rejection::new(Reason::Replay, detail), now);
            }
        }
        match env.kind {
            Kind::Command => match decode::<Command<'_>>(env.payload) {
                Ok(c) => self.on_command(c, now, out),
                Err(e) => self.reject(
                    Rejection::new(Reason::Malformed, format!("command: {e}")),
                    now,
                ),
            },
            Kind::Ack => match decode::<Ack<'_>>(env.payload) {
                Ok(a) => self.on_ack(&a, now),
                Err(e) => self.reject(Rejection::new(Reason::Malformed, format!("ack: {e}")), now),
            },
            Kind::SecAgg => match decode::<SecAggMsg<'_>>(env.payload) {
                Ok(m) => {
                    self.on_secagg(&m, now);
                    self.pump(out);
                }
                Err(e) => self.reject(
                    Rejection::new(Reason::Malformed, format!("secure aggregation: {e}")),
                    now,
                ),
            },
            _ => tracing::debug!(kind = ?env.kind, seq = env.seq, "ignored on the command topic"),
        }
    }

    /// The retained desired state: a signed `Command::Install` of the model this device should
    /// run. It is checked like a command, with a replay guard of its own; it is acted on once,
    /// when fresh (a duplicate is the same retained message again after a reconnection, and a
    /// bundle that failed its self-test is not retried until the operator publishes anew).
    fn on_desired(&mut self, t: &Topic<'_>, payload: &[u8], now: Now, out: &mut Vec<Action>) {
        if payload.is_empty() {
            return tracing::debug!("desired state cleared");
        }
        let env = match self
            .trust
            .open(payload, self.limits.max_message_bytes, Some(t))
        {
            Ok(env) => env,
            Err(r) => return self.reject(r, now),
        };
        let key = format!("{}#desired", env.sender);
        match self.guard(&key, env.seq, now, || {
            format!("desired state seq {} is older than the last one", env.seq)
        }) {
            Some(Freshness::Fresh) => {}
            Some(_) => return tracing::debug!(seq = env.seq, "desired state already acted on"),
            None => return,
        }
        match decode::<Command<'_>>(env.payload) {
            Ok(Command::Install {
                name,
                version,
                bundle,
            }) => {
                tracing::info!(name, version, "desired state");
                self.start_install(name, version, &bundle, now, out);
            }
            Ok(c) => self.reject(
                Rejection::new(
                    Reason::Malformed,
                    format!("desired state must be an Install, not {c:?}"),
                ),
                now,
            ),
            Err(e) => self.reject(
                Rejection::new(Reason::Malformed, format!("desired state: {e}")),
                now,
            ),
        }
    }

    /// The operator's certificate of the aggregator key: verified against the operator key,
    /// checked for this fleet and expiry, with a replay guard of its own (an older certificate
    /// is refused; the same one again, after a reconnection or a restart, is applied again).
    /// It replaces the aggregator key the configuration pins, if any. Announcements that
    /// arrived before any aggregator key was known are checked again now.
    fn on_certificate(&mut self, t: &Topic<'_>, payload: &[u8], now: Now, out: &mut Vec<Action>) {
        if payload.is_empty() {
            return;
        }
        let env = match self.trust.open(payload, 4096, Some(t)) {
            Ok(env) => env,
            Err(r) => return self.reject(r, now),
        };
        let cert = match decode::<AggregatorCert<'_>>(env.payload) {
            Ok(c) => c,
            Err(e) => {
                let detail = format!("aggregator certificate: {e}");
                return self.reject(Rejection::new(Reason::Malformed, detail), now);
            }
        };
        if cert.fleet != self.fleet || check_id(cert.aggregator).is_err() {
            let detail = format!(
                "aggregator certificate for fleet {:?} and id {:?}",
                cert.fleet, cert.aggregator
            );
            return self.reject(Rejection::new(Reason::Malformed, detail), now);
        }
        if cert.not_after_unix_s.saturating_mul(1000) <= now.unix_ms {
            let detail = format!(
                "aggregator certificate of {} expired at {} (unix seconds)",
                cert.aggregator, cert.not_after_unix_s
            );
            return self.reject(Rejection::new(Reason::Revoked, detail), now);
        }
        let key = format!("{}#certificate", env.sender);
        let issued = env.seq;
        if self
            .guard(&key, issued, now, || {
                format!("aggregator certificate issued at {issued} is older than the one accepted")
            })
            .is_none()
        {
            return;
        }
        let certified = crate::state::CertifiedAggregator {
            id: cert.aggregator.to_string(),
            public_key: cert.public_key.to_hex().to_string(),
            not_after_unix_s: cert.not_after_unix_s,
        };
        let same_key = self.trust.aggregator == Some(cert.public_key)
            && self.trust.aggregator_id.as_deref() == Some(cert.aggregator);
        if same_key && self.state.state.aggregator.as_ref() == Some(&certified) {
            return;
        }
        if !same_key {
            // Another aggregator (or a new key) numbers its messages anew.
            if let Some(old) = self.trust.aggregator_id.clone() {
                self.state.state.replay.forget(&old);
            }
            self.state.state.replay.forget(cert.aggregator);
        }
        self.state.state.aggregator = Some(certified);
        if let Err(e) = self.state.save() {
            let detail = format!("aggregator certificate not stored: {e}");
            return self.reject(Rejection::new(Reason::Storage, detail), now);
        }
        tracing::info!(aggregator = cert.aggregator, key = %cert.public_key, not_after_unix_s = cert.not_after_unix_s, "aggregator key certified by the operator");
        self.trust.aggregator = Some(cert.public_key);
        self.trust.aggregator_id = Some(cert.aggregator.to_string());
        for (job, payload) in std::mem::take(&mut self.unverified_rounds) {
            let Ok(name) = topic::job_round(&self.fleet, &job) else {
                continue;
            };
            if let Some(t) = Topic::parse(&name) {
                self.on_round(&t, &job, &payload, now, out);
            }
        }
    }

    /// The replay guard `key` for `seq`: `Some` when fresh (and saved) or a duplicate; `None`
    /// once a replay (described by `replay`) or an unsaved state has been reported.
    fn guard(
        &mut self,
        key: &str,
        seq: u64,
        now: Now,
        replay: impl FnOnce() -> String,
    ) -> Option<Freshness> {
        let f = self.state.state.replay.check(key, seq);
        match f {
            Freshness::Fresh => {
                if let Err(e) = self.state.save() {
                    let detail = format!("replay state: {e}");
                    self.reject(Rejection::new(Reason::Storage, detail), now);
                    return None;
                }
            }
            Freshness::Duplicate => {}
            Freshness::Replay => {
                self.reject(Rejection::new(Reason::Replay, replay()), now);
                return None;
            }
        }
        Some(f)
    }

    /// A certified aggregator key past its expiry is no longer trusted: the pinned one (if
    /// any) is again, until the aggregator publishes a valid certificate.
    fn expire_certificate(&mut self, now: Now) {
        let Some(c) = &self.state.state.aggregator else {
            return;
        };
        if c.not_after_unix_s.saturating_mul(1000) > now.unix_ms {
            return;
        }
        tracing::warn!(aggregator = %c.id, not_after_unix_s = c.not_after_unix_s, "the operator's certificate of the aggregator key has expired");
        self.state.state.aggregator = None;
        if let Err(e) = self.state.save() {
            tracing::warn!(error = %e, "state not saved");
        }
        (self.trust.aggregator, self.trust.aggregator_id) = self.pinned.clone();
    }

    /// A round announcement: verified against the aggregator key, then checked for freshness
    /// with a guard of its own (announcements and acks share the aggregator's sequence, and a
    /// retained announcement arrives again after every reconnection). A duplicate is acted on
    /// again: the learner knows which rounds it has already submitted.
    fn on_round(
        &mut self,
        t: &Topic<'_>,
        job: &str,
        payload: &[u8],
        now: Now,
        out: &mut Vec<Action>,
    ) {
        if self.learner.is_none() || payload.is_empty() {
            return;
        }
        let env = match self
            .trust
            .open(payload, self.limits.max_message_bytes, Some(t))
        {
            Ok(env) => env,
            Err(r) => {
                if r.reason == Reason::UnknownSender && self.trust.aggregator.is_none() {
                    // Kept until the operator's certificate of the aggregator key arrives
                    // (retained messages come once per subscription).
                    self.unverified_rounds
                        .insert(job.to_string(), payload.to_vec());
                }
                return self.reject(r, now);
            }
        };
        let a = match decode::<RoundAnnounce<'_>>(env.payload) {
            Ok(a) if a.job == job => a,
            Ok(a) => {
                let detail = format!("announcement of job {} on the topic of {job}", a.job);
                return self.reject(Rejection::new(Reason::WrongJob, detail), now);
            }
            Err(e) => {
                return self.reject(
                    Rejection::new(Reason::Malformed, format!("announcement: {e}")),
                    now,
                );
            }
        };
        let key = format!("{}#round/{job}", env.sender);
        if self
            .guard(&key, env.seq, now, || {
                format!(
                    "announcement seq {} of {job} is older than the last one",
                    env.seq
                )
            })
            .is_none()
        {
            return;
        }
        let r = self.learner.as_mut().map(|l| l.on_announce(&a, out));
        match r {
            Some(Ok(true)) => Stats::bump(&self.stats.rounds_joined),
            Some(Err(r)) => self.reject(r, now),
            _ => {}
        }
        self.reseal(&a, now);
        self.resession(&a, now);
        self.pump(out);
    }

    /// A secure aggregation round in progress and a new announcement of its job: the round
    /// moved on (the task ends), or the aggregator restarted and runs it again under a new
    /// session, which this device joins with the update it already trained.
    fn resession(&mut self, a: &RoundAnnounce<'_>, now: Now) {
        match (a.phase, a.secagg) {
            (Phase::Open, Some(s)) => {
                if let Ok(setup) = crate::fl::secure_setup(a, &s) {
                    let setup = crate::fl::SecureSetup(Arc::new(setup));
                    self.sessions.insert(a.job.to_string(), setup);
                }
            }
            _ => {
                self.sessions.remove(a.job);
            }
        }
        let Some(task) = self.secure.get(a.job) else {
            return;
        };
        if a.round != task.round() || a.phase != Phase::Open {
            if a.round > task.round() || a.phase == Phase::Finished {
                self.secure.remove(a.job);
            }
            return;
        }
        let Some(s) = a.secagg else {
            return;
        };
        if s.session == task.session() {
            return;
        }
        let setup = match crate::fl::secure_setup(a, &s) {
            Ok(setup) => crate::fl::SecureSetup(Arc::new(setup)),
            Err(r) => {
                self.secure.remove(a.job);
                return self.reject(r, now);
            }
        };
        let Some(task) = self.secure.remove(a.job) else {
            return;
        };
        let Some(mut t) = task.into_trained() else {
            return tracing::warn!(
                job = a.job,
                round = a.round,
                session = s.session,
                "a new session of a round whose masked input this device already sent: not joining it (two sums over different sets of the same inputs would reveal their difference)"
            );
        };
        tracing::info!(
            job = a.job,
            round = a.round,
            session = s.session,
            "secure aggregation runs again under a new session: joining it"
        );
        Stats::bump(&self.stats.secagg_rejoined);
        if let Some((old, _)) = &mut t.secagg {
            *old = setup;
        }
        self.start_secure(t, now, true);
    }

    /// Training ended for a secure aggregation round (or its session was replaced, `again`):
    /// join the session (stage 1).
    fn start_secure(&mut self, mut t: Trained, now: Now, again: bool) {
        let key = self.signer.public_key().0;
        if let (Some((setup, _)), Some(latest)) = (&mut t.secagg, self.sessions.get(&t.job))
            && latest.0.round() == t.round
            && latest.0.session() != setup.0.session()
        {
            tracing::info!(job = %t.job, round = t.round, session = latest.0.session(), "a newer session of this round was announced during training: joining it");
            *setup = latest.clone();
        }
        match crate::secure::SecureTask::start(t, &key, self.signer.key_pair()) {
            Ok((task, keys)) => {
                let (job, round) = (task.job().to_string(), task.round());
                if self.send_secagg(&task, keys, now) {
                    if !again {
                        Stats::bump(&self.stats.rounds_trained);
                    }
                    if let Some(Err(e)) = self.learner.as_mut().map(|l| l.on_queued(&job, round, 0))
                    {
                        tracing::warn!(error = %e, "submitted round not persisted");
                    }
                    self.secure.insert(job, task);
                }
            }
            Err(r) => self.reject(r, now),
        }
    }

    /// A relay of the aggregator for a secure aggregation round: the next stage's message.
    fn on_secagg(&mut self, m: &SecAggMsg<'_>, now: Now) {
        let Some(task) = self.secure.get_mut(m.job) else {
            return tracing::debug!(
                job = m.job,
                round = m.round,
                "secure aggregation relay for no round in progress"
            );
        };
        if m.round != task.round() || m.session != task.session() {
            return tracing::debug!(
                job = m.job,
                round = m.round,
                "secure aggregation relay of another session ignored"
            );
        }
        let step = task.step(m, self.signer.key_pair());
        match step {
            Ok(Some(reply)) => {
                let done = reply.step == fedge_proto::msg::SecAggStep::Reveals;
                if let Some(task) = self.secure.remove(m.job) {
                    let sent = self.send_secagg(&task, reply, now);
                    if done && sent {
                        Stats::bump(&self.stats.secagg_completed);
                        tracing::info!(
                            job = m.job,
                            round = m.round,
                            "secure aggregation: shares revealed, round done for this device"
                        );
                    } else if sent {
                        self.secure.insert(m.job.to_string(), task);
                    }
                }
            }
            Ok(None) => {}
            Err(r) => {
                self.secure.remove(m.job);
                self.reject(r, now);
            }
        }
    }

    /// Queues a secure aggregation message; `false` when it could not be.
    fn send_secagg(
        &mut self,
        task: &crate::secure::SecureTask,
        reply: crate::secure::Reply,
        now: Now,
    ) -> bool {
        let m = SecAggMsg {
            job: task.job(),
            round: task.round(),
            session: task.session(),
            step: reply.step,
            ids: &[],
            body: &reply.body,
        };
        let (payload, topic) = match (
            encode(&m),
            topic::job_update(&self.fleet, task.job(), &self.device),
        ) {
            (Ok(p), Ok(topic)) => (p, topic.to_string()),
            (Err(e), _) | (_, Err(e)) => {
                self.reject(
                    Rejection::new(Reason::Internal, format!("secure aggregation: {e}")),
                    now,
                );
                return false;
            }
        };
        if payload.len() + CHUNK_OVERHEAD + topic.len() > self.max_packet {
            let detail = format!(
                "secure aggregation message of {} bytes does not fit broker.max_packet_bytes = {}",
                payload.len(),
                self.max_packet
            );
            self.reject(Rejection::new(Reason::Oversize, detail), now);
            return false;
        }
        match self.enqueue(
            Class::Reliable,
            &topic,
            Kind::SecAgg,
            task.round(),
            &payload,
            now,
        ) {
            Ok(seq) => {
                Stats::add(&self.stats.update_bytes, payload.len() as u64);
                tracing::debug!(job = task.job(), round = task.round(), seq, step = ?reply.step, bytes = payload.len(), "secure aggregation message queued");
                true
            }
            Err(e) => {
                self.reject(
                    Rejection::new(Reason::Storage, format!("secure aggregation: {e}")),
                    now,
                );
                false
            }
        }
    }

    /// A sealed update of this round still waits for its ack and the announcement now lists
    /// another key for this device: the aggregator restarted and lost the old one. Seal the
    /// same update to the new key and send it again (a new seq; the old one is refused).
    fn reseal(&mut self, a: &RoundAnnounce<'_>, now: Now) {
        let Some((_, t)) = self.resealable.get(a.job) else {
            return;
        };
        if a.round != t.round || a.phase != Phase::Open {
            if a.round > t.round || a.phase == Phase::Finished {
                self.resealable.remove(a.job);
            }
            return;
        }
        let Some(Ok(Some(key))) = a
            .recipients
            .map(|table| fedge_proto::seal::recipients::find(table, &self.device))
        else {
            return;
        };
        if t.recipient == Some(key) {
            return;
        }
        let mut t = t.clone();
        t.recipient = Some(key);
        tracing::info!(
            job = a.job,
            round = a.round,
            "the round was announced again with a new key: sealing the update again"
        );
        Stats::bump(&self.stats.updates_resealed);
        self.submit_update(&t, now, true);
    }

    fn on_model_chunk(
        &mut self,
        t: &Topic<'_>,
        (job, version, index): (&str, u64, u32),
        payload: &[u8],
        now: Now,
        out: &mut Vec<Action>,
    ) {
        let Some(chunk_size) = self.learner.as_ref().and_then(|l| l.wants(job, version)) else {
            return;
        };
        if payload.is_empty() {
            return;
        }
        let env = match self
            .trust
            .open(payload, chunk_size as usize + CHUNK_OVERHEAD, Some(t))
        {
            Ok(env) => env,
            Err(r) => {
                let detail = format!("model chunk {index}: {}", r.detail);
                return self.reject(Rejection::new(r.reason, detail), now);
            }
        };
        let c = match decode::<Chunk<'_>>(env.payload) {
            Ok(c) if c.index == index => c,
            _ => {
                let detail = format!("model chunk {index} of {job} v{version} does not decode");
                return self.reject(Rejection::new(Reason::Malformed, detail), now);
            }
        };
        let r = self.learner.as_mut().map(|l| l.on_chunk(&c, out));
        match r {
            Some(Ok(true)) => Stats::add(&self.stats.model_bytes, c.data.len() as u64),
            Some(Err(r)) => self.reject(r, now),
            _ => {}
        }
    }

    /// The aggregator's answer to an update. A refusal is reported as an event carrying the
    /// aggregator's reason.
    fn on_ack(&mut self, a: &Ack<'_>, now: Now) {
        if a.kind == Kind::SecAgg {
            if let Outcome::Rejected(reason) = a.outcome {
                let detail = format!(
                    "secure aggregation message of round {} refused by the aggregator: {}",
                    a.round, a.detail
                );
                self.reject(Rejection::new(reason, detail), now);
            }
            return;
        }
        if a.kind != Kind::Update {
            return tracing::debug!(kind = ?a.kind, seq = a.seq, "ack ignored");
        }
        let which = self.learner.as_mut().and_then(|l| l.acked(a.seq));
        let (job, round) = which.unwrap_or_else(|| (String::from("?"), a.round));
        if self
            .resealable
            .get(&job)
            .is_some_and(|(seq, _)| *seq == a.seq)
            && a.outcome != Outcome::Rejected(Reason::Undecryptable)
        {
            self.resealable.remove(&job);
        }
        match a.outcome {
            Outcome::Accepted | Outcome::Duplicate => {
                Stats::bump(&self.stats.updates_accepted);
                tracing::info!(job, round, seq = a.seq, outcome = ?a.outcome, "update acknowledged");
            }
            Outcome::Rejected(reason) => {
                Stats::bump(&self.stats.updates_refused);
                let detail = format!(
                    "update for round {round} of {job} refused by the aggregator: {}",
                    a.detail
                );
                self.reject(Rejection::new(reason, detail), now);
            }
        }
    }

    /// A training job ended: its update goes to the outbox, and the next pending round starts.
    pub fn on_train_done(&mut self, result: Result<Trained, Failure>, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match result {
            Ok(t) if t.secagg.is_some() => self.start_secure(t, now, false),
            Ok(t) => self.submit_update(&t, now, false),
            Err(f) => self.reject(
                Rejection::new(f.reason, format!("training: {}", f.detail)),
                now,
            ),
        }
        let refused = self
            .learner
            .as_mut()
            .map(|l| l.on_trained(&mut out))
            .unwrap_or_default();
        for r in refused {
            self.reject(r, now);
        }
        self.pump(&mut out);
        out
    }

    fn submit_update(&mut self, t: &Trained, now: Now, again: bool) {
        let u = Update {
            job: &t.job,
            round: t.round,
            base_version: t.version,
            num_samples: t.num_samples,
            loss: t.loss,
            accuracy: t.accuracy,
            delta: &t.delta,
        };
        let encoded = encode(&u).and_then(|plain| match &t.recipient {
            None => Ok(plain),
            Some(key) => {
                let aad = fedge_proto::seal::associated_data(&t.job, t.round, &self.device);
                fedge_proto::seal::seal(key, &aad, &plain)
            }
        });
        let (payload, topic) = match (
            encoded,
            topic::job_update(&self.fleet, &t.job, &self.device),
        ) {
            (Ok(p), Ok(topic)) => (p, topic.to_string()),
            (Err(e), _) | (_, Err(e)) => {
                return self.reject(
                    Rejection::new(Reason::Internal, format!("update: {e}")),
                    now,
                );
            }
        };
        if payload.len() + CHUNK_OVERHEAD + topic.len() > self.max_packet {
            let detail = format!(
                "update of {} bytes does not fit broker.max_packet_bytes = {}",
                payload.len(),
                self.max_packet
            );
            return self.reject(Rejection::new(Reason::Oversize, detail), now);
        }
        match self.enqueue(
            Class::Reliable,
            &topic,
            Kind::Update,
            t.round,
            &payload,
            now,
        ) {
            Ok(seq) => {
                if !again {
                    Stats::bump(&self.stats.rounds_trained);
                }
                if t.recipient.is_some() {
                    self.resealable.insert(t.job.clone(), (seq, t.clone()));
                }
                Stats::add(&self.stats.update_bytes, payload.len() as u64);
                tracing::info!(job = %t.job, round = t.round, seq, samples = t.num_samples, loss = t.loss, accuracy = t.accuracy, sealed = t.recipient.is_some(), "update queued");
                if let Some(Err(e)) = self
                    .learner
                    .as_mut()
                    .map(|l| l.on_queued(&t.job, t.round, seq))
                {
                    tracing::warn!(error = %e, "submitted round not persisted");
                }
            }
            Err(e) => self.reject(
                Rejection::new(Reason::Storage, format!("update not queued: {e}")),
                now,
            ),
        }
    }

    fn on_command(&mut self, c: Command<'_>, now: Now, out: &mut Vec<Action>) {
        tracing::info!(command = ?c, "operator command");
        match c {
            Command::Install {
                name,
                version,
                bundle,
            } => self.start_install(name, version, &bundle, now, out),
            Command::Rollback if self.busy => {
                self.reject(
                    Rejection::new(Reason::Internal, "rollback refused: an install is running"),
                    now,
                );
            }
            Command::Rollback => {
                self.busy = true;
                out.push(Action::Rollback);
            }
            Command::Ping => self.flush_soon(now, 0),
            Command::SetTelemetryInterval { seconds: 0 } => {
                self.reject(
                    Rejection::new(Reason::Malformed, "telemetry interval of 0 s"),
                    now,
                );
            }
            Command::SetTelemetryInterval { seconds } => {
                self.state.state.telemetry_interval_s = Some(seconds);
                if let Err(e) = self.state.save() {
                    tracing::warn!(error = %e, "telemetry interval not persisted");
                }
                self.next_telemetry_ms = now.mono_ms + u64::from(seconds) * 1000;
            }
        }
    }

    fn start_install(
        &mut self,
        name: &str,
        version: u64,
        m: &ChunkManifest,
        now: Now,
        out: &mut Vec<Action>,
    ) {
        if let Err(e) = check_id(name) {
            return self.reject(
                Rejection::new(Reason::Malformed, format!("install name: {e}")),
                now,
            );
        }
        if m.validate(self.limits.max_bundle_bytes, self.limits.max_chunk_bytes)
            .is_err()
        {
            let consistent = m.chunk_size > 0
                && u64::from(m.chunk_count) == m.total_len.div_ceil(u64::from(m.chunk_size));
            let reason = if consistent {
                Reason::Oversize
            } else {
                Reason::Malformed
            };
            let detail = format!(
                "install {name} v{version}: manifest of {} bytes in {} chunks of {} (limits {} and {})",
                m.total_len,
                m.chunk_count,
                m.chunk_size,
                self.limits.max_bundle_bytes,
                self.limits.max_chunk_bytes
            );
            return self.reject(Rejection::new(reason, detail), now);
        }
        let want = Want::new(name, version, m);
        let active = self
            .model
            .as_ref()
            .is_some_and(|a| a.bundle_sha256 == want.sha256);
        if active || self.installing.as_ref() == Some(&want) {
            return self.flush_soon(now, 0);
        }
        if self.transfer.as_ref().is_none_or(|t| *t.want() != want) {
            self.drop_transfer(out);
            match Transfer::open(&self.chunks_root, want) {
                Ok(t) => self.transfer = Some(t),
                Err(e) => {
                    return self.reject(
                        Rejection::new(Reason::Storage, format!("chunk store: {e}")),
                        now,
                    );
                }
            }
        }
        self.subscribe_window(out);
        self.maybe_install(out);
    }

    fn drop_transfer(&mut self, out: &mut Vec<Action>) {
        if let Some(t) = self.transfer.take() {
            self.unsubscribe_all(&t.manifest().sha256, out);
            t.remove();
        }
    }

    fn unsubscribe_all(&mut self, sha: &[u8; 32], out: &mut Vec<Action>) {
        for i in std::mem::take(&mut self.chunk_subs) {
            if self.connected
                && let Ok(t) = topic::bundle_chunk(&self.fleet, sha, i)
            {
                out.push(Action::Unsubscribe(t.to_string()));
            }
        }
    }

    fn on_chunk(
        &mut self,
        sha: [u8; 32],
        index: u32,
        payload: &[u8],
        now: Now,
        out: &mut Vec<Action>,
    ) {
        Stats::bump(&self.stats.chunks_received);
        let Some(t) = self
            .transfer
            .as_mut()
            .filter(|t| t.manifest().sha256 == sha)
        else {
            Stats::bump(&self.stats.chunks_ignored);
            return;
        };
        let chunk_size = t.manifest().chunk_size;
        let topic = Topic::BundleChunk {
            fleet: &self.fleet,
            sha256: sha,
            index,
        };
        let env = match self
            .trust
            .open(payload, chunk_size as usize + CHUNK_OVERHEAD, Some(&topic))
        {
            Ok(env) => env,
            Err(r) => {
                return self.reject(
                    Rejection::new(r.reason, format!("chunk {index}: {}", r.detail)),
                    now,
                );
            }
        };
        let stored = match decode::<Chunk<'_>>(env.payload) {
            Ok(c) if c.object == sha && c.index == index => {
                t.store(index, c.data).map_err(|e| match e {
                    StoreError::Proto(_) if c.data.len() > chunk_size as usize => Reason::Oversize,
                    StoreError::Proto(_) => Reason::Malformed,
                    StoreError::Io(_) => Reason::Storage,
                })
            }
            Ok(_) => Err(Reason::Malformed),
            Err(_) => Err(Reason::Malformed),
        };
        match stored {
            Ok(true) => Stats::bump(&self.stats.chunks_stored),
            Ok(false) => Stats::bump(&self.stats.chunks_duplicate),
            Err(reason) => {
                return self.reject(
                    Rejection::new(reason, format!("chunk {index} does not fit its manifest")),
                    now,
                );
            }
        }
        if self.chunk_subs.remove(&index)
            && self.connected
            && let Ok(t) = topic::bundle_chunk(&self.fleet, &sha, index)
        {
            out.push(Action::Unsubscribe(t.to_string()));
        }
        self.subscribe_window(out);
        self.maybe_install(out);
    }

    fn subscribe_window(&mut self, out: &mut Vec<Action>) {
        let Some(t) = self.transfer.as_ref().filter(|_| self.connected) else {
            return;
        };
        for i in next_window(t, &self.chunk_subs, self.limits.chunk_window) {
            if let Ok(name) = topic::bundle_chunk(&self.fleet, &t.manifest().sha256, i) {
                self.chunk_subs.insert(i);
                Stats::bump(&self.stats.chunk_requests);
                out.push(Action::Subscribe(name.to_string()));
            }
        }
    }

    fn maybe_install(&mut self, out: &mut Vec<Action>) {
        if self.busy || !self.transfer.as_ref().is_some_and(Transfer::is_complete) {
            return;
        }
        if let Some(t) = self.transfer.take() {
            self.unsubscribe_all(&t.manifest().sha256, out);
            self.busy = true;
            self.installing = Some(t.want().clone());
            out.push(Action::Install(t));
        }
    }

    /// The install job finished. A transfer handed back (chunks lost on disk) is fetched again.
    pub fn on_install_done(
        &mut self,
        result: Result<ModelInfo, Failure>,
        back: Option<Transfer>,
        now: Now,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.busy = false;
        let want = self.installing.take();
        let what = want.map_or_else(String::new, |w| {
            format!("install {} v{}: ", w.name, w.version)
        });
        match result {
            Ok(info) => {
                tracing::info!(model = %info.name, version = info.version, "model installed and serving");
                Stats::bump(&self.stats.installs);
                self.model = Some(info);
                self.publish_status(now, &mut out);
                self.flush_soon(now, 0);
            }
            Err(f) => {
                Stats::bump(&self.stats.install_failures);
                self.reject(Rejection::new(f.reason, format!("{what}{}", f.detail)), now);
            }
        }
        if let Some(t) = back
            && self.transfer.is_none()
        {
            self.transfer = Some(t);
        }
        self.subscribe_window(&mut out);
        self.maybe_install(&mut out);
        out
    }

    /// The rollback job finished.
    pub fn on_rollback_done(
        &mut self,
        result: Result<ModelInfo, Failure>,
        now: Now,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.busy = false;
        match result {
            Ok(info) => {
                tracing::info!(model = %info.name, version = info.version, "rolled back");
                Stats::bump(&self.stats.rollbacks);
                self.model = Some(info);
                self.publish_status(now, &mut out);
                self.flush_soon(now, 0);
            }
            Err(f) => self.reject(
                Rejection::new(f.reason, format!("rollback: {}", f.detail)),
                now,
            ),
        }
        self.maybe_install(&mut out);
        out
    }

    fn publish_status(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.connected
            && let Some(wire) = self.sealed_status(true, now)
        {
            self.inflight.queued(Tag::Status);
            out.push(Action::Publish {
                topic: self.status_topic.clone(),
                payload: wire,
                retain: true,
                tag: Tag::Status,
            });
        }
    }

    fn next_seq(&mut self, now: Now) -> Option<u64> {
        let r = self
            .seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq();
        match r {
            Ok(s) => Some(s),
            Err(e) => {
                self.reject(
                    Rejection::new(Reason::Storage, format!("sequence number: {e}")),
                    now,
                );
                None
            }
        }
    }

    fn sealed_status(&mut self, online: bool, now: Now) -> Option<Vec<u8>> {
        let seq = self.next_seq(now)?;
        seal_status(&self.signer, &self.device, seq, online, self.model.as_ref())
            .inspect_err(|e| tracing::error!(error = %e, "status not sealed"))
            .ok()
    }

    /// Counts a refusal and reports it in the next telemetry message.
    fn reject(&mut self, r: Rejection, now: Now) {
        tracing::warn!(reason = r.reason.as_str(), detail = %r.detail, "refused");
        self.stats.reject(r.reason);
        self.recorder.event(r.reason, &r.detail, now.unix_ms);
        self.flush_soon(now, self.event_delay_ms);
    }

    fn flush_soon(&mut self, now: Now, delay_ms: u64) {
        let at = now.mono_ms + delay_ms;
        self.flush_at_ms = Some(self.flush_at_ms.map_or(at, |f| f.min(at)));
    }

    /// Seals a telemetry message into the outbox: periodic ones may be dropped when the outbox is
    /// full, ones carrying events may not.
    fn queue_telemetry(&mut self, now: Now) {
        let Some(seq) = self.next_seq(now) else {
            return;
        };
        let class = if self.recorder.has_events() {
            Class::Reliable
        } else {
            Class::Telemetry
        };
        let snap = Snapshot {
            uptime_s: now.mono_ms.saturating_sub(self.started_ms) / 1000,
            model: self.model.as_ref().map(ModelInfo::as_ref),
            rss_bytes: rss_bytes(),
            outbox_bytes: self.outbox.bytes(),
        };
        let wire = {
            let t = self.recorder.telemetry(snap, &self.stats);
            encode(&t).and_then(|p| {
                Envelope::new(Kind::Telemetry, &self.device, seq, 0, &p).seal(&self.signer)
            })
        };
        let queued = match wire {
            Ok(w) => self
                .outbox
                .push(class, &self.telemetry_topic, &w)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match queued {
            Ok(_) => {
                Stats::bump(&self.stats.outbox_queued);
                self.recorder.clear_events();
            }
            Err(e) => tracing::warn!(error = %e, "telemetry not queued"),
        }
    }

    /// Hands unsent outbox messages to the link, oldest first, within the publish window.
    fn pump(&mut self, out: &mut Vec<Action>) {
        if !self.connected || self.closing {
            return;
        }
        let room =
            (self.limits.publish_window as usize).saturating_sub(self.inflight.outbox_count());
        let ids: Vec<u64> = self
            .outbox
            .ids_after(None)
            .filter(|id| !self.inflight.contains(Tag::Outbox(*id)))
            .take(room)
            .collect();
        for id in ids {
            match self.outbox.get(id) {
                Some(q) => {
                    self.inflight.queued(Tag::Outbox(id));
                    out.push(Action::Publish {
                        topic: q.topic,
                        payload: q.payload,
                        retain: false,
                        tag: Tag::Outbox(id),
                    });
                }
                None => self.outbox.remove(id),
            }
        }
    }

    /// Queues a message of the device's own in the outbox (the FL client's updates go this way).
    ///
    /// # Errors
    /// The outbox refused it (full of messages that are never dropped, or an I/O error).
    pub fn enqueue(
        &mut self,
        class: Class,
        topic: &str,
        kind: Kind,
        round: u64,
        payload: &[u8],
        now: Now,
    ) -> Result<u64, String> {
        let seq = self.next_seq(now).ok_or("no sequence number")?;
        let wire = Envelope::new(kind, &self.device, seq, round, payload)
            .seal(&self.signer)
            .map_err(|e| e.to_string())?;
        self.outbox
            .push(class, topic, &wire)
            .map_err(|e| e.to_string())?;
        Stats::bump(&self.stats.outbox_queued);
        Ok(seq)
    }

    /// Hands queued messages to the link (after [`Agent::enqueue`]).
    pub fn flush(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.pump(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;
    use crate::telemetry::Stats;
    use fedge_proto::envelope::encode;

    const NOW: Now = Now {
        mono_ms: 1000,
        unix_ms: 1,
    };

    struct Fixture {
        _dir: TestDir,
        op: Signer,
        agent: Agent,
        stats: Arc<Stats>,
    }

    fn fixture(tag: &str, window: u32) -> Fixture {
        let dir = TestDir::new(tag);
        let op = Signer::generate().expect("key").0;
        let text = format!(
            "device_id = \"d\"\nfleet = \"f\"\noperator_key = \"{}\"\ndata_dir = {:?}\n[broker]\nurl = \"mqtt://127.0.0.1:1\"\n[limits]\nchunk_window = {window}\nmax_chunk_bytes = 1024\n",
            op.public_key(),
            dir.path()
        );
        let cfg = Config::from_toml(&text).expect("config");
        let trust = Trust {
            operator: op.public_key(),
            operator_id: None,
            aggregator: None,
            aggregator_id: None,
        };
        let stats = Arc::new(Stats::default());
        let chunks_root = dir.path().join("chunks");
        std::fs::create_dir_all(&chunks_root).expect("chunks");
        let parts = Parts {
            signer: Arc::new(Signer::generate().expect("key").0),
            seq: Arc::new(Mutex::new(
                Sequencer::open(&dir.path().join("seq")).expect("seq"),
            )),
            outbox: Outbox::open(&dir.path().join("outbox"), 1 << 20, false).expect("outbox"),
            state: StateFile::open(&dir.path().join("state.json")).expect("state"),
            chunks_root,
            model: None,
            stats: stats.clone(),
            learner: None,
        };
        let agent = Agent::new(&cfg, trust, parts, NOW).expect("agent");
        Fixture {
            _dir: dir,
            op,
            agent,
            stats,
        }
    }

    fn command(op: &Signer, seq: u64, c: &Command<'_>) -> Vec<u8> {
        Envelope::new(Kind::Command, "op", seq, 0, &encode(c).expect("encode"))
            .seal(op)
            .expect("seal")
    }

    fn published(acts: &[Action]) -> Vec<Tag> {
        acts.iter()
            .filter_map(|a| {
                if let Action::Publish { tag, .. } = a {
                    Some(*tag)
                } else {
                    None
                }
            })
            .collect()
    }

    fn subscribed(acts: &[Action]) -> Vec<String> {
        acts.iter()
            .filter_map(|a| {
                if let Action::Subscribe(t) = a {
                    Some(t.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn resends_what_the_broker_did_not_acknowledge_after_a_reconnect() {
        let mut f = fixture("agent-resend", 4);
        let acts = f.agent.on_connected(NOW);
        assert_eq!(published(&acts), [Tag::Status]);
        for _ in 0..3 {
            f.agent
                .enqueue(Class::Reliable, "t", Kind::Update, 0, b"u", NOW)
                .expect("enqueue");
        }
        let acts = f.agent.flush();
        assert_eq!(
            published(&acts),
            [Tag::Outbox(0), Tag::Outbox(1), Tag::Outbox(2)]
        );
        for pkid in 1..=4 {
            f.agent.on_written(pkid);
        }
        f.agent.on_acked(2);
        assert_eq!(f.agent.outbox_len(), 2);
        f.agent.on_disconnected();
        let acts = f.agent.on_connected(NOW);
        assert_eq!(
            published(&acts),
            [Tag::Status, Tag::Outbox(1), Tag::Outbox(2)]
        );
        assert_eq!(Stats::get(&f.stats.outbox_acked), 1);
    }

    #[test]
    fn commands_are_verified_and_replays_refused() {
        let mut f = fixture("agent-cmd", 4);
        let cmd = "fedge/v1/f/dev/d/cmd";
        f.agent.on_connected(NOW);
        let ping = command(&f.op, 5, &Command::Ping);
        f.agent.on_message(cmd, &ping, NOW);
        assert_eq!(
            f.agent.next_deadline(),
            NOW.mono_ms,
            "a ping sends telemetry now"
        );
        f.agent.on_message(cmd, &ping, NOW);
        assert_eq!(f.stats.rejected(Reason::Duplicate), 1);
        f.agent
            .on_message(cmd, &command(&f.op, 4, &Command::Ping), NOW);
        assert_eq!(f.stats.rejected(Reason::Replay), 1);
        let mallory = Signer::generate().expect("key").0;
        f.agent
            .on_message(cmd, &command(&mallory, 9, &Command::Rollback), NOW);
        assert_eq!(f.stats.rejected(Reason::BadSignature), 1);
        let acts = f
            .agent
            .on_message(cmd, &command(&f.op, 6, &Command::Rollback), NOW);
        assert!(matches!(acts.as_slice(), [Action::Rollback]));
        // The telemetry that reports them is never dropped from the outbox.
        let acts = f.agent.on_tick(NOW);
        assert_eq!(published(&acts).len(), 1);
    }

    #[test]
    fn the_aggregator_key_is_learned_from_the_operators_certificate_only() {
        let mut f = fixture("agent-cert", 4);
        let data = f._dir.path().join("d.csv");
        std::fs::write(&data, "a,b,label\n0,1,0\n1,0,1\n").expect("data");
        let learn: crate::config::LearnConfig =
            toml::from_str(&format!("data = {data:?}\n")).expect("learn");
        let learner = Learner::open("f", "d", learn, 1024, f._dir.path()).expect("learner");
        f.agent.learner = Some(learner);
        f.agent.on_connected(NOW);
        let now = Now {
            mono_ms: 1000,
            unix_ms: 1_000_000_000_000,
        };
        let agg = Signer::generate().expect("key").0;
        let ack = |seq| {
            let a = Ack {
                kind: Kind::Update,
                seq: 1,
                round: 1,
                outcome: Outcome::Accepted,
                detail: "",
            };
            Envelope::new(
                Kind::Ack,
                "aggregator",
                seq,
                1,
                &encode(&a).expect("encode"),
            )
            .seal(&agg)
            .expect("seal")
        };
        let cert = |signer: &Signer, fleet: &str, not_after: u64, issued: u64| {
            let c = AggregatorCert {
                fleet,
                aggregator: "aggregator",
                public_key: agg.public_key(),
                not_after_unix_s: not_after,
            };
            Envelope::new(
                Kind::Certificate,
                "op",
                issued,
                0,
                &encode(&c).expect("encode"),
            )
            .seal(signer)
            .expect("seal")
        };
        let (cmd, topic) = ("fedge/v1/f/dev/d/cmd", "fedge/v1/f/aggregator");
        f.agent.on_message(cmd, &ack(1), now);
        assert_eq!(f.stats.rejected(Reason::UnknownSender), 1, "no key yet");
        // A retained announcement that comes before the certificate is kept.
        let bytes: Vec<u8> = [0f32; 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let manifest = ChunkManifest::of(&bytes, 64).expect("manifest");
        let a = RoundAnnounce {
            job: "j",
            round: 1,
            phase: Phase::Open,
            model: fedge_proto::msg::ModelRef {
                name: "j",
                version: 0,
                sha256: manifest.sha256,
            },
            manifest,
            param_count: 6,
            codec: fedge_proto::msg::Codec::F32,
            selection: fedge_proto::msg::Selection::All,
            hyper: fedge_proto::msg::Hyper {
                learning_rate: 0.1,
                epochs: 1,
                batch_size: 2,
                proximal_mu: 0.0,
                clip_norm: 0.0,
                noise_multiplier: 0.0,
            },
            deadline_unix_ms: 0,
            recipients: None,
            secagg: None,
        };
        let announce = Envelope::new(
            Kind::RoundAnnounce,
            "aggregator",
            7,
            1,
            &encode(&a).expect("encode"),
        )
        .seal(&agg)
        .expect("seal");
        let acts = f.agent.on_message("fedge/v1/f/job/j/round", &announce, now);
        assert!(subscribed(&acts).is_empty(), "not verified yet: {acts:?}");
        assert_eq!(f.stats.rejected(Reason::UnknownSender), 2);
        let mallory = Signer::generate().expect("key").0;
        let valid = 2_000_000_000;
        f.agent
            .on_message(topic, &cert(&mallory, "f", valid, 10), now);
        assert_eq!(f.stats.rejected(Reason::BadSignature), 1);
        f.agent.on_message(topic, &cert(&f.op, "g", valid, 10), now);
        assert_eq!(f.stats.rejected(Reason::Malformed), 1, "another fleet");
        f.agent
            .on_message(topic, &cert(&f.op, "f", 999_999_999, 10), now);
        assert_eq!(f.stats.rejected(Reason::Revoked), 1, "expired");
        f.agent.on_message(cmd, &ack(2), now);
        assert_eq!(f.stats.rejected(Reason::UnknownSender), 3, "still no key");
        let acts = f.agent.on_message(topic, &cert(&f.op, "f", valid, 10), now);
        assert_eq!(
            subscribed(&acts),
            ["fedge/v1/f/job/j/model/0/+"],
            "the kept announcement is acted on: the model is fetched"
        );
        f.agent.on_message(cmd, &ack(3), now);
        assert_eq!(
            f.stats.rejected(Reason::UnknownSender),
            3,
            "the certified key"
        );
        // The same certificate again (reconnection) is fine; an older one is a replay.
        f.agent.on_message(topic, &cert(&f.op, "f", valid, 10), now);
        f.agent.on_message(topic, &cert(&f.op, "f", valid, 9), now);
        assert_eq!(f.stats.rejected(Reason::Replay), 1);
        let rejected: u64 = Reason::ALL.iter().map(|r| f.stats.rejected(*r)).sum();
        assert_eq!(rejected, 7);
        // Kept across restarts: the state on disk holds the certified key.
        let stored = StateFile::open(&f._dir.path().join("state.json")).expect("state");
        assert_eq!(
            stored.state.aggregator.map(|c| (c.id, c.public_key)),
            Some(("aggregator".into(), agg.public_key().to_hex().to_string()))
        );
        // A new aggregator key, certified later, starts the aggregator's sequence anew.
        let agg2 = Signer::generate().expect("key").0;
        let c2 = AggregatorCert {
            fleet: "f",
            aggregator: "aggregator",
            public_key: agg2.public_key(),
            not_after_unix_s: valid,
        };
        let w2 = Envelope::new(
            Kind::Certificate,
            "op",
            11,
            0,
            &encode(&c2).expect("encode"),
        )
        .seal(&f.op)
        .expect("seal");
        f.agent.on_message(topic, &w2, now);
        let a2 = Ack {
            kind: Kind::Update,
            seq: 1,
            round: 1,
            outcome: Outcome::Accepted,
            detail: "",
        };
        let first_of_new = Envelope::new(Kind::Ack, "aggregator", 1, 1, &encode(&a2).expect("e"))
            .seal(&agg2)
            .expect("seal");
        f.agent.on_message(cmd, &first_of_new, now);
        assert_eq!(
            f.stats.rejected(Reason::Replay),
            1,
            "seq 1 of the new aggregator is fresh"
        );
        f.agent.on_message(cmd, &ack(4), now);
        assert_eq!(
            f.stats.rejected(Reason::BadSignature),
            2,
            "the old key is no longer trusted"
        );
        // Past its expiry the certified key is dropped (nothing is pinned here).
        let later = Now {
            mono_ms: 2000,
            unix_ms: valid * 1000 + 1,
        };
        f.agent.on_tick(later);
        let second = Envelope::new(Kind::Ack, "aggregator", 2, 1, &encode(&a2).expect("e"))
            .seal(&agg2)
            .expect("seal");
        f.agent.on_message(cmd, &second, later);
        assert_eq!(f.stats.rejected(Reason::UnknownSender), 4, "expired");
    }

    #[test]
    fn desired_state_is_acted_on_once_and_checked_like_a_command() {
        let mut f = fixture("agent-desired", 3);
        let desired = "fedge/v1/f/dev/d/desired";
        let acts = f.agent.on_connected(NOW);
        assert!(subscribed(&acts).contains(&desired.to_string()));
        let object = vec![7u8; 300];
        let m = ChunkManifest::of(&object, 100).expect("manifest");
        let install = command(
            &f.op,
            10,
            &Command::Install {
                name: "m",
                version: 2,
                bundle: m,
            },
        );
        let acts = f.agent.on_message(desired, &install, NOW);
        assert_eq!(subscribed(&acts).len(), 3, "the transfer starts");
        // The retained message again after a reconnection: nothing new, nothing rejected.
        f.agent.on_disconnected();
        f.agent.on_connected(NOW);
        let acts = f.agent.on_message(desired, &install, NOW);
        assert!(subscribed(&acts).is_empty());
        assert_eq!(f.stats.rejected(Reason::Duplicate), 0);
        // Older, not an Install, forged, cleared.
        let older = command(
            &f.op,
            9,
            &Command::Install {
                name: "m",
                version: 1,
                bundle: m,
            },
        );
        f.agent.on_message(desired, &older, NOW);
        assert_eq!(f.stats.rejected(Reason::Replay), 1);
        f.agent
            .on_message(desired, &command(&f.op, 11, &Command::Rollback), NOW);
        assert_eq!(f.stats.rejected(Reason::Malformed), 1);
        let mallory = Signer::generate().expect("key").0;
        f.agent
            .on_message(desired, &command(&mallory, 12, &Command::Ping), NOW);
        assert_eq!(f.stats.rejected(Reason::BadSignature), 1);
        assert!(f.agent.on_message(desired, &[], NOW).is_empty());
    }

    #[test]
    fn a_transfer_requests_only_missing_chunks_in_a_window() {
        let mut f = fixture("agent-window", 3);
        let cmd = "fedge/v1/f/dev/d/cmd";
        f.agent.on_connected(NOW);
        let object = vec![9u8; 10 * 100];
        let m = ChunkManifest::of(&object, 100).expect("manifest");
        let install = command(
            &f.op,
            1,
            &Command::Install {
                name: "m",
                version: 1,
                bundle: m,
            },
        );
        let acts = f.agent.on_message(cmd, &install, NOW);
        let topic = |i: u32| {
            topic::bundle_chunk("f", &m.sha256, i)
                .expect("topic")
                .to_string()
        };
        assert_eq!(subscribed(&acts), [topic(0), topic(1), topic(2)]);
        let c1 = m.split(&object).nth(1).expect("chunk");
        let wire = Envelope::new(Kind::Chunk, "op", 0, 0, &encode(&c1).expect("encode"))
            .seal(&f.op)
            .expect("seal");
        let acts = f.agent.on_message(&topic(1), &wire, NOW);
        assert!(matches!(&acts[0], Action::Unsubscribe(t) if *t == topic(1)));
        assert_eq!(subscribed(&acts), [topic(3)]);
        f.agent.on_disconnected();
        let acts = f.agent.on_connected(NOW);
        assert_eq!(subscribed(&acts)[3..], [topic(0), topic(2), topic(3)]);
        // A chunk larger than the manifest's chunk size is refused before it is decoded.
        let big = fedge_proto::chunk::Chunk {
            object: m.sha256,
            index: 0,
            data: &[0; 1000],
        };
        let wire = Envelope::new(Kind::Chunk, "op", 0, 0, &encode(&big).expect("encode"))
            .seal(&f.op)
            .expect("seal");
        f.agent.on_message(&topic(0), &wire, NOW);
        assert_eq!(f.stats.rejected(Reason::Oversize), 1);
        assert_eq!(Stats::get(&f.stats.chunks_stored), 1);
    }
}
