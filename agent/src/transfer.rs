//! Resumable chunked downloads of signed bundles.
//!
//! A transfer lives in `chunks/{sha256}/`: `transfer.json` (what is being fetched: the bundle's
//! name, version and [`ChunkManifest`], from the signed install command) and one file per received
//! chunk, `{index}`, written to a temporary name and renamed. Each chunk file ends with the sha256
//! of its data, so a chunk torn by a power cut is detected and fetched again. After a restart the
//! transfer is reopened and only the missing indices are requested.
//!
//! One transfer runs at a time: a new install command for another object replaces it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fedge_proto::ProtoError;
use fedge_proto::chunk::{ChunkManifest, sha256};
use fedge_proto::hex;
use serde::{Deserialize, Serialize};

use crate::fsx;

/// What a transfer fetches (persisted as `transfer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub total_len: u64,
    pub chunk_size: u32,
    pub chunk_count: u32,
}

impl Want {
    pub fn new(name: &str, version: u64, m: &ChunkManifest) -> Self {
        Self {
            name: name.into(),
            version,
            sha256: hex::encode32(&m.sha256).to_string(),
            total_len: m.total_len,
            chunk_size: m.chunk_size,
            chunk_count: m.chunk_count,
        }
    }

    /// The manifest back; `None` for a corrupt file.
    pub fn manifest(&self) -> Option<ChunkManifest> {
        Some(ChunkManifest {
            sha256: hex::decode::<32>(&self.sha256).ok()?,
            total_len: self.total_len,
            chunk_size: self.chunk_size,
            chunk_count: self.chunk_count,
        })
    }
}

/// One download in progress.
#[derive(Debug)]
pub struct Transfer {
    dir: PathBuf,
    want: Want,
    manifest: ChunkManifest,
    have: Vec<bool>,
    missing: u32,
}

