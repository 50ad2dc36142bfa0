//! The aggregator on an external broker over TLS (rustls, ring) with a username and password:
//! a Mosquitto with a TLS listener that requires credentials (the aggregator's) and a plain one
//! (the simulated devices').

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Device, Running, identities, temp_dir};
use fedge_aggregator::JobSpec;
use fedge_proto::msg::Outcome;
use fedge_tests::mosquitto::free_port;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A test CA and a server certificate for localhost / 127.0.0.1 (rustls refuses a lone
/// self-signed certificate), and a password file with `agg:s3cret`.
fn credentials(dir: &Path) -> Result<(), String> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=fedge test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend(ec);
    ca.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(dir, "openssl", &ca)?;
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    csr.extend(ec);
    run(dir, "openssl", &csr)?;
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    run(
        dir,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "ext.cnf",
        ],
    )?;
    run(
        dir,
        "mosquitto_passwd",
        &["-c", "-b", "passwd", "agg", "s3cret"],
    )
}

fn start_broker(dir: &Path, tls_port: u16, plain_port: u16) -> Result<Broker, String> {
    let bin = fedge_tests::mosquitto::binary().ok_or("mosquitto is not installed")?;
    credentials(dir)?;
    let d = dir.display();
    let conf = format!(
        "per_listener_settings true\nuser root\npersistence false\n\
         listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
         allow_anonymous false\npassword_file {d}/passwd\n\
         listener {plain_port} 127.0.0.1\nallow_anonymous true\n"
    );
    std::fs::write(dir.join("m.conf"), conf).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("m.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let broker = Broker(child);
    for _ in 0..250 {
        let up = |p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
        if up(tls_port) && up(plain_port) {
            return Ok(broker);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("mosquitto with TLS did not come up".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_round_through_a_tls_broker_with_credentials() {
    let dir = temp_dir("tls");
    let (tls_port, plain_port) = (free_port(), free_port());
    let _broker = match start_broker(&dir, tls_port, plain_port) {
        Ok(b) => b,
        Err(e) => return fedge_tests::skip("runs_a_round_through_a_tls_broker", &e),
    };
    let ids = identities(2);
    let job = JobSpec::parse(
        "id = \"t\"\nmin_devices = 2\nmodel = { zeros = 16 }",
        1 << 20,
    )
    .expect("job");
    let url = format!("mqtts://agg:s3cret@127.0.0.1:{tls_port}");
    let mut cfg = common::config(
        "tls",
        &dir.join("data"),
        Some(url),
        &ids.iter().collect::<Vec<_>>(),
        vec![job],
    );
    cfg.broker.ca_file = Some(dir.join("ca.pem"));
    let agg = Running::start(cfg).await;
    let status = common::get_json(agg.http, "/status").await;
    assert_eq!(
        status["aggregator"]["broker"],
        format!("mqtts://agg:***@127.0.0.1:{tls_port}")
    );

    let mut devs = Vec::new();
    for id in ids {
        devs.push(Device::connect(plain_port, "tls", id, agg.public_key, "t").await);
    }
    for (i, d) in devs.iter_mut().enumerate() {
        let a = d.announce("t", 1).await;
        assert_eq!(d.fetch_model("t", &a).await, vec![0.0; 16]);
        let encoded = fedge_fl::Codec::F32
            .encode(&common::delta(i, 1, 16))
            .expect("encode");
        let (seq, wire) = d.seal_update("t", 1, 4, &encoded);
        d.publish_update("t", wire).await;
        assert_eq!(d.ack(seq).await.outcome, Outcome::Accepted);
    }
    let a = devs[0].announce("t", 2).await;
    assert_eq!((a.phase, a.version), (fedge_proto::msg::Phase::Finished, 1));
    agg.stop().await;
    std::fs::remove_dir_all(dir).expect("cleanup");
}
