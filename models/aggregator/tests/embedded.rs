//! The embedded rumqttd broker: nothing installed, the aggregator alone is the server.

mod common;

use common::{Device, Running, bits, delta, expected_round, get_json, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::{Outcome, Phase};

const PARAMS: usize = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_complete_rounds_through_the_embedded_broker() {
    let ids = identities(4);
    let job = JobSpec::parse(
        "id = \"kws\"\nrounds = 2\nmin_devices = 4\ncodec = \"int8\"\nchunk_size = 1000\nmodel = { zeros = 700 }",
        1 << 20,
    )
    .expect("job");
    let dir = temp_dir("embedded");
    let cfg = common::config(
        "emb",
        &dir,
        None,
        &ids.iter().collect::<Vec<_>>(),
        vec![job],
    );
    let agg = Running::start(cfg).await;
    let status = get_json(agg.http, "/status").await;
    assert!(
        status["aggregator"]["broker"]
            .as_str()
            .expect("url")
            .starts_with("mqtt://127.0.0.1:")
    );

    let mut devs = Vec::new();
    for id in ids {
        devs.push(Device::connect(agg.broker_port, "emb", id, agg.public_key, "kws").await);
    }
    let mut global = vec![0.0f32; PARAMS];
    let mut fedavg = fedge_fl::FedAvg::new();
    for round in 1..=2u64 {
        let mut sent = Vec::new();
        for (i, d) in devs.iter_mut().enumerate() {
            let a = d.announce("kws", round).await;
            assert_eq!(
                (a.round, a.phase, a.manifest.chunk_count),
                (round, Phase::Open, 3)
            );
            assert_eq!(
                bits(&d.fetch_model("kws", &a).await),
                bits(&global),
                "{} round {round}",
                d.id
            );
            let encoded = fedge_fl::Codec::int8()
                .encode(&delta(i, round, PARAMS))
                .expect("encode");
            let (seq, wire) = d.seal_update("kws", round, 5 + i as u64, &encoded);
            d.publish_update("kws", wire).await;
            let ack = d.ack(seq).await;
            assert_eq!(ack.outcome, Outcome::Accepted, "{}: {}", d.id, ack.detail);
            sent.push((
                d.id.clone(),
                5 + i as u64,
                fedge_fl::decode(&encoded).expect("decode"),
            ));
        }
        global = expected_round(&mut fedavg, round, &global, &sent);
    }
    let a = devs[0].announce("kws", 3).await;
    assert_eq!(a.phase, Phase::Finished);
    assert_eq!(
        bits(&devs[0].fetch_model("kws", &a).await),
        bits(&global),
        "final model"
    );
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
