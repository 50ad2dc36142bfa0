//! Local training: mini-batch SGD with momentum, L2 weight decay and the FedProx term.

use serde::{Deserialize, Serialize};

use super::head::{Head, Rows, Scratch};
use super::rng::SplitMix64;
use super::{Result, TrainError};

/// Hyper-parameters of one local training run (what a round announces to devices).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the local data; 0 only evaluates.
    pub epochs: usize,
    /// Rows per step; the last batch of an epoch may be smaller.
    pub batch_size: usize,
    pub learning_rate: f32,
    /// Heavy-ball momentum in `[0, 1)`: `v ← momentum·v + g`, `w ← w − learning_rate·v`.
    pub momentum: f32,
    /// L2 coefficient λ: adds `λ/2·‖w‖²` to the objective (on weights and biases alike).
    pub weight_decay: f32,
    /// FedProx μ: adds `μ/2·‖w − w_global‖²` to the objective; 0 is plain FedAvg training.
    pub proximal_mu: f32,
    /// Seeds the shuffling: equal seeds, data and start parameters give bit-identical results.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
            proximal_mu: 0.0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// # Errors
    /// [`TrainError::InvalidConfig`] naming the first value out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::InvalidConfig(what));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum {} must be in [0, 1)", self.momentum));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("proximal_mu", self.proximal_mu),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} {v} must be finite and non-negative"));
            }
        }
        Ok(())
    }
}

/// The outcome of [`train`]: the trained head evaluated on the local data, and the work done.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Mean cross-entropy of the trained head on the local data (without the penalty terms).
    pub loss: f32,
    pub accuracy: f32,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Local rows: the weight of this update in sample-weighted aggregation.
    pub samples: usize,
}

/// The objective local training minimises:
/// `mean cross-entropy + λ/2·‖w‖² + μ/2·‖w − anchor‖²`.
///
/// The proximal term is FedProx's (Li et al., "Federated Optimization in Heterogeneous
/// Networks", MLSys 2020): it keeps a device's update near the global model it started from.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    pub weight_decay: f32,
    pub proximal_mu: f32,
    /// The global parameters of the proximal term; `None` drops the term.
    pub anchor: Option<&'a [f32]>,
}

