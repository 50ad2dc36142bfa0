//! The durable state, in one redb file. Every write happens in a [`Txn`] that commits with
//! immediate durability; the aggregator acknowledges an update only after the commit that
//! holds it has returned.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | u64 (`seq_reserved`: the aggregator's sequence high-water mark) |
//! | `devices` | device | JSON [`DeviceRecord`] |
//! | `last_seq` | device | u64: the highest sequence verified from that device |
//! | `jobs` | job | JSON [`JobRecord`] |
//! | `rounds` | (job, round) | JSON [`RoundRecord`] |
//! | `models` | (job, version) | f32 LE parameters |
//! | `strategy` | job | the strategy's serialized server state after the latest round |
//! | `updates` | (job, counting round, device, trained round) | [`StoredUpdate`] bytes, until the round closes |
//! | `contrib` | (job, trained round, device) | seq of the update counted for it (kept) |
//! | `seen` | (device, seq) | (job, counting round) of the accepted update (kept) |
//! | `last_refusal` | device | (seq, reason index) of its last refused fresh update, to answer a retransmission alike |

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use fedge_proto::msg::Reason;

use crate::error::StoreError;
use crate::records::{DeviceRecord, JobRecord, RoundRecord, StoredUpdate, from_json, to_json};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("last_seq");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const ROUNDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("rounds");
const MODELS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("models");
const STRATEGY: TableDefinition<&str, &[u8]> = TableDefinition::new("strategy");
const UPDATES: TableDefinition<(&str, u64, &str, u64), &[u8]> = TableDefinition::new("updates");
const CONTRIB: TableDefinition<(&str, u64, &str), u64> = TableDefinition::new("contrib");
const SEEN: TableDefinition<(&str, u64), (&str, u64)> = TableDefinition::new("seen");
const LAST_REFUSAL: TableDefinition<&str, (u64, u8)> = TableDefinition::new("last_refusal");

/// The aggregator's store.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store file and its tables.
    ///
    /// # Errors
    /// The file cannot be opened (also when another process holds it) or is not a redb file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        txn.open_table(DEVICES)?;
        txn.open_table(LAST_SEQ)?;
        txn.open_table(JOBS)?;
        txn.open_table(ROUNDS)?;
        txn.open_table(MODELS)?;
        txn.open_table(STRATEGY)?;
        txn.open_table(UPDATES)?;
        txn.open_table(CONTRIB)?;
        txn.open_table(SEEN)?;
        txn.open_table(LAST_REFUSAL)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Starts a write transaction (one at a time; a second waits).
    ///
    /// # Errors
    /// The database is unusable.
    pub fn begin(&self) -> Result<Txn, StoreError> {
        Ok(Txn {
            txn: self.db.begin_write()?,
        })
    }

    /// Reserves `count` sequence numbers for the aggregator's own envelopes; returns the first.
    /// Numbers are never handed out twice, across restarts included.
    ///
    /// # Errors
    /// Storage errors.
    pub fn reserve_seq(&self, count: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let start = {
            let mut t = txn.open_table(META)?;
            let start = t.get("seq_reserved")?.map_or(1, |v| v.value());
            t.insert("seq_reserved", start + count)?;
            start
        };
        txn.commit()?;
        Ok(start)
    }

    /// Every registered device, by id.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn devices(&self) -> Result<Vec<(String, DeviceRecord, Option<u64>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let seqs = txn.open_table(LAST_SEQ)?;
        let mut out = Vec::new();
        for row in devices.iter()? {
            let (k, v) = row?;
            let id = k.value().to_string();
            let last = seqs.get(id.as_str())?.map(|g| g.value());
            out.push((
                id.clone(),
                from_json(&format!("device {id}"), v.value())?,
                last,
            ));
        }
        Ok(out)
    }

    /// Every job, by id.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(from_json(&format!("job {}", k.value()), v.value())?);
        }
        Ok(out)
    }

    /// One job.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn job(&self, job: &str) -> Result<Option<JobRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        t.get(job)?
            .map(|v| from_json(&format!("job {job}"), v.value()))
            .transpose()
    }

    /// The rounds of a job, in order.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn rounds(&self, job: &str) -> Result<Vec<RoundRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ROUNDS)?;
        let mut out = Vec::new();
        for row in t.range((job, 0)..=(job, u64::MAX))? {
            let (k, v) = row?;
            out.push(from_json(&format!("round {:?}", k.value()), v.value())?);
        }
        Ok(out)
    }

    /// A model version's parameters.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn model(&self, job: &str, version: u64) -> Result<Option<Vec<f32>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MODELS)?;
        let m = t
            .get((job, version))?
            .map(|v| crate::codec::f32_from_le(v.value()));
        Ok(m)
    }

    /// The strategy's saved server state.
    ///
    /// # Errors
    /// Storage errors.
    pub fn strategy_state(&self, job: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(STRATEGY)?;
        Ok(t.get(job)?.map(|v| v.value().to_vec()))
    }

    /// The accepted updates counted in `round`, by device then trained round.
    ///
    /// # Errors
    /// Storage errors and corrupt records.
    pub fn round_updates(&self, job: &str, round: u64) -> Result<Vec<StoredUpdate>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(UPDATES)?;
        let mut out = Vec::new();
        for row in t.range((job, round, "", 0)..(job, round + 1, "", 0))? {
            let (k, v) = row?;
            let (_, _, device, for_round) = k.value();
            out.push(StoredUpdate::from_bytes(device, for_round, v.value())?);
        }
        Ok(out)
    }
}

