//! Secure aggregation (SecAgg+) over a real Mosquitto: devices run `fedge_fl::secagg::Client`
//! on their own MQTT connections and the aggregator drives the five stages. The model is the
//! mean of the survivors' quantised updates, dropouts at every stage are survived, a round
//! below the threshold fails with its reason and the job goes on, and tampered or plain
//! messages are refused with their reason.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Announce, Device, Running, delta, get_json, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_fl::secagg::{Client, RoundSetup, wire};
use fedge_proto::msg::{Outcome, Phase, Reason, SecAggStep};
use fedge_tests::mosquitto::Mosquitto;

const PARAMS: usize = 200;
const CLIP: f32 = 0.5;
const JOB: &str = "digits";

fn initial() -> Vec<f32> {
    (0..PARAMS).map(|i| (i as f32 * 0.03).sin()).collect()
}

fn job(rounds: u64, deadline_ms: u64) -> JobSpec {
    JobSpec::parse(
        &format!(
            "id = \"{JOB}\"\nrounds = {rounds}\ndeadline_ms = {deadline_ms}\nchunk_size = 700\n\
             secure_aggregation = {{ clip = {CLIP}, stage_ms = 3000 }}\nmodel = {{ params = {:?} }}",
            initial()
        ),
        1 << 20,
    )
    .expect("job")
}

/// Where a device stops answering.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Leave {
    Never,
    BeforeKeys,
    BeforeMasked,
    BeforeConfirmation,
}

/// One device through one secure round, leaving where told. A masked input whose byte is
/// flipped is sent first when `tamper` is set (and must be refused as a bad signature).
async fn take_part(d: &mut Device, a: &Announce, update: &[f32], leave: Leave, tamper: bool) {
    let setup = a.secagg.clone().expect("a secure round");
    let me = d.signer.public_key().0;
    let mut c = Client::new(Arc::clone(&setup), &me).expect("in the roster");
    if leave == Leave::BeforeKeys {
        return;
    }
    let keys = c.advertise(d.signer.key_pair()).expect("advertise");
    d.send_secagg(&setup, SecAggStep::Keys, &wire::encode_keys(&keys))
        .await;
    let r = d.relay(SecAggStep::NeighbourKeys).await;
    assert_eq!((r.round, r.session), (setup.round(), setup.session()));
    let keys = wire::decode_keys(&r.body).expect("keys");
    let items = c.share(d.signer.key_pair(), &keys).expect("share");
    d.send_secagg(&setup, SecAggStep::Shares, &wire::encode_shares(&items))
        .await;
    if leave == Leave::BeforeMasked {
        return;
    }
    let r = d.relay(SecAggStep::NeighbourShares).await;
    let u2 = wire::decode_ids(&r.ids).expect("ids");
    let items = wire::decode_shares(&r.body).expect("items");
    let masked = c
        .mask(d.signer.key_pair(), &u2, &items, update)
        .expect("mask")
        .to_bytes();
    if tamper {
        let mut bad = masked.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let seq = d.send_secagg(&setup, SecAggStep::Masked, &bad).await;
        let ack = d.ack(seq).await;
        assert_eq!(
            ack.outcome,
            Outcome::Rejected(Reason::BadSignature),
            "{}: {}",
            d.id,
            ack.detail
        );
    }
    d.send_secagg(&setup, SecAggStep::Masked, &masked).await;
    if leave == Leave::BeforeConfirmation {
        return;
    }
    let r = d.relay(SecAggStep::Survivors).await;
    let u3 = wire::decode_ids(&r.ids).expect("ids");
    let conf = c.confirm(d.signer.key_pair(), &u3).expect("confirm");
    d.send_secagg(
        &setup,
        SecAggStep::Confirmation,
        &wire::encode_confirmations(&[conf]),
    )
    .await;
    let r = d.relay(SecAggStep::Confirmations).await;
    let confs = wire::decode_confirmations(&r.body).expect("confirmations");
    let reveals = c.unmask(d.signer.key_pair(), &confs).expect("unmask");
    d.send_secagg(&setup, SecAggStep::Reveals, &reveals.to_bytes())
        .await;
}

/// `global` plus the mean of `updates` as secure aggregation computes it: each clipped and
/// quantised, summed exactly, dequantised.
fn expected(global: &[f32], setup: &RoundSetup, updates: &[Vec<f32>]) -> Vec<f32> {
    let p = setup.params();
    let modulus = (1u64 << p.mod_bits) - 1;
    let mut sum = vec![0u32; PARAMS];
    for u in updates {
        let q = fedge_fl::secagg::quantize(u, p).expect("quantise");
        for (s, v) in sum.iter_mut().zip(q) {
            *s = ((u64::from(*s) + u64::from(v)) & modulus) as u32;
        }
    }
    let n = updates.len();
    let total = fedge_fl::secagg::dequantize_sum(&sum, n, p);
    global
        .iter()
        .zip(total)
        .map(|(g, s)| g + s / n as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err <= 1e-6, "{what}: max error {err}");
}

