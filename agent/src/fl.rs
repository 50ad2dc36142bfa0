//! The federated-learning client.
//!
//! [`Learner`] is sans-io, driven by the core: a verified [`RoundAnnounce`] that selects this
//! device starts a [`Task`]; the global model is fetched from its retained chunks (one wildcard
//! subscription per version, reassembled in memory and checked against the announced sha256); a
//! [`TrainJob`] then runs off the reactor ([`train_round`]): the configured head is trained on
//! the local data with the announced hyper-parameters, and the delta is clipped, noised and
//! encoded with the job's codec. The core seals the [`Trained`] result as an `Update` into the
//! outbox (delivered at least once) and the aggregator's `Ack` closes the loop.
//!
//! One task runs at a time. A newer round of the same job replaces a fetch in progress; other
//! announcements wait in `pending` (the newest per job). The last round submitted per job is
//! persisted (`learn.json`), so a restarted device does not train a round twice, and does train
//! a round it had not finished.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use fedge_fl::secagg::{Params, RoundSetup};
use fedge_proto::chunk::{Assembly, Chunk, ChunkManifest};
use fedge_proto::msg::{Codec, Hyper, Phase, Reason, RoundAnnounce, SecAggSetup};
use fedge_runtime::train::data::{self, Dataset};
use fedge_runtime::train::{Head, HeadKind, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::agent::Action;
use crate::config::{HeadChoice, LearnConfig};
use crate::fsx;
use crate::store::Failure;
use crate::trust::Rejection;

/// An announcement this device acts on, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    pub job: String,
    pub round: u64,
    pub version: u64,
    pub manifest: ChunkManifest,
    pub param_count: u32,
    pub codec: Codec,
    pub hyper: Hyper,
    /// The aggregator's key to seal the update to (rounds that encrypt updates).
    pub recipient: Option<[u8; 32]>,
    /// The round runs secure aggregation: the session this device is in.
    pub secagg: Option<SecureSetup>,
}

/// A secure aggregation session (compared by its round hash).
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSetup(pub Arc<RoundSetup>);

/// What one training run needs; handed to the service to run off the reactor.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub job: String,
    pub round: u64,
    pub version: u64,
    /// The global model of the round.
    pub params: Vec<f32>,
    pub codec: Codec,
    pub hyper: Hyper,
    /// The shuffling seed of this run (config seed, device, job and round).
    pub seed: u64,
    pub recipient: Option<[u8; 32]>,
    pub secagg: Option<SecureSetup>,
}

/// The result of a training run, ready to be sealed as an `Update`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    pub job: String,
    pub round: u64,
    pub version: u64,
    pub num_samples: u64,
    pub loss: f32,
    pub accuracy: f32,
    /// The encoded delta (new − global, clipped and noised when the round asks).
    pub delta: Vec<u8>,
    /// Seal the update to this key (see [`Announced::recipient`]).
    pub recipient: Option<[u8; 32]>,
    /// Secure aggregation rounds: the session, and the update in clear (clipped and noised as
    /// the round asks; `delta` is then empty). It never leaves the device unmasked.
    pub secagg: Option<(SecureSetup, Vec<f32>)>,
}

#[derive(Debug)]
enum Stage {
    Fetching { asm: Assembly, filter: String },
    Training,
}

/// The round being worked on.
#[derive(Debug)]
pub struct Task {
    a: Announced,
    stage: Stage,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LearnState {
    /// Last round whose update was queued, per job.
    submitted: BTreeMap<String, u64>,
}

/// The client's state machine; see the module docs.
#[derive(Debug)]
pub struct Learner {
    fleet: String,
    device: String,
    cfg: LearnConfig,
    max_chunk: u32,
    state_path: PathBuf,
    state: LearnState,
    task: Option<Task>,
    pending: BTreeMap<String, Announced>,
    /// Seq of the last update queued per job, to pair acks.
    awaiting: BTreeMap<u64, (String, u64)>,
    /// This device's Ed25519 public key (its place in secure aggregation rosters).
    key: [u8; 32],
}

impl Learner {
    /// Sets this device's public key, which secure aggregation rosters list.
    #[must_use]
    pub fn with_key(mut self, key: [u8; 32]) -> Self {
        self.key = key;
        self
    }

