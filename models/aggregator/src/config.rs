//! Configuration of the service ([`Config`]) and of each federated job ([`JobSpec`]), read from
//! TOML (`--config`) or, for jobs created over HTTP, TOML or JSON. Every field has a default except
//! a job's `id` and `model`; `docs/aggregator.md` is the reference.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The service: identity, storage, broker, HTTP, devices and jobs to create at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The fleet whose topics (`fedge/v1/{fleet}/...`) the aggregator serves.
    #[serde(default = "default_fleet")]
    pub fleet: String,
    /// The aggregator's sender id in the envelopes it signs.
    #[serde(default = "default_id")]
    pub id: String,
    /// Directory of the store (`aggregator.redb`) and, by default, the key (`aggregator.key`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The aggregator's Ed25519 key (PKCS#8, mode 0600), created when absent.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The operator's certificate of this aggregator's key (`fedge keys certify-aggregator`),
    /// published retained on `aggregator` so that devices pinning only the operator key learn
    /// and trust this key. Checked at start: it must name this fleet, id and key, and be valid.
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// Where the HTTP status, metrics and API listen; none: no HTTP.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    #[serde(default)]
    pub broker: BrokerConfig,
    /// How often open rounds are checked against their deadline.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Devices registered at start (added if absent; a changed key replaces the stored one; a
    /// revoked device stays revoked).
    #[serde(default)]
    pub devices: Vec<DeviceEntry>,
    /// Jobs created at start if no job of that id is stored yet (a stored job keeps its spec).
    #[serde(default)]
    pub jobs: Vec<JobSpec>,
}

/// The MQTT side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS), with optional `user:password@`. None: an
    /// embedded broker listens on `listen`.
    #[serde(default)]
    pub url: Option<String>,
    /// The embedded broker's listening address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// MQTT client id; stable so the broker keeps the session across restarts.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (mqtts); none: the Mozilla roots
    /// are not bundled, so TLS needs it.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Subscribe to updates through `$share/{group}/...` so several workers split the load.
    #[serde(default)]
    pub share_group: Option<String>,
    /// Start a clean MQTT session on connect. False keeps the session, so QoS 1 updates sent
    /// while the aggregator is down are delivered when it is back.
    #[serde(default)]
    pub clean_session: bool,
    /// Largest MQTT packet sent or received (updates are single messages).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

/// A device to register at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    pub id: String,
    /// 64 hex characters of the device's Ed25519 public key.
    pub public_key: String,
}

/// A federated training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub id: String,
    /// The `ModelRef::name` announced (default: the job id).
    #[serde(default)]
    pub model_name: Option<String>,
    /// The initial global parameters.
    pub model: ModelSource,
    #[serde(default)]
    pub strategy: StrategySpec,
    /// Number of rounds; the job finishes after the last.
    #[serde(default = "one_u64")]
    pub rounds: u64,
    /// Fraction of the registered devices to select per round (1: every device).
    #[serde(default = "one_f64")]
    pub fraction: f64,
    /// Accepted updates a round needs before it can close.
    #[serde(default = "one_u32")]
    pub min_devices: u32,
    /// Extra fraction selected to absorb drop-outs: `fraction × (1 + over_selection)`.
    #[serde(default)]
    pub over_selection: f64,
    /// Time from a round's start to its deadline.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub late_policy: LatePolicy,
    /// L2 bound of a decoded update (0: none).
    #[serde(default)]
    pub max_norm: f32,
    #[serde(default)]
    pub codec: UpdateCodec,
    /// Bytes per retained model chunk.
    #[serde(default = "default_chunk")]
    pub chunk_size: u32,
    /// Seed of the sampling (random when absent, then stored).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub hyper: HyperSpec,
    /// δ of the (ε, δ) the round history reports when the devices add noise
    /// (`hyper.noise_multiplier` and `hyper.clip_norm` > 0).
    #[serde(default = "default_dp_delta")]
    pub dp_delta: f64,
    /// ε budget of the job (at `dp_delta`): a round that would take any device past it is not
    /// opened and the job finishes. Needs device noise (`hyper.noise_multiplier`, `clip_norm`).
    #[serde(default)]
    pub dp_epsilon_budget: Option<f64>,
    /// Central DP (DP-FedAvg): the aggregator clips each update to `clip_norm`, averages them
    /// with equal weights and adds Gaussian noise of `noise_multiplier × clip_norm / n`.
    #[serde(default)]
    pub central_dp: Option<CentralDpSpec>,
    /// Devices encrypt their updates to a per-round key the announcement lists for each
    /// (X25519 → HKDF-SHA256 → ChaCha20-Poly1305): the broker sees only ciphertext.
    #[serde(default)]
    pub encrypt_updates: bool,
    /// Secure aggregation (SecAgg+): the devices mask their updates so that the aggregator
    /// learns only their sum (`docs/secagg.md`).
    #[serde(default)]
    pub secure_aggregation: Option<SecureAggSpec>,
}

