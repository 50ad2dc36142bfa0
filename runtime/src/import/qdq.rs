//! QDQ-format rewrites. The integer-kernel ones run only with
//! `ModelOptions::integer_kernels` (tract 0.23.9's int8 kernels measured slower than float).
//!
//! - `DQ → Conv → Q` becomes `QLinearConv` and `DQ → MatMul → Q` becomes `QLinearMatMul`:
//!   tract runs those as integer kernels (i32 accumulation, requantisation), while it runs the
//!   QDQ form in float, 2–4× slower than the float model.
//! - `DQ → Gemm → Q` becomes `MatMulInteger` + int32 bias + requantisation.
//! - `Softmax → Q`: tract 0.23.9 fuses this into a quantized softmax that answers all-1.0; the
//!   same quantize-dequantize arithmetic in float (divide, round half to even, add the zero
//!   point, saturate, subtract, multiply) goes between them, so the `Q` sees values already on
//!   its grid and yields the same integers, and tract can no longer fuse.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::graph::{
    FLOAT, attr_i, const_f32, constants, consumers, f32_tensor, i32_tensor, int_attr,
    is_graph_output, load, node, onnx_type, producers, zero_point,
};

struct Ctx {
    consts: HashMap<String, TensorProto>,
    prod: HashMap<String, usize>,
    cons: HashMap<String, Vec<usize>>,
}

/// A `DequantizeLinear` feeding a tensor: (quantized input, scale, zero point).
struct Dq {
    x: String,
    scale: String,
    zp: Option<String>,
    axis: i64,
}

pub(super) fn rewrite(g: &mut GraphProto, integer_kernels: bool, report: &mut Vec<String>) {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let ctx = Ctx {
        consts: constants(g),
        prod: producers(g),
        cons: consumers(g),
    };
    let mut removed = HashSet::new();
    let mut replaced: Vec<(usize, Vec<NodeProto>)> = Vec::new();
    let mut new_inits = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        let done = match n.op_type.as_str() {
            "Conv" | "MatMul" | "Gemm" if !integer_kernels => None,
            "Conv" => conv(g, &ctx, n, &mut new_inits).map(|r| ("QDQ Conv → QLinearConv", r)),
            "MatMul" => matmul(g, &ctx, n).map(|r| ("QDQ MatMul → QLinearMatMul", r)),
            "Gemm" => gemm(g, &ctx, n, &mut new_inits).map(|r| ("QDQ Gemm → MatMulInteger", r)),
            "Softmax" => {
                softmax(g, &ctx, n, &mut new_inits).map(|r| ("Softmax → Q kept exact in float", r))
            }
            _ => None,
        };
        if let Some((what, (nodes, gone))) = done {
            if gone.iter().any(|j| removed.contains(j)) {
                continue;
            }
            *counts.entry(what).or_default() += 1;
            removed.extend(gone);
            replaced.push((i, nodes));
        }
    }
    let mut by_index: HashMap<usize, Vec<NodeProto>> = replaced.into_iter().collect();
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(nodes) = by_index.remove(&i) {
            g.node.extend(nodes);
        } else if !removed.contains(&i) {
            g.node.push(n);
        }
    }
    g.initializer.extend(new_inits);
    for (what, c) in counts {
        report.push(format!("rewrote {c} × {what}"));
    }
}

fn dq_of(g: &GraphProto, ctx: &Ctx, tensor: &str) -> Option<Dq> {
    let n = &g.node[*ctx.prod.get(tensor)?];
    if n.op_type != "DequantizeLinear" || n.input.len() < 2 {
        return None;
    }
    ctx.consts.get(&n.input[1])?;
    let zp = n.input.get(2).filter(|s| !s.is_empty()).cloned();
    if let Some(z) = &zp {
        ctx.consts.get(z)?;
    }
    Some(Dq {
        x: n.input[0].clone(),
        scale: n.input[1].clone(),
        zp,
        axis: attr_i(n, "axis").unwrap_or(1),
    })
}

/// The only reader of `tensor`, when it is a `QuantizeLinear` with a constant scale and zero point.
fn single_q(g: &GraphProto, ctx: &Ctx, tensor: &str) -> Option<usize> {
    if is_graph_output(g, tensor) {
        return None;
    }
    let readers = ctx.cons.get(tensor)?;
    let &[q] = readers.as_slice() else {
        return None;
    };
    let n = &g.node[q];
    let ok = n.op_type == "QuantizeLinear"
        && n.input.len() == 3
        && ctx.consts.contains_key(&n.input[1])
        && ctx.consts.contains_key(&n.input[2]);
    ok.then_some(q)
}

fn const_type(ctx: &Ctx, name: &str) -> Option<i32> {
    let t = ctx.consts.get(name)?;
    onnx_type(load(t)?.datum_type())
}

