//! `fedge demo`: a whole federated-learning run on this machine. The aggregator service (with its
//! embedded MQTT broker, or an external broker), N device agents (the real `fedge-agent` library,
//! each with its own key, registration and Dirichlet shard of the training split written to its
//! own data file) and an observer that evaluates every global model on the held-out test split.
//! Everything speaks the real protocol over MQTT; only the processes are merged into one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedge_agent::Stats;
use fedge_aggregator::config::{DeviceEntry, JobSpec, ModelSource};
use fedge_aggregator::mqtt::BrokerUrl;
use fedge_proto::chunk::{Assembly, Chunk};
use fedge_proto::msg::{Phase, RoundAnnounce};
use fedge_proto::topic::{self, Topic};
use fedge_proto::{Envelope, PublicKey};
use fedge_runtime::train::{self, Head, HeadKind, TrainConfig, data::Dataset};
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

/// The digits set (scikit-learn, BSD licence; see `models/data/digits`), built in so the demo
/// needs no files.
const DIGITS: &[u8] = include_bytes!("../../../../models/data/digits/digits.csv.gz");
const FLEET: &str = "demo";
const JOB: &str = "demo";
/// The aggregator's sender id (the configuration default).
const AGGREGATOR_ID: &str = "aggregator";
const TEST_FRACTION: f64 = 0.2;
/// The longest the demo waits for the next global model before it gives up.
const STALL: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
#[command(
    long_about = "Runs federated learning end to end on this machine: the aggregator with its \
    embedded MQTT broker (or --broker), N device agents with their own keys and non-IID shards of \
    the training data, R rounds. Prints the test accuracy and loss of every global model, writes \
    OUT/demo.svg (plot), OUT/model.onnx (final model), OUT/predictions.csv and OUT/test.csv (the \
    test split and the model's predictions on it) and OUT/summary.json."
)]
pub struct Args {
    /// Devices: each one a fedge agent with its own key, registration and data file.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Federated rounds; the model of every round is evaluated on the test split.
    #[arg(long, default_value_t = 30)]
    pub rounds: u64,
    /// Aggregation strategy: fedavg, fedprox (uses --mu), fedadam, fedyogi, fedadagrad, fedavgm,
    /// fedmedian or fedtrimmedavg.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// Dirichlet concentration of the label split across devices: 0.1 gives each device few
    /// classes, 100 nearly the same mix everywhere.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Seed of the test split, the device split and every device's shuffling: a seed fixes the
    /// data each device holds.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// An external MQTT broker, mqtt://HOST:PORT, instead of the embedded one.
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// Labelled data: CSV (a header row, numeric features, the integer label in the last column)
    /// or NPZ (arrays X and y) when the name ends in .npz. Default: the built-in digits set
    /// (1,797 8×8 images, 10 classes).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Output directory (created): demo.svg, model.onnx, predictions.csv, test.csv, summary.json.
    #[arg(long, value_name = "DIR", default_value = "fedge-demo")]
    pub out: PathBuf,
    /// Print one JSON object at the end (per-round accuracy and loss, final and centralized
    /// accuracy, rounds, devices, bytes) on stdout; the per-round lines go to stderr.
    #[arg(long)]
    pub json: bool,
    /// The trained head: softmax (regression) or mlp (one hidden layer, --hidden units).
    #[arg(long, default_value = "softmax")]
    pub head: String,
    /// Hidden units of the mlp head.
    #[arg(long, default_value_t = 32)]
    pub hidden: usize,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.5)]
    pub lr: f32,
    /// Local batch size.
    #[arg(long, default_value_t = 16)]
    pub batch: u32,
    /// FedProx proximal term μ (used with --strategy fedprox).
    #[arg(long, default_value_t = 0.1)]
    pub mu: f32,
    /// Update codec: f32, f16 or int8.
    #[arg(long, default_value = "f32")]
    pub codec: String,
    /// A round's deadline in milliseconds: it closes then with the updates it has (at least
    /// half the devices), or earlier when every device has answered.
    #[arg(long, default_value_t = 30_000)]
    pub deadline_ms: u64,
    /// Local differential privacy: each device clips its update to this L2 norm (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub clip_norm: f32,
    /// Local DP noise: Gaussian with standard deviation noise_multiplier × clip_norm on each
    /// device's clipped update (needs --clip-norm).
    #[arg(long, default_value_t = 0.0, conflicts_with = "dp_epsilon")]
    pub noise_multiplier: f32,
    /// Target ε after all rounds (at --dp-delta): the smallest noise multiplier that keeps every
    /// device's ε within it is used, and the job's privacy budget is set to it (needs --clip-norm).
    #[arg(long)]
    pub dp_epsilon: Option<f64>,
    /// δ of the privacy accounting.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Where the clipping and noise happen: `local` (each device, on its own update) or
    /// `central` (the aggregator, on the clipped mean: DP-FedAvg).
    #[arg(long, default_value = "local")]
    pub dp_mode: String,
    /// Also write the run's exact data split and start to DIR (for baselines outside fedge):
    /// dev-NN.csv (each device's training rows), test.csv, and split.json (hyper-parameters and
    /// the initial global parameters).
    #[arg(long, value_name = "DIR")]
    pub dump_split: Option<PathBuf>,
    /// Send updates signed but in clear. By default each device seals its update to a key the
    /// aggregator announced for it this round (X25519, ChaCha20-Poly1305): the broker sees only
    /// ciphertext.
    #[arg(long)]
    pub clear_updates: bool,
    /// Secure aggregation (SecAgg+): each device masks its update so that the aggregator learns
    /// only the sum of the updates (averaged unweighted). Needs an averaging strategy. With
    /// --dp-mode central the devices clip to --clip-norm and the aggregator adds the noise to
    /// the unmasked sum.
    #[arg(long)]
    pub secagg: bool,
    /// With --secagg: each value of an update is clipped to [-C, C] before 16-bit quantisation
    /// (default: --clip-norm when set, else 1.0).
    #[arg(long, value_name = "C")]
    pub secagg_clip: Option<f32>,
}

