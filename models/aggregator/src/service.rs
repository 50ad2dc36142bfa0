//! Putting it together: [`Service::bind`] opens the store, loads the key, registers the
//! configured devices and jobs, starts the embedded broker when no URL is given and binds the
//! HTTP listener; [`Service::run`] drives MQTT, the engine and HTTP until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::Engine;
use crate::error::AggregatorError;
use crate::http::{AppState, Info};
use crate::lifecycle::{self, OpError, unix_ms};
use crate::metrics::Stats;
use crate::mqtt::{self, BrokerUrl};
use crate::outgoing::Sealer;
use crate::store::Store;

/// Reads and checks the operator's certificate of this aggregator's key: an envelope of kind
/// `Certificate` naming this fleet, id and key, not expired. (The operator's signature is the
/// devices' to check; the aggregator does not pin the operator key.)
fn load_certificate(
    cfg: &Config,
    path: &std::path::Path,
    key: &fedge_proto::PublicKey,
) -> Result<Vec<u8>, AggregatorError> {
    let bad = |why: String| {
        AggregatorError::Config(crate::error::ConfigError::Invalid(format!(
            "certificate_file {}: {why}",
            path.display()
        )))
    };
    let wire = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let env = fedge_proto::Envelope::open(&wire, 4096).map_err(|e| bad(e.to_string()))?;
    if env.kind() != fedge_proto::Kind::Certificate {
        return Err(bad(format!(
            "a {:?} envelope, not a certificate",
            env.kind()
        )));
    }
    // Read unverified: checking it needs the operator key, which the aggregator does not hold.
    // This only catches a certificate meant for another aggregator; devices check the signature.
    let cert: fedge_proto::msg::AggregatorCert<'_> =
        fedge_proto::envelope::decode(env.claimed_payload()).map_err(|e| bad(e.to_string()))?;
    if cert.fleet != cfg.fleet || cert.aggregator != cfg.id || cert.public_key != *key {
        return Err(bad(format!(
            "it certifies {} as {:?} in fleet {:?}; this aggregator is {key} as {:?} in fleet {:?}",
            cert.public_key, cert.aggregator, cert.fleet, cfg.id, cfg.fleet
        )));
    }
    if cert.not_after_unix_s.saturating_mul(1000) <= unix_ms() {
        return Err(bad(format!(
            "expired at {} (unix seconds)",
            cert.not_after_unix_s
        )));
    }
    Ok(wire)
}

/// The store file inside the data directory.
pub const STORE_FILE: &str = "aggregator.redb";

/// A service ready to run: store open, key loaded, broker reachable, HTTP bound.
#[derive(Debug)]
pub struct Service {
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    sealer: Sealer,
    /// The operator's certificate of the key, as published.
    certificate: Option<Vec<u8>>,
    broker_url: String,
    embedded: Option<SocketAddr>,
    http: Option<tokio::net::TcpListener>,
}

