//! `fedge rollout` against a real Mosquitto and 10 real agents: a good bundle rolls out in waves
//! to every device; a bundle that fails its self-test aborts at the threshold and every device
//! stays on (or goes back to) the previous version; an operator abort takes a device that already
//! runs the new bundle back to the old one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TempDir, fedge, ok, operator_keys};
use fedge_proto::envelope::decode;
use fedge_proto::msg::{Command, Status};
use fedge_proto::{Envelope, Kind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::oneshot;

const FLEET: &str = "plant";
const DEVICES: usize = 10;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn zoo(name: &str) -> PathBuf {
    fedge_tests::repo_root().join("models/zoo").join(name)
}

fn bundle(t: &TempDir, version: u64, bad: bool) -> String {
    let out = t.join(&format!("v{version}.bundle"));
    let model = zoo("ppocr_cls_dyn").join("model.onnx");
    let mut args = vec![
        "bundle".to_string(),
        "build".into(),
        s(&model),
        "--name".into(),
        "cls".into(),
        "--version".into(),
        version.to_string(),
        "--key".into(),
        s(&t.join("ops/operator.key")),
        "--out".into(),
        s(&out),
        "--tolerance".into(),
        if bad { "0" } else { "5e-2" }.into(),
    ];
    if bad {
        // Another model's reference outputs: the self-test cannot pass on a device.
        args.extend([
            "--test-vector".into(),
            s(&zoo("ppocr_cls_qdq").join("io.npz")),
            "--no-self-test".into(),
        ]);
    }
    ok(&args);
    s(&out)
}

fn agent_config(t: &TempDir, id: &str, url: &str, op_pub: &str) -> fedge_agent::Config {
    let dir = t.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let toml = format!(
        "device_id = \"{id}\"\nfleet = \"{FLEET}\"\noperator_key = \"{op_pub}\"\n\
         data_dir = {:?}\n\n[broker]\nurl = \"{url}\"\nbackoff_initial_ms = 100\n\
         backoff_max_ms = 1000\nkeep_alive_s = 5\n",
        dir.join("data"),
    );
    std::fs::write(dir.join("agent.toml"), toml).unwrap();
    fedge_agent::Config::load(&dir.join("agent.toml")).unwrap()
}

/// Runs `fedge` off the async runtime (the agents live on it).
async fn fedge_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || fedge(&args))
        .await
        .unwrap()
}

