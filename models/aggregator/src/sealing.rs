//! Recipient keys of sealed (encrypted) updates, for jobs with `encrypt_updates`.
//!
//! ring's X25519 private keys are single-use, so each selected device gets its own key pair per
//! round; the public halves go out in the announcement ([`fedge_proto::seal::recipients`]), the
//! private halves stay in memory only and are spent by the first update that opens with them.
//! An aggregator restart generates new keys for the open round and announces them again: an
//! update sealed to a key from before the restart is refused (`undecryptable`), never
//! half-accepted, and the agent seals its update again to the new key. A device registered while
//! a round is open gets a key and a new announcement. Keys of earlier rounds are kept as long as
//! the late policy accepts their updates (at least 8 rounds).

use std::collections::{BTreeMap, HashMap};

use fedge_proto::msg::{Reason, Selection};
use fedge_proto::seal::{self, OpeningKey, Sealed};

use crate::error::AggregatorError;
use crate::rules::Rejection;

/// Rounds whose unspent keys are kept at least (the open one included).
const KEEP_ROUNDS: u64 = 8;

/// An announcement whose table passes this may be refused by agents with the default
/// `max_message_bytes` (64 KiB).
const TABLE_WARN_BYTES: usize = 60 << 10;

#[derive(Debug)]
struct RoundKeys {
    table: Vec<u8>,
    keys: HashMap<String, OpeningKey>,
    /// Every device that was given a key this round (spent or not).
    listed: std::collections::HashSet<String>,
}

/// The keys of one job.
#[derive(Debug, Default)]
pub struct Sealing {
    rounds: BTreeMap<u64, RoundKeys>,
}

impl Sealing {
    /// Makes sure `round` has a key for every device of `eligible` that `selection` picks, adding
    /// keys for devices registered since; keeps the keys it already has (a reconnection announces
    /// the same ones again). Keeps the keys of the `keep` latest rounds (at least 8). Returns
    /// whether the table changed.
    ///
    /// # Errors
    /// The system random generator failed.
    pub fn ensure(
        &mut self,
        job: &str,
        round: u64,
        selection: &Selection,
        eligible: &[String],
        keep: u64,
    ) -> Result<bool, AggregatorError> {
        let rk = self.rounds.entry(round).or_insert_with(|| RoundKeys {
            table: Vec::new(),
            keys: HashMap::new(),
            listed: std::collections::HashSet::new(),
        });
        let rng = ring::rand::SystemRandom::new();
        let mut added = 0usize;
        for id in eligible {
            if rk.listed.contains(id) || !selection.includes(job, round, id) {
                continue;
            }
            let key = OpeningKey::generate(&rng).map_err(AggregatorError::Proto)?;
            seal::recipients::push(&mut rk.table, id, key.public())
                .map_err(AggregatorError::Proto)?;
            rk.keys.insert(id.clone(), key);
            rk.listed.insert(id.clone());
            added += 1;
        }
        if added > 0 {
            tracing::debug!(
                job,
                round,
                added,
                devices = rk.listed.len(),
                "recipient keys generated"
            );
            if rk.table.len() > TABLE_WARN_BYTES {
                tracing::warn!(
                    job,
                    round,
                    bytes = rk.table.len(),
                    "the recipient table is large: agents need limits.max_message_bytes above the announcement's size"
                );
            }
        }
        let oldest = round.saturating_sub(keep.max(KEEP_ROUNDS) - 1);
        self.rounds.retain(|r, _| *r >= oldest);
        Ok(added > 0)
    }

    /// The recipient table announced for `round`: `None` when no keys were made for it.
    pub fn table(&self, round: u64) -> Option<&[u8]> {
        self.rounds.get(&round).map(|r| r.table.as_slice())
    }

    /// Unspent keys of `round`.
    pub fn unspent(&self, round: u64) -> usize {
        self.rounds.get(&round).map_or(0, |r| r.keys.len())
    }

