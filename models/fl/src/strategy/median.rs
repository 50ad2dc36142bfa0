use super::set::{SetRounds, coordinatewise};
use super::state::to_f32;
use super::{Checkpoint, OpenRound, Strategy};
use crate::{ClientUpdate, FlError, RoundConfig, RoundOptions};

/// Coordinate-wise median of the clients' weights; sample counts and staleness are ignored,
/// as in Flower's `FedMedian`. With an even count, the mean of the two middle values.
///
/// Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
/// Statistical Rates", ICML 2018. Keeps every update: memory O(clients × parameters).
#[derive(Debug, Clone, Default)]
pub struct FedMedian {
    rounds: SetRounds,
}

impl FedMedian {
    /// FedMedian with default [`RoundOptions`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The same strategy with `options`.
    pub fn with_options(mut self, options: RoundOptions) -> Self {
        self.rounds.options = options;
        self
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

impl Strategy for FedMedian {
    fn name(&self) -> &'static str {
        "fedmedian"
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.rounds.options.config(round, 0.0)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.rounds.begin(round, global)
    }

    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.rounds.accumulate(update)
    }

    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        self.rounds.finish(failures, |updates, dim| {
            to_f32(&coordinatewise(updates, dim, median))
        })
    }

    fn open_round(&self) -> Option<OpenRound> {
        self.rounds.open_round()
    }

    fn checkpoint(&self) -> Checkpoint {
        self.rounds.checkpoint(self.name())
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        self.rounds.restore(self.name(), checkpoint)
    }
}

/// Coordinate-wise trimmed mean: per coordinate, drop the `⌊β·n⌋` smallest and largest values
/// and average the rest; sample counts and staleness are ignored, as in Flower's
/// `FedTrimmedAvg`.
///
/// Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
/// Statistical Rates", ICML 2018. Keeps every update: memory O(clients × parameters).
#[derive(Debug, Clone)]
pub struct TrimmedMean {
    beta: f64,
    rounds: SetRounds,
}

impl TrimmedMean {
    /// Trimmed mean cutting the fraction `beta` from each end (Flower's default is 0.2).
    ///
    /// # Errors
    /// [`FlError::InvalidOption`] unless `0 <= beta < 0.5`.
    pub fn new(beta: f64) -> Result<Self, FlError> {
        if !(0.0..0.5).contains(&beta) {
            let reason = format!("must be in [0, 0.5), got {beta}");
            return Err(FlError::InvalidOption {
                name: "beta",
                reason,
            });
        }
        Ok(Self {
            beta,
            rounds: SetRounds::default(),
        })
    }

    /// The same strategy with `options`.
    pub fn with_options(mut self, options: RoundOptions) -> Self {
        self.rounds.options = options;
        self
    }

    /// The fraction cut from each end.
    pub fn beta(&self) -> f64 {
        self.beta
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "fedtrimmedavg"
    }

    fn configure_round(&self, round: u64) -> RoundConfig {
        self.rounds.options.config(round, 0.0)
    }

    fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.rounds.begin(round, global)
    }

    fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.rounds.accumulate(update)
    }

    fn finish(&mut self, failures: usize) -> Result<Option<Vec<f32>>, FlError> {
        let beta = self.beta;
        self.rounds.finish(failures, |updates, dim| {
            // Truncation as Python's int(): the cut is the same as Flower's for the same beta.
            let cut = (beta * updates.len() as f64) as usize;
            let trimmed = |s: &[f64]| {
                let kept = &s[cut..s.len() - cut];
                kept.iter().sum::<f64>() / kept.len() as f64
            };
            to_f32(&coordinatewise(updates, dim, trimmed))
        })
    }

    fn open_round(&self) -> Option<OpenRound> {
        self.rounds.open_round()
    }

    fn checkpoint(&self) -> Checkpoint {
        self.rounds.checkpoint(self.name())
    }

    fn restore(&mut self, checkpoint: Checkpoint) -> Result<(), FlError> {
        self.rounds.restore(self.name(), checkpoint)
    }
}