    /// Opens the client's persisted state (`learn.json` in `data_dir`).
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for a state file that does not parse.
    pub fn open(
        fleet: &str,
        device: &str,
        cfg: LearnConfig,
        max_chunk: u32,
        data_dir: &Path,
    ) -> io::Result<Self> {
        let state_path = data_dir.join("learn.json");
        let state = match fsx::read_limited(&state_path, 1 << 20) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", state_path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => LearnState::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            fleet: fleet.into(),
            device: device.into(),
            cfg,
            max_chunk,
            state_path,
            state,
            task: None,
            pending: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            key: [0; 32],
        })
    }

    pub fn config(&self) -> &LearnConfig {
        &self.cfg
    }

    /// The announcement filter: the configured job's round topic, or every job's.
    pub fn round_filter(&self) -> String {
        let t = match &self.cfg.job {
            Some(job) => fedge_proto::topic::job_round(&self.fleet, job),
            None => fedge_proto::topic::all_rounds(&self.fleet),
        };
        t.map_or_else(|_| String::new(), |t| t.to_string())
    }

    /// A connection is up: subscribe to announcements, and to the chunks of a fetch in progress.
    pub fn on_connected(&self, out: &mut Vec<Action>) {
        out.push(Action::Subscribe(self.round_filter()));
        if let Some(Task {
            stage: Stage::Fetching { filter, .. },
            ..
        }) = &self.task
        {
            out.push(Action::Subscribe(filter.clone()));
        }
    }

    /// The last round whose update was queued for `job`.
    pub fn submitted(&self, job: &str) -> Option<u64> {
        self.state.submitted.get(job).copied()
    }

    /// A verified announcement on `job`'s round topic. `Ok(true)` when it starts or queues work
    /// for this device.
    ///
    /// # Errors
    /// A [`Rejection`] for an announcement that contradicts itself or exceeds the bounds.
    pub fn on_announce(
        &mut self,
        a: &RoundAnnounce<'_>,
        out: &mut Vec<Action>,
    ) -> Result<bool, Rejection> {
        if self.cfg.job.as_deref().is_some_and(|j| j != a.job) {
            return Ok(false);
        }
        if a.phase != Phase::Open {
            if a.phase == Phase::Finished {
                self.pending.remove(a.job);
                tracing::info!(job = a.job, version = a.model.version, "job finished");
            }
            return Ok(false);
        }
        if !a.selection.includes(a.job, a.round, &self.device) {
            tracing::debug!(job = a.job, round = a.round, "not selected for this round");
            return Ok(false);
        }
        if self.submitted(a.job).is_some_and(|r| r >= a.round) {
            return Ok(false);
        }
        check_announce(a)?;
        let recipient = match a.recipients {
            None => None,
            Some(table) => match fedge_proto::seal::recipients::find(table, &self.device) {
                Ok(Some(k)) => Some(k),
                Ok(None) => {
                    tracing::info!(
                        job = a.job,
                        round = a.round,
                        "the round takes sealed updates and lists no key for this device: sitting it out"
                    );
                    return Ok(false);
                }
                Err(_) => {
                    return Err(Rejection::new(
                        Reason::Malformed,
                        format!(
                            "round {} of {}: the recipient table does not parse",
                            a.round, a.job
                        ),
                    ));
                }
            },
        };
        let secagg = match a.secagg {
            None => None,
            Some(s) => match secure_setup(a, &s)? {
                setup if setup.index_of(&self.key).is_some() => Some(SecureSetup(Arc::new(setup))),
                _ => {
                    tracing::info!(
                        job = a.job,
                        round = a.round,
                        "the round runs secure aggregation without this device: sitting it out"
                    );
                    return Ok(false);
                }
            },
        };
        let ann = Announced {
            job: a.job.into(),
            round: a.round,
            version: a.model.version,
            manifest: a.manifest,
            param_count: a.param_count,
            codec: a.codec,
            hyper: a.hyper,
            recipient,
            secagg,
        };
        match &self.task {
            Some(t) if t.a.job == ann.job && t.a.round >= ann.round => Ok(false),
            Some(Task {
                a: current,
                stage: Stage::Fetching { filter, .. },
            }) if current.job == ann.job => {
                out.push(Action::Unsubscribe(filter.clone()));
                self.task = None;
                self.start(ann, out).map(|()| true)
            }
            Some(_) => {
                self.pending.insert(ann.job.clone(), ann);
                Ok(true)
            }
            None => self.start(ann, out).map(|()| true),
        }
    }

    fn start(&mut self, a: Announced, out: &mut Vec<Action>) -> Result<(), Rejection> {
        let asm = Assembly::new(a.manifest, self.cfg.max_memory_bytes, self.max_chunk).map_err(
            |e| {
                Rejection::new(
                    Reason::Oversize,
                    format!(
                        "round {} of {}: model of {} bytes in chunks of {} is beyond the bounds: {e}",
                        a.round, a.job, a.manifest.total_len, a.manifest.chunk_size
                    ),
                )
            },
        )?;
        let filter = format!(
            "fedge/v1/{}/job/{}/model/{}/+",
            self.fleet, a.job, a.version
        );
        tracing::info!(job = %a.job, round = a.round, version = a.version, "selected: fetching the global model");
        out.push(Action::Subscribe(filter.clone()));
        self.task = Some(Task {
            a,
            stage: Stage::Fetching { asm, filter },
        });
        Ok(())
    }

    /// The chunk size the fetch in progress expects for (`job`, `version`), if any.
    pub fn wants(&self, job: &str, version: u64) -> Option<u32> {
        match &self.task {
            Some(Task {
                a,
                stage: Stage::Fetching { asm, .. },
            }) if a.job == job && a.version == version => Some(asm.manifest().chunk_size),
            _ => None,
        }
    }

    /// A verified chunk of the model being fetched. Returns `Ok(true)` when it was new; when it
    /// completes the model, the training job is pushed.
    ///
    /// # Errors
    /// A [`Rejection`] for a chunk that does not fit the manifest, or a model that does not
    /// hash to it (the task is dropped; the next announcement starts over).
    pub fn on_chunk(&mut self, c: &Chunk<'_>, out: &mut Vec<Action>) -> Result<bool, Rejection> {
        let Some(Task {
            a,
            stage: Stage::Fetching { asm, filter },
        }) = &mut self.task
        else {
            return Ok(false);
        };
        if c.object != a.manifest.sha256 {
            return Ok(false);
        }
        let new = asm.insert(c).map_err(|e| {
            Rejection::new(
                Reason::Malformed,
                format!("model chunk {} of {}: {e}", c.index, a.job),
            )
        })?;
        if !asm.is_complete() {
            return Ok(new);
        }
        out.push(Action::Unsubscribe(filter.clone()));
        let Some(Task {
            a,
            stage: Stage::Fetching { asm, .. },
        }) = self.task.take()
        else {
            return Ok(new);
        };
        let bytes = asm.finish().map_err(|e| {
            Rejection::new(
                Reason::HashMismatch,
                format!("global model v{} of {}: {e}", a.version, a.job),
            )
        })?;
        let params = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let job = TrainJob {
            job: a.job.clone(),
            round: a.round,
            version: a.version,
            params,
            codec: a.codec,
            hyper: a.hyper,
            seed: run_seed(self.cfg.seed, &self.device, &a.job, a.round),
            recipient: a.recipient,
            secagg: a.secagg.clone(),
        };
        self.task = Some(Task {
            a,
            stage: Stage::Training,
        });
        out.push(Action::Train(Box::new(job)));
        Ok(new)
    }

    /// The training job ended (its update, if any, is being queued by the core): the task is
    /// over; a pending announcement starts.
    pub fn on_trained(&mut self, out: &mut Vec<Action>) -> Vec<Rejection> {
        self.task = None;
        let mut refused = Vec::new();
        while self.task.is_none() {
            let Some((_, next)) = self.pending.pop_first() else {
                break;
            };
            if self.submitted(&next.job).is_some_and(|r| r >= next.round) {
                continue;
            }
            if let Err(r) = self.start(next, out) {
                refused.push(r);
            }
        }
        refused
    }

    /// The update of (`job`, `round`) is in the outbox with `seq`: remember it durably.
    ///
    /// # Errors
    /// The state file could not be written (the round may then be trained again after a
    /// restart; the aggregator refuses the second update as a duplicate).
    pub fn on_queued(&mut self, job: &str, round: u64, seq: u64) -> io::Result<()> {
        self.awaiting.insert(seq, (job.into(), round));
        while self.awaiting.len() > 64 {
            self.awaiting.pop_first();
        }
        self.state.submitted.insert(job.into(), round);
        let json = serde_json::to_vec(&self.state).map_err(io::Error::other)?;
        fsx::write_atomic(&self.state_path, &json, true)
    }

    /// The job and round of the update sent with `seq`, if it was sent by this run.
    pub fn acked(&mut self, seq: u64) -> Option<(String, u64)> {
        self.awaiting.remove(&seq)
    }
}