/// The `--json` object (also written to `summary.json`).
#[derive(Debug, Serialize)]
struct Summary {
    rounds: u64,
    devices: usize,
    strategy: String,
    alpha: f64,
    seed: u64,
    broker: String,
    accuracy: Vec<f32>,
    loss: Vec<f32>,
    final_accuracy: f32,
    final_loss: f32,
    centralized_accuracy: f32,
    centralized_loss: f32,
    /// Bytes of update messages the devices sent.
    bytes_sent: u64,
    /// Bytes of global-model chunks the devices fetched.
    bytes_received: u64,
    seconds: f64,
    /// Local DP: the clipping norm and noise multiplier the devices used, and the ε (at
    /// `dp_delta`) of any device after the rounds run; absent without noise.
    #[serde(skip_serializing_if = "Option::is_none")]
    clip_norm: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    noise_multiplier: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epsilon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_delta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dp_mode: Option<String>,
    /// The run used secure aggregation (SecAgg+).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    secure_aggregation: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    check(&args)?;
    if let Some(e) = args.dp_epsilon {
        args.noise_multiplier = noise_for(e, args.rounds, args.dp_delta)?;
    }
    let noise = args.noise_multiplier;
    let data = load(args.data.as_deref())?;
    let (train_set, test_set) = train::data::train_test_split(&data, TEST_FRACTION, args.seed)
        .context("splitting off the test set")?;
    let shards = train::data::dirichlet_shards(&train_set, args.devices, args.alpha, 2, args.seed)
        .context("splitting the training data across devices")?;
    let head = initial_head(&args, data.features, data.classes)?;
    if let Some(dir) = &args.dump_split {
        dump_split(&args, dir, &shards, &test_set, &head)?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let work = WorkDir::new()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = Instant::now();
    let fed = rt.block_on(federate(&args, &work.0, &shards, &head, &test_set))?;
    drop(rt);
    let global = Head::from_params(head.kind(), data.features, data.classes, &fed.final_params)?;
    let central = centralized(&args, &head, &train_set, &test_set)?;
    let summary = Summary {
        rounds: args.rounds,
        devices: args.devices,
        strategy: args.strategy.clone(),
        alpha: args.alpha,
        seed: args.seed,
        broker: fed.broker.clone(),
        final_accuracy: fed.accuracy.last().copied().unwrap_or(0.0),
        final_loss: fed.loss.last().copied().unwrap_or(f32::NAN),
        accuracy: fed.accuracy,
        loss: fed.loss,
        centralized_accuracy: central.accuracy,
        centralized_loss: central.loss,
        bytes_sent: fed.bytes_sent,
        bytes_received: fed.bytes_received,
        seconds: started.elapsed().as_secs_f64(),
        clip_norm: (args.clip_norm > 0.0).then_some(args.clip_norm),
        noise_multiplier: (noise > 0.0).then_some(noise),
        epsilon: (noise > 0.0)
            .then(|| epsilon_after(f64::from(noise), args.rounds, args.dp_delta))
            .flatten(),
        dp_delta: (noise > 0.0).then_some(args.dp_delta),
        dp_mode: (noise > 0.0).then(|| args.dp_mode.clone()),
        secure_aggregation: args.secagg,
    };
    write_outputs(&args, &summary, &global, &test_set)?;
    report(&args, &summary)
}

fn check(args: &Args) -> anyhow::Result<()> {
    if args.devices == 0 || args.rounds == 0 {
        bail!("--devices and --rounds must be at least 1");
    }
    if !(args.alpha > 0.0 && args.alpha.is_finite()) {
        bail!("--alpha must be positive");
    }
    if !matches!(args.head.as_str(), "softmax" | "mlp") || args.hidden == 0 {
        bail!("--head must be softmax or mlp (with --hidden at least 1)");
    }
    if !matches!(args.codec.as_str(), "f32" | "f16" | "int8") {
        bail!("--codec must be f32, f16 or int8");
    }
    if args.epochs == 0 || args.batch == 0 || !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--epochs, --batch and --lr must be positive");
    }
    let non_negative = |v: f32| v >= 0.0 && v.is_finite();
    if !(non_negative(args.clip_norm) && non_negative(args.noise_multiplier)) {
        bail!("--clip-norm and --noise-multiplier must be finite and non-negative");
    }
    if (args.noise_multiplier > 0.0 || args.dp_epsilon.is_some()) && args.clip_norm <= 0.0 {
        bail!("local DP noise needs --clip-norm (the noise is scaled to it)");
    }
    if !matches!(args.dp_mode.as_str(), "local" | "central") {
        bail!("--dp-mode must be local or central");
    }
    if args.dp_mode == "central" && args.noise_multiplier <= 0.0 && args.dp_epsilon.is_none() {
        bail!("--dp-mode central needs --clip-norm with --noise-multiplier or --dp-epsilon");
    }
    if !(args.dp_delta > 0.0 && args.dp_delta < 1.0) {
        bail!("--dp-delta must be in (0, 1)");
    }
    if args.dp_epsilon.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
        bail!("--dp-epsilon must be positive");
    }
    if args.secagg {
        if !matches!(
            args.strategy.as_str(),
            "fedavg" | "fedprox" | "fedavgm" | "fedadam" | "fedyogi" | "fedadagrad"
        ) {
            bail!("--secagg gives the aggregator only the sum: use an averaging --strategy");
        }
        if args
            .secagg_clip
            .is_some_and(|c| !(c > 0.0 && c.is_finite()))
        {
            bail!("--secagg-clip must be positive");
        }
        if args.devices < 3 {
            bail!("--secagg needs at least 3 devices");
        }
    } else if args.secagg_clip.is_some() {
        bail!("--secagg-clip needs --secagg");
    }
    Ok(())
}

