//! Sealed (encrypted) updates against a real Mosquitto: the models are the same as with clear
//! updates, the broker carries only ciphertext, and every way an update can fail to open is
//! refused as `undecryptable` without spending a key it should not.

mod common;

use std::time::Duration;

use common::{Device, Running, bits, delta, expected_round, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::{Outcome, Phase, Reason, Update};
use fedge_proto::seal::{self, Sealed};
use fedge_proto::{Envelope, Kind};
use fedge_tests::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PARAMS: usize = 300;

fn initial() -> Vec<f32> {
    (0..PARAMS).map(|i| (i as f32 * 0.02).cos()).collect()
}

fn samples(i: usize) -> u64 {
    12 + 5 * i as u64
}

fn job(rounds: u64, min: usize) -> JobSpec {
    JobSpec::parse(
        &format!(
            "id = \"digits\"\nrounds = {rounds}\nmin_devices = {min}\ndeadline_ms = 120000\nchunk_size = 700\nencrypt_updates = true\nmodel = {{ params = {:?} }}",
            initial()
        ),
        1 << 20,
    )
    .expect("job")
}

/// Every update publish the broker relays, as an observer subscribed to the update topics sees
/// it. Returns once the subscription is acknowledged.
async fn spy(port: u16, fleet: &str) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let mut o = MqttOptions::new(format!("spy-{}", std::process::id()), "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    client
        .subscribe(format!("fedge/v1/{fleet}/job/+/update/+"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("spy subscribed in time")
        .expect("spy task");
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_updates_give_the_same_models_and_the_broker_carries_only_ciphertext() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("sealed_updates_give_the_same_models", &e),
    };
    let ids = identities(8);
    let keys: std::collections::BTreeMap<String, fedge_proto::PublicKey> = ids
        .iter()
        .map(|d| (d.id.clone(), d.signer.public_key()))
        .collect();
    let dir = temp_dir("sealed");
    let cfg = common::config(
        "fs",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job(2, 8)],
    );
    let mut spied = spy(broker.port(), "fs").await;
    let agg = Running::start(cfg).await;

    let mut expected = vec![initial()];
    let mut fedavg = fedge_fl::FedAvg::new();
    let mut plain = Vec::new();
    for round in 1..=2u64 {
        let updates: Vec<(String, u64, Vec<f32>)> = ids
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), samples(i), delta(i, round, PARAMS)))
            .collect();
        for (_, _, d) in &updates {
            plain.push(fedge_fl::Codec::F32.encode(d).expect("encode"));
        }
        let prev = expected.last().expect("model").clone();
        expected.push(expected_round(&mut fedavg, round, &prev, &updates));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let (expected, key, port) = (expected.clone(), agg.public_key, broker.port());
        tasks.spawn(async move {
            let mut dev = Device::connect(port, "fs", id, key, "digits").await;
            for round in 1..=2u64 {
                let a = dev.announce("digits", round).await;
                assert_eq!((a.round, a.phase), (round, Phase::Open));
                assert_eq!(
                    a.recipients.as_deref().map(seal::recipients::count),
                    Some(Ok(8))
                );
                assert!(dev.recipient.is_some(), "{}: listed", dev.id);
                let model = dev.fetch_model("digits", &a).await;
                assert_eq!(bits(&model), bits(&expected[round as usize - 1]));
                let d = fedge_fl::Codec::F32
                    .encode(&delta(i, round, PARAMS))
                    .expect("encode");
                let (seq, wire) = dev.seal_update("digits", round, samples(i), &d);
                dev.publish_update("digits", wire).await;
                let ack = dev.ack(seq).await;
                assert_eq!(ack.outcome, Outcome::Accepted, "{}: {}", dev.id, ack.detail);
            }
            let a = dev.announce("digits", 3).await;
            assert_eq!((a.phase, a.version), (Phase::Finished, 2));
            assert!(a.recipients.is_none(), "a finished job lists no keys");
            let model = dev.fetch_model("digits", &a).await;
            assert_eq!(bits(&model), bits(&expected[2]), "{}: final model", dev.id);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("device task");
    }
    agg.stop().await;

    // What the broker relayed: 16 signed envelopes whose payloads are sealed, and no 16-byte
    // window of any plaintext delta anywhere in them.
    // (The spy has its own session: wait for its copies, and drop QoS 1 redeliveries.)
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 16 {
        let p = tokio::time::timeout_at(deadline, spied.recv())
            .await
            .expect("16 update publishes relayed in time")
            .expect("spy");
        let u = Envelope::open(&p, 1 << 20).expect("envelope");
        seen.insert((u.sender().to_string(), u.seq()), p);
    }
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(300), spied.recv()).await {
        let u = Envelope::open(&p, 1 << 20).expect("envelope");
        seen.insert((u.sender().to_string(), u.seq()), p);
    }
    assert_eq!(seen.len(), 16, "distinct update publishes relayed");
    for wire in seen.values() {
        let u = Envelope::open(wire, 1 << 20).expect("envelope");
        let env = u.verify(&keys[u.sender()]).expect("device signature");
        assert_eq!(env.kind, Kind::Update);
        let s: Sealed<'_> = fedge_proto::envelope::decode(env.payload).expect("sealed payload");
        assert!(s.ciphertext.len() > PARAMS * 4);
        for d in &plain {
            assert!(
                !d.windows(16).any(|w| wire.windows(16).any(|x| x == w)),
                "a plaintext delta window is visible on the broker"
            );
        }
        assert!(!wire.windows(6).any(|w| w == b"digits"), "job name visible");
    }
    std::fs::remove_dir_all(dir).expect("cleanup");
}

