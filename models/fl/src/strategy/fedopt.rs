use serde::{Deserialize, Serialize};

use super::state::{F64s, Round, Verdict, WeightedSum, to_f32, verdict};
use super::{
    Checkpoint, OpenRound, State, Strategy, check_server_size, open_round, validate_round,
    validate_server, wrong_kind,
};
use crate::{ClientUpdate, FlError, RoundConfig, RoundOptions};

/// The server optimiser of a [`FedOpt`] strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerOptimizer {
    /// FedAdam: `v ← β₂·v + (1 − β₂)·Δ²`, bias-corrected step size.
    Adam,
    /// FedYogi: `v ← v − (1 − β₂)·Δ²·sign(v − Δ²)`.
    Yogi,
    /// FedAdagrad: `v ← v + Δ²`.
    Adagrad,
}

/// Server optimiser hyper-parameters; the client learning rate `η_l` is
/// [`RoundOptions::learning_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FedOptOptions {
    /// Server learning rate η.
    pub eta: f64,
    /// First-moment decay β₁.
    pub beta_1: f64,
    /// Second-moment decay β₂ (unused by Adagrad).
    pub beta_2: f64,
    /// Adaptivity τ, added to `√v`.
    pub tau: f64,
}

impl FedOptOptions {
    /// Flower's `FedAdam` defaults: η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-9.
    pub const fn adam() -> Self {
        Self {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-9,
        }
    }

    /// Flower's `FedYogi` defaults: η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3.
    pub const fn yogi() -> Self {
        Self {
            eta: 0.01,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }
    }

    /// Flower's `FedAdagrad` defaults: η = 0.1, β₁ = 0 (no momentum), τ = 1e-9.
    pub const fn adagrad() -> Self {
        Self {
            eta: 0.1,
            beta_1: 0.0,
            beta_2: 0.0,
            tau: 1e-9,
        }
    }

