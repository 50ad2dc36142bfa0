//! Bytes and CPU time of one SecAgg+ round against a plain 16-bit update, for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo run --profile ci -p fedge-fl --example bench_secagg -- --devices 50 --params 100000 \
//!     [--drop-percent 10]
//! ```
//!
//! Simulates every device and the aggregator in one process, moving the real wire encodings.
//! Device CPU time is the mean over devices of the time in their five `Client` calls; the
//! aggregator's is the time in its `receive_*`, `close_*`, relay and `finish` calls. With
//! `--drop-percent`, that share of devices drops after sharing keys (the costly case: their
//! pairwise masks are rebuilt). Bytes are what a device sends and receives, payloads only
//! (no MQTT framing); the plain baseline is fedge's f16 update codec plus a 64-byte signature,
//! sent once, with the model download not counted on either side. Prints one JSON line.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_fl::Codec;
use fedge_fl::secagg::{Client, Params, RoundSetup, Server, wire};
use ring::signature::{Ed25519KeyPair, KeyPair};

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, Box<dyn Error>> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or("missing value")?.parse()?),
        None => Ok(default),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--devices", 50)?;
    let len = arg(&args, "--params", 100_000)?;
    let drop_percent = arg(&args, "--drop-percent", 0)?;

    let signers: Vec<Ed25519KeyPair> = (0..n)
        .map(|i| {
            let mut seed = [1u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| "key")
        })
        .collect::<Result<_, _>>()?;
    let roster: Vec<[u8; 32]> = signers
        .iter()
        .map(|s| s.public_key().as_ref().try_into())
        .collect::<Result<_, _>>()?;
    let params = Params::new(n, len, 1.0)?;
    let setup = Arc::new(RoundSetup::new("bench", 1, roster, params.clone())?);
    let mut clients: Vec<Client> = roster_clients(&setup, &signers)?;
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|d| {
            (0..len)
                .map(|k| (((d * 7919 + k * 104_729) % 20_001) as f32 / 10_000.0) - 1.0)
                .collect()
        })
        .collect();
    let dropped = n * drop_percent / 100;

    let mut server = Server::new(setup.clone());
    let mut device_time = vec![Duration::ZERO; n];
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut server_time = Duration::ZERO;

    for (i, c) in clients.iter_mut().enumerate() {
        let t = Instant::now();
        let keys = c.advertise(&signers[i])?;
        device_time[i] += t.elapsed();
        let bytes = wire::encode_keys(&keys);
        sent[i] += bytes.len();
        let t = Instant::now();
        server.receive_keys(wire::decode_keys(&bytes)?)?;
        server_time += t.elapsed();
    }
    let t = Instant::now();
    let u1 = server.close_keys()?;
    let relay: Vec<Vec<u8>> = (0..n as u32)
        .map(|i| wire::encode_keys(&server.keys_for(i)))
        .collect();
    server_time += t.elapsed();
    for (i, c) in clients.iter_mut().enumerate() {
        received[i] += relay[i].len() + wire::encode_ids(&u1).len();
        let t = Instant::now();
        let items = c.share(&signers[i], &wire::decode_keys(&relay[i])?)?;
        let bytes = wire::encode_shares(&items);
        device_time[i] += t.elapsed();
        sent[i] += bytes.len();
        let t = Instant::now();
        server.receive_shares(wire::decode_shares(&bytes)?)?;
        server_time += t.elapsed();
    }
    let t = Instant::now();
    let u2 = server.close_shares()?;
    let relay: Vec<Vec<u8>> = (0..n as u32)
        .map(|i| wire::encode_shares(&server.shares_for(i)))
        .collect();
    server_time += t.elapsed();
    for (i, c) in clients.iter_mut().enumerate() {
        received[i] += relay[i].len() + wire::encode_ids(&u2).len();
        if i < dropped {
            continue;
        }
        let t = Instant::now();
        let masked = c.mask(
            &signers[i],
            &u2,
            &wire::decode_shares(&relay[i])?,
            &inputs[i],
        )?;
        let bytes = masked.to_bytes();
        device_time[i] += t.elapsed();
        sent[i] += bytes.len();
        let t = Instant::now();
        server.receive_masked(wire::MaskedInput::from_bytes(&bytes)?)?;
        server_time += t.elapsed();
    }
    let t = Instant::now();
    let u3 = server.close_masked()?;
    server_time += t.elapsed();
    for &i in &u3 {
        let i = i as usize;
        received[i] += wire::encode_ids(&u3).len();
        let t = Instant::now();
        let c = clients[i].confirm(&signers[i], &u3)?;
        let bytes = wire::encode_confirmations(std::slice::from_ref(&c));
        device_time[i] += t.elapsed();
        sent[i] += bytes.len();
        let t = Instant::now();
        for c in wire::decode_confirmations(&bytes)? {
            server.receive_confirmation(c)?;
        }
        server_time += t.elapsed();
    }
    let t = Instant::now();
    let confs = wire::encode_confirmations(&server.close_confirmations()?);
    server_time += t.elapsed();
    for &i in &u3 {
        let i = i as usize;
        received[i] += confs.len();
        let t = Instant::now();
        let reveals = clients[i].unmask(&signers[i], &wire::decode_confirmations(&confs)?)?;
        let bytes = reveals.to_bytes();
        device_time[i] += t.elapsed();
        sent[i] += bytes.len();
        let t = Instant::now();
        server.receive_reveals(wire::Reveals::from_bytes(&bytes)?)?;
        server_time += t.elapsed();
    }
    let t = Instant::now();
    let agg = server.finish()?;
    server_time += t.elapsed();
    if agg.survivors.len() != n - dropped {
        return Err("wrong survivor count".into());
    }

    let plain = Codec::F16.encoded_len(len) as f64 + 64.0;
    let survivors: Vec<usize> = u3.iter().map(|&i| i as usize).collect();
    let mean = |v: &[usize]| {
        survivors.iter().map(|&i| v[i]).sum::<usize>() as f64 / survivors.len() as f64
    };
    let device_ms = survivors
        .iter()
        .map(|&i| device_time[i].as_secs_f64())
        .sum::<f64>()
        / survivors.len() as f64
        * 1e3;
    println!(
        "{{\"devices\":{n},\"params\":{len},\"neighbours\":{},\"threshold\":{},\"mod_bits\":{},\
         \"dropped\":{dropped},\"plain_bytes\":{plain},\"sent_bytes\":{:.0},\"received_bytes\":{:.0},\
         \"sent_ratio\":{:.3},\"device_ms\":{device_ms:.1},\"aggregator_ms\":{:.1}}}",
        params.neighbours,
        params.threshold,
        params.mod_bits,
        mean(&sent),
        mean(&received),
        mean(&sent) / plain,
        server_time.as_secs_f64() * 1e3
    );
    Ok(())
}

fn roster_clients(
    setup: &Arc<RoundSetup>,
    signers: &[Ed25519KeyPair],
) -> Result<Vec<Client>, Box<dyn Error>> {
    signers
        .iter()
        .map(|s| {
            let key: [u8; 32] = s.public_key().as_ref().try_into()?;
            Ok(Client::new(setup.clone(), &key)?)
        })
        .collect()
}
