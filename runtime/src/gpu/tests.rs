//! GPU backend unit tests. Without an adapter each test prints why it is skipped and returns.

use prost::Message;
use tract_onnx::pb;

use super::*;
use crate::{Model, ModelOptions, Tensor};

/// GPU tests share the process's device; they run one at a time so counters are theirs.
static SERIAL: Mutex<()> = Mutex::new(());

fn ctx_or_skip(test: &str) -> Option<Arc<Ctx>> {
    match context() {
        Ok(c) => Some(c),
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
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

fn init(name: &str, dims: &[i64], v: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: v,
        ..Default::default()
    }
}

fn node(op: &str, ins: &[&str], out: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        name: out.into(),
        ..Default::default()
    }
}

/// `n` with an integer attribute.
fn with_int(mut n: pb::NodeProto, name: &str, i: i64) -> pb::NodeProto {
    n.attribute.push(pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    });
    n
}

/// A model of `graph` at opset 17.
fn opset17(graph: pb::GraphProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// `softmax(relu(x · w + b))` then `tanh` and an `Erf`, x: [3, 20], w: [20, 17].
fn mlp_bytes() -> Vec<u8> {
    let w: Vec<f32> = (0..20 * 17)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..17).map(|i| i as f32 / 10.0 - 0.8).collect();
    let model = opset17(pb::GraphProto {
        name: "mlp".into(),
        node: vec![
            node("MatMul", &["x", "w"], "xw"),
            node("Add", &["xw", "b"], "h"),
            node("Relu", &["h"], "r"),
            node("Tanh", &["r"], "t"),
            node("Erf", &["t"], "e"),
            node("Softmax", &["e"], "y"),
        ],
        initializer: vec![init("w", &[20, 17], w), init("b", &[17], b)],
        input: vec![value_info("x", &[3, 20])],
        output: vec![value_info("y", &[3, 17])],
        ..Default::default()
    });
    model.encode_to_vec()
}

fn input() -> Tensor {
    let x: Vec<f32> = (0..60)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
        .collect();
    Tensor::new(&[3, 20], &x).expect("tensor")
}

#[test]
fn every_kernel_compiles_on_the_adapter() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(ctx) = ctx_or_skip("every_kernel_compiles_on_the_adapter") else {
        return;
    };
    for k in kernels::ALL {
        ctx.pipeline(k)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
    }
}

#[test]
fn a_model_matches_the_cpu_and_runs_create_no_pipelines_layouts_or_buffers() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(_ctx) = ctx_or_skip("a_model_matches_the_cpu") else {
        return;
    };
    let bytes = mlp_bytes();
    let cpu = Model::from_bytes(&bytes, &ModelOptions::default()).expect("cpu");
    let gpu = Model::from_bytes(&bytes, &ModelOptions::default().backend("gpu")).expect("gpu");
    assert_eq!(gpu.backend().0, "gpu");
    let describe = gpu.describe().join("\n");
    assert!(
        describe.contains("heavy ops (matmul, conv) on the GPU: 1/1"),
        "{describe}"
    );
    let want = cpu.run(&[input()]).expect("cpu run")[0]
        .as_f32()
        .expect("f32");
    let got = gpu.run(&[input()]).expect("gpu run")[0]
        .as_f32()
        .expect("f32");
    let err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-5, "max error {err}");
    let before = counters().expect("counters");
    for _ in 0..3 {
        gpu.run(&[input()]).expect("gpu run");
    }
    let after = counters().expect("counters");
    assert_eq!(
        after.pipelines, before.pipelines,
        "pipelines created per run"
    );
    assert_eq!(
        after.bind_group_layouts, before.bind_group_layouts,
        "layouts created per run"
    );
    assert_eq!(
        after.bind_groups, before.bind_groups,
        "bind groups created per run"
    );
    assert_eq!(after.buffers, before.buffers, "buffers created per run");
    assert_eq!(
        after.readbacks,
        before.readbacks + 3,
        "one readback per run"
    );
    // A second model of the same kernels compiles nothing new.
    let again = Model::from_bytes(&bytes, &ModelOptions::default().backend("gpu")).expect("gpu");
    again.run(&[input()]).expect("gpu run");
    assert_eq!(counters().expect("counters").pipelines, before.pipelines);
}

#[test]
fn a_lost_device_is_a_typed_error_not_a_panic() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if ctx_or_skip("a_lost_device_is_a_typed_error_not_a_panic").is_none() {
        return;
    }
    // A device of its own, so the process's shared one stays usable.
    let ctx = Arc::new(Ctx::new().expect("second device"));
    let graph = Graph::import(&mlp_bytes(), &ModelOptions::default()).expect("graph");
    let src = CpuExec::new(&graph, &ModelOptions::default());
    let key = PlanKey {
        shapes: vec![vec![3, 20]],
        values: Vec::new(),
    };
    let typed = src
        .inference_model(&key, &[])
        .expect("model")
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .expect("typed");
    let plan = exec::Plan::build(ctx.clone(), typed).expect("plan");
    let feed = || src.feed(&[input()]).expect("feed");
    plan.run(feed()).expect("runs before the loss");
    ctx.destroy();
    let err = plan.run(feed()).expect_err("device is gone");
    assert!(
        matches!(err, RuntimeError::Gpu(GpuError::DeviceLost(_))),
        "{err}"
    );
}

