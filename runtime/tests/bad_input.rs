//! Bad input is a typed error with a clear message, never a panic.

use fedge_runtime::{Model, ModelOptions, RuntimeError, Tensor};
use prost::Message;
use tract_onnx::pb;

fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `y = a + b` over float32 [2, 3], or with `ops` replacing Add by a chain of the named ops.
fn model_bytes(ops: &[&str]) -> Vec<u8> {
    let mut nodes = Vec::new();
    let mut prev = "a".to_string();
    for (i, op) in ops.iter().enumerate() {
        let out = if i + 1 == ops.len() {
            "y".to_string()
        } else {
            format!("t{i}")
        };
        nodes.push(pb::NodeProto {
            op_type: op.to_string(),
            input: vec![prev.clone(), "b".into()],
            output: vec![out.clone()],
            name: format!("n{i}"),
            ..Default::default()
        });
        prev = out;
    }
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: nodes,
            input: vec![value_info("a", 1, &[2, 3]), value_info("b", 1, &[2, 3])],
            output: vec![value_info("y", 1, &[2, 3])],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

fn add_model() -> Model {
    Model::from_bytes(&model_bytes(&["Add"]), &ModelOptions::default()).expect("add model loads")
}

fn t(shape: &[usize], v: f32) -> Tensor {
    Tensor::new(shape, &vec![v; shape.iter().product()]).expect("tensor")
}

#[test]
fn a_valid_tiny_model_runs() {
    let out = add_model()
        .run(&[t(&[2, 3], 1.0), t(&[2, 3], 2.0)])
        .expect("runs");
    assert_eq!(out[0].as_f32(), Some(vec![3.0; 6]));
}

#[test]
fn empty_file_is_rejected() {
    let err = Model::from_bytes(&[], &ModelOptions::default()).expect_err("empty");
    assert!(matches!(err, RuntimeError::EmptyModel), "{err}");
}

#[test]
fn random_bytes_are_not_onnx() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let err = Model::from_bytes(&bytes, &ModelOptions::default()).expect_err("random");
    assert!(matches!(err, RuntimeError::NotOnnx(_)), "{err}");
}

