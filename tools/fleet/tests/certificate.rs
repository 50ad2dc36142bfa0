//! `fedge keys certify-aggregator`: the certificate verifies with the operator key and names the
//! aggregator; an aggregator refuses a certificate of another key at start and publishes its own
//! retained on `aggregator` (Mosquitto).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TempDir, fails, ok, operator_keys};
use fedge_proto::msg::AggregatorCert;
use fedge_proto::{Envelope, Kind, PublicKey};

fn certify(t: &TempDir, agg_pub: &str, out: &str) -> String {
    ok(&[
        "keys",
        "certify-aggregator",
        "--key",
        &t.join("ops/operator.key").to_string_lossy(),
        "--aggregator-pub",
        agg_pub,
        "--fleet",
        "plant",
        "--valid-days",
        "30",
        "--out",
        &t.join(out).to_string_lossy(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_certifies_the_aggregator_key_which_the_aggregator_publishes() {
    let t = TempDir::new("certify");
    let operator = PublicKey::from_hex(&operator_keys(&t.join("ops"))).unwrap();
    let agg_key_path = t.join("agg/aggregator.key");
    std::fs::create_dir_all(t.join("agg")).unwrap();
    let agg = fedge_proto::keys::file::load_or_create(&agg_key_path)
        .unwrap()
        .public_key();
    let said = certify(&t, &agg.to_hex(), "agg.cert");
    assert!(said.contains("until"), "{said}");
    let wire = std::fs::read(t.join("agg.cert")).unwrap();
    let env = Envelope::open(&wire, 4096)
        .unwrap()
        .verify(&operator)
        .expect("signed by the operator");
    assert_eq!((env.kind, env.sender), (Kind::Certificate, "operator"));
    let cert: AggregatorCert<'_> = fedge_proto::envelope::decode(env.payload).unwrap();
    assert_eq!(
        (cert.fleet, cert.aggregator, cert.public_key),
        ("plant", "aggregator", agg)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((cert.not_after_unix_s - now).abs_diff(30 * 86_400) < 120);
    let e = fails(&[
        "keys",
        "certify-aggregator",
        "--key",
        &t.join("ops/operator.key").to_string_lossy(),
        "--aggregator-pub",
        "nope",
        "--out",
        &t.join("x.cert").to_string_lossy(),
    ]);
    assert!(e.contains("nope"), "{e}");

    let mut cfg = fedge_aggregator::Config {
        fleet: "plant".into(),
        data_dir: t.join("agg"),
        key_file: Some(agg_key_path),
        ..fedge_aggregator::Config::default()
    };
    cfg.broker.listen = ([127, 0, 0, 1], fedge_tests::mosquitto::free_port()).into();
    // A certificate of another key is refused at start, with both keys named.
    let other = fedge_proto::Signer::generate().unwrap().0.public_key();
    certify(&t, &other.to_hex(), "other.cert");
    cfg.certificate_file = Some(t.join("other.cert"));
    let e = fedge_aggregator::Service::bind(cfg.clone())
        .await
        .expect_err("another key")
        .to_string();
    assert!(
        e.contains("certifies") && e.contains(&agg.to_hex().to_string()),
        "{e}"
    );

    // Its own is published retained on the aggregator topic, byte for byte (Mosquitto: it
    // marks retained copies as such).
    let broker = match fedge_tests::mosquitto::Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("certificate published retained", &e),
    };
    cfg.broker.url = Some(broker.url());
    cfg.certificate_file = Some(t.join("agg.cert"));
    let service = fedge_aggregator::Service::bind(cfg).await.expect("bind");
    let port = broker.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.run(async move {
        let _ = stopped.await;
    }));
    let mut o = rumqttc::MqttOptions::new("cert-watch", "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 16);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("the certificate within 30 s");
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                client
                    .subscribe("fedge/v1/plant/aggregator", rumqttc::QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.retain => break p,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                // Subscribed before the aggregator published: subscribe again for the
                // retained copy.
                client
                    .subscribe("fedge/v1/plant/aggregator", rumqttc::QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(got.payload.to_vec(), wire);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