/// ε after `rounds` rounds of Gaussian noise with multiplier `z` (sampling rate 1).
fn epsilon_after(z: f64, rounds: u64, delta: f64) -> Option<f64> {
    let m = fedge_fl::dp::SampledGaussian::new(z, 1.0).ok()?;
    let mut acc = fedge_fl::dp::RdpAccountant::new();
    acc.compose(&m, rounds);
    acc.epsilon_and_order(delta).ok().map(|(e, _)| e)
}

/// The smallest noise multiplier whose ε after `rounds` rounds is at most `target`, as the f32
/// the job carries, rounded up so the job's own accounting stays within the target.
fn noise_for(target: f64, rounds: u64, delta: f64) -> anyhow::Result<f32> {
    let z = fedge_fl::dp::noise_multiplier_for(target, 1.0, rounds, delta)
        .map_err(|_| anyhow::anyhow!("--dp-epsilon {target}: out of reach for {rounds} rounds"))?;
    let fits = |z: f32| epsilon_after(f64::from(z), rounds, delta).is_some_and(|e| e <= target);
    let mut z = z as f32;
    while !fits(z) {
        z = f32::from_bits(z.to_bits() + 1);
    }
    Ok(z)
}

fn load(path: Option<&Path>) -> anyhow::Result<Dataset> {
    let Some(path) = path else {
        let text = train::data::gunzip(DIGITS).context("the built-in digits set")?;
        let text = std::str::from_utf8(&text).context("the built-in digits set")?;
        let mut d = train::data::parse_csv(text).context("the built-in digits set")?;
        d.classes = 10;
        d.scale(1.0 / 16.0);
        return Ok(d);
    };
    let npz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
    let d = if npz {
        train::data::read_npz(path)
    } else {
        train::data::read_csv(path)
    };
    let d = d.with_context(|| format!("reading {}", path.display()))?;
    if d.classes < 2 {
        bail!("{}: the labels name fewer than 2 classes", path.display());
    }
    Ok(d)
}

