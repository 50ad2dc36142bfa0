//! The agent's TOML configuration. Every key but `device_id`, `operator_key` and `broker.url` has
//! a default; `docs/agent.md` lists them all.

use std::path::{Path, PathBuf};

use fedge_proto::{PublicKey, check_id};
use serde::Deserialize;

use crate::error::AgentError;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id: one topic level (`[A-Za-z0-9._-]`, 1-64 characters).
    pub device_id: String,
    /// The fleet the device belongs to (`fedge/v1/{fleet}/...`).
    #[serde(default = "default_fleet")]
    pub fleet: String,
    /// The device's Ed25519 key (PKCS#8, mode 0600). Default: `{data_dir}/device.key`.
    pub key_file: Option<PathBuf>,
    /// Hex of the operator's Ed25519 public key: commands, bundles and their chunks must verify
    /// against it.
    pub operator_key: String,
    /// When set, operator envelopes must also carry this sender id.
    pub operator_id: Option<String>,
    /// Hex of the aggregator's public key (acks, round announcements); without it they are
    /// rejected as `unknown_sender`.
    pub aggregator_key: Option<String>,
    /// When set, aggregator envelopes must also carry this sender id.
    pub aggregator_id: Option<String>,
    /// State, outbox and chunks.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Installed model versions. Default: `{data_dir}/models`.
    pub model_dir: Option<PathBuf>,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub infer: InferConfig,
    /// Federated learning: absent, the device takes part in no training job.
    #[serde(default)]
    pub learn: Option<LearnConfig>,
}

/// How to reach the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` (TCP) or `mqtts://host:port` (TLS; needs `ca_file`).
    pub url: String,
    /// MQTT client id. Default: the device id.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file (first line) instead of the config.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) the broker's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key, for brokers that require mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: u64,
    /// First reconnect delay; doubles per failed attempt up to `backoff_max_ms`, with jitter
    /// (each delay is drawn uniformly from half to all of the current step).
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Largest MQTT packet accepted or sent (rumqttc's default is 10 KiB). Must hold a chunk
    /// envelope: at least `limits.max_chunk_bytes + 1024`.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
}

/// Bounds on everything received or stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest command or ack envelope.
    pub max_message_bytes: usize,
    /// Largest chunk payload a manifest may declare; larger chunk envelopes are refused.
    pub max_chunk_bytes: u32,
    /// Largest sealed bundle a manifest may declare.
    pub max_bundle_bytes: u64,
    /// Disk budget of the outbox.
    pub outbox_max_bytes: u64,
    /// fsync outbox entries that are never dropped (acks, updates, events).
    pub outbox_fsync: bool,
    /// Chunk topics subscribed at once during a transfer.
    pub chunk_window: u32,
    /// Outbox messages in flight (published, PUBACK not yet received).
    pub publish_window: u32,
    /// Healthy model versions kept on disk (the active one included).
    pub keep_versions: usize,
}

/// Telemetry cadence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Seconds between telemetry messages (`Command::SetTelemetryInterval` overrides it).
    pub interval_s: u32,
    /// An event (a refusal, an install outcome) sends telemetry after this delay, so that a burst
    /// of events shares one message.
    pub event_delay_ms: u64,
}

/// Local inference on a watched directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Directory of `.npy` (one-input models) or `.npz` (inputs by name or in order) files.
    pub input_dir: Option<PathBuf>,
    /// Where results go (`{stem}.out{k}.npy`, or `{stem}.err`). Default: `{input_dir}/out`.
    pub output_dir: Option<PathBuf>,
    pub poll_ms: u64,
    /// Threads for the runtime's matrix products.
    pub threads: usize,
    /// Files run per scan (keeps each blocking job short).
    pub batch: usize,
    /// A Unix socket for request/response inference (`docs/agent.md`, Inference); created mode
    /// 0600 at start, a stale file of that name is replaced.
    pub socket: Option<PathBuf>,
    /// Largest request accepted on the socket, in bytes (all input frames together).
    pub max_request_bytes: usize,
}

