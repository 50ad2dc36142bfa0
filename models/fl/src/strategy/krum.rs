use super::set::SetRounds;
use super::state::{Kept, to_f32};
use super::{Checkpoint, OpenRound, Strategy};
use crate::{ClientUpdate, FlError, RoundConfig, RoundOptions};

/// Krum and Multi-Krum: score each update by the summed squared L2 distances to its `n − f − 2`
/// nearest neighbours and keep the `m` lowest-scoring; Krum (`m = 1`) returns that update's
/// weights unchanged, Multi-Krum their sample-weighted mean, as Flower's `aggregate_krum` does.
///
/// Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
/// Tolerant Gradient Descent", NeurIPS 2017. Requires `n >= 2f + 3` updates (the paper's
/// `2f + 2 < n`) and `m <= n`. Keeps every update: memory O(clients × parameters), time
/// O(clients² × parameters). Equal scores are broken by client id.
#[derive(Debug, Clone)]
pub struct Krum {
    byzantine: usize,
    keep: usize,
    rounds: SetRounds,
}

impl Krum {
    /// Krum tolerating `byzantine` (f) adversarial clients.
    pub fn new(byzantine: usize) -> Self {
        Self {
            byzantine,
            keep: 1,
            rounds: SetRounds::default(),
        }
    }

    /// Multi-Krum tolerating `byzantine` (f) adversarial clients and averaging the `keep` (m)
    /// best-scoring updates.
    ///
    /// # Errors
    /// [`FlError::InvalidOption`] when `keep` is 0.
    pub fn multi(byzantine: usize, keep: usize) -> Result<Self, FlError> {
        if keep == 0 {
            return Err(FlError::InvalidOption {
                name: "keep",
                reason: "must be >= 1".into(),
            });
        }
        Ok(Self {
            keep,
            ..Self::new(byzantine)
        })
    }

    /// The same strategy with `options`.
    pub fn with_options(mut self, options: RoundOptions) -> Self {
        self.rounds.options = options;
        self
    }
}

/// The indices of the `keep` best-scoring updates, best first.
fn select(byzantine: usize, keep: usize, updates: &[&Kept]) -> Result<Vec<usize>, FlError> {
    let n = updates.len();
    let needed = (2 * byzantine + 3).max(keep);
    if n < needed {
        return Err(FlError::TooFewForKrum {
            updates: n,
            byzantine,
            keep,
            needed,
        });
    }
    let distances = pairwise_sq_distances(updates);
    let closest = n - byzantine - 2;
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distances[i * n + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..closest].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(keep);
    Ok(order)
}

/// The n × n matrix of squared L2 distances, row-major.
fn pairwise_sq_distances(updates: &[&Kept]) -> Vec<f64> {
    let n = updates.len();
    let mut d = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (&updates[i].params.0, &updates[j].params.0);
            let s: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
                .sum();
            d[i * n + j] = s;
            d[j * n + i] = s;
        }
    }
    d
}

/// The weighted mean of the selected updates.
fn weighted_mean(selected: &[&Kept], dim: usize) -> Result<Vec<f32>, FlError> {
    let mut sum = vec![0.0f64; dim];
    let mut total = 0.0;
    for u in selected {
        let w = u.weight.0;
        for (s, x) in sum.iter_mut().zip(&u.params.0) {
            *s += w * f64::from(*x);
        }
        total += w;
    }
    if total <= 0.0 {
        return Err(FlError::ZeroTotalWeight {
            updates: selected.len(),
        });
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / total).collect();
    to_f32(&mean)
}

impl Strategy for Krum {
    fn name(&self) -> &'static str {
        "krum"
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
        let (byzantine, keep) = (self.byzantine, self.keep);
        self.rounds.finish(failures, |updates, dim| {
            let best = select(byzantine, keep, updates)?;
            if let [only] = best[..] {
                return Ok(updates[only].params.0.clone());
            }
            let selected: Vec<&Kept> = best.iter().map(|&i| updates[i]).collect();
            weighted_mean(&selected, dim)
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
