//! Crash recovery with the real binary: SIGKILL mid-round against Mosquitto, restart on the
//! same data directory, devices resend what was not acknowledged (at-least-once). The round
//! completes with every acknowledged update, none counted twice, and the model is bit-for-bit
//! the one of an uninterrupted run and the one fedge-fl computes directly.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Device, bits, delta, expected_round, get_json, identities, temp_dir};
use fedge_fl::{FedOpt, FedOptOptions, ServerOptimizer};
use fedge_proto::PublicKey;
use fedge_proto::msg::{Outcome, Phase};
use fedge_tests::mosquitto::{Mosquitto, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_fedge-aggregator");
const PARAMS: usize = 100;
const DEVICES: usize = 6;

fn initial() -> Vec<f32> {
    (0..PARAMS).map(|i| (i as f32 * 0.07).cos()).collect()
}

fn aggregator_key(data: &Path) -> PublicKey {
    let out = Command::new(BIN)
        .args(["key", "--data"])
        .arg(data)
        .output()
        .expect("run key");
    assert!(
        out.status.success(),
        "key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PublicKey::from_hex(String::from_utf8_lossy(&out.stdout).trim()).expect("printed key")
}

fn spawn(dir: &Path, broker: &str, http: SocketAddr, log: &str) -> Child {
    let log = std::fs::File::create(dir.join(log)).expect("log file");
    Command::new(BIN)
        .arg("--config")
        .arg(dir.join("aggregator.toml"))
        .arg("--data")
        .arg(dir.join("data"))
        .args(["--broker", broker, "--http", &http.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn aggregator")
}

async fn wait_http(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("aggregator HTTP did not come up on {addr}");
}

fn samples(i: usize) -> u64 {
    20 + i as u64
}

/// Two rounds of FedAdam with six devices; with `kill`, the aggregator is SIGKILLed after
/// three round-2 updates were acknowledged and a fourth was sent. Returns the final model.
async fn scenario(name: &str, kill: bool) -> Option<Vec<f32>> {
    let broker = match Mosquitto::start() {
        Ok(m) => m,
        Err(e) => {
            fedge_tests::skip(name, &e);
            return None;
        }
    };
    let dir = temp_dir(name);
    let ids = identities(DEVICES);
    let key = aggregator_key(&dir.join("data"));
    let mut toml = format!(
        "fleet = \"crash\"\nid = \"agg\"\n[broker]\nclient_id = \"agg-{name}\"\n\n[[jobs]]\nid = \"j\"\nrounds = 2\n\
         min_devices = {DEVICES}\ndeadline_ms = 60000\nstrategy = {{ name = \"fedadam\", eta = 0.05 }}\n\
         model = {{ params = {:?} }}\n",
        initial()
    );
    for d in &ids {
        toml += &format!(
            "\n[[devices]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            d.id,
            d.signer.public_key()
        );
    }
    std::fs::write(dir.join("aggregator.toml"), toml).expect("config");
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut child = spawn(&dir, &broker.url(), http, "first.log");
    wait_http(http).await;

    let mut devs = Vec::new();
    for id in ids {
        devs.push(Device::connect(broker.port(), "crash", id, key, "j").await);
    }
    for round in 1..=2u64 {
        for d in devs.iter_mut() {
            let a = d.announce("j", round).await;
            assert_eq!((a.round, a.phase), (round, Phase::Open));
        }
        let sent_before_kill = if round == 2 { 3 } else { DEVICES };
        let mut wires = Vec::new();
        for (i, d) in devs.iter_mut().enumerate() {
            let codec = fedge_fl::Codec::F32
                .encode(&delta(i, round, PARAMS))
                .expect("encode");
            let (seq, wire) = d.seal_update("j", round, samples(i), &codec);
            if i < sent_before_kill {
                d.publish_update("j", wire.clone()).await;
                let ack = d.ack(seq).await;
                assert_eq!(
                    ack.outcome,
                    Outcome::Accepted,
                    "{} round {round}: {}",
                    d.id,
                    ack.detail
                );
            }
            wires.push((seq, wire));
        }
        if round == 1 {
            continue;
        }
        devs[3].publish_update("j", wires[3].1.clone()).await;
        if kill {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            child = spawn(&dir, &broker.url(), http, "second.log");
            wait_http(http).await;
            let rounds = get_json(http, "/api/jobs/j/rounds").await;
            let open = &rounds[1];
            assert!(
                open["closed_unix_ms"].is_null(),
                "round 2 is still open after the restart"
            );
            let resumed = open["accepted"].as_u64().expect("accepted");
            assert!(
                (3..=4).contains(&resumed),
                "the store holds the 3 acknowledged updates (and maybe dev-03's): {resumed}"
            );
        }
        let ack = devs[3].send_until_acked("j", wires[3].0, &wires[3].1).await;
        assert!(
            matches!(ack.outcome, Outcome::Accepted | Outcome::Duplicate),
            "dev-03: {ack:?}"
        );
        let ack = devs[0].send_until_acked("j", wires[0].0, &wires[0].1).await;
        assert_eq!(
            ack.outcome,
            Outcome::Duplicate,
            "an acknowledged update is never counted twice"
        );
        for i in 4..DEVICES {
            let ack = devs[i].send_until_acked("j", wires[i].0, &wires[i].1).await;
            assert_eq!(ack.outcome, Outcome::Accepted, "dev-0{i}: {}", ack.detail);
        }
    }
    let a = devs[0].announce("j", 3).await;
    assert_eq!((a.phase, a.version), (Phase::Finished, 2));
    let model = devs[0].fetch_model("j", &a).await;
    let rounds = get_json(http, "/api/jobs/j/rounds").await;
    let accepted: Vec<u64> = rounds
        .as_array()
        .expect("rounds")
        .iter()
        .map(|r| r["accepted"].as_u64().expect("n"))
        .collect();
    assert_eq!(
        accepted, [DEVICES as u64; 2],
        "every update counted exactly once"
    );
    child.kill().expect("stop");
    child.wait().expect("reap");
    std::fs::remove_dir_all(dir).expect("cleanup");
    Some(model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_resumes_with_every_acknowledged_update_and_the_same_model() {
    let Some(killed) = scenario("killed", true).await else {
        return;
    };
    let Some(uninterrupted) = scenario("uninterrupted", false).await else {
        return;
    };
    assert_eq!(
        bits(&killed),
        bits(&uninterrupted),
        "killed run differs from the uninterrupted one"
    );

    let mut adam = FedOpt::new(
        ServerOptimizer::Adam,
        FedOptOptions {
            eta: 0.05,
            ..FedOptOptions::adam()
        },
    )
    .expect("adam");
    let mut global = initial();
    for round in 1..=2u64 {
        let updates: Vec<(String, u64, Vec<f32>)> = (0..DEVICES)
            .map(|i| (format!("dev-{i:02}"), samples(i), delta(i, round, PARAMS)))
            .collect();
        global = expected_round(&mut adam, round, &global, &updates);
    }
    assert_eq!(
        bits(&killed),
        bits(&global),
        "differs from FedAdam computed with fedge-fl"
    );
}
