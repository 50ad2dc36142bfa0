//! Local inference on a watched directory, run off the reactor (a blocking job per scan).
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