/// `secure_aggregation = { clip = 0.05 }`, with optional `stage_ms`, `dropout` and
/// `quant_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggSpec {
    /// Each value of a device's update is clipped to `[-clip, clip]` before 16-bit
    /// quantisation: pick it just above the largest value an update holds.
    pub clip: f32,
    /// How long each stage after the first waits for the devices (the first, in which devices
    /// train and advertise their keys, lasts the job's `deadline_ms`). A stage closes early once
    /// every device it waits for has answered.
    #[serde(default = "default_stage_ms")]
    pub stage_ms: u64,
    /// The fraction of devices expected to drop out during a round; the neighbour graph is made
    /// dense enough that the round survives it with probability 1 − 10⁻⁶. Unset: the default
    /// graph (`k = 2⌈3.5 log₂ n⌉`).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Bits per quantised value.
    #[serde(default = "default_quant_bits")]
    pub quant_bits: u32,
    /// Bits of the modulus the masks and the sum live in (at most 32). Default: the fewest
    /// that hold the sum, `quant_bits + ⌈log₂ n⌉`; the masks are uniform over it either way,
    /// and each extra bit costs `len / 8` bytes per device.
    #[serde(default)]
    pub mod_bits: Option<u32>,
}

fn default_stage_ms() -> u64 {
    10_000
}

fn default_quant_bits() -> u32 {
    16
}

impl SecureAggSpec {
    /// The protocol parameters for a round of `devices` devices and `len` values.
    ///
    /// # Errors
    /// Too few devices (at least 3), or parameters the protocol refuses.
    pub fn params(
        &self,
        devices: usize,
        len: usize,
    ) -> Result<fedge_fl::secagg::Params, fedge_fl::secagg::SecAggError> {
        use fedge_fl::secagg::Params;
        let mut p = match self.dropout {
            Some(d) => Params::for_dropout(devices, len, self.clip, d, 1e-6)?,
            None => Params::new(devices, len, self.clip)?,
        };
        p.mod_bits = self
            .mod_bits
            .unwrap_or(self.quant_bits + (devices as f64).log2().ceil() as u32);
        p.quant_bits = self.quant_bits;
        p.validate(devices)?;
        Ok(p)
    }
}

/// `central_dp = { clip_norm = 1.0, noise_multiplier = 1.0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralDpSpec {
    pub clip_norm: f32,
    pub noise_multiplier: f32,
}

impl JobSpec {
    /// Whether any noise is added (on the devices or here): what the accountant counts.
    pub fn has_noise(&self) -> bool {
        (self.hyper.noise_multiplier > 0.0 && self.hyper.clip_norm > 0.0)
            || self.central_dp.is_some()
    }
}

/// A secure aggregation session lives in one aggregator's memory: workers sharing a job's
/// updates (`broker.share_group`) would each see part of its messages.
///
/// # Errors
/// [`ConfigError::Invalid`] for such a job.
pub fn check_secure_with_sharing(broker: &BrokerConfig, job: &JobSpec) -> Result<(), ConfigError> {
    if broker.share_group.is_some() && job.secure_aggregation.is_some() {
        return Err(ConfigError::Invalid(format!(
            "job {}: secure_aggregation runs in one aggregator; it cannot be shared over \
             broker.share_group workers",
            job.id
        )));
    }
    Ok(())
}

