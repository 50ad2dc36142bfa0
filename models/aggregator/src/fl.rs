//! The seam to `fedge-fl`: building a strategy from its name and parameters, running one
//! round over the stored updates, and decoding update deltas.
//!
//! A round is aggregated at once when it closes: `begin`, one `accumulate` per stored update in
//! device-id order, `finish`. The result is therefore a function of the *set* of accepted
//! updates (not of their arrival order), which makes a run interrupted by crashes produce
//! bit-for-bit the model of an uninterrupted one. Between rounds only the strategy's server
//! state (momentum, moments) is kept, as a `fedge_fl::Checkpoint` in JSON.

use fedge_fl::{
    ClientUpdate, FedAvg, FedAvgM, FedMedian, FedOpt, FedOptOptions, FedProx, FlError, Krum,
    RoundOptions, ServerOptimizer, TrimmedMean,
};
use fedge_proto::msg::Reason;
use serde::Deserialize;

use crate::config::{StrategySpec, UpdateCodec};
use crate::records::StoredUpdate;
use crate::rules::Rejection;

/// Parameters a strategy spec may carry; each strategy reads its own and refuses the others.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    proximal_mu: Option<f32>,
    server_learning_rate: Option<f64>,
    server_momentum: Option<f64>,
    eta: Option<f64>,
    beta_1: Option<f64>,
    beta_2: Option<f64>,
    tau: Option<f64>,
    beta: Option<f64>,
    byzantine: Option<usize>,
    keep: Option<usize>,
    accept_failures: Option<bool>,
}

/// The parameters each strategy name accepts (besides `accept_failures`).
const NAMES: [(&str, &[&str]); 8] = [
    ("fedavg", &[]),
    ("fedprox", &["proximal_mu"]),
    ("fedavgm", &["server_learning_rate", "server_momentum"]),
    ("fedadam", &["eta", "beta_1", "beta_2", "tau"]),
    ("fedyogi", &["eta", "beta_1", "beta_2", "tau"]),
    ("fedadagrad", &["eta", "beta_1", "tau"]),
    ("fedmedian", &[]),
    ("fedtrimmedavg", &["beta"]),
];
const KRUM: &[&str] = &["byzantine", "keep"];

/// A configured strategy and its server state between rounds.
#[derive(Debug)]
pub struct Strategy {
    inner: Box<dyn fedge_fl::Strategy>,
}

