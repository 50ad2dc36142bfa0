//! Every strategy against reference vectors computed by Flower's own strategies
//! (`tools/scripts/flower_vectors.py`, flwr and numpy versions recorded in each file).
//!
//! Tolerances. Flower ran in float64 on the float32 inputs; fedge accumulates in f64 and
//! rounds the model to f32, so one f32 rounding (relative 2⁻²⁴) separates the one-round
//! results, plus f64 noise where the summation order differs (Flower's `aggregate_inplace`
//! scales before summing; numpy's trimmed mean sums a partitioned, not sorted, slice). Hence
//! `|fedge − flower| ≤ 2⁻²³·|flower| + 1e-7`: twice the rounding bound, and an absolute
//! floor for results that cancel to near zero (largest relative error seen: 5.9e-8). Over
//! several rounds the stateful strategies start each round from fedge's own f32 model while
//! Flower keeps its f64 one, and an adaptive step divides by `√v`, which can magnify that gap,
//! so they get `≤ 1e-5·|flower| + 1e-6` (largest seen: 4.7e-7 relative, 2.3e-7 absolute, for
//! FedAdagrad). `FL_REPORT=1` prints every error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use fedge_fl::{
    ClientUpdate, FedAvg, FedAvgM, FedMedian, FedOpt, FedOptOptions, FedProx, Krum,
    ServerOptimizer, Strategy, TrimmedMean,
};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
struct VectorFile {
    flwr: String,
    strategy: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    params: Map<String, Value>,
    initial: Vec<f32>,
    rounds: Vec<RoundVector>,
}

#[derive(Debug, Deserialize)]
struct RoundVector {
    round: u64,
    updates: Vec<UpdateVector>,
    expected: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct UpdateVector {
    client: String,
    num_samples: u64,
    params: Vec<f32>,
}

impl UpdateVector {
    fn to_update(&self) -> ClientUpdate {
        ClientUpdate::new(self.client.clone(), self.num_samples, self.params.clone())
    }
}

/// `(rtol, atol)` for a strategy, as argued in the module docs.
fn tolerance(strategy: &str) -> (f64, f64) {
    match strategy {
        "fedavgm" | "fedadam" | "fedyogi" | "fedadagrad" => (1e-5, 1e-6),
        _ => (2f64.powi(-23), 1e-7),
    }
}

fn load(strategy: &str) -> VectorFile {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "vectors",
        &format!("{strategy}.json"),
    ]
    .iter()
    .collect();
    let text = std::fs::read_to_string(&path).expect("vector file");
    let file: VectorFile = serde_json::from_str(&text).expect("vector json");
    assert_eq!(file.strategy, strategy);
    assert_eq!(file.flwr, "1.42.0", "vectors made with another flwr");
    assert!(!file.cases.is_empty());
    file
}

fn f(params: &Map<String, Value>, key: &str, default: f64) -> f64 {
    params
        .get(key)
        .map_or(default, |v| v.as_f64().expect("number"))
}

fn n(params: &Map<String, Value>, key: &str) -> usize {
    params[key].as_u64().expect("integer") as usize
}

/// Builds the fedge strategy a vector case describes.
fn build(strategy: &str, p: &Map<String, Value>) -> Box<dyn Strategy> {
    let opt = |kind, defaults: FedOptOptions| {
        let hyper = FedOptOptions {
            eta: f(p, "eta", defaults.eta),
            beta_1: f(p, "beta_1", defaults.beta_1),
            beta_2: f(p, "beta_2", defaults.beta_2),
            tau: f(p, "tau", defaults.tau),
        };
        Box::new(FedOpt::new(kind, hyper).unwrap()) as Box<dyn Strategy>
    };
    match strategy {
        "fedavg" => Box::new(FedAvg::new()),
        "fedprox" => Box::new(FedProx::new(f(p, "proximal_mu", 0.0) as f32).unwrap()),
        "fedmedian" => Box::new(FedMedian::new()),
        "fedtrimmedavg" => Box::new(TrimmedMean::new(f(p, "beta", 0.2)).unwrap()),
        "krum" => Box::new(Krum::multi(n(p, "byzantine"), n(p, "keep")).unwrap()),
        "fedavgm" => Box::new(
            FedAvgM::new(
                f(p, "server_learning_rate", 1.0),
                f(p, "server_momentum", 0.0),
            )
            .unwrap(),
        ),
        "fedadam" => opt(ServerOptimizer::Adam, FedOptOptions::adam()),
        "fedyogi" => opt(ServerOptimizer::Yogi, FedOptOptions::yogi()),
        "fedadagrad" => opt(ServerOptimizer::Adagrad, FedOptOptions::adagrad()),
        other => panic!("no strategy {other}"),
    }
}

