//! The digits experiment with secure aggregation: DP-FedAvg rounds whose sum goes through a
//! full SecAgg+ round (`fedge_fl::secagg`) between simulated devices, with the aggregator's
//! Gaussian noise added to the unmasked sum. Reads a split written by
//! `fedge demo --dump-split DIR`, so the shards, the start and the SGD settings are the demo's.
//!
//! ```sh
//! fedge demo --seed 7 --devices 100 --dump-split /tmp/split100 --json > /dev/null
//! cargo run --profile ci -p fedge --example secagg_digits -- /tmp/split100 \
//!     [--rounds 30] [--clip-norm 1] [--dp-epsilon 8] [--dp-delta 1e-5] [--drop-percent 10] \
//!     [--plain]
//! ```
//!
//! In one process, without MQTT: each round every device trains its shard from the global
//! model (one epoch of the split's SGD), clips its delta to L2 norm C and takes part in a
//! SecAgg+ round moving the real wire encodings; `--drop-percent` devices (a different set each
//! round) drop after sharing their keys, so their pairwise masks are rebuilt. The aggregator
//! adds N(0, (zC)²) to the unmasked sum of the survivors, divides by their count and adds the
//! mean to the global model. `z` is the smallest noise multiplier whose RDP ε after all rounds
//! (sampling rate 1) is at most `--dp-epsilon`. `--plain` sums the clipped deltas in the clear
//! instead, for comparison. Prints one JSON line.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fedge_fl::dp::{
    CentralDp, Clipping, NoiseRng, RdpAccountant, SampledGaussian, noise_multiplier_for,
};
use fedge_fl::secagg::{Client, Params, RoundSetup, Server, wire};
use fedge_runtime::train::data::{Dataset, read_csv};
use fedge_runtime::train::{Head, HeadKind, TrainConfig, train};
use ring::signature::{Ed25519KeyPair, KeyPair};

struct Args {
    dir: PathBuf,
    rounds: u64,
    clip: f64,
    epsilon: Option<f64>,
    delta: f64,
    drop_percent: usize,
    plain: bool,
}

fn parse() -> Result<Args, Box<dyn Error>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        dir: PathBuf::new(),
        rounds: 30,
        clip: 1.0,
        epsilon: None,
        delta: 1e-5,
        drop_percent: 0,
        plain: false,
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse()?,
            "--clip-norm" => a.clip = value()?.parse()?,
            "--dp-epsilon" => a.epsilon = Some(value()?.parse()?),
            "--dp-delta" => a.delta = value()?.parse()?,
            "--drop-percent" => a.drop_percent = value()?.parse()?,
            "--plain" => a.plain = true,
            f if f.starts_with("--") => return Err(format!("unknown flag {f}").into()),
            dir => a.dir = PathBuf::from(dir),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err(
            "usage: secagg_digits SPLIT_DIR [--rounds N] [--clip-norm C] \
                    [--dp-epsilon E] [--dp-delta D] [--drop-percent P] [--plain]"
                .into(),
        );
    }
    Ok(a)
}

fn epsilon_after(z: f64, rounds: u64, delta: f64) -> Option<f64> {
    let m = SampledGaussian::new(z, 1.0).ok()?;
    let mut acc = RdpAccountant::new();
    acc.compose(&m, rounds);
    acc.epsilon(delta).ok()
}

struct Split {
    shards: Vec<Dataset>,
    test: Dataset,
    init: Vec<f32>,
    features: usize,
    classes: usize,
    cfg: TrainConfig,
    seed: u64,
}