/// The strategies that only need the (weighted) mean of the updates.
const AVERAGING: [&str; 6] = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
];

fn default_dp_delta() -> f64 {
    1e-5
}

/// Where the initial global parameters come from. TOML: `model = { zeros = 650 }`,
/// `model = { params = [0.1, 0.2] }` or `model = { file = "init.f32" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    Params(Vec<f32>),
    /// Raw little-endian f32 values, or a JSON array when the name ends in `.json`.
    File(PathBuf),
    Zeros(u32),
}

/// A strategy by name with its parameters (`strategy = { name = "fedadam", server_lr = 0.01 }`);
/// the names and parameters are those of `fedge-fl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategySpec {
    pub name: String,
    #[serde(flatten)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

impl Default for StrategySpec {
    fn default() -> Self {
        Self {
            name: "fedavg".into(),
            params: serde_json::Map::new(),
        }
    }
}

/// What happens to an update for a round that has already closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Refused with reason `late`.
    #[default]
    Reject,
    /// Counted in the current round with its weight multiplied by `(1 + s)^-exponent`, where `s`
    /// is the number of rounds it is behind; refused as `late` beyond `max_staleness`.
    DownWeight { max_staleness: u64, exponent: f64 },
}

/// The update codec devices must use (`fedge-fl`'s codecs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateCodec {
    #[default]
    F32,
    F16,
    Int8,
}

impl UpdateCodec {
    pub fn to_proto(self) -> fedge_proto::msg::Codec {
        match self {
            Self::F32 => fedge_proto::msg::Codec::F32,
            Self::F16 => fedge_proto::msg::Codec::F16,
            Self::Int8 => fedge_proto::msg::Codec::Int8Block,
        }
    }
}

/// Client hyper-parameters announced with every round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HyperSpec {
    pub learning_rate: f32,
    pub epochs: u32,
    pub batch_size: u32,
    pub proximal_mu: f32,
    pub clip_norm: f32,
    pub noise_multiplier: f32,
}

impl Default for HyperSpec {
    fn default() -> Self {
        Self {
            learning_rate: 0.1,
            epochs: 1,
            batch_size: 32,
            proximal_mu: 0.0,
            clip_norm: 0.0,
            noise_multiplier: 0.0,
        }
    }
}

impl HyperSpec {
    pub fn to_proto(self) -> fedge_proto::msg::Hyper {
        fedge_proto::msg::Hyper {
            learning_rate: self.learning_rate,
            epochs: self.epochs,
            batch_size: self.batch_size,
            proximal_mu: self.proximal_mu,
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
        }
    }
}

fn default_fleet() -> String {
    "default".into()
}
fn default_id() -> String {
    "aggregator".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("fedge-aggregator-data")
}
fn default_tick_ms() -> u64 {
    100
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_max_packet() -> usize {
    16 << 20
}
fn default_keep_alive() -> u64 {
    30
}
fn default_deadline_ms() -> u64 {
    60_000
}
fn default_chunk() -> u32 {
    64 << 10
}
fn one_u64() -> u64 {
    1
}
fn one_u32() -> u32 {
    1
}
fn one_f64() -> f64 {
    1.0
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: None,
            listen: default_listen(),
            client_id: None,
            username: None,
            password: None,
            ca_file: None,
            share_group: None,
            clean_session: false,
            max_packet_bytes: default_max_packet(),
            keep_alive_s: default_keep_alive(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fleet: default_fleet(),
            id: default_id(),
            data_dir: default_data_dir(),
            key_file: None,
            certificate_file: None,
            http: None,
            broker: BrokerConfig::default(),
            tick_ms: default_tick_ms(),
            devices: Vec::new(),
            jobs: Vec::new(),
        }
    }
}

