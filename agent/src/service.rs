//! The running agent: opens the device's state, then drives the link, the core, timers and the
//! blocking jobs (install, rollback, inference) until shutdown.
//!
//! Everything runs inside the future [`Service::run`] returns (the link driver and the control
//! loop are polled together; the library spawns no task). Model loading, self-tests and inference
//! run on tokio's blocking pool.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedge_proto::envelope::decode;
use fedge_proto::msg::{Bundle, Reason};
use fedge_proto::{Kind, ProtoError, Signer, topic};
use rumqttc::{LastWill, QoS};
use tokio::sync::mpsc;

use crate::agent::{Action, Agent, Now, Parts, seal_status};
use crate::config::Config;
use crate::error::AgentError;
use crate::fl::{self, DataCache, Learner, Trained};
use crate::fsx;
use crate::infer::{self, InferDirs};
use crate::link::{self, LinkEvent, LinkHandle, LinkOptions, WillSource};
use crate::outbox::{Class, Outbox};
use crate::seq::Sequencer;
use crate::state::StateFile;
use crate::store::{Failure, ModelInfo, ModelStore, Served};
use crate::telemetry::Stats;
use crate::transfer::Transfer;
use crate::trust::Trust;

/// How long shutdown waits for the offline status to be acknowledged.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A message for the outbox from another part of the device (the FL client's updates).
#[derive(Debug)]
pub struct Submit {
    pub class: Class,
    pub topic: String,
    pub kind: Kind,
    pub round: u64,
    pub payload: Vec<u8>,
}

/// The device daemon; see the module docs.
#[derive(Debug)]
pub struct Service {
    config: Config,
    agent: Agent,
    store: Arc<ModelStore>,
    trust: Trust,
    signer: Arc<Signer>,
    seq: Arc<Mutex<Sequencer>>,
    served: Arc<Mutex<Option<Arc<Served>>>>,
    stats: Arc<Stats>,
    clock: Clock,
    submit_tx: mpsc::Sender<Submit>,
    submit_rx: mpsc::Receiver<Submit>,
    /// The local training data, loaded by the first training job.
    data: Arc<DataCache>,
}

#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Now {
        Now {
            mono_ms: self.0.elapsed().as_millis() as u64,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    fn instant(&self, mono_ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_millis(mono_ms))
    }
}

enum Done {
    Install(Result<Served, Failure>, Option<Transfer>),
    Train(Result<Trained, Failure>),
    Rollback(Result<Served, Failure>),
    Infer(Vec<(u32, bool)>),
}

impl Service {
    /// Opens the device's key (created with mode 0600 if absent), state, outbox and model store,
    /// and loads the model to serve.
    ///
    /// # Errors
    /// [`AgentError`] naming the file that could not be opened.
    pub fn open(config: Config) -> Result<Self, AgentError> {
        let data = config.data_dir.clone();
        fsx::create_dir(&data, true).map_err(|e| AgentError::io("data directory", &data, e))?;
        let key_path = config.key_path();
        let signer = Arc::new(fedge_proto::keys::file::load_or_create(&key_path).map_err(
            |source| AgentError::Key {
                path: key_path,
                source,
            },
        )?);
        let trust = Trust {
            operator: config.operator_public_key().map_err(AgentError::Invalid)?,
            operator_id: config.operator_id.clone(),
            aggregator: config
                .aggregator_public_key()
                .map_err(AgentError::Invalid)?,
            aggregator_id: config.aggregator_id.clone(),
        };
        let open = |what: &'static str, p: &Path, e| AgentError::io(what, p, e);
        let seq_path = data.join("seq");
        let seq = Sequencer::open(&seq_path).map_err(|e| open("sequence file", &seq_path, e))?;
        let state_path = data.join("state.json");
        let state = StateFile::open(&state_path).map_err(|e| open("state file", &state_path, e))?;
        let ob_path = data.join("outbox");
        let l = &config.limits;
        let outbox = Outbox::open(&ob_path, l.outbox_max_bytes, l.outbox_fsync)
            .map_err(|e| open("outbox", &ob_path, e))?;
        let model_dir = config.model_path();
        let store = ModelStore::open(&model_dir, l.keep_versions, config.infer.threads)
            .map_err(|e| open("model directory", &model_dir, e))?;
        let chunks_root = data.join("chunks");
        fsx::create_dir(&chunks_root, true)
            .map_err(|e| open("chunk directory", &chunks_root, e))?;
        let (served, failures) = store.load_active();
        let stats = Arc::new(Stats::default());
        let clock = Clock(Instant::now());
        let seq = Arc::new(Mutex::new(seq));
        let learner = match &config.learn {
            Some(l) => Some(
                Learner::open(
                    &config.fleet,
                    &config.device_id,
                    l.clone(),
                    config.limits.max_chunk_bytes,
                    &data,
                )
                .map_err(|e| open("learning state", &data.join("learn.json"), e))?,
            ),
            None => None,
        };
        let parts = Parts {
            signer: signer.clone(),
            seq: seq.clone(),
            outbox,
            state,
            chunks_root,
            model: served.as_ref().map(|s| s.info.clone()),
            stats: stats.clone(),
            learner,
        };
        let mut agent = Agent::new(&config, trust.clone(), parts, clock.now())?;
        agent.report(&failures, clock.now());
        match &served {
            Some(s) => tracing::info!(model = %s.info.name, version = s.info.version, "serving"),
            None => tracing::info!("no model installed yet"),
        }
        tracing::info!(device = %config.device_id, public_key = %signer.public_key(), "device identity");
        let (submit_tx, submit_rx) = mpsc::channel(64);
        Ok(Self {
            config,
            agent,
            store: Arc::new(store),
            trust,
            signer,
            seq,
            served: Arc::new(Mutex::new(served.map(Arc::new))),
            stats,
            clock,
            submit_tx,
            submit_rx,
            data: Arc::default(),
        })
    }

