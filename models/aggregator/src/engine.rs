//! The round loop. One task owns the jobs and is the store's only writer: it judges updates in
//! batches (one commit per batch, acks after the commit), closes rounds whose time has come,
//! publishes models and announcements, and serves registry and job commands from the HTTP API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_proto::msg::Outcome;
use fedge_proto::{PublicKey, topic};
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, JobSpec};
use crate::error::{AggregatorError, StoreError};
use crate::fl::Strategy;
use crate::lifecycle::{self, OpError, unix_ms};
use crate::metrics::Stats;
use crate::mqtt::Inbound;
use crate::outgoing::{self, Outgoing, Sealer};
use crate::records::{DeviceRecord, JobPhase, JobRecord, RoundRecord};
use crate::rules::RoundCtx;
use crate::store::Store;

/// Bytes allowed in an update envelope beyond its f32 delta.
pub const ENVELOPE_HEADROOM: usize = 4096;

/// Most inbound messages judged in one store commit.
const MAX_BATCH: usize = 512;

/// A request from the HTTP API, answered on `reply`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    Register {
        id: String,
        key: PublicKey,
        reply: oneshot::Sender<Result<(DeviceRecord, bool), OpError>>,
    },
    Revoke {
        id: String,
        reply: oneshot::Sender<Result<DeviceRecord, OpError>>,
    },
    CreateJob {
        spec: Box<JobSpec>,
        reply: oneshot::Sender<Result<JobRecord, OpError>>,
    },
    /// Finish a running job now; its open round closes without a model.
    StopJob {
        id: String,
        reply: oneshot::Sender<Result<JobRecord, OpError>>,
    },
}

/// A job as the engine runs it.
#[derive(Debug)]
pub struct JobRun {
    pub rec: JobRecord,
    /// The open round; `None` once finished.
    pub round: Option<RoundRecord>,
    /// The model of version `rec.model_version`.
    pub global: Vec<f32>,
    /// The accepted count at which aggregation last failed (retried when it changes).
    failed_at: Option<u32>,
    /// Recipient keys of sealed updates (`encrypt_updates` jobs), in memory only.
    pub sealing: crate::sealing::Sealing,
    /// The secure aggregation session of the open round (`secure_aggregation` jobs), in
    /// memory only.
    pub secure: Option<crate::secure::Session>,
    /// Why the open round's session could not start, when it could not.
    secure_error: Option<String>,
}

impl JobRun {
    fn load(store: &Store, rec: JobRecord) -> Result<Self, AggregatorError> {
        let id = rec.spec.id.clone();
        let global = store
            .model(&id, rec.model_version)?
            .ok_or_else(|| StoreError::NotFound(format!("model {id}/{}", rec.model_version)))?;
        strategy(store, &rec)?;
        let round = match rec.phase {
            JobPhase::Running => store
                .rounds(&id)?
                .into_iter()
                .find(|r| r.round == rec.current_round),
            JobPhase::Finished => None,
        };
        Ok(Self {
            rec,
            round,
            global,
            failed_at: None,
            sealing: crate::sealing::Sealing::default(),
            secure: None,
            secure_error: None,
        })
    }

