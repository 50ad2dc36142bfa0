//! Helpers shared by the agent's integration tests: an operator that signs bundles and commands,
//! an MQTT test client, a gated TCP proxy, configs, zoo files, waiting.
#![allow(dead_code)]

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedge_proto::chunk::{Chunk, ChunkManifest};
use fedge_proto::envelope::{decode, encode};
use fedge_proto::msg::{Bundle, Command, Status, Telemetry};
use fedge_proto::{Envelope, Kind, PublicKey, Signer, topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;

pub const FLEET: &str = "f";
pub const DEVICE: &str = "dev-1";

/// The zoo model used by the tests: the smallest committed float model.
pub fn zoo(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = fedge_tests::repo_root().join("models/zoo").join(name);
    let model = std::fs::read(dir.join("model.onnx")).expect("zoo model");
    let io = std::fs::read(dir.join("io.npz")).expect("zoo io.npz");
    (model, io)
}

pub fn zoo_io_path(name: &str) -> PathBuf {
    fedge_tests::repo_root()
        .join("models/zoo")
        .join(name)
        .join("io.npz")
}

/// Starts Mosquitto, or explains why the test is skipped.
pub fn mosquitto(test: &str) -> Option<fedge_tests::mosquitto::Mosquitto> {
    match fedge_tests::mosquitto::Mosquitto::start() {
        Ok(m) => Some(m),
        Err(e) => {
            fedge_tests::skip(test, &e);
            None
        }
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("fedge-agent-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The operator: holds the trust anchor key and signs bundles, chunks and commands.
#[derive(Debug)]
pub struct Operator {
    pub signer: Signer,
    pub id: String,
    seq: AtomicU64,
}

impl Operator {
    pub fn new() -> Self {
        Self {
            signer: Signer::generate().expect("key").0,
            id: "operator".into(),
            seq: AtomicU64::new(1),
        }
    }

    pub fn key_hex(&self) -> String {
        self.signer.public_key().to_hex().to_string()
    }

    pub fn seal(&self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Envelope::new(kind, &self.id, seq, 0, payload)
            .seal(&self.signer)
            .expect("seal")
    }

    pub fn bundle(
        &self,
        name: &str,
        version: u64,
        model: &[u8],
        test_in: &[u8],
        test_out: &[u8],
        tolerance: f32,
    ) -> Vec<u8> {
        let b = Bundle {
            name,
            version,
            created_unix_s: 1,
            model,
            test_input: test_in,
            test_output: test_out,
            tolerance,
        };
        self.seal(Kind::Bundle, &encode(&b).expect("encode"))
    }

    pub fn command(&self, c: &Command<'_>) -> Vec<u8> {
        self.seal(Kind::Command, &encode(c).expect("encode"))
    }

    /// Chunk envelopes of `object` and their retained topics.
    pub fn chunks(
        &self,
        object: &[u8],
        chunk_size: u32,
    ) -> (ChunkManifest, Vec<(String, Vec<u8>)>) {
        let m = ChunkManifest::of(object, chunk_size).expect("manifest");
        let chunks = m
            .split(object)
            .map(|c| (chunk_topic(&m.sha256, c.index), self.chunk(&c)))
            .collect();
        (m, chunks)
    }

    pub fn chunk(&self, c: &Chunk<'_>) -> Vec<u8> {
        self.seal(Kind::Chunk, &encode(c).expect("encode"))
    }
}

pub fn chunk_topic(sha: &[u8; 32], index: u32) -> String {
    topic::bundle_chunk(FLEET, sha, index)
        .expect("topic")
        .to_string()
}

pub fn cmd_topic() -> String {
    topic::dev_cmd(FLEET, DEVICE).expect("topic").to_string()
}

pub fn status_topic() -> String {
    topic::dev_status(FLEET, DEVICE).expect("topic").to_string()
}

pub fn telemetry_topic() -> String {
    topic::dev_telemetry(FLEET, DEVICE)
        .expect("topic")
        .to_string()
}

/// The agent config used by the tests; `extra` appends TOML sections.
pub fn config_toml(dir: &Path, url: &str, op: &Operator, extra: &str) -> String {
    format!(
        "device_id = \"{DEVICE}\"\nfleet = \"{FLEET}\"\noperator_key = \"{}\"\noperator_id = \"{}\"\n\
         data_dir = {:?}\n\n[broker]\nurl = \"{url}\"\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
         keep_alive_s = 5\n\n{extra}\n",
        op.key_hex(),
        op.id,
        dir.join("data"),
    )
}

/// An MQTT client for the test side: forwards every message, resubscribes after reconnects,
/// counts PUBACKs.
#[derive(Debug)]
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    filters: Arc<Mutex<Vec<String>>>,
    pub connacks: Arc<AtomicU64>,
    pub subacks: Arc<AtomicU64>,
    pub pubacks: Arc<AtomicU64>,
    published: u64,
}

impl Client {
    pub fn connect(port: u16, id: &str) -> Self {
        let mut mo = MqttOptions::new(id, "127.0.0.1", port);
        mo.set_max_packet_size(4 << 20, 4 << 20)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(mo, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let filters: Arc<Mutex<Vec<String>>> = Arc::default();
        let (connacks, subacks, pubacks): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) =
            Default::default();
        let (f, c, s, p, cl) = (
            filters.clone(),
            connacks.clone(),
            subacks.clone(),
            pubacks.clone(),
            client.clone(),
        );
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for filter in f.lock().expect("filters").iter() {
                            let _ = cl.try_subscribe(filter, QoS::AtLeastOnce);
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(m))) => {
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        p.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self {
            client,
            rx,
            filters,
            connacks,
            subacks,
            pubacks,
            published: 0,
        }
    }

    pub async fn subscribe(&self, filter: &str) {
        self.filters.lock().expect("filters").push(filter.into());
        let before = self.subacks.load(Ordering::SeqCst);
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        until("suback", 10, || {
            self.subacks.load(Ordering::SeqCst) > before
        })
        .await;
    }

    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("publish");
        self.published += 1;
    }

    /// Waits until the broker has acknowledged everything published (since the last reconnect
    /// reset, counted by the caller).
    pub async fn flush(&self) {
        let want = self.published;
        until("pubacks", 20, || {
            self.pubacks.load(Ordering::SeqCst) >= want
        })
        .await;
    }

    /// Forgets PUBACK accounting (after a broker restart dropped in-flight publishes).
    pub fn reset_acks(&mut self) {
        self.published = 0;
        self.pubacks.store(0, Ordering::SeqCst);
    }

    /// Every message received so far.
    pub fn drain(&mut self) -> Vec<Publish> {
        let mut v = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            v.push(m);
        }
        v
    }
}

/// Polls `cond` every 20 ms; panics naming `what` after `secs` seconds (a liveness bound, far
/// above the expected time, not a measurement).
pub async fn until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A decoded device message: sender, sequence and payload (verified against the device key).
pub fn open_device(wire: &[u8], device: &PublicKey) -> (String, u64, Kind, Vec<u8>) {
    let env = Envelope::open(wire, 1 << 20)
        .expect("open")
        .verify(device)
        .expect("device signature");
    (
        env.sender.to_string(),
        env.seq,
        env.kind,
        env.payload.to_vec(),
    )
}

/// `(online, model version)` of a status message.
pub fn status_of(wire: &[u8], device: &PublicKey) -> (u64, bool, Option<(u64, [u8; 32])>) {
    let (_, seq, kind, payload) = open_device(wire, device);
    assert_eq!(kind, Kind::Status);
    let s: Status<'_> = decode(&payload).expect("status");
    (seq, s.online, s.model.map(|m| (m.version, m.sha256)))
}

/// What a telemetry message reports: model version, events (reason names), rejected counts.
#[derive(Debug, Clone)]
pub struct Report {
    pub seq: u64,
    pub version: Option<u64>,
    pub events: Vec<(String, String)>,
    pub rejected: Vec<(String, u64)>,
    pub inferences: u64,
    pub outbox_bytes: u64,
    pub rss_bytes: u64,
}

pub fn telemetry_of(wire: &[u8], device: &PublicKey) -> Report {
    let (_, seq, kind, payload) = open_device(wire, device);
    assert_eq!(kind, Kind::Telemetry);
    let t: Telemetry<'_> = decode(&payload).expect("telemetry");
    Report {
        seq,
        version: t.model.map(|m| m.version),
        events: t
            .events
            .iter()
            .map(|e| (e.reason.as_str().to_string(), e.detail.to_string()))
            .collect(),
        rejected: t
            .rejected
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), *n))
            .collect(),
        inferences: t.inferences,
        outbox_bytes: t.outbox_bytes,
        rss_bytes: t.rss_bytes,
    }
}

