//! `fedge dp`: differential-privacy planning.

use anyhow::Context;
use fedge_fl::dp::{RdpAccountant, SampledGaussian};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// ε of the Poisson-sampled Gaussian mechanism over T steps, for δ (RDP accountant,
    /// matches Google's dp-accounting). The last line of output is the bare ε.
    Epsilon(EpsilonArgs),
}

#[derive(Debug, clap::Args)]
pub struct EpsilonArgs {
    /// z: noise stddev divided by the clipping norm (> 0).
    #[arg(long, value_name = "Z")]
    pub noise_multiplier: f64,
    /// q: the probability that a device takes part in a round, in [0, 1].
    #[arg(long, value_name = "Q")]
    pub sampling_rate: f64,
    /// T: rounds (steps) composed.
    #[arg(long, value_name = "T")]
    pub steps: u64,
    /// δ, in (0, 1).
    #[arg(long, value_name = "D")]
    pub delta: f64,
    /// Print one JSON object (its last line is still the object, not the bare ε).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        Command::Epsilon(e) => epsilon(&e),
    }
}

fn epsilon(a: &EpsilonArgs) -> anyhow::Result<()> {
    let mechanism = SampledGaussian::new(a.noise_multiplier, a.sampling_rate)
        .context("invalid --noise-multiplier or --sampling-rate")?;
    let mut accountant = RdpAccountant::new();
    accountant.compose(&mechanism, a.steps);
    let (epsilon, order) = accountant
        .epsilon_and_order(a.delta)
        .context("invalid --delta")?;
    if a.json {
        let doc = serde_json::json!({
            "noise_multiplier": a.noise_multiplier,
            "sampling_rate": a.sampling_rate,
            "steps": a.steps,
            "delta": a.delta,
            "epsilon": if epsilon.is_finite() { Some(epsilon) } else { None },
            "optimal_order": order,
        });
        println!("{doc}");
        return Ok(());
    }
    println!(
        "sampled Gaussian: z = {}, q = {}, T = {}, delta = {}: epsilon = {epsilon} at RDP order {order}",
        a.noise_multiplier, a.sampling_rate, a.steps, a.delta
    );
    println!("{epsilon}");
    Ok(())
}
