//! 8-bit to 8-bit element-wise chains as one table lookup (`FedgeLookup`).
//!
//! Between two int8 convolutions, quantized graphs dequantize, apply an activation in float
//! and quantize again: onnxruntime's QDQ hard-swish is `DQ → HardSigmoid → Q → DQ → Mul(·,
//! DQ(x)) → Q`, five passes over the tensor in float. Every output element is a function of
//! the same element of one 8-bit tensor, so it takes at most 256 values: the chain is computed
//! once at load time for every code, by tract on the very nodes it replaces (so the table holds
//! exactly what they compute, element by element), and runs as one byte lookup.
//!
//! A chain qualifies when it ends in a quantize (`QuantizeLinear` or `FedgeQuantizeLinear`),
//! every node in it is element-wise (the list below), every input that is not computed inside
//! it is a scalar constant, and everything comes from one 8-bit tensor through
//! `DequantizeLinear`s with scalar constant parameters. Nodes left without readers are
//! removed.

use std::collections::{BTreeSet, HashMap, HashSet};

use tract_onnx::pb::{
    GraphProto, ModelProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    tensor_shape_proto, type_proto,
};
use tract_onnx::prelude::InferenceModelExt;
use tract_onnx::tract_core::internal::*;

use super::graph::{INT8, UINT8, constants, int_attr, node, producers};
use crate::tract_ops::{EXACT_DIV, LOOKUP, QLINEAR_ADD, QUANTIZE_LINEAR};

/// Element-wise ops: each output element depends on the same element of the inputs only
/// (with scalar constants for the other operands).
const ELEMENTWISE: [&str; 28] = [
    "DequantizeLinear",
    "QuantizeLinear",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Min",
    "Max",
    "Relu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Softplus",
    "Neg",
    "Abs",
    "Exp",
    "Erf",
    "Sqrt",
    "Reciprocal",
    "Identity",
    "Floor",
    "Ceil",
    "Round",
];

fn elementwise(n: &tract_onnx::pb::NodeProto) -> bool {
    match n.domain.as_str() {
        "" | "ai.onnx" => {
            ELEMENTWISE.contains(&n.op_type.as_str())
                && !n
                    .attribute
                    .iter()
                    .any(|a| a.name == "block_size" || a.name == "output_dtype")
        }
        "ai.fedge" => [QUANTIZE_LINEAR, EXACT_DIV, QLINEAR_ADD].contains(&n.op_type.as_str()),
        _ => false,
    }
}

/// Nodes whose output is 8-bit: where a chain can end.
fn is_quantize(n: &tract_onnx::pb::NodeProto) -> bool {
    (n.op_type == "QuantizeLinear" && n.domain.is_empty())
        || ((n.op_type == QUANTIZE_LINEAR || n.op_type == QLINEAR_ADD) && n.domain == "ai.fedge")
}

/// A scalar constant (no broadcasting that could change the chain's shape).
fn scalar(consts: &HashMap<String, TensorProto>, name: &str) -> bool {
    consts.get(name).is_some_and(|t| {
        t.dims.len() <= 1 && t.dims.iter().product::<i64>() == 1 && !t.dims.contains(&0)
    })
}

/// The chain ending at node `end`: its nodes (indices) and its 8-bit source tensor with that
/// tensor's ONNX type. The longest chain is tried first, walking on through a dequantized
/// tensor that an element-wise node computes (hard-swish's `x · Q(HardSigmoid(x))` reads `x`
/// twice, once through a quantize); failing that, every dequantized tensor is a source.
fn chain(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    producers: &HashMap<String, usize>,
    end: usize,
) -> Option<(BTreeSet<usize>, String, i32)> {
    walk(g, consts, producers, end, true).or_else(|| walk(g, consts, producers, end, false))
}

