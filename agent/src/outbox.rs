//! The store-and-forward outbox: every message the device sends (except its retained status) is
//! first written here, one file per message, and removed only once the broker has acknowledged it
//! (PUBACK, QoS 1). It survives restarts, `kill -9` and, for the [`Class::Reliable`] class with
//! `fsync` on, power cuts. Delivery is at least once; receivers drop repeats by (sender, seq).
//!
//! The outbox is bounded in bytes. When a message does not fit:
//! - [`Class::Telemetry`] (periodic telemetry without events): the oldest telemetry messages are
//!   dropped until it fits (newer measurements supersede older ones);
//! - [`Class::Reliable`] (acks, updates, telemetry carrying events): telemetry is dropped first
//!   to make room; if it still does not fit, the new message is refused
//!   ([`OutboxError::Full`]) and nothing queued is lost. The caller counts and reports it.
//!
//! File format: `FOB1`, class byte, topic length (u16 LE), topic, payload, then the sha256 of all
//! of it. A file that does not check (a torn write after a power cut) is deleted on open.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsx;

const MAGIC: &[u8; 4] = b"FOB1";
const HEADER: usize = 4 + 1 + 2;
const TRAILER: usize = 32;

/// The drop policy of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Dropped oldest-first when the outbox is full.
    Telemetry,
    /// Never dropped; refused when full even after dropping all telemetry.
    Reliable,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    #[error("outbox full: {need} bytes needed, {free} free after dropping telemetry")]
    Full { need: u64, free: u64 },
    #[error("message of {size} bytes is larger than the whole outbox ({max})")]
    TooLarge { size: u64, max: u64 },
    #[error("outbox I/O: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    class: Class,
    size: u64,
}

/// The disk-backed queue; see the module docs.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    fsync: bool,
    entries: BTreeMap<u64, Meta>,
    bytes: u64,
    next_id: u64,
    dropped: u64,
    refused: u64,
    corrupt: u64,
}

/// A queued message, read back for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Outbox {
    /// Opens the outbox in `dir` (created if absent), loading what a previous run left.
    ///
    /// # Errors
    /// I/O errors on the directory itself; unreadable entries are deleted and counted.
    pub fn open(dir: &Path, max_bytes: u64, fsync: bool) -> io::Result<Self> {
        fsx::create_dir(dir, true)?;
        fsx::remove_temps(dir);
        let mut ob = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            fsync,
            entries: BTreeMap::new(),
            bytes: 0,
            next_id: 0,
            dropped: 0,
            refused: 0,
            corrupt: 0,
        };
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(parse_id) else {
                continue;
            };
            match fs::read(e.path())
                .ok()
                .and_then(|b| decode(&b).map(|(c, _, _)| (c, b.len())))
            {
                Some((class, size)) => {
                    ob.entries.insert(
                        id,
                        Meta {
                            class,
                            size: size as u64,
                        },
                    );
                    ob.bytes += size as u64;
                    ob.next_id = ob.next_id.max(id + 1);
                }
                None => {
                    let _ = fs::remove_file(e.path());
                    ob.corrupt += 1;
                }
            }
        }
        Ok(ob)
    }

    /// Queues a message; returns its id (ids increase in queue order).
    ///
    /// # Errors
    /// [`OutboxError::Full`] or [`OutboxError::TooLarge`] per the drop policy; I/O errors.
    pub fn push(&mut self, class: Class, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        let bytes = encode(class, topic, payload);
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            self.refused += 1;
            return Err(OutboxError::TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        while self.bytes + size > self.max_bytes {
            let Some(oldest) = self.oldest_telemetry() else {
                self.refused += 1;
                return Err(OutboxError::Full {
                    need: size,
                    free: self.max_bytes - self.bytes,
                });
            };
            self.remove(oldest);
            self.dropped += 1;
        }
        let id = self.next_id;
        let durable = self.fsync && class == Class::Reliable;
        fsx::write_atomic(&self.path(id), &bytes, durable)?;
        self.next_id += 1;
        self.entries.insert(id, Meta { class, size });
        self.bytes += size;
        Ok(id)
    }

    fn oldest_telemetry(&self) -> Option<u64> {
        self.entries
            .iter()
            .find(|(_, m)| m.class == Class::Telemetry)
            .map(|(id, _)| *id)
    }

    /// Reads a queued message back (`None` if it was removed or is unreadable).
    pub fn get(&self, id: u64) -> Option<Queued> {
        self.entries.get(&id)?;
        let bytes = fs::read(self.path(id)).ok()?;
        let (_, topic, payload) = decode(&bytes)?;
        Some(Queued {
            id,
            topic: topic.to_string(),
            payload: payload.to_vec(),
        })
    }

    /// Removes a delivered (or dropped) message; unknown ids are ignored.
    pub fn remove(&mut self, id: u64) {
        if let Some(m) = self.entries.remove(&id) {
            self.bytes -= m.size;
            let _ = fs::remove_file(self.path(id));
        }
    }

    /// Ids in queue order, starting after `after`.
    pub fn ids_after(&self, after: Option<u64>) -> impl Iterator<Item = u64> + '_ {
        let start = after.map_or(0, |a| a + 1);
        self.entries.range(start..).map(|(id, _)| *id)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes on disk (the telemetry's `outbox_bytes`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Telemetry messages dropped to make room, since open.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Messages refused because they did not fit, since open.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Torn or unreadable entries deleted at open.
    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}"))
    }
}