impl Config {
    /// Reads a TOML file. Relative `model = { file = ... }` paths are resolved against the
    /// file's directory.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or [`Config::validate`] fails.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for job in &mut cfg.jobs {
            if let ModelSource::File(f) = &mut job.model
                && f.is_relative()
            {
                *f = base.join(&*f);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The key file: `key_file`, else `{data_dir}/aggregator.key`.
    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("aggregator.key"))
    }

    /// The MQTT client id: `broker.client_id`, else `fedge-{id}`.
    pub fn client_id(&self) -> String {
        self.broker
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fedge-{}", self.id))
    }

    /// Checks identifiers and every job.
    ///
    /// # Errors
    /// The first invalid field, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("fleet", &self.fleet)?;
        check_id("id", &self.id)?;
        if let Some(g) = &self.broker.share_group {
            check_id("broker.share_group", g)?;
        }
        for d in &self.devices {
            check_id("devices.id", &d.id)?;
            fedge_proto::PublicKey::from_hex(&d.public_key).map_err(|_| {
                ConfigError::Invalid(format!(
                    "devices.{}: public_key is not 64 hex characters",
                    d.id
                ))
            })?;
        }
        self.jobs.iter().try_for_each(|j| {
            j.validate(self.broker.max_packet_bytes)?;
            check_secure_with_sharing(&self.broker, j)
        })
    }
}

fn check_id(field: &str, id: &str) -> Result<(), ConfigError> {
    fedge_proto::check_id(id).map_err(|e| ConfigError::Invalid(format!("{field} {id:?}: {e}")))
}