fn walk(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    producers: &HashMap<String, usize>,
    end: usize,
    extend: bool,
) -> Option<(BTreeSet<usize>, String, i32)> {
    let mut nodes = BTreeSet::new();
    let mut source: Option<(String, i32)> = None;
    let mut todo = vec![end];
    while let Some(i) = todo.pop() {
        if !nodes.insert(i) {
            continue;
        }
        let n = &g.node[i];
        if !elementwise(n) || n.output.len() != 1 {
            return None;
        }
        for (k, input) in n.input.iter().enumerate() {
            if input.is_empty() || (k > 0 && scalar(consts, input)) {
                continue;
            }
            let through = extend
                && producers
                    .get(input)
                    .is_some_and(|&p| elementwise(&g.node[p]) && !g.node[p].input.is_empty());
            // An 8-bit value read as such: dequantized, or added in onnxruntime's
            // `QLinearAdd` arithmetic to a scalar constant.
            let reads_bytes = n.op_type == "DequantizeLinear" || n.op_type == QLINEAR_ADD;
            if reads_bytes && k == 0 && !consts.contains_key(input) && !through {
                if !n.input[1..]
                    .iter()
                    .all(|p| p.is_empty() || scalar(consts, p))
                {
                    return None;
                }
                let ty = if n.op_type == QLINEAR_ADD {
                    match super::graph::attr_i(n, "signed") {
                        Some(0) => UINT8,
                        Some(_) => INT8,
                        None => return None,
                    }
                } else {
                    match n.input.get(2).filter(|z| !z.is_empty()) {
                        Some(z) => consts.get(z)?.data_type,
                        None => UINT8,
                    }
                };
                if ty != INT8 && ty != UINT8 {
                    return None;
                }
                match &source {
                    Some((s, _)) if s != input => return None,
                    Some(_) => {}
                    None => source = Some((input.clone(), ty)),
                }
                continue;
            }
            if k == 0 && scalar(consts, input) {
                continue;
            }
            todo.push(*producers.get(input)?);
        }
    }
    let (s, ty) = source?;
    Some((nodes, s, ty))
}

