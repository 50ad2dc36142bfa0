//! Counters, recent events and inference latencies, and the [`Telemetry`] message built from them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use fedge_proto::msg::{Event, Latency, MAX_EVENTS, ModelRef, Reason, Telemetry};

/// Longest event detail sent (bytes); longer ones are cut at a character boundary.
pub const MAX_DETAIL: usize = 160;

/// Latency samples kept per telemetry interval (beyond it, samples are thinned by replacement).
const MAX_SAMPLES: usize = 4096;

/// Monotonic counters, readable from any thread (tests, a metrics endpoint).
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received on chunk topics.
    pub chunks_received: AtomicU64,
    /// Chunks verified and written (each index of a transfer at most once).
    pub chunks_stored: AtomicU64,
    /// Verified chunks that were already stored.
    pub chunks_duplicate: AtomicU64,
    /// Chunks on the topic of an object no transfer wants (stale retained messages).
    pub chunks_ignored: AtomicU64,
    pub installs: AtomicU64,
    pub install_failures: AtomicU64,
    pub rollbacks: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Chunk topics subscribed to (each a request for one missing chunk).
    pub chunk_requests: AtomicU64,
    /// Outbox messages queued, and acknowledged by the broker.
    pub outbox_queued: AtomicU64,
    pub outbox_acked: AtomicU64,
    pub inferences: AtomicU64,
    pub infer_errors: AtomicU64,
    /// Round announcements that selected this device (each counted once per round).
    pub rounds_joined: AtomicU64,
    /// Training runs finished, and their updates queued.
    pub rounds_trained: AtomicU64,
    /// Updates the aggregator acknowledged as accepted (or as a duplicate of an accepted one).
    pub updates_accepted: AtomicU64,
    /// Updates the aggregator refused.
    pub updates_refused: AtomicU64,
    /// Sealed updates sealed again to a new key after an aggregator restart.
    pub updates_resealed: AtomicU64,
    /// Secure aggregation rounds this device finished (revealed its shares), and sessions it
    /// joined again after the aggregator restarted one.
    pub secagg_completed: AtomicU64,
    pub secagg_rejoined: AtomicU64,
    /// Bytes of update envelopes queued, and of global-model chunks stored.
    pub update_bytes: AtomicU64,
    pub model_bytes: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
}

impl Stats {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Refusals counted for `reason` since start.
    pub fn rejected(&self, reason: Reason) -> u64 {
        Self::get(&self.rejected[index(reason)])
    }

    pub(crate) fn reject(&self, reason: Reason) {
        Self::bump(&self.rejected[index(reason)]);
    }
}

fn index(reason: Reason) -> usize {
    Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0)
}

/// An event waiting for the next telemetry message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEvent {
    pub reason: Reason,
    pub detail: String,
    pub at_ms: u64,
}

/// What the next telemetry message reports besides the counters.
#[derive(Debug, Default)]
pub struct Recorder {
    events: VecDeque<OwnedEvent>,
    latencies_us: Vec<u32>,
    /// Successful inferences this interval.
    interval: u64,
    inferences: u64,
    infer_errors: u64,
}

impl Recorder {
    /// Keeps the latest [`MAX_EVENTS`] events.
    pub fn event(&mut self, reason: Reason, detail: &str, at_ms: u64) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(OwnedEvent {
            reason,
            detail: truncate(detail).into(),
            at_ms,
        });
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// One inference's outcome.
    pub fn inference(&mut self, latency_us: u32, ok: bool) {
        if !ok {
            self.infer_errors += 1;
            return;
        }
        self.inferences += 1;
        self.interval += 1;
        if self.latencies_us.len() < MAX_SAMPLES {
            self.latencies_us.push(latency_us);
        } else {
            // Deterministic thinning: replace a slot chosen by the running count.
            let slot =
                (self.interval.wrapping_mul(0x9e37_79b9_7f4a_7c15) % MAX_SAMPLES as u64) as usize;
            self.latencies_us[slot] = latency_us;
        }
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_DETAIL {
        return s;
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Percentiles of a set of samples (nearest rank).
pub fn latency(samples: &mut [u32], count: u64) -> Latency {
    if samples.is_empty() {
        return Latency {
            count,
            ..Latency::default()
        };
    }
    samples.sort_unstable();
    let at = |p: usize| samples[(samples.len() - 1) * p / 100];
    Latency {
        count,
        p50_us: at(50),
        p90_us: at(90),
        p99_us: at(99),
        max_us: at(100),
    }
}

/// Resident set size of this process: `/proc/self/statm` resident pages times the page size.
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * page_size()
}

/// The page size from the auxiliary vector (`AT_PAGESZ`), 4096 if unreadable.
fn page_size() -> u64 {
    const AT_PAGESZ: u64 = 6;
    let Ok(aux) = std::fs::read("/proc/self/auxv") else {
        return 4096;
    };
    aux.chunks_exact(16)
        .map(|c| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            (word(&c[..8]), word(&c[8..]))
        })
        .find(|(k, _)| *k == AT_PAGESZ)
        .map_or(4096, |(_, v)| v)
}

/// Everything the device reports, gathered by the agent.
#[derive(Debug)]
pub struct Snapshot<'a> {
    pub uptime_s: u64,
    pub model: Option<ModelRef<'a>>,
    pub rss_bytes: u64,
    pub outbox_bytes: u64,
}

impl Recorder {
    /// Builds a telemetry message from the snapshot, the counters and what was recorded since the
    /// last one; events and latencies start over.
    pub fn telemetry<'a>(&'a mut self, snap: Snapshot<'a>, stats: &Stats) -> Telemetry<'a> {
        let latency = latency(&mut self.latencies_us, std::mem::take(&mut self.interval));
        self.latencies_us.clear();
        let mut t = Telemetry {
            uptime_s: snap.uptime_s,
            model: snap.model,
            inferences: self.inferences,
            infer_errors: self.infer_errors,
            latency,
            rss_bytes: snap.rss_bytes,
            outbox_bytes: snap.outbox_bytes,
            rejected: Default::default(),
            events: Default::default(),
        };
        for r in Reason::ALL {
            let n = stats.rejected(r);
            if n > 0 {
                let _ = t.rejected.push((r, n));
            }
        }
        for e in &self.events {
            let _ = t.events.push(Event {
                reason: e.reason,
                detail: &e.detail,
                at_ms: e.at_ms,
            });
        }
        t
    }

    /// Clears the events once the telemetry carrying them is queued.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_events() {
        let mut r = Recorder::default();
        for us in 1..=100 {
            r.inference(us, true);
        }
        r.inference(0, false);
        for i in 0..10 {
            r.event(Reason::Replay, &format!("e{i}"), i);
        }
        r.event(Reason::Oversize, &"é".repeat(200), 10);
        let stats = Stats::default();
        stats.reject(Reason::Replay);
        let snap = Snapshot {
            uptime_s: 1,
            model: None,
            rss_bytes: 0,
            outbox_bytes: 0,
        };
        let t = r.telemetry(snap, &stats);
        assert_eq!(
            (
                t.latency.count,
                t.latency.p50_us,
                t.latency.p99_us,
                t.latency.max_us
            ),
            (100, 50, 99, 100)
        );
        assert_eq!((t.inferences, t.infer_errors), (100, 1));
        assert_eq!(t.events.len(), MAX_EVENTS);
        assert_eq!(t.events[0].detail, "e3");
        assert!(t.events[7].detail.len() <= MAX_DETAIL);
        assert_eq!(t.rejected.as_slice(), [(Reason::Replay, 1)]);
        assert!(rss_bytes() > 0);
        assert!(page_size() >= 4096);
    }
}
