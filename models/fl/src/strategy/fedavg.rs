use super::state::{Round, Verdict, WeightedSum, to_f32, verdict};
use super::{Checkpoint, OpenRound, State, Strategy, open_round, validate_round, wrong_kind};
use crate::{ClientUpdate, FlError, RoundConfig, RoundOptions};

/// Federated Averaging: the sample-weighted mean of the clients' new weights.
///
/// McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
/// Networks from Decentralized Data", AISTATS 2017. Each update weighs
/// `num_samples × staleness_weight`. Streaming: an f64 running sum, memory O(parameters).
#[derive(Debug, Clone, Default)]
pub struct FedAvg {
    options: RoundOptions,
    open: Option<Round<WeightedSum>>,
}

impl FedAvg {
    /// FedAvg with default [`RoundOptions`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The same strategy with `options`.
    pub fn with_options(self, options: RoundOptions) -> Self {
        Self { options, ..self }
    }

    fn begin_inner(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.open = Some(Round::open(
            round,
            global,
            false,
            WeightedSum::new(global.len()),
        )?);
        Ok(())
    }

    fn finish_inner(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        let out = match verdict(&self.open, &self.options, failures)? {
            Verdict::Keep => None,
            Verdict::Aggregate(round) => Some(to_f32(&round.acc.mean()?)?),
        };
        self.open = None;
        Ok(out)
    }

    fn restore_inner(&mut self, state: State) -> Result<(), FlError> {
        let State::Sum(open) = state else {
            return Err(wrong_kind());
        };
        validate_round(&open, false)?;
        self.open = open;
        Ok(())
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.options.config(round, 0.0)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.begin_inner(round, global)
    }

    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.open
            .as_mut()
            .ok_or(FlError::NoOpenRound)?
            .admit(update)
    }

    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        self.finish_inner(failures)
    }

    fn open_round(&self) -> Option<OpenRound> {
        open_round(&self.open)
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.name(), State::Sum(self.open.clone()))
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        self.restore_inner(checkpoint.into_state(self.name())?)
    }
}

/// FedProx: FedAvg aggregation, plus the proximal term μ sent to the clients in
/// [`RoundConfig::proximal_mu`], which they add to their local loss as `μ/2 ‖w − w_global‖²`.
///
/// Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
/// Networks", MLSys 2020.
#[derive(Debug, Clone)]
pub struct FedProx {
    inner: FedAvg,
    proximal_mu: f32,
}

impl FedProx {
    /// FedProx with proximal term `proximal_mu` and default [`RoundOptions`].
    ///
    /// # Errors
    /// [`FlError::InvalidOption`] unless `proximal_mu` is finite and `>= 0`.
    pub fn new(proximal_mu: f32) -> Result<Self, FlError> {
        if !(proximal_mu.is_finite() && proximal_mu >= 0.0) {
            let reason = format!("must be finite and >= 0, got {proximal_mu}");
            return Err(FlError::InvalidOption {
                name: "proximal_mu",
                reason,
            });
        }
        Ok(Self {
            inner: FedAvg::new(),
            proximal_mu,
        })
    }

    /// The same strategy with `options`.
    pub fn with_options(self, options: RoundOptions) -> Self {
        Self {
            inner: self.inner.with_options(options),
            ..self
        }
    }

    /// The proximal term μ.
    pub fn proximal_mu(&self) -> f32 {
        self.proximal_mu
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.inner.options.config(round, self.proximal_mu)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.inner.begin_inner(round, global)
    }

    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.inner.accumulate(update)
    }

    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        self.inner.finish_inner(failures)
    }

    fn open_round(&self) -> Option<OpenRound> {
        self.inner.open_round()
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.name(), State::Sum(self.inner.open.clone()))
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        self.inner
            .restore_inner(checkpoint.into_state(self.name())?)
    }
}