fn state(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn device_states(st: &serde_json::Value) -> BTreeMap<String, (u64, String)> {
    st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                (
                    d["wave"].as_u64().unwrap(),
                    d["phase"]["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The retained statuses and desired states of the fleet, as a console sees them.
async fn retained(
    port: u16,
    op: &fedge_proto::PublicKey,
) -> (BTreeMap<String, Option<u64>>, BTreeMap<String, u64>) {
    let mut mo = MqttOptions::new(format!("console-{}", rand_id()), "127.0.0.1", port);
    mo.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(mo, 64);
    client
        .subscribe(format!("fedge/v1/{FLEET}/dev/+/status"), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe(format!("fedge/v1/{FLEET}/dev/+/desired"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (mut status, mut desired) = (BTreeMap::new(), BTreeMap::new());
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = el.poll().await {
                let device = p.topic.split('/').nth(4).unwrap().to_string();
                if p.payload.is_empty() {
                    continue;
                }
                let u = Envelope::open(&p.payload, 1 << 20).unwrap();
                if p.topic.ends_with("/status") {
                    let env = u
                        .verify_self_signed(|b| decode::<Status<'_>>(b).ok().map(|s| s.public_key))
                        .unwrap();
                    let st: Status<'_> = decode(env.payload).unwrap();
                    status.insert(device, st.model.map(|m| m.version));
                } else {
                    assert_eq!(u.kind(), Kind::Command);
                    let env = u.verify(op).expect("signed by the operator");
                    if let Command::Install { version, .. } = decode(env.payload).unwrap() {
                        desired.insert(device, version);
                    }
                }
            }
        }
    })
    .await;
    (status, desired)
}

fn rand_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000
}

async fn until(what: &str, secs: u64, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

fn rollout_args(t: &TempDir, bundle: &str, url: &str, st: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "rollout",
        "start",
        bundle,
        "--key",
        &s(&t.join("ops/operator.key")),
        "--broker",
        url,
        "--group",
        FLEET,
        "--state",
        &s(st),
        "--discover",
        "2s",
        "--install-timeout",
        "60s",
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_roll_out_in_waves_and_a_failing_one_aborts_and_rolls_back() {
    if fedge_tests::mosquitto::binary().is_none() {
        return fedge_tests::skip("rollout", "mosquitto is not installed");
    }
    let t = TempDir::new("rollout");
    let op_pub = operator_keys(&t.join("ops"));
    let op_key = fedge_proto::PublicKey::from_hex(&op_pub).unwrap();
    let mosq = fedge_tests::mosquitto::Mosquitto::start().expect("mosquitto");
    let url = mosq.url();
    let port = mosq.port();
    let (v1, v2, v3_bad, v4) = (
        bundle(&t, 1, false),
        bundle(&t, 2, false),
        bundle(&t, 3, true),
        bundle(&t, 4, false),
    );

    // Ten real agents with empty model stores.
    let mut stops = Vec::new();
    let mut agents = Vec::new();
    for i in 0..DEVICES {
        let cfg = agent_config(&t, &format!("dev-{i:02}"), &url, &op_pub);
        let service = fedge_agent::Service::open(cfg).expect("agent");
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        agents.push(tokio::spawn(service.run(async move {
            let _ = stopped.await;
        })));
    }
    until("ten online agents", 30, async || {
        retained(port, &op_key).await.0.len() == DEVICES
    })
    .await;

    // 1. v1 to every device found on the broker, in two waves.
    let st1 = t.join("r1.json");
    let out = fedge_async(rollout_args(
        &t,
        &v1,
        &url,
        &st1,
        &["--waves", "30%,100%", "--health-window", "1s"],
    ))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = state(&st1);
    assert_eq!(st["phase"], "done");
    let devs = device_states(&st);
    assert_eq!(devs.len(), DEVICES, "every agent discovered");
    assert!(devs.values().all(|(_, p)| p == "updated"), "{devs:?}");
    assert_eq!(
        devs.values().filter(|(w, _)| *w == 0).count(),
        3,
        "30 % first"
    );
    let (status, desired) = retained(port, &op_key).await;
    assert_eq!(status.len(), DEVICES);
    assert!(status.values().all(|v| *v == Some(1)) && desired.values().all(|&v| v == 1));

    // 2. v2 in three waves; status verbs read the state file.
    let st2 = t.join("r2.json");
    let out = fedge_async(rollout_args(
        &t,
        &v2,
        &url,
        &st2,
        &["--waves", "10%,50%,100%", "--health-window", "500ms"],
    ))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = retained(port, &op_key).await;
    assert!(status.values().all(|v| *v == Some(2)), "{status:?}");
    let text = ok(&["rollout", "status", "--state", &s(&st2)]);
    assert!(text.contains("Done") && text.contains("cls v1"), "{text}");

    // 3. A bundle that fails its self-test: the first wave (2 of 10) fails, above 10 %: abort.
    // No device takes it; the failed wave's desired state is v2 again; wave 2 never starts.
    let st3 = t.join("r3.json");
    let out = fedge_async(rollout_args(
        &t,
        &v3_bad,
        &url,
        &st3,
        &[
            "--waves",
            "20%,100%",
            "--abort-above",
            "10%",
            "--health-window",
            "1s",
        ],
    ))
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The rollout aborts as soon as the share is exceeded: after the first failure (1 of 2 is
    // above 10 %) or, if both reported at once, the second.
    assert!(
        err.contains("rollout aborted: 1 of 2 devices in wave 1 failed")
            || err.contains("rollout aborted: 2 of 2 devices in wave 1 failed"),
        "{err}"
    );
    let st = state(&st3);
    assert_eq!(st["phase"], "aborted");
    let mut failed = 0;
    for (id, (wave, phase)) in device_states(&st) {
        if wave == 0 {
            // Failed, or still installing when the abort came (then given v2 back).
            assert!(phase == "failed" || phase == "rolled_back", "{id}: {phase}");
            failed += usize::from(phase == "failed");
        } else {
            assert_eq!(phase, "pending", "{id}: wave 2 never starts");
        }
    }
    assert!(failed >= 1);
    let detail = st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["phase"]["state"] == "failed")
        .unwrap()["phase"]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.starts_with("self_test_failed"), "{detail}");
    // A device still on its way to v3 fails its self-test too: every device stays on v2.
    until("every device on v2", 60, async || {
        retained(port, &op_key)
            .await
            .0
            .values()
            .all(|v| *v == Some(2))
    })
    .await;
    let (status, desired) = retained(port, &op_key).await;
    assert!(status.values().all(|v| *v == Some(2)), "{status:?}");
    assert!(desired.values().all(|&v| v == 2), "{desired:?}");

    // 4. A good v4 with a long health window: once the first device runs it, the operator
    // pauses, looks, resumes and aborts; that device goes back to v2.
    let st4 = t.join("r4.json");
    let args = rollout_args(
        &t,
        &v4,
        &url,
        &st4,
        &["--waves", "10%,100%", "--health-window", "5s"],
    );
    let running = tokio::spawn(fedge_async(args));
    until("the first wave on v4", 60, async || {
        st4.exists()
            && device_states(&state(&st4))
                .values()
                .any(|(_, p)| p == "updated")
    })
    .await;
    ok(&["rollout", "pause", "--state", &s(&st4)]);
    let out = running.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(&st4)["phase"], "paused");
    let running = tokio::spawn(fedge_async(
        ["rollout", "resume", "--state", &s(&st4)]
            .map(String::from)
            .to_vec(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = ok(&["rollout", "abort", "--state", &s(&st4)]);
    assert!(text.contains("aborted"), "{text}");
    let out = running.await.unwrap();
    assert!(
        !out.status.success(),
        "a resumed rollout that is aborted exits non-zero"
    );
    let st = state(&st4);
    assert_eq!(st["phase"], "aborted");
    until("every device back on v2", 60, async || {
        let (status, _) = retained(port, &op_key).await;
        status.len() == DEVICES && status.values().all(|v| *v == Some(2))
    })
    .await;

    // Errors: a missing state file, an existing one, a tampered bundle, an unreachable broker.
    let e = fedge(&["rollout", "status", "--state", "/nonexistent.json"]);
    assert_eq!(e.status.code(), Some(1));
    let e = fedge_async(rollout_args(&t, &v2, &url, &st2, &[])).await;
    assert!(String::from_utf8_lossy(&e.stderr).contains("exists"));
    let mut bytes = std::fs::read(&v2).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(t.join("bad.bundle"), bytes).unwrap();
    let e = fedge_async(rollout_args(
        &t,
        &s(&t.join("bad.bundle")),
        &url,
        &t.join("x.json"),
        &[],
    ))
    .await;
    assert!(String::from_utf8_lossy(&e.stderr).contains("not signed by this operator key"));
    let dead = format!("mqtt://127.0.0.1:{}", fedge_tests::mosquitto::free_port());
    let e = fedge_async(rollout_args(&t, &v2, &dead, &t.join("y.json"), &[])).await;
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("unreachable"));

    for s in stops {
        let _ = s.send(());
    }
    for a in agents {
        a.await.unwrap().expect("agent stopped cleanly");
    }
}

/// Flags are checked before anything is published: one line and a non-zero exit each.
#[test]
fn rollout_flags_and_files_are_checked_first() {
    let t = TempDir::new("rollout-flags");
    operator_keys(&t.join("ops"));
    let good = bundle(&t, 1, false);
    let key = s(&t.join("ops/operator.key"));
    let st = s(&t.join("st.json"));
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = ["rollout", "start", &good, "--key", &key, "--state", &st]
            .map(String::from)
            .to_vec();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    for (extra, why) in [
        (&["--waves", "50%,25%,100%"][..], "must increase"),
        (&["--waves", "10%,50%"], "last wave must be 100%"),
        (&["--health-window", "2 weeks"], "unknown unit \"weeks\""),
        (&["--health-window", "soon"], "not a duration"),
        (&["--install-timeout", "5y"], "unknown unit"),
        (&["--abort-above", "150%"], "between 0% and 100%"),
        (&["--group", "a/b"], "--group"),
        (&["--broker", "http://x"], "mqtt://"),
    ] {
        let out = fedge(&base(extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains(why) && err.trim().lines().count() == 1,
            "{extra:?}: {err}"
        );
    }
    let out = fedge(&[
        "rollout",
        "start",
        "/nonexistent.bundle",
        "--key",
        &key,
        "--state",
        &st,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.bundle"));
    let out = fedge(&["rollout", "start", &good, "--state", &st]);
    assert_eq!(out.status.code(), Some(2), "--key is required");
    for verb in ["status", "pause", "resume", "abort"] {
        let out = fedge(&["rollout", verb, "--state", &st]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        assert!(err.contains("rollout state"), "{verb}: {err}");
    }
    assert!(!t.join("st.json").exists(), "nothing written");
}