/// The head a device trains, over the features of its local data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadChoice {
    /// Softmax regression: `classes × (features + 1)` parameters.
    Softmax,
    /// One hidden ReLU layer of `hidden` units.
    Mlp,
}

/// The federated-learning client: which job, which local data, which head, and the bounds of a
/// training run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnConfig {
    /// Local labelled data: CSV (header optional, numeric features, integer label in the last
    /// column; plain or gzip) or NPZ (`X`, `y`) when the name ends in `.npz`. Never sent.
    pub data: PathBuf,
    /// The job to take part in. Default: every job announced in the fleet.
    #[serde(default)]
    pub job: Option<String>,
    #[serde(default = "default_head")]
    pub head: HeadChoice,
    /// Hidden units of the `mlp` head.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Classes of the head. Default: derived from the announced parameter count.
    #[serde(default)]
    pub classes: Option<usize>,
    /// Local SGD momentum in `[0, 1)` (the announcement sets learning rate, epochs, batch, μ).
    #[serde(default)]
    pub momentum: f32,
    /// Local L2 weight decay.
    #[serde(default)]
    pub weight_decay: f32,
    /// Mixed with device, job and round into each run's shuffling seed.
    #[serde(default)]
    pub seed: u64,
    /// Bound on a training run's memory: the data file while it is parsed, the data set, the
    /// global model and the training buffers. A round that needs more is refused (`oversize`).
    #[serde(default = "default_learn_memory")]
    pub max_memory_bytes: u64,
}

fn default_head() -> HeadChoice {
    HeadChoice::Softmax
}
fn default_hidden() -> usize {
    32
}
fn default_learn_memory() -> u64 {
    256 << 20
}

fn default_fleet() -> String {
    "default".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/fedge")
}
fn default_keep_alive() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_max_packet() -> usize {
    1 << 20
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 10,
            max_chunk_bytes: 256 << 10,
            max_bundle_bytes: 64 << 20,
            outbox_max_bytes: 16 << 20,
            outbox_fsync: true,
            chunk_window: 32,
            publish_window: 32,
            keep_versions: 3,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval_s: 60,
            event_delay_ms: 200,
        }
    }
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            input_dir: None,
            output_dir: None,
            poll_ms: 500,
            threads: 1,
            batch: 16,
            socket: None,
            max_request_bytes: 16 << 20,
        }
    }
}

/// Space a chunk envelope needs beyond its data: envelope header, sender id, chunk header,
/// signature.
pub const CHUNK_OVERHEAD: usize = 256;

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`AgentError::Config`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let err = |message: String| AgentError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg = Self::from_toml(&text).map_err(err)?;
        Ok(cfg)
    }

    /// Parses and validates TOML text; the error is a one-line message.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let id = |key: &str, v: &str| check_id(v).map_err(|e| format!("{key} = {v:?}: {e}"));
        id("device_id", &self.device_id)?;
        id("fleet", &self.fleet)?;
        self.operator_public_key()?;
        self.aggregator_public_key()?;
        for (key, v) in [
            ("operator_id", &self.operator_id),
            ("aggregator_id", &self.aggregator_id),
        ] {
            if let Some(v) = v {
                id(key, v)?;
            }
        }
        crate::link::BrokerUrl::parse(&self.broker.url)?;
        let l = &self.limits;
        let need = l.max_chunk_bytes as usize + CHUNK_OVERHEAD;
        if self.broker.max_packet_bytes < need.max(l.max_message_bytes) {
            return Err(format!(
                "broker.max_packet_bytes = {} must hold a chunk envelope ({need}) and a message ({})",
                self.broker.max_packet_bytes, l.max_message_bytes
            ));
        }
        if l.max_chunk_bytes == 0 || l.chunk_window == 0 || l.publish_window == 0 {
            return Err(
                "limits: max_chunk_bytes, chunk_window and publish_window must be > 0".into(),
            );
        }
        if l.keep_versions == 0 {
            return Err("limits.keep_versions must be at least 1".into());
        }
        if self.telemetry.interval_s == 0 {
            return Err("telemetry.interval_s must be at least 1".into());
        }
        if let Some(learn) = &self.learn {
            learn.validate()?;
        }
        Ok(())
    }

    /// The pinned operator key.
    ///
    /// # Errors
    /// A message when `operator_key` is not 64 hex characters.
    pub fn operator_public_key(&self) -> Result<PublicKey, String> {
        PublicKey::from_hex(&self.operator_key).map_err(|e| format!("operator_key: {e}"))
    }

    /// The pinned aggregator key, if configured.
    ///
    /// # Errors
    /// A message when `aggregator_key` is set but not 64 hex characters.
    pub fn aggregator_public_key(&self) -> Result<Option<PublicKey>, String> {
        self.aggregator_key
            .as_deref()
            .map(|k| PublicKey::from_hex(k).map_err(|e| format!("aggregator_key: {e}")))
            .transpose()
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("device.key"))
    }

    pub fn model_path(&self) -> PathBuf {
        self.model_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("models"))
    }

    pub fn infer_output_dir(&self) -> Option<PathBuf> {
        let input = self.infer.input_dir.as_ref()?;
        Some(
            self.infer
                .output_dir
                .clone()
                .unwrap_or_else(|| input.join("out")),
        )
    }
}