/// Self-consistency of an announcement, before anything is reserved for it.
fn check_announce(a: &RoundAnnounce<'_>) -> Result<(), Rejection> {
    let bad = |what: String| {
        Err(Rejection::new(
            Reason::Malformed,
            format!("round {} of {}: {what}", a.round, a.job),
        ))
    };
    if a.manifest.sha256 != a.model.sha256 {
        return bad("manifest and model hashes differ".into());
    }
    if a.manifest.total_len != u64::from(a.param_count) * 4 || a.param_count == 0 {
        return bad(format!(
            "model of {} bytes for {} parameters",
            a.manifest.total_len, a.param_count
        ));
    }
    Ok(())
}

/// The secure aggregation session an announcement describes.
///
/// # Errors
/// `Malformed` for a roster that is not whole keys or parameters the protocol refuses.
pub fn secure_setup(a: &RoundAnnounce<'_>, s: &SecAggSetup<'_>) -> Result<RoundSetup, Rejection> {
    let bad = |what: String| {
        Rejection::new(
            Reason::Malformed,
            format!("round {} of {}: secure aggregation: {what}", a.round, a.job),
        )
    };
    if !s.roster.len().is_multiple_of(32) {
        return Err(bad(format!("a roster of {} bytes", s.roster.len())));
    }
    let roster = s
        .roster
        .chunks_exact(32)
        .map(|c| {
            let mut k = [0u8; 32];
            k.copy_from_slice(c);
            k
        })
        .collect();
    let params = Params {
        len: a.param_count as usize,
        neighbours: s.neighbours as usize,
        threshold: s.threshold as usize,
        clip: s.clip,
        quant_bits: u32::from(s.quant_bits),
        mod_bits: u32::from(s.mod_bits),
    };
    RoundSetup::with_session(a.job, a.round, s.session, roster, params)
        .map_err(|e| bad(e.to_string()))
}

