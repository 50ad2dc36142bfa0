//! `fedge rollout`: a signed bundle rolled out in waves over the retained desired-state topics.
//!
//! The bundle's chunks go out retained on `bundle/{sha256}/{i}`; each device of a wave gets a
//! fresh, signed `Command::Install` retained on its `dev/{device}/desired` topic, which it acts
//! on when it sees it (now, or when it next connects). The rollout watches the retained
//! `status` (the model each device runs) and the `telemetry` events (a failed self-test, load or
//! hash check), lets each wave bake for the health window, and advances, or aborts when more
//! than `--abort-above` of a wave failed. An abort gives the failed wave (a manual `abort`: every
//! device that took the bundle) its previous desired state again, re-signed, or a `Rollback`
//! command where there was none.
//!
//! Everything the rollout knows lives in its state file (`--state`, JSON, rewritten atomically
//! at every step), so `fedge rollout resume` carries on after a crash or a pause.
//! `pause` and `abort` leave a request beside it (`STATE.control`) for a running rollout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedge_proto::chunk::ChunkManifest;
use fedge_proto::envelope::{decode, encode};
use fedge_proto::msg::{Bundle, Command, Reason, Status, Telemetry};
use fedge_proto::{Envelope, Kind, PublicKey, Signer, topic};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::bundle::sha256;