#[test]
fn truncated_models_are_rejected_at_every_cut() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/zoo/ppocr_cls/model.onnx"
    );
    let bytes = std::fs::read(path).expect("committed zoo model");
    for cut in [1, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        let err =
            Model::from_bytes(&bytes[..cut], &ModelOptions::default()).expect_err("truncated");
        assert!(
            matches!(
                err,
                RuntimeError::NotOnnx(_) | RuntimeError::InvalidModel(_) | RuntimeError::Backend(_)
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn every_unknown_op_is_named_at_once() {
    let err = Model::from_bytes(
        &model_bytes(&["Add", "FrobnicateX", "Sub", "WarpDriveY"]),
        &ModelOptions::default(),
    )
    .expect_err("unknown ops");
    match &err {
        RuntimeError::UnsupportedOps(ops) => {
            assert_eq!(
                ops,
                &[
                    "FrobnicateX (ai.onnx)".to_string(),
                    "WarpDriveY (ai.onnx)".to_string()
                ]
            );
        }
        other => panic!("expected UnsupportedOps, got {other}"),
    }
    assert!(err.to_string().contains("FrobnicateX") && err.to_string().contains("WarpDriveY"));
}

#[test]
fn a_missing_file_is_an_io_error() {
    let err =
        Model::load("/nonexistent/model.onnx", &ModelOptions::default()).expect_err("missing");
    assert!(matches!(err, RuntimeError::Io { .. }), "{err}");
}

#[test]
fn wrong_input_count_is_rejected() {
    let err = add_model().run(&[t(&[2, 3], 1.0)]).expect_err("one input");
    assert!(
        matches!(
            err,
            RuntimeError::InputCount {
                expected: 2,
                got: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_rejected() {
    let err = add_model()
        .run(&[t(&[2, 3], 1.0), t(&[3, 2], 1.0)])
        .expect_err("shape");
    assert!(
        matches!(&err, RuntimeError::InputShape { name, .. } if name == "b"),
        "{err}"
    );
    assert!(err.to_string().contains("[2, 3]"), "{err}");
}

#[test]
fn wrong_dtype_is_rejected() {
    let ints = Tensor::new(&[2, 3], &[1i64; 6]).expect("tensor");
    let err = add_model()
        .run(&[t(&[2, 3], 1.0), ints])
        .expect_err("dtype");
    assert!(
        matches!(&err, RuntimeError::InputDtype { expected, got, .. } if expected == "float32" && got == "int64"),
        "{err}"
    );
}

#[test]
fn non_finite_input_is_rejected_unless_allowed() {
    let mut v = vec![1.0f32; 6];
    v[4] = f32::NAN;
    let nan = Tensor::new(&[2, 3], &v).expect("tensor");
    let err = add_model()
        .run(&[t(&[2, 3], 1.0), nan.clone()])
        .expect_err("nan");
    assert!(
        matches!(
            &err,
            RuntimeError::NonFinite {
                count: 1,
                first: 4,
                ..
            }
        ),
        "{err}"
    );
    let lenient = Model::from_bytes(
        &model_bytes(&["Add"]),
        &ModelOptions::default().allow_non_finite(true),
    )
    .expect("loads");
    let out = lenient.run(&[t(&[2, 3], 1.0), nan]).expect("runs");
    assert!(out[0].as_f32().expect("f32")[4].is_nan());
}

#[test]
fn unknown_backend_and_unavailable_gpu_are_errors() {
    let bytes = model_bytes(&["Add"]);
    let err = Model::from_bytes(&bytes, &ModelOptions::default().backend("tpu")).expect_err("tpu");
    assert!(matches!(err, RuntimeError::UnknownBackend(_)), "{err}");
    let gpu = Model::from_bytes(&bytes, &ModelOptions::default().backend("gpu"));
    #[cfg(feature = "gpu")]
    let adapter = fedge_runtime::gpu::adapter().is_ok();
    #[cfg(not(feature = "gpu"))]
    let adapter = false;
    if adapter {
        gpu.expect("the GPU backend loads where an adapter exists");
    } else {
        let err = gpu.expect_err("no GPU backend here");
        assert!(
            matches!(err, RuntimeError::BackendUnavailable { .. }),
            "{err}"
        );
    }
}

#[test]
fn run_named_rejects_unknown_names() {
    let err = add_model()
        .run_named(&[
            ("a".into(), t(&[2, 3], 1.0)),
            ("zzz".into(), t(&[2, 3], 1.0)),
        ])
        .expect_err("unknown");
    assert!(matches!(err, RuntimeError::UnknownInput(n) if n == "zzz"));
}

/// `y = DequantizeLinear(x, 0.5, zp)` with `x` and `zp` int4 (ONNX type 22), `zp` a packed
/// initializer with `zp_raw` as its data, then `Cast` back to int4.
fn int4_model(zp_raw: Vec<u8>) -> Vec<u8> {
    let node =
        |op: &str, inputs: &[&str], out: &str, attribute: Vec<pb::AttributeProto>| pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            name: out.into(),
            attribute,
            ..Default::default()
        };
    let to = pb::AttributeProto {
        name: "to".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 22,
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 10,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 21,
        }],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("DequantizeLinear", &["x", "s", "zp"], "y", vec![]),
                node("Mul", &["y", "two"], "z", vec![]),
                node("Cast", &["z"], "q", vec![to]),
            ],
            initializer: vec![
                pb::TensorProto {
                    name: "s".into(),
                    data_type: 1,
                    raw_data: 0.5f32.to_le_bytes().to_vec(),
                    ..Default::default()
                },
                pb::TensorProto {
                    name: "two".into(),
                    data_type: 1,
                    raw_data: 2f32.to_le_bytes().to_vec(),
                    ..Default::default()
                },
                pb::TensorProto {
                    name: "zp".into(),
                    data_type: 22,
                    dims: vec![1],
                    raw_data: zp_raw,
                    ..Default::default()
                },
            ],
            input: vec![value_info("x", 22, &[4])],
            output: vec![value_info("y", 1, &[4]), value_info("q", 22, &[4])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn narrow_types_run_widened_and_unreadable_narrow_data_is_an_error() {
    // int4 values travel in i8: x - zp with zp = -2 (0xe), times 0.5; the Cast back wraps.
    let m = Model::from_bytes(&int4_model(vec![0x0e]), &ModelOptions::default()).expect("load");
    let x = Tensor::new(&[4], &[-8i8, -1, 0, 7]).expect("x");
    let out = m.run(&[x]).expect("run");
    assert_eq!(
        out[0].to_vec::<f32>().expect("f32"),
        vec![-3.0, 0.5, 1.0, 4.5]
    );
    assert_eq!(out[1].to_vec::<i8>().expect("i8"), vec![-6, 1, 2, -7]);
    // A wrong dtype for the widened input is the usual typed error.
    let err = m.run(&[t(&[4], 1.0)]).expect_err("f32 for an int4 input");
    assert!(matches!(err, RuntimeError::InputDtype { .. }), "{err}");
    // The zero point's data missing: an error naming what failed, no panic.
    let err = Model::from_bytes(&int4_model(vec![]), &ModelOptions::default())
        .expect_err("zero point without data");
    assert!(
        matches!(&err, RuntimeError::InvalidModel(m) if m.contains("`zp`") && m.contains("22")),
        "{err}"
    );
}