fn initial_head(args: &Args, features: usize, classes: usize) -> anyhow::Result<Head> {
    let kind = match args.head.as_str() {
        "mlp" => HeadKind::Mlp {
            hidden: args.hidden,
        },
        _ => HeadKind::Softmax,
    };
    Ok(Head::new(kind, features, classes, args.seed)?)
}

/// The same head trained on the union of the shards (the whole training split) for as many
/// epochs as a device trains in all rounds.
fn centralized(
    args: &Args,
    init: &Head,
    train_set: &Dataset,
    test_set: &Dataset,
) -> anyhow::Result<train::Metrics> {
    let mut head = init.clone();
    let cfg = TrainConfig {
        epochs: usize::try_from(args.rounds * u64::from(args.epochs)).unwrap_or(usize::MAX),
        batch_size: args.batch as usize,
        learning_rate: args.lr,
        momentum: 0.0,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: args.seed,
    };
    train::train(&mut head, &train_set.x, &train_set.y, &cfg, None)
        .context("centralized baseline")?;
    Ok(head.loss_and_accuracy(&test_set.x, &test_set.y)?)
}

/// A temporary directory for keys, stores and device data, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let d = std::env::temp_dir().join(format!("fedge-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(Self(d))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the federated run produced.
struct Federated {
    accuracy: Vec<f32>,
    loss: Vec<f32>,
    final_params: Vec<f32>,
    bytes_sent: u64,
    bytes_received: u64,
    broker: String,
}

