//! `fedge keys gen` and `fedge device provision`: the written key, agent config and Mosquitto
//! credentials work against a real Mosquitto, and the generated ACL confines each device to its
//! own topics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TempDir, fails, mode, ok, operator_keys};
use fedge_tests::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, oneshot};

const FLEET: &str = "plant";

fn provision(t: &TempDir, id: &str, agg_pub: &str, broker: &str) -> String {
    ok(&[
        "device",
        "provision",
        id,
        "--operator-pub",
        &t.join("ops/operator.pub").to_string_lossy(),
        "--aggregator-pub",
        agg_pub,
        "--broker",
        broker,
        "--fleet",
        FLEET,
        "--data-dir",
        &t.join(&format!("{id}/data")).to_string_lossy(),
        "--out",
        &t.join(id).to_string_lossy(),
        "--aggregator-data",
        &t.join("agg").to_string_lossy(),
    ])
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).expect("read")
}

/// A connected MQTT client: its handle and the messages it receives.
struct Client {
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<Publish>,
    pubacks: mpsc::UnboundedReceiver<()>,
}

async fn connect(port: u16, user: &str, password: Option<&str>) -> Result<Client, String> {
    let mut o = MqttOptions::new(
        format!("t-{user}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(10));
    if let Some(p) = password {
        o.set_credentials(user, p);
    }
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (tx, inbox) = mpsc::unbounded_channel();
    let (ack_tx, pubacks) = mpsc::unbounded_channel();
    let (up_tx, up) = oneshot::channel();
    tokio::spawn(async move {
        let mut up_tx = Some(up_tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = ack_tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(t) = up_tx.take() {
                        let _ = t.send(Err(e));
                    }
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), up).await {
        Ok(Ok(Ok(()))) => Ok(Client {
            client,
            inbox,
            pubacks,
        }),
        Ok(Ok(Err(ConnectionError::ConnectionRefused(code)))) => Err(format!("{code:?}")),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        _ => Err("no CONNACK".into()),
    }
}

impl Client {
    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    /// Publishes each (topic, payload) at QoS 1 and waits for every PUBACK: the broker has
    /// routed (or dropped) them all by then.
    async fn publish_all(&mut self, msgs: &[(String, &str)]) {
        for (t, p) in msgs {
            self.client
                .publish(t, QoS::AtLeastOnce, false, p.as_bytes().to_vec())
                .await
                .unwrap();
        }
        for _ in msgs {
            tokio::time::timeout(Duration::from_secs(10), self.pubacks.recv())
                .await
                .expect("puback")
                .expect("driver");
        }
    }

    /// Every (topic, payload) received until `until` has arrived, then `grace` longer.
    async fn collect(&mut self, until: &str, grace: Duration) -> Vec<(String, String)> {
        let mut got = Vec::new();
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut seen = false;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.inbox.recv()).await {
            let payload = String::from_utf8_lossy(&p.payload).into_owned();
            if payload == until && !seen {
                seen = true;
                deadline = tokio::time::Instant::now() + grace;
            }
            got.push((p.topic, payload));
        }
        got
    }
}

fn topic(leaf: &str) -> String {
    format!("fedge/v1/{FLEET}/{leaf}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_devices_connect_and_stay_on_their_own_topics() {
    if fedge_tests::mosquitto::binary().is_none() {
        return fedge_tests::skip("provisioned_devices_connect", "mosquitto is not installed");
    }
    let t = TempDir::new("acl");
    let operator = operator_keys(&t.join("ops"));
    assert_eq!(mode(&t.join("ops/operator.key")), 0o600);
    let agg = fedge_proto::Signer::generate().unwrap().0.public_key();
    std::fs::create_dir_all(t.join("agg")).unwrap();
    drop(fedge_aggregator::store::Store::open(&t.join("agg/aggregator.redb")).unwrap());
    // The broker starts with no users; it re-reads the files on restart (same port).
    std::fs::write(t.join("passwd"), "").unwrap();
    std::fs::write(t.join("acl"), "").unwrap();
    let mut mosq = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}",
        t.join("passwd").display(),
        t.join("acl").display()
    ))
    .expect("mosquitto with passwords and ACL");
    let broker = mosq.url();
    for id in ["dev-a", "dev-b", "console"] {
        let out = provision(&t, id, &agg.to_hex(), &broker);
        assert!(out.contains("registered"), "{out}");
    }

    // The files: key 0600 matching device.pub, a config the agent parses, the password 0600.
    let a = t.join("dev-a");
    let key = fedge_proto::keys::file::load(&a.join("device.key")).unwrap();
    assert_eq!(mode(&a.join("device.key")), 0o600);
    assert_eq!(mode(&a.join("mqtt.pass")), 0o600);
    assert_eq!(
        read(&a.join("device.pub")).trim(),
        key.public_key().to_hex().as_str()
    );
    let cfg = fedge_agent::Config::load(&a.join("agent.toml")).unwrap();
    assert_eq!(cfg.device_id, "dev-a");
    assert_eq!(cfg.fleet, FLEET);
    assert_eq!(cfg.key_path(), a.join("device.key"));
    assert_eq!(cfg.operator_key, operator);
    assert_eq!(cfg.aggregator_public_key().unwrap(), Some(agg));
    assert_eq!(cfg.broker.url, broker);
    assert_eq!(cfg.broker.username.as_deref(), Some("dev-a"));
    assert_eq!(
        cfg.broker.password_file.as_deref(),
        Some(a.join("mqtt.pass").as_path())
    );

    // The registry holds every provisioned key.
    let store = fedge_aggregator::store::Store::open(&t.join("agg/aggregator.redb")).unwrap();
    let devices = store.devices().unwrap();
    drop(store);
    let ids: Vec<&str> = devices.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["console", "dev-a", "dev-b"]);
    assert_eq!(devices[1].1.public_key, key.public_key().to_hex().as_str());
    assert!(!devices[1].1.revoked);

    // The generated password lines and ACLs; `console` gets an operator's ACL.
    let mut passwd = String::new();
    let mut acl = String::new();
    for id in ["dev-a", "dev-b", "console"] {
        passwd += &read(&t.join(&format!("{id}/mosquitto.passwd")));
    }
    for id in ["dev-a", "dev-b"] {
        acl += &read(&t.join(&format!("{id}/mosquitto.acl")));
    }
    acl += "user console\ntopic readwrite fedge/v1/#\n";
    std::fs::write(t.join("passwd"), &passwd).unwrap();
    std::fs::write(t.join("acl"), &acl).unwrap();
    mosq.restart().expect("mosquitto restart");
    let port = mosq.port();
    let pass = |id: &str| read(&t.join(&format!("{id}/mqtt.pass"))).trim().to_string();

    // Wrong, unknown and missing credentials are refused.
    for (user, pw) in [
        ("dev-a", Some("wrong")),
        ("dev-x", Some("x")),
        ("dev-a", None),
    ] {
        let e = connect(port, user, pw).await.err();
        assert!(e.is_some(), "{user} {pw:?} must be refused");
    }
    let mut console = connect(port, "console", Some(pass("console").as_str()))
        .await
        .unwrap();
    console.subscribe(&topic("#")).await;
    console.publish_all(&[]).await;

    // The real agent, run from the generated config, connects and publishes its signed status.
    let (stop, stopped) = oneshot::channel::<()>();
    let service = fedge_agent::Service::open(cfg).expect("agent service");
    let agent = tokio::spawn(service.run(async move {
        let _ = stopped.await;
    }));
    let status_topic = topic("dev/dev-a/status");
    let status = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let p = console.inbox.recv().await.expect("driver");
            if p.topic == status_topic {
                return p.payload;
            }
        }
    })
    .await
    .expect("the provisioned agent published its status");
    let env = fedge_proto::Envelope::open(&status, 1 << 20)
        .unwrap()
        .verify(&key.public_key())
        .expect("status signed by the provisioned key");
    assert_eq!(env.kind, fedge_proto::Kind::Status);
    let _ = stop.send(());
    agent.await.unwrap().expect("agent stopped cleanly");

    let mut dev_a = connect(port, "dev-a", Some(pass("dev-a").as_str()))
        .await
        .unwrap();
    let mut dev_b = connect(port, "dev-b", Some(pass("dev-b").as_str()))
        .await
        .unwrap();
    dev_b.subscribe(&topic("dev/dev-b/cmd")).await;
    dev_a.subscribe(&topic("dev/dev-b/cmd")).await;
    dev_a.subscribe(&topic("dev/dev-b/telemetry")).await;
    dev_a.subscribe(&topic("job/+/update/+")).await;
    // Subscriptions are in place once a QoS 1 round trip through each connection is done.
    for c in [&mut dev_a, &mut dev_b] {
        c.publish_all(&[]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    while console.inbox.try_recv().is_ok() {}

    dev_a
        .publish_all(&[
            (topic("dev/dev-b/cmd"), "forged cmd"),
            (topic("dev/dev-b/status"), "forged status"),
            (topic("job/j/update/dev-b"), "forged update"),
            (topic("dev/dev-a/telemetry"), "a telemetry"),
            (topic("job/j/update/dev-a"), "a update"),
        ])
        .await;
    dev_b
        .publish_all(&[(topic("dev/dev-b/telemetry"), "b telemetry")])
        .await;
    console
        .publish_all(&[
            (topic("dev/dev-b/cmd"), "command for b"),
            (topic("dev/dev-b/cmd"), "end"),
        ])
        .await;

    let grace = Duration::from_millis(300);
    let seen_by_console = console.collect("end", grace).await;
    let seen_by_b = dev_b.collect("end", grace).await;
    let seen_by_a = dev_a.collect("end", grace).await;
    let payloads = |v: &[(String, String)]| v.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>();

    let console_got = payloads(&seen_by_console);
    for want in [
        "a telemetry",
        "a update",
        "b telemetry",
        "command for b",
        "end",
    ] {
        assert!(
            console_got.iter().any(|p| p == want),
            "console missed {want}: {console_got:?}"
        );
    }
    assert!(
        !console_got.iter().any(|p| p.starts_with("forged")),
        "the broker routed a forged message: {seen_by_console:?}"
    );
    assert_eq!(
        payloads(&seen_by_b),
        ["command for b", "end"],
        "{seen_by_b:?}"
    );
    assert!(
        seen_by_a.is_empty(),
        "dev-a read another device's topics: {seen_by_a:?}"
    );
}

#[test]
fn keys_and_provisioning_refuse_bad_input_with_one_line() {
    let t = TempDir::new("errors");
    let ops = t.join("ops");
    let first = operator_keys(&ops);
    let e = fails(&["keys", "gen", "--out", &ops.to_string_lossy()]);
    assert!(e.contains("--force"), "{e}");
    let second = ok(&["keys", "gen", "--out", &ops.to_string_lossy(), "--force"]);
    assert_ne!(first, second.trim());
    assert_eq!(read(&ops.join("operator.pub")).trim(), second.trim());

    let e = fails(&["keys", "gen"]);
    assert!(e.contains("--out"), "{e}");
    let e = fails(&["device", "provision", "dev-1", "--out", "x"]);
    assert!(e.contains("--broker"), "{e}");
    let e = fails(&["device", "frobnicate"]);
    assert!(e.contains("frobnicate"), "{e}");

    std::fs::create_dir_all(t.join("agg")).unwrap();
    drop(fedge_aggregator::store::Store::open(&t.join("agg/aggregator.redb")).unwrap());
    let agg_hex = "22".repeat(32);
    let base = |id: &str, out: &str| -> Vec<String> {
        [
            "device",
            "provision",
            id,
            "--operator-pub",
            &ops.join("operator.pub").to_string_lossy(),
            "--aggregator-pub",
            &agg_hex,
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--out",
            &t.join(out).to_string_lossy(),
            "--aggregator-data",
            &t.join("agg").to_string_lossy(),
        ]
        .map(String::from)
        .to_vec()
    };
    let with = |mut v: Vec<String>, i: usize, value: &str| {
        v[i] = value.to_string();
        v
    };
    let nothing_written = |out: &str| assert!(!t.join(out).join("device.key").exists(), "{out}");

    let e = fails(&base("a/b", "d0"));
    assert!(e.contains("device id"), "{e}");
    let e = fails(&with(base("d1", "d1"), 8, "http://broker"));
    assert!(e.contains("broker.url"), "{e}");
    nothing_written("d1");
    let e = fails(&with(base("d2", "d2"), 4, "/nonexistent/operator.pub"));
    assert!(e.contains("--operator-pub"), "{e}");
    let e = fails(&with(base("d3", "d3"), 6, "abc"));
    assert!(e.contains("--aggregator-pub"), "{e}");
    let e = fails(&with(base("d4", "d4"), 12, "/nonexistent/agg"));
    assert!(e.contains("aggregator.redb"), "{e}");
    nothing_written("d4");
    let mut http = base("d5", "d5");
    http[11] = "--aggregator".into();
    http[12] = format!("http://127.0.0.1:{}", fedge_tests::mosquitto::free_port());
    let e = fails(&http);
    assert!(e.contains("unreachable"), "{e}");
    nothing_written("d5");

    ok(&base("d6", "d6"));
    let e = fails(&base("d6", "d6"));
    assert!(e.contains("already provisioned"), "{e}");

    for verb in [
        &["device", "list"][..],
        &["device", "show", "d6"],
        &["device", "revoke", "d6"],
    ] {
        let mut args: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
        args.push("--aggregator".into());
        args.push(format!(
            "http://127.0.0.1:{}",
            fedge_tests::mosquitto::free_port()
        ));
        let e = fails(&args);
        assert!(e.contains("unreachable"), "{e}");
    }
}
