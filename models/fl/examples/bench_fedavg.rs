//! Streaming FedAvg of N synthetic client updates of P parameters, timed, for
//! `tools/scripts/bench_fedavg.sh`, which runs Flower's `aggregate` on the same data beside it.
//!
//! ```sh
//! cargo run --profile ci -p fedge-fl --example bench_fedavg -- --clients 100 --params 100000 \
//!     [--seed 1] [--out model.f32]
//! ```
//!
//! Client `c`'s value `k` is `(splitmix64((c << 32 | k) ^ seed) >> 40) · 2⁻²³ − 1`, exactly
//! representable in f32, and its sample count `1 + splitmix64(c ^ 0xABCDEF) mod 1000`; the
//! Python side computes the same numbers with numpy. Each update is generated, then handed to
//! `accumulate`, then dropped, as a service receiving updates one at a time would; only
//! `begin`, `accumulate` and `finish` are timed. Prints one JSON line; `--out` writes the new
//! model as little-endian f32.

use std::error::Error;
use std::time::{Duration, Instant};

use fedge_fl::{ClientUpdate, FedAvg, Strategy};

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn client_params(seed: u64, client: u64, params: usize) -> Vec<f32> {
    (0..params as u64)
        .map(|k| (splitmix64(((client << 32) | k) ^ seed) >> 40) as f32 * 2f32.powi(-23) - 1.0)
        .collect()
}

fn num_samples(client: u64) -> u64 {
    1 + splitmix64(client ^ 0xAB_CDEF) % 1000
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}

struct Args {
    clients: u64,
    params: usize,
    seed: u64,
    out: Option<String>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        clients: 100,
        params: 100_000,
        seed: 1,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--clients" => args.clients = value.parse()?,
            "--params" => args.params = value.parse()?,
            "--seed" => args.seed = value.parse()?,
            "--out" => args.out = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let mut strategy = FedAvg::new();
    let global = vec![0.0f32; args.params];
    let (mut timed, mut generating) = (Duration::ZERO, Duration::ZERO);

    let t = Instant::now();
    strategy.begin(1, &global)?;
    timed += t.elapsed();
    for c in 0..args.clients {
        let t = Instant::now();
        let update = ClientUpdate::new(
            format!("c{c}"),
            num_samples(c),
            client_params(args.seed, c, args.params),
        );
        generating += t.elapsed();
        let t = Instant::now();
        strategy.accumulate(update)?;
        timed += t.elapsed();
    }
    let t = Instant::now();
    let model = strategy.finish(0)?.ok_or("no model")?;
    timed += t.elapsed();

    if let Some(path) = &args.out {
        let bytes: Vec<u8> = model.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes)?;
    }
    println!(
        "{{\"clients\": {}, \"params\": {}, \"aggregate_s\": {:.6}, \"generate_s\": {:.6}, \"peak_rss_mib\": {:.1}}}",
        args.clients,
        args.params,
        timed.as_secs_f64(),
        generating.as_secs_f64(),
        peak_rss_mib()
    );
    Ok(())
}
