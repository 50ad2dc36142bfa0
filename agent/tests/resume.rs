//! A broker restart in the middle of a chunked transfer and of telemetry: the agent reconnects,
//! fetches only the chunks it is missing, and delivers every queued outbox message, none lost and
//! none twice after the receiver drops repeats by (sender, seq).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use common::*;
use fedge_agent::outbox::Class;
use fedge_agent::service::Submit;
use fedge_agent::{Config, Service, Stats};
use fedge_proto::Kind;
use fedge_proto::msg::Command;
use tokio::sync::oneshot;

const CHUNK: u32 = 8 << 10;
const SUBMITS: u32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_the_transfer_and_delivers_the_outbox_across_a_broker_restart() {
    let Some(mut broker) = mosquitto("resumes_the_transfer") else {
        return;
    };
    // The agent reaches the broker through a proxy the test can close, so that after the restart
    // the test's subscriber is back before the agent starts flushing its outbox.
    let proxy = Proxy::start(broker.port());
    let dir = TempDir::new("resume");
    let op = Operator::new();
    let extra = format!(
        "[limits]\nmax_chunk_bytes = {CHUNK}\nchunk_window = 8\n\n[telemetry]\ninterval_s = 1\nevent_delay_ms = 20\n"
    );
    let url = format!("mqtt://127.0.0.1:{}", proxy.port);
    let svc =
        Service::open(Config::from_toml(&config_toml(&dir.0, &url, &op, &extra)).expect("config"))
            .expect("open");
    let (device, stats, submit) = (svc.public_key(), svc.stats(), svc.submitter());
    let update_topic = fedge_proto::topic::job_update(FLEET, "j", DEVICE)
        .expect("topic")
        .to_string();

    let mut mqtt = Client::connect(broker.port(), "test-resume");
    until("test client", 10, || {
        mqtt.connacks.load(Ordering::SeqCst) > 0
    })
    .await;
    mqtt.subscribe(&telemetry_topic()).await;
    mqtt.subscribe(&update_topic).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        svc.run(async {
            let _ = stopped.await;
        })
        .await
        .expect("run");
    });
    until("agent connected", 10, || Stats::get(&stats.connects) == 1).await;

    let submit_range = |range: std::ops::Range<u32>| {
        let submit = submit.clone();
        let topic = update_topic.clone();
        async move {
            for i in range {
                let s = Submit {
                    class: Class::Reliable,
                    topic: topic.clone(),
                    kind: Kind::Update,
                    round: 0,
                    payload: i.to_le_bytes().to_vec(),
                };
                submit.send(s).await.expect("submit");
            }
        }
    };

    // Half of the bundle's chunks are on the broker; the agent stores them and waits for the rest.
    let (model, io) = zoo("ppocr_cls");
    let bundle = op.bundle("ppocr_cls", 1, &model, &io, &io, 1e-3);
    let (m, chunks) = op.chunks(&bundle, CHUNK);
    let n = chunks.len() as u64;
    let half = n / 2;
    for (t, wire) in &chunks[..half as usize] {
        mqtt.publish(t, wire.clone(), true).await;
    }
    mqtt.flush().await;
    mqtt.publish(
        &cmd_topic(),
        op.command(&Command::Install {
            name: "ppocr_cls",
            version: 1,
            bundle: m,
        }),
        false,
    )
    .await;
    until("first half stored", 30, || {
        Stats::get(&stats.chunks_stored) == half
    })
    .await;
    submit_range(0..SUBMITS / 2).await;
    until("telemetry flowing, outbox drained", 30, || {
        Stats::get(&stats.outbox_queued) >= u64::from(SUBMITS / 2) + 2
            && Stats::get(&stats.outbox_acked) == Stats::get(&stats.outbox_queued)
    })
    .await;

    // Outage: the agent keeps producing telemetry and takes more messages into its outbox.
    proxy.set_open(false);
    broker.stop();
    until("agent noticed the outage", 30, || {
        Stats::get(&stats.disconnects) == 1
    })
    .await;
    let queued = Stats::get(&stats.outbox_queued);
    submit_range(SUBMITS / 2..SUBMITS).await;
    until("telemetry queued offline", 30, || {
        Stats::get(&stats.outbox_queued) >= queued + u64::from(SUBMITS / 2) + 2
    })
    .await;
    assert!(Stats::get(&stats.outbox_acked) < Stats::get(&stats.outbox_queued));

    // The broker is back, empty (no persistence): the subscriber resubscribes, the operator
    // re-publishes every retained chunk, then the agent may reconnect.
    let subacks = mqtt.subacks.load(Ordering::SeqCst);
    broker.restart().expect("restart");
    until("subscriber back", 30, || {
        mqtt.subacks.load(Ordering::SeqCst) >= subacks + 2
    })
    .await;
    mqtt.reset_acks();
    for (t, wire) in &chunks {
        mqtt.publish(t, wire.clone(), true).await;
    }
    mqtt.flush().await;
    proxy.set_open(true);

    until("installed after resuming", 60, || {
        Stats::get(&stats.installs) == 1
    })
    .await;
    assert!(Stats::get(&stats.connects) >= 2);
    assert_eq!(
        Stats::get(&stats.chunks_stored),
        n,
        "every chunk stored once"
    );
    assert_eq!(
        Stats::get(&stats.chunks_received),
        n,
        "only the missing chunks were delivered again"
    );
    assert_eq!(Stats::get(&stats.chunks_duplicate), 0);
    until("outbox drained", 30, || {
        Stats::get(&stats.outbox_acked) == Stats::get(&stats.outbox_queued)
    })
    .await;

    let _ = stop.send(());
    task.await.expect("agent task");
    let acked = Stats::get(&stats.outbox_acked);
    let left = std::fs::read_dir(dir.0.join("data/outbox"))
        .expect("outbox")
        .count() as u64;
    assert_eq!(
        Stats::get(&stats.outbox_queued),
        acked + left,
        "nothing vanished from the outbox"
    );

    // Every acknowledged message arrived; after dropping repeats by (sender, seq), exactly once.
    let mut seen: BTreeMap<(String, u64), Vec<u8>> = BTreeMap::new();
    let mut raw = 0usize;
    until("subscriber received everything", 30, || {
        for msg in mqtt.drain() {
            raw += 1;
            let (sender, seq, _, payload) = open_device(&msg.payload, &device);
            let prev = seen.insert((sender, seq), payload.clone());
            assert!(
                prev.is_none_or(|p| p == payload),
                "seq {seq} reused for different content"
            );
        }
        seen.len() as u64 == acked
    })
    .await;
    let updates: BTreeSet<u32> = seen
        .values()
        .filter(|p| p.len() == 4)
        .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
        .collect();
    assert_eq!(
        updates,
        (0..SUBMITS).collect(),
        "every submitted message once"
    );
    let telemetry = seen.len() as u64 - u64::from(SUBMITS);
    assert!(
        telemetry >= 4,
        "telemetry before, during and after the outage: {telemetry}"
    );
    assert!(raw >= seen.len());
    eprintln!(
        "{} chunks, {} messages delivered ({raw} received before dedup)",
        n,
        seen.len()
    );
}