/// The shuffling seed of a run: sha256 of the configured seed, device, job and round.
fn run_seed(seed: u64, device: &str, job: &str, round: u64) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fedge-train");
    ctx.update(&seed.to_le_bytes());
    for s in [device, job] {
        ctx.update(s.as_bytes());
        ctx.update(&[0]);
    }
    ctx.update(&round.to_le_bytes());
    let d = ctx.finish();
    let mut x = [0u8; 8];
    x.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(x)
}

/// The local data set, loaded once and reloaded when the file changes.
#[derive(Debug, Default)]
pub struct DataCache {
    loaded: Mutex<Option<(Stamp, Arc<Dataset>)>>,
}

type Stamp = (u64, Option<SystemTime>);

impl DataCache {
    /// The data set of `path`, read when not cached or changed on disk.
    ///
    /// # Errors
    /// `load_failed` for an unreadable or invalid file, `oversize` for a file larger than
    /// `max_bytes`.
    pub fn get(&self, path: &Path, max_bytes: u64) -> Result<Arc<Dataset>, Failure> {
        let meta = std::fs::metadata(path).map_err(|e| {
            Failure::new(Reason::LoadFailed, format!("data {}: {e}", path.display()))
        })?;
        let stamp = (meta.len(), meta.modified().ok());
        let mut cached = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, d)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(d.clone());
        }
        if meta.len() > max_bytes {
            return Err(Failure::new(
                Reason::Oversize,
                format!(
                    "data {} has {} bytes, beyond learn.max_memory_bytes = {max_bytes}",
                    path.display(),
                    meta.len()
                ),
            ));
        }
        let npz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        let d = if npz {
            data::read_npz(path)
        } else {
            data::read_csv(path)
        }
        .map_err(|e| Failure::new(Reason::LoadFailed, format!("data: {e}")))?;
        let d = Arc::new(d);
        *cached = Some((stamp, d.clone()));
        Ok(d)
    }
}

