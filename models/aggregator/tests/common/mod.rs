//! Simulated devices speaking the real protocol (rumqttc + fedge-proto), an in-process
//! aggregator, a tiny HTTP client, and the expected models computed with fedge-fl directly.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedge_aggregator::config::{DeviceEntry, JobSpec};
use fedge_aggregator::{AggregatorError, Config, Service};
use fedge_proto::chunk::{Assembly, Chunk, ChunkManifest};
use fedge_proto::msg::{
    Ack, Outcome, Phase, RoundAnnounce, SecAggMsg, SecAggStep, Selection, Update,
};
use fedge_proto::topic::{self, Topic};
use fedge_proto::{Envelope, Kind, PublicKey, Signer};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A fresh, empty temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedge-agg-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A device identity: id and key.
#[derive(Debug)]
pub struct Identity {
    pub id: String,
    pub signer: Signer,
}

impl Identity {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            signer: Signer::generate().unwrap().0,
        }
    }

    pub fn entry(&self) -> DeviceEntry {
        DeviceEntry {
            id: self.id.clone(),
            public_key: self.signer.public_key().to_hex().to_string(),
        }
    }
}

/// `n` identities `dev-00`, `dev-01`, ... (zero-padded, so id order is index order).
pub fn identities(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|i| Identity::new(&format!("dev-{i:02}")))
        .collect()
}

/// The announcement, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    pub round: u64,
    pub phase: Phase,
    pub version: u64,
    pub manifest: ChunkManifest,
    pub param_count: u32,
    pub selection: Selection,
    pub deadline_unix_ms: u64,
    /// The recipient table (`None`: updates travel in clear).
    pub recipients: Option<Vec<u8>>,
    /// The secure aggregation session of the round, as every party computes it.
    pub secagg: Option<std::sync::Arc<fedge_fl::secagg::RoundSetup>>,
}

/// A secure aggregation relay, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    pub round: u64,
    pub session: u64,
    pub step: SecAggStep,
    pub ids: Vec<u8>,
    pub body: Vec<u8>,
}

/// An ack, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct AckMsg {
    pub seq: u64,
    pub round: u64,
    pub outcome: Outcome,
    pub detail: String,
}