/// A TCP proxy in front of the broker whose gate the test opens and closes: while closed, it
/// accepts and immediately drops connections, so the test decides when a client reaches the broker.
#[derive(Debug)]
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let gate = open.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if !gate.load(Ordering::SeqCst) {
                    drop(conn);
                    continue;
                }
                if let Ok(up) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)) {
                    pipe(conn, up);
                }
            }
        });
        Self { port, open }
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        copy(a, b2);
        copy(b, a2);
    }
}

/// Writes `t` as `{dir}/{name}.npy` through a hidden temporary name (as the agent expects).
pub fn drop_input(dir: &Path, name: &str, t: &fedge_runtime::Tensor) {
    std::fs::create_dir_all(dir).expect("input dir");
    let tmp = dir.join(format!(".{name}.npy"));
    fedge_runtime::npy::write(&tmp, t).expect("write input");
    std::fs::rename(&tmp, dir.join(format!("{name}.npy"))).expect("rename input");
}

/// Case 0 of a zoo model's references: (input, expected output).
pub fn case0(name: &str) -> (fedge_runtime::Tensor, fedge_runtime::Tensor) {
    let m: std::collections::BTreeMap<String, fedge_runtime::Tensor> =
        fedge_runtime::npy::read_npz(zoo_io_path(name))
            .expect("io.npz")
            .into_iter()
            .collect();
    (m["c0_in0"].clone(), m["c0_out0"].clone())
}