/// The head shape for `param_count` parameters over `features` inputs: the configured classes,
/// or the count the parameters imply.
///
/// # Errors
/// `wrong_shape` when no head of the configured kind has that many parameters.
pub fn head_shape(
    cfg: &LearnConfig,
    features: usize,
    param_count: usize,
) -> Result<(HeadKind, usize), Failure> {
    let kind = match cfg.head {
        HeadChoice::Softmax => HeadKind::Softmax,
        HeadChoice::Mlp => HeadKind::Mlp { hidden: cfg.hidden },
    };
    let (fixed, per_class) = match kind {
        HeadKind::Softmax => (0, features + 1),
        HeadKind::Mlp { hidden } => (hidden * (features + 1), hidden + 1),
    };
    let classes = cfg.classes.unwrap_or_else(|| {
        let rest = param_count.saturating_sub(fixed);
        if rest % per_class == 0 {
            rest / per_class
        } else {
            0
        }
    });
    if classes < 2 || Head::param_count_for(kind, features, classes) != param_count {
        return Err(Failure::new(
            Reason::WrongShape,
            format!(
                "the global model has {param_count} parameters; a {kind:?} head over {features} \
                 features{} has {}",
                cfg.classes
                    .map_or_else(String::new, |c| format!(" and {c} classes")),
                Head::param_count_for(kind, features, classes.max(2))
            ),
        ));
    }
    Ok((kind, classes))
}

/// Bytes a run holds besides the data set: global, trained, gradient, momentum and proximal
/// anchor vectors, the row permutation, and the delta with its encoding.
pub fn working_set(rows: usize, params: usize) -> u64 {
    (params as u64) * 4 * 7 + (rows as u64) * 8
}

/// One training run (blocking): the configured head on the local data, from the global model
/// with the announced hyper-parameters; the delta clipped to `clip_norm` and noised with
/// `noise_multiplier × clip_norm` Gaussian noise when the round asks, then encoded.
///
/// # Errors
/// A [`Failure`]: the data cannot be loaded (`load_failed`), the run would exceed the memory
/// bound (`oversize`), the model does not fit the data (`wrong_shape`), training diverges or
/// the configuration is invalid (`non_finite`, `malformed`).
pub fn train_round(
    job: &TrainJob,
    cfg: &LearnConfig,
    cache: &DataCache,
) -> Result<Trained, Failure> {
    let bound = cfg.max_memory_bytes;
    let d = cache.get(&cfg.data, bound)?;
    let need = (d.x.len() as u64 + d.y.len() as u64) * 4 + working_set(d.len(), job.params.len());
    if need > bound {
        return Err(Failure::new(
            Reason::Oversize,
            format!("training needs about {need} bytes, beyond learn.max_memory_bytes = {bound}"),
        ));
    }
    let (kind, classes) = head_shape(cfg, d.features, job.params.len())?;
    if d.classes > classes {
        return Err(Failure::new(
            Reason::WrongShape,
            format!(
                "local labels go up to {}, the head has {classes} classes",
                d.classes - 1
            ),
        ));
    }
    let train_err = |e: fedge_runtime::train::TrainError| {
        let reason = match e {
            fedge_runtime::train::TrainError::Diverged { .. } => Reason::NonFinite,
            fedge_runtime::train::TrainError::ParamCount { .. } => Reason::WrongShape,
            _ => Reason::Malformed,
        };
        Failure::new(reason, format!("round {} of {}: {e}", job.round, job.job))
    };
    let mut head = Head::from_params(kind, d.features, classes, &job.params).map_err(train_err)?;
    let tc = TrainConfig {
        epochs: job.hyper.epochs as usize,
        batch_size: job.hyper.batch_size as usize,
        learning_rate: job.hyper.learning_rate,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        proximal_mu: job.hyper.proximal_mu,
        seed: job.seed,
    };
    let report = fedge_runtime::train::train(&mut head, &d.x, &d.y, &tc, Some(&job.params))
        .map_err(train_err)?;
    let mut delta = fedge_fl::delta(head.params(), &job.params)
        .map_err(|e| Failure::new(Reason::Internal, e.to_string()))?;
    privatize(&mut delta, &job.hyper)?;
    if let Some(setup) = &job.secagg {
        return Ok(Trained {
            job: job.job.clone(),
            round: job.round,
            version: job.version,
            num_samples: report.samples as u64,
            loss: report.loss,
            accuracy: report.accuracy,
            delta: Vec::new(),
            recipient: None,
            secagg: Some((setup.clone(), delta)),
        });
    }
    let codec = match job.codec {
        Codec::F32 => fedge_fl::Codec::F32,
        Codec::F16 => fedge_fl::Codec::F16,
        Codec::Int8Block => fedge_fl::Codec::int8(),
    };
    let delta = codec
        .encode(&delta)
        .map_err(|e| Failure::new(Reason::NonFinite, format!("update: {e}")))?;
    Ok(Trained {
        job: job.job.clone(),
        round: job.round,
        version: job.version,
        num_samples: report.samples as u64,
        loss: report.loss,
        accuracy: report.accuracy,
        delta,
        recipient: job.recipient,
        secagg: None,
    })
}

