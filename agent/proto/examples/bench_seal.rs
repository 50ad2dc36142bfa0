//! CPU cost and bytes of a sealed update against the same update signed in clear, for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo run --profile ci --example bench_seal -- [--params 100000] [--reps 30]
//! ```
//!
//! The update carries an f16 delta (2 bytes per parameter). Device: encode, (seal,) sign.
//! Aggregator: verify, (open,) decode, plus one recipient key pair per device and round for
//! sealed jobs. Median of `--reps` runs each. Prints one JSON line.

use std::error::Error;
use std::time::Instant;

use fedge_proto::envelope::{decode, encode};
use fedge_proto::msg::Update;
use fedge_proto::seal::{self, OpeningKey, Sealed};
use fedge_proto::{Envelope, Kind, Signer};

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, Box<dyn Error>> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or("missing value")?.parse()?),
        None => Ok(default),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let params = arg(&args, "--params", 100_000)?;
    let reps = arg(&args, "--reps", 30)?.max(1);
    let delta: Vec<u8> = (0..params * 2).map(|i| (i * 7 + i / 3) as u8).collect();
    let (signer, _) = Signer::generate()?;
    let public = signer.public_key();
    let rng = ring::rand::SystemRandom::new();
    let u = Update {
        job: "digits",
        round: 3,
        base_version: 2,
        num_samples: 100,
        loss: 0.5,
        accuracy: 0.9,
        delta: &delta,
    };
    let aad = seal::associated_data("digits", 3, "dev-0001");
    let (mut dev_plain, mut dev_sealed) = (Vec::new(), Vec::new());
    let (mut agg_plain, mut agg_sealed, mut agg_keygen) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_bytes, mut sealed_bytes) = (0, 0);
    for _ in 0..reps {
        let t = Instant::now();
        let payload = encode(&u)?;
        let wire = Envelope::new(Kind::Update, "dev-0001", 1, 3, &payload).seal(&signer)?;
        dev_plain.push(ms(t));
        plain_bytes = wire.len();

        let t = Instant::now();
        let env = Envelope::open(&wire, usize::MAX)?.verify(&public)?;
        let back: Update<'_> = decode(env.payload)?;
        agg_plain.push(ms(t));
        assert_eq!(back.delta.len(), delta.len());

        let t = Instant::now();
        let key = OpeningKey::generate(&rng)?;
        agg_keygen.push(ms(t));

        let t = Instant::now();
        let payload = seal::seal(key.public(), &aad, &encode(&u)?)?;
        let wire = Envelope::new(Kind::Update, "dev-0001", 2, 3, &payload).seal(&signer)?;
        dev_sealed.push(ms(t));
        sealed_bytes = wire.len();

        let t = Instant::now();
        let env = Envelope::open(&wire, usize::MAX)?.verify(&public)?;
        let s: Sealed<'_> = decode(env.payload)?;
        let plain = key.open(&s, &aad)?;
        let back: Update<'_> = decode(&plain)?;
        agg_sealed.push(ms(t));
        assert_eq!(back.delta, &delta[..]);
    }
    let (dp, ds) = (median(dev_plain), median(dev_sealed));
    let (ap, asl, kg) = (median(agg_plain), median(agg_sealed), median(agg_keygen));
    println!(
        "{{\"params\":{params},\"reps\":{reps},\"plain_bytes\":{plain_bytes},\"sealed_bytes\":{sealed_bytes},\
         \"device_plain_ms\":{dp:.4},\"device_sealed_ms\":{ds:.4},\"device_ratio\":{:.3},\
         \"aggregator_plain_ms\":{ap:.4},\"aggregator_sealed_ms\":{asl:.4},\"aggregator_ratio\":{:.3},\
         \"aggregator_keygen_ms\":{kg:.4}}}",
        ds / dp,
        asl / ap
    );
    Ok(())
}
