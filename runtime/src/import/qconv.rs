//! Exact int8 convolutions on fedge's integer kernel (CPU backend, AVX2): the three ops
//! `import::qexact` and `import::conv` leave for a `QLinearConv` whose sums fit,
//!
//! ```text
//! DequantizeLinear(x, 1, x_zp) → FedgeConv(·, w - w_zp, bias) → FedgeRequantize(m, y_zp)
//! ```
//!
//! become one `FedgeQConv` (`crate::qconv`) that reads the 8-bit input, sums in i32 and writes
//! the 8-bit output with the same requantisation. The float kernel's weights and bias are
//! integers by construction; the rewrite checks that and that the intermediate values have no
//! other reader, and leaves the three ops otherwise.
//!
//! The dynamic quantizer's `ConvInteger` (`quantize_dynamic`) arrives as
//!
//! ```text
//! DynamicQuantizeLinear(x) → (x_q, x_scale, x_zp)
//! Sub(Cast(x_q, f32), Cast(x_zp, f32)) → FedgeConv(·, w - w_zp, 0) → FedgeScaleBias(·, s)
//! ```
//!
//! (`s = x_scale · w_scale`, with a bias and perhaps a hard-swish folded in); it becomes one
//! `FedgeQConv` that takes `x_q`, `x_zp` and `s` at run time and writes the floats
//! `FedgeScaleBias` wrote, bit for bit.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::graph::{
    FLOAT, INT8, UINT8, attr, const_f32, constants, consumers, i32_tensor, int_attr,
    is_graph_output, producers,
};
use crate::conv::{Activation, CONV, ROWS};
use crate::qconv::{QCONV, pack};
use crate::tract_ops::{DYNAMIC_QUANTIZE_LINEAR, REQUANTIZE, SCALE_BIAS};

/// The one reader of `name`, unless it is a graph output or has others.
fn sole(g: &GraphProto, readers: &HashMap<String, Vec<usize>>, name: &str) -> Option<usize> {
    match readers.get(name)?.as_slice() {
        [i] if !is_graph_output(g, name) => Some(*i),
        _ => None,
    }
}

/// A constant's one value.
fn scalar(consts: &HashMap<String, TensorProto>, name: &str) -> Option<f32> {
    match const_f32(consts, name)?[..] {
        [v] => Some(v),
        _ => None,
    }
}

/// The replacement for the `FedgeConv` at `i`: the `FedgeQConv` node, its kernel and bias,
/// and the indices of the dequantize and requantize nodes it absorbs.
fn fuse(
    g: &GraphProto,
    i: usize,
    consts: &HashMap<String, TensorProto>,
    made: &HashMap<String, usize>,
    readers: &HashMap<String, Vec<usize>>,
) -> Option<(NodeProto, [TensorProto; 2], [usize; 2])> {
    let conv = &g.node[i];
    if conv.input.len() != 3 || conv.output.len() != 1 {
        return None;
    }
    if Activation::from_node(conv, CONV).ok()? != Activation::Identity {
        return None;
    }
    let d = *made.get(&conv.input[0])?;
    let dq = &g.node[d];
    if dq.op_type != "DequantizeLinear"
        || !dq.domain.is_empty()
        || dq.input.len() != 3
        || sole(g, readers, &dq.output[0]) != Some(i)
        || scalar(consts, &dq.input[1])? != 1.0
    {
        return None;
    }
    let zp_t = consts.get(&dq.input[2])?;
    if zp_t.data_type != UINT8 && zp_t.data_type != INT8 {
        return None;
    }
    let x_zp = scalar(consts, &dq.input[2])? as i64;
    let r = sole(g, readers, &conv.output[0])?;
    let rq = &g.node[r];
    if rq.op_type != REQUANTIZE || rq.input.len() != 1 || attr(rq, "axis").is_none_or(|a| a.i != 1)
    {
        return None;
    }
    let b = const_f32(consts, &conv.input[2])?;
    let m = b.len();
    let mut mult = attr(rq, "m")?.floats.clone();
    if mult.len() == 1 {
        mult = vec![mult[0]; m];
    }
    if mult.len() != m {
        return None;
    }
    let mut m_attr = attr(rq, "m")?.clone();
    m_attr.floats = mult;
    let mut attributes = vec![int_attr("x_zero_point", x_zp), m_attr];
    for name in ["zero_point", "signed"] {
        attributes.push(int_attr(name, attr(rq, name).map_or(0, |a| a.i)));
    }
    let (node, inits) = qconv_node(
        conv,
        consts,
        vec![dq.input[0].clone()],
        &rq.output[0],
        attributes,
    )?;
    Some((node, inits, [d, r]))
}

