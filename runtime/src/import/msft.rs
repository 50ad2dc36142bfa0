//! onnxruntime's QOperator format uses `com.microsoft` ops tract lacks. Each becomes
//! `DequantizeLinear → float op → QuantizeLinear`, which tract runs (and which `qdq` may turn
//! back into integer kernels where tract has them).

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto};

use super::graph::{attr_f, attr_i, float_attr, int_attr, node};

pub(super) fn decompose(g: &mut GraphProto, report: &mut Vec<String>) {
    expand_all(g, report, expand, |c, op| {
        format!("decomposed {c} {op} (com.microsoft) into standard ops")
    });
}

/// `DequantizeLinear(x, s, zp) → tmp`.
fn dq(n: &NodeProto, k: usize, x: &str, s: &str, zp: &str) -> (NodeProto, String) {
    dq_axis(n, k, x, s, zp, None)
}

/// As `dq`, with an explicit axis for per-channel scales.
fn dq_axis(
    n: &NodeProto,
    k: usize,
    x: &str,
    s: &str,
    zp: &str,
    axis: Option<i64>,
) -> (NodeProto, String) {
    let out = tmp(n, &format!("dq{k}"));
    let inputs: Vec<&str> = if zp.is_empty() {
        vec![x, s]
    } else {
        vec![x, s, zp]
    };
    let attrs = axis.map(|a| vec![int_attr("axis", a)]).unwrap_or_default();
    (
        node("DequantizeLinear", out.clone(), &inputs, &[&out], attrs),
        out,
    )
}

fn q(n: &NodeProto, x: &str, s: &str, zp: &str) -> NodeProto {
    let inputs: Vec<&str> = if zp.is_empty() {
        vec![x, s]
    } else {
        vec![x, s, zp]
    };
    node(
        "QuantizeLinear",
        tmp(n, "q"),
        &inputs,
        &[&n.output[0]],
        vec![],
    )
}

/// Dequantizes the int32 bias at input `k`, whose scale is input 1 · input 4 (per channel).
fn dq_bias(n: &NodeProto, k: usize, nodes: &mut Vec<NodeProto>) -> String {
    let scale = tmp(n, "bscale");
    nodes.push(node(
        "Mul",
        scale.clone(),
        &[input(n, 1), input(n, 4)],
        &[&scale],
        vec![],
    ));
    let (d, b) = dq_axis(n, 2, input(n, k), &scale, "", Some(0));
    nodes.push(d);
    b
}

/// Replaces every node `expand` returns nodes for; one report line per op type.
fn expand_all(
    g: &mut GraphProto,
    report: &mut Vec<String>,
    expand: impl Fn(&NodeProto) -> Option<Vec<NodeProto>>,
    line: impl Fn(usize, &str) -> String,
) {
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
    report.extend(counts.iter().map(|(op, &c)| line(c, op)));
}

fn tmp(n: &NodeProto, what: &str) -> String {
    format!("{}__fedge_ms_{what}", n.output[0])
}

fn input(n: &NodeProto, i: usize) -> &str {
    n.input.get(i).map(String::as_str).unwrap_or("")
}

/// `DQ(x) → op(attrs) → Q` for the unary `QLinear*` ops laid out as (X, Xs, Xzp, Ys, Yzp).
fn unary(n: &NodeProto, op: &str, attrs: Vec<AttributeProto>) -> Vec<NodeProto> {
    let (d, x) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let y = tmp(n, "f");
    vec![
        d,
        node(op, tmp(n, op), &[&x], &[&y], attrs),
        q(n, &y, input(n, 3), input(n, 4)),
    ]
}

/// `DQ(a), DQ(b) → op → Q` for QLinearAdd / QLinearMul: (A, As, Azp, B, Bs, Bzp, Cs, Czp).
fn binary(n: &NodeProto, op: &str) -> Vec<NodeProto> {
    let (da, a) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let (db, b) = dq(n, 1, input(n, 3), input(n, 4), input(n, 5));
    let y = tmp(n, "f");
    vec![
        da,
        db,
        node(op, tmp(n, op), &[&a, &b], &[&y], vec![]),
        q(n, &y, input(n, 6), input(n, 7)),
    ]
}

