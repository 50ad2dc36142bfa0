//! On-device training end to end: digits accuracy, determinism, ONNX export run by fedge and by
//! onnxruntime, and federated averaging over Dirichlet shards.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedge_runtime::train::{self, Head, OUTPUT_NAME, TrainConfig, data, data::Dataset};
use fedge_runtime::{Model, ModelOptions, Tensor};
use prost::Message;
use tract_onnx::pb;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The digits set split 80/20, stratified, seed 7.
fn digits() -> (Dataset, Dataset) {
    let all = data::load_digits(repo().join(data::DIGITS_PATH)).expect("digits");
    assert_eq!((all.len(), all.features, all.classes), (1797, 64, 10));
    data::train_test_split(&all, 0.2, 7).expect("split")
}

fn softmax_config() -> TrainConfig {
    TrainConfig {
        epochs: 20,
        batch_size: 32,
        learning_rate: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
        proximal_mu: 0.0,
        seed: 1,
    }
}

fn mlp_config() -> TrainConfig {
    TrainConfig {
        epochs: 30,
        learning_rate: 0.05,
        ..softmax_config()
    }
}

fn trained(mut head: Head, cfg: &TrainConfig, set: &Dataset) -> (Head, train::TrainReport) {
    let report = train::train(&mut head, &set.x, &set.y, cfg, None).expect("train");
    (head, report)
}

fn test_accuracy(head: &Head, test: &Dataset) -> f32 {
    head.loss_and_accuracy(&test.x, &test.y)
        .expect("evaluate")
        .accuracy
}

#[test]
fn softmax_head_learns_digits_past_90_percent() {
    let (train_set, test_set) = digits();
    let (head, report) = trained(Head::softmax(64, 10), &softmax_config(), &train_set);
    let acc = test_accuracy(&head, &test_set);
    println!(
        "softmax: train loss {:.4}, train accuracy {:.4}, test accuracy {acc:.4} ({} test rows, {} steps)",
        report.loss,
        report.accuracy,
        test_set.len(),
        report.steps
    );
    assert_eq!(report.samples, train_set.len());
    assert!(acc > 0.90, "test accuracy {acc}");
}

#[test]
fn mlp_head_learns_digits_past_93_percent() {
    let (train_set, test_set) = digits();
    let (head, report) = trained(Head::mlp(64, 32, 10, 3), &mlp_config(), &train_set);
    let acc = test_accuracy(&head, &test_set);
    println!(
        "mlp(32): train loss {:.4}, train accuracy {:.4}, test accuracy {acc:.4} ({} test rows, {} steps)",
        report.loss,
        report.accuracy,
        test_set.len(),
        report.steps
    );
    assert!(acc > 0.93, "test accuracy {acc}");
}

#[test]
fn digits_training_is_bit_identical_across_runs() {
    let (train_set, _) = digits();
    let cfg = TrainConfig {
        epochs: 3,
        proximal_mu: 0.01,
        ..mlp_config()
    };
    let a = trained(Head::mlp(64, 16, 10, 5), &cfg, &train_set);
    let b = trained(Head::mlp(64, 16, 10, 5), &cfg, &train_set);
    assert_eq!(a, b);
    let other_seed = TrainConfig { seed: 2, ..cfg };
    assert_ne!(
        trained(Head::mlp(64, 16, 10, 5), &other_seed, &train_set).0,
        a.0
    );
}

/// Runs `onnx` in fedge on `x` (`rows × features`) and returns the probabilities.
fn run_in_fedge(onnx: &[u8], shape: &[usize], x: &[f32]) -> Vec<f32> {
    let model = Model::from_bytes(onnx, &ModelOptions::default()).expect("load");
    assert_eq!(model.output_names(), [OUTPUT_NAME]);
    let out = model
        .run(&[Tensor::new(shape, x).expect("tensor")])
        .expect("run");
    out[0].as_f32().expect("f32")
}

fn argmax_rows(p: &[f32], classes: usize) -> Vec<usize> {
    p.chunks(classes)
        .map(|r| (0..classes).fold(0, |best, k| if r[k] > r[best] { k } else { best }))
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst <= tol, "max abs difference {worst} > {tol}");
}