/// A simulated device on its own MQTT connection.
#[derive(Debug)]
pub struct Device {
    pub id: String,
    pub signer: Signer,
    /// The last sequence number used.
    pub seq: u64,
    /// The aggregator's key for this device in the last announcement (rounds that seal updates);
    /// [`Device::seal_update`] encrypts to it.
    pub recipient: Option<[u8; 32]>,
    fleet: String,
    aggregator: PublicKey,
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<Publish>,
    pending: Vec<Publish>,
    driver: JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Device {
    /// Connects to the broker on `port`, subscribed to its `cmd` topic and `job`'s round.
    pub async fn connect(
        port: u16,
        fleet: &str,
        identity: Identity,
        aggregator: PublicKey,
        job: &str,
    ) -> Self {
        let mut o = MqttOptions::new(
            format!("sim-{}-{}", identity.id, std::process::id()),
            "127.0.0.1",
            port,
        );
        o.set_max_packet_size(16 << 20, 16 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, inbox) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client
            .subscribe(
                topic::dev_cmd(fleet, &identity.id).unwrap().as_str(),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        client
            .subscribe(
                topic::job_round(fleet, job).unwrap().as_str(),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        Self {
            id: identity.id,
            signer: identity.signer,
            seq: 0,
            recipient: None,
            fleet: fleet.into(),
            aggregator,
            client,
            inbox,
            pending: Vec::new(),
            driver,
        }
    }

    /// Waits for the first message `f` accepts, keeping the others for later waits.
    async fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&Publish) -> Option<T>) -> T {
        if let Some(i) = self.pending.iter().position(|p| f(p).is_some()) {
            let p = self.pending.remove(i);
            return f(&p).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let p = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no {what} within {WAIT:?}", self.id))
                .expect("driver alive");
            match f(&p) {
                Some(t) => return t,
                None => self.pending.push(p),
            }
        }
    }

    /// The announcement of `round` or later (or of the finished job).
    pub async fn announce(&mut self, job: &str, round: u64) -> Announce {
        let t = topic::job_round(&self.fleet, job).unwrap().to_string();
        let key = self.aggregator;
        let a = self
            .wait_for(&format!("announcement of round {round}"), |p| {
                if p.topic != t || p.payload.is_empty() {
                    return None;
                }
                let env = Envelope::open(&p.payload, 1 << 20)
                    .ok()?
                    .verify(&key)
                    .expect("aggregator signature");
                let a: RoundAnnounce<'_> =
                    fedge_proto::envelope::decode(env.payload).expect("announce");
                (a.round >= round || a.phase == Phase::Finished).then_some(Announce {
                    round: a.round,
                    phase: a.phase,
                    version: a.model.version,
                    manifest: a.manifest,
                    param_count: a.param_count,
                    selection: a.selection,
                    deadline_unix_ms: a.deadline_unix_ms,
                    recipients: a.recipients.map(<[u8]>::to_vec),
                    secagg: a.secagg.map(|s| {
                        let roster = s
                            .roster
                            .chunks_exact(32)
                            .map(|c| c.try_into().expect("32 bytes"))
                            .collect();
                        let params = fedge_fl::secagg::Params {
                            len: a.param_count as usize,
                            neighbours: s.neighbours as usize,
                            threshold: s.threshold as usize,
                            clip: s.clip,
                            quant_bits: u32::from(s.quant_bits),
                            mod_bits: u32::from(s.mod_bits),
                        };
                        std::sync::Arc::new(
                            fedge_fl::secagg::RoundSetup::with_session(
                                a.job, a.round, s.session, roster, params,
                            )
                            .expect("announced secure aggregation setup"),
                        )
                    }),
                })
            })
            .await;
        self.recipient = a.recipients.as_ref().and_then(|t| {
            fedge_proto::seal::recipients::find(t, &self.id).expect("recipient table")
        });
        a
    }

    /// Fetches the announced model from its retained chunks and checks its hash.
    pub async fn fetch_model(&mut self, job: &str, a: &Announce) -> Vec<f32> {
        let filter = format!("fedge/v1/{}/job/{job}/model/{}/+", self.fleet, a.version);
        self.client
            .subscribe(filter.as_str(), QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut asm = Assembly::new(a.manifest, 1 << 30, 1 << 24).expect("manifest");
        let (version, key) = (a.version, self.aggregator);
        while !asm.is_complete() {
            let data = self
                .wait_for("model chunk", |p| {
                    let t = p.topic.as_str();
                    match Topic::parse(t)? {
                        Topic::JobModelChunk { version: v, .. }
                            if v == version && !p.payload.is_empty() =>
                        {
                            Some(p.payload.to_vec())
                        }
                        _ => None,
                    }
                })
                .await;
            let env = Envelope::open(&data, 1 << 26)
                .expect("chunk")
                .verify(&key)
                .expect("aggregator signature");
            let c: Chunk<'_> = fedge_proto::envelope::decode(env.payload).expect("chunk");
            if c.object == a.manifest.sha256 {
                asm.insert(&c).expect("chunk fits");
            }
        }
        self.client.unsubscribe(filter.as_str()).await.unwrap();
        let bytes = asm.finish().expect("model hash");
        fedge_aggregator::codec::f32_from_le(&bytes)
    }

    /// Seals an update with the next sequence number; returns (seq, wire).
    pub fn seal_update(
        &mut self,
        job: &str,
        round: u64,
        num_samples: u64,
        delta: &[u8],
    ) -> (u64, Vec<u8>) {
        self.seq += 1;
        let u = Update {
            job,
            round,
            base_version: round.saturating_sub(1),
            num_samples,
            loss: 0.5,
            accuracy: 0.9,
            delta,
        };
        let mut payload = fedge_proto::envelope::encode(&u).unwrap();
        if let Some(key) = &self.recipient {
            let aad = fedge_proto::seal::associated_data(job, round, &self.id);
            payload = fedge_proto::seal::seal(key, &aad, &payload).unwrap();
        }
        (
            self.seq,
            Envelope::new(Kind::Update, &self.id, self.seq, round, &payload)
                .seal(&self.signer)
                .unwrap(),
        )
    }

    /// Publishes raw bytes on this device's update topic of `job`.
    pub async fn publish_update(&self, job: &str, wire: Vec<u8>) {
        let t = topic::job_update(&self.fleet, job, &self.id).unwrap();
        self.client
            .publish(t.as_str(), QoS::AtLeastOnce, false, wire)
            .await
            .unwrap();
    }

    /// The ack of update `seq`.
    pub async fn ack(&mut self, seq: u64) -> AckMsg {
        let t = topic::dev_cmd(&self.fleet, &self.id).unwrap().to_string();
        let key = self.aggregator;
        self.wait_for(&format!("ack of seq {seq}"), |p| {
            if p.topic != t {
                return None;
            }
            let env = Envelope::open(&p.payload, 1 << 20)
                .ok()?
                .verify(&key)
                .expect("aggregator signature");
            if env.kind != Kind::Ack {
                return None;
            }
            let a: Ack<'_> = fedge_proto::envelope::decode(env.payload).expect("ack");
            (a.seq == seq).then(|| AckMsg {
                seq: a.seq,
                round: a.round,
                outcome: a.outcome,
                detail: a.detail.into(),
            })
        })
        .await
    }

    /// Publishes a secure aggregation message of `setup`'s session on the update topic; returns
    /// its sequence number.
    pub async fn send_secagg(
        &mut self,
        setup: &fedge_fl::secagg::RoundSetup,
        step: SecAggStep,
        body: &[u8],
    ) -> u64 {
        self.seq += 1;
        let m = SecAggMsg {
            job: setup.job(),
            round: setup.round(),
            session: setup.session(),
            step,
            ids: &[],
            body,
        };
        let payload = fedge_proto::envelope::encode(&m).unwrap();
        let wire = Envelope::new(Kind::SecAgg, &self.id, self.seq, setup.round(), &payload)
            .seal(&self.signer)
            .unwrap();
        self.publish_update(setup.job(), wire).await;
        self.seq
    }

    /// The next secure aggregation relay of `step` from the aggregator.
    pub async fn relay(&mut self, step: SecAggStep) -> Relay {
        let t = topic::dev_cmd(&self.fleet, &self.id).unwrap().to_string();
        let key = self.aggregator;
        self.wait_for(&format!("{step:?} relay"), |p| {
            if p.topic != t {
                return None;
            }
            let env = Envelope::open(&p.payload, 16 << 20)
                .ok()?
                .verify(&key)
                .expect("aggregator signature");
            if env.kind != Kind::SecAgg {
                return None;
            }
            let m: SecAggMsg<'_> = fedge_proto::envelope::decode(env.payload).expect("relay");
            (m.step == step).then(|| Relay {
                round: m.round,
                session: m.session,
                step: m.step,
                ids: m.ids.to_vec(),
                body: m.body.to_vec(),
            })
        })
        .await
    }

    /// At-least-once: publishes `wire` and again every second until its ack arrives.
    pub async fn send_until_acked(&mut self, job: &str, seq: u64, wire: &[u8]) -> AckMsg {
        let t = topic::dev_cmd(&self.fleet, &self.id).unwrap().to_string();
        let key = self.aggregator;
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            self.publish_update(job, wire.to_vec()).await;
            let got = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    let p = self.inbox.recv().await.expect("driver alive");
                    if p.topic == t
                        && let Some(env) = Envelope::open(&p.payload, 1 << 20)
                            .ok()
                            .and_then(|u| u.verify(&key).ok())
                        && env.kind == Kind::Ack
                    {
                        let a: Ack<'_> = fedge_proto::envelope::decode(env.payload).expect("ack");
                        if a.seq == seq {
                            return AckMsg {
                                seq,
                                round: a.round,
                                outcome: a.outcome,
                                detail: a.detail.into(),
                            };
                        }
                    }
                    self.pending.push(p);
                }
            })
            .await;
            if let Ok(a) = got {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: no ack for seq {seq}",
                self.id
            );
        }
    }
}

