//! Link throughput: QoS 1 messages per second through the same link the agent uses, raw or
//! through the disk outbox.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::BrokerConfig;
use crate::error::AgentError;
use crate::inflight::{Inflight, Tag};
use crate::link::{self, LinkEvent, LinkOptions};
use crate::outbox::{Class, Outbox};

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct BenchReport {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl BenchReport {
    pub fn per_second(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
}

/// Publishes `count` QoS 1 messages of `size` bytes with `window` in flight and waits for every
/// PUBACK. With `outbox`, each message is first written to an outbox in that directory (fsynced
/// when `fsync`, as the agent does for messages it never drops) and removed on its PUBACK.
///
/// # Errors
/// When the link cannot be configured, the outbox cannot be opened, or no connection comes up
/// within 10 s.
pub async fn bench_link(
    broker: &BrokerConfig,
    count: u64,
    size: usize,
    window: usize,
    outbox: Option<&Path>,
    fsync: bool,
) -> Result<BenchReport, AgentError> {
    let opts = LinkOptions {
        client_id: format!("fedge-bench-{}", std::process::id()),
        queue: 1024,
        inflight: (window + 8) as u16,
    };
    let (handle, driver, mut events) = link::connect(broker, &opts, None)?;
    let mut ob = match outbox {
        Some(dir) => {
            Some(Outbox::open(dir, u64::MAX, fsync).map_err(|e| AgentError::io("outbox", dir, e))?)
        }
        None => None,
    };
    let topic = format!("fedge/v1/bench/dev/{}/telemetry", opts.client_id);
    let run = async {
        let payload = vec![0xa5u8; size];
        let mut fl = Inflight::default();
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut t0 = None;
        while acked < count {
            let ev = match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Some(ev)) => ev,
                _ => return Err(AgentError::Broker("no progress for 10 s".into())),
            };
            match ev {
                LinkEvent::Connected => {
                    t0.get_or_insert_with(Instant::now);
                }
                LinkEvent::Written(p) => fl.written(p),
                LinkEvent::AwaitAck(p) => fl.collided(p),
                LinkEvent::Acked(p) => {
                    if let Some(Tag::Outbox(id)) = fl.acked(p) {
                        acked += 1;
                        if let Some(ob) = ob.as_mut() {
                            ob.remove(id);
                        }
                    }
                }
                LinkEvent::Disconnected { error } => return Err(AgentError::Broker(error)),
                _ => {}
            }
            while sent < count && fl.outbox_count() < window && handle.is_up() {
                let id = match ob.as_mut() {
                    Some(ob) => ob
                        .push(Class::Reliable, &topic, &payload)
                        .map_err(|e| AgentError::Broker(e.to_string()))?,
                    None => sent,
                };
                if handle.publish(&topic, payload.clone(), false).is_err() {
                    if let Some(ob) = ob.as_mut() {
                        ob.remove(id);
                    }
                    break;
                }
                fl.queued(Tag::Outbox(id));
                sent += 1;
            }
        }
        let seconds = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let _ = handle.disconnect();
        Ok(BenchReport {
            messages: count,
            bytes: count * size as u64,
            seconds,
        })
    };
    tokio::select! {
        () = driver.run() => Err(AgentError::Broker("link stopped".into())),
        r = run => r,
    }
}