impl Strategy {
    /// Builds the strategy `spec` names. Names are Flower's in lower case: `fedavg`, `fedprox`
    /// (`proximal_mu`), `fedavgm` (`server_learning_rate`, `server_momentum`), `fedadam`,
    /// `fedyogi`, `fedadagrad` (`eta`, `beta_1`, `beta_2`, `tau`), `fedmedian`, `fedtrimmedavg`
    /// (`beta`), `krum` (`byzantine`, `keep`); every one also takes `accept_failures`.
    ///
    /// # Errors
    /// Unknown name, a parameter the strategy does not take, or one out of range.
    pub fn build(spec: &StrategySpec) -> Result<Self, String> {
        let name = spec.name.as_str();
        let allowed = NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a);
        let allowed = match (allowed, name) {
            (Some(a), _) => a,
            (None, "krum") => KRUM,
            _ => return Err(format!("unknown strategy {name:?}")),
        };
        if let Some(k) = spec
            .params
            .keys()
            .find(|k| *k != "accept_failures" && !allowed.contains(&k.as_str()))
        {
            return Err(format!(
                "strategy {name} takes no parameter {k:?} (it takes {allowed:?})"
            ));
        }
        let p: Params = serde_json::from_value(serde_json::Value::Object(spec.params.clone()))
            .map_err(|e| format!("strategy {name}: {e}"))?;
        let options = RoundOptions {
            min_updates: 1,
            accept_failures: p.accept_failures.unwrap_or(true),
            ..RoundOptions::default()
        };
        let inner = make(name, &p, options).map_err(|e| format!("strategy {name}: {e}"))?;
        Ok(Self { inner })
    }

    /// Restores the server state saved by [`Strategy::state`].
    ///
    /// # Errors
    /// A state of another strategy, or corrupt.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        let cp: fedge_fl::Checkpoint =
            serde_json::from_slice(state).map_err(|e| format!("strategy state: {e}"))?;
        self.inner.restore(cp).map_err(|e| e.to_string())
    }

    /// The server state to store with the round's model.
    pub fn state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.inner.checkpoint()).unwrap_or_default()
    }

    /// Runs round `round` from `global` over `updates` (in the given order, device-id order
    /// from the store) with `failures` selected devices that did not report. `updates` carry
    /// deltas; the strategy receives the devices' new weights `global + delta`. Returns the new
    /// model (the current one when the strategy's failure policy keeps it). On error the
    /// strategy is left as before.
    ///
    /// # Errors
    /// The strategy refused the round (too few updates for Krum, zero weight, overflow).
    pub fn aggregate(
        &mut self,
        round: u64,
        global: &[f32],
        updates: &[StoredUpdate],
        failures: usize,
    ) -> Result<Vec<f32>, String> {
        let before = self.inner.checkpoint();
        let result = self.run_round(round, global, updates, failures);
        if result.is_err() {
            let _ = self.inner.restore(before);
        }
        result.map_err(|e| e.to_string())
    }

    fn run_round(
        &mut self,
        round: u64,
        global: &[f32],
        updates: &[StoredUpdate],
        failures: usize,
    ) -> Result<Vec<f32>, FlError> {
        self.inner.begin(round, global)?;
        for u in updates {
            let params = fedge_fl::apply_delta(global, &u.delta)?;
            let client = if u.for_round == round {
                u.device.clone()
            } else {
                format!("{}@{}", u.device, u.for_round)
            };
            self.inner.accumulate(
                ClientUpdate::new(client, u.num_samples, params)
                    .with_staleness_weight(u.staleness_weight),
            )?;
        }
        Ok(self
            .inner
            .finish(failures)?
            .unwrap_or_else(|| global.to_vec()))
    }
}

fn make(
    name: &str,
    p: &Params,
    options: RoundOptions,
) -> Result<Box<dyn fedge_fl::Strategy>, FlError> {
    let opt = |defaults: FedOptOptions| FedOptOptions {
        eta: p.eta.unwrap_or(defaults.eta),
        beta_1: p.beta_1.unwrap_or(defaults.beta_1),
        beta_2: p.beta_2.unwrap_or(defaults.beta_2),
        tau: p.tau.unwrap_or(defaults.tau),
    };
    Ok(match name {
        "fedavg" => Box::new(FedAvg::new().with_options(options)),
        "fedprox" => Box::new(FedProx::new(p.proximal_mu.unwrap_or(0.0))?.with_options(options)),
        "fedavgm" => Box::new(
            FedAvgM::new(
                p.server_learning_rate.unwrap_or(1.0),
                p.server_momentum.unwrap_or(0.0),
            )?
            .with_options(options),
        ),
        "fedadam" => Box::new(
            FedOpt::new(ServerOptimizer::Adam, opt(FedOptOptions::adam()))?.with_options(options),
        ),
        "fedyogi" => Box::new(
            FedOpt::new(ServerOptimizer::Yogi, opt(FedOptOptions::yogi()))?.with_options(options),
        ),
        "fedadagrad" => Box::new(
            FedOpt::new(ServerOptimizer::Adagrad, opt(FedOptOptions::adagrad()))?
                .with_options(options),
        ),
        "fedmedian" => Box::new(FedMedian::new().with_options(options)),
        "fedtrimmedavg" => Box::new(TrimmedMean::new(p.beta.unwrap_or(0.2))?.with_options(options)),
        _ => match p.keep {
            Some(keep) => {
                Box::new(Krum::multi(p.byzantine.unwrap_or(0), keep)?.with_options(options))
            }
            None => Box::new(Krum::new(p.byzantine.unwrap_or(0)).with_options(options)),
        },
    })
}

