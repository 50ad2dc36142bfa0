//! Pairs the publishes the device hands to rumqttc with the PUBACKs the broker returns.
//!
//! rumqttc assigns packet ids itself and reports them only as events: `Outgoing::Publish(pkid)`
//! when a QoS 1 publish is written, in the order requests were queued; `Outgoing::AwaitAck(pkid)`
//! when a publish waits for its packet id to be freed (a broker acking out of order), after which
//! the waiting publish is written with that id once the previous holder is acknowledged; and
//! `Incoming::PubAck(pkid)`. [`Inflight`] replays that bookkeeping so each PUBACK names the message
//! it acknowledges. It is reset whenever the connection drops: the link discards every request of
//! the old connection, and unacknowledged outbox messages are sent again.

use std::collections::{HashMap, VecDeque};

/// What a QoS 1 publish was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// An outbox message, by id.
    Outbox(u64),
    /// The retained status (not queued on disk).
    Status,
}

/// Publishes in flight on the current connection.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued with rumqttc, packet id not known yet.
    queued: VecDeque<Tag>,
    /// Written, waiting for the PUBACK.
    by_pkid: HashMap<u16, Tag>,
    /// A publish waiting for its packet id (rumqttc holds at most one).
    collided: Option<(u16, Tag)>,
}

impl Inflight {
    /// A publish was handed to rumqttc.
    pub fn queued(&mut self, tag: Tag) {
        self.queued.push_back(tag);
    }

    /// rumqttc refused the most recent publish (its queue was full or the link is down).
    pub fn refused(&mut self, tag: Tag) {
        if let Some(i) = self.queued.iter().rposition(|t| *t == tag) {
            self.queued.remove(i);
        }
    }

    /// `Outgoing::Publish(pkid)` with `pkid != 0`.
    pub fn written(&mut self, pkid: u16) {
        let tag = match self.collided {
            Some((p, tag)) if p == pkid && !self.by_pkid.contains_key(&pkid) => {
                self.collided = None;
                Some(tag)
            }
            _ => self.queued.pop_front(),
        };
        if let Some(tag) = tag {
            self.by_pkid.insert(pkid, tag);
        }
    }

    /// `Outgoing::AwaitAck(pkid)`: the next queued publish waits for `pkid`.
    pub fn collided(&mut self, pkid: u16) {
        if let Some(tag) = self.queued.pop_front() {
            self.collided = Some((pkid, tag));
        }
    }

    /// `Incoming::PubAck(pkid)`: what it acknowledges.
    pub fn acked(&mut self, pkid: u16) -> Option<Tag> {
        self.by_pkid.remove(&pkid)
    }

    /// Outbox messages handed over and not acknowledged yet.
    pub fn outbox_count(&self) -> usize {
        self.tags().filter(|t| matches!(t, Tag::Outbox(_))).count()
    }

    /// Whether `tag` is in flight.
    pub fn contains(&self, tag: Tag) -> bool {
        self.tags().any(|t| t == tag)
    }

    fn tags(&self) -> impl Iterator<Item = Tag> + '_ {
        self.queued
            .iter()
            .chain(self.by_pkid.values())
            .chain(self.collided.iter().map(|(_, t)| t))
            .copied()
    }

    /// The connection dropped: nothing is in flight any more.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_in_order() {
        let mut f = Inflight::default();
        f.queued(Tag::Status);
        f.queued(Tag::Outbox(7));
        f.queued(Tag::Outbox(8));
        f.refused(Tag::Outbox(8));
        f.written(1);
        f.written(2);
        assert_eq!(f.outbox_count(), 1);
        assert_eq!(f.acked(2), Some(Tag::Outbox(7)));
        assert_eq!(f.acked(1), Some(Tag::Status));
        assert_eq!(f.acked(1), None);
        assert_eq!(f.outbox_count(), 0);
    }

    #[test]
    fn out_of_order_acks_and_collisions() {
        let mut f = Inflight::default();
        for id in 0..3 {
            f.queued(Tag::Outbox(id));
        }
        f.written(1);
        f.written(2);
        // The broker has not acked 1 yet and rumqttc's next id is 1 again: the publish waits.
        f.collided(1);
        assert!(f.contains(Tag::Outbox(2)));
        assert_eq!(f.acked(2), Some(Tag::Outbox(1)));
        f.queued(Tag::Outbox(3));
        assert_eq!(f.acked(1), Some(Tag::Outbox(0)));
        // rumqttc now writes the waiting publish with id 1, then the next queued one.
        f.written(1);
        f.written(2);
        assert_eq!(f.acked(1), Some(Tag::Outbox(2)));
        assert_eq!(f.acked(2), Some(Tag::Outbox(3)));
        f.queued(Tag::Status);
        f.reset();
        assert_eq!(f.outbox_count(), 0);
        assert!(!f.contains(Tag::Status));
    }
}
