//! Round latency of the aggregator with simulated devices, on the embedded rumqttd broker and
//! on Mosquitto (when installed).
//!
//! ```text
//! cargo run -p fedge-aggregator --profile ci --example round_latency -- [DEVICES...] [--params N] [--rounds R]
//! ```
//!
//! Every device is its own MQTT connection in this process: it waits for the announcement,
//! fetches the model chunks, sends a signed f32 update and waits for its ack. Round latency is
//! the time between two consecutive announcements seen by an observer client: fetch, upload,
//! durable commit, aggregation, and publication of the next model and announcement. Simulated
//! devices train in zero time, so this is the service's own overhead per round.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Device, Identity, Running, delta, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::Outcome;

#[derive(Debug)]
struct Row {
    broker: &'static str,
    devices: usize,
    rounds: Vec<Duration>,
    commit_mean_ms: f64,
    aggregate_mean_ms: f64,
}

async fn bench(
    broker: &'static str,
    url: Option<String>,
    devices: usize,
    params: usize,
    rounds: u64,
) -> Row {
    let ids = identities(devices);
    let spec = format!(
        "id = \"bench\"\nrounds = {rounds}\nmin_devices = {devices}\ndeadline_ms = 600000\nmodel = {{ zeros = {params} }}"
    );
    let job = JobSpec::parse(&spec, 16 << 20).expect("job");
    let dir = temp_dir(&format!("bench-{broker}-{devices}"));
    // A fleet per run: a shared broker keeps the previous run's retained messages.
    let fleet = format!(
        "bench-{}-{devices}",
        broker.split(' ').next().unwrap_or("b")
    );
    let cfg = common::config(
        &fleet,
        &dir,
        url,
        &ids.iter().collect::<Vec<_>>(),
        vec![job],
    );
    let agg = Running::start(cfg).await;
    let (key, port) = (agg.public_key, agg.broker_port);

    let mut observer = Device::connect(port, &fleet, Identity::new("observer"), key, "bench").await;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let fleet = fleet.clone();
        tasks.spawn(async move {
            let mut d = Device::connect(port, &fleet, id, key, "bench").await;
            for round in 1..=rounds {
                let a = d.announce("bench", round).await;
                let _model = d.fetch_model("bench", &a).await;
                let encoded = fedge_fl::Codec::F32
                    .encode(&delta(i, round, params))
                    .expect("encode");
                let (seq, wire) = d.seal_update("bench", round, 10, &encoded);
                d.publish_update("bench", wire).await;
                assert_eq!(d.ack(seq).await.outcome, Outcome::Accepted);
            }
        });
    }
    let mut seen = Vec::new();
    for round in 1..=rounds + 1 {
        observer.announce("bench", round).await;
        seen.push(Instant::now());
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("device");
    }
    let status = common::get_json(agg.http, "/api/jobs/bench/rounds").await;
    let agg_ms: Vec<f64> = status
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["aggregate_ms"].as_f64())
        .collect();
    let (_, metrics) = common::http(agg.http, "GET", "/metrics", None).await;
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let commit_mean_ms = 1e3 * metric("fedge_aggregator_commit_seconds_sum")
        / metric("fedge_aggregator_commit_seconds_count").max(1.0);
    agg.stop().await;
    let _ = std::fs::remove_dir_all(dir);
    Row {
        broker,
        devices,
        rounds: seen.windows(2).map(|w| w[1] - w[0]).collect(),
        commit_mean_ms,
        aggregate_mean_ms: agg_ms.iter().sum::<f64>() / agg_ms.len().max(1) as f64,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut devices = Vec::new();
    let (mut params, mut rounds) = (650usize, 10u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--params" => {
                params = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--params N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds R")
            }
            n => devices.push(n.parse::<usize>().expect("device count")),
        }
    }
    if devices.is_empty() {
        devices = vec![20, 100];
    }
    let mosquitto = fedge_tests::mosquitto::Mosquitto::start();
    if let Err(e) = &mosquitto {
        eprintln!("mosquitto rows skipped: {e}");
    }
    let nodelay = NoDelayMosquitto::start();
    println!(
        "params = {params} (f32), rounds = {rounds}, one process, {} cores",
        num_cpus()
    );
    println!(
        "| broker | devices | median round ms | min | max | mean commit ms | mean aggregation ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &devices {
        let mut runs = vec![bench("embedded rumqttd", None, n, params, rounds).await];
        if let Ok(m) = &mosquitto {
            runs.push(bench("mosquitto 2.0", Some(m.url()), n, params, rounds).await);
        }
        if let Some(m) = &nodelay {
            let url = format!("mqtt://127.0.0.1:{}", m.1);
            runs.push(
                bench(
                    "mosquitto 2.0 set_tcp_nodelay",
                    Some(url),
                    n,
                    params,
                    rounds,
                )
                .await,
            );
        }
        for row in runs {
            let mut r = row.rounds.clone();
            r.sort();
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.3} |",
                row.broker,
                row.devices,
                ms(r[r.len() / 2]),
                ms(r[0]),
                ms(r[r.len() - 1]),
                row.commit_mean_ms,
                row.aggregate_mean_ms
            );
        }
    }
}

/// Mosquitto with `set_tcp_nodelay true` (its default is false: Nagle on the broker's side).
struct NoDelayMosquitto(std::process::Child, u16);

impl NoDelayMosquitto {
    fn start() -> Option<Self> {
        let bin = fedge_tests::mosquitto::binary()?;
        let port = fedge_tests::mosquitto::free_port();
        let conf = temp_dir("bench-mosquitto-nodelay").join("m.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nuser root\n"),
        )
        .ok()?;
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self(child, port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for NoDelayMosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
