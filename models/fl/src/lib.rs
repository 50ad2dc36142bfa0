//! Federated-learning math shared by the device and the server: aggregation strategies, update
//! codecs and vector helpers. Sync and sans-io: no transport, no clock, no threads.
//!
//! # Layout
//! - [`strategy`]: the [`Strategy`] trait (configure a round, accumulate updates, finish with
//!   explicit failures, checkpoint and restore) and its implementations: [`FedAvg`],
//!   [`FedProx`], [`FedAvgM`], [`FedOpt`] (FedAdam, FedYogi, FedAdagrad), [`FedMedian`],
//!   [`TrimmedMean`], [`Krum`] (and Multi-Krum).
//! - [`codec`]: encoding updates as f32, f16 or block-scaled int8, with validating decode.
//! - [`vector`]: [`l2_norm`], [`clip_l2`], [`delta`], [`apply_delta`].
//! - [`dp`]: differential privacy: L2 clipping (fixed and adaptive), Gaussian noise on the
//!   device or on the server's sum, and an RDP accountant with a per-job ε budget.
//! - [`secagg`]: secure aggregation, SecAgg+ style: the aggregator learns only the sum.
//! - [`ClientUpdate`], [`RoundConfig`], [`RoundOptions`]: what flows in and out of a round.
//! - [`FlError`]: every failure, as a value.
//!
//! # Example
//! ```
//! use fedge_fl::{ClientUpdate, FedAvg, Strategy};
//!
//! let mut strategy = FedAvg::new();
//! let global = vec![0.0f32; 3];
//! let config = strategy.configure_round(1); // sent to the clients with the model
//! assert_eq!(config.round, 1);
//!
//! strategy.begin(1, &global)?;
//! strategy.accumulate(ClientUpdate::new("a", 10, vec![1.0, 2.0, 3.0]))?;
//! strategy.accumulate(ClientUpdate::new("b", 30, vec![5.0, 6.0, 7.0]))?;
//! let saved = serde_json::to_string(&strategy.checkpoint()).expect("serializable");
//!
//! let mut resumed = FedAvg::new(); // e.g. after a restart
//! resumed.restore(serde_json::from_str(&saved).expect("valid json"))?;
//! let new_global = resumed.finish(0)?.expect("a new model");
//! assert_eq!(new_global, [4.0, 5.0, 6.0]);
//! # Ok::<(), fedge_fl::FlError>(())
//! ```

pub mod codec;
pub mod dp;
mod error;
mod round;
pub mod secagg;
pub mod strategy;
pub mod vector;

pub use codec::{Codec, decode};
pub use error::FlError;
pub use round::{ClientUpdate, RoundConfig, RoundOptions};
pub use strategy::{
    Checkpoint, FedAvg, FedAvgM, FedMedian, FedOpt, FedOptOptions, FedProx, Krum, OpenRound,
    ServerOptimizer, Strategy, TrimmedMean,
};
pub use vector::{apply_delta, clip_l2, delta, l2_norm};
