//! Request/response inference on the agent's Unix socket: a served zoo model answers with the
//! onnxruntime reference; bad requests get a reason and never take the agent down. The broker is
//! unreachable on purpose: inference does not depend on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Operator, TempDir, case0, config_toml, max_abs_diff, zoo};
use fedge_agent::{Config, Service};
use fedge_proto::msg::Bundle;
use fedge_runtime::{Tensor, npy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

const MODEL: &str = "ppocr_cls";

async fn request(s: &mut UnixStream, frames: &[Vec<u8>]) {
    send(s, frames).await.unwrap();
}

async fn send(s: &mut UnixStream, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let mut buf = (frames.len() as u32).to_le_bytes().to_vec();
    for f in frames {
        buf.extend_from_slice(&(f.len() as u32).to_le_bytes());
        buf.extend_from_slice(f);
    }
    s.write_all(&buf).await
}

/// `Ok(outputs)` or `Err(reason)`.
async fn response(s: &mut UnixStream) -> Result<Vec<Tensor>, String> {
    let status = s.read_u32_le().await.unwrap();
    if status != 0 {
        let len = s.read_u32_le().await.unwrap() as usize;
        let mut b = vec![0; len];
        s.read_exact(&mut b).await.unwrap();
        return Err(String::from_utf8(b).unwrap());
    }
    let n = s.read_u32_le().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let len = s.read_u32_le().await.unwrap() as usize;
        let mut b = vec![0; len];
        s.read_exact(&mut b).await.unwrap();
        out.push(npy::decode(&b).unwrap());
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_socket_answers_with_the_reference_and_refuses_bad_requests() {
    let dir = TempDir::new("socket");
    let op = Operator::new();
    let sock = dir.0.join("infer.sock");
    // A stale file where the socket goes is replaced.
    std::fs::write(&sock, b"stale").unwrap();
    let dead = format!("mqtt://127.0.0.1:{}", fedge_tests::mosquitto::free_port());
    let extra = format!("[infer]\nsocket = {sock:?}\nmax_request_bytes = 200000\n");
    let cfg = Config::from_toml(&config_toml(&dir.0, &dead, &op, &extra)).expect("config");

    // The model is in the store before the agent starts, as after an earlier install.
    let (model, io) = zoo(MODEL);
    let store = fedge_agent::store::ModelStore::open(&cfg.model_path(), 2, 1).unwrap();
    let b = Bundle {
        name: MODEL,
        version: 1,
        created_unix_s: 1,
        model: &model,
        test_input: &io,
        test_output: &io,
        tolerance: 1e-3,
    };
    store.install(&b, &[1; 32]).expect("install");
    drop(store);

    let svc = Service::open(cfg).expect("open");
    let stats = svc.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        svc.run(async move {
            let _ = stopped.await;
        })
        .await
        .expect("agent");
    });
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = UnixStream::connect(&sock).await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s.expect("the agent listens on its socket");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Two requests on one connection: both match onnxruntime.
    let (input, want) = case0(MODEL);
    for _ in 0..2 {
        request(&mut s, &[npy::encode(&input)]).await;
        let out = response(&mut s).await.expect("outputs");
        assert_eq!(out.len(), 1);
        let err = max_abs_diff(&out[0], &want);
        assert!(err < 1e-4, "max |diff| {err}");
    }
    // Not an .npy, the wrong input count, the wrong shape: a reason each, the connection stays.
    request(&mut s, &[b"not an npy".to_vec()]).await;
    let e = response(&mut s).await.expect_err("garbage");
    assert!(e.contains("input 0"), "{e}");
    request(&mut s, &[]).await;
    assert!(response(&mut s).await.is_err());
    let wrong = Tensor::new(&[1, 3, 8, 8], &vec![0.5f32; 3 * 64]).unwrap();
    request(&mut s, &[npy::encode(&wrong)]).await;
    assert!(response(&mut s).await.is_err(), "wrong shape");
    request(&mut s, &[npy::encode(&input)]).await;
    assert!(response(&mut s).await.is_ok(), "still serving");
    // Over the size limit: the reason, then the connection closes; a new one works.
    // The agent stops reading after the length: the rest of the write may fail (broken pipe).
    let _ = send(&mut s, &[vec![0u8; 300_000]]).await;
    let e = response(&mut s).await.expect_err("oversize");
    assert!(e.contains("max_request_bytes"), "{e}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let mut s = UnixStream::connect(&sock).await.unwrap();
    request(&mut s, &[npy::encode(&input)]).await;
    assert!(response(&mut s).await.is_ok());
    drop(s);

    // Counted in telemetry: 4 inferences served, 4 failed (garbage, count, shape, oversize).
    let counts = || {
        (
            stats.inferences.load(Ordering::SeqCst),
            stats.infer_errors.load(Ordering::SeqCst),
        )
    };
    for _ in 0..100 {
        if counts() == (4, 4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counts(), (4, 4));
    let _ = stop.send(());
    task.await.unwrap();
}
