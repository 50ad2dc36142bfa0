//! `fedge secagg`: secure-aggregation planning.

use anyhow::Context;
use fedge_fl::Codec;
use fedge_fl::secagg::Params;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// SecAgg+ parameters for a round of N devices and P values: neighbours k, threshold t,
    /// modulus bits m, the chance that dropouts fail the round, and the bytes a device sends
    /// against a plain 16-bit update (docs/secagg.md).
    Plan(PlanArgs),
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// N: devices in the round (at least 3).
    #[arg(long, value_name = "N")]
    pub devices: usize,
    /// P: values per update.
    #[arg(long, value_name = "P")]
    pub params: usize,
    /// The probability that a device drops out at some point of the round, in [0, 1).
    #[arg(long, value_name = "D", default_value_t = 0.1)]
    pub dropout: f64,
    /// The acceptable probability that dropouts fail the round, in (0, 1): k is the smallest
    /// that meets it. Without it, the defaults (k = 2⌈3.5 log₂ N⌉).
    #[arg(long, value_name = "F")]
    pub failure: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Command::Plan(p) => plan(&p),
    }
}

fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    let params = match a.failure {
        Some(f) => Params::for_dropout(a.devices, a.params, 1.0, a.dropout, f),
        None => Params::new(a.devices, a.params, 1.0),
    }
    .context("invalid --devices, --params, --dropout or --failure")?;
    anyhow::ensure!(
        (0.0..1.0).contains(&a.dropout),
        "invalid --dropout {}: must be in [0, 1)",
        a.dropout
    );
    let failure = params.failure_probability(a.devices, a.dropout);
    let sent = params.sent_bytes();
    let plain = Codec::F16.encoded_len(a.params) + 64;
    let ratio = sent as f64 / plain as f64;
    if a.json {
        let doc = serde_json::json!({
            "devices": a.devices, "params": a.params, "dropout": a.dropout,
            "neighbours": params.neighbours, "threshold": params.threshold,
            "quant_bits": params.quant_bits, "mod_bits": params.mod_bits,
            "failure_probability": failure, "sent_bytes": sent, "plain_bytes": plain,
            "sent_ratio": ratio,
        });
        println!("{doc}");
        return Ok(());
    }
    println!(
        "{} devices, {} values: k = {} neighbours, threshold t = {}, {}-bit values in a {}-bit modulus",
        a.devices,
        a.params,
        params.neighbours,
        params.threshold,
        params.quant_bits,
        params.mod_bits
    );
    println!(
        "round fails with {:.0}% dropout: probability at most {failure:.3e}",
        a.dropout * 100.0
    );
    println!(
        "a device sends {sent} bytes a round: {ratio:.2}× a plain 16-bit update ({plain} bytes)"
    );
    Ok(())
}
