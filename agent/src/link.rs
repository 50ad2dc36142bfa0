//! The MQTT link: a rumqttc event loop driven by [`LinkDriver::run`], which only polls, forwards
//! events and reconnects; and a [`LinkHandle`] through which the agent publishes without ever
//! awaiting the driver (non-blocking `try_*` calls, so the two can never deadlock).
//!
//! - Clean sessions: after every reconnect the broker knows nothing of the device, so the agent
//!   subscribes again and re-sends every unacknowledged outbox message ([`LinkEvent::Connected`]).
//! - When a connection drops, the driver discards every request of that connection (rumqttc's
//!   pending queue, its request channel, buffered events) under the same lock that
//!   [`LinkHandle::publish`] takes, and marks the link down; so no request queued for the old
//!   connection leaks into the next one and confuses the pairing of packet ids ([`crate::inflight`]).
//! - Reconnects back off exponentially with jitter, from `backoff_initial_ms` up to
//!   `backoff_max_ms`, reset by a successful connection.
//! - Before each connection attempt the last will is taken from a [`WillSource`]: a freshly sealed
//!   `Status { online: false }` (see [`crate::seq`] for why each attempt needs its own).
//! - Packet limits come from `broker.max_packet_bytes`; TCP_NODELAY is on.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions,
    Outgoing, Packet, Publish, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::config::BrokerConfig;
use crate::error::AgentError;

/// A parsed `mqtt://` or `mqtts://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
    ///
    /// # Errors
    /// A message for another scheme, a missing host or a bad port.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("broker.url = {url:?}: {why}");
        let (tls, rest) = if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (false, r)
        } else if let Some(r) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (true, r)
        } else {
            return Err(bad("use mqtt://host:port or mqtts://host:port"));
        };
        let rest = rest.trim_end_matches('/');
        let default = if tls { 8883 } else { 1883 };
        let port = |p: Option<&str>| {
            p.map_or(Ok(default), |p| {
                p.parse::<u16>().map_err(|_| bad("bad port"))
            })
        };
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                (h, port(after.strip_prefix(':'))?)
            }
            None => match rest.split_once(':') {
                Some((h, p)) => (h, port(Some(p))?),
                None => (rest, default),
            },
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("missing host"));
        }
        Ok(Self {
            tls,
            host: host.into(),
            port,
        })
    }
}

/// What the driver reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// A connection is up (CONNACK received); subscriptions must be made again.
    Connected,
    /// The connection dropped; every request of it is discarded.
    Disconnected { error: String },
    /// A message on a subscribed topic.
    Message(Publish),
    /// A QoS 1 publish was written with this packet id.
    Written(u16),
    /// A QoS 1 publish waits for this packet id to be acknowledged first.
    AwaitAck(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
    /// The broker refused a subscription (ACL).
    SubscribeRefused,
    /// A clean disconnect was sent; the driver has stopped.
    Closed,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not connected")]
    Down,
    #[error("request queue full")]
    Full,
}

/// Supplies a freshly sealed last will before each connection attempt.
pub trait WillSource: Send {
    /// The will for the next attempt; `None` for no will.
    fn will(&mut self) -> Option<LastWill>;
}

/// Publishes and subscribes; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    client: AsyncClient,
    /// `true` while a connection is up; held while queueing a request, and by the driver while it
    /// discards a dropped connection's requests.
    up: Arc<Mutex<bool>>,
}

impl LinkHandle {
    fn queue(
        &self,
        f: impl FnOnce(&AsyncClient) -> Result<(), rumqttc::ClientError>,
    ) -> Result<(), LinkError> {
        let up = self.up.lock().unwrap_or_else(PoisonError::into_inner);
        if !*up {
            return Err(LinkError::Down);
        }
        f(&self.client).map_err(|_| LinkError::Full)
    }

    /// Queues a QoS 1 publish on the current connection.
    ///
    /// # Errors
    /// [`LinkError::Down`] between connections, [`LinkError::Full`] when rumqttc's queue is full.
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), LinkError> {
        self.queue(|c| c.try_publish(topic, QoS::AtLeastOnce, retain, payload))
    }

    /// Queues a QoS 1 subscription.
    ///
    /// # Errors
    /// As [`LinkHandle::publish`].
    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.queue(|c| c.try_subscribe(filter, QoS::AtLeastOnce))
    }

    /// Queues an unsubscription.
    ///
    /// # Errors
    /// As [`LinkHandle::publish`].
    pub fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.queue(|c| c.try_unsubscribe(filter))
    }

    /// Queues a clean disconnect (no last will); the driver then stops.
    ///
    /// # Errors
    /// As [`LinkHandle::publish`].
    pub fn disconnect(&self) -> Result<(), LinkError> {
        self.queue(|c| c.try_disconnect())
    }

    pub fn is_up(&self) -> bool {
        *self.up.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns the rumqttc event loop; run it with [`LinkDriver::run`].
pub struct LinkDriver {
    eventloop: EventLoop,
    up: Arc<Mutex<bool>>,
    events: mpsc::Sender<LinkEvent>,
    will: Option<Box<dyn WillSource>>,
    backoff: Backoff,
}

impl std::fmt::Debug for LinkDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkDriver")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Link settings beyond the broker config.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub client_id: String,
    /// Publishes that may wait in rumqttc's request queue.
    pub queue: usize,
    /// rumqttc's in-flight window (QoS 1 publishes awaiting PUBACK).
    pub inflight: u16,
}

