use super::state::{F64s, Round, Verdict, WeightedSum, to_f32, verdict};
use super::{
    Checkpoint, OpenRound, State, Strategy, check_server_size, open_round, validate_round,
    validate_server, wrong_kind,
};
use crate::{ClientUpdate, FlError, RoundConfig, RoundOptions};

/// FedAvg with server momentum: the server takes an SGD-with-momentum step along the
/// pseudo-gradient `global − fedavg(updates)`.
///
/// Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
/// Visual Classification", arXiv:1909.06335, 2019. Same arithmetic as Flower's `FedAvgM`:
/// `v ← β·v + g` (`v ← g` in the first round), `w ← w − η·v`, no Nesterov; with `η = 1` and
/// `β = 0` it is plain FedAvg. Streaming; server state is one f64 velocity vector.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    options: RoundOptions,
    server_learning_rate: f64,
    server_momentum: f64,
    open: Option<Round<WeightedSum>>,
    velocity: Option<F64s>,
}

impl Default for FedAvgM {
    /// Flower's defaults: `server_learning_rate = 1`, `server_momentum = 0`.
    fn default() -> Self {
        Self {
            options: RoundOptions::default(),
            server_learning_rate: 1.0,
            server_momentum: 0.0,
            open: None,
            velocity: None,
        }
    }
}

impl FedAvgM {
    /// FedAvgM with server learning rate η and momentum β.
    ///
    /// # Errors
    /// [`FlError::InvalidOption`] unless `η > 0` and `0 <= β < 1`, both finite.
    pub fn new(server_learning_rate: f64, server_momentum: f64) -> Result<Self, FlError> {
        if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
            let reason = format!("must be finite and > 0, got {server_learning_rate}");
            return Err(FlError::InvalidOption {
                name: "server_learning_rate",
                reason,
            });
        }
        if !(0.0..1.0).contains(&server_momentum) {
            let reason = format!("must be in [0, 1), got {server_momentum}");
            return Err(FlError::InvalidOption {
                name: "server_momentum",
                reason,
            });
        }
        Ok(Self {
            server_learning_rate,
            server_momentum,
            ..Self::default()
        })
    }

    /// The same strategy with `options`.
    pub fn with_options(self, options: RoundOptions) -> Self {
        Self { options, ..self }
    }

    /// Whether the server steps at all (Flower's `server_opt`).
    fn server_opt(&self) -> bool {
        self.server_momentum != 0.0 || self.server_learning_rate != 1.0
    }

    /// The new global model and velocity for the round's mean.
    fn step(&self, round: &Round<WeightedSum>) -> Result<(Vec<f32>, Option<F64s>), FlError> {
        let avg = round.acc.mean()?;
        if !self.server_opt() {
            return Ok((to_f32(&avg)?, self.velocity.clone()));
        }
        let global = round.global()?;
        let pseudo: Vec<f64> = global.iter().zip(&avg).map(|(g, a)| g - a).collect();
        let lr = self.server_learning_rate;
        let descend =
            |d: &[f64]| -> Vec<f64> { global.iter().zip(d).map(|(g, d)| g - lr * d).collect() };
        if self.server_momentum == 0.0 {
            return Ok((to_f32(&descend(&pseudo))?, None));
        }
        let beta = self.server_momentum;
        let velocity = match &self.velocity {
            Some(v) => v.0.iter().zip(&pseudo).map(|(v, p)| beta * v + p).collect(),
            None => pseudo,
        };
        Ok((to_f32(&descend(&velocity))?, Some(F64s(velocity))))
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.options.config(round, 0.0)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        check_server_size(self.velocity.as_ref(), global)?;
        let sum = WeightedSum::new(global.len());
        self.open = Some(Round::open(round, global, self.server_opt(), sum)?);
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
                let (model, velocity) = self.step(round)?;
                self.velocity = velocity;
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
        let state = State::Momentum {
            round: self.open.clone(),
            velocity: self.velocity.clone(),
        };
        Checkpoint::new(self.name(), state)
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        let State::Momentum { round, velocity } = checkpoint.into_state(self.name())? else {
            return Err(wrong_kind());
        };
        validate_round(&round, self.server_opt())?;
        validate_server(round.as_ref().map(|r| r.dim), &[velocity.as_ref()])?;
        (self.open, self.velocity) = (round, velocity);
        Ok(())
    }
}