    /// The rules' view of the open round.
    pub fn ctx(&self) -> Option<RoundCtx<'_>> {
        let s = &self.rec.spec;
        self.round.as_ref().map(|r| RoundCtx {
            job: &s.id,
            round: r.round,
            param_count: self.rec.param_count,
            codec: s.codec,
            max_norm: s.max_norm,
            late: s.late_policy,
        })
    }

    /// Largest update envelope accepted: an f32 delta of the model plus headroom (which covers
    /// the sealing overhead).
    pub fn max_envelope(&self) -> usize {
        let update = self.rec.param_count as usize * 4 + ENVELOPE_HEADROOM;
        self.secure
            .as_ref()
            .map_or(update, |s| update.max(s.max_envelope()))
    }

    /// For `secure_aggregation` jobs, starts a session for the open round when it has none
    /// (the round just opened, or the aggregator restarted): the roster is every selected,
    /// registered device now. Returns whether one started; too few devices is logged and
    /// tried again at the next tick.
    fn ensure_session(&mut self, store: &Store, now: u64) -> Result<bool, AggregatorError> {
        let (Some(spec), Some(r)) = (self.rec.spec.secure_aggregation, self.round.as_ref()) else {
            return Ok(false);
        };
        if self.secure.as_ref().is_some_and(|s| s.round == r.round) {
            return Ok(false);
        }
        self.secure = None;
        let txn = store.begin()?;
        let mut roster = Vec::new();
        for id in txn.eligible_devices()? {
            if !r.selection.includes(&self.rec.spec.id, r.round, &id) {
                continue;
            }
            let key = txn
                .device(&id)?
                .and_then(|d| PublicKey::from_hex(&d.public_key).ok());
            if let Some(k) = key {
                roster.push((id, k.0));
            }
        }
        drop(txn);
        let deadline = r
            .deadline_unix_ms
            .max(now.saturating_add(self.rec.spec.deadline_ms));
        let n = roster.len();
        match crate::secure::Session::start(
            &self.rec.spec.id,
            r.round,
            roster,
            &spec,
            self.rec.param_count as usize,
            deadline,
        ) {
            Ok(s) => {
                let p = s.params();
                tracing::info!(job = %self.rec.spec.id, round = r.round, session = s.session, devices = n, neighbours = p.neighbours, threshold = p.threshold, "secure aggregation session started");
                self.secure = Some(s);
                self.secure_error = None;
                Ok(true)
            }
            Err(why) => {
                if self.failed_at != Some(n as u32) {
                    tracing::warn!(job = %self.rec.spec.id, round = r.round, devices = n, error = %why, "secure aggregation cannot start yet: the round is announced closed until it can, and fails at its deadline");
                    self.failed_at = Some(n as u32);
                }
                self.secure_error = Some(format!("secure aggregation could not start: {why}"));
                Ok(false)
            }
        }
    }

    /// For `encrypt_updates` jobs, makes sure the open round has a recipient key for every
    /// selected device registered now. Returns whether keys were added.
    fn ensure_keys(&mut self, store: &Store) -> Result<bool, AggregatorError> {
        let Some(r) = self
            .round
            .as_ref()
            .filter(|_| self.rec.spec.encrypt_updates)
        else {
            return Ok(false);
        };
        let keep = match self.rec.spec.late_policy {
            crate::config::LatePolicy::DownWeight { max_staleness, .. } => {
                max_staleness.saturating_add(1)
            }
            crate::config::LatePolicy::Reject => 1,
        };
        let eligible = store.begin()?.eligible_devices()?;
        self.sealing
            .ensure(&self.rec.spec.id, r.round, &r.selection, &eligible, keep)
    }
}

/// The job's strategy with the server state stored after its latest round.
fn strategy(store: &Store, rec: &JobRecord) -> Result<Strategy, AggregatorError> {
    let mut strategy = Strategy::build(&rec.spec.strategy).map_err(AggregatorError::Strategy)?;
    if let Some(state) = store.strategy_state(&rec.spec.id)? {
        strategy
            .load_state(&state)
            .map_err(AggregatorError::Strategy)?;
    }
    Ok(strategy)
}

/// The round loop's state.
#[derive(Debug)]
pub struct Engine {
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    sealer: Sealer,
    client: AsyncClient,
    jobs: BTreeMap<String, JobRun>,
    /// The operator's certificate of this aggregator's key, published retained on connect.
    certificate: Option<Vec<u8>>,
}

impl Engine {
    /// Loads every stored job, with its open round and strategy state.
    ///
    /// # Errors
    /// Storage errors, or a stored strategy that no longer builds.
    pub fn new(
        cfg: Arc<Config>,
        store: Arc<Store>,
        stats: Arc<Stats>,
        sealer: Sealer,
        client: AsyncClient,
    ) -> Result<Self, AggregatorError> {
        let mut jobs = BTreeMap::new();
        for rec in store.jobs()? {
            jobs.insert(rec.spec.id.clone(), JobRun::load(&store, rec)?);
        }
        Ok(Self {
            cfg,
            store,
            stats,
            sealer,
            client,
            jobs,
            certificate: None,
        })
    }