async fn federate(
    args: &Args,
    work: &Path,
    shards: &[Dataset],
    head: &Head,
    test_set: &Dataset,
) -> anyhow::Result<Federated> {
    let agg_key_path = work.join("aggregator").join("aggregator.key");
    std::fs::create_dir_all(work.join("aggregator"))?;
    let agg_key = fedge_proto::keys::file::load_or_create(&agg_key_path)
        .context("creating the aggregator key")?
        .public_key();
    let mut devices = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        devices.push(prepare_device(work, i, shard)?);
    }
    // Devices pin only the operator key; the aggregator publishes the operator's certificate
    // of its key, from which they learn it.
    let operator = fedge_proto::Signer::generate()
        .map_err(|e| anyhow::anyhow!("operator key: {e}"))?
        .0;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let cert = fedge_proto::msg::AggregatorCert {
        fleet: FLEET,
        aggregator: AGGREGATOR_ID,
        public_key: agg_key,
        not_after_unix_s: now + 86_400,
    };
    let cert_path = work.join("aggregator").join("aggregator.cert");
    std::fs::write(
        &cert_path,
        super::keys::aggregator_certificate(&operator, "operator", &cert, now * 1000)?,
    )
    .context("writing the aggregator certificate")?;
    let mut cfg = aggregator_config(args, work, &agg_key_path, &devices, head)?;
    cfg.certificate_file = Some(cert_path);
    let service = fedge_aggregator::Service::bind(cfg)
        .await
        .context("starting the aggregator")?;
    let url = service.broker_url().to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let observer = Observer::connect(&url, agg_key).await?;
    let aggregator = tokio::spawn(service.run(stopped(stop_rx.clone())));
    let operator = operator.public_key();
    let mut agents = Vec::new();
    let mut stats = Vec::new();
    for d in &devices {
        let cfg = agent_config(args, d, &url, operator)?;
        let svc =
            fedge_agent::Service::open(cfg).with_context(|| format!("opening device {}", d.id))?;
        stats.push(svc.stats());
        agents.push(tokio::spawn(svc.run(stopped(stop_rx.clone()))));
    }
    let result = observer.follow(args, head, test_set).await;
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
    }
    match tokio::time::timeout(Duration::from_secs(5), aggregator).await {
        Ok(Ok(Err(e))) => return Err(e).context("the aggregator stopped with an error"),
        Ok(Err(e)) => bail!("the aggregator task failed: {e}"),
        _ => {}
    }
    let (accuracy, loss, final_params) = result?;
    let sum = |f: fn(&Stats) -> &std::sync::atomic::AtomicU64| {
        stats.iter().map(|s| Stats::get(f(s))).sum::<u64>()
    };
    Ok(Federated {
        accuracy,
        loss,
        final_params,
        bytes_sent: sum(|s| &s.update_bytes),
        bytes_received: sum(|s| &s.model_bytes),
        broker: args
            .broker
            .clone()
            .unwrap_or_else(|| format!("embedded ({url})")),
    })
}

/// A device's identity and data file.
struct DeviceFiles {
    id: String,
    dir: PathBuf,
    data: PathBuf,
    public_key: PublicKey,
}

fn prepare_device(work: &Path, i: usize, shard: &Dataset) -> anyhow::Result<DeviceFiles> {
    let id = format!("dev-{i:02}");
    let dir = work.join(&id);
    std::fs::create_dir_all(&dir)?;
    let signer = fedge_proto::keys::file::load_or_create(&dir.join("device.key"))
        .with_context(|| format!("creating the key of {id}"))?;
    let data = dir.join("train.csv");
    std::fs::write(&data, to_csv(shard)).with_context(|| format!("writing {}", data.display()))?;
    Ok(DeviceFiles {
        id,
        dir,
        data,
        public_key: signer.public_key(),
    })
}

/// `--dump-split`: the shards, the test split and `split.json` (what a device trains with).
fn dump_split(
    args: &Args,
    dir: &Path,
    shards: &[Dataset],
    test: &Dataset,
    head: &Head,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: String, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    for (i, shard) in shards.iter().enumerate() {
        write(format!("dev-{i:02}.csv"), to_csv(shard).as_bytes())?;
    }
    write("test.csv".into(), to_csv(test).as_bytes())?;
    let mu = if args.strategy == "fedprox" {
        args.mu
    } else {
        0.0
    };
    // Momentum and weight decay: the agents' `[learn]` defaults, which the demo leaves as they are.
    let split = serde_json::json!({
        "devices": args.devices, "rounds": args.rounds, "strategy": args.strategy,
        "alpha": args.alpha, "seed": args.seed, "test_fraction": TEST_FRACTION,
        "head": args.head, "hidden": args.hidden,
        "features": head.features(), "classes": head.classes(),
        "learning_rate": args.lr, "batch_size": args.batch, "epochs": args.epochs,
        "momentum": 0.0, "weight_decay": 0.0, "proximal_mu": mu,
        "shard_rows": shards.iter().map(Dataset::len).collect::<Vec<_>>(),
        "initial_params": head.params(),
    });
    write("split.json".into(), &serde_json::to_vec_pretty(&split)?)
}

/// CSV with a header row and the label last (f32 `Display` round-trips exactly).
fn to_csv(d: &Dataset) -> String {
    let mut s: String = (0..d.features).map(|f| format!("f{f},")).collect();
    s.push_str("label\n");
    for (i, y) in d.y.iter().enumerate() {
        for v in d.row(i) {
            s.push_str(&v.to_string());
            s.push(',');
        }
        s.push_str(&y.to_string());
        s.push('\n');
    }
    s
}