    /// Opens the sealed update `payload` of `device` for `round` of `job` and returns the encoded
    /// update. Spends the device's key once the payload names it, whether or not it then opens.
    ///
    /// # Errors
    /// A [`Rejection`] with [`Reason::Undecryptable`]: not a sealed payload, no key for this
    /// device and round (not selected when the round opened, already spent, or from before a
    /// restart), or a ciphertext that does not open.
    pub fn open(
        &mut self,
        job: &str,
        device: &str,
        round: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, Rejection> {
        let refuse = |detail: String| Rejection::new(Reason::Undecryptable, detail);
        let sealed: Sealed<'_> = fedge_proto::envelope::decode(payload).map_err(|_| {
            refuse(format!(
                "job {job} takes sealed updates only; this payload is not one"
            ))
        })?;
        let keys = self.rounds.get_mut(&round).ok_or_else(|| {
            refuse(format!(
                "no recipient keys for round {round} (not announced by this aggregator run)"
            ))
        })?;
        match keys.keys.get(device) {
            None => {
                return Err(refuse(format!(
                    "no unspent key for {device} in round {round} (not selected when it opened, or already used)"
                )));
            }
            Some(k) if k.public() != &sealed.recipient => {
                return Err(refuse(format!(
                    "sealed to a key this aggregator does not hold for {device} in round {round} (announced before a restart?)"
                )));
            }
            Some(_) => {}
        }
        let key = keys
            .keys
            .remove(device)
            .ok_or_else(|| refuse(String::from("key vanished")))?;
        let aad = seal::associated_data(job, round, device);
        key.open(&sealed, &aad)
            .map_err(|e| refuse(format!("sealed update from {device}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    #[test]
    fn keys_are_per_device_and_round_and_spent_once() {
        let mut s = Sealing::default();
        s.ensure("j", 1, &Selection::All, &ids(3), 8).expect("keys");
        let table = s.table(1).expect("table").to_vec();
        assert_eq!(seal::recipients::count(&table), Ok(3));
        assert!(
            !s.ensure("j", 1, &Selection::All, &ids(3), 8)
                .expect("again")
        );
        assert_eq!(
            s.table(1),
            Some(table.as_slice()),
            "same keys on a re-announcement"
        );
        let k1 = seal::recipients::find(&table, "d1")
            .expect("table")
            .expect("d1");
        let plain = b"update bytes".to_vec();
        let wire = seal::seal(&k1, &seal::associated_data("j", 1, "d1"), &plain).expect("seal");
        // Another device's topic: d0's key does not match the one named.
        let e = s.open("j", "d0", 1, &wire).expect_err("wrong device");
        assert_eq!(e.reason, Reason::Undecryptable);
        assert_eq!(s.unspent(1), 3, "a mismatch spends nothing");
        assert_eq!(s.open("j", "d1", 1, &wire).expect("open"), plain);
        assert_eq!(s.unspent(1), 2);
        let e = s.open("j", "d1", 1, &wire).expect_err("spent");
        assert!(e.detail.contains("already used"), "{}", e.detail);
        let e = s.open("j", "d2", 1, &plain).expect_err("plain");
        assert!(e.detail.contains("sealed updates only"), "{}", e.detail);
        let e = s.open("j", "d2", 2, &wire).expect_err("round");
        assert!(e.detail.contains("round 2"), "{}", e.detail);
    }

    #[test]
    fn a_wrong_binding_spends_the_key_and_old_rounds_are_pruned() {
        let mut s = Sealing::default();
        s.ensure("j", 1, &Selection::All, &ids(1), 8).expect("keys");
        let k = seal::recipients::find(s.table(1).expect("table"), "d0")
            .expect("table")
            .expect("d0");
        let wire = seal::seal(&k, &seal::associated_data("j", 2, "d0"), b"x").expect("seal");
        let e = s.open("j", "d0", 1, &wire).expect_err("bound to round 2");
        assert!(e.detail.contains("does not decrypt"), "{}", e.detail);
        assert_eq!(s.unspent(1), 0);
        // A device registered later gets a key; the spent one is not replaced.
        assert!(s.ensure("j", 1, &Selection::All, &ids(2), 8).expect("more"));
        assert_eq!(s.unspent(1), 1);
        assert_eq!(s.table(1).map(seal::recipients::count), Some(Ok(2)));
        for r in 2..=20 {
            s.ensure("j", r, &Selection::All, &ids(1), 8).expect("keys");
        }
        assert!(s.table(12).is_none());
        assert!(s.table(13).is_some());
        s.ensure("j", 21, &Selection::All, &ids(1), 12)
            .expect("keys");
        assert!(s.table(13).is_some(), "the late policy keeps more");
        assert!(s.table(9).is_none());
        let none = Selection::Sample {
            seed: 1,
            fraction_ppm: 0,
        };
        s.ensure("j", 22, &none, &ids(4), 8).expect("keys");
        assert_eq!(s.table(22), Some(&[][..]), "sealed, nobody listed");
    }
}