    /// Counters, shared with the running service.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The device's public key.
    pub fn public_key(&self) -> fedge_proto::PublicKey {
        self.signer.public_key()
    }

    /// The model served at start.
    pub fn model(&self) -> Option<ModelInfo> {
        self.agent.model().cloned()
    }

    /// A sender for messages to queue in the outbox while the service runs.
    pub fn submitter(&self) -> mpsc::Sender<Submit> {
        self.submit_tx.clone()
    }

    /// Runs until `shutdown` completes, then publishes the offline status (waiting up to 3 s for
    /// its acknowledgement) and disconnects cleanly.
    ///
    /// # Errors
    /// [`AgentError::Broker`] / [`AgentError::Tls`] when the link cannot be configured. Network
    /// failures are not errors: the link reconnects.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let will = StatusWill {
            seq: self.seq.clone(),
            signer: self.signer.clone(),
            device: self.config.device_id.clone(),
            topic: topic::dev_status(&self.config.fleet, &self.config.device_id)?.to_string(),
            model: Arc::new(Mutex::new(self.agent.model().cloned())),
        };
        let will_model = will.model.clone();
        let opts = LinkOptions {
            client_id: self
                .config
                .broker
                .client_id
                .clone()
                .unwrap_or_else(|| self.config.device_id.clone()),
            queue: 1024,
            inflight: u16::try_from(self.config.limits.publish_window + 16).unwrap_or(u16::MAX),
        };
        let (handle, driver, events) =
            link::connect(&self.config.broker, &opts, Some(Box::new(will)))?;
        let control = Control {
            svc: self,
            handle,
            will_model,
            jobs: mpsc::channel(16),
        };
        tokio::select! {
            () = driver.run() => {}
            () = control.run(events, shutdown) => {}
        }
        Ok(())
    }
}

/// Seals a fresh offline status for each connection attempt.
struct StatusWill {
    seq: Arc<Mutex<Sequencer>>,
    signer: Arc<Signer>,
    device: String,
    topic: String,
    model: Arc<Mutex<Option<ModelInfo>>>,
}

impl WillSource for StatusWill {
    fn will(&mut self) -> Option<LastWill> {
        let seq = self
            .seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .begin_session();
        let seq = seq
            .inspect_err(|e| tracing::error!(error = %e, "no sequence number for the last will"))
            .ok()?;
        let model = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let wire = seal_status(&self.signer, &self.device, seq, false, model.as_ref()).ok()?;
        Some(LastWill::new(&self.topic, wire, QoS::AtLeastOnce, true))
    }
}

struct Control {
    svc: Service,
    handle: LinkHandle,
    will_model: Arc<Mutex<Option<ModelInfo>>>,
    jobs: (mpsc::Sender<Done>, mpsc::Receiver<Done>),
}