const MAX_WIRE: usize = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Roll a signed bundle out to a group in waves (exit 0 when every device runs it, 1 on
    /// abort or error).
    Start(Box<StartArgs>),
    /// Print a rollout's state file: phase, wave, and each device's progress.
    Status(StateArgs),
    /// Ask a running rollout to stop before its next wave (it exits; `resume` carries on).
    Pause(StateArgs),
    /// Carry on with a paused or interrupted rollout from its state file.
    Resume(StateArgs),
    /// Stop a rollout and put every device that took the bundle back on its previous model.
    Abort(StateArgs),
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The bundle file (`fedge bundle build`).
    pub bundle: PathBuf,
    /// The operator's private key (signs the chunks and the desired states).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The broker: mqtt://host:port.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// MQTT user name (the operator's, with write access to the desired and bundle topics).
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The group: the fleet name the agents are configured with (the topic namespace).
    #[arg(long, default_value = "default")]
    pub group: String,
    /// Only these devices (comma-separated). Default: every device with a retained status in
    /// the group.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Cumulative share of the devices in each wave; the last must be 100%.
    #[arg(long, default_value = "5%,25%,100%")]
    pub waves: String,
    /// How long each wave must stay healthy (online, no failed install or inference errors)
    /// after all its devices run the bundle: e.g. 30s, 2m, 1h.
    #[arg(long, default_value = "2m")]
    pub health_window: String,
    /// How long a device may take to fetch, check and load the bundle before it counts as
    /// failed.
    #[arg(long, default_value = "10m")]
    pub install_timeout: String,
    /// Abort when more than this share of a wave failed.
    #[arg(long, default_value = "10%")]
    pub abort_above: String,
    /// Sender id in the envelopes (agents configured with `operator_id` require it).
    #[arg(long, default_value = "operator")]
    pub operator_id: String,
    /// Chunk size of the bundle on the broker, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub chunk_size: u32,
    /// How long to collect the retained statuses that name the group's devices.
    #[arg(long, default_value = "2s")]
    pub discover: String,
    /// The state file (created; must not exist unless --force).
    #[arg(long, default_value = "fedge-rollout.json")]
    pub state: PathBuf,
    /// Replace an existing state file.
    #[arg(long)]
    pub force: bool,
    /// Print the final state as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The rollout's state file.
    #[arg(long, default_value = "fedge-rollout.json")]
    pub state: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Paused,
    Aborted,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum DevicePhase {
    /// Its wave has not started.
    Pending,
    /// Desired state published; waiting for it to run the bundle.
    Desired,
    /// Runs the bundle.
    Updated,
    /// Failed to take it or became unhealthy.
    Failed(String),
    /// Given its previous desired state back.
    RolledBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub wave: usize,
    pub phase: DevicePhase,
    /// The model it reported before the rollout (`name vN`).
    pub previous_model: Option<String>,
    /// Its retained desired state before the rollout (hex of the envelope).
    pub previous_desired: Option<String>,
    /// Unix ms when its desired state was published.
    pub desired_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutState {
    pub bundle: PathBuf,
    pub name: String,
    pub version: u64,
    /// sha256 of the bundle file (the chunked object).
    pub bundle_sha256: String,
    /// sha256 of the model, as devices report it.
    pub model_sha256: String,
    pub broker: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub group: String,
    pub key: PathBuf,
    pub operator_id: String,
    pub chunk_size: u32,
    /// Cumulative device counts per wave.
    pub waves: Vec<usize>,
    pub health_window_ms: u64,
    pub install_timeout_ms: u64,
    pub abort_above: f64,
    pub phase: Phase,
    /// The wave in progress (or next).
    pub wave: usize,
    pub next_seq: u64,
    pub devices: Vec<DeviceState>,
    pub log: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        RolloutCommand::Start(s) => start(&s),
        RolloutCommand::Status(s) => status(&s),
        RolloutCommand::Pause(s) => control(&s.state, "pause"),
        RolloutCommand::Resume(s) => {
            let _ = std::fs::remove_file(control_path(&s.state));
            let mut st = load(&s.state)?;
            match st.phase {
                Phase::Done => bail!("the rollout of {} v{} is done", st.name, st.version),
                Phase::Aborted => bail!("the rollout of {} v{} was aborted", st.name, st.version),
                Phase::Running | Phase::Paused => {}
            }
            // Running on disk before anything else, so an `abort` from now on is left to us.
            st.phase = Phase::Running;
            save(&s.state, &st)?;
            drive(&s.state, st, s.json)
        }
        RolloutCommand::Abort(s) => abort_cmd(&s),
    }
}

/// `5s`, `2m`, `1h`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((t, "s"), |i| t.split_at(i));
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("{s:?}: not a duration (e.g. 30s, 2m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        u => bail!("{s:?}: unknown unit {u:?} (ms, s, m, h)"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `10%` or `0.1`.
pub fn parse_share(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .ok()
    .filter(|v| v.is_finite() && (0.0..=1.0).contains(v))
    .with_context(|| format!("{s:?}: not a share between 0% and 100%"))?;
    Ok(v)
}

/// Cumulative device counts for `n` devices: each wave at least one more device, the last all.
pub fn wave_counts(spec: &str, n: usize) -> anyhow::Result<Vec<usize>> {
    let shares: Vec<f64> = spec
        .split(',')
        .map(parse_share)
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("--waves {spec}"))?;
    if shares.windows(2).any(|w| w[1] <= w[0]) {
        bail!("--waves {spec}: shares must increase");
    }
    if shares.last().is_none_or(|&l| (l - 1.0).abs() > 1e-9) {
        bail!("--waves {spec}: the last wave must be 100%");
    }
    let mut counts: Vec<usize> = Vec::new();
    for s in shares {
        let c = ((s * n as f64).ceil() as usize).clamp(1, n);
        if counts.last().is_none_or(|&l| c > l) {
            counts.push(c);
        }
    }
    Ok(counts)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

fn control_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".control");
    PathBuf::from(s)
}