/// Client-side clipping and Gaussian noise (DP-FedAvg, McMahan et al., ICLR 2018): clipping
/// alone when only `clip_norm` is set; with a noise multiplier too, `fedge_fl::dp::LocalDp`
/// with noise from a ChaCha generator keyed by the system CSPRNG.
fn privatize(delta: &mut [f32], h: &Hyper) -> Result<(), Failure> {
    if h.clip_norm > 0.0 && h.noise_multiplier > 0.0 {
        let dp = fedge_fl::dp::LocalDp::new(f64::from(h.noise_multiplier), f64::from(h.clip_norm))
            .map_err(|e| Failure::new(Reason::Malformed, format!("DP parameters: {e}")))?;
        let mut rng = fedge_fl::dp::NoiseRng::from_system()
            .map_err(|e| Failure::new(Reason::Internal, format!("DP noise: {e}")))?;
        dp.privatize(delta, &mut rng)
            .map_err(|e| Failure::new(Reason::NonFinite, format!("DP noise: {e}")))?;
    } else if h.clip_norm > 0.0 {
        fedge_fl::clip_l2(delta, h.clip_norm)
            .map_err(|e| Failure::new(Reason::NonFinite, format!("clipping: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;
    use fedge_proto::msg::{ModelRef, Selection};

    fn cfg(data: PathBuf) -> LearnConfig {
        let text = format!("data = {data:?}\n");
        toml::from_str(&text).expect("learn config")
    }

    fn hyper() -> Hyper {
        Hyper {
            learning_rate: 0.5,
            epochs: 5,
            batch_size: 4,
            proximal_mu: 0.0,
            clip_norm: 0.0,
            noise_multiplier: 0.0,
        }
    }

    fn model(params: &[f32]) -> (Vec<u8>, ChunkManifest) {
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = ChunkManifest::of(&bytes, 8).expect("manifest");
        (bytes, m)
    }

    fn announce<'a>(
        m: ChunkManifest,
        round: u64,
        n: u32,
        selection: Selection,
    ) -> RoundAnnounce<'a> {
        RoundAnnounce {
            job: "j",
            round,
            phase: Phase::Open,
            model: ModelRef {
                name: "j",
                version: round - 1,
                sha256: m.sha256,
            },
            manifest: m,
            param_count: n,
            codec: Codec::F32,
            selection,
            hyper: hyper(),
            deadline_unix_ms: 0,
            recipients: None,
            secagg: None,
        }
    }

    #[test]
    fn head_shape_is_derived_from_the_parameter_count() {
        let c = cfg("d.csv".into());
        assert_eq!(head_shape(&c, 64, 650).expect("softmax").1, 10);
        assert_eq!(
            head_shape(&c, 64, 651).expect_err("odd").reason,
            Reason::WrongShape
        );
        let mlp = LearnConfig {
            head: HeadChoice::Mlp,
            hidden: 8,
            ..c
        };
        assert_eq!(head_shape(&mlp, 4, 8 * 5 + 3 * 9).expect("mlp").1, 3);
    }

    #[test]
    fn a_selected_round_is_fetched_trained_and_remembered() {
        let dir = TestDir::new("fl-round");
        let data = dir.path().join("d.csv");
        std::fs::write(&data, "a,b,label\n0,1,0\n1,0,1\n0,0.9,0\n1,0.1,1\n").expect("data");
        let mut l = Learner::open("f", "dev", cfg(data.clone()), 1024, dir.path()).expect("open");
        let global = vec![0.0f32; 6];
        let (bytes, m) = model(&global);
        let mut out = Vec::new();
        assert!(
            l.on_announce(&announce(m, 1, 6, Selection::All), &mut out)
                .expect("announce")
        );
        assert!(matches!(&out[..], [Action::Subscribe(t)] if t == "fedge/v1/f/job/j/model/0/+"));
        out.clear();
        let chunks: Vec<Chunk<'_>> = m.split(&bytes).collect();
        for c in chunks.iter().rev() {
            l.on_chunk(c, &mut out).expect("chunk");
        }
        let Some(Action::Train(job)) = out.pop() else {
            panic!("no training job: {out:?}");
        };
        assert_eq!(job.params, global);
        let t = train_round(&job, l.config(), &DataCache::default()).expect("train");
        assert_eq!((t.num_samples, t.accuracy), (4, 1.0));
        let delta = fedge_fl::decode(&t.delta).expect("decode");
        assert!(delta.iter().any(|v| *v != 0.0));
        // The same seed gives the same update.
        let again = train_round(&job, l.config(), &DataCache::default()).expect("again");
        assert_eq!(again, t);
        l.on_trained(&mut out);
        l.on_queued("j", 1, 42).expect("queued");
        assert_eq!(l.acked(42), Some(("j".into(), 1)));
        let mut l = Learner::open("f", "dev", cfg(data), 1024, dir.path()).expect("reopen");
        assert_eq!(l.submitted("j"), Some(1));
        assert!(
            !l.on_announce(&announce(m, 1, 6, Selection::All), &mut out)
                .expect("again")
        );
    }

    #[test]
    fn a_sealed_round_carries_this_devices_key_or_is_sat_out() {
        let dir = TestDir::new("fl-sealed");
        let data = dir.path().join("d.csv");
        std::fs::write(&data, "a,b,label\n0,1,0\n1,0,1\n").expect("data");
        let mut l = Learner::open("f", "dev", cfg(data), 1024, dir.path()).expect("open");
        let (bytes, m) = model(&[0.0f32; 6]);
        let mut table = Vec::new();
        fedge_proto::seal::recipients::push(&mut table, "other", &[7; 32]).expect("push");
        let mut listed = table.clone();
        fedge_proto::seal::recipients::push(&mut listed, "dev", &[9; 32]).expect("push");
        let mut out = Vec::new();
        let mut a = announce(m, 1, 6, Selection::All);
        a.recipients = Some(&table);
        assert!(!l.on_announce(&a, &mut out).expect("not listed"));
        assert!(out.is_empty());
        let mut bad = table.clone();
        bad.push(9);
        a.recipients = Some(&bad);
        let r = l.on_announce(&a, &mut out).expect_err("bad table");
        assert_eq!(r.reason, Reason::Malformed);
        a.recipients = Some(&listed);
        assert!(l.on_announce(&a, &mut out).expect("listed"));
        for c in m.split(&bytes) {
            l.on_chunk(&c, &mut out).expect("chunk");
        }
        let Some(Action::Train(job)) = out.pop() else {
            panic!("no training job: {out:?}");
        };
        assert_eq!(job.recipient, Some([9; 32]));
    }

    #[test]
    fn a_secure_round_needs_this_device_in_its_roster_and_trains_for_it() {
        let dir = TestDir::new("fl-secure");
        let data = dir.path().join("d.csv");
        std::fs::write(&data, "a,b,label\n0,1,0\n1,0,1\n").expect("data");
        let me = [9u8; 32];
        let mut l = Learner::open("f", "dev", cfg(data), 1024, dir.path())
            .expect("open")
            .with_key(me);
        let (bytes, m) = model(&[0.0f32; 6]);
        let others: Vec<u8> = [[1u8; 32], [2; 32], [3; 32]].concat();
        let with_me: Vec<u8> = [[1u8; 32], [2; 32], me].concat();
        let setup = |roster| SecAggSetup {
            session: 77,
            neighbours: 2,
            threshold: 2,
            clip: 1.0,
            quant_bits: 16,
            mod_bits: 18,
            roster,
        };
        let mut out = Vec::new();
        let mut a = announce(m, 1, 6, Selection::All);
        a.secagg = Some(setup(&others));
        assert!(!l.on_announce(&a, &mut out).expect("not in the roster"));
        assert!(out.is_empty());
        a.secagg = Some(setup(&with_me[..95]));
        let r = l.on_announce(&a, &mut out).expect_err("torn roster");
        assert_eq!(r.reason, Reason::Malformed);
        a.secagg = Some(SecAggSetup {
            threshold: 1,
            ..setup(&with_me)
        });
        let r = l
            .on_announce(&a, &mut out)
            .expect_err("threshold not above k/2");
        assert_eq!(r.reason, Reason::Malformed);
        a.secagg = Some(setup(&with_me));
        assert!(l.on_announce(&a, &mut out).expect("in the roster"));
        for c in m.split(&bytes) {
            l.on_chunk(&c, &mut out).expect("chunk");
        }
        let Some(Action::Train(job)) = out.pop() else {
            panic!("no training job: {out:?}");
        };
        let s = job.secagg.clone().expect("a secure round");
        assert_eq!((s.0.session(), s.0.index_of(&me)), (77, Some(2)));
        let t = train_round(&job, l.config(), &DataCache::default()).expect("train");
        let (_, update) = t.secagg.expect("kept in clear for masking");
        assert!(t.delta.is_empty(), "nothing encoded to send in clear");
        assert_eq!(update.len(), 6);
    }

    #[test]
    fn bad_announcements_and_models_are_refused() {
        let dir = TestDir::new("fl-bad");
        let mut l = Learner::open("f", "dev", cfg("d.csv".into()), 1024, dir.path()).expect("open");
        let (bytes, m) = model(&[1.0; 6]);
        let mut out = Vec::new();
        let r = l.on_announce(&announce(m, 1, 7, Selection::All), &mut out);
        assert_eq!(r.expect_err("count").reason, Reason::Malformed);
        let none = Selection::Sample {
            seed: 1,
            fraction_ppm: 0,
        };
        assert!(
            !l.on_announce(&announce(m, 1, 6, none), &mut out)
                .expect("not selected")
        );
        assert!(out.is_empty());
        let mut lying = announce(m, 1, 6, Selection::All);
        let (_, other) = model(&[2.0; 6]);
        lying.manifest.sha256 = other.sha256;
        lying.model.sha256 = other.sha256;
        assert!(l.on_announce(&lying, &mut out).expect("announce"));
        let mut tampered = bytes.clone();
        tampered[0] ^= 1;
        let mut result = Ok(false);
        for c in other.split(&tampered) {
            result = l.on_chunk(&c, &mut out);
        }
        assert_eq!(result.expect_err("hash").reason, Reason::HashMismatch);
        assert!(!out.iter().any(|a| matches!(a, Action::Train(_))));
    }

    #[test]
    fn training_refuses_data_beyond_the_memory_bound() {
        let dir = TestDir::new("fl-mem");
        let data = dir.path().join("d.csv");
        let rows: String = (0..5000)
            .map(|i| format!("{},{}\n", i % 7, i % 2))
            .collect();
        std::fs::write(&data, rows).expect("data");
        let c = LearnConfig {
            max_memory_bytes: 1 << 16,
            ..cfg(data)
        };
        let job = TrainJob {
            job: "j".into(),
            round: 1,
            version: 0,
            params: vec![0.0; 4],
            codec: Codec::F32,
            hyper: hyper(),
            seed: 0,
            recipient: None,
            secagg: None,
        };
        let f = train_round(&job, &c, &DataCache::default()).expect_err("bound");
        assert_eq!(f.reason, Reason::Oversize);
    }
}
