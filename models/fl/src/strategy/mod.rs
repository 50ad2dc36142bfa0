//! The [`Strategy`] trait and its implementations.
//!
//! A strategy decides; the service acts. The service owns transport, deadlines, persistence and
//! the round loop, and drives a strategy through one round at a time:
//!
//! ```text
//! configure_round(r) → begin(r, global) → accumulate(update)* → finish(failures)
//!                                         └─ checkpoint() after any call, restore() after a crash
//! ```

mod fedavg;
mod fedavgm;
mod fedopt;
mod krum;
mod median;
mod set;
pub(crate) mod state;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use fedavg::{FedAvg, FedProx};
pub use fedavgm::FedAvgM;
pub use fedopt::{FedOpt, FedOptOptions, ServerOptimizer};
pub use krum::Krum;
pub use median::{FedMedian, TrimmedMean};

use crate::{ClientUpdate, FlError, RoundConfig};
use state::{F64s, Round, UpdateSet, WeightedSum};

/// A federated aggregation strategy: sync, sans-io, one round at a time.
///
/// Determinism: for a given sequence of calls a strategy is bit-for-bit deterministic, and a
/// strategy restored from a [`Checkpoint`] continues exactly as the one it was taken from. The
/// set-based strategies ([`FedMedian`], [`TrimmedMean`], [`Krum`]) order updates by client id
/// before aggregating, so their result is also independent of arrival order. The streaming ones
/// ([`FedAvg`], [`FedProx`], [`FedAvgM`], [`FedOpt`]) add each update into an f64 running sum as
/// it arrives; another arrival order changes that sum only by f64 rounding (relative error
/// below `n × 2⁻⁵³` for `n` updates of like sign), far below the f32 resolution of the result,
/// but the f32 result is not guaranteed bit-identical across orders.
pub trait Strategy: Send + fmt::Debug {
    /// The strategy's name, as Flower spells it in lower case (`"fedavg"`, `"fedadam"`, ...).
    fn name(&self) -> &'static str;

    /// The hyper-parameters the clients of `round` train with.
    fn configure_round(&self, round: u64) -> RoundConfig;

    /// Opens `round` on the current `global` model, discarding any round still open.
    ///
    /// # Errors
    /// [`FlError::EmptyModel`], [`FlError::NonFiniteModel`], or
    /// [`FlError::ModelSizeChanged`] when server optimiser state exists for another size.
    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError>;

    /// Adds one client's update to the open round.
    ///
    /// # Errors
    /// [`FlError::NoOpenRound`], [`FlError::DuplicateClient`], [`FlError::ShapeMismatch`],
    /// [`FlError::NonFiniteUpdate`] or [`FlError::InvalidWeight`]; the state is then unchanged.
    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError>;

    /// Closes the round: `Ok(Some(model))` is the new global model, `Ok(None)` keeps the
    /// current one (the failure policy refused the round). `failures` is how many selected
    /// clients the service gave up on. `Ok` closes the round and commits any server optimiser
    /// state; an error leaves everything as it was, so the service may accumulate more updates
    /// and call `finish` again, or `begin` the next round.
    ///
    /// # Errors
    /// [`FlError::NoOpenRound`], [`FlError::TooFewUpdates`], [`FlError::ZeroTotalWeight`],
    /// [`FlError::TooFewForKrum`] or [`FlError::NonFiniteResult`].
    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError>;

    /// The round in progress, if any.
    fn open_round(&self) -> Option<OpenRound>;

    /// All mutable state (the open round and any server optimiser state), serializable with serde.
    fn checkpoint(&self) -> Checkpoint;

    /// Replaces all mutable state with `checkpoint`'s. Hyper-parameters are not part of a
    /// checkpoint: restore into a strategy built with the same options.
    ///
    /// # Errors
    /// [`FlError::CheckpointMismatch`] for another strategy's checkpoint,
    /// [`FlError::CorruptCheckpoint`] for inconsistent contents; the state is then unchanged.
    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError>;
}

/// The round a strategy has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRound {
    pub round: u64,
    /// Parameters in the global model.
    pub params: usize,
    /// Updates accepted so far.
    pub updates: usize,
}

/// A strategy's mutable state, opaque but serde-serializable. Floats are stored as their bit
/// patterns, so a checkpoint restores bit-exactly through any serde format (JSON included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    strategy: String,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum State {
    Sum(Option<Round<WeightedSum>>),
    Momentum {
        round: Option<Round<WeightedSum>>,
        velocity: Option<F64s>,
    },
    Moments {
        round: Option<Round<WeightedSum>>,
        m: Option<F64s>,
        v: Option<F64s>,
    },
    Set(Option<Round<UpdateSet>>),
}

impl Checkpoint {
    /// The name of the strategy that made it.
    pub fn strategy(&self) -> &str {
        &self.strategy
    }

    /// The round open when it was taken.
    pub fn round(&self) -> Option<u64> {
        match &self.state {
            State::Sum(r) | State::Momentum { round: r, .. } | State::Moments { round: r, .. } => {
                r.as_ref().map(|r| r.round)
            }
            State::Set(r) => r.as_ref().map(|r| r.round),
        }
    }

    fn new(strategy: &'static str, state: State) -> Self {
        Self {
            strategy: strategy.to_owned(),
            state,
        }
    }

    fn into_state(self, expected: &'static str) -> Result<State, FlError> {
        if self.strategy != expected {
            return Err(FlError::CheckpointMismatch {
                expected,
                found: self.strategy,
            });
        }
        Ok(self.state)
    }
}

fn open_round<A: state::Accumulator>(round: &Option<Round<A>>) -> Option<OpenRound> {
    round.as_ref().map(|r| OpenRound {
        round: r.round,
        params: r.dim,
        updates: r.acc.count(),
    })
}

fn wrong_kind() -> FlError {
    FlError::CorruptCheckpoint {
        reason: "state of another kind of strategy",
    }
}

fn validate_round<A: state::Accumulator>(
    round: &Option<Round<A>>,
    keep_global: bool,
) -> Result<(), FlError> {
    round.as_ref().map_or(Ok(()), |r| r.validate(keep_global))
}

/// Checks that server optimiser vectors agree in length with each other and the open round.
fn validate_server(round: Option<usize>, vectors: &[Option<&F64s>]) -> Result<(), FlError> {
    let corrupt = |reason| Err(FlError::CorruptCheckpoint { reason });
    let lens: Vec<usize> = vectors.iter().flatten().map(|v| v.0.len()).collect();
    if !lens.is_empty() && lens.len() != vectors.len() {
        return corrupt("server optimiser state partly missing");
    }
    if lens.windows(2).any(|w| w[0] != w[1]) {
        return corrupt("server optimiser vectors differ in length");
    }
    if let (Some(dim), Some(&len)) = (round, lens.first())
        && dim != len
    {
        return corrupt("server optimiser state length differs from the model");
    }
    if vectors
        .iter()
        .flatten()
        .any(|v| v.0.iter().any(|x| !x.is_finite()))
    {
        return corrupt("non-finite server optimiser state");
    }
    Ok(())
}

/// `ModelSizeChanged` when server state exists for a model of another size.
fn check_server_size(state: Option<&F64s>, global: &[f32]) -> Result<(), FlError> {
    match state {
        Some(s) if s.0.len() != global.len() => Err(FlError::ModelSizeChanged {
            expected: s.0.len(),
            got: global.len(),
        }),
        _ => Ok(()),
    }
}