fn load(path: &Path) -> anyhow::Result<RolloutState> {
    let text = std::fs::read(path).with_context(|| format!("rollout state {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("rollout state {}: not a rollout state file", path.display()))
}

fn save(path: &Path, st: &RolloutState) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".tmp-{}", name.to_string_lossy()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

fn control(state: &Path, what: &str) -> anyhow::Result<()> {
    let st = load(state)?;
    if st.phase != Phase::Running {
        bail!("the rollout is {:?}, not running", st.phase);
    }
    std::fs::write(control_path(state), what)
        .with_context(|| format!("writing {}", control_path(state).display()))?;
    println!(
        "{what} requested for the rollout of {} v{}",
        st.name, st.version
    );
    Ok(())
}

fn status(a: &StateArgs) -> anyhow::Result<()> {
    let st = load(&a.state)?;
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(());
    }
    println!(
        "rollout of {} v{} to group {}: {:?}, wave {}/{} ({} devices)",
        st.name,
        st.version,
        st.group,
        st.phase,
        (st.wave + 1).min(st.waves.len()),
        st.waves.len(),
        st.devices.len()
    );
    println!(
        "{:<24} {:>4}  {:<12} {:<16} detail",
        "device", "wave", "state", "before"
    );
    for d in &st.devices {
        let (state, detail) = match &d.phase {
            DevicePhase::Pending => ("pending", ""),
            DevicePhase::Desired => ("desired", ""),
            DevicePhase::Updated => ("updated", ""),
            DevicePhase::Failed(why) => ("failed", why.as_str()),
            DevicePhase::RolledBack => ("rolled back", ""),
        };
        println!(
            "{:<24} {:>4}  {:<12} {:<16} {detail}",
            d.id,
            d.wave + 1,
            state,
            d.previous_model.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// What the broker tells about the devices.
#[derive(Debug, Default)]
struct Seen {
    status: HashMap<String, Reported>,
    desired: HashMap<String, Vec<u8>>,
    /// Failure events and inference errors per device, with the device's timestamps.
    failures: HashMap<String, Vec<(u64, String)>>,
    infer_errors: HashMap<String, u64>,
}

struct Link {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// PUBACKs received, against `published`.
    acked: Arc<AtomicU64>,
    published: AtomicU64,
}

/// Where and how to log in to the broker.
pub struct Login<'a> {
    pub broker: &'a str,
    pub username: Option<&'a str>,
    pub password_file: Option<&'a Path>,
    pub group: &'a str,
}

impl RolloutState {
    fn login(&self) -> Login<'_> {
        Login {
            broker: &self.broker,
            username: self.username.as_deref(),
            password_file: self.password_file.as_deref(),
            group: &self.group,
        }
    }
}

async fn connect(st: &Login<'_>) -> anyhow::Result<Link> {
    let url = fedge_agent::link::BrokerUrl::parse(st.broker).map_err(anyhow::Error::msg)?;
    if url.tls {
        bail!(
            "--broker {}: TLS is not supported by `fedge rollout` yet",
            st.broker
        );
    }
    let id = format!(
        "fedge-rollout-{}-{}",
        std::process::id(),
        now_ms() % 100_000
    );
    let mut mo = MqttOptions::new(id, url.host.clone(), url.port);
    mo.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(4 << 20, 4 << 20);
    if let Some(user) = st.username {
        let pass = match st.password_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("--password-file {}", p.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        };
        mo.set_credentials(user, pass);
    }
    let (client, mut eventloop) = AsyncClient::new(mo, 1024);
    let mut no = NetworkOptions::new();
    no.set_tcp_nodelay(true);
    no.set_connection_timeout(5);
    eventloop.set_network_options(no);
    let filters = [
        topic::all_devices(st.group, "status")?.to_string(),
        topic::all_devices(st.group, "telemetry")?.to_string(),
        topic::all_devices(st.group, "desired")?.to_string(),
    ];
    // The first connection must succeed; later drops are retried, resubscribing each time.
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => bail!("broker {} unreachable: {e}", st.broker),
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let acked = Arc::new(AtomicU64::new(0));
    let acks = acked.clone();
    let sub = client.clone();
    for f in &filters {
        sub.subscribe(f, QoS::AtLeastOnce).await?;
    }
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = sub.try_subscribe(f, QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "broker connection lost; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Ok(Link {
        client,
        rx,
        acked,
        published: AtomicU64::new(0),
    })
}

impl Seen {
    fn take(&mut self, topic_name: &str, wire: &[u8]) {
        let Some(t) = topic::Topic::parse(topic_name) else {
            return;
        };
        match t {
            topic::Topic::DevStatus { device, .. } => {
                if let Some((online, model, key)) = open_status(wire, device) {
                    self.status.insert(device.to_string(), (online, model, key));
                }
            }
            topic::Topic::DevDesired { device, .. } => {
                self.desired.insert(device.to_string(), wire.to_vec());
            }
            topic::Topic::DevTelemetry { device, .. } => {
                let Some((_, _, key)) = self.status.get(device) else {
                    return;
                };
                let Ok(env) = Envelope::open(wire, MAX_WIRE).and_then(|u| u.verify(key)) else {
                    return tracing::warn!(device, "telemetry that does not verify ignored");
                };
                let Ok(t) = decode::<Telemetry<'_>>(env.payload) else {
                    return;
                };
                self.infer_errors.insert(device.to_string(), t.infer_errors);
                let list = self.failures.entry(device.to_string()).or_default();
                for e in &t.events {
                    if matches!(
                        e.reason,
                        Reason::SelfTestFailed
                            | Reason::LoadFailed
                            | Reason::HashMismatch
                            | Reason::BadSignature
                            | Reason::Oversize
                            | Reason::Malformed
                            | Reason::Storage
                            | Reason::UnknownSender
                    ) {
                        list.push((e.at_ms, format!("{}: {}", e.reason.as_str(), e.detail)));
                    }
                }
            }
            _ => {}
        }
    }
}