async fn rounds_json(agg: &Running) -> Vec<serde_json::Value> {
    get_json(agg.http, &format!("/api/jobs/{JOB}/rounds"))
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_rounds_give_the_mean_of_the_updates_and_survive_dropouts_at_every_stage() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("secure_rounds_give_the_mean", &e),
    };
    let ids = identities(8);
    let dir = temp_dir("secure-rounds");
    let cfg = common::config(
        "fsa",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job(2, 5000)],
    );
    let agg = Running::start(cfg).await;
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Device::connect(broker.port(), "fsa", id, agg.public_key, JOB).await);
    }
    // Round 1: everybody. Round 2: device 0 never advertises, device 1 leaves after sharing
    // (its pairwise masks are rebuilt), device 2 after its masked input (its self-mask is
    // rebuilt and its update counts), device 3 sends a tampered masked input first.
    let mut global = initial();
    for round in 1..=2u64 {
        let mut tasks = tokio::task::JoinSet::new();
        let mut announced = None;
        for (i, mut d) in devices.drain(..).enumerate() {
            let a = d.announce(JOB, round).await;
            assert_eq!((a.round, a.phase), (round, Phase::Open));
            let model = d.fetch_model(JOB, &a).await;
            assert_close(
                &model,
                &global,
                &format!("{}: model of round {round}", d.id),
            );
            announced = Some(a.clone());
            let leave = match (round, i) {
                (2, 0) => Leave::BeforeKeys,
                (2, 1) => Leave::BeforeMasked,
                (2, 2) => Leave::BeforeConfirmation,
                _ => Leave::Never,
            };
            let tamper = round == 2 && i == 3;
            tasks.spawn(async move {
                take_part(&mut d, &a, &delta(i, round, PARAMS), leave, tamper).await;
                (i, d)
            });
        }
        let mut back: Vec<(usize, Device)> = tasks.join_all().await;
        back.sort_by_key(|(i, _)| *i);
        devices = back.into_iter().map(|(_, d)| d).collect();
        let setup = announced.and_then(|a| a.secagg).expect("setup");
        let counted: Vec<Vec<f32>> = (0..8)
            .filter(|&i| round == 1 || i >= 2)
            .map(|i| delta(i, round, PARAMS))
            .collect();
        global = expected(&global, &setup, &counted);
    }
    let a = devices[0].announce(JOB, 3).await;
    assert_eq!((a.phase, a.version), (Phase::Finished, 2));
    assert!(a.secagg.is_none(), "a finished job announces no session");
    let model = devices[0].fetch_model(JOB, &a).await;
    assert_close(&model, &global, "final model");

    let rounds = rounds_json(&agg).await;
    let accepted: Vec<u64> = rounds
        .iter()
        .map(|r| r["accepted"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(accepted, [8, 6], "{rounds:?}");
    assert!(rounds.iter().all(|r| r["failed"].is_null()), "{rounds:?}");
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_a_secure_round_fails_with_its_reason_and_the_job_goes_on() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("below_the_threshold", &e),
    };
    let ids = identities(5);
    let dir = temp_dir("secure-threshold");
    let cfg = common::config(
        "fsb",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job(2, 2500)],
    );
    let agg = Running::start(cfg).await;
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Device::connect(broker.port(), "fsb", id, agg.public_key, JOB).await);
    }
    // Round 1: 5 devices, k = 4, t = 3; only two advertise.
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_session = 0;
    for (i, mut d) in devices.drain(..).enumerate() {
        let a = d.announce(JOB, 1).await;
        if i == 0 {
            // A plain update is not taken by a secure job.
            let zeros = fedge_fl::Codec::F32.encode(&[0.0; PARAMS]).expect("encode");
            let (seq, plain) = d.seal_update(JOB, 1, 10, &zeros);
            d.publish_update(JOB, plain).await;
            assert_eq!(
                d.ack(seq).await.outcome,
                Outcome::Rejected(Reason::WrongKind)
            );
        }
        let setup = a.secagg.clone().expect("session");
        assert_eq!(
            (setup.params().neighbours, setup.params().threshold),
            (4, 3)
        );
        first_session = setup.session();
        let leave = if i < 2 {
            Leave::BeforeMasked
        } else {
            Leave::BeforeKeys
        };
        tasks.spawn(async move {
            if leave == Leave::BeforeMasked {
                // Advertise only: the stage closes at the deadline with two devices.
                let mut c = Client::new(Arc::clone(&setup), &d.signer.public_key().0).expect("c");
                let keys = c.advertise(d.signer.key_pair()).expect("advertise");
                d.send_secagg(&setup, SecAggStep::Keys, &wire::encode_keys(&keys))
                    .await;
            }
            (i, d)
        });
    }
    let mut back: Vec<(usize, Device)> = tasks.join_all().await;
    back.sort_by_key(|(i, _)| *i);
    devices = back.into_iter().map(|(_, d)| d).collect();

    // Round 2 opens with the model unchanged and a new session; all five take part.
    let mut tasks = tokio::task::JoinSet::new();
    let mut setup2 = None;
    for (i, mut d) in devices.drain(..).enumerate() {
        let a = tokio::time::timeout(Duration::from_secs(30), d.announce(JOB, 2))
            .await
            .expect("round 2 within the deadline");
        let model = d.fetch_model(JOB, &a).await;
        assert_close(&model, &initial(), "a failed round keeps the model");
        let s = a.secagg.clone().expect("session");
        assert_ne!(s.session(), first_session);
        setup2 = Some(s);
        tasks.spawn(async move {
            take_part(&mut d, &a, &delta(i, 2, PARAMS), Leave::Never, false).await;
            (i, d)
        });
    }
    let mut back: Vec<(usize, Device)> = tasks.join_all().await;
    back.sort_by_key(|(i, _)| *i);
    let mut devices: Vec<Device> = back.into_iter().map(|(_, d)| d).collect();
    let a = devices[0].announce(JOB, 3).await;
    assert_eq!(a.phase, Phase::Finished);
    let model = devices[0].fetch_model(JOB, &a).await;
    let all: Vec<Vec<f32>> = (0..5).map(|i| delta(i, 2, PARAMS)).collect();
    assert_close(
        &model,
        &expected(&initial(), &setup2.expect("setup"), &all),
        "round 2 model",
    );

    let rounds = rounds_json(&agg).await;
    let failed = rounds[0]["failed"].as_str().unwrap_or_default().to_string();
    assert!(
        failed.contains("advertise-keys") && failed.contains("2 devices left"),
        "{failed}"
    );
    assert!(rounds[1]["failed"].is_null(), "{rounds:?}");
    assert_eq!(rounds[1]["accepted"].as_u64(), Some(5));
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_is_announced_closed_until_its_session_can_start() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("announced_closed_until_its_session", &e),
    };
    let mut ids = identities(3);
    let third = ids.pop().expect("three");
    let dir = temp_dir("secure-late");
    let cfg = common::config(
        "fsc",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job(3, 3000)],
    );
    let agg = Running::start(cfg).await;
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Device::connect(broker.port(), "fsc", id, agg.public_key, JOB).await);
    }
    // Two devices cannot mask: the round is announced closed, without a session, so nobody
    // trains for it and sends an update in clear; at its deadline it fails with the reason.
    let a = devices[0].announce(JOB, 1).await;
    assert_eq!((a.round, a.phase), (1, Phase::Closed));
    assert!(a.secagg.is_none());
    let a = devices[0].announce(JOB, 2).await;
    assert_eq!((a.round, a.phase), (2, Phase::Closed));
    let rounds = rounds_json(&agg).await;
    let failed = rounds[0]["failed"].as_str().unwrap_or_default();
    assert!(
        failed.contains("could not start") && failed.contains("2 devices"),
        "{rounds:?}"
    );
    // A third device registers: the open round gets its session and is announced open.
    let body = serde_json::json!({
        "id": third.id,
        "public_key": third.signer.public_key().to_hex().to_string(),
    })
    .to_string();
    let (code, said) = common::http(agg.http, "POST", "/api/devices", Some(&body)).await;
    assert_eq!(code, 201, "{said}");
    devices.push(Device::connect(broker.port(), "fsc", third, agg.public_key, JOB).await);
    let mut announced = Vec::new();
    for d in &mut devices {
        let a = loop {
            let a = d.announce(JOB, 2).await;
            if a.phase == Phase::Open {
                break a;
            }
        };
        assert_eq!(a.secagg.as_ref().map(|s| s.roster().len()), Some(3));
        announced.push(a);
    }
    // A device that sends another device's signed keys as its own is refused.
    let setup = announced[0].secagg.clone().expect("session");
    let mut c1 = Client::new(Arc::clone(&setup), &devices[1].signer.public_key().0).expect("c");
    let keys1 = c1
        .advertise(devices[1].signer.key_pair())
        .expect("advertise");
    let seq = devices[0]
        .send_secagg(&setup, SecAggStep::Keys, &wire::encode_keys(&keys1))
        .await;
    let ack = devices[0].ack(seq).await;
    assert_eq!(
        ack.outcome,
        Outcome::Rejected(Reason::Malformed),
        "{}",
        ack.detail
    );
    assert!(
        ack.detail.contains("device 0 sent a message of device 1"),
        "{}",
        ack.detail
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (mut d, a)) in devices.into_iter().zip(announced).enumerate() {
        tasks.spawn(async move {
            take_part(&mut d, &a, &delta(i, 2, PARAMS), Leave::Never, false).await;
            d
        });
    }
    let mut devices: Vec<Device> = tasks.join_all().await;
    let a = devices[0].announce(JOB, 3).await;
    assert_eq!(a.round, 3);
    let rounds = rounds_json(&agg).await;
    assert!(rounds[1]["failed"].is_null(), "{rounds:?}");
    assert_eq!(rounds[1]["accepted"].as_u64(), Some(3));
    agg.stop().await;
}
