//! The aggregator's side of a SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::mask::{apply_mask, dequantize_sum, unpack};
use super::shamir::{self, Secret};
use super::wire::{Confirmation, MaskedInput, Reveal, RevealKind, Reveals, ShareItem, SignedKey};
use super::{RoundSetup, SecAggError, Stage, commit, parse_pair_part, same, wire};

/// A message the aggregator rejected, with whom it blames: `device` is the sender when the
/// message was validly signed (the device broke the protocol), `None` when the signature
/// failed (the message was forged or altered in transit).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub stage: Stage,
    pub device: Option<u32>,
    pub error: SecAggError,
}

/// The result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The sum of the survivors' clipped, quantised updates, dequantised.
    pub sum: Vec<f32>,
    /// The same sum as integers modulo `2^m`.
    pub quantized: Vec<u32>,
    /// The devices whose updates are in the sum.
    pub survivors: Vec<u32>,
    /// The devices that dropped at each of the five stages, in stage order.
    pub dropped: [Vec<u32>; 5],
    /// The messages rejected during the round (the first 256).
    pub faults: Vec<Fault>,
    /// Rejected messages beyond the first 256, counted only.
    pub faults_dropped: usize,
}

/// The aggregator in one round. Feed it the devices' messages with the `receive_*` methods
/// (each rejects a bad message with a typed error, records a [`Fault`] and changes nothing
/// else), and call the `close_*` methods when a stage's deadline passes or every device has
/// answered: they fail the round, with the reason, once too few devices are left to finish.
pub struct Server {
    setup: Arc<RoundSetup>,
    stage: Stage,
    failed: Option<SecAggError>,
    keys: BTreeMap<u32, Vec<SignedKey>>,
    u1: BTreeSet<u32>,
    items: BTreeMap<u32, Vec<ShareItem>>,
    u2: BTreeSet<u32>,
    commits: HashMap<(u32, u32), ([u8; 32], [u8; 32])>,
    sum: Vec<u32>,
    u3: BTreeSet<u32>,
    confirmations: BTreeMap<u32, Confirmation>,
    reveals: BTreeMap<u32, Vec<Reveal>>,
    faults: Vec<Fault>,
    faults_dropped: usize,
}