    fn validate(&self) -> Result<(), FlError> {
        let bad = |name, reason: &str| {
            Err(FlError::InvalidOption {
                name,
                reason: reason.into(),
            })
        };
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return bad("eta", "must be finite and > 0");
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad("tau", "must be finite and > 0");
        }
        if !(0.0..1.0).contains(&self.beta_1) {
            return bad("beta_1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta_2) {
            return bad("beta_2", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Adaptive federated optimisation: FedAvg's mean gives the pseudo-gradient
/// `Δ = fedavg(updates) − global`, and the server applies Adam, Yogi or Adagrad to it:
/// `m ← β₁·m + (1 − β₁)·Δ`, `v` by the optimiser, `w ← w + η·m / (√v + τ)`.
///
/// Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
/// Optimization", ICLR 2021. The arithmetic is Flower's (`fedadam.py`, `fedyogi.py`,
/// `fedadagrad.py`), including FedAdam's bias-corrected step
/// `η·√(1 − β₂^(t+1)) / (1 − β₁^(t+1))` with `t` the round number, and `m = v = 0` before the
/// first round. Streaming; server state is two f64 vectors.
#[derive(Debug, Clone)]
pub struct FedOpt {
    optimizer: ServerOptimizer,
    hyper: FedOptOptions,
    options: RoundOptions,
    open: Option<Round<WeightedSum>>,
    m: Option<F64s>,
    v: Option<F64s>,
}

impl FedOpt {
    /// A FedOpt strategy; the client learning rate defaults to Flower's `eta_l` for the
    /// optimiser (0.1, or 0.0316 for Yogi).
    ///
    /// # Errors
    /// [`FlError::InvalidOption`] unless η, τ > 0 and β₁, β₂ ∈ [0, 1).
    pub fn new(optimizer: ServerOptimizer, hyper: FedOptOptions) -> Result<Self, FlError> {
        hyper.validate()?;
        Ok(Self::unchecked(optimizer, hyper))
    }

    /// FedAdam with Flower's defaults.
    pub fn adam() -> Self {
        Self::unchecked(ServerOptimizer::Adam, FedOptOptions::adam())
    }

    /// FedYogi with Flower's defaults.
    pub fn yogi() -> Self {
        Self::unchecked(ServerOptimizer::Yogi, FedOptOptions::yogi())
    }

    /// FedAdagrad with Flower's defaults.
    pub fn adagrad() -> Self {
        Self::unchecked(ServerOptimizer::Adagrad, FedOptOptions::adagrad())
    }

    fn unchecked(optimizer: ServerOptimizer, hyper: FedOptOptions) -> Self {
        let eta_l = if optimizer == ServerOptimizer::Yogi {
            0.0316
        } else {
            0.1
        };
        let options = RoundOptions {
            learning_rate: eta_l,
            ..RoundOptions::default()
        };
        Self {
            optimizer,
            hyper,
            options,
            open: None,
            m: None,
            v: None,
        }
    }

    /// The same strategy with `options` (their `learning_rate` is η_l).
    pub fn with_options(self, options: RoundOptions) -> Self {
        Self { options, ..self }
    }

    /// The server optimiser.
    pub fn optimizer(&self) -> ServerOptimizer {
        self.optimizer
    }

    /// The new global model and moments for the round's mean.
    fn step(&self, round: &Round<WeightedSum>) -> Result<(Vec<f32>, F64s, F64s), FlError> {
        let avg = round.acc.mean()?;
        let global = round.global()?;
        let dim = global.len();
        let zeros = vec![0.0; dim];
        let m_old = self.m.as_ref().map_or(&zeros[..], |m| &m.0[..]);
        let v_old = self.v.as_ref().map_or(&zeros[..], |v| &v.0[..]);
        let (b1, tau) = (self.hyper.beta_1, self.hyper.tau);
        let eta = self.step_size(round.round);
        let (mut m, mut v, mut new) = (
            Vec::with_capacity(dim),
            Vec::with_capacity(dim),
            Vec::with_capacity(dim),
        );
        for i in 0..dim {
            let delta = avg[i] - global[i];
            let mi = b1 * m_old[i] + (1.0 - b1) * delta;
            let vi = self.second_moment(v_old[i], delta);
            new.push(global[i] + eta * mi / (vi.sqrt() + tau));
            m.push(mi);
            v.push(vi);
        }
        Ok((to_f32(&new)?, F64s(m), F64s(v)))
    }

    fn second_moment(&self, v: f64, delta: f64) -> f64 {
        let d2 = delta * delta;
        let b2 = self.hyper.beta_2;
        match self.optimizer {
            ServerOptimizer::Adam => b2 * v + (1.0 - b2) * d2,
            ServerOptimizer::Yogi => v - (1.0 - b2) * d2 * sign(v - d2),
            ServerOptimizer::Adagrad => v + d2,
        }
    }

    fn step_size(&self, round: u64) -> f64 {
        let FedOptOptions {
            eta,
            beta_1,
            beta_2,
            ..
        } = self.hyper;
        match self.optimizer {
            ServerOptimizer::Adam => {
                let t = round as f64 + 1.0;
                eta * (1.0 - beta_2.powf(t)).sqrt() / (1.0 - beta_1.powf(t))
            }
            ServerOptimizer::Yogi | ServerOptimizer::Adagrad => eta,
        }
    }
}

/// numpy's `sign`: 0 for 0 (`f64::signum` gives ±1).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.optimizer {
            ServerOptimizer::Adam => "fedadam",
            ServerOptimizer::Yogi => "fedyogi",
            ServerOptimizer::Adagrad => "fedadagrad",
        }
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.options.config(round, 0.0)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        check_server_size(self.m.as_ref(), global)?;
        let sum = WeightedSum::new(global.len());
        self.open = Some(Round::open(round, global, true, sum)?);
        Ok(())
    }

    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.open
            .as_mut()
            .ok_or(FlError::NoOpenRound)?
            .admit(update)
    }

    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        let out = match verdict(&self.open, &self.options, failures)? {
            Verdict::Keep => None,
            Verdict::Aggregate(round) => {
                let (model, m, v) = self.step(round)?;
                (self.m, self.v) = (Some(m), Some(v));
                Some(model)
            }
        };
        self.open = None;
        Ok(out)
    }

    fn open_round(&self) -> Option<OpenRound> {
        open_round(&self.open)
    }

    fn checkpoint(&self) -> Checkpoint {
        let state = State::Moments {
            round: self.open.clone(),
            m: self.m.clone(),
            v: self.v.clone(),
        };
        Checkpoint::new(self.name(), state)
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        let State::Moments { round, m, v } = checkpoint.into_state(self.name())? else {
            return Err(wrong_kind());
        };
        validate_round(&round, true)?;
        validate_server(round.as_ref().map(|r| r.dim), &[m.as_ref(), v.as_ref()])?;
        if v.as_ref().is_some_and(|v| v.0.iter().any(|x| *x < 0.0)) {
            return Err(FlError::CorruptCheckpoint {
                reason: "negative second moment",
            });
        }
        (self.open, self.m, self.v) = (round, m, v);
        Ok(())
    }
}
