//! ONNX backend node-test conformance of the CPU and GPU backends.
//!
//! One trial per case directory of `.cache/onnx-node` (fetched by
//! `tools/scripts/fetch_onnx_node_tests.sh`), named `cpu::<case>`. Cases listed in
//! `tests/conformance/cpu.allow` run normally; the others are ignored, so
//! `cargo test --workspace --profile ci --test conformance -- --ignored` shows what newly
//! passes. See `tests/conformance/README.md`.
//!
//! Each case: the model is loaded with its integer inputs (int64/int32: shapes, axes, indices,
//! ...) baked in as constants and every other input given its concrete test shape; only when
//! that cannot load or run are the inputs after the first baked too (scales, zero points, pads,
//! norm parameters: constants in real models; tract's own harness does the same). It runs on
//! `test_data_set_0/input_*.pb` and each output must match `output_*.pb`: same dtype and
//! shape, floats within `|a - b| <= ATOL + RTOL * |b|` (float16: `ATOL_F16`, `RTOL_F16`; NaN
//! matches NaN, infinities must be equal), integers and bools exactly.
//!
//! The GPU backend gets a trial per case too, `gpu::<case>`, with its own allow-list
//! `tests/conformance/gpu.allow`: the same comparison, and at least one node must run on the GPU
//! (a case the backend handed wholly to the CPU fails); a case marked `# all-on-gpu` there must
//! run every node on the GPU, so each kernel is proven on its own node tests. Without a GPU
//! adapter (no Vulkan, Metal, DX12 or GL driver; CI installs Mesa's lavapipe) every GPU trial
//! is ignored, with the reason printed.
//!
//! `FEDGE_CONFORMANCE_REPORT=<file>` writes one `case<TAB>status<TAB>reason` line per trial run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fedge_runtime::{DType, Graph, Model, ModelOptions, Tensor};
use libtest_mimic::{Arguments, Failed, Trial};

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-4;
/// float16 outputs: a float16 ulp is ~1e-3 relative, so rtol 1e-3 is under one rounding step;
/// four ulps are allowed (fp16 graphs accumulate in a different order than numpy's float32).
const RTOL_F16: f64 = 4e-3;
const ATOL_F16: f64 = 1e-3;

type Report = Arc<Mutex<Vec<(String, &'static str, String)>>>;

fn repo_root() -> PathBuf {
    fedge_tests::repo_root()
}

fn read_allow(path: &Path) -> std::collections::BTreeSet<String> {
    read_allow_tagged(path, None)
}

/// The allow-listed cases, or only those whose comment carries `tag`.
fn read_allow_tagged(path: &Path, tag: Option<&str>) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| tag.is_none_or(|t| l.split_once('#').is_some_and(|(_, c)| c.contains(t))))
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `dir/<prefix>_<n>.pb` for n = 0, 1, ... while they exist, decoded.
fn load_pbs(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    let mut out = Vec::new();
    for n in 0.. {
        let p = dir.join(format!("{prefix}_{n}.pb"));
        if !p.exists() {
            break;
        }
        let bytes = std::fs::read(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
        let t = fedge_runtime::decode_tensor_proto(&bytes)
            .map_err(|e| format!("decode {prefix}_{n}.pb: {}: {e}", what_is(&bytes)))?;
        out.push(t);
    }
    Ok(out)
}

/// Which graph inputs are baked into the model as constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bake {
    /// Integer inputs (int64/int32: shapes, axes, indices, pads, ...); the rest is fed.
    Ints,
    /// Also every input after the first (scales, zero points, weights, norm parameters, ...),
    /// as tract's own harness does with `input:<first>`; only the first input is fed.
    AllButFirst,
}

impl Bake {
    fn name(self) -> &'static str {
        match self {
            Bake::Ints => "ints",
            Bake::AllButFirst => "all-but-first",
        }
    }

    fn bakes(self, index: usize, t: &Tensor) -> bool {
        matches!(t.dtype(), DType::I64 | DType::I32) || (self == Bake::AllButFirst && index > 0)
    }
}

/// Loads the case's model with `bake` and runs it; `Ok(outputs)` or the load/run error.
fn load_and_run(
    bytes: &[u8],
    graph: &Graph,
    inputs: &[Tensor],
    bake: Bake,
    backend: &str,
    all_on_gpu: bool,
) -> Result<(Vec<Tensor>, Vec<String>, usize), String> {
    let mut opts = ModelOptions::default()
        .allow_non_finite(true)
        .backend(backend);
    let mut fed = Vec::new();
    for (k, (info, t)) in graph.inputs().iter().zip(inputs).enumerate() {
        if bake.bakes(k, t) {
            opts = opts.constant(info.name.clone(), t.clone());
        } else {
            opts = opts.input_shape(info.name.clone(), t.shape());
            fed.push(t.clone());
        }
    }
    let model = Model::from_bytes(bytes, &opts).map_err(|e| format!("load: {e}"))?;
    let got = model.run(&fed).map_err(|e| format!("run: {e}"))?;
    let mut on_cpu = 0;
    if backend == "gpu" {
        let p = model.placement().unwrap_or_default();
        if p.nodes == 0 {
            return Err(format!(
                "no node ran on the GPU ({} handed to the CPU): {}",
                p.fallback,
                model.describe().join("; ")
            ));
        }
        if all_on_gpu && p.fallback > 0 {
            return Err(format!(
                "{} node(s) ran on the CPU, but gpu.allow marks the case all-on-gpu: {}",
                p.fallback,
                model.describe().join("; ")
            ));
        }
        on_cpu = p.fallback;
    }
    Ok((got, model.output_names().to_vec(), on_cpu))
}

