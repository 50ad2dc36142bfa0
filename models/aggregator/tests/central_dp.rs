//! Central DP (DP-FedAvg): the aggregator clips, averages with equal weights and adds Gaussian
//! noise of `z·C/n` per coordinate; the round history reports ε from the accountant.

mod common;

use common::{Device, Running, get_json, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::Outcome;

const PARAMS: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_adds_calibrated_noise_to_the_clipped_mean() {
    let ids = identities(4);
    let job = JobSpec::parse(
        "id = \"cdp\"\nrounds = 1\nmin_devices = 4\nmodel = { zeros = 4000 }\n\
         central_dp = { clip_norm = 1.0, noise_multiplier = 2.0 }\ndp_epsilon_budget = 50.0",
        1 << 20,
    )
    .expect("job");
    let dir = temp_dir("central-dp");
    let cfg = common::config(
        "cdp",
        &dir,
        None,
        &ids.iter().collect::<Vec<_>>(),
        vec![job],
    );
    let agg = Running::start(cfg).await;
    let mut devs = Vec::new();
    for id in ids {
        devs.push(Device::connect(agg.broker_port, "cdp", id, agg.public_key, "cdp").await);
    }
    // Device 0 sends a delta of norm 100 (clipped to 1: 0.0158 per coordinate); the others
    // send 0.01 per coordinate (norm 0.63, inside the bound). Sample counts differ and must
    // not matter.
    for (i, d) in devs.iter_mut().enumerate() {
        d.announce("cdp", 1).await;
        let v = if i == 0 {
            100.0 / (PARAMS as f32).sqrt()
        } else {
            0.01
        };
        let encoded = fedge_fl::Codec::F32
            .encode(&vec![v; PARAMS])
            .expect("encode");
        let (seq, wire) = d.seal_update("cdp", 1, 1 + 100 * i as u64, &encoded);
        assert_eq!(
            d.send_until_acked("cdp", seq, &wire).await.outcome,
            Outcome::Accepted
        );
    }
    let mut model = serde_json::Value::Null;
    for _ in 0..200 {
        model = get_json(agg.http, "/api/jobs/cdp/model").await;
        if model["version"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(model["version"], 1);
    let params: Vec<f64> = model["params"]
        .as_array()
        .expect("params")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    // Expected mean: (1/√4000 + 3 × 0.01) / 4; noise stddev z·C/n = 2 × 1 / 4 = 0.5.
    let want = (1.0 / (PARAMS as f64).sqrt() + 0.03) / 4.0;
    let n = params.len() as f64;
    let mean = params.iter().sum::<f64>() / n;
    let sd = (params.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    // 4000 samples: the sample stddev is within 5 % of 0.5 with overwhelming probability
    // (its own stddev is 1.1 %), the mean within 0.04 of `want` (8 standard errors).
    assert!((sd - 0.5).abs() < 0.025, "noise stddev {sd}");
    assert!((mean - want).abs() < 0.04, "mean {mean} vs {want}");

    let rounds = get_json(agg.http, "/api/jobs/cdp/rounds").await;
    let eps = rounds[0]["epsilon"].as_f64().expect("epsilon");
    let mut acc = fedge_fl::dp::RdpAccountant::new();
    acc.compose(
        &fedge_fl::dp::SampledGaussian::new(2.0, 1.0).expect("mechanism"),
        1,
    );
    let (want_eps, _) = acc.epsilon_and_order(1e-5).expect("epsilon");
    assert!((eps - want_eps).abs() < 1e-9, "{eps} vs {want_eps}");
    let job = get_json(agg.http, "/api/jobs/cdp").await;
    assert_eq!(job["epsilon_budget"], 50.0);
    assert!((job["epsilon_spent"].as_f64().expect("spent") - want_eps).abs() < 1e-9);
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}

#[test]
fn central_dp_parameters_are_checked() {
    for (spec, why) in [
        (
            "central_dp = { clip_norm = 0.0, noise_multiplier = 1.0 }",
            "central_dp",
        ),
        (
            "central_dp = { clip_norm = 1.0, noise_multiplier = -1.0 }",
            "central_dp",
        ),
        ("central_dp = { clip_norm = 1.0 }", "noise_multiplier"),
        ("dp_epsilon_budget = 3.0", "needs noise"),
        (
            "strategy = { name = \"fedmedian\" }\ncentral_dp = { clip_norm = 1.0, noise_multiplier = 1.0 }",
            "averaging strategy",
        ),
    ] {
        let text = format!("id = \"x\"\nmodel = {{ zeros = 4 }}\n{spec}");
        let e = JobSpec::parse(&text, 1 << 20)
            .and_then(|j| j.validate(1 << 20).map(|()| j))
            .expect_err(spec)
            .to_string();
        assert!(e.contains(why), "{spec}: {e}");
    }
}