/// Faults kept in full; later ones are only counted.
const MAX_FAULTS: usize = 256;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("stage", &self.stage)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn new(setup: Arc<RoundSetup>) -> Self {
        let len = setup.params().len;
        Self {
            setup,
            stage: Stage::AdvertiseKeys,
            failed: None,
            keys: BTreeMap::new(),
            u1: BTreeSet::new(),
            items: BTreeMap::new(),
            u2: BTreeSet::new(),
            commits: HashMap::new(),
            sum: vec![0; len],
            u3: BTreeSet::new(),
            confirmations: BTreeMap::new(),
            reveals: BTreeMap::new(),
            faults: Vec::new(),
            faults_dropped: 0,
        }
    }

    /// The stage the round is at.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Messages heard in the current stage, and how many devices are expected in it: a stage
    /// can close early once every expected device has answered.
    pub fn progress(&self) -> (usize, usize) {
        match self.stage {
            Stage::AdvertiseKeys => (self.keys.len(), self.setup.roster().len()),
            Stage::ShareKeys => (self.items.len(), self.u1.len()),
            Stage::MaskedInput => (self.u3.len(), self.u2.len()),
            Stage::Consistency => (self.confirmations.len(), self.u3.len()),
            Stage::Unmask => (self.reveals.len(), self.confirmations.len()),
        }
    }

    /// Every message rejected so far.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    fn check_stage(&self, stage: Stage) -> Result<(), SecAggError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.stage != stage {
            return Err(SecAggError::WrongStage {
                stage,
                at: self.stage,
            });
        }
        Ok(())
    }

    /// Records the fault a rejected message caused. Only a validly signed message that breaks
    /// the protocol blames its sender: a forged, replayed, late or repeated message may be
    /// anyone's doing.
    fn reject<T>(&mut self, stage: Stage, error: SecAggError) -> Result<T, SecAggError> {
        let device = match &error {
            SecAggError::Misbehaved { device, .. } => Some(*device),
            _ => None,
        };
        if self.faults.len() < MAX_FAULTS {
            self.faults.push(Fault {
                stage,
                device,
                error: error.clone(),
            });
        } else {
            self.faults_dropped += 1;
        }
        Err(error)
    }

    fn fail<T>(&mut self, error: SecAggError) -> Result<T, SecAggError> {
        self.failed = Some(error.clone());
        Err(error)
    }

    fn at_least(&mut self, stage: Stage, survivors: usize) -> Result<(), SecAggError> {
        let needed = self.setup.params().threshold;
        if survivors < needed {
            return self.fail(SecAggError::BelowThreshold {
                stage,
                survivors,
                needed,
            });
        }
        Ok(())
    }

    /// The one device a batch claims to come from, with its key.
    fn sender(&self, stage: Stage, froms: impl Iterator<Item = u32>) -> Result<u32, SecAggError> {
        let froms: BTreeSet<u32> = froms.collect();
        let mut it = froms.iter();
        let (Some(&from), None) = (it.next(), it.next()) else {
            return Err(SecAggError::Malformed {
                reason: format!("a {stage} message must come from exactly one device"),
            });
        };
        self.setup.key(from)?;
        Ok(from)
    }

    /// After the signature: the sender must be expected in the stage and not yet heard.
    fn admit(stage: Stage, from: u32, expected: bool, heard: bool) -> Result<(), SecAggError> {
        if !expected {
            return Err(SecAggError::NotExpected {
                stage,
                device: from,
            });
        }
        if heard {
            return Err(SecAggError::Duplicate {
                stage,
                device: from,
            });
        }
        Ok(())
    }

    /// Stage 1: a device's keys, one per neighbour, each signed.
    ///
    /// # Errors
    /// [`SecAggError::BadSignature`], [`SecAggError::Misbehaved`] (keys for the wrong
    /// devices), [`SecAggError::Duplicate`], [`SecAggError::WrongStage`].
    pub fn receive_keys(&mut self, keys: Vec<SignedKey>) -> Result<(), SecAggError> {
        let stage = Stage::AdvertiseKeys;
        self.check_stage(stage)?;
        match self.check_keys(&keys) {
            Ok(from) => {
                self.keys.insert(from, keys);
                Ok(())
            }
            Err(e) => self.reject(stage, e),
        }
    }

    fn check_keys(&self, keys: &[SignedKey]) -> Result<u32, SecAggError> {
        let stage = Stage::AdvertiseKeys;
        let from = self.sender(stage, keys.iter().map(|k| k.from))?;
        let round = self.setup.hash();
        for k in keys {
            wire::verify(
                self.setup.key(from)?,
                &k.signed_body(round),
                &k.signature,
                stage,
                from,
            )?;
        }
        Self::admit(stage, from, true, self.keys.contains_key(&from))?;
        let to: Vec<u32> = keys.iter().map(|k| k.to).collect();
        if to != self.setup.neighbours(from) {
            return Err(SecAggError::Misbehaved {
                stage,
                device: from,
                reason: "its keys are not one per neighbour, in order".into(),
            });
        }
        Ok(from)
    }

    /// Ends stage 1: the devices that advertised (U1).
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`]: the round has failed.
    pub fn close_keys(&mut self) -> Result<Vec<u32>, SecAggError> {
        self.check_stage(Stage::AdvertiseKeys)?;
        self.u1 = self.keys.keys().copied().collect();
        self.at_least(Stage::AdvertiseKeys, self.u1.len())?;
        self.stage = Stage::ShareKeys;
        Ok(self.u1.iter().copied().collect())
    }

    /// What to relay to `device` for stage 2: its neighbours' keys addressed to it.
    pub fn keys_for(&self, device: u32) -> Vec<SignedKey> {
        self.setup
            .neighbours(device)
            .iter()
            .filter_map(|v| self.keys.get(v))
            .filter_map(|ks| ks.iter().find(|k| k.to == device).cloned())
            .collect()
    }

    /// Stage 2: a device's share items, one per neighbour that advertised.
    ///
    /// # Errors
    /// As [`receive_keys`](Self::receive_keys).
    pub fn receive_shares(&mut self, items: Vec<ShareItem>) -> Result<(), SecAggError> {
        let stage = Stage::ShareKeys;
        self.check_stage(stage)?;
        match self.check_shares(&items) {
            Ok(from) => {
                for i in &items {
                    self.commits
                        .insert((from, i.to), (i.commit_self, i.commit_pair));
                }
                self.items.insert(from, items);
                Ok(())
            }
            Err(e) => self.reject(stage, e),
        }
    }

    fn check_shares(&self, items: &[ShareItem]) -> Result<u32, SecAggError> {
        let stage = Stage::ShareKeys;
        let from = self.sender(stage, items.iter().map(|i| i.from))?;
        let round = self.setup.hash();
        for i in items {
            wire::verify(
                self.setup.key(from)?,
                &i.signed_body(round),
                &i.signature,
                stage,
                from,
            )?;
        }
        Self::admit(
            stage,
            from,
            self.u1.contains(&from),
            self.items.contains_key(&from),
        )?;
        let to: Vec<u32> = items.iter().map(|i| i.to).collect();
        let want: Vec<u32> = self
            .setup
            .neighbours(from)
            .iter()
            .copied()
            .filter(|v| self.u1.contains(v))
            .collect();
        if to != want {
            return Err(SecAggError::Misbehaved {
                stage,
                device: from,
                reason: "its shares are not one per neighbour that advertised, in order".into(),
            });
        }
        Ok(from)
    }

    /// Ends stage 2: the devices that shared (U2).
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`]: the round has failed.
    pub fn close_shares(&mut self) -> Result<Vec<u32>, SecAggError> {
        self.check_stage(Stage::ShareKeys)?;
        self.u2 = self.items.keys().copied().collect();
        self.at_least(Stage::ShareKeys, self.u2.len())?;
        self.stage = Stage::MaskedInput;
        Ok(self.u2.iter().copied().collect())
    }

    /// What to relay to `device` for stage 3: the share items addressed to it.
    pub fn shares_for(&self, device: u32) -> Vec<ShareItem> {
        self.setup
            .neighbours(device)
            .iter()
            .filter_map(|v| self.items.get(v))
            .filter_map(|is| is.iter().find(|i| i.to == device).cloned())
            .collect()
    }

    /// Stage 3: a masked input, added to the running sum at once.
    ///
    /// # Errors
    /// As [`receive_keys`](Self::receive_keys).
    pub fn receive_masked(&mut self, input: MaskedInput) -> Result<(), SecAggError> {
        let stage = Stage::MaskedInput;
        self.check_stage(stage)?;
        let checked = (|| {
            let from = self.sender(stage, std::iter::once(input.from))?;
            wire::verify(
                self.setup.key(from)?,
                &input.signed_body(self.setup.hash()),
                &input.signature,
                stage,
                from,
            )?;
            Self::admit(
                stage,
                from,
                self.u2.contains(&from),
                self.u3.contains(&from),
            )?;
            let p = self.setup.params();
            unpack(&input.data, p.len, p.mod_bits).map_err(|e| SecAggError::Misbehaved {
                stage,
                device: from,
                reason: e.to_string(),
            })
        })();
        match checked {
            Ok(values) => {
                let mask = super::mask::modulus_mask(self.setup.params().mod_bits);
                for (s, v) in self.sum.iter_mut().zip(values) {
                    *s = s.wrapping_add(v) & mask;
                }
                self.u3.insert(input.from);
                Ok(())
            }
            Err(e) => self.reject(stage, e),
        }
    }

    /// Ends stage 3: the devices whose masked inputs are in the sum (U3). Fails at once if a
    /// survivor's self-mask or a dropped device's pairwise masks could not be rebuilt.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] or [`SecAggError::Unrecoverable`]: the round has failed.
    pub fn close_masked(&mut self) -> Result<Vec<u32>, SecAggError> {
        let stage = Stage::MaskedInput;
        self.check_stage(stage)?;
        self.at_least(stage, self.u3.len())?;
        let threshold = self.setup.params().threshold;
        for &u in &self.u2 {
            let what = if self.u3.contains(&u) {
                "self-mask"
            } else if self.setup.neighbours(u).iter().any(|v| self.u3.contains(v)) {
                "pairwise masks"
            } else {
                continue;
            };
            let holders = self.holders(u).count();
            if holders < threshold {
                return self.fail(SecAggError::Unrecoverable {
                    stage,
                    device: u,
                    what,
                    shares: holders,
                    threshold,
                });
            }
        }
        self.stage = Stage::Consistency;
        Ok(self.u3.iter().copied().collect())
    }

    /// Stage 4: a survivor's signature over the survivor list (U3).
    ///
    /// # Errors
    /// [`SecAggError::BadSignature`] (also when the device signed another list),
    /// [`SecAggError::NotExpected`], [`SecAggError::Duplicate`], [`SecAggError::WrongStage`].
    pub fn receive_confirmation(&mut self, c: Confirmation) -> Result<(), SecAggError> {
        let stage = Stage::Consistency;
        self.check_stage(stage)?;
        let checked = (|| {
            let from = self.sender(stage, std::iter::once(c.from))?;
            let survivors: Vec<u32> = self.u3.iter().copied().collect();
            let body = Confirmation::body(self.setup.hash(), &survivors);
            wire::verify(self.setup.key(from)?, &body, &c.signature, stage, from)?;
            Self::admit(
                stage,
                from,
                self.u3.contains(&from),
                self.confirmations.contains_key(&from),
            )
        })();
        match checked {
            Ok(()) => {
                self.confirmations.insert(c.from, c);
                Ok(())
            }
            Err(e) => self.reject(stage, e),
        }
    }

    /// Ends stage 4: the confirmations to relay to every survivor.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] below [`RoundSetup::quorum`]: the round has failed.
    pub fn close_confirmations(&mut self) -> Result<Vec<Confirmation>, SecAggError> {
        let stage = Stage::Consistency;
        self.check_stage(stage)?;
        let quorum = self.setup.quorum();
        if self.confirmations.len() < quorum {
            return self.fail(SecAggError::BelowThreshold {
                stage,
                survivors: self.confirmations.len(),
                needed: quorum,
            });
        }
        self.stage = Stage::Unmask;
        Ok(self.confirmations.values().cloned().collect())
    }

    /// The survivors that hold shares of `owner`'s secrets.
    fn holders(&self, owner: u32) -> impl Iterator<Item = u32> + '_ {
        self.setup
            .neighbours(owner)
            .iter()
            .copied()
            .filter(move |w| self.u3.contains(w) && self.commits.contains_key(&(owner, *w)))
    }

    /// Stage 5: a confirmed survivor's revealed shares, each checked against its owner's
    /// commitment.
    ///
    /// # Errors
    /// As [`receive_keys`](Self::receive_keys); [`SecAggError::Misbehaved`] names a device that
    /// revealed a share its owner did not commit to, the wrong kind, or not all it holds.
    pub fn receive_reveals(&mut self, msg: Reveals) -> Result<(), SecAggError> {
        let stage = Stage::Unmask;
        self.check_stage(stage)?;
        match self.check_reveals(&msg) {
            Ok(()) => {
                self.reveals.insert(msg.from, msg.reveals);
                Ok(())
            }
            Err(e) => self.reject(stage, e),
        }
    }

    fn check_reveals(&self, msg: &Reveals) -> Result<(), SecAggError> {
        let stage = Stage::Unmask;
        let from = self.sender(stage, std::iter::once(msg.from))?;
        let round = self.setup.hash();
        wire::verify(
            self.setup.key(from)?,
            &msg.signed_body(round),
            &msg.signature,
            stage,
            from,
        )?;
        Self::admit(
            stage,
            from,
            self.confirmations.contains_key(&from),
            self.reveals.contains_key(&from),
        )?;
        let blame = |reason: String| SecAggError::Misbehaved {
            stage,
            device: from,
            reason,
        };
        let owners: Vec<u32> = msg.reveals.iter().map(|r| r.owner).collect();
        let want: Vec<u32> = self
            .setup
            .neighbours(from)
            .iter()
            .copied()
            .filter(|&o| self.u2.contains(&o) && self.commits.contains_key(&(o, from)))
            .collect();
        if owners != want {
            return Err(blame(
                "did not reveal one share set per neighbour that shared, in order".into(),
            ));
        }
        for r in &msg.reveals {
            let (commit_self, commit_pair) = self.commits[&(r.owner, from)];
            let survived = self.u3.contains(&r.owner);
            let (kind, expected) = if survived {
                (RevealKind::SelfMask, commit_self)
            } else {
                (RevealKind::PairMasks, commit_pair)
            };
            if kind == RevealKind::SelfMask && r.bytes.len() != 32 {
                return Err(blame(format!(
                    "revealed a self-mask share of {} bytes for {}",
                    r.bytes.len(),
                    r.owner
                )));
            }
            if r.kind != kind {
                return Err(blame(format!(
                    "revealed the wrong kind of share for {}",
                    r.owner
                )));
            }
            if !same(&commit(round, kind, r.owner, from, &r.bytes), &expected) {
                return Err(blame(format!(
                    "revealed a share of {} that does not match its commitment",
                    r.owner
                )));
            }
        }
        Ok(())
    }

    /// Ends the round: rebuilds the seeds, removes the masks and returns the sum.
    ///
    /// # Errors
    /// [`SecAggError::BelowThreshold`] or [`SecAggError::Unrecoverable`] when too few
    /// survivors revealed; [`SecAggError::Misbehaved`] for an owner whose committed pairwise
    /// shares do not parse. The round has failed.
    pub fn finish(&mut self) -> Result<Aggregate, SecAggError> {
        let stage = Stage::Unmask;
        self.check_stage(stage)?;
        self.at_least(stage, self.reveals.len())?;
        match self.unmask_sum() {
            Ok(agg) => {
                self.failed = Some(SecAggError::WrongStage {
                    stage,
                    at: Stage::Unmask,
                });
                Ok(agg)
            }
            Err(e) => self.fail(e),
        }
    }

    fn unmask_sum(&mut self) -> Result<Aggregate, SecAggError> {
        let stage = Stage::Unmask;
        let params = self.setup.params().clone();
        let threshold = params.threshold;
        let mut sum = std::mem::take(&mut self.sum);
        for &owner in &self.u2 {
            let survived = self.u3.contains(&owner);
            let mut self_shares: Vec<(u8, Secret)> = Vec::new();
            let mut pair_shares: BTreeMap<u32, Vec<(u8, Secret)>> = BTreeMap::new();
            for (&holder, reveals) in &self.reveals {
                let Some(r) = reveals.iter().find(|r| r.owner == owner) else {
                    continue;
                };
                let Some(x) = self.setup.share_point(owner, holder) else {
                    continue;
                };
                if survived {
                    let mut s = [0u8; 32];
                    s.copy_from_slice(&r.bytes);
                    self_shares.push((x, s));
                } else {
                    for (v, s) in parse_pair_part(&r.bytes).ok_or(SecAggError::Misbehaved {
                        stage: Stage::ShareKeys,
                        device: owner,
                        reason: "its committed pairwise shares do not parse".into(),
                    })? {
                        pair_shares.entry(v).or_default().push((x, s));
                    }
                }
            }
            let short = |what, shares: usize| SecAggError::Unrecoverable {
                stage,
                device: owner,
                what,
                shares,
                threshold,
            };
            if survived {
                if self_shares.len() < threshold {
                    return Err(short("self-mask", self_shares.len()));
                }
                let seed = rebuild(&self_shares, threshold, owner)?;
                apply_mask(&mut sum, &seed, false, params.mod_bits);
            } else {
                for &v in self.setup.neighbours(owner) {
                    if !self.u3.contains(&v) {
                        continue;
                    }
                    let shares = pair_shares.get(&v).map_or(&[][..], |s| s.as_slice());
                    if shares.len() < threshold {
                        return Err(short("pairwise masks", shares.len()));
                    }
                    let seed = rebuild(shares, threshold, owner)?;
                    // v added +PRG(s) if v < owner, −PRG(s) otherwise: undo it.
                    apply_mask(&mut sum, &seed, v > owner, params.mod_bits);
                }
            }
        }
        let survivors: Vec<u32> = self.u3.iter().copied().collect();
        let all: Vec<u32> = (0..self.setup.roster().len() as u32).collect();
        let dropped = [
            all.iter()
                .copied()
                .filter(|d| !self.u1.contains(d))
                .collect(),
            self.u1.difference(&self.u2).copied().collect(),
            self.u2.difference(&self.u3).copied().collect(),
            self.u3
                .iter()
                .copied()
                .filter(|d| !self.confirmations.contains_key(d))
                .collect(),
            self.confirmations
                .keys()
                .copied()
                .filter(|d| !self.reveals.contains_key(d))
                .collect(),
        ];
        Ok(Aggregate {
            sum: dequantize_sum(&sum, survivors.len(), &params),
            quantized: sum,
            survivors,
            dropped,
            faults: self.faults.clone(),
            faults_dropped: self.faults_dropped,
        })
    }
}

