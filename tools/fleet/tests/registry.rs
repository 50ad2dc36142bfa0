//! `fedge device provision / list / show / revoke` against a running aggregator's HTTP API: a
//! provisioned device's updates are accepted, and after `fedge device revoke` they are refused
//! with `revoked`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../../../models/aggregator/tests/common/mod.rs"]
mod agg;

use agg::{Device, Identity, Running, http};
use common::{TempDir, fails, ok, operator_keys};
use fedge_proto::msg::{Outcome, Reason};

const FLEET: &str = "reg";

fn provision(t: &TempDir, id: &str, out: &str, agg: &Running) -> Vec<String> {
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    [
        "device".to_string(),
        "provision".into(),
        id.into(),
        "--operator-pub".into(),
        s(t.join("ops/operator.pub")),
        "--aggregator-pub".into(),
        agg.public_key.to_hex().to_string(),
        "--broker".into(),
        format!("mqtt://127.0.0.1:{}", agg.broker_port),
        "--fleet".into(),
        FLEET.into(),
        "--out".into(),
        s(t.join(out)),
        "--aggregator".into(),
        format!("http://{}", agg.http),
    ]
    .to_vec()
}

/// The provisioned identity, loaded from the files `fedge device provision` wrote.
fn identity(t: &TempDir, id: &str) -> Identity {
    Identity {
        id: id.into(),
        signer: fedge_proto::keys::file::load(&t.join(id).join("device.key")).unwrap(),
    }
}

