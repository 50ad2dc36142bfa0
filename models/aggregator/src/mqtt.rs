//! The MQTT side: broker URLs, client options (TLS on rustls with the ring provider,
//! credentials, TCP_NODELAY), the embedded rumqttd broker, and the driver that only polls the
//! event loop and forwards what arrives.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, Publish, TlsConfiguration,
    Transport,
};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::error::AggregatorError;

/// A parsed `mqtt://` or `mqtts://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl BrokerUrl {
    /// Parses `scheme://[user[:password]@]host[:port][/]` with scheme `mqtt` or `tcp` (port
    /// 1883) or `mqtts` or `ssl` (TLS, port 8883). IPv6 hosts go in brackets.
    ///
    /// # Errors
    /// Another scheme, an empty host or a bad port.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url}: expected scheme://host[:port]"))?;
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            s => {
                return Err(format!(
                    "{url}: scheme {s:?} is not mqtt, tcp, mqtts or ssl"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((u, p)) => (Some(u.to_string()), (!p.is_empty()).then(|| p.to_string())),
            None => (None, None),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url}: unclosed ["))?;
            (h, p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = port.map_or(Ok(default_port), |p| {
            p.parse().map_err(|_| format!("{url}: bad port {p:?}"))
        })?;
        if host.is_empty() || host.contains('/') {
            return Err(format!("{url}: bad host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
            username,
            password,
        })
    }
}

/// The client options for `url`: client id, session, keep-alive, packet limits, credentials
/// (the config's win over the URL's) and TLS.
///
/// # Errors
/// The CA file cannot be read or holds no usable certificate.
pub fn options(cfg: &Config, url: &BrokerUrl) -> Result<MqttOptions, AggregatorError> {
    let b = &cfg.broker;
    let mut o = MqttOptions::new(cfg.client_id(), url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(b.keep_alive_s.max(5)))
        .set_clean_session(b.clean_session)
        .set_max_packet_size(b.max_packet_bytes, b.max_packet_bytes)
        .set_request_channel_capacity(1024)
        .set_manual_acks(true);
    let user = b.username.clone().or_else(|| url.username.clone());
    if let Some(u) = user {
        o.set_credentials(
            u,
            b.password
                .clone()
                .or_else(|| url.password.clone())
                .unwrap_or_default(),
        );
    }
    if url.tls {
        o.set_transport(Transport::tls_with_config(tls_config(cfg)?));
    }
    Ok(o)
}

fn tls_config(cfg: &Config) -> Result<TlsConfiguration, AggregatorError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Some(ca) = &cfg.broker.ca_file else {
        // rumqttc's default reads the platform roots through the process-wide provider.
        let _ = provider.as_ref().clone().install_default();
        return Ok(TlsConfiguration::default());
    };
    let bad = |e: String| AggregatorError::Broker(format!("CA file {}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// A client and its event loop with TCP_NODELAY set (rumqttd never sets it on its side).
pub fn connect(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Starts an in-process rumqttd broker (MQTT 3.1.1) on `listen` and waits until it accepts
/// connections; returns the address it listens on (a free port when `listen`'s is 0). The
/// broker's threads run until the process exits.
///
/// # Errors
/// The address is taken or the broker did not come up within 5 s.
pub fn start_embedded(
    listen: SocketAddr,
    max_packet: usize,
) -> Result<SocketAddr, AggregatorError> {
    let taken = |e: std::io::Error| {
        AggregatorError::Broker(format!("embedded broker cannot listen on {listen}: {e}"))
    };
    let listen = TcpListener::bind(listen)
        .and_then(|l| l.local_addr())
        .map_err(taken)?;
    let conn = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_packet,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "fedge-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: conn,
    };
    let router = rumqttd::RouterConfig {
        max_connections: 10_000,
        max_outgoing_packet_count: 200,
        max_segment_size: (4 * max_packet).max(16 << 20),
        max_segment_count: 10,
        ..Default::default()
    };
    let config = rumqttd::Config {
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("fedge-broker".into())
        .spawn(move || {
            if let Err(e) = rumqttd::Broker::new(config).start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| AggregatorError::Broker(format!("broker thread: {e}")))?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok() {
            return Ok(listen);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(AggregatorError::Broker(format!(
        "embedded broker did not listen on {listen} within 5 s"
    )))
}

/// The loopback URL of an embedded broker listening on `addr`.
pub fn embedded_url(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        Ipv4Addr::LOCALHOST.to_string()
    } else {
        addr.ip().to_string()
    };
    if addr.is_ipv6() && !addr.ip().is_unspecified() {
        format!("mqtt://[{host}]:{}", addr.port())
    } else {
        format!("mqtt://{host}:{}", addr.port())
    }
}

/// What the driver forwards to the engine.
#[derive(Debug)]
pub enum Inbound {
    /// A (re)connection: subscribe again and republish the retained state.
    Connected {
        session_present: bool,
    },
    Publish(Publish),
}

/// Polls the event loop forever, forwarding connections and publishes. Never waits on the
/// engine (the channel is unbounded; with manual acks the broker's in-flight window bounds what
/// can queue up). After an error it waits, then polls again, which reconnects.
pub async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Inbound>) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                let _ = tx.send(Inbound::Connected {
                    session_present: ack.session_present,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Inbound::Publish(p));
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "broker connection lost; reconnecting");
                }
                let backoff = Duration::from_millis(100u64 << failures.min(5));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BrokerUrl::parse("mqtts://alice:s3cret@broker.example:8884").expect("parse");
        assert_eq!(
            u,
            BrokerUrl {
                host: "broker.example".into(),
                port: 8884,
                tls: true,
                username: Some("alice".into()),
                password: Some("s3cret".into())
            }
        );
        let u = BrokerUrl::parse("mqtt://127.0.0.1").expect("parse");
        assert_eq!((u.port, u.tls, u.username), (1883, false, None));
        assert_eq!(BrokerUrl::parse("ssl://[::1]/").expect("parse").port, 8883);
        assert_eq!(
            BrokerUrl::parse("tcp://[::1]:99").expect("parse").host,
            "::1"
        );
        for bad in ["http://x", "mqtt://", "mqtt://h:port", "localhost:1883"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn embedded_urls() {
        assert_eq!(
            embedded_url("0.0.0.0:1883".parse().expect("addr")),
            "mqtt://127.0.0.1:1883"
        );
        assert_eq!(
            embedded_url("[::1]:5".parse().expect("addr")),
            "mqtt://[::1]:5"
        );
    }
}