impl<'a> Objective<'a> {
    pub fn new(cfg: &TrainConfig, anchor: Option<&'a [f32]>) -> Objective<'a> {
        Objective {
            weight_decay: cfg.weight_decay,
            proximal_mu: cfg.proximal_mu,
            anchor,
        }
    }

    /// The objective on `x`, `y` and its gradient, written to `grad` (overwritten).
    ///
    /// # Errors
    /// As [`Head::loss_and_gradient`]; [`TrainError::ParamCount`] for an anchor of the wrong
    /// length.
    pub fn value_and_gradient(
        &self,
        head: &Head,
        x: &[f32],
        y: &[u32],
        grad: &mut [f32],
    ) -> Result<f64> {
        self.check_anchor(head)?;
        let loss = head.loss_and_gradient(x, y, grad)?;
        Ok(loss + self.add_penalties(head.params(), grad))
    }

    fn check_anchor(&self, head: &Head) -> Result<()> {
        match self.anchor {
            Some(a) if a.len() != head.param_count() => Err(TrainError::ParamCount {
                expected: head.param_count(),
                got: a.len(),
            }),
            _ => Ok(()),
        }
    }

    /// Adds the penalties' gradient to `grad`; returns their value.
    fn add_penalties(&self, w: &[f32], grad: &mut [f32]) -> f64 {
        let (lambda, mu) = (self.weight_decay, self.proximal_mu);
        let mut value = 0.0f64;
        if lambda > 0.0 {
            for (g, &wi) in grad.iter_mut().zip(w) {
                *g += lambda * wi;
                value += f64::from(wi) * f64::from(wi);
            }
            value *= 0.5 * f64::from(lambda);
        }
        if let Some(anchor) = self.anchor.filter(|_| mu > 0.0) {
            let mut sq = 0.0f64;
            for ((g, &wi), &ai) in grad.iter_mut().zip(w).zip(anchor) {
                *g += mu * (wi - ai);
                sq += (f64::from(wi) - f64::from(ai)).powi(2);
            }
            value += 0.5 * f64::from(mu) * sq;
        }
        value
    }
}

/// Trains `head` on `x` (row-major, one row of [`Head::features`] values per label) and `y`.
///
/// Each epoch visits the rows in a fresh permutation drawn from `cfg.seed`; each batch takes one
/// step of SGD with momentum on [`Objective`]. The proximal term anchors at `global`, or at the
/// head's parameters when training starts if `global` is `None` (a device that has just loaded
/// the global model). The run is deterministic: same data, parameters and config, same bits.
///
/// Memory: the gradient and the momentum buffer (2 × [`Head::param_count`] f32), a snapshot of
/// the start parameters when `proximal_mu > 0` and `global` is `None`, the row permutation
/// (one `usize` per row) and the activations and deltas of one row at a time (a few f32
/// vectors of hidden or class width): batches are visited in place and accumulated row by row,
/// so the batch size costs no memory.
///
/// # Errors
/// [`TrainError::InvalidConfig`]; [`TrainError::EmptyData`], [`TrainError::InputSize`],
/// [`TrainError::LabelOutOfRange`], [`TrainError::Data`] (a non-finite feature) for bad data;
/// [`TrainError::ParamCount`] for a `global` of the wrong length; [`TrainError::Diverged`] when
/// the loss stops being finite (the head then holds the parameters it became non-finite at).
pub fn train(
    head: &mut Head,
    x: &[f32],
    y: &[u32],
    cfg: &TrainConfig,
    global: Option<&[f32]>,
) -> Result<TrainReport> {
    cfg.validate()?;
    let rows = head.check_data(x, y)?;
    if let Some(g) = global.filter(|g| g.len() != head.param_count()) {
        return Err(TrainError::ParamCount {
            expected: head.param_count(),
            got: g.len(),
        });
    }
    let proximal = cfg.proximal_mu > 0.0;
    let start = (proximal && global.is_none()).then(|| head.params().to_vec());
    let anchor = global.or(start.as_deref()).filter(|_| proximal);
    let steps = descend(head, rows, y, cfg, &Objective::new(cfg, anchor))?;
    let metrics = head.loss_and_accuracy(x, y)?;
    if !metrics.loss.is_finite() {
        return Err(TrainError::Diverged { step: steps });
    }
    Ok(TrainReport {
        loss: metrics.loss,
        accuracy: metrics.accuracy,
        steps,
        samples: y.len(),
    })
}

/// The epochs of [`train`] on checked data; returns the steps taken.
fn descend(
    head: &mut Head,
    rows: Rows<'_>,
    y: &[u32],
    cfg: &TrainConfig,
    objective: &Objective<'_>,
) -> Result<usize> {
    let mut grad = vec![0.0f32; head.param_count()];
    let mut velocity = vec![0.0f32; head.param_count()];
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut rng = SplitMix64::new(cfg.seed);
    let mut scratch = Scratch::default();
    let mut steps = 0;
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for batch in order.chunks(cfg.batch_size) {
            let batch = Rows {
                idx: Some(batch),
                ..rows
            };
            let loss = head.batch_gradient(batch, y, &mut grad, &mut scratch)
                + objective.add_penalties(head.params(), &mut grad);
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step: steps });
            }
            momentum_step(head.params_mut(), &grad, &mut velocity, cfg);
            steps += 1;
        }
    }
    Ok(steps)
}