/// How a run feeds each round's updates to the strategy.
#[derive(Clone, Copy, Debug)]
enum Feed {
    InOrder,
    Reversed,
    /// Checkpoint to JSON after half the updates, restore into a new strategy, go on.
    Restored,
}

/// Runs every round of `case`, each from the model the previous round produced.
fn run(strategy: &str, case: &Case, feed: Feed) -> Vec<Vec<f32>> {
    let mut s = build(strategy, &case.params);
    let mut global = case.initial.clone();
    let mut outputs = Vec::new();
    for r in &case.rounds {
        s.begin(r.round, &global).unwrap();
        let mut updates: Vec<ClientUpdate> =
            r.updates.iter().map(UpdateVector::to_update).collect();
        if let Feed::Reversed = feed {
            updates.reverse();
        }
        let half = updates.len() / 2;
        for (i, u) in updates.into_iter().enumerate() {
            if let (Feed::Restored, true) = (feed, i == half) {
                let json = serde_json::to_string(&s.checkpoint()).unwrap();
                s = build(strategy, &case.params);
                s.restore(serde_json::from_str(&json).unwrap()).unwrap();
            }
            s.accumulate(u).unwrap();
        }
        global = s.finish(0).unwrap().expect("a new model");
        outputs.push(global.clone());
    }
    outputs
}

fn matches_flower(strategy: &str) {
    let file = load(strategy);
    let (rtol, atol) = tolerance(strategy);
    for case in &file.cases {
        let got = run(strategy, case, Feed::InOrder);
        for (r, out) in case.rounds.iter().zip(&got) {
            assert_eq!(
                out.len(),
                r.expected.len(),
                "{} round {}",
                case.name,
                r.round
            );
            for (i, (&a, &b)) in out.iter().zip(&r.expected).enumerate() {
                let err = (f64::from(a) - b).abs();
                if std::env::var_os("FL_REPORT").is_some() {
                    eprintln!(
                        "ERR {strategy} {} {:e} {:e}",
                        case.name,
                        err,
                        err / b.abs().max(1e-30)
                    );
                }
                assert!(
                    err <= rtol * b.abs() + atol,
                    "{} round {} index {i}: fedge {a} flower {b} (error {err:e})",
                    case.name,
                    r.round
                );
            }
        }
        let restored = run(strategy, case, Feed::Restored);
        assert_eq!(got, restored, "{}: restore changed the result", case.name);
        let reversed = run(strategy, case, Feed::Reversed);
        if matches!(strategy, "fedmedian" | "fedtrimmedavg" | "krum") {
            assert_eq!(
                got, reversed,
                "{}: arrival order changed the result",
                case.name
            );
        } else {
            for (a, b) in got.iter().flatten().zip(reversed.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 2.0 * f32::EPSILON * a.abs().max(1e-6),
                    "{}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn fedavg_matches_flower() {
    matches_flower("fedavg");
}

#[test]
fn fedprox_matches_flower() {
    matches_flower("fedprox");
}

#[test]
fn fedprox_sends_flowers_proximal_mu() {
    for case in &load("fedprox").cases {
        let mu = f(&case.params, "proximal_mu", f64::NAN) as f32;
        let s = build("fedprox", &case.params);
        assert_eq!(s.configure_round(4).proximal_mu, mu);
    }
}

#[test]
fn fedavgm_matches_flower() {
    matches_flower("fedavgm");
}

#[test]
fn fedadam_matches_flower() {
    matches_flower("fedadam");
}

#[test]
fn fedyogi_matches_flower() {
    matches_flower("fedyogi");
}

#[test]
fn fedadagrad_matches_flower() {
    matches_flower("fedadagrad");
}

#[test]
fn fedmedian_matches_flower() {
    matches_flower("fedmedian");
}

#[test]
fn trimmed_mean_matches_flower() {
    matches_flower("fedtrimmedavg");
}

#[test]
fn krum_and_multi_krum_match_flower() {
    matches_flower("krum");
}