fn load(dir: &Path) -> Result<Split, Box<dyn Error>> {
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("split.json"))?)?;
    let num = |k: &str| meta[k].as_f64().ok_or(format!("split.json: no {k}"));
    if meta["head"].as_str() != Some("softmax") {
        return Err("only the softmax head is supported".into());
    }
    let devices = num("devices")? as usize;
    let mut shards = Vec::with_capacity(devices);
    for i in 0..devices {
        shards.push(read_csv(dir.join(format!("dev-{i:02}.csv")))?);
    }
    let init: Vec<f32> = meta["initial_params"]
        .as_array()
        .ok_or("split.json: no initial_params")?
        .iter()
        .map(|v| v.as_f64().map(|x| x as f32).ok_or("bad parameter"))
        .collect::<Result<_, _>>()?;
    Ok(Split {
        shards,
        test: read_csv(dir.join("test.csv"))?,
        init,
        features: num("features")? as usize,
        classes: num("classes")? as usize,
        cfg: TrainConfig {
            epochs: num("epochs")? as usize,
            batch_size: num("batch_size")? as usize,
            learning_rate: num("learning_rate")? as f32,
            momentum: 0.0,
            weight_decay: 0.0,
            proximal_mu: 0.0,
            seed: 0,
        },
        seed: num("seed")? as u64,
    })
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = (a ^ b.rotate_left(29)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SecAgg+ round over `updates` with the devices in `drop` dropping after sharing keys.
/// Returns the dequantised sum of the survivors, their count and the mean bytes a device sent.
fn secure_sum(
    round: u64,
    signers: &[Ed25519KeyPair],
    updates: &[Vec<f32>],
    clip: f32,
    drop: &[bool],
) -> Result<(Vec<f32>, usize, f64), Box<dyn Error>> {
    let n = signers.len();
    let roster: Vec<[u8; 32]> = signers
        .iter()
        .map(|s| s.public_key().as_ref().try_into())
        .collect::<Result<_, _>>()?;
    let params = Params::new(n, updates[0].len(), clip)?;
    let setup = Arc::new(RoundSetup::new("digits", round, roster.clone(), params)?);
    let mut clients: Vec<Client> = roster
        .iter()
        .map(|k| Client::new(setup.clone(), k))
        .collect::<Result<_, _>>()?;
    let mut server = Server::new(setup.clone());
    let mut sent = 0usize;
    for (i, c) in clients.iter_mut().enumerate() {
        let bytes = wire::encode_keys(&c.advertise(&signers[i])?);
        sent += bytes.len();
        server.receive_keys(wire::decode_keys(&bytes)?)?;
    }
    server.close_keys()?;
    for (i, c) in clients.iter_mut().enumerate() {
        let keys = server.keys_for(i as u32);
        let bytes = wire::encode_shares(&c.share(&signers[i], &keys)?);
        sent += bytes.len();
        server.receive_shares(wire::decode_shares(&bytes)?)?;
    }
    let u2 = server.close_shares()?;
    for (i, c) in clients.iter_mut().enumerate() {
        if drop[i] {
            continue;
        }
        let items = server.shares_for(i as u32);
        let bytes = c.mask(&signers[i], &u2, &items, &updates[i])?.to_bytes();
        sent += bytes.len();
        server.receive_masked(wire::MaskedInput::from_bytes(&bytes)?)?;
    }
    let u3 = server.close_masked()?;
    for &i in &u3 {
        let c = clients[i as usize].confirm(&signers[i as usize], &u3)?;
        let bytes = wire::encode_confirmations(std::slice::from_ref(&c));
        sent += bytes.len();
        for c in wire::decode_confirmations(&bytes)? {
            server.receive_confirmation(c)?;
        }
    }
    let confs = server.close_confirmations()?;
    for &i in &u3 {
        let bytes = clients[i as usize]
            .unmask(&signers[i as usize], &confs)?
            .to_bytes();
        sent += bytes.len();
        server.receive_reveals(wire::Reveals::from_bytes(&bytes)?)?;
    }
    let agg = server.finish()?;
    Ok((agg.sum, agg.survivors.len(), sent as f64 / n as f64))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse()?;
    let split = load(&args.dir)?;
    let n = split.shards.len();
    let z = match args.epsilon {
        Some(e) => Some(noise_multiplier_for(e, 1.0, args.rounds, args.delta)?),
        None => None,
    };
    let signers: Vec<Ed25519KeyPair> = (0..n)
        .map(|i| {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| "rng")?;
            seed[0] ^= i as u8;
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| "key")
        })
        .collect::<Result<_, _>>()?;
    let mut rng = NoiseRng::from_system()?;
    let mut global = split.init.clone();
    let mut curve = Vec::new();
    let mut bytes_per_device = 0.0;
    let mut secagg_seconds = 0.0;
    for round in 1..=args.rounds {
        let mut updates = Vec::with_capacity(n);
        for (i, shard) in split.shards.iter().enumerate() {
            let mut head =
                Head::from_params(HeadKind::Softmax, split.features, split.classes, &global)?;
            let cfg = TrainConfig {
                seed: mix(mix(split.seed, i as u64), round),
                ..split.cfg.clone()
            };
            train(&mut head, &shard.x, &shard.y, &cfg, None)?;
            let mut delta: Vec<f32> = head
                .params()
                .iter()
                .zip(&global)
                .map(|(a, b)| a - b)
                .collect();
            fedge_fl::clip_l2(&mut delta, args.clip as f32)?;
            updates.push(delta);
        }
        let drop: Vec<bool> = (0..n)
            .map(|i| mix(round, i as u64) % 100 < args.drop_percent as u64)
            .collect();
        let (mut sum, count) = if args.plain {
            let mut sum = vec![0f32; global.len()];
            let mut count = 0;
            for (u, d) in updates.iter().zip(&drop) {
                if !d {
                    sum.iter_mut().zip(u).for_each(|(s, v)| *s += v);
                    count += 1;
                }
            }
            (sum, count)
        } else {
            let t = Instant::now();
            let (sum, count, bytes) =
                secure_sum(round, &signers, &updates, args.clip as f32, &drop)?;
            secagg_seconds += t.elapsed().as_secs_f64();
            bytes_per_device = bytes;
            (sum, count)
        };
        if let Some(z) = z {
            let mut dp = CentralDp::new(z, Clipping::Fixed(args.clip))?;
            dp.noise_sum(&mut sum, 0, count as u64, &mut rng)?;
        }
        for (g, s) in global.iter_mut().zip(&sum) {
            *g += s / count as f32;
        }
        let head = Head::from_params(HeadKind::Softmax, split.features, split.classes, &global)?;
        curve.push(
            head.loss_and_accuracy(&split.test.x, &split.test.y)?
                .accuracy,
        );
    }
    let eps = z.and_then(|z| epsilon_after(z, args.rounds, args.delta));
    println!(
        "{}",
        serde_json::json!({
            "devices": n, "rounds": args.rounds, "clip_norm": args.clip,
            "secagg": !args.plain, "drop_percent": args.drop_percent,
            "noise_multiplier": z, "epsilon": eps, "delta": args.delta,
            "final_accuracy": curve.last(), "accuracy_by_round": curve,
            "secagg_bytes_sent_per_device": bytes_per_device,
            "secagg_seconds": secagg_seconds,
        })
    );
    Ok(())
}
