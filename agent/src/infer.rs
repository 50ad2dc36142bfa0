//! Local inference on a watched directory (a blocking job per scan) and on a Unix socket
//! ([`socket`]), run off the reactor.
//!
//! Inputs are `{stem}.npy` (a one-input model) or `{stem}.npz` (members named like the model's
//! inputs, else taken in name order). Each output `k` is written to `{output_dir}/{stem}.out{k}.npy`
//! (temporary file, then rename, so a reader never sees a partial result); a failure writes
//! `{stem}.err` with the reason. An input whose `.out0.npy` or `.err` exists is not run again.
//! Writers should create inputs under a name starting with `.` and rename them, so a half-written
//! input is never read.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fedge_runtime::{Tensor, npy};

use crate::fsx;
use crate::store::Served;

/// Where inference reads and writes.
#[derive(Debug, Clone)]
pub struct InferDirs {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Files run per scan.
    pub batch: usize,
}

/// Runs the served model on every new input (up to `batch`); returns `(latency µs, ok)` per file.
pub fn scan(served: &Served, dirs: &InferDirs) -> Vec<(u32, bool)> {
    if fsx::create_dir(&dirs.output, false).is_err() {
        return Vec::new();
    }
    let mut inputs: Vec<PathBuf> = fs::read_dir(&dirs.input)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_input(p) && !done(p, &dirs.output))
        .collect();
    inputs.sort();
    inputs.truncate(dirs.batch.max(1));
    inputs
        .iter()
        .map(|p| run_one(served, p, &dirs.output))
        .collect()
}

fn is_input(p: &Path) -> bool {
    let visible = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.'));
    let ext = p.extension().and_then(|e| e.to_str());
    visible && p.is_file() && matches!(ext, Some("npy" | "npz"))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn done(p: &Path, out: &Path) -> bool {
    let s = stem(p);
    out.join(format!("{s}.out0.npy")).exists() || out.join(format!("{s}.err")).exists()
}

fn run_one(served: &Served, input: &Path, out: &Path) -> (u32, bool) {
    let s = stem(input);
    let t0 = Instant::now();
    let result = read_inputs(served, input)
        .and_then(|ins| served.model.run(&ins).map_err(|e| e.to_string()));
    let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
    let written = match &result {
        Ok(outputs) => outputs.iter().enumerate().try_for_each(|(k, t)| {
            fsx::write_atomic(&out.join(format!("{s}.out{k}.npy")), &npy::encode(t), false)
        }),
        Err(e) => fsx::write_atomic(
            &out.join(format!("{s}.err")),
            format!("{e}\n").as_bytes(),
            false,
        ),
    };
    if let Err(e) = &written {
        tracing::warn!(input = %input.display(), error = %e, "inference result not written");
    }
    if let Err(e) = &result {
        tracing::warn!(input = %input.display(), error = %e, "inference failed");
    }
    (us, result.is_ok() && written.is_ok())
}

fn read_inputs(served: &Served, p: &Path) -> Result<Vec<Tensor>, String> {
    if p.extension().is_some_and(|e| e == "npy") {
        return npy::read(p).map(|t| vec![t]).map_err(|e| e.to_string());
    }
    let members = npy::read_npz(p).map_err(|e| e.to_string())?;
    let names = served.model.inputs();
    let by_name: Option<Vec<Tensor>> = names
        .iter()
        .map(|i| {
            members
                .iter()
                .find(|(n, _)| *n == i.name)
                .map(|(_, t)| t.clone())
        })
        .collect();
    Ok(by_name.unwrap_or_else(|| members.into_iter().map(|(_, t)| t).collect()))
}

/// The socket protocol (little-endian `u32`s):
/// request `n`, then `n` times `len` + a `.npy` file: the model's inputs in order;
/// response `0`, `m`, then `m` times `len` + `.npy`: the outputs; or `1`, `len`, a UTF-8 reason.
/// A connection carries any number of requests, one at a time. A request over the size limit
/// gets its reason and the connection is closed (its rest cannot be skipped safely).
pub mod socket {
    use std::path::Path;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Instant;

    use fedge_runtime::{Tensor, npy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::mpsc;

    use crate::store::Served;

    /// The model being served (swapped by installs and rollbacks).
    pub type Current = Arc<Mutex<Option<Arc<Served>>>>;

    /// Binds `path` (mode 0600, replacing a stale socket file).
    ///
    /// # Errors
    /// I/O errors binding or setting the mode.
    pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    }

    /// Accepts connections until the listener fails; each is served on its own task. Every
    /// request's latency and outcome goes to `results`.
    pub async fn serve(
        listener: UnixListener,
        current: Current,
        max_request: usize,
        results: mpsc::UnboundedSender<(u32, bool)>,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (current, results) = (current.clone(), results.clone());
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, current, max_request, results).await {
                            tracing::debug!(error = %e, "inference connection closed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inference socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(
        mut s: UnixStream,
        current: Current,
        max_request: usize,
        results: mpsc::UnboundedSender<(u32, bool)>,
    ) -> std::io::Result<()> {
        loop {
            let n = match s.read_u32_le().await {
                Ok(n) => n as usize,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut frames = Vec::new();
            let mut total = 0usize;
            let mut refused = None;
            for _ in 0..n.min(1024) {
                let len = s.read_u32_le().await? as usize;
                total = total.saturating_add(len);
                if total > max_request {
                    refused = Some(format!(
                        "request of more than {max_request} bytes (infer.max_request_bytes)"
                    ));
                    break;
                }
                let mut b = vec![0u8; len];
                s.read_exact(&mut b).await?;
                frames.push(b);
            }
            if n > 1024 {
                refused = Some(format!("{n} inputs in one request"));
            }
            if let Some(why) = refused {
                tracing::warn!(reason = %why, "inference request refused");
                let _ = results.send((0, false));
                write_err(&mut s, &why).await?;
                return Ok(());
            }
            let served = current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let t0 = Instant::now();
            let out = match served {
                None => Err("no model installed".to_string()),
                Some(served) => tokio::task::spawn_blocking(move || run(&served, &frames))
                    .await
                    .unwrap_or_else(|e| Err(format!("inference task: {e}"))),
            };
            let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
            let _ = results.send((us, out.is_ok()));
            match out {
                Ok(outputs) => {
                    let mut buf = Vec::new();
                    buf.extend_from_slice(&0u32.to_le_bytes());
                    buf.extend_from_slice(&(outputs.len() as u32).to_le_bytes());
                    for o in outputs {
                        buf.extend_from_slice(&(o.len() as u32).to_le_bytes());
                        buf.extend_from_slice(&o);
                    }
                    s.write_all(&buf).await?;
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "inference failed");
                    write_err(&mut s, &why).await?;
                }
            }
        }
    }

    async fn write_err(s: &mut UnixStream, why: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(8 + why.len());
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&(why.len() as u32).to_le_bytes());
        buf.extend_from_slice(why.as_bytes());
        s.write_all(&buf).await
    }

    fn run(served: &Served, frames: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, String> {
        let inputs: Vec<Tensor> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| npy::decode(f).map_err(|e| format!("input {i}: {e}")))
            .collect::<Result<_, _>>()?;
        let outputs = served.model.run(&inputs).map_err(|e| e.to_string())?;
        Ok(outputs.iter().map(npy::encode).collect())
    }
}