fn momentum_step(w: &mut [f32], grad: &[f32], velocity: &mut [f32], cfg: &TrainConfig) {
    for ((wi, &g), v) in w.iter_mut().zip(grad).zip(velocity) {
        *v = cfg.momentum * *v + g;
        *wi -= cfg.learning_rate * *v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::HeadKind;

    /// A small problem with every class present: 12 rows of 5 features, 3 classes.
    fn problem(seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = SplitMix64::new(seed);
        let x = (0..60).map(|_| rng.normal() as f32).collect();
        let y = (0..12).map(|i| (i % 3) as u32).collect();
        (x, y)
    }

    fn randomised(kind: HeadKind, seed: u64) -> Head {
        let mut head = Head::new(kind, 5, 3, seed).expect("head");
        let mut rng = SplitMix64::new(seed + 1);
        let p: Vec<f32> = head
            .params()
            .iter()
            .map(|&v| v + 0.3 * rng.normal() as f32)
            .collect();
        head.set_params(&p).expect("params");
        head
    }

    const H: f32 = 3e-3;

    /// The smallest hidden pre-activation of `head` on `x`, against the most a step of `H` in
    /// one parameter can move it (`H·max(1, |x|)`): above 1, no difference quotient crosses a
    /// ReLU kink.
    fn kink_clearance(head: &Head, x: &[f32]) -> f32 {
        let d = head.layer(0);
        let reach = H * x.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let nearest = x
            .chunks(d.inputs)
            .flat_map(|row| {
                (0..d.outputs).map(move |o| {
                    (d.b[o] + row.iter().zip(d.row(o)).map(|(a, b)| a * b).sum::<f32>()).abs()
                })
            })
            .fold(f32::INFINITY, f32::min);
        nearest / reach
    }

    /// Compares the analytic gradient with central differences, the difference quotient taken
    /// in f64 over the step the f32 parameters actually moved.
    fn assert_gradient_matches(head: &Head, objective: &Objective, x: &[f32], y: &[u32]) {
        let mut grad = vec![0.0; head.param_count()];
        objective
            .value_and_gradient(head, x, y, &mut grad)
            .expect("gradient");
        let mut scratch = vec![0.0; head.param_count()];
        let mut value_at = |i: usize, delta: f32| {
            let mut moved = head.clone();
            moved.params_mut()[i] += delta;
            let v = objective
                .value_and_gradient(&moved, x, y, &mut scratch)
                .expect("value");
            (v, f64::from(moved.params()[i]))
        };
        for (i, &g) in grad.iter().enumerate() {
            let ((plus, at_plus), (minus, at_minus)) = (value_at(i, H), value_at(i, -H));
            let numeric = (plus - minus) / (at_plus - at_minus);
            let scale = 1e-2 + numeric.abs().max(f64::from(g).abs());
            let err = (numeric - f64::from(g)).abs() / scale;
            assert!(err < 1e-3, "parameter {i}: analytic {g}, numeric {numeric}");
        }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences_with_l2_and_proximal_terms() {
        let (x, y) = problem(1);
        let head = randomised(HeadKind::Softmax, 2);
        let anchor: Vec<f32> = head.params().iter().map(|v| v * 0.5 - 0.1).collect();
        for (weight_decay, proximal_mu) in [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.1, 0.5)] {
            let objective = Objective {
                weight_decay,
                proximal_mu,
                anchor: Some(&anchor),
            };
            assert_gradient_matches(&head, &objective, &x, &y);
        }
    }

    #[test]
    fn mlp_gradient_matches_finite_differences_with_l2_and_proximal_terms() {
        let (x, y) = problem(3);
        let head = (4..)
            .map(|seed| randomised(HeadKind::Mlp { hidden: 7 }, seed))
            .find(|h| kink_clearance(h, &x) > 1.0)
            .expect("a head clear of the ReLU kinks");
        let anchor: Vec<f32> = head.params().iter().map(|v| v + 0.2).collect();
        for (weight_decay, proximal_mu) in [(0.0, 0.0), (0.2, 0.0), (0.0, 0.9), (0.05, 0.3)] {
            let objective = Objective {
                weight_decay,
                proximal_mu,
                anchor: Some(&anchor),
            };
            assert_gradient_matches(&head, &objective, &x, &y);
        }
    }

    #[test]
    fn one_full_batch_step_without_momentum_is_plain_gradient_descent() {
        let (x, y) = problem(5);
        let head = randomised(HeadKind::Mlp { hidden: 4 }, 6);
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: y.len(),
            learning_rate: 0.1,
            momentum: 0.0,
            weight_decay: 0.01,
            proximal_mu: 0.0,
            seed: 0,
        };
        let mut grad = vec![0.0; head.param_count()];
        Objective::new(&cfg, None)
            .value_and_gradient(&head, &x, &y, &mut grad)
            .expect("gradient");
        let mut trained = head.clone();
        let report = train(&mut trained, &x, &y, &cfg, None).expect("train");
        assert_eq!(report.steps, 1);
        for ((t, w), g) in trained.params().iter().zip(head.params()).zip(&grad) {
            assert!((t - (w - 0.1 * g)).abs() < 1e-6);
        }
    }

    #[test]
    fn momentum_accumulates_velocity() {
        let mut w = [1.0f32];
        let mut v = [0.0f32];
        let cfg = TrainConfig {
            learning_rate: 0.5,
            momentum: 0.9,
            ..TrainConfig::default()
        };
        momentum_step(&mut w, &[1.0], &mut v, &cfg);
        momentum_step(&mut w, &[1.0], &mut v, &cfg);
        assert_eq!(v, [1.9]);
        assert!((w[0] - (1.0 - 0.5 - 0.95)).abs() < 1e-6);
    }

    #[test]
    fn a_strong_proximal_term_keeps_the_update_near_the_global_model() {
        let (x, y) = problem(7);
        let global = Head::softmax(5, 3);
        let distance = |mu| {
            let mut head = global.clone();
            let cfg = TrainConfig {
                epochs: 20,
                batch_size: 4,
                proximal_mu: mu,
                weight_decay: 0.0,
                ..TrainConfig::default()
            };
            train(&mut head, &x, &y, &cfg, Some(global.params())).expect("train");
            head.params()
                .iter()
                .zip(global.params())
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        let (free, held) = (distance(0.0), distance(10.0));
        assert!(
            held < 0.2 * free,
            "‖Δw‖ with μ=10: {held}, with μ=0: {free}"
        );
    }

    #[test]
    fn training_is_bit_identical_for_a_seed() {
        let (x, y) = problem(8);
        let run = |seed| {
            let mut head = Head::mlp(5, 6, 3, 1);
            let cfg = TrainConfig {
                epochs: 3,
                batch_size: 5,
                proximal_mu: 0.1,
                seed,
                ..TrainConfig::default()
            };
            let report = train(&mut head, &x, &y, &cfg, None).expect("train");
            (head, report)
        };
        let (a, report) = run(1);
        assert_eq!(run(1), (a.clone(), report));
        assert_ne!(run(2).0, a);
        assert_eq!((report.steps, report.samples), (9, 12));
    }

    #[test]
    fn bad_configurations_and_globals_are_errors() {
        let (x, y) = problem(9);
        let mut head = Head::softmax(5, 3);
        for cfg in [
            TrainConfig {
                batch_size: 0,
                ..TrainConfig::default()
            },
            TrainConfig {
                learning_rate: f32::NAN,
                ..TrainConfig::default()
            },
            TrainConfig {
                momentum: 1.0,
                ..TrainConfig::default()
            },
            TrainConfig {
                proximal_mu: -1.0,
                ..TrainConfig::default()
            },
        ] {
            assert!(matches!(
                train(&mut head, &x, &y, &cfg, None),
                Err(TrainError::InvalidConfig(_))
            ));
        }
        let cfg = TrainConfig {
            proximal_mu: 0.1,
            ..TrainConfig::default()
        };
        assert!(matches!(
            train(&mut head, &x, &y, &cfg, Some(&[0.0; 3])),
            Err(TrainError::ParamCount {
                expected: 18,
                got: 3
            })
        ));
        assert_eq!(head, Head::softmax(5, 3));
    }

    #[test]
    fn a_diverging_run_is_an_error() {
        let (x, y) = problem(10);
        let mut head = Head::softmax(5, 3);
        let cfg = TrainConfig {
            learning_rate: 1e30,
            weight_decay: 1.0,
            ..TrainConfig::default()
        };
        assert!(matches!(
            train(&mut head, &x, &y, &cfg, None),
            Err(TrainError::Diverged { .. })
        ));
    }

    #[test]
    fn zero_epochs_only_evaluate() {
        let (x, y) = problem(11);
        let mut head = Head::softmax(5, 3);
        let cfg = TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        };
        let report = train(&mut head, &x, &y, &cfg, None).expect("train");
        assert_eq!(report.steps, 0);
        assert!((report.loss - 3f32.ln()).abs() < 1e-6);
    }
}