fn tensor_value(name: &str, elem_type: i32, len: i64) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(tract_onnx::pb::TensorShapeProto {
                    dim: vec![tensor_shape_proto::Dimension {
                        value: Some(tensor_shape_proto::dimension::Value::DimValue(len)),
                        ..Default::default()
                    }],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs the chain's nodes on all 256 codes of the source: the table and whether the output
/// is signed.
fn tabulate(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    opset: &[OperatorSetIdProto],
    nodes: &BTreeSet<usize>,
    source: &str,
    source_type: i32,
) -> TractResult<(Vec<i64>, bool)> {
    let end = *nodes.last().context("empty chain")?;
    let out = g.node[end].output[0].clone();
    let mut mini = GraphProto {
        name: "fedge_lookup".into(),
        node: nodes.iter().map(|&i| g.node[i].clone()).collect(),
        input: vec![tensor_value(source, source_type, 256)],
        output: vec![ValueInfoProto {
            name: out,
            ..Default::default()
        }],
        ..Default::default()
    };
    let used: HashSet<&String> = mini.node.iter().flat_map(|n| &n.input).collect();
    mini.initializer = used
        .into_iter()
        .filter_map(|name| {
            consts.get(name).map(|t| TensorProto {
                name: name.clone(),
                ..t.clone()
            })
        })
        .collect();
    let proto = ModelProto {
        ir_version: 8,
        opset_import: opset.to_vec(),
        graph: Some(mini),
        ..Default::default()
    };
    let plan = crate::tract_ops::onnx()
        .with_ignore_output_shapes(true)
        .model_for_proto_model(&proto)?
        .into_optimized()?
        .into_runnable()?;
    let codes = if source_type == INT8 {
        let v: Vec<i8> = (0..=255u8).map(|c| c as i8).collect();
        tract_ndarray::Array1::from(v).into_tensor()
    } else {
        tract_ndarray::Array1::from((0..=255u8).collect::<Vec<_>>()).into_tensor()
    };
    let result = plan.run(tvec!(codes.into_tvalue()))?;
    let t = result.first().context("no output")?;
    ensure!(t.len() == 256, "table of {} entries", t.len());
    let signed = match t.datum_type().unquantized() {
        DatumType::I8 => true,
        DatumType::U8 => false,
        other => bail!("the chain ends in {other:?}, not an 8-bit type"),
    };
    let t = t.cast_to::<i64>()?;
    let plain = t.try_as_plain_ram()?;
    Ok((plain.as_slice::<i64>()?.to_vec(), signed))
}

/// Removes nodes none of whose outputs is read or a graph output.
fn remove_dead(g: &mut GraphProto) {
    loop {
        let read: HashSet<String> = super::graph::consumers(g).into_keys().collect();
        let before = g.node.len();
        let outputs: HashSet<&String> = g.output.iter().map(|o| &o.name).collect();
        let keep: Vec<bool> = g
            .node
            .iter()
            .map(|n| {
                n.output
                    .iter()
                    .any(|o| read.contains(o) || outputs.contains(o))
            })
            .collect();
        let mut keep = keep.into_iter();
        g.node.retain(|_| keep.next().unwrap_or(true));
        if g.node.len() == before {
            return;
        }
    }
}

pub(super) fn rewrite(g: &mut GraphProto, opset: &[OperatorSetIdProto], report: &mut Vec<String>) {
    let consts = constants(g);
    let (mut done, mut folded) = (0usize, 0usize);
    let before = g.node.len();
    remove_dead(g);
    let producers = producers(g);
    let graph_outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    // Readers left of each value, and the nodes dropped so far (indices stay valid: the
    // graph is compacted once at the end).
    let mut readers: HashMap<String, usize> = super::graph::consumers(g)
        .into_iter()
        .map(|(k, v)| (k, v.len()))
        .collect();
    let mut dropped: HashSet<usize> = HashSet::new();
    let release = |inputs: &[String], readers: &mut HashMap<String, usize>| {
        for name in inputs.iter().filter(|s| !s.is_empty()) {
            if let Some(r) = readers.get_mut(name) {
                *r = r.saturating_sub(1);
            }
        }
    };
    // Last quantize first: a chain swallows the quantizes inside it, which are then dropped.
    for i in (0..g.node.len()).rev() {
        if dropped.contains(&i) || !is_quantize(&g.node[i]) {
            continue;
        }
        let Some((nodes, source, ty)) = chain(g, &consts, &producers, i) else {
            continue;
        };
        let (table, signed) = match tabulate(g, &consts, opset, &nodes, &source, ty) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "element-wise chain kept");
                continue;
            }
        };
        let end = &g.node[i];
        let mut lookup = node(
            LOOKUP,
            format!("{}_fedge_lookup", end.output[0]),
            &[&source],
            &[&end.output[0]],
            vec![
                super::graph::ints_attr("table", &table),
                int_attr("signed", signed as i64),
            ],
        );
        lookup.domain = "ai.fedge".into();
        let old = std::mem::replace(&mut g.node[i], lookup);
        *readers.entry(source.clone()).or_default() += 1;
        release(&old.input, &mut readers);
        // Drop the chain's nodes left without readers, last first.
        for &j in nodes.iter().rev().filter(|&&j| j != i) {
            let n = &g.node[j];
            let unread = n
                .output
                .iter()
                .all(|o| readers.get(o).copied().unwrap_or(0) == 0 && !graph_outputs.contains(o));
            if unread && dropped.insert(j) {
                release(&n.input, &mut readers);
            }
        }
        done += 1;
        folded += nodes.len();
    }
    if done > 0 {
        let mut index = 0..;
        g.node
            .retain(|_| !dropped.contains(&index.next().unwrap_or(usize::MAX)));
        remove_dead(g);
        report.push(format!(
            "ran {done} 8-bit element-wise chains ({folded} nodes) as table lookups, {} nodes left unread removed",
            before - g.node.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::{f32_tensor, float_attr, raw_tensor};
    use super::*;

    fn opset() -> Vec<OperatorSetIdProto> {
        vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }]
    }

    /// onnxruntime's QDQ hard-swish on an int8 input `x`, plus (with `add`) a sum with a
    /// second quantized input `w`, which no table of one input can compute.
    fn hard_swish(add: bool) -> ModelProto {
        let mut g = GraphProto {
            name: "t".into(),
            input: vec![tensor_value("x", INT8, 256)],
            output: vec![ValueInfoProto {
                name: "y".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        g.initializer.extend([
            f32_tensor("s", &[], &[0.05]),
            raw_tensor("z", INT8, &[], vec![3]),
            f32_tensor("hs", &[], &[1.0 / 255.0]),
            raw_tensor("hz", INT8, &[], vec![128]),
            f32_tensor("os", &[], &[0.03]),
            raw_tensor("oz", INT8, &[], vec![251]),
        ]);
        let hs = node(
            "HardSigmoid",
            "h".into(),
            &["xf"],
            &["hf"],
            vec![float_attr("alpha", 1.0 / 6.0), float_attr("beta", 0.5)],
        );
        g.node.extend([
            node(
                "DequantizeLinear",
                "d0".into(),
                &["x", "s", "z"],
                &["xf"],
                vec![],
            ),
            hs,
            node(
                "QuantizeLinear",
                "q0".into(),
                &["hf", "hs", "hz"],
                &["hq"],
                vec![],
            ),
            node(
                "DequantizeLinear",
                "d1".into(),
                &["hq", "hs", "hz"],
                &["hd"],
                vec![],
            ),
            node("Mul", "m".into(), &["xf", "hd"], &["mf"], vec![]),
            node(
                "QuantizeLinear",
                "q1".into(),
                &["mf", "os", "oz"],
                &["y"],
                vec![],
            ),
        ]);
        if add {
            g.input.push(tensor_value("w", INT8, 256));
            g.node.last_mut().expect("q1").output[0] = "y0".into();
            g.node.extend([
                node(
                    "DequantizeLinear",
                    "d2".into(),
                    &["y0", "os", "oz"],
                    &["yf"],
                    vec![],
                ),
                node(
                    "DequantizeLinear",
                    "d3".into(),
                    &["w", "s", "z"],
                    &["wf"],
                    vec![],
                ),
                node("Add", "a".into(), &["yf", "wf"], &["sf"], vec![]),
                node(
                    "QuantizeLinear",
                    "q2".into(),
                    &["sf", "os", "oz"],
                    &["y"],
                    vec![],
                ),
            ]);
        }
        ModelProto {
            ir_version: 8,
            opset_import: opset(),
            graph: Some(g),
            ..Default::default()
        }
    }

    /// Runs `m` on all 256 int8 codes (and, for a second input, the codes reversed).
    fn run(m: &ModelProto) -> Vec<i8> {
        let plan = crate::tract_ops::onnx()
            .with_ignore_output_shapes(true)
            .model_for_proto_model(m)
            .expect("parses")
            .into_optimized()
            .expect("optimises")
            .into_runnable()
            .expect("plans");
        let x: Vec<i8> = (0..=255u8).map(|c| c as i8).collect();
        let mut inputs = tvec!(
            tract_ndarray::Array1::from(x.clone())
                .into_tensor()
                .into_tvalue()
        );
        if m.graph.as_ref().is_some_and(|g| g.input.len() == 2) {
            let w: Vec<i8> = x.iter().rev().copied().collect();
            inputs.push(tract_ndarray::Array1::from(w).into_tensor().into_tvalue());
        }
        let out = plan.run(inputs).expect("runs");
        let plain = out[0].try_as_plain_ram().expect("plain");
        plain.as_slice::<i8>().expect("i8").to_vec()
    }

    #[test]
    fn a_quantized_hard_swish_becomes_one_lookup_with_the_same_results() {
        let before = hard_swish(false);
        let mut after = before.clone();
        let mut report = vec![];
        rewrite(after.graph.as_mut().expect("graph"), &opset(), &mut report);
        let g = after.graph.as_ref().expect("graph");
        assert_eq!(g.node.len(), 1, "{:?}", g.node);
        assert_eq!(g.node[0].op_type, LOOKUP);
        assert_eq!(g.node[0].input, ["x"]);
        assert!(
            report[0].starts_with("ran 1 8-bit element-wise chains (6 nodes)"),
            "{report:?}"
        );
        let (want, got) = (run(&before), run(&after));
        assert_eq!(got, want);
        assert!(
            want.iter().collect::<HashSet<_>>().len() > 50,
            "a real function"
        );
    }

    #[test]
    fn a_sum_of_two_quantized_tensors_keeps_its_add() {
        let before = hard_swish(true);
        let mut after = before.clone();
        rewrite(after.graph.as_mut().expect("graph"), &opset(), &mut vec![]);
        let g = after.graph.as_ref().expect("graph");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(ops.contains(&"Add"), "{ops:?}");
        assert!(ops.contains(&LOOKUP), "{ops:?}");
        assert_eq!(run(&after), run(&before));
    }
}
