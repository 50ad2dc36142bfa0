//! The device's envelope sequence numbers: strictly increasing for the life of the key, across
//! restarts and crashes.
//!
//! A high-water mark is persisted before any number below it is handed out: numbers are reserved
//! in blocks of [`BLOCK`], so a crash skips at most a block and never reuses a number.
//!
//! The MQTT last will (a signed `Status { online: false }`) is sealed before connecting but
//! published by the broker when the connection dies, after every message of that connection. So
//! each connection attempt reserves a span: its messages take numbers below the span's end and the
//! will takes the end itself ([`Sequencer::begin_session`]); the next attempt starts above it.
//! Numbers therefore increase strictly but are not dense.

use std::io;
use std::path::{Path, PathBuf};

use crate::fsx;

/// Numbers reserved per write of the high-water mark.
pub const BLOCK: u64 = 1000;

/// Numbers a connection may use below its last will.
pub const SESSION_SPAN: u64 = 1 << 32;

/// Hands out sequence numbers; see the module docs.
#[derive(Debug)]
pub struct Sequencer {
    path: PathBuf,
    next: u64,
    /// Persisted: every number below it may have been used.
    reserved: u64,
    /// The last will's number of the current connection attempt.
    will: Option<u64>,
}

impl Sequencer {
    /// Opens (or creates) the high-water-mark file; numbers continue above it.
    ///
    /// # Errors
    /// I/O errors, or `InvalidData` for a file that is not a decimal number.
    pub fn open(path: &Path) -> io::Result<Self> {
        let reserved = match std::fs::read_to_string(path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.to_path_buf(),
            next: reserved,
            reserved,
            will: None,
        })
    }

    /// The next number.
    ///
    /// # Errors
    /// When the high-water mark cannot be persisted (the number is then not handed out).
    pub fn next_seq(&mut self) -> io::Result<u64> {
        if self.will == Some(self.next) {
            self.next += 1;
        }
        if self.next >= self.reserved {
            self.persist(self.next + BLOCK)?;
        }
        let n = self.next;
        self.next += 1;
        Ok(n)
    }

    /// Starts the numbers of a new connection attempt and returns the number of its last will:
    /// numbers continue above the previous attempt's will, and everything handed out until the
    /// next call stays below the new one (unless a connection uses more than [`SESSION_SPAN`]
    /// numbers; they then continue above it, and that will arrives stale).
    ///
    /// # Errors
    /// When the high-water mark cannot be persisted.
    pub fn begin_session(&mut self) -> io::Result<u64> {
        if let Some(w) = self.will {
            self.next = self.next.max(w + 1);
        }
        let will = self.next.saturating_add(SESSION_SPAN);
        self.persist(will + 1)?;
        self.will = Some(will);
        Ok(will)
    }

    fn persist(&mut self, reserved: u64) -> io::Result<()> {
        fsx::write_atomic(&self.path, format!("{reserved}\n").as_bytes(), true)?;
        self.reserved = reserved;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsx::testdir::TestDir;

    #[test]
    fn increases_across_restarts_and_sessions() {
        let d = TestDir::new("seq");
        let p = d.path().join("seq");
        let mut s = Sequencer::open(&p).expect("open");
        let a = s.next_seq().expect("next");
        let b = s.next_seq().expect("next");
        assert!(b > a);
        drop(s);
        // A crash after handing out `b`: the reopened sequencer continues above it.
        let mut s = Sequencer::open(&p).expect("reopen");
        let c = s.next_seq().expect("next");
        assert!(c > b);
        let will = s.begin_session().expect("session");
        let d1 = s.next_seq().expect("next");
        assert!(c < d1 && d1 < will);
        let will2 = s.begin_session().expect("session");
        let e = s.next_seq().expect("next");
        assert!(e > will && e < will2);
        drop(s);
        let mut s = Sequencer::open(&p).expect("reopen");
        assert!(s.next_seq().expect("next") > e);
        std::fs::write(&p, "junk").expect("write");
        assert!(Sequencer::open(&p).is_err());
    }
}