pub fn max_abs_diff(a: &fedge_runtime::Tensor, b: &fedge_runtime::Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.to_f64_lossy()
        .iter()
        .zip(b.to_f64_lossy())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A one-node ONNX model `y = op(x)` with `x`, `y` float `[1, n]`, encoded by hand (protobuf),
/// for tests that need a model which loads in milliseconds.
pub fn tiny_model(op: &str, n: u64) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn int(field: u64, v: u64) -> Vec<u8> {
        let mut o = Vec::new();
        varint(field << 3, &mut o);
        varint(v, &mut o);
        o
    }
    fn bytes(field: u64, b: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        varint((field << 3) | 2, &mut o);
        varint(b.len() as u64, &mut o);
        o.extend_from_slice(b);
        o
    }
    let dim = |v: u64| bytes(1, &int(1, v));
    let shape = [dim(1), dim(n)].concat();
    let tensor_type = [int(1, 1), bytes(2, &shape)].concat();
    let value_info =
        |name: &str| [bytes(1, name.as_bytes()), bytes(2, &bytes(1, &tensor_type))].concat();
    let node = [bytes(1, b"x"), bytes(2, b"y"), bytes(4, op.as_bytes())].concat();
    let graph = [
        bytes(1, &node),
        bytes(2, b"tiny"),
        bytes(11, &value_info("x")),
        bytes(12, &value_info("y")),
    ]
    .concat();
    let opset = [bytes(1, b""), int(2, 13)].concat();
    [int(1, 8), bytes(7, &graph), bytes(8, &opset)].concat()
}

/// A `.npz` (stored zip) of `.npy` members.
pub fn npz(members: &[(&str, &fedge_runtime::Tensor)]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, t) in members {
        let data = fedge_runtime::npy::encode(t);
        let name = format!("{name}.npy");
        let (crc, len, offset) = (crc32(&data), data.len() as u32, out.len() as u32);
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&[0; 2]); // flags
            v.extend_from_slice(&[0; 2]); // stored
            v.extend_from_slice(&[0; 4]); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&[0; 2]); // extra length
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&[0; 8]); // comment length, disk, internal attributes
        central.extend_from_slice(&[0; 4]); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_len, n) = (out.len() as u32, central.len() as u32, members.len() as u16);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_len.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out
}
