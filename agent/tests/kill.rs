//! Power-cut safety of installs: the real `fedge-agent` binary is killed with SIGKILL at random
//! points of an install, thirty times. After every kill the on-disk active version is complete and
//! verified, and the restarted agent serves the old or the new model (never a torn one), answers
//! inference with that model's outputs, and then finishes the install.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use fedge_proto::PublicKey;
use fedge_proto::chunk::sha256;
use fedge_proto::msg::Command;
use fedge_runtime::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TRIALS: u64 = 30;
const CHUNK: u32 = 2 << 10;
const N: u64 = 4096;

/// The two tiny models installs alternate between (`y = relu(x)` and `y = -x` on 4096 floats),
/// each with its test vector: (model, test input npz, test output npz, expected output).
struct Models {
    input: Tensor,
    a: (Vec<u8>, Vec<u8>, Vec<u8>, Tensor),
    b: (Vec<u8>, Vec<u8>, Vec<u8>, Tensor),
}

impl Models {
    fn new() -> Self {
        let x: Vec<f32> = (0..N).map(|i| (i as f32 - 2048.0) / 100.0).collect();
        let input = Tensor::new(&[1, N as usize], &x).expect("tensor");
        let make = |op: &str, f: fn(f32) -> f32| {
            let y = Tensor::new(
                &[1, N as usize],
                &x.iter().map(|v| f(*v)).collect::<Vec<_>>(),
            )
            .expect("tensor");
            (
                tiny_model(op, N),
                npz(&[("x", &input)]),
                npz(&[("y", &y)]),
                y,
            )
        };
        let (a, b) = (make("Relu", |v| v.max(0.0)), make("Neg", |v| -v));
        Self { input, a, b }
    }

    /// Odd versions are the Relu model, even ones the Neg model.
    fn of(&self, version: u64) -> &(Vec<u8>, Vec<u8>, Vec<u8>, Tensor) {
        if version % 2 == 1 { &self.a } else { &self.b }
    }
}

struct Agent {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Process::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("FEDGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fedge-agent");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A status: online, and the served model's version and sha256.
type Seen = (bool, Option<(u64, [u8; 32])>);

struct Rig {
    op: Operator,
    mqtt: Client,
    device: PublicKey,
    /// The highest status sequence seen (online statuses and last wills).
    status_seq: u64,
    latest: Option<Seen>,
}

impl Rig {
    fn poll(&mut self) {
        for m in self.mqtt.drain() {
            if m.topic == status_topic() {
                let (seq, online, model) = status_of(&m.payload, &self.device);
                if seq > self.status_seq {
                    self.status_seq = seq;
                    self.latest = Some((online, model));
                }
            }
        }
    }