/// The zero point of a DQ, or a fresh scalar zero of the quantized tensor's type.
fn zp_or_zero(ctx: &Ctx, dq: &Dq, fresh: &str, inits: &mut Vec<TensorProto>) -> Option<String> {
    if let Some(z) = &dq.zp {
        return Some(z.clone());
    }
    inits.push(zero_point(fresh, const_type(ctx, &dq.x)?));
    Some(fresh.to_string())
}

/// Bias quantized to int32 with scale `x_scale · w_scale[c]`, as QLinearConv expects.
fn int32_bias(g: &GraphProto, ctx: &Ctx, bias: &str, xs: f32, ws: &[f32]) -> Option<Vec<i32>> {
    let values = match dq_of(g, ctx, bias) {
        Some(d) => {
            let q = const_f32(&ctx.consts, &d.x)?;
            let s = const_f32(&ctx.consts, &d.scale)?;
            let z =
                d.zp.as_ref()
                    .and_then(|z| const_f32(&ctx.consts, z))
                    .unwrap_or(vec![0.0]);
            let pick = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i] };
            q.iter()
                .enumerate()
                .map(|(i, &v)| (v - pick(&z, i)) * pick(&s, i))
                .collect()
        }
        None => const_f32(&ctx.consts, bias)?,
    };
    let scale = |c: usize| xs * if ws.len() == 1 { ws[0] } else { ws[c] };
    Some(
        values
            .iter()
            .enumerate()
            .map(|(c, &b)| (b / scale(c)).round_ties_even() as i32)
            .collect(),
    )
}

type Rewrite = (Vec<NodeProto>, Vec<usize>);