fn parse_id(name: &str) -> Option<u64> {
    (name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit())).then(|| name.parse().ok())?
}

fn encode(class: Class, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + topic.len() + payload.len() + TRAILER);
    b.extend_from_slice(MAGIC);
    b.push(match class {
        Class::Telemetry => 0,
        Class::Reliable => 1,
    });
    b.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(payload);
    let sum = fedge_proto::chunk::sha256(&b);
    b.extend_from_slice(&sum);
    b
}

fn decode(b: &[u8]) -> Option<(Class, &str, &[u8])> {
    if b.len() < HEADER + TRAILER || &b[..4] != MAGIC {
        return None;
    }
    let (body, sum) = b.split_at(b.len() - TRAILER);
    if fedge_proto::chunk::sha256(body) != sum {
        return None;
    }
    let class = match body[4] {
        0 => Class::Telemetry,
        1 => Class::Reliable,
        _ => return None,
    };
    let tlen = usize::from(u16::from_le_bytes([body[5], body[6]]));
    let topic = std::str::from_utf8(body.get(HEADER..HEADER + tlen)?).ok()?;
    Some((class, topic, &body[HEADER + tlen..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;

    fn size(topic: &str, payload: usize) -> u64 {
        (HEADER + topic.len() + payload + TRAILER) as u64
    }

    #[test]
    fn survives_reopen_in_order() {
        let d = TestDir::new("outbox");
        let mut ob = Outbox::open(d.path(), 10_000, true).expect("open");
        let a = ob.push(Class::Reliable, "t/a", b"one").expect("push");
        let b = ob.push(Class::Telemetry, "t/b", b"two").expect("push");
        ob.remove(a);
        drop(ob);
        let mut ob = Outbox::open(d.path(), 10_000, true).expect("reopen");
        assert_eq!(ob.ids_after(None).collect::<Vec<_>>(), [b]);
        let q = ob.get(b).expect("get");
        assert_eq!(
            (q.topic.as_str(), q.payload.as_slice()),
            ("t/b", &b"two"[..])
        );
        assert!(
            ob.push(Class::Reliable, "t", b"x").expect("push") > b,
            "ids keep increasing"
        );
        assert_eq!(ob.bytes(), size("t/b", 3) + size("t", 1));
    }

    #[test]
    fn telemetry_drops_oldest_reliable_is_refused() {
        let d = TestDir::new("outbox-full");
        let one = size("t", 100);
        let mut ob = Outbox::open(d.path(), one * 3, false).expect("open");
        let t1 = ob.push(Class::Telemetry, "t", &[1; 100]).expect("t1");
        let r1 = ob.push(Class::Reliable, "t", &[2; 100]).expect("r1");
        let t2 = ob.push(Class::Telemetry, "t", &[3; 100]).expect("t2");
        // Full: new telemetry drops the oldest telemetry.
        let t3 = ob.push(Class::Telemetry, "t", &[4; 100]).expect("t3");
        assert_eq!(ob.ids_after(None).collect::<Vec<_>>(), [r1, t2, t3]);
        assert_eq!(ob.dropped(), 1);
        assert!(!ob.contains(t1));
        // Reliable makes room by dropping telemetry, never other reliable messages.
        let r2 = ob.push(Class::Reliable, "t", &[5; 100]).expect("r2");
        let r3 = ob.push(Class::Reliable, "t", &[6; 100]).expect("r3");
        assert_eq!(ob.ids_after(None).collect::<Vec<_>>(), [r1, r2, r3]);
        assert!(matches!(
            ob.push(Class::Reliable, "t", &[7; 100]),
            Err(OutboxError::Full { .. })
        ));
        assert!(matches!(
            ob.push(Class::Telemetry, "t", &[8; 100]),
            Err(OutboxError::Full { .. })
        ));
        assert!(matches!(
            ob.push(Class::Reliable, "t", &[0; 1000]),
            Err(OutboxError::TooLarge { .. })
        ));
        assert_eq!((ob.refused(), ob.dropped()), (3, 3));
        assert_eq!(ob.ids_after(Some(r1)).collect::<Vec<_>>(), [r2, r3]);
    }

    #[test]
    fn torn_entries_are_deleted_on_open() {
        let d = TestDir::new("outbox-torn");
        let mut ob = Outbox::open(d.path(), 10_000, false).expect("open");
        let a = ob.push(Class::Reliable, "t", b"good").expect("push");
        let b = ob.push(Class::Reliable, "t", b"torn").expect("push");
        drop(ob);
        let p = d.path().join(format!("{b:020}"));
        let bytes = fs::read(&p).expect("read");
        fs::write(&p, &bytes[..bytes.len() - 5]).expect("truncate");
        let ob = Outbox::open(d.path(), 10_000, false).expect("reopen");
        assert_eq!(ob.ids_after(None).collect::<Vec<_>>(), [a]);
        assert_eq!(ob.corrupt(), 1);
        assert!(!p.exists());
    }
}