    /// Waits for a status newer than anything seen so far with `online`; returns its model.
    async fn next_status(&mut self, online: bool) -> Option<(u64, [u8; 32])> {
        let after = self.status_seq;
        let t0 = Instant::now();
        loop {
            self.poll();
            if self.status_seq > after
                && let Some((o, model)) = self.latest
                && o == online
            {
                return model;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no status with online = {online}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn next_online(&mut self) -> Option<(u64, [u8; 32])> {
        self.next_status(true).await
    }

    /// Waits until the agent reports `version` online.
    async fn serving(&mut self, version: u64) {
        let t0 = Instant::now();
        loop {
            self.poll();
            if matches!(self.latest, Some((true, Some((v, _))))  if v == version) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "version {version} never served; last status {:?}",
                self.latest
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn publish(
        &mut self,
        version: u64,
        models: &Models,
    ) -> fedge_proto::chunk::ChunkManifest {
        let (model, test_in, test_out, _) = models.of(version);
        let bundle = self
            .op
            .bundle("tiny", version, model, test_in, test_out, 0.0);
        let (m, chunks) = self.op.chunks(&bundle, CHUNK);
        for (t, wire) in chunks {
            self.mqtt.publish(&t, wire, true).await;
        }
        self.mqtt.flush().await;
        self.install(version, m).await;
        m
    }

    async fn install(&mut self, version: u64, m: fedge_proto::chunk::ChunkManifest) {
        let wire = self.op.command(&Command::Install {
            name: "tiny",
            version,
            bundle: m,
        });
        self.mqtt.publish(&cmd_topic(), wire, false).await;
    }
}

/// The on-disk state after a kill: the active pointer names a complete version whose model
/// hashes to its recorded sha256. Returns that version.
fn check_disk(models_dir: &Path) -> Option<u64> {
    let pointer = std::fs::read(models_dir.join("active")).ok()?;
    let pointer: serde_json::Value =
        serde_json::from_slice(&pointer).expect("active pointer is valid JSON");
    let dir = pointer["healthy"][0].as_str()?;
    let vdir = models_dir.join("versions").join(dir);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(vdir.join("meta.json")).expect("meta.json of the active version"),
    )
    .expect("meta");
    let model = std::fs::read(vdir.join("model.onnx")).expect("model.onnx of the active version");
    let sha = fedge_proto::hex::encode32(&sha256(&model)).to_string();
    assert_eq!(
        meta["sha256"].as_str(),
        Some(sha.as_str()),
        "active model {dir} is torn"
    );
    meta["version"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_install_never_leaves_a_torn_model() {
    let Some(broker) = mosquitto("sigkill_during_install") else {
        return;
    };
    let dir = TempDir::new("kill");
    let op = Operator::new();
    let input_dir = dir.0.join("in");
    let extra = format!(
        "[limits]\nmax_chunk_bytes = {CHUNK}\nkeep_versions = 2\n\n[telemetry]\ninterval_s = 3600\n\n\
         [infer]\ninput_dir = {input_dir:?}\npoll_ms = 20\n"
    );
    let config = dir.0.join("agent.toml");
    std::fs::write(&config, config_toml(&dir.0, &broker.url(), &op, &extra)).expect("config");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fedge-agent"));
    let init = Process::new(&bin)
        .arg("init")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let device =
        PublicKey::from_hex(String::from_utf8_lossy(&init.stdout).trim()).expect("public key");
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(dir.0.join("data/device.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let models = Models::new();
    let mqtt = Client::connect(broker.port(), "test-kill");
    until("test client", 10, || {
        mqtt.connacks.load(Ordering::SeqCst) > 0
    })
    .await;
    mqtt.subscribe(&status_topic()).await;
    let mut rig = Rig {
        op,
        mqtt,
        device,
        status_seq: 0,
        latest: None,
    };
    let mut agent = Agent {
        bin,
        config,
        log: dir.0.join("agent.log"),
        child: None,
    };
    agent.start();
    assert_eq!(rig.next_online().await, None, "nothing installed yet");

    // Calibrate the install window on one install of each model.
    let mut window = Duration::ZERO;
    for v in 1..=2 {
        let t0 = Instant::now();
        rig.publish(v, &models).await;
        rig.serving(v).await;
        window = window.max(t0.elapsed());
    }
    let seed = 0x5eed_f00d_u64;
    eprintln!("install window {window:?}, seed {seed:#x}");
    let mut rng = StdRng::seed_from_u64(seed);
    let models_dir = dir.0.join("data/models");
    let (mut saw_old, mut saw_new) = (0, 0);

    for trial in 0..TRIALS {
        let v = 3 + trial;
        let manifest = rig.publish(v, &models).await;
        let delay = window.mul_f64(rng.random_range(0.0..1.0));
        tokio::time::sleep(delay).await;
        agent.kill();
        // The broker publishes the last will: a signed offline status, newer than the online one.
        rig.next_status(false).await;

        let on_disk = check_disk(&models_dir).expect("an active version after the kill");
        assert!(
            on_disk == v - 1 || on_disk == v,
            "trial {trial}: disk holds v{on_disk}"
        );
        agent.start();
        let (served, sha) = rig
            .next_online()
            .await
            .expect("a model is served after restart");
        assert!(
            served == v - 1 || served == v,
            "trial {trial}: serving v{served}"
        );
        assert_eq!(
            sha,
            sha256(&models.of(served).0),
            "trial {trial}: served model is not v{served}'s"
        );
        if served == v {
            saw_new += 1
        } else {
            saw_old += 1
        }

        // Inference answers with the old or the new model's outputs.
        let name = format!("t{trial}");
        drop_input(&input_dir, &name, &models.input);
        let out = input_dir.join("out").join(format!("{name}.out0.npy"));
        until("inference after restart", 30, || out.exists()).await;
        let got = fedge_runtime::npy::read(&out).expect("output");
        assert!(
            got == models.a.3 || got == models.b.3,
            "trial {trial}: output matches neither model"
        );

        // The operator repeats the command (it may have been lost with the kill); the agent
        // finishes the install, resuming the chunks it already has.
        rig.install(v, manifest).await;
        rig.serving(v).await;
        assert_eq!(check_disk(&models_dir), Some(v));
    }
    eprintln!(
        "after {TRIALS} kills: restarted on the old version {saw_old} times, on the new one {saw_new} times"
    );
    agent.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_publishes_the_offline_status_and_exits_cleanly() {
    let Some(broker) = mosquitto("sigterm_publishes_the_offline_status") else {
        return;
    };
    let dir = TempDir::new("sigterm");
    let op = Operator::new();
    let config = dir.0.join("agent.toml");
    std::fs::write(&config, config_toml(&dir.0, &broker.url(), &op, "")).expect("config");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fedge-agent"));
    let init = Process::new(&bin)
        .arg("init")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("init");
    let device =
        PublicKey::from_hex(String::from_utf8_lossy(&init.stdout).trim()).expect("public key");
    let mqtt = Client::connect(broker.port(), "test-sigterm");
    until("test client", 10, || {
        mqtt.connacks.load(Ordering::SeqCst) > 0
    })
    .await;
    mqtt.subscribe(&status_topic()).await;
    let mut rig = Rig {
        op,
        mqtt,
        device,
        status_seq: 0,
        latest: None,
    };
    let mut agent = Agent {
        bin,
        config,
        log: dir.0.join("agent.log"),
        child: None,
    };
    agent.start();
    rig.next_online().await;
    let pid = agent.child.as_ref().expect("child").id();
    let term = Process::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    rig.next_status(false).await;
    let status = agent.child.take().expect("child").wait().expect("wait");
    assert!(status.success(), "{status:?}");
}
