//! The federated-learning client against the real aggregator on Mosquitto: devices train on
//! their own digits shards and their updates are counted; a device that never answers and one
//! killed mid-round do not stop a round, which closes on the others at its deadline, and the
//! killed device rejoins the next round after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fedge_agent::{Config, Service, Stats};
use fedge_aggregator::config::{DeviceEntry, JobSpec};
use fedge_proto::{PublicKey, Signer};
use fedge_runtime::train::data::{DIGITS_PATH, Dataset, dirichlet_shards, load_digits};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const JOB: &str = "digits";
const WAIT: Duration = Duration::from_secs(60);

fn to_csv(d: &Dataset) -> String {
    let mut s: String = (0..d.features).map(|f| format!("f{f},")).collect();
    s.push_str("label\n");
    for (i, y) in d.y.iter().enumerate() {
        let row: Vec<String> = d.row(i).iter().map(f32::to_string).collect();
        s.push_str(&format!("{},{y}\n", row.join(",")));
    }
    s
}

/// A device's files and configuration.
struct Device {
    id: String,
    config: Config,
    public_key: PublicKey,
}

fn device(
    root: &std::path::Path,
    id: &str,
    shard: &Dataset,
    url: &str,
    aggregator: PublicKey,
) -> Device {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let key = fedge_proto::keys::file::load_or_create(&dir.join("device.key")).unwrap();
    let data = dir.join("train.csv");
    std::fs::write(&data, to_csv(shard)).unwrap();
    let operator = Signer::generate().unwrap().0.public_key();
    let text = format!(
        "device_id = {id:?}\nfleet = {fleet:?}\noperator_key = \"{op}\"\naggregator_key = \"{agg}\"\n\
         data_dir = {dir:?}\n[broker]\nurl = {url:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
         [telemetry]\ninterval_s = 3600\n[learn]\ndata = {data:?}\njob = {JOB:?}\n",
        fleet = common::FLEET,
        op = op_hex(operator),
        agg = op_hex(aggregator),
    );
    Device {
        id: id.into(),
        config: Config::from_toml(&text).unwrap(),
        public_key: key.public_key(),
    }
}

fn op_hex(k: PublicKey) -> String {
    k.to_hex().to_string()
}

