//! onnxruntime's QOperator format uses `com.microsoft` ops tract lacks. Each becomes
//! `DequantizeLinear → float op → QuantizeLinear`, which tract runs (and which `qdq` may turn
//! back into integer kernels where tract has them).

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto};

use super::graph::{attr_f, attr_i, float_attr, int_attr, node};

pub(super) fn decompose(g: &mut GraphProto, report: &mut Vec<String>) {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut out = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        match expand(&n) {
            Some(nodes) => {
                *counts.entry(n.op_type.clone()).or_default() += 1;
                out.extend(nodes);
            }
            None => out.push(n),
        }
    }
    g.node = out;
    for (op, c) in counts {
        report.push(format!("decomposed {c} {op} (com.microsoft) into standard ops"));
    }
}

/// `DequantizeLinear(x, s, zp) → tmp`.
fn dq(n: &NodeProto, k: usize, x: &str, s: &str, zp: &str) -> (NodeProto, String) {
    let out = tmp(n, &format!("dq{k}"));
    let inputs: Vec<&str> = if zp.is_empty() { vec![x, s] } else { vec![x, s, zp] };
    (node("DequantizeLinear", out.clone(), &inputs, &[&out], vec![]), out)
}

fn q(n: &NodeProto, x: &str, s: &str, zp: &str) -> NodeProto {
    let inputs: Vec<&str> = if zp.is_empty() { vec![x, s] } else { vec![x, s, zp] };
    node("QuantizeLinear", tmp(n, "q"), &inputs, &[&n.output[0]], vec![])
}

fn tmp(n: &NodeProto, what: &str) -> String {
    format!("{}__fedge_{what}", n.output[0])
}

fn input(n: &NodeProto, i: usize) -> &str {
    n.input.get(i).map(String::as_str).unwrap_or("")
}

/// `DQ(x) → op(attrs) → Q` for the unary `QLinear*` ops laid out as (X, Xs, Xzp, Ys, Yzp).
fn unary(n: &NodeProto, op: &str, attrs: Vec<AttributeProto>) -> Vec<NodeProto> {
    let (d, x) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let y = tmp(n, "f");
    vec![d, node(op, tmp(n, op), &[&x], &[&y], attrs), q(n, &y, input(n, 3), input(n, 4))]
}

/// `DQ(a), DQ(b) → op → Q` for QLinearAdd / QLinearMul: (A, As, Azp, B, Bs, Bzp, Cs, Czp).
fn binary(n: &NodeProto, op: &str) -> Vec<NodeProto> {
    let (da, a) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let (db, b) = dq(n, 1, input(n, 3), input(n, 4), input(n, 5));
    let y = tmp(n, "f");
    vec![da, db, node(op, tmp(n, op), &[&a, &b], &[&y], vec![]), q(n, &y, input(n, 6), input(n, 7))]
}

fn concat(n: &NodeProto) -> Vec<NodeProto> {
    let mut nodes = Vec::new();
    let mut parts = Vec::new();
    for (k, triple) in n.input[2..].chunks(3).enumerate() {
        let (d, x) = dq(n, k, &triple[0], &triple[1], triple.get(2).map_or("", |s| s));
        nodes.push(d);
        parts.push(x);
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let y = tmp(n, "f");
    let axis = int_attr("axis", attr_i(n, "axis").unwrap_or(0));
    nodes.push(node("Concat", tmp(n, "Concat"), &parts, &[&y], vec![axis]));
    nodes.push(q(n, &y, input(n, 0), input(n, 1)));
    nodes
}

/// QGemm: (A, As, Azp, B, Bs, Bzp, C?, Ys?, Yzp?); C is int32 with scale As·Bs.
fn qgemm(n: &NodeProto) -> Vec<NodeProto> {
    let (da, a) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let (db, b) = dq(n, 1, input(n, 3), input(n, 4), input(n, 5));
    let mut nodes = vec![da, db];
    let mut gemm_in = vec![a, b];
    if !input(n, 6).is_empty() {
        let scale = tmp(n, "cscale");
        nodes.push(node("Mul", scale.clone(), &[input(n, 1), input(n, 4)], &[&scale], vec![]));
        let (dc, c) = dq(n, 2, input(n, 6), &scale, "");
        nodes.push(dc);
        gemm_in.push(c);
    }
    let attrs = ["transA", "transB"]
        .iter()
        .filter_map(|k| attr_i(n, k).map(|v| int_attr(k, v)))
        .chain(attr_f(n, "alpha").map(|v| float_attr("alpha", v)))
        .collect();
    let quantized = !input(n, 7).is_empty();
    let y = if quantized { tmp(n, "f") } else { n.output[0].clone() };
    let gin: Vec<&str> = gemm_in.iter().map(String::as_str).collect();
    nodes.push(node("Gemm", tmp(n, "Gemm"), &gin, &[&y], attrs));
    if quantized {
        nodes.push(q(n, &y, input(n, 7), input(n, 8)));
    }
    nodes
}

fn expand(n: &NodeProto) -> Option<Vec<NodeProto>> {
    if n.domain != "com.microsoft" || n.output.is_empty() {
        return None;
    }
    let keep = |names: &[&str]| -> Vec<AttributeProto> {
        n.attribute.iter().filter(|a| names.contains(&a.name.as_str())).cloned().collect()
    };
    let channels_last = attr_i(n, "channels_last").unwrap_or(0) != 0;
    Some(match n.op_type.as_str() {
        "QuantizeLinear" | "DequantizeLinear" => {
            vec![NodeProto { domain: String::new(), ..n.clone() }]
        }
        "QLinearAdd" => binary(n, "Add"),
        "QLinearMul" => binary(n, "Mul"),
        "QLinearSigmoid" => unary(n, "Sigmoid", vec![]),
        "QLinearLeakyRelu" => {
            unary(n, "LeakyRelu", vec![float_attr("alpha", attr_f(n, "alpha").unwrap_or(0.01))])
        }
        "QLinearSoftmax" => unary(n, "Softmax", keep(&["axis"])),
        "QLinearGlobalAveragePool" if !channels_last => unary(n, "GlobalAveragePool", vec![]),
        "QLinearAveragePool" if !channels_last => unary(
            n,
            "AveragePool",
            keep(&["auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides"]),
        ),
        "QLinearConcat" if n.input.len() >= 5 => concat(n),
        "QGemm" if n.input.len() >= 6 => qgemm(n),
        _ => return None,
    })
}
