//! `fedge`: check, run and benchmark models on this device, and run a federated-learning demo.

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
    /// Operator keys: the trust anchor devices pin.
    Keys(cmd::keys::Args),
    /// Provision devices (keys, agent config, broker credentials and ACL) and manage the registry.
    Device(cmd::device::Args),
    /// Build and verify signed model bundles.
    Bundle(cmd::bundle::Args),
    /// Federated-learning jobs on the aggregator: start, stop, status.
    Job(cmd::job::Args),
    /// A job's round history: devices selected, accepted, rejected, accuracy, loss (--plot).
    Rounds(cmd::job::RoundsArgs),
    /// Staged rollouts: a signed bundle to a group in waves, with health checks and rollback.
    Rollout(cmd::rollout::Args),
    /// Differential privacy: `dp epsilon` plans a job's (ε, δ) budget.
    Dp(cmd::dp::Args),
    /// Secure aggregation: `secagg plan` picks SecAgg+ parameters and prices them in bytes.
    Secagg(cmd::secagg::Args),
    /// Run federated learning end to end on this machine: aggregator, broker and N devices.
    Demo(cmd::demo::Args),
}

/// Help and version go out as clap writes them; a usage error becomes one line (exit code 2).
fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let text = e.render().to_string();
        let reason = text.split("\n\nUsage:").next().unwrap_or(&text);
        let words: Vec<&str> = reason.split_whitespace().collect();
        eprintln!("{} (see --help)", words.join(" "));
        ExitCode::from(2)
    })
}

/// The embedded broker (`fedge demo`) logs every closed connection as an error: quiet unless
/// asked for.
fn log_filter(given: &str) -> String {
    if given.contains("rumqttd") {
        given.to_string()
    } else {
        format!("{given},rumqttd=off")
    }
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(&cli.log)))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Check(a) => cmd::check::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Keys(a) => cmd::keys::run(a),
        Command::Device(a) => cmd::device::run(a),
        Command::Bundle(a) => cmd::bundle::run(a),
        Command::Rollout(a) => cmd::rollout::run(a),
        Command::Job(a) => cmd::job::run(a),
        Command::Rounds(a) => cmd::job::rounds(a),
        Command::Dp(a) => cmd::dp::run(a),
        Command::Secagg(a) => cmd::secagg::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
