use serde::{Deserialize, Serialize};

/// One client's result for a round: its new weights, like Flower's `FitRes` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The client's id; each client counts at most once per round.
    pub client: String,
    /// Training samples the client used; the sample-weighted strategies weight by it.
    pub num_samples: u64,
    /// The client's new model parameters (not the delta), as long as the global model.
    pub params: Vec<f32>,
    /// Multiplies the sample weight (late updates get less than 1); finite and `>= 0`.
    #[serde(default = "one")]
    pub staleness_weight: f32,
}

fn one() -> f32 {
    1.0
}

impl ClientUpdate {
    /// An update with staleness weight 1.
    pub fn new(client: impl Into<String>, num_samples: u64, params: Vec<f32>) -> Self {
        Self {
            client: client.into(),
            num_samples,
            params,
            staleness_weight: 1.0,
        }
    }

    /// The same update with `staleness_weight` in place of the current one.
    pub fn with_staleness_weight(self, staleness_weight: f32) -> Self {
        Self {
            staleness_weight,
            ..self
        }
    }

    /// The aggregation weight: `num_samples × staleness_weight`, in f64.
    pub fn weight(&self) -> f64 {
        self.num_samples as f64 * f64::from(self.staleness_weight)
    }
}

/// What a strategy asks of the clients for one round; the service sends it with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    pub round: u64,
    /// Client learning rate (Flower's `eta_l` for the FedOpt family).
    pub learning_rate: f32,
    pub epochs: u32,
    pub batch_size: u32,
    /// FedProx proximal term μ; 0 for every other strategy.
    #[serde(default)]
    pub proximal_mu: f32,
}

/// Options every strategy has: the round's acceptance policy and the client hyper-parameters
/// it hands out in [`RoundConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundOptions {
    /// `finish` with fewer updates fails with [`FlError::TooFewUpdates`](crate::FlError);
    /// values below 1 count as 1.
    pub min_updates: usize,
    /// When false, `finish` with any failure keeps the model (returns `Ok(None)`), like
    /// Flower's `accept_failures = False`.
    pub accept_failures: bool,
    pub learning_rate: f32,
    pub epochs: u32,
    pub batch_size: u32,
}

impl Default for RoundOptions {
    fn default() -> Self {
        Self {
            min_updates: 1,
            accept_failures: true,
            learning_rate: 0.1,
            epochs: 1,
            batch_size: 32,
        }
    }
}

impl RoundOptions {
    pub(crate) fn config(&self, round: u64, proximal_mu: f32) -> RoundConfig {
        RoundConfig {
            round,
            learning_rate: self.learning_rate,
            epochs: self.epochs,
            batch_size: self.batch_size,
            proximal_mu,
        }
    }

    pub(crate) fn min(&self) -> usize {
        self.min_updates.max(1)
    }
}