impl Control {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<LinkEvent>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let dirs = self
            .svc
            .config
            .infer
            .input_dir
            .clone()
            .zip(self.svc.config.infer_output_dir())
            .map(|(input, output)| InferDirs {
                input,
                output,
                batch: self.svc.config.infer.batch,
            });
        let mut infer_tick =
            tokio::time::interval(Duration::from_millis(self.svc.config.infer.poll_ms.max(10)));
        infer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inferring = false;
        let (sock_tx, mut sock_rx) = mpsc::unbounded_channel();
        let _socket = self.svc.config.infer.socket.as_ref().and_then(|path| {
            match infer::socket::bind(path) {
                Ok(listener) => {
                    tracing::info!(socket = %path.display(), "inference socket listening");
                    Some(AbortOnDrop(tokio::spawn(infer::socket::serve(
                        listener,
                        self.svc.served.clone(),
                        self.svc.config.infer.max_request_bytes,
                        sock_tx.clone(),
                    ))))
                }
                Err(e) => {
                    tracing::error!(socket = %path.display(), error = %e, "inference socket not available");
                    None
                }
            }
        });
        let mut closing: Option<tokio::time::Instant> = None;
        let acts = self.svc.agent.on_start();
        self.execute(acts);
        loop {
            let clock = self.svc.clock;
            let wake = clock.instant(self.svc.agent.next_deadline());
            tokio::select! {
                ev = events.recv() => match ev {
                    None | Some(LinkEvent::Closed) => return,
                    Some(ev) => self.on_link(ev),
                },
                Some(r) = sock_rx.recv() => self.svc.agent.on_inferences(&[r]),
                Some(done) = self.jobs.1.recv() => {
                    inferring &= !matches!(done, Done::Infer(_));
                    self.on_done(done);
                }
                Some(s) = self.svc.submit_rx.recv() => {
                    let now = clock.now();
                    if let Err(e) = self.svc.agent.enqueue(s.class, &s.topic, s.kind, s.round, &s.payload, now) {
                        tracing::warn!(error = %e, "submitted message not queued");
                    }
                    let acts = self.svc.agent.flush();
                    self.execute(acts);
                }
                () = tokio::time::sleep_until(wake) => {
                    let acts = self.svc.agent.on_tick(clock.now());
                    self.execute(acts);
                }
                _ = infer_tick.tick(), if dirs.is_some() && !inferring => {
                    inferring = self.start_inference(dirs.clone());
                }
                () = &mut shutdown, if closing.is_none() => {
                    tracing::info!("shutting down");
                    let acts = self.svc.agent.shutdown(clock.now());
                    if acts.is_empty() {
                        return;
                    }
                    self.execute(acts);
                    closing = Some(tokio::time::Instant::now() + CLOSE_TIMEOUT);
                }
                () = sleep_until_opt(closing) => return,
            }
        }
    }

    fn on_link(&mut self, ev: LinkEvent) {
        let now = self.svc.clock.now();
        let agent = &mut self.svc.agent;
        let acts = match ev {
            LinkEvent::Connected => agent.on_connected(now),
            LinkEvent::Disconnected { .. } => {
                agent.on_disconnected();
                Vec::new()
            }
            LinkEvent::Message(p) => agent.on_message(&p.topic, &p.payload, now),
            LinkEvent::Written(pkid) => {
                agent.on_written(pkid);
                Vec::new()
            }
            LinkEvent::AwaitAck(pkid) => {
                agent.on_await_ack(pkid);
                Vec::new()
            }
            LinkEvent::Acked(pkid) => agent.on_acked(pkid),
            LinkEvent::SubscribeRefused => {
                tracing::warn!("the broker refused a subscription (check the device's ACL)");
                Vec::new()
            }
            LinkEvent::Closed => Vec::new(),
        };
        self.execute(acts);
    }

    fn on_done(&mut self, done: Done) {
        let now = self.svc.clock.now();
        let acts = match done {
            Done::Install(r, back) => {
                let info = self.swap(r);
                self.svc.agent.on_install_done(info, back, now)
            }
            Done::Rollback(r) => {
                let info = self.swap(r);
                self.svc.agent.on_rollback_done(info, now)
            }
            Done::Train(r) => self.svc.agent.on_train_done(r, now),
            Done::Infer(results) => {
                self.svc.agent.on_inferences(&results);
                Vec::new()
            }
        };
        *self
            .will_model
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.svc.agent.model().cloned();
        self.execute(acts);
    }

    /// Serves a newly installed model; the old one is dropped once running inferences finish.
    fn swap(&mut self, r: Result<Served, Failure>) -> Result<ModelInfo, Failure> {
        r.map(|served| {
            let info = served.info.clone();
            *self
                .svc
                .served
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(served));
            info
        })
    }

    fn execute(&mut self, acts: Vec<Action>) {
        let mut refused = false;
        for a in acts {
            match a {
                Action::Publish {
                    topic,
                    payload,
                    retain,
                    tag,
                } => {
                    if refused || self.handle.publish(&topic, payload, retain).is_err() {
                        refused = true;
                        self.svc.agent.on_refused(tag);
                    }
                }
                Action::Subscribe(t) => {
                    if self.handle.subscribe(&t).is_err() {
                        self.svc.agent.on_subscribe_refused(&t);
                    }
                }
                Action::Unsubscribe(t) => {
                    let _ = self.handle.unsubscribe(&t);
                }
                Action::Install(t) => self.start_install(t),
                Action::Rollback => {
                    let store = self.svc.store.clone();
                    self.spawn(move || Done::Rollback(store.rollback()));
                }
                Action::Train(job) => self.start_training(*job),
                Action::Disconnect => {
                    let _ = self.handle.disconnect();
                }
            }
        }
    }

    fn spawn(&self, job: impl FnOnce() -> Done + Send + 'static) {
        let tx = self.jobs.0.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.blocking_send(job());
        });
    }

    fn start_install(&self, t: Transfer) {
        let (store, trust, max) = (
            self.svc.store.clone(),
            self.svc.trust.clone(),
            self.svc.config.limits.max_bundle_bytes,
        );
        self.spawn(move || {
            let (r, back) = install(&store, &trust, max, t);
            Done::Install(r, back)
        });
    }

    fn start_training(&self, job: fl::TrainJob) {
        let Some(cfg) = self.svc.config.learn.clone() else {
            return;
        };
        let cache = self.svc.data.clone();
        self.spawn(move || Done::Train(fl::train_round(&job, &cfg, &cache)));
    }

    fn start_inference(&self, dirs: Option<InferDirs>) -> bool {
        let served = self
            .svc
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (Some(served), Some(dirs)) = (served, dirs) else {
            return false;
        };
        self.spawn(move || Done::Infer(infer::scan(&served, &dirs)));
        true
    }
}