/// The replacement for the `FedgeConv` at `i` when it is the dynamic quantizer's
/// `ConvInteger` as `qexact` and `scalebias` leave it,
///
/// ```text
/// Sub(Cast(x, f32), Cast(x_zp, f32)) → FedgeConv(·, w - w_zp, b) → FedgeScaleBias(·, s)
/// ```
///
/// with `x` and `x_zp` a `DynamicQuantizeLinear`'s: a `FedgeQConv` that reads `x`, `x_zp` and
/// `s` and writes the float output. Also returns the indices of the nodes it absorbs, the
/// scale-bias last (where the fused node goes: every input is computed before it).
fn fuse_dynamic(
    g: &GraphProto,
    i: usize,
    consts: &HashMap<String, TensorProto>,
    made: &HashMap<String, usize>,
    readers: &HashMap<String, Vec<usize>>,
) -> Option<(NodeProto, [TensorProto; 2], Vec<usize>)> {
    let conv = &g.node[i];
    if conv.input.len() != 3 || conv.output.len() != 1 {
        return None;
    }
    if Activation::from_node(conv, CONV).ok()? != Activation::Identity {
        return None;
    }
    let plain = |n: &NodeProto, op: &str, inputs: usize| {
        n.op_type == op && n.domain.is_empty() && n.input.len() == inputs && n.output.len() == 1
    };
    let sub = *made.get(&conv.input[0])?;
    let sn = &g.node[sub];
    if !plain(sn, "Sub", 2) || sole(g, readers, &sn.output[0]) != Some(i) {
        return None;
    }
    // Both operands are casts to float read by the subtraction alone.
    let cast_of = |name: &str| -> Option<(usize, &str)> {
        let j = *made.get(name)?;
        let n = &g.node[j];
        (plain(n, "Cast", 1)
            && attr(n, "to").is_some_and(|a| a.i == FLOAT as i64)
            && sole(g, readers, name) == Some(sub))
        .then_some((j, n.input[0].as_str()))
    };
    let (xc, x) = cast_of(&sn.input[0])?;
    let (zc, zp) = cast_of(&sn.input[1])?;
    // The dynamic quantizer's bytes and zero point (outputs 0 and 2 of one node).
    let q = &g.node[*made.get(x)?];
    if !matches!(
        q.op_type.as_str(),
        "DynamicQuantizeLinear" | DYNAMIC_QUANTIZE_LINEAR
    ) || q.output.first().map(String::as_str) != Some(x)
        || q.output.get(2).map(String::as_str) != Some(zp)
    {
        return None;
    }
    let r = sole(g, readers, &conv.output[0])?;
    let sb = &g.node[r];
    if sb.op_type != SCALE_BIAS
        || sb.input.len() != 2
        || sb.output.len() != 1
        || attr(sb, "axis").map_or(1, |a| a.i) != 1
    {
        return None;
    }
    let mut attributes = vec![
        int_attr("x_zero_point_input", 1),
        int_attr("float_output", 1),
    ];
    attributes.extend(
        sb.attribute
            .iter()
            .filter(|a| {
                matches!(
                    a.name.as_str(),
                    "bias" | "mul" | "add" | "hard_swish" | "clip_swish"
                )
            })
            .cloned(),
    );
    let m = const_f32(consts, &conv.input[2])?.len();
    for name in ["bias", "mul", "add"] {
        let n = attr(sb, name).map_or(0, |a| a.floats.len());
        if n > 1 && n != m {
            return None;
        }
    }
    let inputs = vec![x.to_string(), zp.to_string(), sb.input[1].clone()];
    let (node, inits) = qconv_node(conv, consts, inputs, &sb.output[0], attributes)?;
    Some((node, inits, vec![xc, zc, sub, r]))
}