fn aggregator_config(
    args: &Args,
    work: &Path,
    key: &Path,
    devices: &[DeviceFiles],
    head: &Head,
) -> anyhow::Result<fedge_aggregator::Config> {
    let mut cfg = fedge_aggregator::Config {
        fleet: FLEET.into(),
        data_dir: work.join("aggregator"),
        key_file: Some(key.to_path_buf()),
        tick_ms: 20,
        ..fedge_aggregator::Config::default()
    };
    cfg.broker.url = args.broker.clone();
    cfg.broker.listen = ([127, 0, 0, 1], 0).into();
    cfg.broker.client_id = Some(format!("fedge-demo-aggregator-{}", std::process::id()));
    cfg.broker.clean_session = true;
    cfg.devices = devices
        .iter()
        .map(|d| DeviceEntry {
            id: d.id.clone(),
            public_key: d.public_key.to_hex().to_string(),
        })
        .collect();
    let strategy = match args.strategy.as_str() {
        "fedprox" => format!("{{ name = \"fedprox\", proximal_mu = {:?} }}", args.mu),
        s => format!("{{ name = {s:?} }}"),
    };
    let mu = if args.strategy == "fedprox" {
        args.mu
    } else {
        0.0
    };
    let mut budget = args
        .dp_epsilon
        .map_or_else(String::new, |e| format!("dp_epsilon_budget = {e:?}\n"));
    let central = args.dp_mode == "central";
    let (clip, noise) = if central {
        if args.clip_norm > 0.0 && args.noise_multiplier > 0.0 {
            budget += &format!(
                "central_dp = {{ clip_norm = {:?}, noise_multiplier = {:?} }}\n",
                args.clip_norm, args.noise_multiplier
            );
        }
        // Under secure aggregation the aggregator cannot clip: the devices do.
        (if args.secagg { args.clip_norm } else { 0.0 }, 0.0)
    } else {
        (args.clip_norm, args.noise_multiplier)
    };
    let spec = format!(
        "id = {JOB:?}\nmodel = {{ zeros = 1 }}\nstrategy = {strategy}\nrounds = {}\n\
         min_devices = {}\ndeadline_ms = {}\ncodec = {:?}\nseed = {}\ndp_delta = {:?}\n{budget}\
         [hyper]\nlearning_rate = {:?}\nepochs = {}\nbatch_size = {}\nproximal_mu = {mu:?}\n\
         clip_norm = {:?}\nnoise_multiplier = {:?}\n",
        args.rounds,
        args.devices.div_ceil(2),
        args.deadline_ms,
        args.codec,
        args.seed,
        args.dp_delta,
        args.lr,
        args.epochs,
        args.batch,
        clip,
        noise,
    );
    let mut job = JobSpec::parse(&spec, cfg.broker.max_packet_bytes)
        .map_err(|e| anyhow::anyhow!("job: {e}"))?;
    job.model = ModelSource::Params(head.params().to_vec());
    job.encrypt_updates = !args.clear_updates && !args.secagg;
    if args.secagg {
        let clip = args.secagg_clip.unwrap_or(if args.clip_norm > 0.0 {
            args.clip_norm
        } else {
            1.0
        });
        job.secure_aggregation = Some(fedge_aggregator::config::SecureAggSpec {
            clip,
            stage_ms: args.deadline_ms,
            dropout: None,
            quant_bits: 16,
            mod_bits: None,
        });
        job.validate(cfg.broker.max_packet_bytes)
            .map_err(|e| anyhow::anyhow!("job: {e}"))?;
    }
    cfg.jobs = vec![job];
    Ok(cfg)
}

