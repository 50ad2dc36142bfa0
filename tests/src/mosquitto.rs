//! A real Mosquitto broker for tests: started on a free loopback port, stopped and restarted on
//! the same port on demand, killed when dropped.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) Mosquitto process.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Access settings written after the listener line.
    access: String,
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The Mosquitto binary, if installed (`apt-get install -y mosquitto`).
pub fn binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts a broker on a free port. `Err` explains why (not installed, did not come up): the
    /// caller decides whether that skips or fails the test.
    pub fn start() -> Result<Self, String> {
        Self::start_with("allow_anonymous true")
    }

    /// Starts a broker whose access settings are `access` (Mosquitto configuration lines, e.g.
    /// `allow_anonymous false`, `password_file FILE`, `acl_file FILE`) instead of anonymous
    /// access. Files it names must be readable by root.
    pub fn start_with(access: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "fedge-mosquitto-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let mut m = Self {
            child: None,
            port: free_port(),
            dir,
            access: access.to_string(),
        };
        m.restart()?;
        Ok(m)
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Kills the broker (its clients see the connection drop; retained messages are lost since
    /// persistence is off).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port (after [`Mosquitto::stop`]).
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let bin = binary().ok_or("mosquitto is not installed (apt-get install -y mosquitto)")?;
        let conf = self.dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).map_err(|e| format!("config: {e}"))?;
        // Run as root, Mosquitto drops to its own user: keep everything world-readable.
        writeln!(
            f,
            "listener {} 127.0.0.1\n{}\npersistence false\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\nuser root",
            self.port, self.access
        )
        .map_err(|e| format!("config: {e}"))?;
        drop(f);
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("mosquitto exited at start: {status}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "mosquitto did not listen on port {} within 10 s",
            self.port
        ))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_restarts() {
        let mut m = match Mosquitto::start() {
            Ok(m) => m,
            Err(e) => return crate::skip("mosquitto::starts_stops_restarts", &e),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, m.port()));
        assert!(TcpStream::connect(addr).is_ok());
        m.stop();
        assert!(TcpStream::connect(addr).is_err());
        m.restart().expect("restart");
        assert!(TcpStream::connect(addr).is_ok());
    }
}
