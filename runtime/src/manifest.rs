//! A model's `manifest.toml`: where it came from, its concrete input shapes, the tolerance it
//! must meet against onnxruntime, and where its reference inputs and outputs are.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RuntimeError};
use crate::npy;
use crate::options::ModelOptions;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `model.onnx` beside the manifest when true; else in `.cache/zoo/<name>/`.
    pub committed: bool,
    pub sha256: String,
    pub source: Source,
    pub quantization: Quantization,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub tolerance: Tolerance,
    pub references: References,
    pub references_small: Option<References>,
    /// Directory holding this manifest (filled in by [`Manifest::read`]).
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    pub package: String,
    pub version: String,
    pub wheel_path: String,
    pub licence: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Quantization {
    pub format: String,
    #[serde(default)]
    pub made_by: String,
    #[serde(default)]
    pub float_twin: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Io {
    pub name: String,
    pub dtype: Option<String>,
    pub shape: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Tolerance {
    pub max_abs: f64,
    pub argmax: bool,
    /// Fraction of reference rows whose top-1 must agree (1.0 unless stated).
    pub min_top1: Option<f64>,
    /// Bound on the mean absolute error of the first output, per case: the element-wise check
    /// for models where two legitimate executions differ by whole quantization steps at a few
    /// positions, so `max_abs` is capped at the output's peak.
    #[serde(default)]
    pub mean_abs: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct References {
    pub file: String,
    pub cases: usize,
    #[serde(default)]
    pub signal: String,
}

/// One reference case: inputs and onnxruntime's outputs, in manifest order.
pub type Case = (Vec<Tensor>, Vec<Tensor>);

impl Manifest {
    /// Reads `dir/manifest.toml`.
    ///
    /// # Errors
    /// [`RuntimeError::Io`], or [`RuntimeError::InvalidModel`] for a malformed manifest.
    pub fn read(dir: impl AsRef<Path>) -> Result<Manifest> {
        let path = dir.as_ref().join("manifest.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
        let mut m: Manifest = toml::from_str(&text)
            .map_err(|e| RuntimeError::InvalidModel(format!("{}: {e}", path.display())))?;
        m.dir = dir.as_ref().to_path_buf();
        Ok(m)
    }

    /// The manifest of a zoo model file: beside it, or in `models/zoo/<name>/` for a cached one.
    pub fn for_model(model: impl AsRef<Path>) -> Option<Manifest> {
        let dir = model.as_ref().parent()?;
        if let Ok(m) = Manifest::read(dir) {
            return Some(m);
        }
        let name = dir.file_name()?;
        let root = dir.parent()?.parent()?.parent()?;
        Manifest::read(root.join("models/zoo").join(name)).ok()
    }

    /// The workspace root the zoo lives in (`<root>/models/zoo/<name>`).
    pub fn root(&self) -> PathBuf {
        self.dir
            .ancestors()
            .nth(3)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn model_path(&self) -> PathBuf {
        if self.committed {
            self.dir.join("model.onnx")
        } else {
            self.root()
                .join(".cache/zoo")
                .join(&self.name)
                .join("model.onnx")
        }
    }

    fn resolve(&self, file: &str) -> PathBuf {
        if file.starts_with(".cache") {
            self.root().join(file)
        } else {
            self.dir.join(file)
        }
    }

    /// The fullest reference set on disk (`small` prefers the committed small one).
    pub fn references_path(&self, small: bool) -> Option<PathBuf> {
        let full = Some(self.resolve(&self.references.file)).filter(|p| p.exists());
        let little = self
            .references_small
            .as_ref()
            .map(|r| self.resolve(&r.file))
            .filter(|p| p.exists());
        if small {
            little.or(full)
        } else {
            full.or(little)
        }
    }

    /// Options with every input's concrete shape.
    pub fn options(&self) -> ModelOptions {
        self.inputs
            .iter()
            .fold(ModelOptions::default(), |o, i| match &i.shape {
                Some(s) => o.input_shape(&i.name, s),
                None => o,
            })
    }

    /// Reads reference cases (`c{case}_in{k}`, `c{case}_out{k}`) from an npz.
    ///
    /// # Errors
    /// [`RuntimeError::Io`] or [`RuntimeError::Npy`].
    pub fn cases(path: impl AsRef<Path>) -> Result<Vec<Case>> {
        let arrays: std::collections::BTreeMap<String, Tensor> =
            npy::read_npz(path)?.into_iter().collect();
        let mut out = Vec::new();
        for c in 0.. {
            let take = |kind: &str| -> Vec<Tensor> {
                (0..)
                    .map_while(|k| arrays.get(&format!("c{c}_{kind}{k}")).cloned())
                    .collect()
            };
            let (ins, outs) = (take("in"), take("out"));
            if ins.is_empty() {
                break;
            }
            out.push((ins, outs));
        }
        Ok(out)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

/// Max |a - b| over two tensors' elements, and the share of rows (last axis) whose argmax
/// agrees.
pub fn compare(got: &Tensor, want: &Tensor) -> (f64, usize, usize) {
    let (g, w) = (got.to_f64_lossy(), want.to_f64_lossy());
    let err = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let width = want.shape().last().copied().unwrap_or(1).max(1);
    let rows = g.chunks(width).zip(w.chunks(width));
    let (mut agree, mut total) = (0, 0);
    for (a, b) in rows {
        total += 1;
        agree += (argmax(a) == argmax(b)) as usize;
    }
    (err, agree, total)
}