/// Starts a device's agent as a task; returns its counters and the task.
fn start(d: &Device, stop: &watch::Receiver<bool>) -> (Arc<Stats>, JoinHandle<()>) {
    let svc = Service::open(d.config.clone()).unwrap();
    let stats = svc.stats();
    let mut rx = stop.clone();
    let task = tokio::spawn(async move {
        svc.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .unwrap();
    });
    (stats, task)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn get(c: &AtomicU64) -> u64 {
    Stats::get(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_closes_without_a_silent_and_a_killed_device_which_rejoins_the_next_round() {
    let Some(broker) = common::mosquitto("fl_rounds") else {
        return;
    };
    let tmp = common::TempDir::new("fl-rounds");
    let digits = load_digits(fedge_tests::repo_root().join(DIGITS_PATH)).unwrap();
    let shards = dirichlet_shards(&digits, 5, 1.0, 20, 3).unwrap();
    let agg_key_path = tmp.0.join("aggregator.key");
    let agg_key = fedge_proto::keys::file::load_or_create(&agg_key_path)
        .unwrap()
        .public_key();
    let ids = ["dev-a", "dev-b", "dev-c", "dev-d", "dev-e"];
    let devices: Vec<Device> = ids
        .iter()
        .zip(&shards)
        .map(|(id, s)| device(&tmp.0, id, s, &broker.url(), agg_key))
        .collect();

    let mut cfg = fedge_aggregator::Config {
        fleet: common::FLEET.into(),
        data_dir: tmp.0.join("aggregator"),
        key_file: Some(agg_key_path),
        tick_ms: 20,
        ..fedge_aggregator::Config::default()
    };
    cfg.broker.url = Some(broker.url());
    cfg.broker.client_id = Some(format!("agg-fl-{}", std::process::id()));
    cfg.devices = devices
        .iter()
        .map(|d| DeviceEntry {
            id: d.id.clone(),
            public_key: d.public_key.to_hex().to_string(),
        })
        .collect();
    let spec = format!(
        "id = {JOB:?}\nmodel = {{ zeros = 650 }}\nrounds = 3\nmin_devices = 3\ndeadline_ms = 3000\n\
         [hyper]\nlearning_rate = 0.5\nepochs = 1\nbatch_size = 16\n"
    );
    cfg.jobs = vec![JobSpec::parse(&spec, cfg.broker.max_packet_bytes).unwrap()];
    let store_path = cfg.data_dir.join(fedge_aggregator::service::STORE_FILE);
    let service = fedge_aggregator::Service::bind(cfg).await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agg_stop = stop_rx.clone();
    let aggregator = tokio::spawn(service.run(async move {
        let _ = agg_stop.wait_for(|s| *s).await;
    }));

    // dev-d is registered and selected but never connects.
    let (a, task_a) = start(&devices[0], &stop_rx);
    let (b, task_b) = start(&devices[1], &stop_rx);
    let (c, task_c) = start(&devices[2], &stop_rx);
    let (e, task_e) = start(&devices[4], &stop_rx);

    // dev-e is killed (its task dropped: no offline status, no clean disconnect) as soon as it
    // has taken up round 1, before or while it trains.
    until("dev-e joins round 1", || get(&e.rounds_joined) >= 1).await;
    task_e.abort();
    let _ = task_e.await;
    let killed_before_sending = get(&e.rounds_trained) == 0;
    eprintln!("dev-e killed before its round 1 update was queued: {killed_before_sending}");

    // Round 1 closes on the others at its deadline: they move on to round 2.
    for (s, id) in [(&a, "dev-a"), (&b, "dev-b"), (&c, "dev-c")] {
        until(&format!("{id}: round 1 accepted"), || {
            get(&s.updates_accepted) >= 1
        })
        .await;
        until(&format!("{id}: joins round 2"), || {
            get(&s.rounds_joined) >= 2
        })
        .await;
    }

    // dev-e restarts with the same data directory and takes part in round 2.
    let (e2, task_e2) = start(&devices[4], &stop_rx);
    until("dev-e trains round 2", || get(&e2.rounds_trained) >= 1).await;
    until("dev-e's round 2 update is accepted", || {
        get(&e2.updates_accepted) >= 1
    })
    .await;
    // Round 2 closes at its deadline too (dev-d is still silent): the others join round 3.
    for (s, id) in [(&a, "dev-a"), (&b, "dev-b"), (&c, "dev-c")] {
        until(&format!("{id}: round 2 accepted"), || {
            get(&s.updates_accepted) >= 2
        })
        .await;
        until(&format!("{id}: joins round 3"), || {
            get(&s.rounds_joined) >= 3
        })
        .await;
    }

    let _ = stop_tx.send(true);
    for t in [task_a, task_b, task_c, task_e2] {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
    aggregator.await.unwrap().unwrap();

    let store = fedge_aggregator::store::Store::open(&store_path).unwrap();
    let rounds = store.rounds(JOB).unwrap();
    let txn = store.begin().unwrap();
    let counted = |round: u64, id: &str| txn.contribution(JOB, round, id).unwrap().is_some();
    let r1 = &rounds[0];
    assert!(r1.closed_unix_ms.is_some(), "round 1 closed: {r1:?}");
    assert_eq!(r1.selected, 5);
    for id in ["dev-a", "dev-b", "dev-c"] {
        assert!(counted(1, id), "{id} counted in round 1");
        assert!(counted(2, id), "{id} counted in round 2");
    }
    assert!(
        !counted(1, "dev-d") && !counted(2, "dev-d"),
        "dev-d never answered"
    );
    if killed_before_sending {
        assert!(
            !counted(1, "dev-e"),
            "dev-e was killed before it sent round 1"
        );
        assert_eq!(r1.accepted, 3);
    }
    assert!(counted(2, "dev-e"), "dev-e rejoined in round 2");
    // The aggregated model is a real training result: far above chance on the digits.
    assert!(rounds[1].closed_unix_ms.is_some(), "round 2 closed");
    let model = store.model(JOB, 2).unwrap().expect("model v2");
    let head = fedge_runtime::train::Head::from_params(
        fedge_runtime::train::HeadKind::Softmax,
        64,
        10,
        &model,
    )
    .unwrap();
    let acc = head
        .loss_and_accuracy(&digits.x, &digits.y)
        .unwrap()
        .accuracy;
    assert!(
        acc > 0.5,
        "accuracy of the round 2 model on all digits: {acc}"
    );
}

/// Waits until the broker holds the retained announcement of `job`.
async fn retained_announcement(port: u16) {
    announcement_where(port, None, |_| true).await;
}

/// Waits for an announcement of `job` that `f` accepts (verified with `key` when given).
async fn announcement_where(
    port: u16,
    key: Option<PublicKey>,
    f: impl Fn(&fedge_proto::msg::RoundAnnounce<'_>) -> bool,
) {
    let mut o =
        rumqttc::MqttOptions::new(format!("watch-{}", std::process::id()), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 16);
    client
        .subscribe(
            format!("fedge/v1/{}/job/{JOB}/round", common::FLEET),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("announcement retained in time");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev
            && !p.payload.is_empty()
            && key.is_none_or(|k| {
                fedge_proto::Envelope::open(&p.payload, 1 << 20)
                    .and_then(|u| u.verify(&k))
                    .and_then(|env| fedge_proto::envelope::decode(env.payload))
                    .is_ok_and(|a| f(&a))
            })
        {
            return;
        }
    }
}

/// A restart scenario: agents on Dirichlet shards of digits, and an aggregator (one job from
/// `spec`) whose first run announced round 1 and stopped before the agents started; returned
/// once every agent has trained round 1.
struct Restart {
    _tmp: common::TempDir,
    devices: Vec<Device>,
    cfg: fedge_aggregator::Config,
    store_path: std::path::PathBuf,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    started: Vec<(Arc<Stats>, JoinHandle<()>)>,
    digits: Dataset,
    agg_key: PublicKey,
}

async fn trained_against_a_stopped_aggregator(
    broker: &fedge_tests::mosquitto::Mosquitto,
    tag: &str,
    ids: &[&str],
    seed: u64,
    spec: &str,
) -> Restart {
    let tmp = common::TempDir::new(&format!("fl-{tag}"));
    let digits = load_digits(fedge_tests::repo_root().join(DIGITS_PATH)).unwrap();
    let shards = dirichlet_shards(&digits, ids.len(), 1.0, 20, seed).unwrap();
    let agg_key_path = tmp.0.join("aggregator.key");
    let agg_key = fedge_proto::keys::file::load_or_create(&agg_key_path)
        .unwrap()
        .public_key();
    let devices: Vec<Device> = ids
        .iter()
        .zip(&shards)
        .map(|(id, s)| device(&tmp.0, id, s, &broker.url(), agg_key))
        .collect();
    let mut cfg = fedge_aggregator::Config {
        fleet: common::FLEET.into(),
        data_dir: tmp.0.join("aggregator"),
        key_file: Some(agg_key_path),
        tick_ms: 20,
        ..fedge_aggregator::Config::default()
    };
    cfg.broker.url = Some(broker.url());
    cfg.broker.client_id = Some(format!("agg-{tag}-{}", std::process::id()));
    cfg.devices = devices
        .iter()
        .map(|d| DeviceEntry {
            id: d.id.clone(),
            public_key: d.public_key.to_hex().to_string(),
        })
        .collect();
    cfg.jobs = vec![JobSpec::parse(spec, cfg.broker.max_packet_bytes).unwrap()];
    let store_path = cfg.data_dir.join(fedge_aggregator::service::STORE_FILE);

    let first = fedge_aggregator::Service::bind(cfg.clone()).await.unwrap();
    let (first_stop, first_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(first.run(async move {
        let _ = first_rx.await;
    }));
    retained_announcement(broker.port()).await;
    let _ = first_stop.send(());
    first.await.unwrap().unwrap();

    let (stop_tx, stop_rx) = watch::channel(false);
    let started: Vec<_> = devices.iter().map(|d| start(d, &stop_rx)).collect();
    for (d, (s, _)) in devices.iter().zip(&started) {
        until(&format!("{}: trains round 1", d.id), || {
            get(&s.rounds_trained) >= 1
        })
        .await;
    }
    Restart {
        _tmp: tmp,
        devices,
        cfg,
        store_path,
        stop_tx,
        stop_rx,
        started,
        digits,
        agg_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_updates_made_before_an_aggregator_restart_are_sealed_again_and_counted() {
    let Some(broker) = common::mosquitto("fl_sealed_restart") else {
        return;
    };
    let spec = format!(
        "id = {JOB:?}\nmodel = {{ zeros = 650 }}\nrounds = 2\nmin_devices = 3\ndeadline_ms = 120000\n\
         encrypt_updates = true\n[hyper]\nlearning_rate = 0.5\nepochs = 1\nbatch_size = 16\n"
    );
    // The devices train on round 1 and seal to keys nobody holds any more.
    let Restart {
        _tmp,
        devices,
        cfg,
        store_path,
        stop_tx,
        stop_rx,
        started,
        ..
    } = trained_against_a_stopped_aggregator(
        &broker,
        "sealed",
        &["dev-a", "dev-b", "dev-c"],
        5,
        &spec,
    )
    .await;

    // The aggregator comes back with new keys: every update is refused, sealed again, counted;
    // round 2 runs normally.
    let service = fedge_aggregator::Service::bind(cfg).await.unwrap();
    let mut agg_stop = stop_rx.clone();
    let aggregator = tokio::spawn(service.run(async move {
        let _ = agg_stop.wait_for(|s| *s).await;
    }));
    for (d, (s, _)) in devices.iter().zip(&started) {
        until(&format!("{}: round 1 sealed again", d.id), || {
            get(&s.updates_resealed) >= 1
        })
        .await;
        until(&format!("{}: rounds 1 and 2 accepted", d.id), || {
            get(&s.updates_accepted) >= 2
        })
        .await;
    }
    let _ = stop_tx.send(true);
    for (_, t) in started {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
    aggregator.await.unwrap().unwrap();
    let store = fedge_aggregator::store::Store::open(&store_path).unwrap();
    let rounds = store.rounds(JOB).unwrap();
    assert_eq!(
        rounds.iter().map(|r| r.accepted).collect::<Vec<_>>(),
        [3, 3],
        "{rounds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_rounds_run_with_real_agents_and_survive_an_aggregator_restart() {
    let Some(broker) = common::mosquitto("fl_secure_restart") else {
        return;
    };
    let spec = format!(
        "id = {JOB:?}\nmodel = {{ zeros = 650 }}\nrounds = 2\ndeadline_ms = 60000\n\
         secure_aggregation = {{ clip = 1.0, stage_ms = 20000 }}\n\
         [hyper]\nlearning_rate = 0.5\nepochs = 1\nbatch_size = 16\nclip_norm = 1.0\n"
    );
    // The devices train and advertise their keys into a session nobody runs any more.
    let Restart {
        _tmp,
        devices,
        cfg,
        store_path,
        stop_tx,
        stop_rx,
        started,
        digits,
        agg_key,
    } = trained_against_a_stopped_aggregator(
        &broker,
        "secure",
        &["dev-a", "dev-b", "dev-c", "dev-d"],
        9,
        &spec,
    )
    .await;

    // The aggregator comes back with a new session: every device joins it with the update it
    // already trained; both rounds are unmasked.
    let service = fedge_aggregator::Service::bind(cfg).await.unwrap();
    let mut agg_stop = stop_rx.clone();
    let aggregator = tokio::spawn(service.run(async move {
        let _ = agg_stop.wait_for(|s| *s).await;
    }));
    for (d, (s, _)) in devices.iter().zip(&started) {
        until(&format!("{}: joined the new session", d.id), || {
            get(&s.secagg_rejoined) >= 1
        })
        .await;
        until(&format!("{}: rounds 1 and 2 unmasked", d.id), || {
            get(&s.secagg_completed) >= 2
        })
        .await;
        assert_eq!(
            get(&s.rounds_trained),
            2,
            "{}: trained each round once",
            d.id
        );
    }
    announcement_where(broker.port(), Some(agg_key), |a| {
        a.phase == fedge_proto::msg::Phase::Finished
    })
    .await;
    let _ = stop_tx.send(true);
    for (_, t) in started {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
    aggregator.await.unwrap().unwrap();
    let store = fedge_aggregator::store::Store::open(&store_path).unwrap();
    let rounds = store.rounds(JOB).unwrap();
    let summary: Vec<(u32, Option<String>)> = rounds
        .iter()
        .map(|r| (r.accepted, r.failed.clone()))
        .collect();
    assert_eq!(summary, [(4, None), (4, None)], "{rounds:?}");
    let model = store.model(JOB, 2).unwrap().expect("model v2");
    let head = fedge_runtime::train::Head::from_params(
        fedge_runtime::train::HeadKind::Softmax,
        64,
        10,
        &model,
    )
    .unwrap();
    let acc = head
        .loss_and_accuracy(&digits.x, &digits.y)
        .unwrap()
        .accuracy;
    assert!(
        acc > 0.5,
        "accuracy of the securely aggregated round 2 model on all digits: {acc}"
    );
}
