//! `fedge device`: provision a device (key pair, agent config, broker credentials and ACL,
//! registry entry) and read or revoke the aggregator's registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedge_aggregator::lifecycle;
use fedge_proto::PublicKey;
use serde_json::{Value, json};

use super::api::Api;
use super::keys::{create_private_dir, read_public_key};
use super::mosquitto;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: DeviceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Make a device's key, agent config and broker credentials, and register it.
    ///
    /// Writes into --out: device.key (0600), device.pub, agent.toml, mqtt.pass (0600),
    /// mosquitto.passwd and mosquitto.acl (lines to append to the broker's password and ACL
    /// files); registers the public key with the aggregator (--aggregator or
    /// --aggregator-data).
    Provision(Box<ProvisionArgs>),
    /// List the devices registered with the aggregator.
    List {
        #[command(flatten)]
        api: ApiFlags,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one registered device; with --broker also its reported state (retained status),
    /// its desired state (retained desired model) and the drift between them.
    Show {
        /// Device id.
        id: String,
        #[command(flatten)]
        api: ApiFlags,
        #[command(flatten)]
        state: StateFlags,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device: the aggregator refuses its messages (`revoked`) from then on.
    Revoke {
        /// Device id.
        id: String,
        #[command(flatten)]
        api: ApiFlags,
    },
}

/// Where `device show` reads reported and desired state.
#[derive(Debug, clap::Args)]
pub struct StateFlags {
    /// The broker holding the retained status and desired state, e.g. mqtt://127.0.0.1:1883.
    #[arg(long, requires = "operator_pub")]
    pub broker: Option<String>,
    /// The device's group (fleet name).
    #[arg(long, default_value = "default")]
    pub group: String,
    /// The operator's public key (operator.pub or hex): the desired state must be signed by it.
    #[arg(long = "operator-pub", value_name = "FILE|HEX")]
    pub operator_pub: Option<String>,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ApiFlags {
    /// The aggregator's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL", env = "FEDGE_AGGREGATOR_URL")]
    pub aggregator: String,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("registry").required(true).args(["aggregator", "aggregator_data"]))]
pub struct ProvisionArgs {
    /// Device id: 1-64 characters of [A-Za-z0-9._-]; also its MQTT user name.
    pub id: String,
    /// The operator's public key: 64 hex characters or a file holding them (operator.pub).
    #[arg(long, value_name = "HEX|FILE")]
    pub operator_pub: String,
    /// The aggregator's public key (`fedge-aggregator key` prints it): hex or a file.
    #[arg(long, value_name = "HEX|FILE")]
    pub aggregator_pub: String,
    /// The broker the device connects to: mqtt://host[:1883] or mqtts://host[:8883].
    #[arg(long, value_name = "URL")]
    pub broker: String,
    /// CA certificate (PEM) path on the device, for mqtts://.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Fleet name: topics live under fedge/v1/{fleet}/.
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// The agent's state directory on the device.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/fedge")]
    pub data_dir: PathBuf,
    /// Where the files of --out will be on the device (the config names device.key and
    /// mqtt.pass there). Default: the absolute path of --out.
    #[arg(long, value_name = "DIR")]
    pub install_dir: Option<PathBuf>,
    /// Output directory (created 0700); it must not hold a device.key yet.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Register through a running aggregator's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    pub aggregator: Option<String>,
    /// Register in a stopped aggregator's data directory (its aggregator.redb).
    #[arg(long, value_name = "DIR")]
    pub aggregator_data: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        DeviceCommand::Provision(p) => provision(&p),
        DeviceCommand::List { api, json } => list(&Api::new(&api.aggregator)?, json),
        DeviceCommand::Show {
            id,
            api,
            state,
            json,
        } => show(&Api::new(&api.aggregator)?, &id, &state, json),
        DeviceCommand::Revoke { id, api } => revoke(&Api::new(&api.aggregator)?, &id),
    }
}

/// What provisioning writes, relative to the output directory.
const KEY: &str = "device.key";
const PUB: &str = "device.pub";
const CONFIG: &str = "agent.toml";
const PASS: &str = "mqtt.pass";
const PASSWD: &str = "mosquitto.passwd";
const ACL: &str = "mosquitto.acl";

/// Where the registry entry goes.
#[derive(Debug)]
enum Registry {
    Http(Api),
    Store(PathBuf),
}