/// A write transaction. Dropped without [`Txn::commit`], it leaves no trace.
pub struct Txn {
    txn: redb::WriteTransaction,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Txn")
    }
}

impl Txn {
    /// Makes every write durable (fsync) before returning.
    ///
    /// # Errors
    /// The commit failed: nothing of this transaction is stored.
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.txn.commit()?)
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let t = self.txn.open_table(DEVICES)?;
        t.get(id)?
            .map(|v| from_json(&format!("device {id}"), v.value()))
            .transpose()
    }

    /// Registered devices that are not revoked, by id.
    pub fn eligible_devices(&self) -> Result<Vec<String>, StoreError> {
        let t = self.txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let rec: DeviceRecord = from_json(&format!("device {}", k.value()), v.value())?;
            if !rec.revoked {
                out.push(k.value().to_string());
            }
        }
        Ok(out)
    }

    pub fn put_device(&self, id: &str, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(DEVICES)?
            .insert(id, to_json(rec)?.as_slice())?;
        Ok(())
    }

    pub fn last_seq(&self, device: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .txn
            .open_table(LAST_SEQ)?
            .get(device)?
            .map(|v| v.value()))
    }

    pub fn set_last_seq(&self, device: &str, seq: u64) -> Result<(), StoreError> {
        self.txn.open_table(LAST_SEQ)?.insert(device, seq)?;
        Ok(())
    }

    /// The reason the fresh update `seq` of `device` was refused, if it was its last one.
    pub fn last_refusal(&self, device: &str, seq: u64) -> Result<Option<Reason>, StoreError> {
        let t = self.txn.open_table(LAST_REFUSAL)?;
        let r = t.get(device)?.and_then(|v| {
            let (s, reason) = v.value();
            (s == seq)
                .then(|| Reason::ALL.get(usize::from(reason)).copied())
                .flatten()
        });
        Ok(r)
    }

    pub fn set_last_refusal(
        &self,
        device: &str,
        seq: u64,
        reason: Reason,
    ) -> Result<(), StoreError> {
        let index = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0) as u8;
        self.txn
            .open_table(LAST_REFUSAL)?
            .insert(device, (seq, index))?;
        Ok(())
    }

    /// The (job, counting round) of the update `device` sent with `seq`, if one was accepted.
    pub fn seen(&self, device: &str, seq: u64) -> Result<Option<(String, u64)>, StoreError> {
        let t = self.txn.open_table(SEEN)?;
        let r = t.get((device, seq))?.map(|v| {
            let (job, round) = v.value();
            (job.to_string(), round)
        });
        Ok(r)
    }

    /// The seq of the update counted for (`job`, trained `round`) from `device`, if any.
    pub fn contribution(
        &self,
        job: &str,
        round: u64,
        device: &str,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .txn
            .open_table(CONTRIB)?
            .get((job, round, device))?
            .map(|v| v.value()))
    }

    /// Records an accepted update counted in `counting_round`: the update itself, its
    /// contribution and its (device, seq) for deduplication.
    pub fn put_update(
        &self,
        job: &str,
        counting_round: u64,
        u: &StoredUpdate,
    ) -> Result<(), StoreError> {
        let key = (job, counting_round, u.device.as_str(), u.for_round);
        self.txn
            .open_table(UPDATES)?
            .insert(key, u.to_bytes().as_slice())?;
        self.txn
            .open_table(CONTRIB)?
            .insert((job, u.for_round, u.device.as_str()), u.seq)?;
        self.txn
            .open_table(SEEN)?
            .insert((u.device.as_str(), u.seq), (job, counting_round))?;
        Ok(())
    }

    /// Drops the update bodies of a closed round (contributions and dedup entries stay).
    pub fn delete_updates(&self, job: &str, round: u64) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(UPDATES)?;
        t.retain_in((job, round, "", 0)..(job, round + 1, "", 0), |_, _| false)?;
        Ok(())
    }

    pub fn job(&self, job: &str) -> Result<Option<JobRecord>, StoreError> {
        let t = self.txn.open_table(JOBS)?;
        t.get(job)?
            .map(|v| from_json(&format!("job {job}"), v.value()))
            .transpose()
    }

    pub fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(JOBS)?
            .insert(rec.spec.id.as_str(), to_json(rec)?.as_slice())?;
        Ok(())
    }

    pub fn round(&self, job: &str, round: u64) -> Result<Option<RoundRecord>, StoreError> {
        let t = self.txn.open_table(ROUNDS)?;
        t.get((job, round))?
            .map(|v| from_json(&format!("round {job}/{round}"), v.value()))
            .transpose()
    }

    pub fn put_round(&self, job: &str, rec: &RoundRecord) -> Result<(), StoreError> {
        self.txn
            .open_table(ROUNDS)?
            .insert((job, rec.round), to_json(rec)?.as_slice())?;
        Ok(())
    }

    pub fn put_model(&self, job: &str, version: u64, params: &[f32]) -> Result<(), StoreError> {
        self.txn
            .open_table(MODELS)?
            .insert((job, version), crate::codec::f32_to_le(params).as_slice())?;
        Ok(())
    }

    pub fn put_strategy_state(&self, job: &str, state: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(STRATEGY)?.insert(job, state)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("fedge-agg-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir.join("a.redb")).unwrap(), dir)
    }

    fn update(device: &str, seq: u64, for_round: u64) -> StoredUpdate {
        StoredUpdate {
            device: device.into(),
            for_round,
            seq,
            num_samples: 3,
            staleness_weight: 1.0,
            loss: 0.5,
            accuracy: 0.9,
            delta: vec![seq as f32; 4],
        }
    }

    #[test]
    fn uncommitted_writes_vanish_and_committed_ones_survive_reopen() {
        let (store, dir) = temp_store("reopen");
        let txn = store.begin().unwrap();
        txn.put_update("j", 1, &update("d1", 5, 1)).unwrap();
        txn.commit().unwrap();
        let txn = store.begin().unwrap();
        txn.put_update("j", 1, &update("d2", 6, 1)).unwrap();
        drop(txn);
        drop(store);
        let store = Store::open(&dir.join("a.redb")).unwrap();
        let ups = store.round_updates("j", 1).unwrap();
        assert_eq!(
            ups.iter().map(|u| u.device.as_str()).collect::<Vec<_>>(),
            ["d1"]
        );
        let txn = store.begin().unwrap();
        assert_eq!(txn.seen("d1", 5).unwrap(), Some(("j".into(), 1)));
        assert_eq!(txn.seen("d2", 6).unwrap(), None);
        assert_eq!(txn.contribution("j", 1, "d1").unwrap(), Some(5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn round_updates_are_scoped_and_deleted_per_round() {
        let (store, dir) = temp_store("scope");
        let txn = store.begin().unwrap();
        txn.put_update("j", 1, &update("b", 1, 1)).unwrap();
        txn.put_update("j", 1, &update("a", 2, 1)).unwrap();
        txn.put_update("j", 2, &update("a", 3, 1)).unwrap();
        txn.put_update("k", 1, &update("a", 4, 1)).unwrap();
        txn.commit().unwrap();
        let r1: Vec<_> = store
            .round_updates("j", 1)
            .unwrap()
            .into_iter()
            .map(|u| u.device)
            .collect();
        assert_eq!(r1, ["a", "b"], "ordered by device");
        let txn = store.begin().unwrap();
        txn.delete_updates("j", 1).unwrap();
        txn.commit().unwrap();
        assert!(store.round_updates("j", 1).unwrap().is_empty());
        assert_eq!(store.round_updates("j", 2).unwrap().len(), 1);
        assert_eq!(store.round_updates("k", 1).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sequence_reservations_never_overlap() {
        let (store, dir) = temp_store("seq");
        let a = store.reserve_seq(100).unwrap();
        let b = store.reserve_seq(100).unwrap();
        assert_eq!(b, a + 100);
        drop(store);
        let store = Store::open(&dir.join("a.redb")).unwrap();
        assert_eq!(store.reserve_seq(1).unwrap(), b + 100);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
