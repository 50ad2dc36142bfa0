//! `fedge-aggregator`: the federated aggregation service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedge_aggregator::Config;
use fedge_aggregator::lifecycle::{self, unix_ms};
use fedge_aggregator::store::Store;

/// Runs federated-learning rounds for fedge devices over MQTT.
///
/// Without --broker it embeds an MQTT broker (listening on --mqtt-listen), so one command is a
/// complete server. Everything acknowledged to a device is on disk under --data: a killed
/// aggregator resumes the round it was in.
#[derive(Debug, Parser)]
#[command(name = "fedge-aggregator", version, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Cmd>,
}

const EXAMPLES: &str = "\
Examples:
  fedge-aggregator --config aggregator.toml --data /var/lib/fedge --http 127.0.0.1:8080
  fedge-aggregator --config aggregator.toml --broker mqtts://agg:secret@broker.example:8883
  fedge-aggregator key --data /var/lib/fedge
  fedge-aggregator register --data /var/lib/fedge --id dev-01 --public-key <64 hex>
Reference: docs/aggregator.md";

#[derive(Debug, Args)]
struct Common {
    /// Configuration file (TOML): fleet, broker, devices, jobs.
    #[arg(
        long,
        short,
        global = true,
        value_name = "FILE",
        env = "FEDGE_AGGREGATOR_CONFIG"
    )]
    config: Option<PathBuf>,
    /// Data directory: the store (aggregator.redb) and the key (aggregator.key).
    #[arg(long, global = true, value_name = "DIR", env = "FEDGE_AGGREGATOR_DATA")]
    data: Option<PathBuf>,
    /// Broker URL (mqtt://host:1883, mqtts://user:pass@host:8883). Absent: embedded broker.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "FEDGE_AGGREGATOR_BROKER"
    )]
    broker: Option<String>,
    /// Where the embedded broker listens [default: 127.0.0.1:1883].
    #[arg(long, global = true, value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// Where /status, /metrics and /api listen (absent: no HTTP).
    #[arg(long, global = true, value_name = "ADDR")]
    http: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the service (the default).
    Run,
    /// Create the aggregator key if absent (mode 0600) and print its public key.
    Key,
    /// Register a device in the store (the service must be stopped; while it runs, use
    /// POST /api/devices).
    Register {
        /// Device id (1-64 characters of [A-Za-z0-9._-]).
        #[arg(long)]
        id: String,
        /// 64 hex characters.
        #[arg(long, value_name = "HEX")]
        public_key: String,
    },
    /// Revoke a device in the store (the service must be stopped; while it runs, use
    /// POST /api/devices/{id}/revoke).
    Revoke {
        /// Device id.
        #[arg(long)]
        id: String,
    },
}

fn config(c: &Common) -> anyhow::Result<Config> {
    let mut cfg = match &c.config {
        Some(p) => Config::load(p).with_context(|| format!("loading {}", p.display()))?,
        None => Config::default(),
    };
    if let Some(d) = &c.data {
        cfg.data_dir = d.clone();
    }
    if let Some(b) = &c.broker {
        cfg.broker.url = Some(b.clone());
    }
    if let Some(l) = c.mqtt_listen {
        cfg.broker.listen = l;
    }
    if let Some(h) = c.http {
        cfg.http = Some(h);
    }
    Ok(cfg)
}

fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let path = cfg.data_dir.join(fedge_aggregator::service::STORE_FILE);
    Store::open(&path)
        .with_context(|| format!("opening {} (is the aggregator running?)", path.display()))
}

async fn shutdown() {
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
    tracing::info!("shutting down");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = config(&cli.common)?;
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => {
            let service = fedge_aggregator::Service::bind(cfg).await?;
            tracing::info!(
                broker = service.broker_url(),
                http = ?service.http_addr(),
                public_key = %service.public_key(),
                "aggregator started"
            );
            service.run(shutdown()).await?;
        }
        Cmd::Key => {
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
            let path = cfg.key_path();
            let signer = fedge_proto::keys::file::load_or_create(&path)
                .with_context(|| format!("key {}", path.display()))?;
            println!("{}", signer.public_key());
        }
        Cmd::Register { id, public_key } => {
            let key = fedge_proto::PublicKey::from_hex(&public_key)
                .context("public key must be 64 hex characters")?;
            let store = open_store(&cfg)?;
            let txn = store.begin()?;
            let (_, changed) = lifecycle::register(&txn, &id, &key, unix_ms())?;
            txn.commit()?;
            println!(
                "{id} {}",
                if changed {
                    "registered"
                } else {
                    "already registered"
                }
            );
        }
        Cmd::Revoke { id } => {
            let store = open_store(&cfg)?;
            let txn = store.begin()?;
            lifecycle::revoke(&txn, &id)?;
            txn.commit()?;
            println!("{id} revoked");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedge-aggregator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
