//! The fedge aggregation service.
//!
//! It runs federated-learning jobs over MQTT with the `fedge-proto` wire protocol: per round it
//! announces (retained, signed), selects devices, publishes the global model in retained
//! chunks, collects signed updates, acknowledges each one only once it is durable, aggregates
//! with a `fedge-fl` strategy and publishes the next version. Everything that was acknowledged
//! is in a redb store, so a killed aggregator resumes the round it was in with every update it
//! had accepted, and counts none twice. Without a broker URL it embeds a rumqttd broker.
//!
//! # Layout
//! - [`config`]: the service and job configuration (TOML/JSON).
//! - [`rules`]: the round rules as pure functions (timing and late policy, delta checks,
//!   selection, closing).
//! - [`judge`]: one update envelope through the protocol's checks and the rules.
//! - [`store`], [`records`], [`lifecycle`]: the redb schema and the all-or-nothing steps over it.
//! - [`engine`]: the round loop, the store's only writer.
//! - [`outgoing`]: what the aggregator signs and publishes.
//! - [`mqtt`]: broker URLs, TLS, the embedded broker, the polling driver.
//! - [`http`], [`metrics`]: `/status`, `/metrics` and the JSON API.
//! - [`fl`]: the seam to `fedge-fl`.
//! - [`sealing`], [`secure`]: encrypted updates and secure aggregation (SecAgg+) sessions.
//! - [`service`]: [`Service::bind`] and [`Service::run`], and [`run`].
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), fedge_aggregator::AggregatorError> {
//! let mut cfg = fedge_aggregator::Config::default();
//! cfg.data_dir = "/var/lib/fedge-aggregator".into();
//! cfg.jobs.push(fedge_aggregator::JobSpec::parse("id = \"digits\"\nmodel = { zeros = 650 }\nrounds = 5", 1 << 20)?);
//! fedge_aggregator::run(cfg, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod codec;
pub mod config;
pub mod engine;
pub mod error;
pub mod fl;
pub mod http;
pub mod judge;
pub mod lifecycle;
pub mod metrics;
pub mod mqtt;
pub mod outgoing;
pub mod records;
pub mod rules;
pub mod sealing;
pub mod secure;
pub mod service;
pub mod store;

pub use config::{Config, JobSpec};
pub use error::{AggregatorError, ConfigError, StoreError};
pub use service::{Service, run};