impl Service {
    /// Prepares everything that can fail before the first message.
    ///
    /// # Errors
    /// Invalid configuration, unusable store or key, a broker address or HTTP address in use.
    pub async fn bind(cfg: Config) -> Result<Self, AggregatorError> {
        cfg.validate()?;
        let io =
            |e| AggregatorError::Config(crate::error::ConfigError::Io(cfg.data_dir.clone(), e));
        std::fs::create_dir_all(&cfg.data_dir).map_err(io)?;
        let store = Arc::new(Store::open(&cfg.data_dir.join(STORE_FILE))?);
        let key_path = cfg.key_path();
        let signer = fedge_proto::keys::file::load_or_create(&key_path)
            .map_err(|e| AggregatorError::Key(key_path, e))?;
        let certificate = match &cfg.certificate_file {
            Some(path) => Some(load_certificate(&cfg, path, &signer.public_key())?),
            None => None,
        };
        seed(&store, &cfg)?;
        let (broker_url, embedded) = match &cfg.broker.url {
            Some(url) => (url.clone(), None),
            None => {
                let addr = mqtt::start_embedded(cfg.broker.listen, cfg.broker.max_packet_bytes)?;
                tracing::info!(%addr, "embedded MQTT broker listening");
                (mqtt::embedded_url(addr), Some(addr))
            }
        };
        BrokerUrl::parse(&broker_url).map_err(AggregatorError::Broker)?;
        let http = match cfg.http {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| AggregatorError::Http(addr, e))?;
                Some(l)
            }
            None => None,
        };
        let sealer = Sealer::new(signer, cfg.id.clone(), Arc::clone(&store));
        Ok(Self {
            cfg: Arc::new(cfg),
            store,
            stats: Arc::default(),
            sealer,
            certificate,
            broker_url,
            embedded,
            http,
        })
    }

    /// Where HTTP listens.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The broker the aggregator connects to (the embedded one's loopback URL when embedded).
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// Where the embedded broker listens, when there is one.
    pub fn embedded_broker(&self) -> Option<SocketAddr> {
        self.embedded
    }

    /// The aggregator's public key (devices pin it to verify announcements, chunks and acks).
    pub fn public_key(&self) -> fedge_proto::PublicKey {
        self.sealer.public_key()
    }

    /// Runs until `shutdown` completes or a fatal error. Stopping at any point is safe: the
    /// store holds everything that was acknowledged, and the next start resumes from it.
    ///
    /// # Errors
    /// Storage failures, a broker URL or TLS setting that cannot be used, HTTP accept errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AggregatorError> {
        let http_addr = self.http_addr();
        let url = BrokerUrl::parse(&self.broker_url).map_err(AggregatorError::Broker)?;
        let (client, eventloop) = mqtt::connect(mqtt::options(&self.cfg, &url)?);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let info = Info {
            fleet: self.cfg.fleet.clone(),
            id: self.cfg.id.clone(),
            public_key: self.sealer.public_key().to_hex().to_string(),
            broker: redact(&self.broker_url),
            max_packet_bytes: self.cfg.broker.max_packet_bytes,
        };
        let state = AppState {
            store: Arc::clone(&self.store),
            stats: Arc::clone(&self.stats),
            commands: cmd_tx,
            info: Arc::new(info),
        };
        let engine = Engine::new(
            self.cfg,
            self.store,
            self.stats,
            self.sealer,
            client.clone(),
        )?
        .with_certificate(self.certificate);
        let http = async {
            match (self.http, http_addr) {
                (Some(l), Some(addr)) => crate::http::serve(l, state)
                    .await
                    .map_err(|e| AggregatorError::Http(addr, e)),
                _ => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            () = shutdown => Ok(()),
            r = engine.run(in_rx, cmd_rx) => r,
            () = mqtt::drive(eventloop, in_tx) => Ok(()),
            r = http => r,
        };
        let _ = client.try_disconnect();
        result
    }
}

/// Registers the configured devices and creates the configured jobs that are not stored yet.
fn seed(store: &Store, cfg: &Config) -> Result<(), AggregatorError> {
    let txn = store.begin()?;
    let now = unix_ms();
    for d in &cfg.devices {
        let key = fedge_proto::PublicKey::from_hex(&d.public_key)?;
        lifecycle::register(&txn, &d.id, &key, now).map_err(op)?;
    }
    for spec in &cfg.jobs {
        crate::fl::Strategy::build(&spec.strategy).map_err(AggregatorError::Strategy)?;
        match lifecycle::create_job(&txn, spec.clone(), cfg.broker.max_packet_bytes, now) {
            Ok(_) => tracing::info!(job = %spec.id, "job created from the configuration"),
            Err(OpError::Exists(_)) => {
                tracing::debug!(job = %spec.id, "job already stored; the stored spec is kept")
            }
            Err(e) => return Err(op(e)),
        }
    }
    txn.commit()?;
    Ok(())
}

fn op(e: OpError) -> AggregatorError {
    match e {
        OpError::Invalid(c) => AggregatorError::Config(c),
        OpError::Store(s) => AggregatorError::Store(s),
        other => AggregatorError::Config(crate::error::ConfigError::Invalid(other.to_string())),
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (user, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = user.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// Binds and runs a service: the whole aggregator in one call.
///
/// # Errors
/// See [`Service::bind`] and [`Service::run`].
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AggregatorError> {
    Service::bind(cfg).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("mqtts://u:pw@h:1"), "mqtts://u:***@h:1");
        assert_eq!(super::redact("mqtt://h:1"), "mqtt://h:1");
    }
}