fn conv(g: &GraphProto, ctx: &Ctx, n: &NodeProto, inits: &mut Vec<TensorProto>) -> Option<Rewrite> {
    let x = dq_of(g, ctx, n.input.first()?)?;
    let w = dq_of(g, ctx, n.input.get(1)?)?;
    x.zp.as_ref()?;
    let xs = const_f32(&ctx.consts, &x.scale)?;
    let ws = const_f32(&ctx.consts, &w.scale)?;
    if xs.len() != 1 || (ws.len() > 1 && w.axis != 0) || !ctx.consts.contains_key(&w.x) {
        return None;
    }
    let q = single_q(g, ctx, &n.output[0])?;
    let qn = &g.node[q];
    let out = &n.output[0];
    let wzp = zp_or_zero(ctx, &w, &format!("{out}__fedge_wzp"), inits)?;
    let mut inputs = vec![
        x.x.clone(),
        x.scale.clone(),
        x.zp.clone()?,
        w.x.clone(),
        w.scale.clone(),
        wzp,
        qn.input[1].clone(),
        qn.input[2].clone(),
    ];
    if let Some(b) = n.input.get(2).filter(|s| !s.is_empty()) {
        let bias = int32_bias(g, ctx, b, xs[0], &ws)?;
        let name = format!("{out}__fedge_bias");
        inits.push(i32_tensor(&name, &[bias.len() as i64], &bias));
        inputs.push(name);
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let new = node(
        "QLinearConv",
        format!("{}__fedge_qconv", n.name),
        &inputs,
        &[&qn.output[0]],
        n.attribute.clone(),
    );
    Some((vec![new], vec![q]))
}

fn matmul(g: &GraphProto, ctx: &Ctx, n: &NodeProto) -> Option<Rewrite> {
    let a = dq_of(g, ctx, n.input.first()?)?;
    let b = dq_of(g, ctx, n.input.get(1)?)?;
    let (azp, bzp) = (a.zp.clone()?, b.zp.clone()?);
    let as_ = const_f32(&ctx.consts, &a.scale)?;
    let bs = const_f32(&ctx.consts, &b.scale)?;
    if as_.len() != 1 || (bs.len() > 1 && b.axis != 1) {
        return None;
    }
    let q = single_q(g, ctx, &n.output[0])?;
    let qn = &g.node[q];
    let inputs = [
        &a.x,
        &a.scale,
        &azp,
        &b.x,
        &b.scale,
        &bzp,
        &qn.input[1],
        &qn.input[2],
    ];
    let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
    let new = node(
        "QLinearMatMul",
        format!("{}__fedge_qmm", n.name),
        &inputs,
        &[&qn.output[0]],
        vec![],
    );
    Some((vec![new], vec![q]))
}

/// `DQ(x) · DQ(W)ᵀ + b → Q` as MatMulInteger, int32 bias, scale and QuantizeLinear.
fn gemm(g: &GraphProto, ctx: &Ctx, n: &NodeProto, inits: &mut Vec<TensorProto>) -> Option<Rewrite> {
    let plain = attr_i(n, "transA").unwrap_or(0) == 0
        && n.attribute
            .iter()
            .filter(|a| a.name == "alpha" || a.name == "beta")
            .all(|a| a.f == 1.0);
    let x = dq_of(g, ctx, n.input.first()?)?;
    let w = dq_of(g, ctx, n.input.get(1)?)?;
    let xs = const_f32(&ctx.consts, &x.scale)?;
    let ws = const_f32(&ctx.consts, &w.scale)?;
    let trans_b = attr_i(n, "transB").unwrap_or(0) != 0;
    let per_col_axis = if trans_b { 0 } else { 1 };
    if !plain || xs.len() != 1 || (ws.len() > 1 && w.axis != per_col_axis) {
        return None;
    }
    let q = single_q(g, ctx, &n.output[0])?;
    let qn = &g.node[q];
    let out = n.output[0].clone();
    let wt = load(ctx.consts.get(&w.x)?)?;
    let wt = if trans_b {
        wt.move_axis(1, 0).ok()?
    } else {
        wt
    };
    let dims: Vec<i64> = wt.shape().iter().map(|&d| d as i64).collect();
    let wname = format!("{out}__fedge_wq");
    inits.push(super::graph::raw_tensor(
        &wname,
        const_type(ctx, &w.x)?,
        &dims,
        raw_bytes(&wt)?,
    ));
    let wzp = zp_or_zero(ctx, &w, &format!("{out}__fedge_wzp"), inits)?;
    let t = |s: &str| format!("{out}__fedge_gemm_{s}");
    let scale: Vec<f32> = ws.iter().map(|s| s * xs[0]).collect();
    inits.push(f32_tensor(&t("scale"), &[scale.len() as i64], &scale));
    let mut nodes = vec![node(
        "MatMulInteger",
        t("mmi"),
        &[&x.x, &wname, x.zp.as_deref()?, &wzp],
        &[&t("acc")],
        vec![],
    )];
    let mut acc = t("acc");
    if let Some(b) = n.input.get(2).filter(|s| !s.is_empty()) {
        let bias = int32_bias(g, ctx, b, xs[0], &ws)?;
        inits.push(i32_tensor(&t("bias"), &[bias.len() as i64], &bias));
        nodes.push(node(
            "Add",
            t("addb"),
            &[&acc, &t("bias")],
            &[&t("accb")],
            vec![],
        ));
        acc = t("accb");
    }
    nodes.push(node(
        "Cast",
        t("cast"),
        &[&acc],
        &[&t("accf")],
        vec![int_attr("to", FLOAT as i64)],
    ));
    nodes.push(node(
        "Mul",
        t("mul"),
        &[&t("accf"), &t("scale")],
        &[&t("yf")],
        vec![],
    ));
    nodes.push(node(
        "QuantizeLinear",
        t("q"),
        &[&t("yf"), &qn.input[1], &qn.input[2]],
        &[&qn.output[0]],
        vec![],
    ));
    Some((nodes, vec![q]))
}

fn raw_bytes(t: &tract_onnx::prelude::Tensor) -> Option<Vec<u8>> {
    (t.datum_type().size_of() == 1).then(|| t.as_bytes().to_vec())
}

/// `Softmax → fake-quantize in float → Q`: the same integers, and no fused quantized softmax.
fn softmax(
    g: &GraphProto,
    ctx: &Ctx,
    n: &NodeProto,
    inits: &mut Vec<TensorProto>,
) -> Option<Rewrite> {
    let q = single_q(g, ctx, &n.output[0])?;
    let qn = &g.node[q];
    let s = const_f32(&ctx.consts, &qn.input[1])?;
    let zp_t = load(ctx.consts.get(&qn.input[2])?)?;
    let (lo, hi) = match onnx_type(zp_t.datum_type())? {
        super::graph::UINT8 => (0.0, 255.0),
        super::graph::INT8 => (-128.0, 127.0),
        _ => return None,
    };
    let zp = const_f32(&ctx.consts, &qn.input[2])?;
    if s.len() != 1 || zp.len() != 1 {
        return None;
    }
    let base = qn.output[0].clone();
    let t = |k: &str| format!("{base}__fedge_sm_{k}");
    for (k, v) in [("s", s[0]), ("zp", zp[0]), ("lo", lo), ("hi", hi)] {
        inits.push(f32_tensor(&t(k), &[], &[v]));
    }
    let mut nodes = vec![
        node(
            "Div",
            t("div"),
            &[&n.output[0], &t("s")],
            &[&t("a")],
            vec![],
        ),
        node("Round", t("round"), &[&t("a")], &[&t("b")], vec![]),
        node("Add", t("add"), &[&t("b"), &t("zp")], &[&t("c")], vec![]),
        node("Max", t("max"), &[&t("c"), &t("lo")], &[&t("d")], vec![]),
        node("Min", t("min"), &[&t("d"), &t("hi")], &[&t("e")], vec![]),
        node("Sub", t("sub"), &[&t("e"), &t("zp")], &[&t("f")], vec![]),
        node("Mul", t("mul"), &[&t("f"), &t("s")], &[&t("y")], vec![]),
    ];
    nodes.insert(0, n.clone());
    // The QuantizeLinear stays, now fed values already on its grid: same integers out.
    let mut requant = qn.clone();
    requant.input[0] = t("y");
    nodes.push(requant);
    Some((nodes, vec![q]))
}
