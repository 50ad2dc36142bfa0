//! Full rounds against a real Mosquitto: simulated devices with their own keys, registered,
//! receiving the announcement, fetching the model chunks and sending signed updates.

mod common;

use common::{Announce, Device, Running, bits, delta, expected_round, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::{Outcome, Phase};
use fedge_tests::mosquitto::Mosquitto;

const PARAMS: usize = 300;

fn initial() -> Vec<f32> {
    (0..PARAMS).map(|i| (i as f32 * 0.01).sin()).collect()
}

fn samples(i: usize) -> u64 {
    10 + 7 * i as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_complete_three_rounds_and_the_models_equal_fedavg_computed_directly() {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => return fedge_tests::skip("twenty_devices_complete_three_rounds", &e),
    };
    let ids = identities(20);
    let job = JobSpec::parse(
        &format!(
            "id = \"digits\"\nrounds = 3\nmin_devices = 20\ndeadline_ms = 60000\nchunk_size = 512\nmodel = {{ params = {:?} }}",
            initial()
        ),
        1 << 20,
    )
    .expect("job");
    let dir = temp_dir("twenty");
    let cfg = common::config(
        "f20",
        &dir,
        Some(broker.url()),
        &ids.iter().collect::<Vec<_>>(),
        vec![job],
    );
    let agg = Running::start(cfg).await;

    let mut expected = vec![initial()];
    let mut fedavg = fedge_fl::FedAvg::new();
    for round in 1..=3u64 {
        let updates: Vec<(String, u64, Vec<f32>)> = ids
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), samples(i), delta(i, round, PARAMS)))
            .collect();
        let prev = expected.last().expect("model").clone();
        expected.push(expected_round(&mut fedavg, round, &prev, &updates));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let (expected, key, port) = (expected.clone(), agg.public_key, broker.port());
        tasks.spawn(async move {
            let mut dev = Device::connect(port, "f20", id, key, "digits").await;
            for round in 1..=3u64 {
                let a: Announce = dev.announce("digits", round).await;
                assert_eq!(
                    (a.round, a.phase, a.version),
                    (round, Phase::Open, round - 1),
                    "{}",
                    dev.id
                );
                let model = dev.fetch_model("digits", &a).await;
                assert_eq!(
                    bits(&model),
                    bits(&expected[round as usize - 1]),
                    "{}: model of round {round}",
                    dev.id
                );
                let d = fedge_fl::Codec::F32
                    .encode(&delta(i, round, PARAMS))
                    .expect("encode");
                let (seq, wire) = dev.seal_update("digits", round, samples(i), &d);
                dev.publish_update("digits", wire).await;
                let ack = dev.ack(seq).await;
                assert_eq!(
                    ack.outcome,
                    Outcome::Accepted,
                    "{}: round {round}: {}",
                    dev.id,
                    ack.detail
                );
            }
            let a = dev.announce("digits", 4).await;
            assert_eq!((a.phase, a.version), (Phase::Finished, 3));
            let model = dev.fetch_model("digits", &a).await;
            assert_eq!(bits(&model), bits(&expected[3]), "{}: final model", dev.id);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("device task");
    }

    let rounds = common::get_json(agg.http, "/api/jobs/digits/rounds").await;
    let accepted: Vec<u64> = rounds
        .as_array()
        .expect("rounds")
        .iter()
        .map(|r| r["accepted"].as_u64().expect("n"))
        .collect();
    assert_eq!(accepted, [20, 20, 20]);
    let status = common::get_json(agg.http, "/status").await;
    assert_eq!(status["updates"]["accepted"]["digits"], 60);
    assert_eq!(status["jobs"][0]["phase"], "finished");
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