/// A `FedgeQConv` node for the `FedgeConv` `conv` (its window, integer kernel and bias
/// repacked) reading `inputs` (the 8-bit input first, then what goes after kernel and bias)
/// and writing `output`, with `attributes` beyond the window's; and its kernel and bias.
fn qconv_node(
    conv: &NodeProto,
    consts: &HashMap<String, TensorProto>,
    mut inputs: Vec<String>,
    output: &str,
    mut attributes: Vec<AttributeProto>,
) -> Option<(NodeProto, [TensorProto; 2])> {
    let b = const_f32(consts, &conv.input[2])?;
    let m = b.len();
    let kernel = attr(conv, "kernel_shape")?.ints.clone();
    let [kh, kw] = kernel[..] else { return None };
    let points = usize::try_from(kh * kw).ok()?;
    let packed = const_f32(consts, &conv.input[1])?;
    let taps = packed.len() / (m.div_ceil(ROWS) * ROWS).max(1);
    if m == 0 || points == 0 || !taps.is_multiple_of(points) {
        return None;
    }
    let c = taps / points;
    // Back from `FedgeConv`'s blocks of ROWS channels to `[M, C, points]`, as integers.
    let int = |v: f32| (v == v.round() && v.abs() <= 32767.0).then_some(v as i32);
    let mut k = vec![0i32; m * taps];
    for (o, row) in k.chunks_exact_mut(taps).enumerate() {
        let block = &packed[(o / ROWS) * taps * ROWS..];
        for (t, w) in row.iter_mut().enumerate() {
            *w = int(block[t * ROWS + o % ROWS])?;
        }
    }
    let bias: Vec<i32> = b
        .iter()
        .map(|&v| (v == v.round() && v.abs() < 16_777_216.0).then_some(v as i32))
        .collect::<Option<_>>()?;
    let (words, shape) = pack(&k, m, c, points)?;
    let base = format!("{output}_fedge_qconv");
    let (k_name, b_name) = (format!("{base}_w"), format!("{base}_b"));
    let words: Vec<i32> = words.iter().map(|&w| w as i32).collect();
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    attributes.extend(
        conv.attribute
            .iter()
            .filter(|a| {
                matches!(
                    a.name.as_str(),
                    "strides" | "dilations" | "pads" | "kernel_shape"
                )
            })
            .cloned(),
    );
    inputs.splice(1..1, [k_name.clone(), b_name.clone()]);
    let node = NodeProto {
        op_type: QCONV.into(),
        domain: "ai.fedge".into(),
        name: base,
        input: inputs,
        output: vec![output.to_string()],
        attribute: attributes,
        ..Default::default()
    };
    Some((
        node,
        [
            i32_tensor(&k_name, &shape, &words),
            i32_tensor(&b_name, &[m as i64], &bias),
        ],
    ))
}

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    if !crate::conv::fast() {
        return;
    }
    let consts = constants(g);
    let made = producers(g);
    let readers = consumers(g);
    let mut drop = HashSet::new();
    let mut replaced = HashSet::new();
    let (mut done, mut dynamic) = (0usize, 0usize);
    for i in 0..g.node.len() {
        if g.node[i].op_type != CONV || g.node[i].domain != "ai.fedge" {
            continue;
        }
        // The fused node, its constants, the nodes it absorbs and where it goes.
        let (node, inits, mut absorbed, at) =
            if let Some((node, inits, absorbed)) = fuse(g, i, &consts, &made, &readers) {
                (node, inits, absorbed.to_vec(), i)
            } else if let Some((node, inits, mut absorbed)) =
                fuse_dynamic(g, i, &consts, &made, &readers)
            {
                let at = absorbed.pop().expect("the scale-bias");
                absorbed.push(i);
                dynamic += 1;
                (node, inits, absorbed, at)
            } else {
                continue;
            };
        absorbed.push(at);
        for &j in &absorbed {
            replaced.extend(g.node[j].input.iter().skip(1).cloned());
            if j != at {
                drop.insert(j);
            }
        }
        g.node[at] = node;
        g.initializer.extend(inits);
        done += 1;
    }
    if done == 0 {
        return;
    }
    let mut index = 0;
    g.node.retain(|_| {
        index += 1;
        !drop.contains(&(index - 1))
    });
    let mut read = HashSet::new();
    super::graph::names_read(g, &mut read);
    g.initializer
        .retain(|t| !replaced.contains(&t.name) || read.contains(&t.name));
    report.push(format!(
        "ran {done} int8 Conv as {QCONV} (integer sums; {} requantised from the accumulator, \
         {dynamic} with the dynamic quantizer's zero point, scale and bias)",
        done - dynamic
    ));
}

#[cfg(test)]
mod tests {
    use crate::testutil::{lcg, value_info};
    use prost::Message;
    use tract_onnx::pb::{ModelProto, OperatorSetIdProto};

    use super::super::graph::{f32_tensor, float_attr, ints_attr, node, raw_tensor};
    use super::*;
    use crate::{Model, ModelOptions, Tensor};

    const CI: usize = 5;
    const CO: usize = 6;
    const H: usize = 9;
    const W: usize = 11;