fn provision(p: &ProvisionArgs) -> anyhow::Result<()> {
    fedge_proto::check_id(&p.id).map_err(|e| anyhow::anyhow!("device id {:?}: {e}", p.id))?;
    fedge_proto::check_id(&p.fleet).map_err(|e| anyhow::anyhow!("--fleet {:?}: {e}", p.fleet))?;
    let operator = read_public_key(&p.operator_pub).context("--operator-pub")?;
    let aggregator = read_public_key(&p.aggregator_pub).context("--aggregator-pub")?;
    let registry = match (&p.aggregator, &p.aggregator_data) {
        (Some(url), _) => Registry::Http(Api::new(url)?),
        (None, Some(dir)) => Registry::Store(dir.clone()),
        (None, None) => bail!("give --aggregator URL or --aggregator-data DIR"),
    };
    let key_path = p.out.join(KEY);
    if key_path.exists() {
        bail!(
            "{} exists: {} is already provisioned (revoke it and provision a new id to rotate)",
            key_path.display(),
            p.id
        );
    }
    let install = match &p.install_dir {
        Some(d) => d.clone(),
        None => {
            std::path::absolute(&p.out).with_context(|| format!("resolving {}", p.out.display()))?
        }
    };
    let config = agent_config(p, &install, &operator, &aggregator);
    fedge_agent::Config::from_toml(&config)
        .map_err(|e| anyhow::anyhow!("the agent would refuse its config: {e}"))?;
    create_private_dir(&p.out)?;
    let signer = fedge_proto::keys::file::create(&key_path)
        .with_context(|| format!("writing {}", key_path.display()))?;
    let device = signer.public_key();
    let registered = match &registry {
        Registry::Http(api) => register_http(api, &p.id, &device),
        Registry::Store(dir) => register_store(dir, &p.id, &device),
    };
    let outcome = match registered {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
    };
    write_files(p, &device, &config)?;
    println!("{} {device} ({outcome})", p.id);
    println!(
        "append {} to the broker's password_file and {} to its acl_file, then reload it",
        p.out.join(PASSWD).display(),
        p.out.join(ACL).display()
    );
    Ok(())
}

fn agent_config(
    p: &ProvisionArgs,
    install: &Path,
    operator: &PublicKey,
    aggregator: &PublicKey,
) -> String {
    let q = |s: &str| toml::Value::from(s).to_string();
    let path = |p: &Path| q(&p.to_string_lossy());
    let ca = p
        .ca_file
        .as_deref()
        .map(|c| format!("ca_file = {}\n", path(c)))
        .unwrap_or_default();
    format!(
        "# fedge-agent configuration for {id}, written by `fedge device provision`.\n\
         device_id = {id_q}\nfleet = {fleet}\noperator_key = \"{operator}\"\n\
         aggregator_key = \"{aggregator}\"\nkey_file = {key}\ndata_dir = {data}\n\n\
         [broker]\nurl = {url}\nusername = {id_q}\npassword_file = {pass}\n{ca}",
        id = p.id,
        id_q = q(&p.id),
        fleet = q(&p.fleet),
        key = path(&install.join(KEY)),
        data = path(&p.data_dir),
        url = q(&p.broker),
        pass = path(&install.join(PASS)),
    )
}

fn write_files(p: &ProvisionArgs, device: &PublicKey, config: &str) -> anyhow::Result<()> {
    let password = mosquitto::random_password()?;
    let files: [(&str, String, bool); 5] = [
        (PUB, format!("{device}\n"), false),
        (CONFIG, config.to_string(), false),
        (PASS, format!("{password}\n"), true),
        (
            PASSWD,
            format!("{}\n", mosquitto::password_line(&p.id, &password)?),
            true,
        ),
        (ACL, mosquitto::acl_lines(&p.fleet, &p.id), false),
    ];
    for (name, text, secret) in files {
        let path = p.out.join(name);
        write_new(&path, text.as_bytes(), secret)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, if secret { 0o600 } else { 0o644 });
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn register_http(api: &Api, id: &str, key: &PublicKey) -> anyhow::Result<&'static str> {
    let body = json!({ "id": id, "public_key": key.to_hex().as_str() });
    let (status, answer) = api.post("/api/devices", Some(&body))?;
    if answer.get("revoked").and_then(Value::as_bool) == Some(true) {
        bail!("device {id} is revoked in the aggregator's registry; provision a new id");
    }
    Ok(if status == 201 {
        "registered"
    } else {
        "already registered"
    })
}