#[test]
fn exported_heads_run_in_fedge_with_the_rust_predictions() {
    let (train_set, test_set) = digits();
    let short = TrainConfig {
        epochs: 2,
        ..softmax_config()
    };
    for head in [Head::softmax(64, 10), Head::mlp(64, 32, 10, 3)] {
        let (head, _) = trained(head, &short, &train_set);
        let onnx = train::export_onnx(&head, None, None).expect("export");
        let n = test_set.len();
        let got = run_in_fedge(&onnx, &[n, 64], &test_set.x);
        let want = head.probabilities(&test_set.x, n).expect("probabilities");
        assert_close(&got, &want, 1e-5);
        let predicted: Vec<usize> = head
            .predict(&test_set.x, n)
            .expect("predict")
            .into_iter()
            .map(|c| c as usize)
            .collect();
        assert_eq!(argmax_rows(&got, 10), predicted, "{:?}", head.kind());
        // The symbolic batch dimension takes any row count.
        assert_eq!(run_in_fedge(&onnx, &[1, 64], test_set.row(0)).len(), 10);
    }
}

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = |d: i64| Dimension {
        value: Some(if d < 0 {
            Value::DimParam("batch".into())
        } else {
            Value::DimValue(d)
        }),
        ..Default::default()
    };
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims.iter().map(|&d| dim(d)).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: 1,
        dims: dims.to_vec(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// A frozen "backbone": `features = relu(pixels · W)` (`[batch, 64] → [batch, 12]`), then a
/// classifier to cut off (`logits`), with tensor names the head would pick (`head.fc1.weight`,
/// `probabilities`) to force renaming. `output` picks the graph output.
fn backbone(output: &str) -> Vec<u8> {
    let w: Vec<f32> = (0..64 * 12)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.45) * 0.5)
        .collect();
    let graph = pb::GraphProto {
        name: "backbone".into(),
        node: vec![
            node("MatMul", &["pixels", "head.fc1.weight"], "probabilities"),
            node("Relu", &["probabilities"], "features"),
            node("MatMul", &["features", "classifier.w"], "logits"),
        ],
        initializer: vec![
            f32_init("head.fc1.weight", &[64, 12], &w),
            f32_init("classifier.w", &[12, 3], &[0.1; 36]),
        ],
        input: vec![value_info("pixels", &[-1, 64])],
        output: vec![value_info(
            output,
            &[-1, if output == "logits" { 3 } else { 12 }],
        )],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A head trained on the backbone's features of the digits train split.
fn head_on_backbone(train_set: &Dataset) -> Head {
    let features = run_features(&backbone("features"), train_set);
    let set = Dataset::new(features, train_set.y.clone(), 12, 10).expect("features");
    let cfg = TrainConfig {
        epochs: 3,
        ..mlp_config()
    };
    trained(Head::mlp(12, 8, 10, 1), &cfg, &set).0
}

fn run_features(backbone: &[u8], set: &Dataset) -> Vec<f32> {
    let model = Model::from_bytes(backbone, &ModelOptions::default()).expect("backbone");
    let x = Tensor::new(&[set.len(), 64], &set.x).expect("tensor");
    model.run(&[x]).expect("run")[0].as_f32().expect("f32")
}

#[test]
fn backbone_and_head_export_as_one_model() {
    let (train_set, test_set) = digits();
    let head = head_on_backbone(&train_set);
    let onnx =
        train::export_onnx(&head, Some(&backbone("logits")), Some("features")).expect("export");
    let graph = pb::ModelProto::decode(onnx.as_slice())
        .expect("onnx")
        .graph
        .expect("graph");
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        [
            "MatMul", "Relu", "Flatten", "Gemm", "Relu", "Gemm", "Softmax"
        ]
    );
    assert!(
        !graph.initializer.iter().any(|t| t.name == "classifier.w"),
        "classifier cut off"
    );

    let n = test_set.len();
    let got = run_in_fedge(&onnx, &[n, 64], &test_set.x);
    let features = run_features(&backbone("features"), &test_set);
    let want = head.probabilities(&features, n).expect("probabilities");
    assert_close(&got, &want, 1e-5);

    // Named by default when it is the backbone's only output.
    let only = train::export_onnx(&head, Some(&backbone("features")), None).expect("export");
    assert_close(&run_in_fedge(&only, &[n, 64], &test_set.x), &want, 1e-5);
    // A head of the wrong width is refused.
    let wide = Head::softmax(13, 10);
    assert!(train::export_onnx(&wide, Some(&backbone("features")), None).is_err());
    assert!(train::export_onnx(&head, Some(&backbone("logits")), Some("nope")).is_err());
}