    /// `quantize_dynamic`'s pattern twice on one quantized input: a padded 3 × 3
    /// `ConvInteger` with scale, per-channel bias and hard-swish (`y3`), and a 1 × 1 one with
    /// scale and bias (`y1`).
    fn dynamic_model(w3: &[i8], w1: &[i8], b: &[f32]) -> Vec<u8> {
        let co = CO as i64;
        let mut n = vec![
            node(
                "DynamicQuantizeLinear",
                "dql".into(),
                &["x"],
                &["xq", "xs", "xz"],
                vec![],
            ),
            node("Mul", "s".into(), &["xs", "ws"], &["s"], vec![]),
        ];
        for (k, tail) in [("3", true), ("1", false)] {
            let name = |s: &str| format!("{s}{k}");
            let mut attrs = vec![];
            if tail {
                attrs.push(ints_attr("pads", &[1, 1, 1, 1]));
            }
            n.push(node(
                "ConvInteger",
                name("conv"),
                &["xq", &name("w"), "xz", "wz"],
                &[&name("acc")],
                attrs,
            ));
            n.push(node(
                "Cast",
                name("cast"),
                &[&name("acc")],
                &[&name("f")],
                vec![int_attr("to", 1)],
            ));
            n.push(node(
                "Mul",
                name("mul"),
                &[&name("f"), "s"],
                &[&name("m")],
                vec![],
            ));
            let out = if tail { name("z") } else { name("y") };
            n.push(node(
                "Add",
                name("add"),
                &[&name("m"), "b"],
                &[&out],
                vec![],
            ));
            if tail {
                n.push(node(
                    "HardSigmoid",
                    name("hs"),
                    &[&out],
                    &[&name("h")],
                    vec![float_attr("alpha", 1.0 / 6.0), float_attr("beta", 0.5)],
                ));
                n.push(node(
                    "Mul",
                    name("swish"),
                    &[&out, &name("h")],
                    &[&name("y")],
                    vec![],
                ));
            }
        }
        let bytes = |v: &[i8]| v.iter().map(|&b| b as u8).collect::<Vec<u8>>();
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "d".into(),
                node: n,
                initializer: vec![
                    raw_tensor("w3", INT8, &[co, CI as i64, 3, 3], bytes(w3)),
                    raw_tensor("w1", INT8, &[co, CI as i64, 1, 1], bytes(w1)),
                    raw_tensor("wz", INT8, &[], vec![3]),
                    f32_tensor("ws", &[], &[0.0123]),
                    f32_tensor("b", &[co, 1, 1], b),
                ],
                input: vec![value_info("x", FLOAT, &[1, CI, H, W])],
                output: vec![
                    value_info("y3", FLOAT, &[1, CO, H, W]),
                    value_info("y1", FLOAT, &[1, CO, H, W]),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn dynamic_conv_integer_runs_as_one_integer_op_with_the_same_bits() {
        let mut seed = 11;
        let x: Vec<f32> = (0..CI * H * W)
            .map(|_| (lcg(&mut seed) % 3000) as f32 / 400.0 - 2.5)
            .collect();
        let w3: Vec<i8> = (0..CO * CI * 9).map(|_| lcg(&mut seed) as i8).collect();
        let w1: Vec<i8> = (0..CO * CI).map(|_| lcg(&mut seed) as i8).collect();
        let b: Vec<f32> = (0..CO).map(|c| c as f32 * 0.7 - 2.0).collect();
        let m = Model::from_bytes(&dynamic_model(&w3, &w1, &b), &ModelOptions::default())
            .expect("load");
        let rewrites = m.graph().rewrites();
        assert_eq!(
            rewrites
                .iter()
                .any(|r| r.contains("2 with the dynamic quantizer's zero point")),
            crate::conv::fast(),
            "{rewrites:?}"
        );
        let out = m
            .run(&[Tensor::new(&[1, CI, H, W], &x).expect("x")])
            .expect("run");
        // onnxruntime's `DynamicQuantizeLinear`, the sums in i64, then each float step.
        let (lo, hi) = x
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let xs = (hi - lo) / 255.0;
        let xz = (0.0 - lo / xs).clamp(0.0, 255.0).round_ties_even();
        let q: Vec<i64> = x
            .iter()
            .map(|&v| ((v / xs).round_ties_even() + xz).clamp(0.0, 255.0) as i64 - xz as i64)
            .collect();
        let s = xs * 0.0123;
        for (o, (w, k, swish)) in [(&w3, 3usize, true), (&w1, 1, false)].iter().enumerate() {
            let pad = k / 2;
            let mut want = Vec::new();
            for c in 0..CO {
                for y in 0..H {
                    for xx in 0..W {
                        let mut acc = 0i64;
                        for ci in 0..CI {
                            for ky in 0..*k {
                                for kx in 0..*k {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy < pad || ix < pad || iy - pad >= H || ix - pad >= W {
                                        continue;
                                    }
                                    let xv = q[(ci * H + iy - pad) * W + ix - pad];
                                    let wv = w[((c * CI + ci) * k + ky) * k + kx] as i64 - 3;
                                    acc += xv * wv;
                                }
                            }
                        }
                        let mut v = acc as f32 * s + b[c];
                        if *swish {
                            v *= (v * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0);
                        }
                        want.push(v.to_bits());
                    }
                }
            }
            let got: Vec<u32> = out[o]
                .to_vec::<f32>()
                .expect("f32")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "output {o}");
        }
    }
}
