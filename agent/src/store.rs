//! The model store: installed versions, the active pointer, install with self-test, rollback.
//!
//! Layout under the model directory:
//! - `versions/{name}-{version}-{sha8}/` — `model.onnx`, `test_input.npz`, `test_output.npz` and
//!   `meta.json` (name, version, sha256 of the model, tolerance, input shapes);
//! - `active` — JSON `{"healthy": [dir, ...]}`, newest first; the first entry is served. It is the
//!   only commit point: replaced atomically (temporary file, fsync, rename, fsync of the directory)
//!   and only ever names a version that was completely written, fsynced, loaded and self-tested;
//! - `versions/.tmp-*` — a version being written; removed at start.
//!
//! Install: write the version to a temporary directory, fsync every file and the directory, rename
//! it into `versions/`, fsync `versions/`, load it, run the self-test, then replace `active`. Any
//! failure leaves `active` untouched (the previous version keeps being served) and deletes the new
//! directory. At start the first healthy version whose model still hashes to its recorded sha256
//! and loads is served; versions that fail are dropped from the pointer.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fedge_proto::chunk::sha256;
use fedge_proto::msg::{Bundle, ModelRef, Reason};
use fedge_proto::{check_id, hex};
use fedge_runtime::{Graph, Model, ModelOptions};
use serde::{Deserialize, Serialize};

use crate::{fsx, selftest};

/// The model being served, shared with inference.
#[derive(Debug)]
pub struct Served {
    pub model: Model,
    pub info: ModelInfo,
}

/// Which version is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: u64,
    /// sha256 of `model.onnx`, hex.
    pub sha256: String,
    /// sha256 of the sealed bundle it came from, hex (the install command's object).
    pub bundle_sha256: String,
}

impl ModelInfo {
    /// As the protocol's [`ModelRef`].
    pub fn as_ref(&self) -> ModelRef<'_> {
        ModelRef {
            name: &self.name,
            version: self.version,
            sha256: hex::decode::<32>(&self.sha256).unwrap_or([0; 32]),
        }
    }
}

/// Why an install, a rollback or a load failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
}