/// Names what an undecodable `.pb` holds: a tensor of an element type fedge has no host type
/// for, or something else (a sequence, optional or map value).
fn what_is(pb: &[u8]) -> String {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    // Top-level fields; TensorProto's data_type is field 2 (a varint). SequenceProto and
    // OptionalProto also have a varint field 2 (elem_type), but with values below 16.
    let mut at = 0;
    let mut data_type = None;
    while at < pb.len() {
        let Some(key) = varint(pb, &mut at) else {
            break;
        };
        let skip = match key & 7 {
            0 => {
                let Some(v) = varint(pb, &mut at) else { break };
                if key >> 3 == 2 {
                    data_type = Some(v);
                }
                0
            }
            1 => 8,
            2 => varint(pb, &mut at).unwrap_or(u64::MAX) as usize,
            5 => 4,
            _ => break,
        };
        at = at.saturating_add(skip);
    }
    let name = match data_type {
        Some(8) => "string",
        Some(14) => "complex64",
        Some(15) => "complex128",
        Some(16) => "bfloat16",
        Some(17) => "float8e4m3fn",
        Some(18) => "float8e4m3fnuz",
        Some(19) => "float8e5m2",
        Some(20) => "float8e5m2fnuz",
        Some(21) => "uint4",
        Some(22) => "int4",
        Some(23) => "float4e2m1",
        Some(24) => "float8e8m0",
        Some(25) => "uint2",
        Some(26) => "int2",
        _ => return "not a TensorProto (sequence/optional/map value)".into(),
    };
    format!("tensor of unsupported dtype {name}")
}

/// Runs one case; `Ok(how its inputs were baked)` when every output matches.
/// Runs one case; on success, the report line's reason (`baked: ...`, and on the GPU how many
/// nodes ran on the CPU).
fn run_case(dir: &Path, backend: &str, all_on_gpu: bool) -> Result<String, String> {
    let bytes =
        std::fs::read(dir.join("model.onnx")).map_err(|e| format!("read model.onnx: {e}"))?;
    let data = dir.join("test_data_set_0");
    let inputs = load_pbs(&data, "input")?;
    let expected = load_pbs(&data, "output")?;

    let graph =
        Graph::import(&bytes, &ModelOptions::default()).map_err(|e| format!("load: {e}"))?;
    if graph.inputs().len() != inputs.len() {
        return Err(format!(
            "model declares {} inputs, test data has {}",
            graph.inputs().len(),
            inputs.len()
        ));
    }
    // Integer inputs baked first; when that cannot load or run (tract wants constant scales,
    // pads, norm parameters, ...), the parameters after the first input are baked as well.
    let mut errors = Vec::new();
    let mut result = None;
    for bake in [Bake::Ints, Bake::AllButFirst] {
        if bake == Bake::AllButFirst
            && !inputs
                .iter()
                .enumerate()
                .any(|(k, t)| bake.bakes(k, t) && !Bake::Ints.bakes(k, t))
        {
            break;
        }
        match load_and_run(&bytes, &graph, &inputs, bake, backend, all_on_gpu) {
            Ok(r) => {
                result = Some((bake, r));
                break;
            }
            Err(e) => errors.push(format!("[baked {}] {e}", bake.name())),
        }
    }
    let Some((bake, (got, names, on_cpu))) = result else {
        return Err(errors.join(" / "));
    };
    if got.len() != expected.len() {
        return Err(format!(
            "{} outputs, expected {}",
            got.len(),
            expected.len()
        ));
    }
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        let name = names.get(k).map_or("?", String::as_str);
        compare(g, e)
            .map_err(|why| format!("output {k} ({name}), inputs baked: {}: {why}", bake.name()))?;
    }
    Ok(if backend == "gpu" {
        format!("baked: {}; cpu nodes: {on_cpu}", bake.name())
    } else {
        format!("baked: {}", bake.name())
    })
}

