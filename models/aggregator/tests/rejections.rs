//! Every refusal, one case at a time against a real Mosquitto: each must come back to the
//! device as a signed ack with its reason, and be counted by reason in `/status` and
//! `/metrics`. Also the other late policy: stale updates down-weighted by staleness.

mod common;

use std::collections::BTreeMap;

use common::{Device, Identity, Running, bits, delta, get_json, http, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::{Outcome, Reason, Selection, Update};
use fedge_proto::{Envelope, Kind, Signer};
use fedge_tests::mosquitto::Mosquitto;

const N: usize = 8;

fn f32_codec(values: &[f32]) -> Vec<u8> {
    // fedge-fl's f32 layout, written by hand so NaN and Inf can be sent.
    let mut b = vec![1, 1, 0, 0];
    b.extend((values.len() as u32).to_le_bytes());
    b.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    b
}

fn good(i: usize, round: u64) -> Vec<u8> {
    fedge_fl::Codec::F32
        .encode(&delta(i, round, N))
        .expect("encode")
}

/// Seals an envelope by hand (another key, another kind, another payload).
fn seal(signer: &Signer, id: &str, kind: Kind, seq: u64, round: u64, payload: &[u8]) -> Vec<u8> {
    Envelope::new(kind, id, seq, round, payload)
        .seal(signer)
        .expect("seal")
}

fn update_payload(job: &str, round: u64, base: u64, samples: u64, delta: &[u8]) -> Vec<u8> {
    let u = Update {
        job,
        round,
        base_version: base,
        num_samples: samples,
        loss: 0.0,
        accuracy: 0.0,
        delta,
    };
    fedge_proto::envelope::encode(&u).expect("encode")
}

async fn expect(dev: &mut Device, job: &str, seq: u64, wire: Vec<u8>, want: Outcome, case: &str) {
    dev.publish_update(job, wire).await;
    let ack = dev.ack(seq).await;
    assert_eq!(
        ack.outcome, want,
        "case {case:?}: ack detail {:?}",
        ack.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_acked_with_its_reason_and_counted_in_status_and_metrics() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("every_refusal_is_acked", &e),
    };
    let (g1, g2, g3) = (
        Identity::new("g1"),
        Identity::new("g2"),
        Identity::new("g3"),
    );
    let (stranger, revoked) = (Identity::new("stranger"), Identity::new("rv"));
    let jobs = vec![
        JobSpec::parse(
            "id = \"j\"\nrounds = 3\nmax_norm = 10.0\nmodel = { zeros = 8 }",
            1 << 20,
        )
        .expect("job"),
        JobSpec::parse(
            "id = \"sampled\"\nfraction = 0.34\nseed = 7\nmodel = { zeros = 8 }",
            1 << 20,
        )
        .expect("job"),
    ];
    let dir = temp_dir("rejections");
    let cfg = common::config("rej", &dir, Some(broker.url()), &[&g1, &g2, &g3], jobs);
    let agg = Running::start(cfg).await;

    let body = format!(
        "{{\"id\":\"rv\",\"public_key\":\"{}\"}}",
        revoked.signer.public_key()
    );
    assert_eq!(
        http(agg.http, "POST", "/api/devices", Some(&body)).await.0,
        201,
        "register over HTTP"
    );
    assert_eq!(
        http(agg.http, "POST", "/api/devices", Some(&body)).await.0,
        200,
        "registering again changes nothing"
    );
    assert_eq!(
        http(agg.http, "POST", "/api/devices/rv/revoke", None)
            .await
            .0,
        200,
        "revoke over HTTP"
    );
    assert_eq!(
        http(agg.http, "POST", "/api/devices/nobody/revoke", None)
            .await
            .0,
        404
    );

    let key = agg.public_key;
    let port = broker.port();
    let foreign = Signer::generate().expect("key").0;
    let mut s = Device::connect(port, "rej", stranger, key, "j").await;
    let mut r = Device::connect(port, "rej", revoked, key, "j").await;
    let mut d1 = Device::connect(port, "rej", g1, key, "j").await;
    let mut d2 = Device::connect(port, "rej", g2, key, "j").await;
    let mut d3 = Device::connect(port, "rej", g3, key, "j").await;
    // As real devices do: act on the announcement (the aggregator subscribes before it).
    for d in [&mut s, &mut r, &mut d1, &mut d2, &mut d3] {
        d.announce("j", 1).await;
    }
    let rejected = |r: Reason| Outcome::Rejected(r);

    let (seq, w) = s.seal_update("j", 1, 5, &good(0, 1));
    expect(
        &mut s,
        "j",
        seq,
        w,
        rejected(Reason::UnknownSender),
        "unknown device",
    )
    .await;
    let (seq, w) = r.seal_update("j", 1, 5, &good(0, 1));
    expect(
        &mut r,
        "j",
        seq,
        w,
        rejected(Reason::Revoked),
        "revoked device",
    )
    .await;

    let w = seal(
        &foreign,
        "g1",
        Kind::Update,
        1,
        1,
        &update_payload("j", 1, 0, 5, &good(1, 1)),
    );
    expect(
        &mut d1,
        "j",
        1,
        w,
        rejected(Reason::BadSignature),
        "bad signature",
    )
    .await;
    d1.seq = 1;
    let w = seal(&d1.signer, "g1", Kind::Telemetry, 2, 1, b"not an update");
    expect(
        &mut d1,
        "j",
        2,
        w,
        rejected(Reason::WrongKind),
        "telemetry on the update topic",
    )
    .await;
    d1.seq = 2;
    let w = seal(&d1.signer, "g1", Kind::Update, 3, 1, b"\xff\xff\xff");
    expect(
        &mut d1,
        "j",
        3,
        w,
        rejected(Reason::Malformed),
        "garbage payload",
    )
    .await;
    d1.seq = 3;
    let w = vec![1u8; 10_000];
    expect(
        &mut d1,
        "j",
        0,
        w,
        rejected(Reason::Oversize),
        "oversize envelope",
    )
    .await;

    let cases: [(&str, Vec<u8>, u64, Reason); 5] = [
        (
            "wrong shape",
            f32_codec(&[0.1; N - 1]),
            1,
            Reason::WrongShape,
        ),
        (
            "NaN",
            f32_codec(&[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            1,
            Reason::NonFinite,
        ),
        (
            "Inf",
            f32_codec(&[0.0, 0.0, f32::INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0]),
            1,
            Reason::NonFinite,
        ),
        (
            "norm above bound",
            f32_codec(&[5.0; N]),
            1,
            Reason::NormAboveBound,
        ),
        ("wrong round", good(1, 2), 2, Reason::WrongRound),
    ];
    let mut last = (0, Vec::new());
    for (case, delta, round, reason) in cases {
        let (seq, w) = d1.seal_update("j", round, 5, &delta);
        expect(&mut d1, "j", seq, w.clone(), rejected(reason), case).await;
        last = (seq, w);
    }
    let (seq, w) = last;
    let case = "retransmission of a refused update gets the same answer";
    expect(&mut d1, "j", seq, w, rejected(Reason::WrongRound), case).await;
    let seq = d1.seq + 1;
    let w = seal(
        &d1.signer,
        "g1",
        Kind::Update,
        seq,
        1,
        &update_payload("k", 1, 0, 5, &good(1, 1)),
    );
    d1.seq = seq;
    expect(
        &mut d1,
        "j",
        seq,
        w,
        rejected(Reason::WrongJob),
        "update naming another job",
    )
    .await;

    let (seq, w) = d1.seal_update("j", 1, 5, &good(1, 1));
    expect(
        &mut d1,
        "j",
        seq,
        w.clone(),
        Outcome::Accepted,
        "valid update",
    )
    .await;
    expect(&mut d1, "j", seq, w, Outcome::Duplicate, "retransmission").await;
    let (seq, w) = d1.seal_update("j", 1, 5, &good(1, 1));
    expect(
        &mut d1,
        "j",
        seq,
        w,
        rejected(Reason::Duplicate),
        "second update for the round",
    )
    .await;
    let w = seal(
        &d1.signer,
        "g1",
        Kind::Update,
        4,
        1,
        &update_payload("j", 1, 0, 5, &good(1, 1)),
    );
    expect(
        &mut d1,
        "j",
        4,
        w,
        rejected(Reason::Replay),
        "old sequence number",
    )
    .await;

    let sampled = get_json(agg.http, "/api/jobs/sampled").await;
    let selection: Selection =
        serde_json::from_value(sampled["open_round"]["selection"].clone()).expect("selection");
    let out = [&mut d1, &mut d2, &mut d3]
        .into_iter()
        .find(|d| !selection.includes("sampled", 1, &d.id))
        .expect("seed 7 leaves one of g1..g3 out");
    let (seq, w) = out.seal_update("sampled", 1, 5, &good(1, 1));
    expect(
        out,
        "sampled",
        seq,
        w,
        rejected(Reason::NotSelected),
        "device not selected",
    )
    .await;

    for (i, d) in [(2, &mut d2), (3, &mut d3)] {
        let (seq, w) = d.seal_update("j", 1, 5, &good(i, 1));
        expect(d, "j", seq, w, Outcome::Accepted, "valid update").await;
    }
    let a = d2.announce("j", 2).await;
    assert_eq!(
        a.round, 2,
        "round 1 closed once all three selected devices reported"
    );
    let (seq, w) = d2.seal_update("j", 1, 5, &good(2, 1));
    expect(
        &mut d2,
        "j",
        seq,
        w,
        rejected(Reason::Late),
        "update for a closed round",
    )
    .await;

    let want: BTreeMap<&str, u64> = [
        ("unknown_sender", 1),
        ("revoked", 1),
        ("bad_signature", 1),
        ("wrong_kind", 1),
        ("malformed", 1),
        ("oversize", 1),
        ("wrong_shape", 1),
        ("non_finite", 2),
        ("norm_above_bound", 1),
        ("wrong_round", 2),
        ("wrong_job", 1),
        ("duplicate", 2),
        ("replay", 1),
        ("not_selected", 1),
        ("late", 1),
    ]
    .into();
    let status = get_json(agg.http, "/status").await;
    for (reason, n) in &want {
        assert_eq!(
            status["updates"]["rejected"][reason].as_u64(),
            Some(*n),
            "/status rejected.{reason}"
        );
    }
    assert_eq!(
        status["updates"]["rejected_total"].as_u64(),
        Some(want.values().sum()),
        "/status rejected_total"
    );
    assert_eq!(status["updates"]["accepted"]["j"], 3);
    assert_eq!(status["devices"]["revoked"], 1);
    let (code, metrics) = http(agg.http, "GET", "/metrics", None).await;
    assert_eq!(code, 200);
    for r in Reason::ALL {
        let n = want.get(r.as_str()).copied().unwrap_or(0);
        let line = format!(
            "fedge_aggregator_updates_rejected_total{{reason=\"{}\"}} {n}\n",
            r.as_str()
        );
        assert!(metrics.contains(&line), "/metrics lacks {line:?}");
    }
    assert!(metrics.contains("fedge_aggregator_updates_accepted_total{job=\"j\"} 3\n"));
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_updates_are_down_weighted_by_staleness_when_the_policy_says_so() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("late_updates_are_down_weighted", &e),
    };
    let (g1, g2, g3) = (
        Identity::new("g1"),
        Identity::new("g2"),
        Identity::new("g3"),
    );
    let job = JobSpec::parse(
        "id = \"j\"\nrounds = 2\nmin_devices = 2\nmodel = { zeros = 8 }\n\
         late_policy = { down_weight = { max_staleness = 1, exponent = 1.0 } }",
        1 << 20,
    )
    .expect("job");
    let dir = temp_dir("downweight");
    let mut cfg = common::config("late", &dir, Some(broker.url()), &[&g1, &g2], vec![job]);
    // Through a shared subscription, as workers sharing a job subscribe.
    cfg.broker.share_group = Some("fedge-agg".into());
    let agg = Running::start(cfg).await;
    let body = format!(
        "{{\"id\":\"g3\",\"public_key\":\"{}\"}}",
        g3.signer.public_key()
    );
    assert_eq!(
        http(agg.http, "POST", "/api/devices", Some(&body)).await.0,
        201
    );

    let port = broker.port();
    let mut devs = Vec::new();
    for id in [g1, g2, g3] {
        let mut d = Device::connect(port, "late", id, agg.public_key, "j").await;
        d.announce("j", 1).await;
        devs.push(d);
    }
    for (i, d) in devs.iter_mut().take(2).enumerate() {
        let (seq, w) = d.seal_update("j", 1, 10, &good(i, 1));
        expect(d, "j", seq, w, Outcome::Accepted, "round 1").await;
    }
    let a = devs[2].announce("j", 2).await;
    let global1 = devs[2].fetch_model("j", &a).await;
    let (seq, w) = devs[2].seal_update("j", 1, 10, &good(9, 1));
    devs[2].publish_update("j", w).await;
    let ack = devs[2].ack(seq).await;
    assert_eq!(
        ack.outcome,
        Outcome::Accepted,
        "stale update: {}",
        ack.detail
    );
    assert!(ack.detail.contains("staleness 1"), "{}", ack.detail);
    for (i, d) in devs.iter_mut().enumerate() {
        let (seq, w) = d.seal_update("j", 2, 10, &good(i, 2));
        expect(d, "j", seq, w, Outcome::Accepted, "round 2").await;
    }
    let a = devs[0].announce("j", 3).await;
    let got = devs[0].fetch_model("j", &a).await;

    let zeros = vec![0.0f32; N];
    let mut fedavg = fedge_fl::FedAvg::new();
    let r1: Vec<(String, u64, Vec<f32>)> = (0..2)
        .map(|i| (format!("g{}", i + 1), 10, delta(i, 1, N)))
        .collect();
    let want1 = common::expected_round(&mut fedavg, 1, &zeros, &r1);
    assert_eq!(bits(&global1), bits(&want1), "round 1 model");
    use fedge_fl::{ClientUpdate, Strategy};
    let with = |d: &[f32]| fedge_fl::apply_delta(&want1, d).expect("delta");
    fedavg.begin(2, &want1).expect("begin");
    for u in [
        ClientUpdate::new("g1", 10, with(&delta(0, 2, N))),
        ClientUpdate::new("g2", 10, with(&delta(1, 2, N))),
        ClientUpdate::new("g3@1", 10, with(&delta(9, 1, N))).with_staleness_weight(0.5),
        ClientUpdate::new("g3", 10, with(&delta(2, 2, N))),
    ] {
        fedavg.accumulate(u).expect("accumulate");
    }
    let want2 = fedavg.finish(0).expect("finish").expect("model");
    assert_eq!(
        bits(&got),
        bits(&want2),
        "round 2 counts the stale update at weight 10 x 2^-1"
    );
    let rounds = get_json(agg.http, "/api/jobs/j/rounds").await;
    assert_eq!(
        (rounds[1]["accepted"].as_u64(), rounds[1]["stale"].as_u64()),
        (Some(4), Some(1))
    );
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