/// Rebuilds a seed from its first `t` shares and, when there are more, checks that the last `t`
/// give the same seed: shares that match their commitments but not one polynomial were dealt
/// wrongly by their owner.
fn rebuild(shares: &[(u8, Secret)], threshold: usize, owner: u32) -> Result<Secret, SecAggError> {
    let seed = shamir::combine(&shares[..threshold])?;
    if shares.len() > threshold {
        let other = shamir::combine(&shares[shares.len() - threshold..])?;
        if !same(&seed, &other) {
            return Err(SecAggError::Misbehaved {
                stage: Stage::ShareKeys,
                device: owner,
                reason: "its shares do not lie on one polynomial".into(),
            });
        }
    }
    Ok(seed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shares_off_one_polynomial_name_their_owner() {
        let secret = [5u8; 32];
        let mut n = 0u8;
        let mut rng = |b: &mut [u8]| {
            b.iter_mut().for_each(|x| {
                n = n.wrapping_add(37);
                *x = n;
            });
            Ok(())
        };
        let xs: Vec<u8> = (1..=6).collect();
        let mut shares: Vec<(u8, Secret)> = xs
            .iter()
            .copied()
            .zip(shamir::split(&secret, 3, &xs, &mut rng).unwrap())
            .collect();
        assert_eq!(rebuild(&shares, 3, 9).unwrap(), secret);
        assert_eq!(rebuild(&shares[..3], 3, 9).unwrap(), secret);
        shares[5].1[0] ^= 1;
        assert!(matches!(
            rebuild(&shares, 3, 9),
            Err(SecAggError::Misbehaved { device: 9, .. })
        ));
    }
}