/// Runs `tools/scripts/train_reference.py` on `onnx` with inputs `x` and fedge's probabilities.
fn check_with_onnxruntime(label: &str, onnx: &[u8], x: &Tensor, want: &Tensor) {
    let python = repo().join(".cache/venv/bin/python");
    if !python.exists() {
        println!(
            "SKIPPED onnxruntime check ({label}): no {} (run tools/scripts/venv.sh)",
            python.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("fedge-train-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (model, xs, ws) = (
        dir.join("model.onnx"),
        dir.join("x.npy"),
        dir.join("want.npy"),
    );
    std::fs::write(&model, onnx).expect("write model");
    fedge_runtime::npy::write(&xs, x).expect("write x");
    fedge_runtime::npy::write(&ws, want).expect("write want");
    let out = Command::new(&python)
        .arg(repo().join("tools/scripts/train_reference.py"))
        .args([&model, &xs, &ws])
        .args(["--atol", "1e-5"])
        .output()
        .expect("run python");
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("onnxruntime ({label}): {}", stdout.trim());
    assert!(
        out.status.success(),
        "{label}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exported_models_match_onnxruntime() {
    let (train_set, test_set) = digits();
    let n = test_set.len();
    let x = Tensor::new(&[n, 64], &test_set.x).expect("x");
    let softmax = trained(Head::softmax(64, 10), &softmax_config(), &train_set).0;
    let mlp = trained(Head::mlp(64, 32, 10, 3), &mlp_config(), &train_set).0;
    for (label, head) in [("softmax", softmax), ("mlp", mlp)] {
        let onnx = train::export_onnx(&head, None, None).expect("export");
        let want = head.probabilities(&test_set.x, n).expect("probabilities");
        check_with_onnxruntime(
            label,
            &onnx,
            &x,
            &Tensor::new(&[n, 10], &want).expect("want"),
        );
    }
    let head = head_on_backbone(&train_set);
    let onnx =
        train::export_onnx(&head, Some(&backbone("logits")), Some("features")).expect("export");
    let features = run_features(&backbone("features"), &test_set);
    let want = head.probabilities(&features, n).expect("probabilities");
    check_with_onnxruntime(
        "backbone",
        &onnx,
        &x,
        &Tensor::new(&[n, 10], &want).expect("want"),
    );
}

#[test]
fn dirichlet_shards_of_digits_give_every_device_data() {
    let (train_set, _) = digits();
    let shards = data::dirichlet_shards(&train_set, 10, 0.5, 10, 42).expect("shards");
    assert_eq!(
        shards.iter().map(Dataset::len).sum::<usize>(),
        train_set.len()
    );
    assert!(shards.iter().all(|s| s.len() >= 10));
    let classes_held: Vec<usize> = shards
        .iter()
        .map(|s| s.class_counts().iter().filter(|&&c| c > 0).count())
        .collect();
    println!(
        "rows per device: {:?}",
        shards.iter().map(Dataset::len).collect::<Vec<_>>()
    );
    println!("classes per device: {classes_held:?}");
    assert!(
        classes_held.iter().any(|&c| c < 10),
        "α = 0.5 should skew labels"
    );
}

#[test]
fn fedprox_rounds_over_dirichlet_shards_learn_digits() {
    let (train_set, test_set) = digits();
    let shards = data::dirichlet_shards(&train_set, 10, 0.5, 10, 42).expect("shards");
    const ROUNDS: u64 = 20;
    let mut global = Head::softmax(64, 10);
    let cfg = TrainConfig {
        epochs: 2,
        proximal_mu: 0.01,
        ..softmax_config()
    };
    for round in 0..ROUNDS {
        let mut sum = vec![0.0f64; global.param_count()];
        let mut weight = 0usize;
        for (device, shard) in shards.iter().enumerate() {
            let mut local = global.clone();
            let local_cfg = TrainConfig {
                seed: round * 100 + device as u64,
                ..cfg.clone()
            };
            let report = train::train(&mut local, &shard.x, &shard.y, &local_cfg, None)
                .expect("local training");
            for (s, &p) in sum.iter_mut().zip(local.params()) {
                *s += f64::from(p) * report.samples as f64;
            }
            weight += report.samples;
        }
        let averaged: Vec<f32> = sum.iter().map(|s| (s / weight as f64) as f32).collect();
        global.set_params(&averaged).expect("aggregate");
    }
    let acc = test_accuracy(&global, &test_set);
    println!(
        "FedProx (μ = 0.01), 10 devices, Dirichlet(0.5), {ROUNDS} rounds of 2 local epochs: \
         test accuracy {acc:.4}"
    );
    assert!(acc > 0.88, "test accuracy {acc}");
}