/// Seals `u` for `aad_round` but sends it in an envelope of `round`.
fn misbound(
    dev: &mut Device,
    key: &[u8; 32],
    round: u64,
    aad_round: u64,
    d: &[u8],
) -> (u64, Vec<u8>) {
    dev.seq += 1;
    let u = Update {
        job: "digits",
        round,
        base_version: round - 1,
        num_samples: 10,
        loss: 0.5,
        accuracy: 0.5,
        delta: d,
    };
    let plain = fedge_proto::envelope::encode(&u).expect("encode");
    let aad = seal::associated_data("digits", aad_round, &dev.id);
    let payload = seal::seal(key, &aad, &plain).expect("seal");
    let wire = Envelope::new(Kind::Update, &dev.id, dev.seq, round, &payload)
        .seal(&dev.signer)
        .expect("envelope");
    (dev.seq, wire)
}

async fn send(dev: &mut Device, seq: u64, wire: Vec<u8>) -> (Outcome, String) {
    dev.publish_update("digits", wire).await;
    let ack = dev.ack(seq).await;
    (ack.outcome, ack.detail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_misdirected_misbound_and_pre_restart_updates_are_refused_as_undecryptable() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("sealed_refusals", &e),
    };
    let ids = identities(4);
    let dir = temp_dir("sealed-refusals");
    let cfg = common::config(
        "fr",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job(1, 4)],
    );
    let agg = Running::start(cfg.clone()).await;
    let key = agg.public_key;
    let mut devs = Vec::new();
    for id in ids {
        let mut dev = Device::connect(broker.port(), "fr", id, key, "digits").await;
        dev.announce("digits", 1).await;
        devs.push(dev);
    }
    let d = fedge_fl::Codec::F32
        .encode(&delta(0, 1, PARAMS))
        .expect("encode");
    let undecryptable = Outcome::Rejected(Reason::Undecryptable);

    // In clear: refused, and the key is still there for the sealed one.
    let key0 = devs[0].recipient.take().expect("listed");
    let (seq, wire) = devs[0].seal_update("digits", 1, 10, &d);
    let (o, detail) = send(&mut devs[0], seq, wire).await;
    assert_eq!(o, undecryptable, "{detail}");
    assert!(detail.contains("sealed updates only"), "{detail}");
    devs[0].recipient = Some(key0);
    let (seq, wire) = devs[0].seal_update("digits", 1, 10, &d);
    assert_eq!(send(&mut devs[0], seq, wire).await.0, Outcome::Accepted);

    // Sealed to another device's key: refused without spending device 1's own key.
    let own = devs[1].recipient.expect("listed");
    devs[1].recipient = devs[2].recipient;
    let (seq, wire) = devs[1].seal_update("digits", 1, 10, &d);
    let (o, detail) = send(&mut devs[1], seq, wire).await;
    assert_eq!(o, undecryptable, "{detail}");
    assert!(detail.contains("does not hold"), "{detail}");
    devs[1].recipient = Some(own);
    let (seq, wire) = devs[1].seal_update("digits", 1, 10, &d);
    assert_eq!(send(&mut devs[1], seq, wire).await.0, Outcome::Accepted);

    // Bound to another round: refused, and the key is spent (it was used to try).
    let k2 = devs[2].recipient.expect("listed");
    let (seq, wire) = misbound(&mut devs[2], &k2, 1, 2, &d);
    let (o, detail) = send(&mut devs[2], seq, wire).await;
    assert_eq!(o, undecryptable, "{detail}");
    assert!(detail.contains("does not decrypt"), "{detail}");
    let (seq, wire) = devs[2].seal_update("digits", 1, 10, &d);
    let (o, detail) = send(&mut devs[2], seq, wire).await;
    assert_eq!(o, undecryptable, "{detail}");
    assert!(detail.contains("already used"), "{detail}");

    // A restart: the open round is announced again with new keys; an update sealed to the old
    // one is refused, one sealed to the new one counts beside the two accepted before.
    agg.stop().await;
    let agg = Running::start(cfg).await;
    let old = devs[3].recipient.expect("listed");
    for _ in 0..20 {
        devs[3].announce("digits", 1).await;
        if devs[3].recipient != Some(old) {
            break;
        }
    }
    let new = devs[3].recipient.expect("listed again");
    assert_ne!(new, old, "new keys after a restart");
    devs[3].recipient = Some(old);
    let (seq, wire) = devs[3].seal_update("digits", 1, 10, &d);
    let (o, detail) = send(&mut devs[3], seq, wire).await;
    assert_eq!(o, undecryptable, "{detail}");
    assert!(detail.contains("before a restart"), "{detail}");
    devs[3].recipient = Some(new);
    let (seq, wire) = devs[3].seal_update("digits", 1, 10, &d);
    assert_eq!(send(&mut devs[3], seq, wire).await.0, Outcome::Accepted);

    let status = common::get_json(agg.http, "/status").await;
    // Counters restart with the process: the one refusal after the restart.
    assert_eq!(status["updates"]["rejected"]["undecryptable"], 1);
    let rounds = common::get_json(agg.http, "/api/jobs/digits/rounds").await;
    let r = &rounds.as_array().expect("rounds")[0];
    assert_eq!(r["round"], 1);
    assert_eq!(
        r["accepted"], 3,
        "the two accepted before the restart are kept; {r}"
    );

    // A device registered while the round is open is given a key and a new announcement; its
    // update is the fourth, and the round closes.
    let late = common::Identity::new("dev-late");
    let body = format!(
        "{{\"id\":\"dev-late\",\"public_key\":\"{}\"}}",
        late.signer.public_key().to_hex()
    );
    let (code, text) = common::http(agg.http, "POST", "/api/devices", Some(&body)).await;
    assert!(code == 200 || code == 201, "{code} {text}");
    let mut dev = Device::connect(broker.port(), "fr", late, key, "digits").await;
    for _ in 0..20 {
        dev.announce("digits", 1).await;
        if dev.recipient.is_some() {
            break;
        }
    }
    assert!(dev.recipient.is_some(), "the late device is listed");
    let (seq, wire) = dev.seal_update("digits", 1, 10, &d);
    let (o, detail) = send(&mut dev, seq, wire).await;
    assert_eq!(o, Outcome::Accepted, "{detail}");
    let a = dev.announce("digits", 2).await;
    assert_eq!(a.phase, Phase::Finished);
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
