//! A small blocking client for the aggregator's JSON API (HTTP/1.1 over TCP, one request per
//! connection). The API has no TLS and no authentication: it is meant for loopback or behind an
//! authenticating proxy (`docs/aggregator.md`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: u64 = 64 << 20;

/// Where the aggregator's HTTP API listens.
#[derive(Debug, Clone)]
pub struct Api {
    url: String,
    host_port: String,
}

impl Api {
    /// `http://host:port` (a trailing `/` is ignored) or plain `host:port`.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if url.starts_with("https://") || rest.contains("://") {
            bail!("aggregator URL {url:?}: only http:// is supported");
        }
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains('/') {
            bail!("aggregator URL {url:?}: expected http://HOST:PORT");
        }
        let host_port = if host_port.contains(':') {
            host_port.to_string()
        } else {
            format!("{host_port}:80")
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            host_port,
        })
    }

    /// `GET path`, a 2xx JSON answer.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None).map(|(_, v)| v)
    }

    /// `POST path` with a JSON body; the status and the JSON answer of a 2xx reply.
    pub fn post(&self, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        self.call("POST", path, body)
    }

    /// `POST path` with a text body (a job spec in TOML); the status and JSON answer of a 2xx.
    pub fn post_text(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        self.call_text("POST", path, body)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        self.call_text(method, path, &body)
    }

    fn call_text(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let (status, text) = self
            .exchange(method, path, body)
            .with_context(|| format!("aggregator at {} unreachable", self.url))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if !(200..300).contains(&status) {
            let why = json
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(Value::as_str)
                .map_or_else(|| text.trim().replace('\n', " "), str::to_string);
            bail!("aggregator answered {status} to {method} {path}: {why}");
        }
        let json = json.with_context(|| format!("{method} {path}: the answer is not JSON"))?;
        Ok((status, json))
    }

    fn exchange(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let addr = self
            .host_port
            .to_socket_addrs()?
            .next()
            .context("the host name resolves to no address")?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host_port,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.take(MAX_RESPONSE).read_to_end(&mut raw)?;
        parse_response(&raw)
    }
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP response (no status)")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).context("bad chunk length")?;
        if n == 0 {
            break;
        }
        out.push_str(rest.get(..n).context("truncated chunk")?);
        s = rest.get(n + 2..).unwrap_or_default();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_responses() {
        assert_eq!(
            Api::new("http://127.0.0.1:8080/").expect("url").host_port,
            "127.0.0.1:8080"
        );
        assert_eq!(Api::new("agg").expect("url").host_port, "agg:80");
        assert!(Api::new("https://agg").is_err());
        assert!(Api::new("http://agg/api").is_err());
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).expect("plain"), (404, "{}".into()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("chunked"),
            (200, "[1,2]".into())
        );
    }
}