fn agent_config(
    args: &Args,
    d: &DeviceFiles,
    url: &str,
    operator: PublicKey,
) -> anyhow::Result<fedge_agent::Config> {
    let text = format!(
        "device_id = {id:?}\nfleet = {FLEET:?}\noperator_key = \"{operator}\"\n\
         data_dir = {dir:?}\n\
         [broker]\nurl = {url:?}\nclient_id = \"fedge-demo-{pid}-{id}\"\nbackoff_initial_ms = 100\n\
         backoff_max_ms = 2000\n[telemetry]\ninterval_s = 3600\n\
         [learn]\ndata = {data:?}\njob = {JOB:?}\nhead = {head:?}\nhidden = {hidden}\nseed = {seed}\n",
        id = d.id,
        operator = operator.to_hex(),
        dir = d.dir,
        pid = std::process::id(),
        data = d.data,
        head = args.head,
        hidden = args.hidden,
        seed = args.seed,
    );
    fedge_agent::Config::from_toml(&text).map_err(|e| anyhow::anyhow!("device {}: {e}", d.id))
}

/// An MQTT client that follows the job: every announced global model is fetched from its
/// retained chunks, verified and evaluated on the test split.
struct Observer {
    /// Keeps the connection's request channel open.
    _client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<Publish>,
    aggregator: PublicKey,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

type Curves = (Vec<f32>, Vec<f32>, Vec<f32>);

impl Observer {
    async fn connect(url: &str, aggregator: PublicKey) -> anyhow::Result<Self> {
        let u = BrokerUrl::parse(url).map_err(|e| anyhow::anyhow!("broker URL {url}: {e}"))?;
        if u.tls {
            bail!("the demo's observer speaks plain MQTT only (mqtt://HOST:PORT)");
        }
        let mut o = MqttOptions::new(
            format!("fedge-demo-observer-{}", std::process::id()),
            u.host,
            u.port,
        );
        o.set_max_packet_size(16 << 20, 16 << 20)
            .set_keep_alive(Duration::from_secs(30));
        if let (Some(user), Some(pass)) = (u.username, u.password) {
            o.set_credentials(user, pass);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, inbox) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::channel(1);
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "observer connection");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let models = format!("fedge/v1/{FLEET}/job/{JOB}/model/+/+");
        let rounds = topic::job_round(FLEET, JOB)?.to_string();
        client
            .subscribe_many([
                rumqttc::SubscribeFilter::new(rounds, QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new(models, QoS::AtLeastOnce),
            ])
            .await
            .context("subscribing")?;
        tokio::time::timeout(Duration::from_secs(20), ready.recv())
            .await
            .with_context(|| format!("no answer from the broker at {url}"))?;
        Ok(Self {
            _client: client,
            inbox,
            aggregator,
            driver,
        })
    }