impl Failure {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    fn storage(what: &str, e: io::Error) -> Self {
        Self::new(Reason::Storage, format!("{what}: {e}"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    name: String,
    version: u64,
    sha256: String,
    tolerance: f32,
    created_unix_s: u64,
    bundle_sha256: String,
    input_shapes: BTreeMap<String, Vec<usize>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pointer {
    healthy: Vec<String>,
}

/// Installed versions on disk; see the module docs.
#[derive(Debug)]
pub struct ModelStore {
    root: PathBuf,
    versions: PathBuf,
    keep: usize,
    threads: usize,
}

const MODEL: &str = "model.onnx";
const TEST_IN: &str = "test_input.npz";
const TEST_OUT: &str = "test_output.npz";
const META: &str = "meta.json";

impl ModelStore {
    /// Opens the store in `root`, removing half-written versions.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn open(root: &Path, keep: usize, threads: usize) -> io::Result<Self> {
        let versions = root.join("versions");
        fsx::create_dir(&versions, true)?;
        fsx::remove_temps(&versions);
        fsx::remove_temps(root);
        Ok(Self {
            root: root.to_path_buf(),
            versions,
            keep: keep.max(1),
            threads: threads.max(1),
        })
    }

    fn pointer_path(&self) -> PathBuf {
        self.root.join("active")
    }

    fn read_pointer(&self) -> Result<Pointer, Failure> {
        match fs::read(self.pointer_path()) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Failure::new(Reason::Storage, format!("active pointer: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Pointer::default()),
            Err(e) => Err(Failure::storage("active pointer", e)),
        }
    }

    fn write_pointer(&self, healthy: &[String]) -> Result<(), Failure> {
        let json = serde_json::to_vec(&Pointer {
            healthy: healthy.to_vec(),
        })
        .map_err(|e| Failure::new(Reason::Internal, e.to_string()))?;
        fsx::write_atomic(&self.pointer_path(), &json, true)
            .map_err(|e| Failure::storage("active pointer", e))
    }

    /// Healthy versions, newest (served) first.
    pub fn healthy(&self) -> Vec<String> {
        self.read_pointer().map(|p| p.healthy).unwrap_or_default()
    }

    /// Loads the version to serve at start; the failures met on the way are returned to be
    /// reported.
    pub fn load_active(&self) -> (Option<Served>, Vec<Failure>) {
        let mut failures = Vec::new();
        let (list, tested) = match self.read_pointer() {
            Ok(p) => (p.healthy, false),
            Err(f) => {
                failures.push(f);
                (self.all_versions(), true)
            }
        };
        for (i, dir) in list.iter().enumerate() {
            let r = self.open_version(dir).and_then(|s| {
                if tested {
                    self.self_test(dir, s)
                } else {
                    Ok(s)
                }
            });
            match r {
                Ok(served) => {
                    if i > 0 || tested {
                        let keep = if tested { &list[i..=i] } else { &list[i..] };
                        if let Err(f) = self.write_pointer(keep) {
                            failures.push(f);
                        }
                    }
                    return (Some(served), failures);
                }
                Err(f) => failures.push(Failure::new(f.reason, format!("{dir}: {}", f.detail))),
            }
        }
        if !list.is_empty() {
            let _ = self.write_pointer(&[]);
        }
        (None, failures)
    }

    /// Every version directory, newest version first (used when the pointer is unreadable).
    fn all_versions(&self) -> Vec<String> {
        let mut v: Vec<(u64, String)> = fs::read_dir(&self.versions)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let meta = read_meta(&e.path()).ok()?;
                Some((meta.version, name))
            })
            .collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Installs a verified bundle and serves it; see the module docs.
    ///
    /// # Errors
    /// A [`Failure`] naming the stage (`storage`, `load_failed`, `self_test_failed`); the
    /// previously served version stays active.
    pub fn install(&self, b: &Bundle<'_>, bundle_sha: &[u8; 32]) -> Result<Served, Failure> {
        check_id(b.name)
            .map_err(|e| Failure::new(Reason::Malformed, format!("bundle name: {e}")))?;
        let sha = sha256(b.model);
        let dir = format!("{}-{}-{}", b.name, b.version, &hex::encode32(&sha)[..8]);
        let healthy = self.healthy();
        if let Some(pos) = healthy.iter().position(|d| *d == dir) {
            let served = self.open_version(&dir)?;
            if pos > 0 {
                let mut list = vec![dir.clone()];
                list.extend(healthy.into_iter().filter(|d| *d != dir));
                self.write_pointer(&list)?;
            }
            return Ok(served);
        }
        let meta = Meta {
            name: b.name.into(),
            version: b.version,
            sha256: hex::encode32(&sha).to_string(),
            tolerance: b.tolerance,
            created_unix_s: b.created_unix_s,
            bundle_sha256: hex::encode32(bundle_sha).to_string(),
            input_shapes: BTreeMap::new(),
        };
        let path = self.versions.join(&dir);
        let tmp = fsx::temp_beside(&path);
        if let Err(f) = self.stage(&tmp, &path, b, meta) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(f);
        }
        let served = self
            .open_version(&dir)
            .and_then(|s| self.self_test(&dir, s));
        let served = match served {
            Ok(s) => s,
            Err(f) => {
                let _ = fs::remove_dir_all(&path);
                return Err(f);
            }
        };
        let mut list = vec![dir.clone()];
        list.extend(healthy.into_iter().filter(|d| *d != dir));
        list.truncate(self.keep);
        self.write_pointer(&list)?;
        self.prune(&list);
        Ok(served)
    }

    /// Writes the version into `tmp`, fsyncs every file and the directory, and renames it to
    /// `path`.
    fn stage(
        &self,
        tmp: &Path,
        path: &Path,
        b: &Bundle<'_>,
        mut meta: Meta,
    ) -> Result<(), Failure> {
        let io = |e| Failure::storage("writing the version", e);
        fs::create_dir(tmp).map_err(io)?;
        for (name, bytes) in [
            (MODEL, b.model),
            (TEST_IN, b.test_input),
            (TEST_OUT, b.test_output),
        ] {
            fsx::write_new(&tmp.join(name), bytes, true).map_err(io)?;
        }
        meta.input_shapes = input_shapes(b.model, tmp)?;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Failure::new(Reason::Internal, e.to_string()))?;
        fsx::write_new(&tmp.join(META), &json, true).map_err(io)?;
        fsx::sync_dir(tmp).map_err(io)?;
        if path.exists() {
            fs::remove_dir_all(path).map_err(io)?;
        }
        fs::rename(tmp, path).map_err(io)?;
        fsx::sync_dir(&self.versions).map_err(io)
    }