/// A deterministic delta for (device index, round): values in [-0.5, 0.5).
pub fn delta(device: usize, round: u64, n: usize) -> Vec<f32> {
    let mut x = (device as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Runs one round of `strategy` the way the aggregator does: updates in device-id order, each
/// as `global + delta`.
pub fn expected_round(
    strategy: &mut dyn fedge_fl::Strategy,
    round: u64,
    global: &[f32],
    updates: &[(String, u64, Vec<f32>)],
) -> Vec<f32> {
    let mut sorted: Vec<&(String, u64, Vec<f32>)> = updates.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    strategy.begin(round, global).unwrap();
    for (id, n, d) in sorted {
        let params = fedge_fl::apply_delta(global, d).unwrap();
        strategy
            .accumulate(fedge_fl::ClientUpdate::new(id.clone(), *n, params))
            .unwrap();
    }
    strategy
        .finish(0)
        .unwrap()
        .unwrap_or_else(|| global.to_vec())
}

/// Bit patterns, for exact comparisons with readable failures.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A service configuration for tests: a fleet, a data directory, HTTP on a free port, the
/// devices, and the given broker URL (None: embedded on a free port).
pub fn config(
    fleet: &str,
    dir: &std::path::Path,
    broker: Option<String>,
    devices: &[&Identity],
    jobs: Vec<JobSpec>,
) -> Config {
    let mut cfg = Config {
        fleet: fleet.into(),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    cfg.broker.url = broker;
    cfg.broker.listen = SocketAddr::from(([127, 0, 0, 1], fedge_tests::mosquitto::free_port()));
    cfg.broker.client_id = Some(format!("agg-{fleet}-{}", std::process::id()));
    cfg.tick_ms = 20;
    cfg.devices = devices.iter().map(|d| d.entry()).collect();
    cfg.jobs = jobs;
    cfg
}

/// An aggregator running in this process.
#[derive(Debug)]
pub struct Running {
    pub http: SocketAddr,
    pub public_key: PublicKey,
    pub broker_port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AggregatorError>>,
}

impl Running {
    pub async fn start(cfg: Config) -> Self {
        let service = Service::bind(cfg).await.expect("bind");
        let http = service.http_addr().expect("http");
        let public_key = service.public_key();
        let broker_port = fedge_aggregator::mqtt::BrokerUrl::parse(service.broker_url())
            .unwrap()
            .port;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(service.run(async move {
            let _ = rx.await;
        }));
        Self {
            http,
            public_key,
            broker_port,
            stop: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .expect("join")
            .expect("aggregator ran without error");
    }
}

/// `GET` or `POST` over HTTP/1.1; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let body = body.unwrap_or("");
    let ct = if body.starts_with('{') {
        "application/json"
    } else {
        "text/plain"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// `GET` returning JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}