fn register_store(dir: &Path, id: &str, key: &PublicKey) -> anyhow::Result<&'static str> {
    let path = dir.join(fedge_aggregator::service::STORE_FILE);
    if !path.exists() {
        bail!(
            "{} not found (is --aggregator-data the aggregator's --data directory?)",
            path.display()
        );
    }
    let store = fedge_aggregator::store::Store::open(&path)
        .with_context(|| format!("opening {} (is the aggregator running?)", path.display()))?;
    let txn = store.begin()?;
    let (rec, changed) = lifecycle::register(&txn, id, key, lifecycle::unix_ms())?;
    if rec.revoked {
        bail!("device {id} is revoked in the aggregator's registry; provision a new id");
    }
    txn.commit()?;
    Ok(if changed {
        "registered"
    } else {
        "already registered"
    })
}

fn devices(api: &Api) -> anyhow::Result<Vec<Value>> {
    match api.get("/api/devices")? {
        Value::Array(list) => Ok(list),
        other => bail!("GET /api/devices: expected a list, got {other}"),
    }
}

fn list(api: &Api, as_json: bool) -> anyhow::Result<()> {
    let list = devices(api)?;
    if as_json {
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:>10} {:<16} REGISTERED (unix ms)",
        "ID", "STATE", "LAST SEQ", "KEY"
    );
    for d in &list {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let state = if d.get("revoked").and_then(Value::as_bool) == Some(true) {
            "revoked"
        } else {
            "active"
        };
        let seq = d
            .get("last_seq")
            .and_then(Value::as_u64)
            .map_or_else(|| "-".into(), |n| n.to_string());
        let key = s("public_key");
        println!(
            "{:<24} {state:<8} {seq:>10} {:<16} {}",
            s("id"),
            key.get(..16).unwrap_or(&key),
            d.get("registered_unix_ms").unwrap_or(&Value::Null)
        );
    }
    Ok(())
}

fn show(api: &Api, id: &str, flags: &StateFlags, as_json: bool) -> anyhow::Result<()> {
    let mut d = devices(api)?
        .into_iter()
        .find(|d| d.get("id").and_then(Value::as_str) == Some(id))
        .with_context(|| format!("device {id} is not registered with the aggregator"))?;
    if let (Some(broker), Some(op)) = (&flags.broker, &flags.operator_pub) {
        let operator = read_public_key(op).context("--operator-pub")?;
        let login = super::rollout::Login {
            broker,
            username: flags.username.as_deref(),
            password_file: flags.password_file.as_deref(),
            group: &flags.group,
        };
        let r = super::rollout::read_retained(
            &login,
            id,
            &operator,
            std::time::Duration::from_millis(1500),
        )?;
        let registered = d.get("public_key").and_then(Value::as_str).unwrap_or("");
        let model = |m: &Option<(String, u64, [u8; 32])>| {
            m.as_ref().map(|(n, v, sha)| {
                json!({"name": n, "version": v,
                       "sha256": fedge_proto::hex::encode32(sha).as_str()})
            })
        };
        let reported = r.status.as_ref().map(|(online, m, key)| {
            json!({"online": online, "model": model(m),
                   "key_matches_registry": key.to_hex().as_str() == registered})
        });
        let desired = r.desired.as_ref().map(|(n, v, sha)| {
            json!({"name": n, "version": v,
                   "bundle_sha256": fedge_proto::hex::encode32(sha).as_str()})
        });
        let runs = r
            .status
            .as_ref()
            .and_then(|(_, m, _)| m.as_ref())
            .map(|(n, v, _)| (n.clone(), *v));
        let drift = match (&r.desired, runs) {
            (None, _) => "no desired state".to_string(),
            (Some((n, v, _)), Some((rn, rv))) if *n == rn && *v == rv => "none".to_string(),
            (Some((n, v, _)), Some((rn, rv))) => format!("desired {n} v{v}, runs {rn} v{rv}"),
            (Some((n, v, _)), None) => format!("desired {n} v{v}, runs no model"),
        };
        if let Value::Object(m) = &mut d {
            m.insert("reported".into(), reported.unwrap_or(Value::Null));
            m.insert("desired".into(), desired.unwrap_or(Value::Null));
            m.insert("drift".into(), Value::String(drift));
        }
    }
    if as_json {
        println!("{d}");
        return Ok(());
    }
    if let Value::Object(m) = &d {
        for (k, v) in m {
            match v {
                Value::String(s) => println!("{k:<20} {s}"),
                Value::Null => println!("{k:<20} -"),
                v => println!("{k:<20} {v}"),
            }
        }
    }
    Ok(())
}

fn revoke(api: &Api, id: &str) -> anyhow::Result<()> {
    fedge_proto::check_id(id).map_err(|e| anyhow::anyhow!("device id {id:?}: {e}"))?;
    api.post(&format!("/api/devices/{id}/revoke"), None)?;
    println!("{id} revoked");
    Ok(())
}
