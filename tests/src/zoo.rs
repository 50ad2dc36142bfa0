//! The model zoo (`models/zoo/<name>/manifest.toml`) and checks against onnxruntime's outputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedge_runtime::{Model, ModelOptions, Tensor, npy};
use serde::Deserialize;
use sha2::Digest;

use crate::{repo_root, skip};

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub committed: bool,
    pub sha256: String,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub tolerance: Tolerance,
    pub references: References,
    pub references_small: Option<References>,
    pub quantization: Quantization,
}

#[derive(Debug, Deserialize)]
pub struct Io {
    pub name: String,
    pub dtype: Option<String>,
    pub shape: Option<Vec<usize>>,
}

#[derive(Debug, Deserialize)]
pub struct Tolerance {
    pub max_abs: f64,
    pub argmax: bool,
    /// Fraction of cases whose top-1 must agree (1.0 unless stated).
    pub min_top1: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct References {
    pub file: String,
    pub cases: usize,
}

#[derive(Debug, Deserialize)]
pub struct Quantization {
    pub format: String,
}

impl Manifest {
    pub fn read(name: &str) -> Manifest {
        let path = zoo_dir(name).join("manifest.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn model_path(&self) -> PathBuf {
        if self.committed {
            zoo_dir(&self.name).join("model.onnx")
        } else {
            repo_root().join(".cache/zoo").join(&self.name).join("model.onnx")
        }
    }

    fn resolve(&self, file: &str) -> PathBuf {
        if file.starts_with(".cache") { repo_root().join(file) } else { zoo_dir(&self.name).join(file) }
    }

    /// The fullest reference set present on disk.
    pub fn references_path(&self) -> Option<PathBuf> {
        let full = self.resolve(&self.references.file);
        if full.exists() {
            return Some(full);
        }
        self.references_small.as_ref().map(|r| self.resolve(&r.file)).filter(|p| p.exists())
    }

    pub fn options(&self) -> ModelOptions {
        self.inputs.iter().fold(ModelOptions::default(), |o, i| match &i.shape {
            Some(s) => o.input_shape(&i.name, s),
            None => o,
        })
    }
}

pub fn zoo_dir(name: &str) -> PathBuf {
    repo_root().join("models/zoo").join(name)
}

/// Reference cases: `(inputs, outputs)` per case, from `c{case}_in{k}` / `c{case}_out{k}`.
pub fn cases(path: &std::path::Path) -> Vec<(Vec<Tensor>, Vec<Tensor>)> {
    let arrays: BTreeMap<String, Tensor> = npy::read_npz(path).expect("references").into_iter().collect();
    let mut out = Vec::new();
    for c in 0.. {
        let take = |kind: &str| -> Vec<Tensor> {
            (0..).map_while(|k| arrays.get(&format!("c{c}_{kind}{k}")).cloned()).collect()
        };
        let (ins, outs) = (take("in"), take("out"));
        if ins.is_empty() {
            break;
        }
        out.push((ins, outs));
    }
    out
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// What a zoo check measured.
#[derive(Debug)]
pub struct Outcome {
    pub cases: usize,
    pub max_abs: f64,
    pub top1_agree: f64,
}

/// Loads a zoo model with `opts` and compares every reference case against onnxruntime's
/// outputs; `None` when the model or its references are not on disk (skip printed).
pub fn check(name: &str, opts: Option<ModelOptions>) -> Option<Outcome> {
    let m = Manifest::read(name);
    let model_path = m.model_path();
    if !model_path.exists() {
        skip(name, &format!("{} absent: run `bash tools/scripts/build_zoo.sh`", model_path.display()));
        return None;
    }
    let Some(refs) = m.references_path() else {
        skip(name, "reference outputs absent: run `bash tools/scripts/build_zoo.sh`");
        return None;
    };
    let bytes = std::fs::read(&model_path).expect("model");
    let digest: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, m.sha256, "{name}: model.onnx does not match the manifest's sha256");
    let model = Model::from_bytes(&bytes, &opts.unwrap_or_else(|| m.options()))
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let cases = cases(&refs);
    assert!(!cases.is_empty(), "{name}: no reference cases in {}", refs.display());
    let (mut max_abs, mut agree, mut rows) = (0f64, 0usize, 0usize);
    for (c, (ins, refs)) in cases.iter().enumerate() {
        let got = model.run(ins).unwrap_or_else(|e| panic!("{name} case {c}: {e}"));
        assert_eq!(got.len(), refs.len(), "{name} case {c}: output count");
        for (k, (g, r)) in got.iter().zip(refs).enumerate() {
            assert_eq!(g.shape(), r.shape(), "{name} case {c} output {k}: shape");
            let (gv, rv) = (g.to_f64_lossy(), r.to_f64_lossy());
            let err = gv.iter().zip(&rv).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            max_abs = max_abs.max(err);
            if m.tolerance.argmax && k == 0 {
                let width = r.shape().last().copied().unwrap_or(1).max(1);
                for (a, b) in gv.chunks(width).zip(rv.chunks(width)) {
                    rows += 1;
                    agree += (argmax(a) == argmax(b)) as usize;
                }
            }
        }
    }
    let top1 = if rows == 0 { 1.0 } else { agree as f64 / rows as f64 };
    eprintln!(
        "{name} ({}): {} cases, max |fedge - onnxruntime| = {max_abs:.3e} (tolerance {:.1e}), top-1 agreement {:.2}%",
        m.quantization.format,
        cases.len(),
        m.tolerance.max_abs,
        top1 * 100.0
    );
    assert!(max_abs <= m.tolerance.max_abs, "{name}: max abs error {max_abs:.3e} above {}", m.tolerance.max_abs);
    let need = m.tolerance.min_top1.unwrap_or(1.0);
    assert!(top1 >= need, "{name}: top-1 agreement {:.2}% below {:.2}%", top1 * 100.0, need * 100.0);
    Some(Outcome { cases: cases.len(), max_abs, top1_agree: top1 })
}