impl JobSpec {
    /// Parses a job from JSON or TOML text (JSON when it starts with `{`).
    ///
    /// # Errors
    /// Parse errors and [`JobSpec::validate`] failures.
    pub fn parse(text: &str, max_packet_bytes: usize) -> Result<Self, ConfigError> {
        let spec: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        };
        spec.validate(max_packet_bytes)?;
        Ok(spec)
    }

    /// The announced model name.
    pub fn model_name(&self) -> &str {
        self.model_name.as_deref().unwrap_or(&self.id)
    }

    /// Checks ranges; `max_packet_bytes` bounds the chunk size.
    ///
    /// # Errors
    /// The first field out of range, named.
    pub fn validate(&self, max_packet_bytes: usize) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("job {}: {what}", self.id)));
        check_id("jobs.id", &self.id)?;
        if !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
            return bad("dp_delta must be in (0, 1)");
        }
        if let Some(b) = self.dp_epsilon_budget {
            if !(b.is_finite() && b > 0.0) {
                return bad("dp_epsilon_budget must be a positive number");
            }
            if !self.has_noise() {
                return bad(
                    "dp_epsilon_budget needs noise: central_dp, or hyper.noise_multiplier and hyper.clip_norm > 0",
                );
            }
        }
        if let Some(c) = self.central_dp {
            let ok = |v: f32| v.is_finite() && v > 0.0;
            if !(ok(c.clip_norm) && ok(c.noise_multiplier)) {
                return bad("central_dp: clip_norm and noise_multiplier must be positive");
            }
            if !AVERAGING.contains(&self.strategy.name.as_str()) {
                return bad(
                    "central_dp replaces the updates by their noised mean: use an averaging \
                     strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad), not a \
                     robust one",
                );
            }
        }
        if let Some(sa) = self.secure_aggregation {
            self.validate_secagg(&sa)?;
        }
        if let Some(n) = &self.model_name {
            check_id("jobs.model_name", n)?;
        }
        if self.rounds == 0 {
            return bad("rounds must be at least 1");
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad("fraction must be in (0, 1]");
        }
        if self.min_devices == 0 {
            return bad("min_devices must be at least 1");
        }
        if !(self.over_selection >= 0.0 && self.over_selection.is_finite()) {
            return bad("over_selection must be >= 0");
        }
        if !(self.max_norm >= 0.0 && self.max_norm.is_finite()) {
            return bad("max_norm must be >= 0 (0: unbounded)");
        }
        if self.chunk_size == 0 || self.chunk_size as usize + 1024 > max_packet_bytes {
            return bad("chunk_size must be in 1..=broker.max_packet_bytes - 1024");
        }
        if let LatePolicy::DownWeight { exponent, .. } = self.late_policy
            && !(exponent >= 0.0 && exponent.is_finite())
        {
            return bad("late_policy.down_weight.exponent must be >= 0");
        }
        match &self.model {
            ModelSource::Params(p) if p.is_empty() => bad("model.params is empty"),
            ModelSource::Zeros(0) => bad("model.zeros must be at least 1"),
            _ => Ok(()),
        }
    }

    fn validate_secagg(&self, sa: &SecureAggSpec) -> Result<(), ConfigError> {
        let bad = |what: &str| {
            Err(ConfigError::Invalid(format!(
                "job {}: secure_aggregation: {what}",
                self.id
            )))
        };
        if !(sa.clip.is_finite() && sa.clip > 0.0) {
            return bad("clip must be a positive number");
        }
        if sa.stage_ms == 0 {
            return bad("stage_ms must be at least 1");
        }
        if !(1..=24).contains(&sa.quant_bits) {
            return bad("quant_bits must be in 1..=24");
        }
        if let Some(d) = sa.dropout
            && !(0.0..1.0).contains(&d)
        {
            return bad("dropout must be in [0, 1)");
        }
        if sa
            .mod_bits
            .is_some_and(|m| !(sa.quant_bits..=32).contains(&m))
        {
            return bad("mod_bits must be in quant_bits..=32");
        }
        if !AVERAGING.contains(&self.strategy.name.as_str()) {
            return bad(
                "the aggregator sees only the sum of the updates: use an averaging strategy \
                 (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad)",
            );
        }
        if self.encrypt_updates {
            return bad(
                "masked inputs reveal nothing on their own: encrypt_updates does not apply",
            );
        }
        if self.late_policy != LatePolicy::Reject {
            return bad("late updates cannot join a sum already unmasked: use late_policy reject");
        }
        if let Some(c) = self.central_dp
            && !(self.hyper.clip_norm > 0.0 && self.hyper.clip_norm <= c.clip_norm)
        {
            return bad(
                "with central_dp the aggregator cannot clip masked updates: set hyper.clip_norm \
                 (the devices clip) to at most central_dp.clip_norm",
            );
        }
        Ok(())
    }

    /// The initial parameters (reads the file for [`ModelSource::File`]).
    ///
    /// # Errors
    /// The file cannot be read, is not a whole number of f32 values or holds non-finite values.
    pub fn initial_params(&self) -> Result<Vec<f32>, ConfigError> {
        let params = match &self.model {
            ModelSource::Params(p) => p.clone(),
            ModelSource::Zeros(n) => vec![0.0; *n as usize],
            ModelSource::File(f) => read_params(f)?,
        };
        if params.is_empty() || u32::try_from(params.len()).is_err() {
            return Err(ConfigError::Invalid(format!(
                "job {}: model must have 1 to 2^32-1 parameters",
                self.id
            )));
        }
        if params.iter().any(|x| !x.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "job {}: model has non-finite parameters",
                self.id
            )));
        }
        Ok(params)
    }
}

