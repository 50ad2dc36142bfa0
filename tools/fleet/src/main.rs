//! `fedge`: check, run and benchmark models on this device.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "fedge", version, about = "fedge: edge ML runtime and federated-learning fleet tool", long_about = None)]
struct Cli {
    /// Log filter (e.g. `info`, `fedge_runtime=debug`); also read from FEDGE_LOG.
    #[arg(long, global = true, env = "FEDGE_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect a model: inputs, outputs, operators, quantization, what each backend would run.
    Check(cmd::check::Args),
    /// Run a model once on .npy inputs and write one .npy per output.
    Run(cmd::run::Args),
    /// Measure load time, latency percentiles, throughput and peak memory.
    Bench(cmd::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Check(a) => cmd::check::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
