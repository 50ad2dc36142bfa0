//! Checks every inbound envelope before anything acts on it, in the order of `docs/protocol.md`:
//! length bound, version and shape, the sender's pinned key (operator for commands, bundles and
//! their chunks; aggregator for acks, round announcements and global-model chunks), the
//! signature, the kind against the topic. Freshness (replay) is checked by the caller, which owns the persisted guard.

use fedge_proto::msg::Reason;
use fedge_proto::topic::Topic;
use fedge_proto::{Envelope, Kind, PublicKey};

/// Why an inbound message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The keys the device trusts.
#[derive(Debug, Clone)]
pub struct Trust {
    pub operator: PublicKey,
    pub operator_id: Option<String>,
    pub aggregator: Option<PublicKey>,
    pub aggregator_id: Option<String>,
}

impl Trust {
    /// Opens and verifies `wire` received on `topic` (`None` for objects reassembled from
    /// chunks), bounded by `max_len`.
    ///
    /// # Errors
    /// A [`Rejection`] with the reason of the first check that fails.
    pub fn open<'a>(
        &self,
        wire: &'a [u8],
        max_len: usize,
        topic: Option<&Topic<'_>>,
    ) -> Result<Envelope<'a>, Rejection> {
        let u = Envelope::open(wire, max_len)
            .map_err(|e| Rejection::new(Reason::of(e), e.to_string()))?;
        let (key, id) = match u.kind() {
            // Chunks of FL models come from the aggregator, chunks of bundles from the operator.
            Kind::Chunk if matches!(topic, Some(Topic::JobModelChunk { .. })) => {
                (self.aggregator.as_ref(), &self.aggregator_id)
            }
            Kind::Command | Kind::Bundle | Kind::Chunk | Kind::Certificate => {
                (Some(&self.operator), &self.operator_id)
            }
            Kind::Ack | Kind::RoundAnnounce | Kind::SecAgg => {
                (self.aggregator.as_ref(), &self.aggregator_id)
            }
            Kind::Status | Kind::Telemetry | Kind::Update => (None, &None),
        };
        let sender = u.sender();
        let known = id.as_deref().is_none_or(|id| id == sender);
        let Some(key) = key.filter(|_| known) else {
            return Err(Rejection::new(
                Reason::UnknownSender,
                format!("{:?} from {sender:?} is not trusted", u.kind()),
            ));
        };
        let env = u.verify(key).map_err(|_| {
            Rejection::new(
                Reason::BadSignature,
                format!("{:?} from {sender:?}: signature does not verify", u.kind()),
            )
        })?;
        if let Some(t) = topic
            && !t.accepts(env.kind)
        {
            return Err(Rejection::new(
                Reason::WrongKind,
                format!("{:?} on the wrong topic", env.kind),
            ));
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::Signer;

    fn signer() -> Signer {
        Signer::generate().expect("key").0
    }

    #[test]
    fn checks_in_order() {
        let op = signer();
        let agg = signer();
        let trust = Trust {
            operator: op.public_key(),
            operator_id: Some("op".into()),
            aggregator: None,
            aggregator_id: None,
        };
        let cmd = Topic::DevCmd {
            fleet: "f",
            device: "d",
        };
        let good = Envelope::new(Kind::Command, "op", 1, 0, b"x")
            .seal(&op)
            .expect("seal");
        assert!(trust.open(&good, 1024, Some(&cmd)).is_ok());
        let r = |wire: &[u8], max: usize, t: Option<&Topic<'_>>| {
            trust.open(wire, max, t).expect_err("rejected").reason
        };
        assert_eq!(r(&good, 10, Some(&cmd)), Reason::Oversize);
        assert_eq!(r(&good[..20], 1024, Some(&cmd)), Reason::Malformed);
        let wrong_id = Envelope::new(Kind::Command, "other", 1, 0, b"x")
            .seal(&op)
            .expect("seal");
        assert_eq!(r(&wrong_id, 1024, Some(&cmd)), Reason::UnknownSender);
        let wrong_key = Envelope::new(Kind::Command, "op", 1, 0, b"x")
            .seal(&agg)
            .expect("seal");
        assert_eq!(r(&wrong_key, 1024, Some(&cmd)), Reason::BadSignature);
        let ack = Envelope::new(Kind::Ack, "agg", 1, 0, b"x")
            .seal(&agg)
            .expect("seal");
        assert_eq!(
            r(&ack, 1024, Some(&cmd)),
            Reason::UnknownSender,
            "no aggregator key configured"
        );
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 65] ^= 1; // the payload byte: the body still decodes
        assert_eq!(r(&flipped, 1024, Some(&cmd)), Reason::BadSignature);
        let chunk_topic = Topic::BundleChunk {
            fleet: "f",
            sha256: [0; 32],
            index: 0,
        };
        assert_eq!(r(&good, 1024, Some(&chunk_topic)), Reason::WrongKind);
        let device = Envelope::new(Kind::Status, "op", 1, 0, b"x")
            .seal(&op)
            .expect("seal");
        assert_eq!(r(&device, 1024, None), Reason::UnknownSender);
    }
}