/// Decodes an update delta (a `fedge-fl` codec buffer) that must be in `codec` and hold
/// `param_count` values. The header is checked before anything is allocated.
///
/// # Errors
/// `Malformed` (bad header, another codec, length disagreeing with the header), `WrongShape`
/// (another value count), `NonFinite` (NaN, ±Inf, or an int8 block scale that is not finite).
pub fn decode_delta(
    codec: UpdateCodec,
    bytes: &[u8],
    param_count: usize,
) -> Result<Vec<f32>, Rejection> {
    let (got, n) = fedge_fl::codec::header(bytes)
        .map_err(|e| Rejection::new(Reason::Malformed, e.to_string()))?;
    let same = matches!(
        (codec, got),
        (UpdateCodec::F32, fedge_fl::Codec::F32)
            | (UpdateCodec::F16, fedge_fl::Codec::F16)
            | (UpdateCodec::Int8, fedge_fl::Codec::Int8Block { .. })
    );
    if !same {
        return Err(Rejection::new(
            Reason::Malformed,
            format!("update encoded as {got:?}, the round uses {codec:?}"),
        ));
    }
    if n != param_count {
        return Err(Rejection::new(
            Reason::WrongShape,
            format!("{n} parameters, expected {param_count}"),
        ));
    }
    fedge_fl::decode(bytes).map_err(|e| {
        let reason = match e {
            FlError::NonFiniteValue { .. } | FlError::InvalidScale { .. } => Reason::NonFinite,
            _ => Reason::Malformed,
        };
        Rejection::new(reason, e.to_string())
    })
}

/// L2 norm, accumulated in f64 (`fedge_fl::l2_norm`).
pub fn l2_norm(v: &[f32]) -> f64 {
    f64::from(fedge_fl::l2_norm(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> StrategySpec {
        toml::from_str(text).expect("spec")
    }

    #[test]
    fn builds_every_named_strategy_and_refuses_foreign_parameters() {
        for name in [
            "fedavg",
            "fedprox",
            "fedavgm",
            "fedadam",
            "fedyogi",
            "fedadagrad",
            "fedmedian",
            "fedtrimmedavg",
            "krum",
        ] {
            Strategy::build(&spec(&format!("name = \"{name}\"")))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(Strategy::build(&spec("name = \"fedadam\"\neta = 0.01")).is_ok());
        assert!(
            Strategy::build(&spec("name = \"fedavg\"\neta = 0.01"))
                .expect_err("foreign")
                .contains("eta")
        );
        assert!(Strategy::build(&spec("name = \"nope\"")).is_err());
        assert!(Strategy::build(&spec("name = \"fedtrimmedavg\"\nbeta = 0.7")).is_err());
    }

    #[test]
    fn decode_checks_codec_shape_and_values() {
        let f32s = fedge_fl::Codec::F32.encode(&[1.0, 2.0]).expect("encode");
        assert_eq!(decode_delta(UpdateCodec::F32, &f32s, 2), Ok(vec![1.0, 2.0]));
        let reason = |c, b: &[u8], n| decode_delta(c, b, n).err().map(|r| r.reason);
        assert_eq!(reason(UpdateCodec::F16, &f32s, 2), Some(Reason::Malformed));
        assert_eq!(reason(UpdateCodec::F32, &f32s, 3), Some(Reason::WrongShape));
        assert_eq!(
            reason(UpdateCodec::F32, &f32s[..9], 2),
            Some(Reason::Malformed)
        );
        assert_eq!(
            reason(UpdateCodec::F32, b"junk", 2),
            Some(Reason::Malformed)
        );
        let mut nan = f32s.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(reason(UpdateCodec::F32, &nan, 2), Some(Reason::NonFinite));
        let int8 = fedge_fl::Codec::int8()
            .encode(&[0.5, -1.0])
            .expect("encode");
        assert_eq!(
            decode_delta(UpdateCodec::Int8, &int8, 2).map(|v| v.len()),
            Ok(2)
        );
    }
}