    /// Publishes `certificate` (the operator's certificate of this aggregator's key) retained
    /// on `aggregator` after every connection.
    #[must_use]
    pub fn with_certificate(mut self, certificate: Option<Vec<u8>>) -> Self {
        self.certificate = certificate;
        self
    }

    /// Runs until an error (storage, broker channel closed). The caller stops it by dropping
    /// the future: whatever was not committed is as if never received, and nothing uncommitted
    /// was acknowledged.
    ///
    /// # Errors
    /// Storage failures, and a client whose event loop has gone.
    pub async fn run(
        mut self,
        mut inbound: mpsc::UnboundedReceiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<(), AggregatorError> {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(first) = inbound.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match inbound.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.handle_inbound(batch).await?;
                }
                Some(cmd) = commands.recv() => self.handle_command(cmd).await?,
                _ = tick.tick() => {}
            }
            self.close_due_rounds().await?;
        }
    }

    async fn handle_inbound(&mut self, batch: Vec<Inbound>) -> Result<(), AggregatorError> {
        let mut publishes = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Inbound::Connected { .. } => self.on_connected().await?,
                Inbound::Publish(p) => publishes.push(p),
            }
        }
        if !publishes.is_empty() {
            self.judge_batch(publishes).await?;
        }
        Ok(())
    }

    /// Judges a batch in one transaction, commits, then acks (MQTT and protocol).
    async fn judge_batch(&mut self, publishes: Vec<Publish>) -> Result<(), AggregatorError> {
        let t0 = Instant::now();
        let txn = self.store.begin()?;
        let mut verdicts = Vec::with_capacity(publishes.len());
        for p in &publishes {
            self.stats.received(p.payload.len());
            if let Some(v) =
                crate::judge::judge(&txn, &mut self.jobs, &self.cfg.fleet, &p.topic, &p.payload)?
            {
                if matches!(v.outcome, Outcome::Rejected(_))
                    && let Some(topic::Topic::JobUpdate { job, .. }) = topic::Topic::parse(&p.topic)
                    && let Some(r) = self.jobs.get_mut(job).and_then(|j| j.round.as_mut())
                {
                    // Counted in memory; stored with the round's next write (at the latest when
                    // it closes).
                    r.rejected += 1;
                }
                verdicts.push(v);
            }
        }
        txn.commit()?;
        self.stats.committed(t0.elapsed().as_secs_f64());
        let mut out = Vec::with_capacity(verdicts.len());
        for v in &verdicts {
            match (v.outcome, &v.accepted_in) {
                (Outcome::Accepted, Some(job)) => self.stats.accepted(job),
                (Outcome::Duplicate, _) => self.stats.rejected(fedge_proto::msg::Reason::Duplicate),
                (Outcome::Rejected(r), _) => self.stats.rejected(r),
                _ => {}
            }
            if v.outcome != Outcome::Accepted {
                tracing::info!(device = %v.device, seq = v.seq, outcome = ?v.outcome, detail = %v.detail, "update refused");
            }
            if v.kind == fedge_proto::Kind::SecAgg && !matches!(v.outcome, Outcome::Rejected(_)) {
                continue;
            }
            let (fleet, s) = (&self.cfg.fleet, &mut self.sealer);
            out.push(outgoing::ack_of(
                s,
                fleet,
                &v.device,
                (v.kind, v.seq, v.round),
                v.outcome,
                &v.detail,
            )?);
        }
        self.send(out).await?;
        for p in &publishes {
            self.client
                .ack(p)
                .await
                .map_err(|e| AggregatorError::Broker(e.to_string()))?;
        }
        Ok(())
    }

    /// After every (re)connection: subscribe to every job's updates, then publish each job's
    /// retained state again (a restarted broker without persistence has lost it). Subscribing
    /// first means a device that has seen an announcement can be heard.
    async fn on_connected(&mut self) -> Result<(), AggregatorError> {
        if let Some(cert) = &self.certificate {
            let t = topic::aggregator(&self.cfg.fleet)?;
            self.send(vec![Outgoing {
                topic: t.to_string(),
                retain: true,
                payload: cert.clone(),
            }])
            .await?;
        }
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for id in &ids {
            self.subscribe(id).await?;
        }
        for id in &ids {
            self.publish_state(id, None).await?;
        }
        Ok(())
    }

    async fn subscribe(&self, job: &str) -> Result<(), AggregatorError> {
        let fleet = &self.cfg.fleet;
        let filter = match &self.cfg.broker.share_group {
            Some(group) => topic::shared_updates(group, fleet, job)?,
            None => topic::job_updates(fleet, job)?,
        };
        self.client
            .subscribe(filter.as_str(), QoS::AtLeastOnce)
            .await
            .map_err(|e| AggregatorError::Broker(e.to_string()))
    }

    /// Publishes the current model's chunks and the announcement; clears the chunks of
    /// `clear`, an older version, first.
    async fn publish_state(
        &mut self,
        job: &str,
        clear: Option<u64>,
    ) -> Result<(), AggregatorError> {
        let Some(run) = self.jobs.get_mut(job) else {
            return Ok(());
        };
        run.ensure_keys(&self.store)?;
        run.ensure_session(&self.store, unix_ms())?;
        let fleet = &self.cfg.fleet;
        let number = run
            .round
            .as_ref()
            .map_or(run.rec.current_round, |r| r.round);
        let (mut msgs, manifest) =
            outgoing::model(&mut self.sealer, fleet, &run.rec, &run.global, number)?;
        if let Some(old) = clear {
            let mut cleared = outgoing::clear_model(fleet, job, old, manifest.chunk_count)?;
            cleared.append(&mut msgs);
            msgs = cleared;
        }
        let recipients = run
            .sealing
            .table(number)
            .filter(|_| run.rec.spec.encrypt_updates);
        let secure = run
            .secure
            .as_ref()
            .filter(|s| run.round.as_ref().is_some_and(|r| r.round == s.round))
            .map(|s| (s.announced(), s.deadline()));
        msgs.push(outgoing::announce(
            &mut self.sealer,
            fleet,
            &run.rec,
            run.round.as_ref(),
            manifest,
            recipients,
            secure,
        )?);
        self.send(msgs).await
    }

    async fn send(&self, msgs: Vec<Outgoing>) -> Result<(), AggregatorError> {
        for m in msgs {
            self.stats.published(m.payload.len());
            self.client
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await
                .map_err(|e| AggregatorError::Broker(e.to_string()))?;
        }
        Ok(())
    }

    async fn close_due_rounds(&mut self) -> Result<(), AggregatorError> {
        let now = unix_ms();
        self.drive_sessions(now).await?;
        let due: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.rec.spec.secure_aggregation.is_none())
            .filter(|(_, j)| {
                j.round.as_ref().is_some_and(|r| {
                    j.failed_at != Some(r.accepted)
                        && crate::rules::should_close(
                            r.accepted,
                            r.accepted - r.stale,
                            r.selected,
                            j.rec.spec.min_devices,
                            now,
                            r.deadline_unix_ms,
                        )
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for job in due {
            self.close_round(&job, now).await?;
        }
        Ok(())
    }

    /// Aggregates the open round from its stored updates (by device id, so a rerun after a
    /// crash computes the same model), then commits the model, the strategy state and the next
    /// round together, and publishes them.
    async fn close_round(&mut self, job: &str, now: u64) -> Result<(), AggregatorError> {
        let store = Arc::clone(&self.store);
        let Some(run) = self.jobs.get_mut(job) else {
            return Ok(());
        };
        let Some(mut round) = run.round.clone() else {
            return Ok(());
        };
        let updates = store.round_updates(job, round.round)?;
        let mut strategy = strategy(&store, &run.rec)?;
        let failures = round.selected.saturating_sub(round.accepted - round.stale) as usize;
        let t0 = Instant::now();
        let inputs = match run.rec.spec.central_dp {
            None => None,
            Some(c) => match central_mean(c, round.round, &updates) {
                Ok(u) => Some(vec![u]),
                Err(why) => {
                    tracing::error!(job, round = round.round, error = %why, "central DP failed; waiting for more updates");
                    run.failed_at = Some(round.accepted);
                    return Ok(());
                }
            },
        };
        let inputs = inputs.as_deref().unwrap_or(&updates);
        let model = match strategy.aggregate(round.round, &run.global, inputs, failures) {
            Ok(m) => m,
            Err(why) => {
                tracing::error!(job, round = round.round, error = %why, "aggregation failed; waiting for more updates");
                run.failed_at = Some(round.accepted);
                return Ok(());
            }
        };
        let aggregation_s = t0.elapsed().as_secs_f64();
        round.aggregate_ms = Some(aggregation_s * 1e3);
        let weight: f64 = updates.iter().map(|u| u.num_samples as f64).sum();
        if weight > 0.0 {
            let mean = |f: fn(&crate::records::StoredUpdate) -> f32| {
                let m = updates
                    .iter()
                    .map(|u| f64::from(f(u)) * u.num_samples as f64)
                    .sum::<f64>()
                    / weight;
                m.is_finite().then_some(m)
            };
            round.train_loss = mean(|u| u.loss);
            round.train_accuracy = mean(|u| u.accuracy);
        }
        tracing::info!(
            job,
            round = round.round,
            updates = updates.len(),
            aggregation_ms = aggregation_s * 1e3,
            "round closed"
        );
        self.commit_round(job, round, model, strategy.state(), now)
            .await
    }

    /// Commits a closed round (its record with ε, the model, the strategy state and the next
    /// round, in one transaction), moves the job on and publishes its new state.
    async fn commit_round(
        &mut self,
        job: &str,
        mut round: RoundRecord,
        model: Vec<f32>,
        state: Vec<u8>,
        now: u64,
    ) -> Result<(), AggregatorError> {
        let store = Arc::clone(&self.store);
        let Some(run) = self.jobs.get_mut(job) else {
            return Ok(());
        };
        round.epsilon = lifecycle::epsilon_after(&run.rec.spec, round.round);
        let mut rec = run.rec.clone();
        let txn = store.begin()?;
        let next = lifecycle::close_round(&txn, &mut rec, &mut round, &model, &state, now)?;
        txn.commit()?;
        let round_s = now.saturating_sub(round.opened_unix_ms) as f64 / 1e3;
        let aggregation_s = round.aggregate_ms.unwrap_or(0.0) / 1e3;
        self.stats.round_completed(job, aggregation_s, round_s);
        run.rec = rec;
        run.round = next;
        run.global = model;
        run.failed_at = None;
        run.secure = None;
        let clear = round.round.checked_sub(2);
        self.publish_state(job, clear).await
    }

    /// Moves every secure aggregation session on: starts the missing ones (announcing them),
    /// closes stages that are due and relays their results, and closes rounds that finished or
    /// failed.
    async fn drive_sessions(&mut self, now: u64) -> Result<(), AggregatorError> {
        let ids: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.rec.spec.secure_aggregation.is_some() && j.round.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for job in ids {
            let Some(run) = self.jobs.get_mut(&job) else {
                continue;
            };
            if run.secure.is_none() {
                if run.ensure_session(&self.store, now)? {
                    self.publish_state(&job, None).await?;
                } else if run
                    .round
                    .as_ref()
                    .is_some_and(|r| now >= r.deadline_unix_ms)
                {
                    // Never started (too few devices, say): the round fails with the reason,
                    // the job goes on.
                    let why = run
                        .secure_error
                        .clone()
                        .unwrap_or_else(|| "secure aggregation could not start".into());
                    self.close_secure_round(&job, now, Err(why)).await?;
                }
                continue;
            }
            let Some(session) = run.secure.as_mut() else {
                continue;
            };
            let (round, sid) = (session.round, session.session);
            match session.poll(now) {
                crate::secure::Progress::Wait => {}
                crate::secure::Progress::Relay(relays) => {
                    let mut out = Vec::with_capacity(relays.len());
                    for r in relays {
                        out.push(outgoing::secagg(
                            &mut self.sealer,
                            &self.cfg.fleet,
                            &job,
                            round,
                            sid,
                            &r,
                        )?);
                    }
                    self.send(out).await?;
                }
                crate::secure::Progress::Done(agg) => {
                    self.close_secure_round(&job, now, Ok(*agg)).await?;
                }
                crate::secure::Progress::Failed(why) => {
                    self.close_secure_round(&job, now, Err(why)).await?;
                }
            }
        }
        Ok(())
    }

    /// Closes a secure aggregation round: the survivors' mean (with the job's central DP noise)
    /// goes through the strategy as one update; a failed round keeps the model and says why.
    async fn close_secure_round(
        &mut self,
        job: &str,
        now: u64,
        result: Result<fedge_fl::secagg::Aggregate, String>,
    ) -> Result<(), AggregatorError> {
        let store = Arc::clone(&self.store);
        let Some(run) = self.jobs.get_mut(job) else {
            return Ok(());
        };
        let Some(mut round) = run.round.clone() else {
            return Ok(());
        };
        let mut strategy = strategy(&store, &run.rec)?;
        let t0 = Instant::now();
        let model = match result.and_then(|agg| {
            secure_model(&run.rec.spec, &mut strategy, round.round, &run.global, &agg)
                .map(|m| (m, agg.survivors.len()))
        }) {
            Ok((model, survivors)) => {
                round.accepted = survivors as u32;
                model
            }
            Err(why) => {
                round.failed = Some(why);
                run.global.clone()
            }
        };
        round.aggregate_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        tracing::info!(
            job,
            round = round.round,
            survivors = round.accepted,
            failed = round.failed.as_deref().unwrap_or(""),
            "secure aggregation round closed"
        );
        self.commit_round(job, round, model, strategy.state(), now)
            .await
    }

    async fn handle_command(&mut self, cmd: Command) -> Result<(), AggregatorError> {
        match cmd {
            Command::Register { id, key, reply } => {
                let r = self.in_txn(|txn| lifecycle::register(txn, &id, &key, unix_ms()));
                let _ = reply.send(r);
                // A device registered while a sealed round is open gets its key now.
                let sealed: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.rec.spec.encrypt_updates && j.round.is_some())
                    .map(|(id, _)| id.clone())
                    .collect();
                for job in sealed {
                    let added = match self.jobs.get_mut(&job) {
                        Some(run) => run.ensure_keys(&self.store)?,
                        None => false,
                    };
                    if added {
                        self.publish_state(&job, None).await?;
                    }
                }
            }
            Command::Revoke { id, reply } => {
                let r = self.in_txn(|txn| lifecycle::revoke(txn, &id));
                let _ = reply.send(r);
            }
            Command::CreateJob { spec, reply } => {
                let r = self.create_job(*spec).await;
                let _ = reply.send(r);
            }
            Command::StopJob { id, reply } => {
                let r = self.stop_job(&id).await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    fn in_txn<T>(
        &self,
        f: impl FnOnce(&crate::store::Txn) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let txn = self.store.begin()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    async fn stop_job(&mut self, id: &str) -> Result<JobRecord, OpError> {
        let store = Arc::clone(&self.store);
        let run = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| OpError::NotFound(format!("job {id}")))?;
        let mut rec = run.rec.clone();
        let mut round = run.round.clone();
        let txn = store.begin()?;
        lifecycle::stop_job(&txn, &mut rec, round.as_mut(), unix_ms())?;
        txn.commit()?;
        run.rec = rec.clone();
        run.round = None;
        run.secure = None;
        tracing::info!(job = %id, "job stopped by the operator");
        // The retained announcement now says Finished: devices stop training for it.
        self.publish_state(id, None)
            .await
            .map_err(|e| OpError::Store(StoreError::Db(e.to_string())))?;
        Ok(rec)
    }

    async fn create_job(&mut self, spec: JobSpec) -> Result<JobRecord, OpError> {
        spec.validate(self.cfg.broker.max_packet_bytes)?;
        crate::config::check_secure_with_sharing(&self.cfg.broker, &spec)?;
        Strategy::build(&spec.strategy)
            .map_err(|e| crate::error::ConfigError::Invalid(format!("job {}: {e}", spec.id)))?;
        let (rec, _) = self.in_txn(|txn| {
            lifecycle::create_job(txn, spec, self.cfg.broker.max_packet_bytes, unix_ms())
        })?;
        let id = rec.spec.id.clone();
        let run = JobRun::load(&self.store, rec.clone())
            .map_err(|e| OpError::Store(StoreError::Db(e.to_string())))?;
        self.jobs.insert(id.clone(), run);
        tracing::info!(job = %id, "job created");
        let published = async {
            self.subscribe(&id).await?;
            self.publish_state(&id, None).await
        };
        published
            .await
            .map_err(|e| OpError::Store(StoreError::Db(e.to_string())))?;
        Ok(rec)
    }
}

/// The model after a secure aggregation round: the survivors' mean update, with central DP
/// noise on the sum when the job has it (the devices clipped to `hyper.clip_norm`), through the
/// strategy as one update of weight 1.
fn secure_model(
    spec: &JobSpec,
    strategy: &mut Strategy,
    round: u64,
    global: &[f32],
    agg: &fedge_fl::secagg::Aggregate,
) -> Result<Vec<f32>, String> {
    let n = agg.survivors.len();
    if n == 0 {
        return Err("no survivors".into());
    }
    let mut sum = agg.sum.clone();
    if let Some(c) = spec.central_dp {
        use fedge_fl::dp::{CentralDp, Clipping, NoiseRng};
        let mut dp = CentralDp::new(
            f64::from(c.noise_multiplier),
            Clipping::Fixed(f64::from(c.clip_norm)),
        )
        .map_err(|e| e.to_string())?;
        let mut rng = NoiseRng::from_system().map_err(|e| e.to_string())?;
        dp.noise_sum(&mut sum, n as u64, n as u64, &mut rng)
            .map_err(|e| e.to_string())?;
    }
    let mean = sum.iter().map(|s| s / n as f32).collect();
    let update = crate::records::StoredUpdate {
        device: "secure-aggregation".into(),
        for_round: round,
        seq: 0,
        num_samples: 1,
        staleness_weight: 1.0,
        loss: f32::NAN,
        accuracy: f32::NAN,
        delta: mean,
    };
    strategy.aggregate(round, global, &[update], 0)
}

/// DP-FedAvg's server step: every update clipped to `clip_norm`, summed, Gaussian noise of
/// `noise_multiplier × clip_norm` added to the sum, divided by the count; handed to the strategy
/// as one update of weight 1 (the per-device weights would break the sensitivity bound).
fn central_mean(
    c: crate::config::CentralDpSpec,
    round: u64,
    updates: &[crate::records::StoredUpdate],
) -> Result<crate::records::StoredUpdate, String> {
    use fedge_fl::dp::{CentralDp, Clipping, NoiseRng};
    let first = updates.first().ok_or("no updates")?;
    let mut dp = CentralDp::new(
        f64::from(c.noise_multiplier),
        Clipping::Fixed(f64::from(c.clip_norm)),
    )
    .map_err(|e| e.to_string())?;
    let mut sum = vec![0f32; first.delta.len()];
    let mut unclipped = 0;
    for u in updates {
        let mut d = u.delta.clone();
        if d.len() != sum.len() {
            return Err("updates of different lengths".into());
        }
        unclipped += u64::from(dp.clip(&mut d).map_err(|e| e.to_string())?);
        sum.iter_mut().zip(&d).for_each(|(s, v)| *s += v);
    }
    let n = updates.len() as u64;
    let mut rng = NoiseRng::from_system().map_err(|e| e.to_string())?;
    dp.noise_sum(&mut sum, unclipped, n, &mut rng)
        .map_err(|e| e.to_string())?;
    sum.iter_mut().for_each(|s| *s /= n as f32);
    Ok(crate::records::StoredUpdate {
        device: "central-dp".into(),
        for_round: round,
        seq: 0,
        num_samples: 1,
        staleness_weight: 1.0,
        loss: first.loss,
        accuracy: first.accuracy,
        delta: sum,
    })
}
