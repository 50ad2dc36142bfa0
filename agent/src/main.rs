//! `fedge-agent`: the device daemon's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_agent::{Config, Service};

/// The fedge device agent: installs signed model bundles (verified, self-tested, rolled back on
/// failure), runs the active model on local inputs, and reports status and telemetry over MQTT.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Agent configuration (TOML; see docs/agent.md).
    #[arg(long, short, global = true, env = "FEDGE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (`info`, `fedge_agent=debug`, ...).
    #[arg(long, global = true, env = "FEDGE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Create the device key (mode 0600, never overwritten) and print its public key in hex, for
    /// the operator's device registry.
    Init,
    /// Measure QoS 1 messages per second through the link against a broker.
    BenchLink {
        /// Broker URL; default: the config's.
        #[arg(long)]
        broker: Option<String>,
        /// Messages to publish.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Messages in flight.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Queue every message in a disk outbox in this directory first, as the agent does.
        #[arg(long)]
        outbox: Option<PathBuf>,
        /// With --outbox: skip the fsync of each message (the agent fsyncs only messages it never
        /// drops).
        #[arg(long)]
        no_fsync: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
        .context("starting the async runtime")?;
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => rt.block_on(run(&config(&cli.config)?)),
        Cmd::Init => init(&config(&cli.config)?),
        Cmd::BenchLink {
            broker,
            count,
            size,
            window,
            outbox,
            no_fsync,
        } => {
            let mut b =
                match (&cli.config, broker) {
                    (Some(path), url) => {
                        let mut b = Config::load(path)?.broker;
                        if let Some(url) = url {
                            b.url = url;
                        }
                        b
                    }
                    (None, Some(url)) => Config::from_toml(&format!(
                        "device_id = \"bench\"\noperator_key = \"{}\"\n[broker]\nurl = {url:?}\n",
                        "0".repeat(64)
                    ))
                    .map_err(anyhow::Error::msg)?
                    .broker,
                    (None, None) => anyhow::bail!("give --broker URL or --config FILE"),
                };
            b.max_packet_bytes = b.max_packet_bytes.max(size + 1024);
            let r = rt.block_on(fedge_agent::bench::bench_link(
                &b,
                count,
                size,
                window,
                outbox.as_deref(),
                !no_fsync,
            ))?;
            println!(
                "{} messages of {size} B in {:.3} s: {:.0} msg/s, {:.1} MB/s (QoS 1, window {window}{})",
                r.messages,
                r.seconds,
                r.per_second(),
                r.bytes as f64 / r.seconds.max(1e-9) / 1e6,
                match (&outbox, no_fsync) {
                    (None, _) => "",
                    (Some(_), false) => ", through the disk outbox, fsync per message",
                    (Some(_), true) => ", through the disk outbox, no fsync",
                }
            );
            Ok(())
        }
    }
}

fn config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    let path = path.as_ref().context("--config FILE is required")?;
    Ok(Config::load(path)?)
}

fn init(cfg: &Config) -> anyhow::Result<()> {
    let path = cfg.key_path();
    if let Some(dir) = path.parent() {
        fedge_agent::fsx::create_dir(dir, true)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let signer = if path.exists() {
        eprintln!("{} exists; keeping it", path.display());
        fedge_proto::keys::file::load(&path)
    } else {
        fedge_proto::keys::file::create(&path)
    }
    .with_context(|| format!("key file {}", path.display()))?;
    println!("{}", signer.public_key());
    Ok(())
}

async fn run(cfg: &Config) -> anyhow::Result<()> {
    let service = Service::open(cfg.clone())?;
    service.run(shutdown_signal()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