fn compare(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!(
            "dtype mismatch: got {}, expected {}",
            got.dtype(),
            want.dtype()
        ));
    }
    if got.shape() != want.shape() {
        return Err(format!(
            "shape mismatch: got {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let (g, w) = (got.to_f64_lossy(), want.to_f64_lossy());
    if want.dtype().is_float() {
        let (rtol, atol) = if want.dtype() == DType::F16 {
            (RTOL_F16, ATOL_F16)
        } else {
            (RTOL, ATOL)
        };
        let mut worst: Option<(usize, f64)> = None;
        for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
            let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs();
            if !ok {
                let err = if (a - b).is_nan() {
                    f64::INFINITY
                } else {
                    (a - b).abs()
                };
                if worst.is_none_or(|(_, e)| err > e) {
                    worst = Some((i, err));
                }
            }
        }
        if let Some((i, err)) = worst {
            let bad = g
                .iter()
                .zip(&w)
                .filter(|&(&a, &b)| {
                    !((a.is_nan() && b.is_nan())
                        || a == b
                        || (a - b).abs() <= atol + rtol * b.abs())
                })
                .count();
            return Err(format!(
                "output mismatch: {bad}/{} values out of tolerance (rtol {rtol}, atol {atol}); \
                 max error {err:e} at flat index {i}: got {}, expected {}",
                g.len(),
                g[i],
                w[i]
            ));
        }
    } else if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
        let bad = g.iter().zip(&w).filter(|(a, b)| a != b).count();
        return Err(format!(
            "output mismatch: {bad}/{} values differ; first at flat index {i}: got {}, expected {}",
            g.len(),
            g[i],
            w[i]
        ));
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let root = repo_root();
    let cases_dir = root.join(".cache/onnx-node");
    if !cases_dir.is_dir() {
        println!(
            "SKIPPED conformance: .cache/onnx-node absent: run bash tools/scripts/fetch_onnx_node_tests.sh"
        );
        return;
    }
    let allow = read_allow(&root.join("tests/conformance/cpu.allow"));
    let gpu_allow = read_allow(&root.join("tests/conformance/gpu.allow"));
    let all_on_gpu = Arc::new(read_allow_tagged(
        &root.join("tests/conformance/gpu.allow"),
        Some("all-on-gpu"),
    ));
    let gpu = fedge_runtime::gpu::adapter();
    match &gpu {
        Ok(a) => println!(
            "conformance gpu: adapter {} ({}, {}{})",
            a.name,
            a.api,
            a.kind,
            if a.software { ", software" } else { "" }
        ),
        Err(e) => println!("SKIPPED conformance gpu (trials ignored): {e}"),
    }
    let mut cases: Vec<(String, PathBuf)> = std::fs::read_dir(&cases_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("model.onnx").is_file())
                .filter_map(|p| Some((p.file_name()?.to_str()?.to_owned(), p)))
                .collect()
        })
        .unwrap_or_default();
    cases.sort();
    let total = cases.len();
    for name in allow
        .iter()
        .chain(&gpu_allow)
        .filter(|n| !cases.iter().any(|(c, _)| c == *n))
    {
        eprintln!("conformance: allow-listed case {name} not found in .cache/onnx-node");
    }

    let report: Report = Arc::default();
    let trial = |backend: &'static str, name: &str, dir: &Path, ignored: bool| {
        let report = report.clone();
        let case = format!("{backend}::{name}");
        let dir = dir.to_path_buf();
        let strict = backend == "gpu" && all_on_gpu.contains(name);
        Trial::test(case.clone(), move || {
            let r = run_case(&dir, backend, strict);
            if let Ok(mut rep) = report.lock() {
                match &r {
                    Ok(how) => rep.push((case, "pass", how.clone())),
                    Err(e) => rep.push((case, "fail", e.replace(['\n', '\t'], " "))),
                }
            }
            r.map(drop).map_err(Failed::from)
        })
        .with_ignored_flag(ignored)
    };
    let mut trials: Vec<Trial> = cases
        .iter()
        .map(|(name, dir)| trial("cpu", name, dir, !allow.contains(name)))
        .collect();
    trials.extend(
        cases
            .iter()
            .map(|(name, dir)| trial("gpu", name, dir, gpu.is_err() || !gpu_allow.contains(name))),
    );

    let conclusion = libtest_mimic::run(&args, trials);
    println!(
        "conformance: {} passed, {} failed, {} ignored of {} trials ({total} cases on cpu and gpu; {} cpu and {} gpu allow-listed)",
        conclusion.num_passed,
        conclusion.num_failed,
        conclusion.num_ignored,
        2 * total,
        allow.len(),
        gpu_allow.len()
    );
    if let Ok(path) = std::env::var("FEDGE_CONFORMANCE_REPORT")
        && let Ok(mut rep) = report.lock()
    {
        rep.sort();
        let text: String = rep
            .iter()
            .map(|(c, s, r)| format!("{c}\t{s}\t{r}\n"))
            .collect();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("conformance: cannot write {path}: {e}");
        }
    }
    conclusion.exit();
}
