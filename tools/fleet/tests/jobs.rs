//! `fedge job start|stop|status` and `fedge rounds` against a running aggregator: a job started
//! from a TOML spec runs rounds with three devices; the round history shows selected, accepted
//! and rejected updates, the devices' reported accuracy and loss, and ε; stopping finishes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "../../../models/aggregator/tests/common/mod.rs"]
mod agg;

use agg::{Device, Running, identities};
use common::{TempDir, fails, ok};
use fedge_proto::msg::{Outcome, Reason};

const FLEET: &str = "jobs";

async fn fedge_ok(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || ok(&args))
        .await
        .unwrap()
}

async fn fedge_fails(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || fails(&args))
        .await
        .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn encode(v: &[f32]) -> Vec<u8> {
    fedge_fl::Codec::F32.encode(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_start_run_report_their_rounds_and_stop() {
    let t = TempDir::new("jobs");
    let ids = identities(3);
    let cfg = agg::config(
        FLEET,
        &t.join("agg"),
        None,
        &ids.iter().collect::<Vec<_>>(),
        vec![],
    );
    let running = Running::start(cfg).await;
    let api = format!("http://{}", running.http);
    let spec = t.join("job.toml");
    std::fs::write(
        &spec,
        "id = \"digits\"\nrounds = 3\nmin_devices = 3\nmodel = { zeros = 8 }\n\
         deadline_ms = 60000\nhyper = { clip_norm = 1.0, noise_multiplier = 1.1 }\n",
    )
    .unwrap();
    let spec_s = spec.to_string_lossy().into_owned();

    let out = fedge_ok(args(&[
        "job",
        "start",
        &spec_s,
        "--aggregator",
        &api,
        "--json",
    ]))
    .await;
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (job["id"].as_str(), job["phase"].as_str()),
        (Some("digits"), Some("running"))
    );
    assert_eq!(job["round"], 1);
    let again = fedge_fails(args(&["job", "start", &spec_s, "--aggregator", &api])).await;
    assert!(again.contains("409") && again.contains("digits"), "{again}");

    // Two rounds with three devices; in round 1 one update of the wrong shape is refused.
    let key = running.public_key;
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Device::connect(running.broker_port, FLEET, id, key, "digits").await);
    }
    for round in 1..=2u64 {
        for (i, d) in devices.iter_mut().enumerate() {
            d.announce("digits", round).await;
            if round == 1 && i == 0 {
                let (seq, w) = d.seal_update("digits", 1, 10, &encode(&[0.0; 5]));
                let ack = d.send_until_acked("digits", seq, &w).await;
                assert_eq!(ack.outcome, Outcome::Rejected(Reason::WrongShape));
            }
            let (seq, w) = d.seal_update("digits", round, 10, &encode(&agg::delta(i, round, 8)));
            assert_eq!(
                d.send_until_acked("digits", seq, &w).await.outcome,
                Outcome::Accepted
            );
        }
    }
    devices[0].announce("digits", 3).await;

    let out = fedge_ok(args(&["rounds", "digits", "--aggregator", &api, "--json"])).await;
    let rounds: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rounds.len(), 3, "{out}");
    for r in &rounds[..2] {
        assert_eq!(
            (r["selected"].as_u64(), r["accepted"].as_u64()),
            (Some(3), Some(3))
        );
        assert!(r["result_sha256"].is_string());
        // Every simulated device reports loss 0.5 and accuracy 0.9 on its own data.
        assert!((r["train_accuracy"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        assert!((r["train_loss"].as_f64().unwrap() - 0.5).abs() < 1e-6);
    }
    assert_eq!(
        (
            rounds[0]["rejected"].as_u64(),
            rounds[1]["rejected"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert!(rounds[2]["closed_unix_ms"].is_null());
    // ε matches the accountant of `fedge dp epsilon` with q = 1 (no amplification by sampling).
    for (r, steps) in [(&rounds[0], "1"), (&rounds[1], "2")] {
        let e = fedge_ok(args(&[
            "dp",
            "epsilon",
            "--noise-multiplier",
            "1.1",
            "--sampling-rate",
            "1",
            "--steps",
            steps,
            "--delta",
            "1e-5",
        ]))
        .await;
        let want: f64 = e.lines().last().unwrap().trim().parse().unwrap();
        assert!(
            // z is an f32 in the job spec (1.1 → 1.10000002): equal to 1e-6 relative.
            (r["epsilon"].as_f64().unwrap() - want).abs() < 1e-6 * want,
            "{r} vs {want}"
        );
    }
    assert!(rounds[1]["epsilon"].as_f64() > rounds[0]["epsilon"].as_f64());

    let svg = t.join("rounds.svg");
    let table = fedge_ok(args(&[
        "rounds",
        "digits",
        "--aggregator",
        &api,
        "--plot",
        &svg.to_string_lossy(),
    ]))
    .await;
    let head = table.lines().next().unwrap();
    for col in [
        "round", "selected", "accepted", "rejected", "accuracy", "loss", "epsilon",
    ] {
        assert!(head.contains(col), "{head}");
    }
    assert!(table.lines().nth(1).unwrap().contains("0.9000"), "{table}");
    assert!(table.lines().nth(3).unwrap().ends_with("open"), "{table}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("<polyline"),
        "{plot}"
    );

    // Stop: the open round closes without a model, the job is finished, devices see Finished.
    let out = fedge_ok(args(&[
        "job",
        "stop",
        "digits",
        "--aggregator",
        &api,
        "--json",
    ]))
    .await;
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["phase"], "finished");
    let status = fedge_ok(args(&["job", "status", "--aggregator", &api])).await;
    assert!(
        status.contains("job digits: finished, round 3 of 3"),
        "{status}"
    );
    let out = fedge_ok(args(&["rounds", "digits", "--aggregator", &api, "--json"])).await;
    let rounds: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rounds[2]["stopped"], true);
    assert!(rounds[2]["closed_unix_ms"].is_u64() && rounds[2]["result_sha256"].is_null());
    // The retained announcement of round 3 turns Finished (an Open one may still be queued).
    let mut phase = devices[1].announce("digits", 3).await.phase;
    for _ in 0..3 {
        if phase == fedge_proto::msg::Phase::Finished {
            break;
        }
        phase = devices[1].announce("digits", 3).await.phase;
    }
    assert_eq!(phase, fedge_proto::msg::Phase::Finished);

    // An ε budget: z = 1.1 spends 4.24 after one round, 6.33 after two and 8.04 after three
    // (δ = 1e-5); with a budget of 7 the job finishes after round 2 instead of opening round 3.
    std::fs::write(
        &spec,
        "id = \"private\"\nrounds = 10\nmin_devices = 3\nmodel = { zeros = 8 }\n\
         dp_epsilon_budget = 7.0\nhyper = { clip_norm = 1.0, noise_multiplier = 1.1 }\n",
    )
    .unwrap();
    // Three fresh devices for it; the first three are revoked so only these are selected.
    let mut private = Vec::new();
    for i in 0..3 {
        fedge_ok(args(&[
            "device",
            "revoke",
            &format!("dev-{i:02}"),
            "--aggregator",
            &api,
        ]))
        .await;
        let id = agg::Identity::new(&format!("p-{i:02}"));
        let body = format!(
            "{{\"id\": \"{}\", \"public_key\": \"{}\"}}",
            id.id,
            id.signer.public_key().to_hex()
        );
        let (code, text) = agg::http(running.http, "POST", "/api/devices", Some(&body)).await;
        assert_eq!(code, 201, "{text}");
        private.push(id);
    }
    fedge_ok(args(&["job", "start", &spec_s, "--aggregator", &api])).await;
    let mut devices = Vec::new();
    for id in private {
        devices.push(Device::connect(running.broker_port, FLEET, id, key, "private").await);
    }
    for round in 1..=2u64 {
        for (i, d) in devices.iter_mut().enumerate() {
            d.announce("private", round).await;
            let (seq, w) = d.seal_update("private", round, 10, &encode(&agg::delta(i, round, 8)));
            assert_eq!(
                d.send_until_acked("private", seq, &w).await.outcome,
                Outcome::Accepted
            );
        }
    }
    let mut job = serde_json::Value::Null;
    for _ in 0..100 {
        let out = fedge_ok(args(&[
            "job",
            "status",
            "private",
            "--aggregator",
            &api,
            "--json",
        ]))
        .await;
        job = serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .remove(0);
        if job["phase"] == "finished" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(job["phase"], "finished", "{job}");
    assert_eq!(job["model_version"], 2);
    assert!(
        (job["epsilon_spent"].as_f64().unwrap() - 6.3274).abs() < 1e-3,
        "{job}"
    );
    assert!(
        job["finish_reason"]
            .as_str()
            .unwrap()
            .starts_with("privacy budget: round 3"),
        "{job}"
    );
    let text = fedge_ok(args(&["job", "status", "private", "--aggregator", &api])).await;
    assert!(
        text.contains("epsilon spent 6.3274 of budget 7.0000"),
        "{text}"
    );
    // A budget the first round already exceeds is refused at creation.
    std::fs::write(
        &spec,
        "id = \"tight\"\nmodel = { zeros = 8 }\ndp_epsilon_budget = 1.0\n\
         hyper = { clip_norm = 1.0, noise_multiplier = 1.1 }\n",
    )
    .unwrap();
    let e = fedge_fails(args(&["job", "start", &spec_s, "--aggregator", &api])).await;
    assert!(
        e.contains("400") && e.contains("one round already spends"),
        "{e}"
    );
    std::fs::write(
        &spec,
        "id = \"nonoise\"\nmodel = { zeros = 8 }\ndp_epsilon_budget = 8.0\n",
    )
    .unwrap();
    let e = fedge_fails(args(&["job", "start", &spec_s, "--aggregator", &api])).await;
    assert!(e.contains("needs noise"), "{e}");

    // Errors: stop twice, unknown job, bad spec, missing file, unreachable aggregator.
    let e = fedge_fails(args(&["job", "stop", "digits", "--aggregator", &api])).await;
    assert!(e.contains("409") && e.contains("already finished"), "{e}");
    let e = fedge_fails(args(&["job", "status", "nobody", "--aggregator", &api])).await;
    assert!(e.contains("404"), "{e}");
    let e = fedge_fails(args(&["rounds", "nobody", "--aggregator", &api])).await;
    assert!(e.contains("404"), "{e}");
    std::fs::write(
        &spec,
        "id = \"bad\"\nmodel = { zeros = 8 }\ndp_delta = 2.0\n",
    )
    .unwrap();
    let e = fedge_fails(args(&["job", "start", &spec_s, "--aggregator", &api])).await;
    assert!(e.contains("400") && e.contains("dp_delta"), "{e}");
    let e = fedge_fails(args(&[
        "job",
        "start",
        "/nonexistent.toml",
        "--aggregator",
        &api,
    ]))
    .await;
    assert!(e.contains("job spec /nonexistent.toml"), "{e}");
    let dead = format!("http://127.0.0.1:{}", fedge_tests::mosquitto::free_port());
    let e = fedge_fails(args(&["job", "status", "--aggregator", &dead])).await;
    assert!(e.contains("unreachable"), "{e}");
    running.stop().await;
}