impl LearnConfig {
    fn validate(&self) -> Result<(), String> {
        if let Some(job) = &self.job {
            check_id(job).map_err(|e| format!("learn.job = {job:?}: {e}"))?;
        }
        if self.head == HeadChoice::Mlp && self.hidden == 0 {
            return Err("learn.hidden must be at least 1".into());
        }
        if self.classes.is_some_and(|c| c < 2) {
            return Err("learn.classes must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "learn.momentum = {} must be in [0, 1)",
                self.momentum
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "learn.weight_decay = {} must be finite and non-negative",
                self.weight_decay
            ));
        }
        if self.max_memory_bytes < 1 << 16 {
            return Err("learn.max_memory_bytes must be at least 65536".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn minimal() -> String {
        format!(
            "device_id = \"dev-1\"\noperator_key = \"{KEY}\"\n[broker]\nurl = \"mqtt://127.0.0.1:1883\"\n"
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(&minimal()).expect("config");
        assert_eq!(c.fleet, "default");
        assert_eq!(c.key_path(), PathBuf::from("/var/lib/fedge/device.key"));
        assert_eq!(c.model_path(), PathBuf::from("/var/lib/fedge/models"));
        assert_eq!(c.limits.keep_versions, 3);
        assert_eq!(c.broker.max_packet_bytes, 1 << 20);
        assert!(c.infer_output_dir().is_none());
    }

    #[test]
    fn bad_values_are_named() {
        let bad_id = minimal().replace("dev-1", "a/b");
        assert!(
            Config::from_toml(&bad_id)
                .expect_err("id")
                .contains("device_id")
        );
        let bad_key = minimal().replace(KEY, "zz");
        assert!(
            Config::from_toml(&bad_key)
                .expect_err("key")
                .contains("operator_key")
        );
        let small = format!("{}max_packet_bytes = 1000\n", minimal());
        assert!(
            Config::from_toml(&small)
                .expect_err("packet")
                .contains("max_packet_bytes")
        );
        let unknown = format!("{}colour = 1\n", minimal());
        assert!(Config::from_toml(&unknown).is_err());
        let url = minimal().replace("mqtt://127.0.0.1:1883", "http://x");
        assert!(Config::from_toml(&url).expect_err("url").contains("url"));
        let learn = |extra: &str| format!("{}[learn]\ndata = \"d.csv\"\n{extra}", minimal());
        let ok = Config::from_toml(&learn("")).expect("learn defaults");
        let l = ok.learn.expect("learn section");
        assert_eq!(
            (l.head, l.momentum, l.max_memory_bytes),
            (HeadChoice::Softmax, 0.0, 256 << 20)
        );
        for (extra, key) in [
            ("momentum = 1.0\n", "momentum"),
            ("job = \"a/b\"\n", "learn.job"),
            ("head = \"mlp\"\nhidden = 0\n", "hidden"),
            ("classes = 1\n", "classes"),
        ] {
            let err = Config::from_toml(&learn(extra)).expect_err(extra);
            assert!(err.contains(key), "{extra}: {err}");
        }
    }
}
