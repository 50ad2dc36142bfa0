//! fedge-agent: the device daemon. It installs signed model bundles with verification, self-test
//! and rollback, serves the active model on local inputs, trains the federated model's head on
//! local data, reports telemetry, and keeps working through broker outages, restarts and power
//! cuts.
//!
//! Layout:
//! - [`config`]: the TOML configuration;
//! - [`service`]: [`Service::open`] / [`Service::run`], which wire everything below together;
//! - [`agent`]: the sans-io core ([`Agent`]): link events in, [`Action`]s out;
//! - [`link`]: the rumqttc driver (reconnect with backoff, last will, packet limits) and handle;
//! - [`inflight`]: pairing publishes with PUBACKs;
//! - [`outbox`]: the disk-backed store-and-forward queue and its drop policy;
//! - [`seq`]: persisted, strictly increasing sequence numbers;
//! - [`trust`]: the checks every inbound envelope passes; [`state`]: the persisted replay guard;
//! - [`transfer`]: resumable chunk downloads; [`store`]: model versions, install, rollback;
//!   [`selftest`]: a bundle's test vector;
//! - [`fl`]: the federated-learning client ([`fl::Learner`], [`fl::train_round`]);
//! - [`infer`]: inference on a watched directory; [`telemetry`]: counters and the report;
//! - [`bench`]: the link throughput benchmark; [`fsx`]: crash-safe file writes; [`tls`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), fedge_agent::AgentError> {
//! let config = fedge_agent::Config::load("agent.toml".as_ref())?;
//! let service = fedge_agent::Service::open(config)?;
//! service.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod agent;
pub mod bench;
pub mod config;
mod error;
pub mod fl;
pub mod fsx;
pub mod infer;
pub mod inflight;
pub mod link;
pub mod outbox;
pub mod secure;
pub mod selftest;
pub mod seq;
pub mod service;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod transfer;
pub mod trust;

pub use agent::{Action, Agent, Now};
pub use config::Config;
pub use error::AgentError;
pub use service::Service;
pub use telemetry::Stats;
