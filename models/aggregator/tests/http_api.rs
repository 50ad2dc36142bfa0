//! The JSON API the fleet CLI uses: jobs created over HTTP run like configured ones.

mod common;

use common::{Device, Running, bits, delta, expected_round, get_json, http, identities, temp_dir};
use fedge_proto::msg::{Outcome, Reason};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_created_over_http_runs_and_its_rounds_model_and_metrics_are_served() {
    let ids = identities(2);
    let dir = temp_dir("http");
    let cfg = common::config(
        "api",
        &dir,
        None,
        &ids.iter().collect::<Vec<_>>(),
        Vec::new(),
    );
    let agg = Running::start(cfg).await;

    let job = "id = \"lin\"\nrounds = 1\nmin_devices = 2\nmodel = { params = [1.0, 2.0, 3.0] }\n";
    let (code, body) = http(agg.http, "POST", "/api/jobs", Some(job)).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        http(agg.http, "POST", "/api/jobs", Some(job)).await.0,
        409,
        "same id again"
    );
    let bad = [
        (
            "{\"id\": \"x\", \"model\": {\"zeros\": 3}, \"fraction\": 2.0}",
            "fraction out of range",
        ),
        (
            "id = \"x\"\nmodel = { zeros = 3 }\nstrategy = { name = \"fedsomething\" }",
            "unknown strategy",
        ),
        (
            "id = \"x\"\nmodel = { zeros = 3 }\nstrategy = { name = \"fedavg\", eta = 1.0 }",
            "foreign parameter",
        ),
        ("not toml at all = = =", "unparsable"),
    ];
    for (text, why) in bad {
        let (code, body) = http(agg.http, "POST", "/api/jobs", Some(text)).await;
        assert_eq!(code, 400, "{why}: {body}");
    }
    let jobs = get_json(agg.http, "/api/jobs").await;
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
    assert_eq!(jobs[0]["open_round"]["round"], 1);
    let devices = get_json(agg.http, "/api/devices").await;
    assert!(
        devices
            .as_array()
            .expect("list")
            .iter()
            .all(|d| d["last_seq"].is_null())
    );

    let mut devs = Vec::new();
    for id in ids {
        let mut d = Device::connect(agg.broker_port, "api", id, agg.public_key, "lin").await;
        let a = d.announce("lin", 1).await;
        assert_eq!(a.param_count, 3);
        devs.push(d);
    }
    let f16 = fedge_fl::Codec::F16
        .encode(&delta(0, 1, 3))
        .expect("encode");
    let (seq, wire) = devs[0].seal_update("lin", 1, 3, &f16);
    devs[0].publish_update("lin", wire).await;
    let ack = devs[0].ack(seq).await;
    assert_eq!(
        ack.outcome,
        Outcome::Rejected(Reason::Malformed),
        "an f16 update on an f32 job"
    );
    let mut sent = Vec::new();
    for (i, d) in devs.iter_mut().enumerate() {
        let encoded = fedge_fl::Codec::F32
            .encode(&delta(i, 1, 3))
            .expect("encode");
        let (seq, wire) = d.seal_update("lin", 1, 3, &encoded);
        d.publish_update("lin", wire).await;
        let ack = d.ack(seq).await;
        assert_eq!(ack.outcome, Outcome::Accepted, "{}", ack.detail);
        sent.push((d.id.clone(), 3, delta(i, 1, 3)));
    }
    let want = expected_round(&mut fedge_fl::FedAvg::new(), 1, &[1.0, 2.0, 3.0], &sent);
    let mut model = serde_json::Value::Null;
    for _ in 0..500 {
        model = get_json(agg.http, "/api/jobs/lin/model").await;
        if model["version"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(model["version"], 1, "round 1 closed");
    let params: Vec<f32> = serde_json::from_value(model["params"].clone()).expect("params");
    assert_eq!(bits(&params), bits(&want));
    let v0 = get_json(agg.http, "/api/jobs/lin/model?version=0").await;
    assert_eq!(v0["params"], serde_json::json!([1.0, 2.0, 3.0]));
    assert_eq!(
        http(agg.http, "GET", "/api/jobs/nope/rounds", None).await.0,
        404
    );

    let rounds = get_json(agg.http, "/api/jobs/lin/rounds").await;
    assert_eq!(rounds[0]["result_sha256"], model["sha256"]);
    let status = get_json(agg.http, "/status").await;
    assert_eq!(status["devices"]["seen"], 2);
    assert_eq!(status["jobs"][0]["phase"], "finished");
    let (_, metrics) = http(agg.http, "GET", "/metrics", None).await;
    for line in [
        "fedge_aggregator_rounds_completed_total{job=\"lin\"} 1\n",
        "fedge_aggregator_model_version{job=\"lin\"} 1\n",
        "fedge_aggregator_job_finished{job=\"lin\"} 1\n",
        "fedge_aggregator_devices_seen 2\n",
        "fedge_aggregator_round_duration_seconds_count 1\n",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line:?}");
    }
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