fn concat(n: &NodeProto) -> Vec<NodeProto> {
    let mut nodes = Vec::new();
    let mut parts = Vec::new();
    for (k, triple) in n.input[2..].chunks(3).enumerate() {
        let (d, x) = dq(
            n,
            k,
            &triple[0],
            &triple[1],
            triple.get(2).map_or("", |s| s),
        );
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
    // Per-column weight scales sit on axis 0 of a transposed B, on axis 1 otherwise.
    let b_axis = if attr_i(n, "transB").unwrap_or(0) != 0 {
        0
    } else {
        1
    };
    let (db, b) = dq_axis(n, 1, input(n, 3), input(n, 4), input(n, 5), Some(b_axis));
    let mut nodes = vec![da, db];
    let mut gemm_in = vec![a, b];
    if !input(n, 6).is_empty() {
        gemm_in.push(dq_bias(n, 6, &mut nodes));
    }
    let attrs = ["transA", "transB"]
        .iter()
        .filter_map(|k| attr_i(n, k).map(|v| int_attr(k, v)))
        .chain(attr_f(n, "alpha").map(|v| float_attr("alpha", v)))
        .collect();
    let quantized = !input(n, 7).is_empty();
    let y = if quantized {
        tmp(n, "f")
    } else {
        n.output[0].clone()
    };
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
        n.attribute
            .iter()
            .filter(|a| names.contains(&a.name.as_str()))
            .cloned()
            .collect()
    };
    let channels_last = attr_i(n, "channels_last").unwrap_or(0) != 0;
    Some(match n.op_type.as_str() {
        "QuantizeLinear" | "DequantizeLinear" => {
            vec![NodeProto {
                domain: String::new(),
                ..n.clone()
            }]
        }
        "QLinearAdd" => binary(n, "Add"),
        "QLinearMul" => binary(n, "Mul"),
        "QLinearSigmoid" => unary(n, "Sigmoid", vec![]),
        "QLinearLeakyRelu" => unary(
            n,
            "LeakyRelu",
            vec![float_attr("alpha", attr_f(n, "alpha").unwrap_or(0.01))],
        ),
        "QLinearSoftmax" => unary(n, "Softmax", keep(&["axis"])),
        "QLinearGlobalAveragePool" if !channels_last => unary(n, "GlobalAveragePool", vec![]),
        "QLinearAveragePool" if !channels_last => unary(
            n,
            "AveragePool",
            keep(&[
                "auto_pad",
                "ceil_mode",
                "count_include_pad",
                "kernel_shape",
                "pads",
                "strides",
            ]),
        ),
        "QLinearConcat" if n.input.len() >= 5 => concat(n),
        "QGemm" if n.input.len() >= 6 => qgemm(n),
        _ => return None,
    })
}

/// `QLinearConv` and `QLinearMatMul` as `DequantizeLinear → Conv/MatMul → QuantizeLinear`:
/// the same arithmetic on tract's float kernels, which measured far faster than its int8 ones.
pub(super) fn dequantize_integer_ops(g: &mut GraphProto, report: &mut Vec<String>) {
    let expand = |n: &NodeProto| match n.op_type.as_str() {
        _ if !n.domain.is_empty() => None,
        "QLinearConv" if n.input.len() >= 8 => Some(qlinear_conv(n)),
        "QLinearMatMul" if n.input.len() == 8 => Some(qlinear_matmul(n)),
        _ => None,
    };
    expand_all(g, report, expand, |c, op| {
        format!("ran {c} {op} as float kernels between exact quantize steps")
    });
}

/// QLinearConv: (x, xs, xzp, w, ws, wzp, ys, yzp, B?); B is int32 with scale xs·ws, per channel.
fn qlinear_conv(n: &NodeProto) -> Vec<NodeProto> {
    let (dx, x) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let (dw, w) = dq_axis(n, 1, input(n, 3), input(n, 4), input(n, 5), Some(0));
    let mut nodes = vec![dx, dw];
    let mut conv_in = vec![x, w];
    if !input(n, 8).is_empty() {
        conv_in.push(dq_bias(n, 8, &mut nodes));
    }
    let y = tmp(n, "f");
    let cin: Vec<&str> = conv_in.iter().map(String::as_str).collect();
    nodes.push(node(
        "Conv",
        tmp(n, "Conv"),
        &cin,
        &[&y],
        n.attribute.clone(),
    ));
    nodes.push(q(n, &y, input(n, 6), input(n, 7)));
    nodes
}

/// QLinearMatMul: (a, as, azp, b, bs, bzp, ys, yzp); per-column scales of b on its last axis.
fn qlinear_matmul(n: &NodeProto) -> Vec<NodeProto> {
    let (da, a) = dq(n, 0, input(n, 0), input(n, 1), input(n, 2));
    let (db, b) = dq_axis(n, 1, input(n, 3), input(n, 4), input(n, 5), Some(-1));
    let y = tmp(n, "f");
    vec![
        da,
        db,
        node("MatMul", tmp(n, "MatMul"), &[&a, &b], &[&y], vec![]),
        q(n, &y, input(n, 6), input(n, 7)),
    ]
}
