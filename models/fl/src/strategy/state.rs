//! In-round state shared by the strategies: the open round, its accumulators, and the bit-exact
//! serde form they are checkpointed in.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ClientUpdate, FlError, RoundOptions};

/// f32 values serialized as their IEEE bit patterns, so every serde format restores them exactly.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct F32s(pub Vec<f32>);

/// f64 values serialized as their IEEE bit patterns. serde_json's default float parser is not
/// always correctly rounded, so a running sum written as decimal could come back a bit off.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct F64s(pub Vec<f64>);

/// One f64 serialized as its bit pattern.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct F64(pub f64);

impl Serialize for F32s {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|x| x.to_bits()))
    }
}

impl<'de> Deserialize<'de> for F32s {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bits = Vec::<u32>::deserialize(d)?;
        Ok(Self(bits.into_iter().map(f32::from_bits).collect()))
    }
}

impl Serialize for F64s {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|x| x.to_bits()))
    }
}

impl<'de> Deserialize<'de> for F64s {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bits = Vec::<u64>::deserialize(d)?;
        Ok(Self(bits.into_iter().map(f64::from_bits).collect()))
    }
}

impl Serialize for F64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.to_bits())
    }
}

impl<'de> Deserialize<'de> for F64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(f64::from_bits(u64::deserialize(d)?)))
    }
}

/// How a round keeps what it has been given.
pub(crate) trait Accumulator {
    fn add(&mut self, update: ClientUpdate, weight: f64);
    fn count(&self) -> usize;
    /// Checks a restored accumulator against the round's parameter count.
    fn validate(&self, dim: usize, clients: &BTreeSet<String>) -> Result<(), FlError>;
}

/// A running sample-weighted sum in f64: memory O(parameters), whatever the client count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WeightedSum {
    pub sum: F64s,
    pub total_weight: F64,
    pub count: usize,
}

impl WeightedSum {
    pub fn new(dim: usize) -> Self {
        Self {
            sum: F64s(vec![0.0; dim]),
            total_weight: F64(0.0),
            count: 0,
        }
    }

    /// `sum / total_weight`, the sample-weighted mean.
    pub fn mean(&self) -> Result<Vec<f64>, FlError> {
        let total = self.total_weight.0;
        if total <= 0.0 {
            return Err(FlError::ZeroTotalWeight {
                updates: self.count,
            });
        }
        Ok(self.sum.0.iter().map(|s| s / total).collect())
    }
}

impl Accumulator for WeightedSum {
    fn add(&mut self, update: ClientUpdate, weight: f64) {
        for (s, x) in self.sum.0.iter_mut().zip(&update.params) {
            *s += weight * f64::from(*x);
        }
        self.total_weight.0 += weight;
        self.count += 1;
    }

    fn count(&self) -> usize {
        self.count
    }

    fn validate(&self, dim: usize, clients: &BTreeSet<String>) -> Result<(), FlError> {
        let corrupt = |reason| Err(FlError::CorruptCheckpoint { reason });
        if self.sum.0.len() != dim {
            return corrupt("running sum length differs from the model");
        }
        if self.count != clients.len() {
            return corrupt("update count differs from the client list");
        }
        let total = self.total_weight.0;
        if !(total.is_finite() && total >= 0.0) || self.sum.0.iter().any(|s| !s.is_finite()) {
            return corrupt("non-finite running sum");
        }
        Ok(())
    }
}

/// One kept update of a set-based strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub client: String,
    pub weight: F64,
    pub params: F32s,
}

/// Every update of the round, for the strategies that need them all (median, trimmed mean, Krum).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct UpdateSet {
    pub updates: Vec<Kept>,
}

impl UpdateSet {
    /// The updates ordered by client id, so the result does not depend on arrival order.
    pub fn sorted(&self) -> Vec<&Kept> {
        let mut v: Vec<&Kept> = self.updates.iter().collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v
    }
}

impl Accumulator for UpdateSet {
    fn add(&mut self, update: ClientUpdate, weight: f64) {
        let params = F32s(update.params);
        self.updates.push(Kept {
            client: update.client,
            weight: F64(weight),
            params,
        });
    }

    fn count(&self) -> usize {
        self.updates.len()
    }