impl Transfer {
    /// Starts (or, when its directory exists, resumes) fetching `want`. The manifest must already
    /// have been validated against the limits.
    ///
    /// # Errors
    /// I/O errors; `InvalidInput` for a manifest that does not decode.
    pub fn open(root: &Path, want: Want) -> io::Result<Self> {
        let manifest = want
            .manifest()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad manifest"))?;
        let dir = root.join(&want.sha256);
        let meta = dir.join("transfer.json");
        let fresh = fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<Want>(&b).ok())
            != Some(want.clone());
        if fresh {
            let _ = fs::remove_dir_all(&dir);
            fsx::create_dir(&dir, true)?;
            let json = serde_json::to_vec(&want).map_err(io::Error::other)?;
            fsx::write_atomic(&meta, &json, true)?;
        }
        fsx::remove_temps(&dir);
        let mut t = Self {
            have: vec![false; manifest.chunk_count as usize],
            missing: manifest.chunk_count,
            dir,
            want,
            manifest,
        };
        t.scan();
        Ok(t)
    }

    /// Reopens the transfer a previous run left in `root`, if any: the most recently started one;
    /// others are removed.
    pub fn resume(root: &Path) -> Option<Self> {
        let mut found: Vec<(std::time::SystemTime, PathBuf, Want)> = Vec::new();
        for e in fs::read_dir(root).ok()?.flatten() {
            let meta = e.path().join("transfer.json");
            let want = fs::read(&meta)
                .ok()
                .and_then(|b| serde_json::from_slice::<Want>(&b).ok());
            let when = fs::metadata(&meta).and_then(|m| m.modified()).ok();
            match (want, when) {
                (Some(w), Some(t)) if w.manifest().is_some() => found.push((t, e.path(), w)),
                _ => {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        found.sort_by_key(|a| a.0);
        let (_, _, want) = found.pop()?;
        for (_, dir, _) in found {
            let _ = fs::remove_dir_all(dir);
        }
        Self::open(root, want).ok()
    }

    fn scan(&mut self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let Some(i) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            match self.read_chunk(i) {
                Some(_) if !self.have[i as usize] => {
                    self.have[i as usize] = true;
                    self.missing -= 1;
                }
                _ => {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    fn read_chunk(&self, index: u32) -> Option<Vec<u8>> {
        let r = self.manifest.range(index).ok()?;
        let mut b = fs::read(self.dir.join(index.to_string())).ok()?;
        if b.len() as u64 != r.end - r.start + 32 {
            return None;
        }
        let sum = b.split_off(b.len() - 32);
        (sha256(&b)[..] == sum[..]).then_some(b)
    }

    pub fn want(&self) -> &Want {
        &self.want
    }

    pub fn manifest(&self) -> &ChunkManifest {
        &self.manifest
    }

    pub fn has(&self, index: u32) -> bool {
        self.have.get(index as usize).copied().unwrap_or(false)
    }

    /// Missing indices, ascending.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u32)
    }

    pub fn missing_count(&self) -> u32 {
        self.missing
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Stores chunk `index`; returns whether it was new. The caller has verified the chunk's
    /// envelope; this checks that it fits the manifest.
    ///
    /// # Errors
    /// [`ProtoError::BadChunk`] for an index or length that does not fit; I/O errors.
    pub fn store(&mut self, index: u32, data: &[u8]) -> Result<bool, StoreError> {
        let r = self.manifest.range(index)?;
        if data.len() as u64 != r.end - r.start {
            return Err(ProtoError::BadChunk { index }.into());
        }
        if self.have[index as usize] {
            return Ok(false);
        }
        let mut b = Vec::with_capacity(data.len() + 32);
        b.extend_from_slice(data);
        b.extend_from_slice(&sha256(data));
        fsx::write_atomic(&self.dir.join(index.to_string()), &b, false)?;
        self.have[index as usize] = true;
        self.missing -= 1;
        Ok(true)
    }

    /// Reads the whole object back and checks it against the manifest's sha256. A chunk that no
    /// longer reads back is marked missing again.
    ///
    /// # Errors
    /// [`ProtoError::Incomplete`] or [`ProtoError::HashMismatch`].
    pub fn assemble(&mut self) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::with_capacity(self.manifest.total_len as usize);
        for i in 0..self.manifest.chunk_count {
            match self.read_chunk(i) {
                Some(c) => out.extend_from_slice(&c),
                None => {
                    if std::mem::replace(&mut self.have[i as usize], false) {
                        self.missing += 1;
                    }
                }
            }
        }
        if self.missing > 0 {
            return Err(ProtoError::Incomplete {
                missing: self.missing,
            });
        }
        if sha256(&out) != self.manifest.sha256 {
            return Err(ProtoError::HashMismatch);
        }
        Ok(out)
    }

    /// Deletes the transfer's directory.
    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Why a chunk was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("chunk store: {0}")]
    Io(#[from] io::Error),
}

/// The indices to subscribe to next: the lowest missing ones not already subscribed, up to a
/// window of `window` subscriptions in total.
pub fn next_window(t: &Transfer, subscribed: &BTreeSet<u32>, window: u32) -> Vec<u32> {
    let room = (window as usize).saturating_sub(subscribed.len());
    t.missing()
        .filter(|i| !subscribed.contains(i))
        .take(room)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;

    fn object() -> (Vec<u8>, ChunkManifest) {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = ChunkManifest::of(&data, 1024).expect("manifest");
        (data, m)
    }

    #[test]
    fn resumes_missing_chunks_after_reopen() {
        let d = TestDir::new("transfer");
        let (data, m) = object();
        let chunks: Vec<_> = m.split(&data).collect();
        let mut t = Transfer::open(d.path(), Want::new("m", 1, &m)).expect("open");
        assert_eq!(t.missing_count(), 10);
        for c in chunks.iter().step_by(2) {
            assert!(t.store(c.index, c.data).expect("store"));
        }
        assert!(!t.store(0, chunks[0].data).expect("dup"));
        assert!(t.store(1, &chunks[1].data[1..]).is_err(), "wrong length");
        assert!(t.store(10, chunks[1].data).is_err(), "index past the end");
        drop(t);
        // A torn chunk file is refetched.
        let p = d.path().join(hex::encode32(&m.sha256).as_str()).join("2");
        fs::write(&p, b"torn").expect("tear");
        let mut t = Transfer::resume(d.path()).expect("resume");
        assert_eq!(t.missing().collect::<Vec<_>>(), [1, 2, 3, 5, 7, 9]);
        let sub: BTreeSet<u32> = [1].into();
        assert_eq!(next_window(&t, &sub, 3), [2, 3]);
        assert!(matches!(
            t.assemble(),
            Err(ProtoError::Incomplete { missing: 6 })
        ));
        for c in &chunks {
            t.store(c.index, c.data).expect("store");
        }
        assert_eq!(t.assemble().expect("assemble"), data);
        t.remove();
        assert!(Transfer::resume(d.path()).is_none());
    }

    #[test]
    fn a_new_object_replaces_the_old_transfer() {
        let d = TestDir::new("transfer-new");
        let (data, m) = object();
        let mut t = Transfer::open(d.path(), Want::new("m", 1, &m)).expect("open");
        let c = m.split(&data).next().expect("chunk");
        t.store(c.index, c.data).expect("store");
        let other = ChunkManifest::of(&data[..5000], 1024).expect("manifest");
        t.remove();
        let t2 = Transfer::open(d.path(), Want::new("m", 2, &other)).expect("open");
        assert_eq!(t2.missing_count(), 5);
        drop(t2);
        let t = Transfer::resume(d.path()).expect("resume");
        assert_eq!(t.want().version, 2);
        assert_eq!(fs::read_dir(d.path()).expect("dir").count(), 1);
    }
}