    /// Evaluates versions 1..=rounds as they are published; returns accuracy, loss per round and
    /// the final parameters.
    async fn follow(mut self, args: &Args, head: &Head, test: &Dataset) -> anyhow::Result<Curves> {
        let bar = ProgressBar::new(args.rounds);
        bar.set_style(
            ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let mut want: BTreeMap<u64, Assembly> = BTreeMap::new();
        let mut seen: HashMap<[u8; 32], Vec<(u32, Vec<u8>)>> = HashMap::new();
        let mut results: BTreeMap<u64, (f32, f32, Vec<f32>)> = BTreeMap::new();
        while (results.len() as u64) < args.rounds {
            let p = tokio::time::timeout(STALL, self.inbox.recv())
                .await
                .with_context(|| {
                    format!(
                        "no new global model in {STALL:?} (after {} rounds)",
                        results.len()
                    )
                })?
                .context("the observer's connection ended")?;
            if p.payload.is_empty() {
                continue;
            }
            let Ok(env) =
                Envelope::open(&p.payload, 16 << 20).and_then(|u| u.verify(&self.aggregator))
            else {
                continue;
            };
            let mut complete = Vec::new();
            match Topic::parse(&p.topic) {
                Some(Topic::JobRound { .. }) => {
                    let Ok(a) = fedge_proto::envelope::decode::<RoundAnnounce<'_>>(env.payload)
                    else {
                        continue;
                    };
                    let v = if a.phase == Phase::Finished {
                        a.model.version
                    } else {
                        a.round - 1
                    };
                    if v == 0
                        || v > args.rounds
                        || results.contains_key(&v)
                        || want.contains_key(&v)
                    {
                        continue;
                    }
                    let mut asm = Assembly::new(a.manifest, 1 << 30, 16 << 20)?;
                    for (i, data) in seen.remove(&a.manifest.sha256).unwrap_or_default() {
                        let _ = asm.insert(&Chunk {
                            object: a.manifest.sha256,
                            index: i,
                            data: &data,
                        });
                    }
                    want.insert(v, asm);
                    complete.push(v);
                }
                Some(Topic::JobModelChunk { version, .. }) => {
                    let Ok(c) = fedge_proto::envelope::decode::<Chunk<'_>>(env.payload) else {
                        continue;
                    };
                    match want.get_mut(&version) {
                        Some(asm) if asm.manifest().sha256 == c.object => {
                            let _ = asm.insert(&c);
                            complete.push(version);
                        }
                        _ => seen
                            .entry(c.object)
                            .or_default()
                            .push((c.index, c.data.to_vec())),
                    }
                }
                _ => {}
            }
            for v in complete {
                if !want.get(&v).is_some_and(Assembly::is_complete) {
                    continue;
                }
                let Some(asm) = want.remove(&v) else { continue };
                let bytes = asm
                    .finish()
                    .context("a global model does not match its hash")?;
                let params = fedge_aggregator::codec::f32_from_le(&bytes);
                let h = Head::from_params(head.kind(), head.features(), head.classes(), &params)?;
                let m = h.loss_and_accuracy(&test.x, &test.y)?;
                let line = format!(
                    "round {v:>3}/{}  test accuracy {:.4}  loss {:.4}",
                    args.rounds, m.accuracy, m.loss
                );
                if args.json {
                    bar.suspend(|| eprintln!("{line}"));
                } else {
                    bar.suspend(|| println!("{line}"));
                }
                bar.set_message(format!("accuracy {:.3}", m.accuracy));
                results.insert(v, (m.accuracy, m.loss, params));
                bar.set_position(results.len() as u64);
            }
        }
        bar.finish_and_clear();
        let last = results
            .values()
            .last()
            .map(|r| r.2.clone())
            .unwrap_or_default();
        let (acc, loss) = results.values().map(|r| (r.0, r.1)).unzip();
        Ok((acc, loss, last))
    }
}

fn write_outputs(args: &Args, s: &Summary, global: &Head, test: &Dataset) -> anyhow::Result<()> {
    let out = &args.out;
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    let title = format!(
        "fedge demo: {} devices, {} rounds, {}, alpha {}",
        s.devices, s.rounds, s.strategy, s.alpha
    );
    write(
        "demo.svg",
        super::plot::svg(&title, &s.accuracy, &s.loss, Some(s.centralized_accuracy)).as_bytes(),
    )?;
    write("model.onnx", &train::export_onnx(global, None, None)?)?;
    let predictions = global.predict(&test.x, test.len())?;
    let text: String = predictions.iter().map(|p| format!("{p}\n")).collect();
    write("predictions.csv", text.as_bytes())?;
    write("test.csv", to_csv(test).as_bytes())?;
    write("summary.json", &serde_json::to_vec_pretty(s)?)?;
    Ok(())
}

fn report(args: &Args, s: &Summary) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "final test accuracy {:.4} (centralized {:.4}, ratio {:.3}); {} devices, {} rounds, {} in {:.1} s",
        s.final_accuracy,
        s.centralized_accuracy,
        s.final_accuracy / s.centralized_accuracy.max(f32::MIN_POSITIVE),
        s.devices,
        s.rounds,
        s.strategy,
        s.seconds
    );
    println!(
        "devices sent {} bytes of updates and fetched {} bytes of models",
        s.bytes_sent, s.bytes_received
    );
    if let (Some(c), Some(z)) = (s.clip_norm, s.noise_multiplier) {
        println!(
            "{} DP: clip {c}, noise multiplier {z}: epsilon {} at delta {} for any device",
            args.dp_mode,
            s.epsilon.map_or_else(|| "-".into(), |e| format!("{e:.3}")),
            args.dp_delta
        );
    }
    if s.secure_aggregation {
        println!(
            "secure aggregation (SecAgg+): the aggregator saw only the sum of each round's updates"
        );
    }
    println!(
        "wrote {0}/demo.svg, {0}/model.onnx, {0}/predictions.csv, {0}/test.csv, {0}/summary.json",
        args.out.display()
    );
    Ok(())
}