fn update(i: usize) -> Vec<u8> {
    fedge_fl::Codec::F32.encode(&agg::delta(i, 1, 8)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_device_is_refused_from_then_on() {
    let t = TempDir::new("registry");
    operator_keys(&t.join("ops"));
    let running = Running::start(agg::config(FLEET, &t.join("agg"), None, &[], vec![])).await;
    let api = format!("http://{}", running.http);

    for id in ["dev-r", "dev-k"] {
        let args = provision(&t, id, id, &running);
        let out = tokio::task::spawn_blocking(move || ok(&args))
            .await
            .unwrap();
        assert!(
            out.starts_with(&format!("{id} ")) && out.contains("(registered)"),
            "{out}"
        );
    }
    let list = ok(&["device", "list", "--aggregator", &api, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let keys: Vec<(&str, &str, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap(),
                d["public_key"].as_str().unwrap(),
                d["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    let pub_of = |id: &str| std::fs::read_to_string(t.join(id).join("device.pub")).unwrap();
    let (k, r) = (pub_of("dev-k"), pub_of("dev-r"));
    assert_eq!(
        keys,
        [("dev-k", k.trim(), false), ("dev-r", r.trim(), false)]
    );
    let table = ok(&["device", "list", "--aggregator", &api]);
    assert!(table.lines().nth(2).unwrap().contains("dev-r"), "{table}");

    let (status, body) = http(
        running.http,
        "POST",
        "/api/jobs",
        Some("id = \"j\"\nrounds = 3\nmin_devices = 1\nmodel = { zeros = 8 }"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = running.public_key;
    let mut r = Device::connect(running.broker_port, FLEET, identity(&t, "dev-r"), key, "j").await;
    let mut k = Device::connect(running.broker_port, FLEET, identity(&t, "dev-k"), key, "j").await;
    r.announce("j", 1).await;
    k.announce("j", 1).await;

    let (seq, w) = r.seal_update("j", 1, 5, &update(0));
    assert_eq!(
        r.send_until_acked("j", seq, &w).await.outcome,
        Outcome::Accepted
    );

    let revoked = ok(&["device", "revoke", "dev-r", "--aggregator", &api]);
    assert_eq!(revoked.trim(), "dev-r revoked");
    let show = ok(&["device", "show", "dev-r", "--aggregator", &api, "--json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["revoked"], true);
    assert!(show["last_seq"].as_u64().unwrap() >= seq);

    // From then on: every message of dev-r is refused; dev-k is unaffected.
    for _ in 0..2 {
        let (seq, w) = r.seal_update("j", 1, 5, &update(0));
        let ack = r.send_until_acked("j", seq, &w).await;
        assert_eq!(ack.outcome, Outcome::Rejected(Reason::Revoked), "{ack:?}");
    }
    let (seq, w) = k.seal_update("j", 1, 5, &update(1));
    assert_eq!(
        k.send_until_acked("j", seq, &w).await.outcome,
        Outcome::Accepted
    );

    // Reported and desired state on the broker, and the drift between them.
    let broker = format!("mqtt://127.0.0.1:{}", running.broker_port);
    let dev_k = identity(&t, "dev-k").signer;
    let op = fedge_proto::keys::file::load(&t.join("ops/operator.key")).unwrap();
    retain(running.broker_port, "status", &status_of(&dev_k, 1)).await;
    retain(running.broker_port, "desired", &desired(&op, 2)).await;
    let show_k = |extra: &'static [&'static str]| {
        let mut v: Vec<String> = [
            "device",
            "show",
            "dev-k",
            "--aggregator",
            &api,
            "--broker",
            &broker,
            "--group",
            FLEET,
            "--operator-pub",
        ]
        .map(String::from)
        .to_vec();
        v.push(t.join("ops/operator.pub").to_string_lossy().into_owned());
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let args = show_k(&["--json"]);
    let out = tokio::task::spawn_blocking(move || ok(&args))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["drift"], "desired cls v2, runs cls v1", "{v}");
    assert_eq!(v["reported"]["online"], true);
    assert_eq!(v["reported"]["key_matches_registry"], true);
    assert_eq!(v["desired"]["version"], 2);
    retain(running.broker_port, "desired", &desired(&op, 1)).await;
    let args = show_k(&[]);
    let out = tokio::task::spawn_blocking(move || ok(&args))
        .await
        .unwrap();
    assert!(
        out.lines()
            .any(|l| l.starts_with("drift") && l.ends_with(" none")),
        "{out}"
    );
    let mallory = fedge_proto::Signer::generate().unwrap().0;
    retain(running.broker_port, "desired", &desired(&mallory, 3)).await;
    let args = show_k(&[]);
    let e = tokio::task::spawn_blocking(move || fails(&args))
        .await
        .unwrap();
    assert!(e.contains("not signed by operator key"), "{e}");

    // A revoked id cannot be provisioned again; unknown ids are named.
    let args = provision(&t, "dev-r", "dev-r-again", &running);
    let e = tokio::task::spawn_blocking(move || fails(&args))
        .await
        .unwrap();
    assert!(e.contains("revoked"), "{e}");
    let e = fails(&["device", "show", "nobody", "--aggregator", &api]);
    assert!(e.contains("nobody"), "{e}");
    let e = fails(&["device", "revoke", "nobody", "--aggregator", &api]);
    assert!(e.contains("404"), "{e}");
    running.stop().await;
}

/// A retained message on dev-k's `leaf` topic, through the aggregator's embedded broker.
async fn retain(port: u16, leaf: &str, wire: &[u8]) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut mo = MqttOptions::new(format!("console-{leaf}"), "127.0.0.1", port);
    mo.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(mo, 8);
    let topic = format!("fedge/v1/{FLEET}/dev/dev-k/{leaf}");
    client
        .publish(topic, QoS::AtLeastOnce, true, wire.to_vec())
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), el.poll()).await;
}

fn status_of(dev: &fedge_proto::Signer, version: u64) -> Vec<u8> {
    let s = fedge_proto::msg::Status {
        online: true,
        agent_version: "test",
        model: Some(fedge_proto::msg::ModelRef {
            name: "cls",
            version,
            sha256: [7; 32],
        }),
        public_key: dev.public_key(),
    };
    let payload = fedge_proto::envelope::encode(&s).unwrap();
    fedge_proto::Envelope::new(fedge_proto::Kind::Status, "dev-k", 1, 0, &payload)
        .seal(dev)
        .unwrap()
}

fn desired(op: &fedge_proto::Signer, version: u64) -> Vec<u8> {
    let c = fedge_proto::msg::Command::Install {
        name: "cls",
        version,
        bundle: fedge_proto::chunk::ChunkManifest::of(&[1, 2, 3], 2).unwrap(),
    };
    let payload = fedge_proto::envelope::encode(&c).unwrap();
    fedge_proto::Envelope::new(fedge_proto::Kind::Command, "operator", version, 0, &payload)
        .seal(op)
        .unwrap()
}