    fn self_test(&self, dir: &str, served: Served) -> Result<Served, Failure> {
        let path = self.versions.join(dir);
        let meta = read_meta(&path)?;
        let names: Vec<String> = served
            .model
            .inputs()
            .iter()
            .map(|i| i.name.clone())
            .collect();
        let cases = selftest::read_cases(&path.join(TEST_IN), &path.join(TEST_OUT), &names)
            .map_err(|e| Failure::new(Reason::SelfTestFailed, format!("test vector: {e}")))?;
        selftest::run(&served.model, &cases, meta.tolerance)
            .map_err(|e| Failure::new(Reason::SelfTestFailed, e))?;
        Ok(served)
    }

    /// Verifies a version's model against its recorded sha256 and loads it.
    fn open_version(&self, dir: &str) -> Result<Served, Failure> {
        let path = self.versions.join(dir);
        let meta = read_meta(&path)?;
        let bytes = fs::read(path.join(MODEL)).map_err(|e| Failure::storage("model", e))?;
        let sha = hex::encode32(&sha256(&bytes)).to_string();
        if sha != meta.sha256 {
            return Err(Failure::new(
                Reason::HashMismatch,
                format!("model.onnx hashes to {sha}, recorded {}", meta.sha256),
            ));
        }
        let opts = meta.input_shapes.iter().fold(
            ModelOptions::default().threads(self.threads),
            |o, (n, s)| o.input_shape(n, s),
        );
        let model = Model::from_bytes(&bytes, &opts)
            .map_err(|e| Failure::new(Reason::LoadFailed, e.to_string()))?;
        let info = ModelInfo {
            name: meta.name,
            version: meta.version,
            sha256: meta.sha256,
            bundle_sha256: meta.bundle_sha256,
        };
        Ok(Served { model, info })
    }

    /// Serves the previous healthy version and drops the current one from the pointer.
    ///
    /// # Errors
    /// When there is no previous version, or it no longer verifies or loads.
    pub fn rollback(&self) -> Result<Served, Failure> {
        let healthy = self.read_pointer()?.healthy;
        let Some(prev) = healthy.get(1) else {
            return Err(Failure::new(
                Reason::LoadFailed,
                "no previous healthy version to roll back to",
            ));
        };
        let served = self.open_version(prev)?;
        self.write_pointer(&healthy[1..])?;
        self.prune(&healthy[1..]);
        Ok(served)
    }

    /// Removes version directories the pointer no longer names.
    fn prune(&self, keep: &[String]) {
        for e in fs::read_dir(&self.versions).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) && !name.starts_with(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// The served model's file, for the tests and tools that check the on-disk state.
    pub fn version_dir(&self, dir: &str) -> PathBuf {
        self.versions.join(dir)
    }
}

/// The input shapes of the test vector's first case, by input name: the model is always loaded
/// with them (edge inputs have fixed shapes; symbolic dimensions would otherwise stay open).
fn input_shapes(model: &[u8], dir: &Path) -> Result<BTreeMap<String, Vec<usize>>, Failure> {
    let graph = Graph::import(model, &ModelOptions::default())
        .map_err(|e| Failure::new(Reason::LoadFailed, e.to_string()))?;
    let names: Vec<String> = graph.inputs().iter().map(|i| i.name.clone()).collect();
    let cases = selftest::read_cases(&dir.join(TEST_IN), &dir.join(TEST_OUT), &names)
        .map_err(|e| Failure::new(Reason::SelfTestFailed, format!("test vector: {e}")))?;
    let first = cases
        .first()
        .ok_or_else(|| Failure::new(Reason::SelfTestFailed, "test vector has no case"))?;
    if first.0.len() != names.len() {
        return Err(Failure::new(
            Reason::SelfTestFailed,
            format!(
                "test vector has {} inputs, the model takes {}",
                first.0.len(),
                names.len()
            ),
        ));
    }
    Ok(names
        .into_iter()
        .zip(first.0.iter().map(|t| t.shape().to_vec()))
        .collect())
}

fn read_meta(dir: &Path) -> Result<Meta, Failure> {
    let b = fsx::read_limited(&dir.join(META), 1 << 20)
        .map_err(|e| Failure::storage("meta.json", e))?;
    serde_json::from_slice(&b).map_err(|e| Failure::new(Reason::Storage, format!("meta.json: {e}")))
}