fn read_params(path: &Path) -> Result<Vec<f32>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
    if path.extension().is_some_and(|e| e == "json") {
        return serde_json::from_slice(&bytes)
            .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())));
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(ConfigError::Invalid(format!(
            "{}: length is not a multiple of 4 (raw f32 LE)",
            path.display()
        )));
    }
    Ok(crate::codec::f32_from_le(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_toml_gets_defaults() {
        let cfg: Config =
            toml::from_str("[[jobs]]\nid = \"digits\"\nmodel = { zeros = 4 }\n").expect("parse");
        cfg.validate().expect("valid");
        let j = &cfg.jobs[0];
        assert_eq!(
            (j.rounds, j.fraction, j.min_devices, j.deadline_ms),
            (1, 1.0, 1, 60_000)
        );
        assert_eq!(
            (j.codec, j.late_policy, j.strategy.name.as_str()),
            (UpdateCodec::F32, LatePolicy::Reject, "fedavg")
        );
        assert_eq!(cfg.broker.listen, default_listen());
        assert_eq!(j.initial_params().expect("params"), vec![0.0; 4]);
    }

    #[test]
    fn strategy_params_and_late_policy_parse() {
        let text = r#"
            id = "j"
            model = { params = [1.0, 2.0] }
            strategy = { name = "fedadam", server_lr = 0.01 }
            late_policy = { down_weight = { max_staleness = 2, exponent = 0.5 } }
            codec = "int8"
        "#;
        let j = JobSpec::parse(text, 1 << 20).expect("parse");
        assert_eq!(
            j.strategy.params.get("server_lr"),
            Some(&serde_json::json!(0.01))
        );
        assert_eq!(
            j.late_policy,
            LatePolicy::DownWeight {
                max_staleness: 2,
                exponent: 0.5
            }
        );
        let json = serde_json::to_string(&j).expect("json");
        assert_eq!(JobSpec::parse(&json, 1 << 20).expect("json parse"), j);
    }

    #[test]
    fn out_of_range_fields_are_named() {
        for (field, text) in [
            (
                "fraction",
                "id = \"j\"\nmodel = { zeros = 1 }\nfraction = 0.0",
            ),
            ("rounds", "id = \"j\"\nmodel = { zeros = 1 }\nrounds = 0"),
            ("id", "id = \"a/b\"\nmodel = { zeros = 1 }"),
            (
                "chunk_size",
                "id = \"j\"\nmodel = { zeros = 1 }\nchunk_size = 0",
            ),
        ] {
            let e = JobSpec::parse(text, 1 << 20).expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn secure_aggregation_is_checked_against_what_it_cannot_do() {
        let base = "id = \"j\"\nmodel = { zeros = 100 }\n";
        let ok = JobSpec::parse(
            &format!("{base}secure_aggregation = {{ clip = 0.5 }}"),
            1 << 20,
        )
        .expect("minimal");
        let sa = ok.secure_aggregation.expect("parsed");
        assert_eq!((sa.stage_ms, sa.quant_bits, sa.dropout), (10_000, 16, None));
        let p = sa.params(50, 100).expect("params");
        assert_eq!((p.neighbours, p.threshold, p.mod_bits), (40, 21, 22));
        assert!(sa.params(2, 100).is_err(), "two devices cannot mask");
        let tight = SecureAggSpec {
            dropout: Some(0.3),
            ..sa
        };
        assert!(tight.params(1000, 100).expect("params").neighbours > 70);
        let wide = SecureAggSpec {
            mod_bits: Some(32),
            ..sa
        };
        assert_eq!(wide.params(50, 100).expect("params").mod_bits, 32);
        let narrow = SecureAggSpec {
            mod_bits: Some(17),
            ..sa
        };
        assert!(
            narrow.params(50, 100).is_err(),
            "17 bits cannot hold 50 sums"
        );
        for (why, extra) in [
            ("clip", "secure_aggregation = { clip = 0.0 }"),
            (
                "quant_bits",
                "secure_aggregation = { clip = 1.0, quant_bits = 30 }",
            ),
            (
                "dropout",
                "secure_aggregation = { clip = 1.0, dropout = 1.0 }",
            ),
            (
                "averaging",
                "strategy = { name = \"krum\" }\nsecure_aggregation = { clip = 1.0 }",
            ),
            (
                "encrypt_updates",
                "encrypt_updates = true\nsecure_aggregation = { clip = 1.0 }",
            ),
            (
                "late_policy",
                "late_policy = { down_weight = { max_staleness = 2, exponent = 0.5 } }\n\
                 secure_aggregation = { clip = 1.0 }",
            ),
            (
                "hyper.clip_norm",
                "central_dp = { clip_norm = 1.0, noise_multiplier = 1.0 }\n\
                 secure_aggregation = { clip = 1.0 }",
            ),
        ] {
            let e = JobSpec::parse(&format!("{base}{extra}"), 1 << 20)
                .expect_err(why)
                .to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
        JobSpec::parse(
            &format!(
                "{base}central_dp = {{ clip_norm = 1.0, noise_multiplier = 1.0 }}\n\
                 secure_aggregation = {{ clip = 1.0 }}\n[hyper]\nclip_norm = 1.0"
            ),
            1 << 20,
        )
        .expect("devices clip, the aggregator noises the sum");
    }
}