/// Builds the link: the handle, the driver to run, and the receiver of its events.
///
/// # Errors
/// [`AgentError::Broker`] for a bad URL or password file, [`AgentError::Tls`] for TLS files.
pub fn connect(
    cfg: &BrokerConfig,
    opts: &LinkOptions,
    will: Option<Box<dyn WillSource>>,
) -> Result<(LinkHandle, LinkDriver, mpsc::Receiver<LinkEvent>), AgentError> {
    let url = BrokerUrl::parse(&cfg.url).map_err(AgentError::Broker)?;
    let mut mo = MqttOptions::new(&opts.client_id, &url.host, url.port);
    mo.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(cfg.keep_alive_s.max(5)))
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
        .set_inflight(opts.inflight.max(2));
    if let Some(user) = &cfg.username {
        mo.set_credentials(user, password(cfg)?);
    }
    if url.tls {
        mo.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            crate::tls::client_config(cfg)?,
        ))));
    }
    let (client, mut eventloop) = AsyncClient::new(mo, opts.queue.max(1));
    let mut no = NetworkOptions::new();
    no.set_tcp_nodelay(true);
    no.set_connection_timeout(cfg.connect_timeout_s.max(1));
    eventloop.set_network_options(no);
    let up = Arc::new(Mutex::new(false));
    let (tx, rx) = mpsc::channel(256);
    let backoff = Backoff::new(cfg.backoff_initial_ms, cfg.backoff_max_ms);
    let driver = LinkDriver {
        eventloop,
        up: up.clone(),
        events: tx,
        will,
        backoff,
    };
    Ok((LinkHandle { client, up }, driver, rx))
}

fn password(cfg: &BrokerConfig) -> Result<String, AgentError> {
    match (&cfg.password, &cfg.password_file) {
        (_, Some(p)) => std::fs::read_to_string(p)
            .map(|t| t.lines().next().unwrap_or_default().to_string())
            .map_err(|e| AgentError::Broker(format!("password_file {}: {e}", p.display()))),
        (Some(p), None) => Ok(p.clone()),
        (None, None) => Ok(String::new()),
    }
}

impl LinkDriver {
    /// Polls until a clean disconnect, or until every [`LinkHandle`] or the event receiver is
    /// dropped. Connection errors are never fatal: it backs off and reconnects.
    pub async fn run(mut self) {
        let mut connected = false;
        loop {
            if self.eventloop.network.is_none()
                && let Some(will) = self.will.as_mut().and_then(|w| w.will())
            {
                self.eventloop.mqtt_options.set_last_will(will);
            }
            let ev = match self.eventloop.poll().await {
                Ok(ev) => ev,
                Err(ConnectionError::RequestsDone) => return,
                Err(e) => {
                    self.discard_connection();
                    if std::mem::take(&mut connected) {
                        tracing::warn!(error = %e, "broker connection lost");
                        if self
                            .events
                            .send(LinkEvent::Disconnected {
                                error: e.to_string(),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    } else {
                        tracing::warn!(error = %e, "broker connection attempt failed");
                    }
                    tokio::time::sleep(self.backoff.next()).await;
                    continue;
                }
            };
            let forward = match ev {
                Event::Incoming(Packet::ConnAck(_)) => {
                    *self.up.lock().unwrap_or_else(PoisonError::into_inner) = true;
                    connected = true;
                    self.backoff.reset();
                    tracing::info!("broker connected");
                    Some(LinkEvent::Connected)
                }
                Event::Incoming(Packet::Publish(p)) => Some(LinkEvent::Message(p)),
                Event::Incoming(Packet::PubAck(a)) => Some(LinkEvent::Acked(a.pkid)),
                Event::Incoming(Packet::SubAck(s)) => s
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    .then_some(LinkEvent::SubscribeRefused),
                Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                    Some(LinkEvent::Written(pkid))
                }
                Event::Outgoing(Outgoing::AwaitAck(pkid)) => Some(LinkEvent::AwaitAck(pkid)),
                Event::Outgoing(Outgoing::Disconnect) => {
                    self.discard_connection();
                    let _ = self.events.send(LinkEvent::Closed).await;
                    return;
                }
                _ => None,
            };
            if let Some(ev) = forward
                && self.events.send(ev).await.is_err()
            {
                return;
            }
        }
    }

    /// Marks the link down and drops every request of the connection that ended (see the module
    /// docs); packet ids restart from a clean state on the next connection.
    fn discard_connection(&mut self) {
        let mut up = self.up.lock().unwrap_or_else(PoisonError::into_inner);
        *up = false;
        self.eventloop.clean();
        self.eventloop.pending.clear();
        self.eventloop.state.events.clear();
        self.eventloop.state.collision = None;
    }
}

/// Capped exponential backoff with jitter: each delay is drawn from `[step/2, step]`, and the step
/// doubles up to the cap.
#[derive(Debug)]
struct Backoff {
    initial: u64,
    max: u64,
    step: u64,
    rng: StdRng,
}

impl Backoff {
    fn new(initial_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        let initial = initial_ms.max(1);
        Self {
            initial,
            max: max_ms.max(initial),
            step: initial,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn next(&mut self) -> Duration {
        let ms = self.rng.random_range(self.step / 2..=self.step);
        self.step = (self.step * 2).min(self.max);
        Duration::from_millis(ms)
    }

    fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1884").expect("url");
        assert_eq!(
            u,
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        let u = BrokerUrl::parse("mqtts://broker.example").expect("url");
        assert_eq!((u.tls, u.port), (true, 8883));
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]:1883").expect("v6").host,
            "::1"
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]").expect("v6").port, 1883);
        for bad in ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://h:x"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(100, 1000);
        let steps: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        for (d, step) in steps
            .iter()
            .zip([100u64, 200, 400, 800, 1000, 1000, 1000, 1000])
        {
            assert!(
                (step / 2..=step).contains(d),
                "{d} not in [{}, {step}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
