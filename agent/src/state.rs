//! State that must survive restarts besides the outbox, transfers and models: the last sequence
//! accepted from each trusted sender (replay protection) and the telemetry interval set by
//! command. One JSON file, replaced atomically and fsynced on every change.

use std::io;
use std::path::{Path, PathBuf};

use fedge_proto::replay::ReplayGuard;
use serde::{Deserialize, Serialize};

use crate::fsx;

/// The persisted values.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct State {
    pub replay: ReplayGuard,
    pub telemetry_interval_s: Option<u32>,
    /// The aggregator key the operator certified last, trusted until it expires (over a
    /// key the configuration pins).
    #[serde(default)]
    pub aggregator: Option<CertifiedAggregator>,
}

/// An aggregator key from the operator's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifiedAggregator {
    pub id: String,
    /// Hex of the Ed25519 key.
    pub public_key: String,
    pub not_after_unix_s: u64,
}

/// [`State`] and the file it lives in.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    pub state: State,
}

impl StateFile {
    /// Loads the state (a fresh one if the file does not exist).
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for a file that does not parse: replay protection must not
    /// silently start over.
    pub fn open(path: &Path) -> io::Result<Self> {
        let state = match fsx::read_limited(path, 16 << 20) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.to_path_buf(),
            state,
        })
    }

    /// Writes the state durably.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self) -> io::Result<()> {
        let json = serde_json::to_vec(&self.state).map_err(io::Error::other)?;
        fsx::write_atomic(&self.path, &json, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;
    use fedge_proto::replay::Freshness;

    #[test]
    fn replay_guard_persists() {
        let d = TestDir::new("state");
        let p = d.path().join("state.json");
        let mut s = StateFile::open(&p).expect("open");
        assert_eq!(s.state.replay.check("op", 5), Freshness::Fresh);
        s.state.telemetry_interval_s = Some(7);
        s.save().expect("save");
        let mut s = StateFile::open(&p).expect("reopen");
        assert_eq!(s.state.replay.check("op", 5), Freshness::Duplicate);
        assert_eq!(s.state.replay.check("op", 4), Freshness::Replay);
        assert_eq!(s.state.telemetry_interval_s, Some(7));
        std::fs::write(&p, b"{").expect("write");
        assert!(StateFile::open(&p).is_err());
    }
}