    fn validate(&self, dim: usize, clients: &BTreeSet<String>) -> Result<(), FlError> {
        let corrupt = |reason| Err(FlError::CorruptCheckpoint { reason });
        if self.updates.len() != clients.len() {
            return corrupt("update count differs from the client list");
        }
        for u in &self.updates {
            if !clients.contains(&u.client) {
                return corrupt("kept update from a client not in the client list");
            }
            if u.params.0.len() != dim {
                return corrupt("kept update length differs from the model");
            }
            let weight_ok = u.weight.0.is_finite() && u.weight.0 >= 0.0;
            if u.params.0.iter().any(|x| !x.is_finite()) || !weight_ok {
                return corrupt("non-finite kept update");
            }
        }
        Ok(())
    }
}

/// The round in progress: its number, the model size, who has contributed, and the accumulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Round<A> {
    pub round: u64,
    pub dim: usize,
    /// The global model the round started from; kept only by strategies that step from it.
    pub global: Option<F32s>,
    pub clients: BTreeSet<String>,
    pub acc: A,
}

impl<A: Accumulator> Round<A> {
    /// Opens a round on `global`, keeping a copy of it when `keep_global`.
    pub fn open(round: u64, global: &[f32], keep_global: bool, acc: A) -> Result<Self, FlError> {
        if global.is_empty() {
            return Err(FlError::EmptyModel);
        }
        if let Some(index) = global.iter().position(|x| !x.is_finite()) {
            return Err(FlError::NonFiniteModel { index });
        }
        let kept = keep_global.then(|| F32s(global.to_vec()));
        Ok(Self {
            round,
            dim: global.len(),
            global: kept,
            clients: BTreeSet::new(),
            acc,
        })
    }

    /// Validates `update` and adds it; on error nothing changes.
    pub fn admit(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        let weight = self.check(&update)?;
        self.clients.insert(update.client.clone());
        self.acc.add(update, weight);
        Ok(())
    }

    fn check(&self, u: &ClientUpdate) -> Result<f64, FlError> {
        if self.clients.contains(&u.client) {
            return Err(FlError::DuplicateClient {
                client: u.client.clone(),
            });
        }
        if u.params.len() != self.dim {
            let (expected, got) = (self.dim, u.params.len());
            return Err(FlError::ShapeMismatch {
                client: u.client.clone(),
                expected,
                got,
            });
        }
        if let Some(index) = u.params.iter().position(|x| !x.is_finite()) {
            return Err(FlError::NonFiniteUpdate {
                client: u.client.clone(),
                index,
            });
        }
        let s = u.staleness_weight;
        if !(s.is_finite() && s >= 0.0) {
            return Err(FlError::InvalidWeight {
                client: u.client.clone(),
                staleness_weight: s,
            });
        }
        Ok(u.weight())
    }

    /// The global model the round started from, as f64.
    pub fn global(&self) -> Result<Vec<f64>, FlError> {
        let g = self.global.as_ref().ok_or(FlError::CorruptCheckpoint {
            reason: "round holds no global model",
        })?;
        Ok(g.0.iter().map(|&x| f64::from(x)).collect())
    }

    /// Checks a restored round for internal consistency.
    pub fn validate(&self, keep_global: bool) -> Result<(), FlError> {
        let corrupt = |reason| Err(FlError::CorruptCheckpoint { reason });
        if self.dim == 0 {
            return corrupt("round with an empty model");
        }
        match &self.global {
            Some(_) if !keep_global => return corrupt("round holds a global model it should not"),
            Some(g) if g.0.len() != self.dim || g.0.iter().any(|x| !x.is_finite()) => {
                return corrupt("round global model is invalid");
            }
            None if keep_global => return corrupt("round holds no global model"),
            _ => {}
        }
        self.acc.validate(self.dim, &self.clients)
    }
}

/// What `finish` should do with the open round.
pub(crate) enum Verdict<'a, A> {
    /// The failure policy refuses the round: close it and keep the model.
    Keep,
    Aggregate(&'a Round<A>),
}

/// Applies the round policy: no round, the failure policy, then the minimum update count.
pub(crate) fn verdict<'a, A: Accumulator>(
    open: &'a Option<Round<A>>,
    options: &RoundOptions,
    failures: usize,
) -> Result<Verdict<'a, A>, FlError> {
    let round = open.as_ref().ok_or(FlError::NoOpenRound)?;
    if failures > 0 && !options.accept_failures {
        return Ok(Verdict::Keep);
    }
    let got = round.acc.count();
    if got < options.min() {
        return Err(FlError::TooFewUpdates {
            got,
            min: options.min(),
        });
    }
    Ok(Verdict::Aggregate(round))
}

/// Rounds an f64 result to f32, refusing values that overflow.
pub(crate) fn to_f32(values: &[f64]) -> Result<Vec<f32>, FlError> {
    let out: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    match out.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(FlError::NonFiniteResult { index }),
        None => Ok(out),
    }
}