pub type Reported = (bool, Option<(String, u64, [u8; 32])>, PublicKey);

/// A device's retained status, verified with the key it carries (that binds the status to the
/// key; the registry binds the key to the device).
fn open_status(wire: &[u8], device: &str) -> Option<Reported> {
    let u = Envelope::open(wire, MAX_WIRE).ok()?;
    if u.sender() != device || u.kind() != Kind::Status {
        return None;
    }
    let env = u
        .verify_self_signed(|p| decode::<Status<'_>>(p).ok().map(|s| s.public_key))
        .ok()?;
    let s: Status<'_> = decode(env.payload).ok()?;
    let model = s.model.map(|m| (m.name.to_string(), m.version, m.sha256));
    Some((s.online, model, s.public_key))
}

/// The operator's side of a rollout: the link, the key and what has been seen.
struct Operator {
    link: Link,
    signer: Signer,
    seen: Seen,
}

impl Operator {
    async fn open(st: &RolloutState) -> anyhow::Result<Self> {
        let signer = fedge_proto::keys::file::load(&st.key)
            .with_context(|| format!("operator key {}", st.key.display()))?;
        let link = connect(&st.login()).await?;
        Ok(Self {
            link,
            signer,
            seen: Seen::default(),
        })
    }

    /// Takes in what arrived within `d`.
    async fn pump(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while let Ok(Some((t, wire))) = tokio::time::timeout_at(until, self.link.rx.recv()).await {
            self.seen.take(&t, &wire);
        }
    }

    fn seal(&self, st: &mut RolloutState, kind: Kind, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        st.next_seq = st.next_seq.max(now_ms()) + 1;
        Envelope::new(kind, &st.operator_id, st.next_seq, 0, payload)
            .seal(&self.signer)
            .map_err(|e| anyhow::anyhow!("sealing: {e}"))
    }

    async fn publish(&self, topic: &str, wire: Vec<u8>, retain: bool) -> anyhow::Result<()> {
        self.link
            .client
            .publish(topic, QoS::AtLeastOnce, retain, wire)
            .await
            .with_context(|| format!("publishing to {topic}"))?;
        self.link.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes `device`'s desired state: install `name vN` from `manifest`.
    async fn desire(
        &self,
        st: &mut RolloutState,
        device: &str,
        name: &str,
        version: u64,
        manifest: ChunkManifest,
    ) -> anyhow::Result<()> {
        let c = Command::Install {
            name,
            version,
            bundle: manifest,
        };
        let wire = self.seal(st, Kind::Command, &encode(&c)?)?;
        let t = topic::dev_desired(&st.group, device)?.to_string();
        self.publish(&t, wire, true).await
    }

    /// Puts `devices` back on their previous desired state (re-signed, so it is fresh), or
    /// sends a `Rollback` to a device that took the bundle and had none.
    async fn roll_back(&self, st: &mut RolloutState, which: &[usize]) -> anyhow::Result<()> {
        let op_key = self.signer.public_key();
        for &i in which {
            let d = st.devices[i].clone();
            let took = d.phase == DevicePhase::Updated;
            let previous = d
                .previous_desired
                .as_deref()
                .map(unhex)
                .transpose()?
                .and_then(|w| {
                    let env = Envelope::open(&w, MAX_WIRE).ok()?.verify(&op_key).ok()?;
                    match decode::<Command<'_>>(env.payload).ok()? {
                        Command::Install {
                            name,
                            version,
                            bundle,
                        } => Some((name.to_string(), version, bundle)),
                        _ => None,
                    }
                });
            let t = topic::dev_desired(&st.group, &d.id)?.to_string();
            if let Some((name, version, manifest)) = previous {
                self.desire(st, &d.id, &name, version, manifest).await?;
                st.log
                    .push(format!("{}: desired state back to {name} v{version}", d.id));
            } else {
                self.publish(&t, Vec::new(), true).await?;
                if took {
                    let wire = self.seal(st, Kind::Command, &encode(&Command::Rollback)?)?;
                    let cmd = topic::dev_cmd(&st.group, &d.id)?.to_string();
                    self.publish(&cmd, wire, false).await?;
                    st.log.push(format!("{}: rollback command", d.id));
                }
            }
            if took || d.phase == DevicePhase::Desired {
                st.devices[i].phase = DevicePhase::RolledBack;
            }
        }
        Ok(())
    }

    /// Waits until the broker acknowledged every publish (30 s at most), then disconnects.
    async fn close(self) -> anyhow::Result<()> {
        let want = self.link.published.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.link.acked.load(Ordering::Relaxed) < want {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the broker acknowledged {} of {want} messages in 30 s",
                    self.link.acked.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.link.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// The bundle's name, version, model sha256 and the file itself, checked against the key.
fn read_bundle(path: &Path, key: &PublicKey) -> anyhow::Result<(String, u64, [u8; 32], Vec<u8>)> {
    let wire = std::fs::read(path).with_context(|| format!("bundle {}", path.display()))?;
    let (name, version, model_sha) = {
        let env = Envelope::open(&wire, wire.len())
            .map_err(|e| anyhow::anyhow!("{}: not a bundle: {e}", path.display()))?
            .verify(key)
            .map_err(|_| anyhow::anyhow!("{}: not signed by this operator key", path.display()))?;
        if env.kind != Kind::Bundle {
            bail!("{}: not a bundle but a {:?}", path.display(), env.kind);
        }
        let b: Bundle<'_> = decode(env.payload)
            .map_err(|e| anyhow::anyhow!("{}: bundle payload: {e}", path.display()))?;
        (b.name.to_string(), b.version, sha256(b.model))
    };
    Ok((name, version, model_sha, wire))
}

fn start(a: &StartArgs) -> anyhow::Result<()> {
    if a.state.exists() && !a.force {
        bail!(
            "{} exists (another rollout?); `fedge rollout status --state {0}`, or --force",
            a.state.display()
        );
    }
    let health = parse_duration(&a.health_window).context("--health-window")?;
    let install = parse_duration(&a.install_timeout).context("--install-timeout")?;
    let discover = parse_duration(&a.discover).context("--discover")?;
    let abort_above = parse_share(&a.abort_above).context("--abort-above")?;
    wave_counts(&a.waves, 100)?;
    fedge_proto::check_id(&a.group).map_err(|e| anyhow::anyhow!("--group {:?}: {e}", a.group))?;
    let signer = fedge_proto::keys::file::load(&a.key)
        .with_context(|| format!("operator key {}", a.key.display()))?;
    let (name, version, model_sha, wire) = read_bundle(&a.bundle, &signer.public_key())?;
    let mut st = RolloutState {
        bundle: a.bundle.clone(),
        name,
        version,
        bundle_sha256: hex(&sha256(&wire)),
        model_sha256: hex(&model_sha),
        broker: a.broker.clone(),
        username: a.username.clone(),
        password_file: a.password_file.clone(),
        group: a.group.clone(),
        key: a.key.clone(),
        operator_id: a.operator_id.clone(),
        chunk_size: a.chunk_size,
        waves: Vec::new(),
        health_window_ms: health.as_millis() as u64,
        install_timeout_ms: install.as_millis() as u64,
        abort_above,
        phase: Phase::Running,
        wave: 0,
        next_seq: now_ms(),
        devices: Vec::new(),
        log: Vec::new(),
    };
    runtime()?.block_on(async {
        let mut op = Operator::open(&st).await?;
        op.pump(discover).await;
        let mut ids: Vec<String> = if a.devices.is_empty() {
            op.seen.status.keys().cloned().collect()
        } else {
            for d in &a.devices {
                fedge_proto::check_id(d).map_err(|e| anyhow::anyhow!("--devices {d:?}: {e}"))?;
            }
            a.devices.clone()
        };
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            bail!(
                "no devices in group {}: none has a retained status on {} (give --devices)",
                a.group,
                a.broker
            );
        }
        st.waves = wave_counts(&a.waves, ids.len())?;
        for (pos, id) in ids.iter().enumerate() {
            let wave = st.waves.iter().position(|&c| pos < c).unwrap_or(0);
            let previous_model = op
                .seen
                .status
                .get(id)
                .and_then(|s| s.1.as_ref())
                .map(|(n, v, _)| format!("{n} v{v}"));
            st.devices.push(DeviceState {
                id: id.clone(),
                wave,
                phase: DevicePhase::Pending,
                previous_model,
                previous_desired: op
                    .seen
                    .desired
                    .get(id)
                    .filter(|w| !w.is_empty())
                    .map(|w| hex(w)),
                desired_at_ms: None,
            });
        }
        // The chunks, retained, before any device is told to fetch them.
        let m = ChunkManifest::of(&wire, st.chunk_size)?;
        for c in m.split(&wire) {
            let t = topic::bundle_chunk(&st.group, &m.sha256, c.index)?.to_string();
            let w = op.seal(&mut st, Kind::Chunk, &encode(&c)?)?;
            op.publish(&t, w, true).await?;
        }
        let msg = format!(
            "{} v{} ({} bytes in {} chunks) to {} devices in {} waves",
            st.name,
            st.version,
            wire.len(),
            m.chunk_count,
            ids.len(),
            st.waves.len()
        );
        eprintln!("rollout: {msg}");
        st.log.push(msg);
        save(&a.state, &st)?;
        op.close().await?;
        Ok(())
    })?;
    drive(&a.state, st, a.json)
}

/// Runs waves from `st.wave` until done, paused or aborted.
fn drive(path: &Path, mut st: RolloutState, json: bool) -> anyhow::Result<()> {
    let wire =
        std::fs::read(&st.bundle).with_context(|| format!("bundle {}", st.bundle.display()))?;
    if hex(&sha256(&wire)) != st.bundle_sha256 {
        bail!("{} changed since the rollout started", st.bundle.display());
    }
    let manifest = ChunkManifest::of(&wire, st.chunk_size)?;
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let mut op = Operator::open(&st).await?;
        op.pump(Duration::from_millis(500)).await;
        while st.wave < st.waves.len() {
            match run_wave(path, &mut st, &mut op, manifest).await? {
                WaveEnd::Passed => {
                    st.log.push(format!("wave {} passed", st.wave + 1));
                    eprintln!("rollout: wave {}/{} passed", st.wave + 1, st.waves.len());
                    st.wave += 1;
                    save(path, &st)?;
                }
                WaveEnd::Paused => {
                    st.phase = Phase::Paused;
                    st.log.push(format!("paused before wave {}", st.wave + 1));
                    save(path, &st)?;
                    op.close().await?;
                    return Ok(Phase::Paused);
                }
                WaveEnd::Abort(why) => {
                    let which: Vec<usize> = if why.starts_with("aborted by the operator") {
                        (0..st.devices.len()).collect()
                    } else {
                        (0..st.devices.len())
                            .filter(|&i| st.devices[i].wave == st.wave)
                            .collect()
                    };
                    op.roll_back(&mut st, &which).await?;
                    st.phase = Phase::Aborted;
                    st.log.push(why);
                    save(path, &st)?;
                    op.close().await?;
                    return Ok(Phase::Aborted);
                }
            }
        }
        st.phase = Phase::Done;
        save(path, &st)?;
        op.close().await?;
        Ok::<_, anyhow::Error>(Phase::Done)
    })?;
    let _ = std::fs::remove_file(control_path(path));
    if json {
        println!("{}", serde_json::to_string(&st)?);
    }
    match outcome {
        Phase::Done => {
            eprintln!(
                "rollout: {} v{} runs on all {} devices",
                st.name,
                st.version,
                st.devices.len()
            );
            Ok(())
        }
        Phase::Paused => {
            eprintln!(
                "rollout: paused; `fedge rollout resume --state {}` carries on",
                path.display()
            );
            Ok(())
        }
        _ => bail!(
            "rollout aborted: {}",
            st.log.last().map_or("", String::as_str)
        ),
    }
}

enum WaveEnd {
    Passed,
    Paused,
    Abort(String),
}

fn take_control(path: &Path) -> Option<String> {
    let c = control_path(path);
    let what = std::fs::read_to_string(&c).ok()?;
    let _ = std::fs::remove_file(&c);
    Some(what.trim().to_string())
}

async fn run_wave(
    path: &Path,
    st: &mut RolloutState,
    op: &mut Operator,
    manifest: ChunkManifest,
) -> anyhow::Result<WaveEnd> {
    let wave = st.wave;
    let members: Vec<usize> = (0..st.devices.len())
        .filter(|&i| st.devices[i].wave == wave)
        .collect();
    let target_sha = unhex(&st.model_sha256)?;
    let (target_name, target_version) = (st.name.clone(), st.version);
    let runs_target = |seen: &Seen, id: &str| {
        seen.status.get(id).is_some_and(|(online, m, _)| {
            *online
                && m.as_ref().is_some_and(|(n, v, s)| {
                    *n == target_name && *v == target_version && s[..] == target_sha[..]
                })
        })
    };
    // Publish (again after a resume: a fresh seq is harmless, the device sees it runs it).
    for &i in &members {
        if st.devices[i].phase == DevicePhase::Pending {
            let id = st.devices[i].id.clone();
            let (name, version) = (st.name.clone(), st.version);
            op.desire(st, &id, &name, version, manifest).await?;
            st.devices[i].phase = DevicePhase::Desired;
            st.devices[i].desired_at_ms = Some(now_ms());
        }
    }
    save(path, st)?;
    eprintln!(
        "rollout: wave {}/{}: {} devices",
        wave + 1,
        st.waves.len(),
        members.len()
    );
    let started = Instant::now();
    let install_timeout = Duration::from_millis(st.install_timeout_ms);
    let health = Duration::from_millis(st.health_window_ms);
    let mut baked_from: Option<Instant> = None;
    let mut errors_at_update: BTreeMap<usize, u64> = BTreeMap::new();
    loop {
        op.pump(Duration::from_millis(200)).await;
        match take_control(path).as_deref() {
            Some("pause") => return Ok(WaveEnd::Paused),
            Some("abort") => return Ok(WaveEnd::Abort("aborted by the operator".into())),
            _ => {}
        }
        let mut changed = false;
        for &i in &members {
            let d = &st.devices[i];
            let id = d.id.clone();
            let since = d.desired_at_ms.unwrap_or(0).saturating_sub(1000);
            let failure = op
                .seen
                .failures
                .get(&id)
                .and_then(|l| l.iter().find(|(at, _)| *at >= since))
                .map(|(_, why)| why.clone());
            let errors = op.seen.infer_errors.get(&id).copied().unwrap_or(0);
            let next = match (&d.phase, failure) {
                (DevicePhase::Failed(_) | DevicePhase::RolledBack, _) => None,
                (_, Some(why)) => Some(DevicePhase::Failed(why)),
                (DevicePhase::Desired, None) if runs_target(&op.seen, &id) => {
                    errors_at_update.insert(i, errors);
                    Some(DevicePhase::Updated)
                }
                (DevicePhase::Desired, None) if started.elapsed() > install_timeout => Some(
                    DevicePhase::Failed(format!("not running it after {install_timeout:?}")),
                ),
                (DevicePhase::Updated, None) if !runs_target(&op.seen, &id) => Some(
                    DevicePhase::Failed("offline or no longer running it".into()),
                ),
                (DevicePhase::Updated, None)
                    if errors > *errors_at_update.entry(i).or_insert(errors) =>
                {
                    Some(DevicePhase::Failed(format!("{errors} inference errors")))
                }
                _ => None,
            };
            if let Some(p) = next {
                eprintln!("rollout: {id}: {p:?}");
                st.log.push(format!("{id}: {p:?}"));
                st.devices[i].phase = p;
                changed = true;
            }
        }
        if changed {
            save(path, st)?;
        }
        let failed = members
            .iter()
            .filter(|&&i| matches!(st.devices[i].phase, DevicePhase::Failed(_)))
            .count();
        if failed as f64 > st.abort_above * members.len() as f64 {
            return Ok(WaveEnd::Abort(format!(
                "{failed} of {} devices in wave {} failed (threshold {:.0}%)",
                members.len(),
                wave + 1,
                st.abort_above * 100.0
            )));
        }
        let settled = members
            .iter()
            .all(|&i| !matches!(st.devices[i].phase, DevicePhase::Desired));
        if settled {
            let from = *baked_from.get_or_insert_with(Instant::now);
            if from.elapsed() >= health {
                return Ok(WaveEnd::Passed);
            }
        }
    }
}

fn abort_cmd(a: &StateArgs) -> anyhow::Result<()> {
    let mut st = load(&a.state)?;
    match st.phase {
        Phase::Done | Phase::Aborted => {
            bail!("the rollout is {:?}; nothing to abort", st.phase)
        }
        Phase::Running => {
            // A running rollout takes the request; if none does within 10 s, do it here.
            std::fs::write(control_path(&a.state), "abort")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                if load(&a.state)?.phase == Phase::Aborted {
                    println!(
                        "aborted; every device that took the bundle has its previous desired state"
                    );
                    return Ok(());
                }
            }
            let _ = std::fs::remove_file(control_path(&a.state));
            st = load(&a.state)?;
        }
        Phase::Paused => {}
    }
    runtime()?.block_on(async {
        let mut op = Operator::open(&st).await?;
        op.pump(Duration::from_millis(500)).await;
        let all: Vec<usize> = (0..st.devices.len()).collect();
        op.roll_back(&mut st, &all).await?;
        st.phase = Phase::Aborted;
        st.log.push("aborted by the operator".into());
        save(&a.state, &st)?;
        op.close().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    println!("aborted; every device that took the bundle has its previous desired state");
    Ok(())
}

/// What the broker holds for one device: its retained status (verified with the key it carries)
/// and its retained desired state (verified with the operator key), collected for `wait`.
pub struct Retained {
    /// Online, the model it runs (name, version, model sha256), its key.
    pub status: Option<Reported>,
    /// The desired model: name, version, bundle sha256.
    pub desired: Option<(String, u64, [u8; 32])>,
}

pub fn read_retained(
    login: &Login<'_>,
    device: &str,
    operator: &PublicKey,
    wait: Duration,
) -> anyhow::Result<Retained> {
    runtime()?.block_on(async {
        let mut link = connect(login).await?;
        let until = tokio::time::Instant::now() + wait;
        let mut seen = Seen::default();
        while let Ok(Some((t, wire))) = tokio::time::timeout_at(until, link.rx.recv()).await {
            seen.take(&t, &wire);
        }
        let _ = link.client.disconnect().await;
        let status = seen.status.remove(device);
        let desired = match seen.desired.remove(device).filter(|w| !w.is_empty()) {
            None => None,
            Some(w) => {
                let env = Envelope::open(&w, MAX_WIRE)
                    .map_err(|e| anyhow::anyhow!("desired state of {device}: {e}"))?
                    .verify(operator)
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "desired state of {device} is not signed by operator key {}",
                            operator.fingerprint()
                        )
                    })?;
                match decode::<Command<'_>>(env.payload) {
                    Ok(Command::Install {
                        name,
                        version,
                        bundle,
                    }) => Some((name.to_string(), version, bundle.sha256)),
                    _ => bail!("desired state of {device} is not an Install"),
                }
            }
        };
        Ok(Retained { status, desired })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn waves_durations_and_shares() {
        assert_eq!(wave_counts("5%,25%,100%", 10).unwrap(), [1, 3, 10]);
        assert_eq!(wave_counts("10%,100%", 1).unwrap(), [1]);
        assert_eq!(wave_counts("0.5,1", 4).unwrap(), [2, 4]);
        assert!(wave_counts("50%,25%,100%", 10).is_err());
        assert!(wave_counts("5%,25%", 10).is_err());
        assert!(wave_counts("5%,x", 10).is_err());
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_share("10%").unwrap(), 0.1);
        assert!(parse_share("150%").is_err());
    }
}
