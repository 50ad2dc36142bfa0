//! Signed installs against a real Mosquitto: a good bundle is installed and served; tampered,
//! foreign, replayed and oversized inputs are refused with their reason in telemetry while the
//! running model keeps serving; a bundle that fails its self-test is rolled back.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use fedge_agent::{Config, Service, Stats};
use fedge_proto::chunk::{Chunk, ChunkManifest};
use fedge_proto::msg::{Command, Reason};
use fedge_proto::{Kind, PublicKey};
use tokio::sync::oneshot;

const CHUNK: u32 = 32 << 10;

/// A running in-process agent and the test's view of the broker.
struct Rig {
    _dir: TempDir,
    dir: std::path::PathBuf,
    op: Operator,
    mqtt: Client,
    device: PublicKey,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    reports: Vec<Report>,
}

impl Rig {
    async fn start(broker: &fedge_tests::mosquitto::Mosquitto, tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let op = Operator::new();
        let extra = format!(
            "[limits]\nmax_chunk_bytes = {CHUNK}\nmax_bundle_bytes = 4000000\n\n[telemetry]\ninterval_s = 3600\nevent_delay_ms = 20\n\n\
             [infer]\ninput_dir = {:?}\npoll_ms = 20\n",
            dir.0.join("in")
        );
        let cfg =
            Config::from_toml(&config_toml(&dir.0, &broker.url(), &op, &extra)).expect("config");
        let svc = Service::open(cfg).expect("open");
        let (device, stats) = (svc.public_key(), svc.stats());
        let mqtt = Client::connect(broker.port(), &format!("test-{tag}"));
        until("test client", 10, || {
            mqtt.connacks.load(Ordering::SeqCst) > 0
        })
        .await;
        mqtt.subscribe(&telemetry_topic()).await;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            svc.run(async {
                let _ = rx.await;
            })
            .await
            .expect("run");
        });
        until("agent connected", 10, || Stats::get(&stats.connects) > 0).await;
        let path = dir.0.clone();
        Self {
            _dir: dir,
            dir: path,
            op,
            mqtt,
            device,
            stats,
            stop: Some(tx),
            task,
            reports: Vec::new(),
        }
    }

    async fn publish_bundle(&mut self, name: &str, version: u64, bundle: &[u8]) -> ChunkManifest {
        let (m, chunks) = self.op.chunks(bundle, CHUNK);
        for (t, wire) in chunks {
            self.mqtt.publish(&t, wire, true).await;
        }
        self.command(&Command::Install {
            name,
            version,
            bundle: m,
        })
        .await;
        m
    }

    async fn command(&mut self, c: &Command<'_>) {
        let wire = self.op.command(c);
        self.mqtt.publish(&cmd_topic(), wire, false).await;
    }

    fn collect(&mut self) {
        for m in self.mqtt.drain() {
            self.reports.push(telemetry_of(&m.payload, &self.device));
        }
    }

    /// Waits for a telemetry event with `reason` and returns its detail.
    async fn event(&mut self, reason: Reason) -> String {
        let t0 = std::time::Instant::now();
        loop {
            self.collect();
            let found = self
                .reports
                .iter()
                .flat_map(|r| &r.events)
                .find(|(r, _)| r == reason.as_str());
            if let Some((_, detail)) = found {
                let detail = detail.clone();
                self.reports.clear();
                return detail;
            }
            assert!(
                t0.elapsed().as_secs() < 30,
                "no {} event; reports: {:?}",
                reason.as_str(),
                self.reports
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn installed(&self, n: u64) {
        until("install", 60, || Stats::get(&self.stats.installs) >= n).await;
    }

    /// Runs case 0 of `zoo_name` through the served model via the watched directory.
    async fn infer(&self, name: &str, zoo_name: &str, tolerance: f64) {
        let (input, want) = case0(zoo_name);
        drop_input(&self.dir.join("in"), name, &input);
        let out = self.dir.join("in/out").join(format!("{name}.out0.npy"));
        let err = self.dir.join("in/out").join(format!("{name}.err"));
        until("inference output", 30, || out.exists() || err.exists()).await;
        assert!(
            !err.exists(),
            "{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        let got = fedge_runtime::npy::read(&out).expect("output");
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= tolerance,
            "served model output differs from {zoo_name}'s reference by {d}"
        );
    }

    fn active_pointer(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/models/active")).expect("active pointer")
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_a_signed_bundle_and_rejects_tampered_ones_without_touching_the_running_model() {
    let Some(broker) = mosquitto("installs_a_signed_bundle") else {
        return;
    };
    let mut rig = Rig::start(&broker, "install").await;
    let (model, io) = zoo("ppocr_cls");

    // 1. A bundle signed by the operator is installed and served.
    let good = rig.op.bundle("ppocr_cls", 1, &model, &io, &io, 1e-3);
    rig.publish_bundle("ppocr_cls", 1, &good).await;
    rig.installed(1).await;
    rig.infer("a", "ppocr_cls", 1e-4).await;
    let pointer = rig.active_pointer();
    assert!(pointer.contains("ppocr_cls-1-"), "{pointer}");
    let install_v1 = rig.op.command(&Command::Install {
        name: "ppocr_cls",
        version: 1,
        bundle: ChunkManifest::of(&good, CHUNK).expect("manifest"),
    });

    // 2. One flipped byte in the bundle, chunked under the honest manifest: the reassembled
    //    object no longer hashes to the signed manifest's sha256.
    let mut flipped = rig.op.bundle("ppocr_cls", 2, &model, &io, &io, 1e-3);
    let honest = ChunkManifest::of(&flipped, CHUNK).expect("manifest");
    flipped[1000] ^= 0x01;
    for c in honest.split(&flipped) {
        let c = Chunk {
            object: honest.sha256,
            ..c
        };
        rig.mqtt
            .publish(
                &chunk_topic(&honest.sha256, c.index),
                rig.op.chunk(&c),
                true,
            )
            .await;
    }
    rig.command(&Command::Install {
        name: "ppocr_cls",
        version: 2,
        bundle: honest,
    })
    .await;
    let why = rig.event(Reason::HashMismatch).await;
    assert!(why.contains("v2"), "{why}");

    // 3. The same flip before the operator chunked it: hashes match, the bundle's own operator
    //    signature does not.
    let mut flipped = rig.op.bundle("ppocr_cls", 3, &model, &io, &io, 1e-3);
    flipped[1000] ^= 0x01;
    rig.publish_bundle("ppocr_cls", 3, &flipped).await;
    rig.event(Reason::BadSignature).await;

    // 4. A wrong signer: a bundle sealed by another key, and a command signed by another key.
    let mallory = Operator::new();
    let foreign = mallory.bundle("ppocr_cls", 4, &model, &io, &io, 1e-3);
    rig.publish_bundle("ppocr_cls", 4, &foreign).await;
    rig.event(Reason::BadSignature).await;
    let forged = mallory.command(&Command::Rollback);
    rig.mqtt.publish(&cmd_topic(), forged, false).await;
    let why = rig.event(Reason::BadSignature).await;
    assert!(why.contains("Command"), "{why}");

    // 5. A replayed envelope: the first install command again (its sequence is now stale).
    rig.mqtt.publish(&cmd_topic(), install_v1, false).await;
    rig.event(Reason::Replay).await;

    // 6. An oversized chunk: an envelope far larger than the manifest's chunk size.
    let small = rig.op.bundle("ppocr_cls", 6, &model, &io, &io, 1e-3);
    let m = ChunkManifest::of(&small, 4096).expect("manifest");
    rig.command(&Command::Install {
        name: "ppocr_cls",
        version: 6,
        bundle: m,
    })
    .await;
    let big = vec![7u8; 64 << 10];
    let oversized = rig.op.seal(
        Kind::Chunk,
        &fedge_proto::envelope::encode(&Chunk {
            object: m.sha256,
            index: 0,
            data: &big,
        })
        .expect("encode"),
    );
    rig.mqtt
        .publish(&chunk_topic(&m.sha256, 0), oversized, true)
        .await;
    let why = rig.event(Reason::Oversize).await;
    assert!(why.contains("chunk 0"), "{why}");
    // And a manifest above the configured limits is refused before anything is reserved.
    let huge = ChunkManifest {
        sha256: m.sha256,
        total_len: 1 << 40,
        chunk_size: CHUNK,
        chunk_count: 1 << 25,
    };
    rig.command(&Command::Install {
        name: "ppocr_cls",
        version: 7,
        bundle: huge,
    })
    .await;
    rig.event(Reason::Oversize).await;

    // The running model is untouched: same pointer, still serving v1's outputs.
    assert_eq!(Stats::get(&rig.stats.installs), 1);
    assert_eq!(rig.active_pointer(), pointer);
    rig.infer("b", "ppocr_cls", 1e-4).await;
    for r in [
        Reason::HashMismatch,
        Reason::BadSignature,
        Reason::Replay,
        Reason::Oversize,
    ] {
        assert!(rig.stats.rejected(r) >= 1, "{} not counted", r.as_str());
    }
    rig.command(&Command::Ping).await;
    until("ping telemetry", 30, || {
        rig.collect();
        rig.reports
            .iter()
            .any(|r| r.version == Some(1) && r.rejected.iter().any(|(n, _)| n == "replay"))
    })
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_fails_its_self_test_is_rolled_back_and_reported() {
    let Some(broker) = mosquitto("a_bundle_that_fails_its_self_test") else {
        return;
    };
    let mut rig = Rig::start(&broker, "selftest").await;
    let (model, io) = zoo("ppocr_cls");
    rig.publish_bundle(
        "ppocr_cls",
        1,
        &rig.op.bundle("ppocr_cls", 1, &model, &io, &io, 1e-3),
    )
    .await;
    rig.installed(1).await;
    let pointer = rig.active_pointer();

    // v2 ships the float model with the int8 twin's reference outputs: they differ by up to 0.3.
    let (_, wrong) = zoo("ppocr_cls_dyn");
    let bad = rig.op.bundle("ppocr_cls", 2, &model, &io, &wrong, 1e-3);
    rig.publish_bundle("ppocr_cls", 2, &bad).await;
    let why = rig.event(Reason::SelfTestFailed).await;
    assert!(
        why.contains("install ppocr_cls v2") && why.contains("above"),
        "{why}"
    );
    assert_eq!(Stats::get(&rig.stats.install_failures), 1);
    assert_eq!(
        rig.active_pointer(),
        pointer,
        "the active pointer never moved"
    );
    let versions: Vec<_> = std::fs::read_dir(rig.dir.join("data/models/versions"))
        .expect("versions")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "the failed version was removed: {versions:?}"
    );
    rig.infer("c", "ppocr_cls", 1e-4).await;

    // A model that does not even load is reported as such.
    let junk = rig
        .op
        .bundle("ppocr_cls", 3, b"not an onnx model", &io, &io, 1e-3);
    rig.publish_bundle("ppocr_cls", 3, &junk).await;
    rig.event(Reason::LoadFailed).await;
    assert_eq!(rig.active_pointer(), pointer);

    // A rollback command with no older healthy version is refused; the model stays.
    rig.command(&Command::Rollback).await;
    rig.event(Reason::LoadFailed).await;
    rig.infer("d", "ppocr_cls", 1e-4).await;

    // With an older healthy version on disk, a rollback command serves it again.
    let v4 = rig.op.bundle("ppocr_cls", 4, &model, &io, &io, 1e-3);
    rig.publish_bundle("ppocr_cls", 4, &v4).await;
    rig.installed(2).await;
    assert_ne!(rig.active_pointer(), pointer);
    rig.command(&Command::Rollback).await;
    until("rolled back", 30, || Stats::get(&rig.stats.rollbacks) == 1).await;
    assert_eq!(rig.active_pointer(), pointer);
    rig.stop().await;
}
