//! Zoo checks: a model against onnxruntime's reference outputs, within its manifest's tolerance.

use fedge_runtime::manifest::{Manifest, compare};
use fedge_runtime::{Model, ModelOptions};
use sha2::Digest;

use crate::{repo_root, skip};

pub fn manifest(name: &str) -> Manifest {
    Manifest::read(repo_root().join("models/zoo").join(name)).expect("manifest")
}

/// What a zoo check measured.
#[derive(Debug)]
pub struct Outcome {
    pub cases: usize,
    pub max_abs: f64,
    pub top1_agree: f64,
    /// The largest per-case mean absolute error of the first output.
    pub mean_abs: f64,
    /// The backend's node placement (GPU backend).
    pub placement: Option<fedge_runtime::Placement>,
    /// `Model::describe` after the runs.
    pub describe: Vec<String>,
}

/// Loads a zoo model with `opts` (default: the manifest's shapes) and compares every reference
/// case with onnxruntime's outputs; `None` when the model or its references are not on disk.
pub fn check(name: &str, opts: Option<ModelOptions>) -> Option<Outcome> {
    let m = manifest(name);
    let model_path = m.model_path();
    if !model_path.exists() {
        skip(
            name,
            &format!(
                "{} absent: run `bash tools/scripts/build_zoo.sh`",
                model_path.display()
            ),
        );
        return None;
    }
    let Some(refs) = m.references_path(false) else {
        skip(
            name,
            "reference outputs absent: run `bash tools/scripts/build_zoo.sh`",
        );
        return None;
    };
    let bytes = std::fs::read(&model_path).expect("model");
    let digest: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest, m.sha256,
        "{name}: model.onnx does not match the manifest's sha256"
    );
    let model = Model::from_bytes(&bytes, &opts.unwrap_or_else(|| m.options()))
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let cases = Manifest::cases(&refs).expect("references");
    assert!(
        !cases.is_empty(),
        "{name}: no reference cases in {}",
        refs.display()
    );
    let (mut max_abs, mut mean_abs, mut agree, mut rows) = (0f64, 0f64, 0usize, 0usize);
    for (c, (ins, want)) in cases.iter().enumerate() {
        let got = model
            .run(ins)
            .unwrap_or_else(|e| panic!("{name} case {c}: {e}"));
        assert_eq!(got.len(), want.len(), "{name} case {c}: output count");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.shape(), w.shape(), "{name} case {c} output {k}: shape");
            let (err, a, r) = compare(g, w);
            max_abs = max_abs.max(err);
            if k == 0 {
                let (g, w) = (g.to_f64_lossy(), w.to_f64_lossy());
                let sum: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum();
                mean_abs = mean_abs.max(sum / w.len().max(1) as f64);
            }
            if m.tolerance.argmax && k == 0 {
                agree += a;
                rows += r;
            }
        }
    }
    let top1 = if rows == 0 {
        1.0
    } else {
        agree as f64 / rows as f64
    };
    eprintln!(
        "{name} ({}): {} cases, max |fedge - onnxruntime| = {max_abs:.3e} (tolerance {:.1e}), mean {mean_abs:.3e}{}, top-1 agreement {:.2}%",
        m.quantization.format,
        cases.len(),
        m.tolerance.max_abs,
        m.tolerance
            .mean_abs
            .map_or(String::new(), |t| format!(" (tolerance {t:.1e})")),
        top1 * 100.0
    );
    if let Some(t) = m.tolerance.mean_abs {
        assert!(
            mean_abs <= t,
            "{name}: mean abs error {mean_abs:.3e} above {t}"
        );
    }
    assert!(
        max_abs <= m.tolerance.max_abs,
        "{name}: max abs error {max_abs:.3e} above {}",
        m.tolerance.max_abs
    );
    let need = m.tolerance.min_top1.unwrap_or(1.0);
    assert!(
        top1 >= need,
        "{name}: top-1 agreement {:.2}% below {:.2}%",
        top1 * 100.0,
        need * 100.0
    );
    Some(Outcome {
        cases: cases.len(),
        max_abs,
        top1_agree: top1,
        mean_abs,
        placement: model.placement(),
        describe: model.describe(),
    })
}