#[test]
fn gpu_or_cpu_never_picks_a_software_adapter() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(ctx) = ctx_or_skip("gpu_or_cpu_never_picks_a_software_adapter") else {
        return;
    };
    let m = Model::from_bytes(&mlp_bytes(), &ModelOptions::default().backend("gpu-or-cpu"))
        .expect("loads");
    let (name, why) = m.backend();
    if context::is_software(&ctx.info) {
        assert_eq!(name, "cpu", "{why}");
        assert!(why.contains("software"), "{why}");
    } else {
        assert_eq!(name, "gpu", "{why}");
    }
}

/// `exp(flatten(sigmoid(reshape(relu(x), [2, 12])), axis 0))`, x: [2, 3, 4]: both reshapes sit
/// between GPU nodes, so they are views of GPU buffers and the whole graph runs on the GPU.
#[test]
fn reshape_and_flatten_between_gpu_nodes_are_views_on_the_gpu() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(_ctx) = ctx_or_skip("reshape_and_flatten_between_gpu_nodes_are_views_on_the_gpu")
    else {
        return;
    };
    let shape = pb::TensorProto {
        name: "shape".into(),
        dims: vec![2],
        data_type: 7,
        int64_data: vec![2, 12],
        ..Default::default()
    };
    let flatten = with_int(node("Flatten", &["s"], "f"), "axis", 0);
    let model = opset17(pb::GraphProto {
        name: "views".into(),
        node: vec![
            node("Relu", &["x"], "r"),
            node("Reshape", &["r", "shape"], "rs"),
            node("Sigmoid", &["rs"], "s"),
            flatten,
            node("Exp", &["f"], "y"),
        ],
        initializer: vec![shape],
        input: vec![value_info("x", &[2, 3, 4])],
        output: vec![value_info("y", &[1, 24])],
        ..Default::default()
    });
    let bytes = model.encode_to_vec();
    let x: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) / 5.0).collect();
    let x = Tensor::new(&[2, 3, 4], &x).expect("tensor");
    let cpu = Model::from_bytes(&bytes, &ModelOptions::default()).expect("cpu");
    let gpu = Model::from_bytes(&bytes, &ModelOptions::default().backend("gpu")).expect("gpu");
    let want = cpu.run(std::slice::from_ref(&x)).expect("cpu run");
    let got = gpu.run(std::slice::from_ref(&x)).expect("gpu run");
    assert_eq!(got[0].shape(), &[1, 24]);
    let err = want[0]
        .as_f32()
        .expect("f32")
        .iter()
        .zip(&got[0].as_f32().expect("f32"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-6, "max error {err}");
    let p = gpu.placement().expect("placement");
    let describe = gpu.describe().join("\n");
    assert_eq!(p.fallback, 0, "{describe}");
    assert!(describe.contains("view×"), "{describe}");
    assert!(
        describe.contains("1 upload(s), 1 readback(s)"),
        "{describe}"
    );
}

#[test]
fn integer_arithmetic_with_broadcasting_runs_on_the_gpu_and_matches_the_cpu() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(_ctx) =
        ctx_or_skip("integer_arithmetic_with_broadcasting_runs_on_the_gpu_and_matches_the_cpu")
    else {
        return;
    };
    let ints = |name: &str, dims: &[i64], v: Vec<i32>| pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 6,
        int32_data: v,
        ..Default::default()
    };
    let cast = |i: &str, o: &str, to: i64| with_int(node("Cast", &[i], o), "to", to);
    // y = float(max(min((int(x) + b) * m - s, 40), -40) / d), int32 throughout the middle.
    let model = opset17(pb::GraphProto {
        name: "ints".into(),
        node: vec![
            cast("x", "xi", 6),
            node("Add", &["xi", "b"], "a"),
            node("Mul", &["a", "m"], "p"),
            node("Sub", &["p", "s"], "q"),
            node("Min", &["q", "hi"], "lo"),
            node("Max", &["lo", "neg"], "c"),
            node("Div", &["c", "d"], "di"),
            cast("di", "y", 1),
        ],
        initializer: vec![
            ints("b", &[4], vec![3, -7, 0, 11]),
            ints("m", &[3, 1], vec![2, -3, 5]),
            ints("s", &[], vec![9]),
            ints("hi", &[], vec![40]),
            ints("neg", &[], vec![-40]),
            ints("d", &[4], vec![3, -2, 7, 1]),
        ],
        input: vec![value_info("x", &[2, 3, 4])],
        output: vec![value_info("y", &[2, 3, 4])],
        ..Default::default()
    });
    let bytes = model.encode_to_vec();
    let x: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) * 1.7).collect();
    let x = Tensor::new(&[2, 3, 4], &x).expect("tensor");
    let cpu = Model::from_bytes(&bytes, &ModelOptions::default()).expect("cpu");
    let gpu = Model::from_bytes(&bytes, &ModelOptions::default().backend("gpu")).expect("gpu");
    let want = cpu.run(std::slice::from_ref(&x)).expect("cpu run");
    let got = gpu.run(std::slice::from_ref(&x)).expect("gpu run");
    assert_eq!(
        got[0].as_f32().expect("f32"),
        want[0].as_f32().expect("f32"),
        "integer results differ"
    );
    let describe = gpu.describe().join("\n");
    assert_eq!(
        gpu.placement().expect("placement").fallback,
        0,
        "{describe}"
    );
}