/// Stops the inference socket's task with the control loop.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The install job: reassemble the transfer, check it against the manifest's sha256, verify the
/// bundle's operator signature and that it is what the command named, then install it. A transfer
/// whose chunks no longer read back is handed back to be fetched again.
pub fn install(
    store: &ModelStore,
    trust: &Trust,
    max_bundle: u64,
    mut t: Transfer,
) -> (Result<Served, Failure>, Option<Transfer>) {
    let bytes = match t.assemble() {
        Ok(b) => b,
        Err(ProtoError::Incomplete { missing }) => {
            let f = Failure::new(
                Reason::Storage,
                format!("{missing} stored chunks did not read back; fetching them again"),
            );
            return (Err(f), Some(t));
        }
        Err(e) => {
            t.remove();
            return (Err(Failure::new(Reason::of(e), e.to_string())), None);
        }
    };
    let sha = t.manifest().sha256;
    let want = t.want().clone();
    let r = trust
        .open(
            &bytes,
            usize::try_from(max_bundle)
                .unwrap_or(usize::MAX)
                .saturating_add(4096),
            None,
        )
        .map_err(|r| Failure::new(r.reason, format!("bundle: {}", r.detail)))
        .and_then(|env| {
            if env.kind != Kind::Bundle {
                return Err(Failure::new(
                    Reason::WrongKind,
                    format!("object is a {:?}, not a bundle", env.kind),
                ));
            }
            let b: Bundle<'_> = decode(env.payload)
                .map_err(|e| Failure::new(Reason::Malformed, format!("bundle: {e}")))?;
            if b.name != want.name || b.version != want.version {
                let detail = format!(
                    "bundle is {} v{}, the command named {} v{}",
                    b.name, b.version, want.name, want.version
                );
                return Err(Failure::new(Reason::Malformed, detail));
            }
            store.install(&b, &sha)
        });
    t.remove();
    (r, None)
}
