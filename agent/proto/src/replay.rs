//! Replay protection: every sender's sequence numbers strictly increase, and a receiver remembers
//! the last one it accepted from each sender.
//!
//! A sequence equal to the last one is a [`Freshness::Duplicate`] (a retained message delivered
//! again, a QoS 1 retransmission); below it, a [`Freshness::Replay`]. Receivers act on `Fresh`
//! only. Chunks are exempt: they are idempotent and checked against their object's sha256.

/// How a sequence number compares with the last one seen from its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Duplicate,
    Replay,
}

/// Classifies `seq` against the last accepted sequence of the same sender.
pub fn freshness(last: Option<u64>, seq: u64) -> Freshness {
    match last {
        None => Freshness::Fresh,
        Some(l) if seq > l => Freshness::Fresh,
        Some(l) if seq == l => Freshness::Duplicate,
        Some(_) => Freshness::Replay,
    }
}

/// The last accepted sequence per sender, in memory (persist it with the receiver's state).
#[cfg(feature = "std")]
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplayGuard {
    last: std::collections::HashMap<std::string::String, u64>,
}

#[cfg(feature = "std")]
impl ReplayGuard {
    /// Classifies `seq`; on `Fresh`, remembers it.
    pub fn check(&mut self, sender: &str, seq: u64) -> Freshness {
        let f = freshness(self.last.get(sender).copied(), seq);
        if f == Freshness::Fresh {
            self.last.insert(sender.into(), seq);
        }
        f
    }

    /// The last accepted sequence of `sender`.
    pub fn last(&self, sender: &str) -> Option<u64> {
        self.last.get(sender).copied()
    }

    /// Forgets `sender` and its sub-guards (`{sender}#…`): for a sender whose key was replaced
    /// (a new aggregator starts its sequence anew).
    pub fn forget(&mut self, sender: &str) {
        self.last.retain(|k, _| {
            k != sender
                && !k
                    .strip_prefix(sender)
                    .is_some_and(|rest| rest.starts_with('#'))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        assert_eq!(freshness(None, 0), Freshness::Fresh);
        assert_eq!(freshness(Some(5), 6), Freshness::Fresh);
        assert_eq!(freshness(Some(5), 5), Freshness::Duplicate);
        assert_eq!(freshness(Some(5), 4), Freshness::Replay);
    }

    #[cfg(feature = "std")]
    #[test]
    fn forgetting_a_sender_keeps_the_others() {
        let mut g = ReplayGuard::default();
        for s in ["agg", "agg#round/j", "aggx", "op#certificate"] {
            assert_eq!(g.check(s, 5), Freshness::Fresh);
        }
        g.forget("agg");
        assert_eq!(g.last("agg"), None);
        assert_eq!(g.last("agg#round/j"), None);
        assert_eq!(g.last("aggx"), Some(5));
        assert_eq!(g.last("op#certificate"), Some(5));
    }

    #[cfg(feature = "std")]
    #[test]
    fn guard() {
        let mut g = ReplayGuard::default();
        assert_eq!(g.check("a", 3), Freshness::Fresh);
        assert_eq!(g.check("a", 3), Freshness::Duplicate);
        assert_eq!(g.check("a", 2), Freshness::Replay);
        assert_eq!(g.check("b", 1), Freshness::Fresh);
        assert_eq!(g.last("a"), Some(3));
    }
}
