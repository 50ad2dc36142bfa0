//! `QLinearConv` and `QLinearMatMul` with constant weights on tract's float kernels, with
//! onnxruntime's integer results.
//!
//! tract 0.23.9's int8 kernels widen to i32 and measured 14-40× slower than its float ones on
//! x86-64. The float kernels give the integer answer when they see integers: the input minus its
//! zero point and the kernel minus its zero points are integers, every product is exact in f32,
//! and every partial sum is exact while the sum of absolute values stays within 2^24. This
//! rewrite checks that bound per output channel from the constant kernel and the input type's
//! range, and only then replaces the node by
//!
//! ```text
//! DequantizeLinear(x, 1, x_zp) → Conv/MatMul(·, w - w_zp [, bias]) → FedgeRequantize(m, y_zp)
//! ```
//!
//! where `FedgeRequantize` is onnxruntime's requantisation in one pass
//! (`saturate(round_half_even(acc · m[c]) + y_zp)` with `m[c] = x_s · w_s[c] / y_s`, saturated)
//! applied to the exact accumulator. Sums that could pass 2^24 are split into exact slices
//! added in i32, and a bias past 2^24 joins in i32. Nodes that fail the bound, or whose scales,
//! zero points or kernel are not constants, keep tract's integer kernels.

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::graph::{
    FLOAT, INT8, INT32, UINT8, constants, f32_tensor, floats_attr, i32_tensor, i64_tensor,
    int_attr, load, node,
};
use crate::tract_ops::REQUANTIZE;

/// Largest integer below which every f32 partial sum of integers is exact.
const EXACT: f64 = 16_777_216.0;

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    let consts = constants(g);
    let mut types = input_types(g, &consts);
    // Values known to be scalars at run time: the zero points DynamicQuantizeLinear computes.
    let mut scalars = std::collections::HashSet::new();
    for n in g
        .node
        .iter()
        .filter(|n| n.op_type == "DynamicQuantizeLinear" && n.domain.is_empty())
    {
        if let Some(y) = n.output.first() {
            types.insert(y.clone(), UINT8);
        }
        if let Some(zp) = n.output.get(2).filter(|s| !s.is_empty()) {
            types.insert(zp.clone(), UINT8);
            scalars.insert(zp.clone());
        }
    }
    let mut inits = Vec::new();
    let mut counts = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    let mut out = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let op = match n.op_type.as_str() {
            "QLinearConv" if n.domain.is_empty() && n.input.len() >= 8 => "QLinearConv",
            "QLinearMatMul" if n.domain.is_empty() && n.input.len() == 8 => "QLinearMatMul",
            "ConvInteger" if n.domain.is_empty() && (2..=4).contains(&n.input.len()) => {
                "ConvInteger"
            }
            "MatMulInteger" if n.domain.is_empty() && (2..=4).contains(&n.input.len()) => {
                "MatMulInteger"
            }
            _ => {
                out.push(n);
                continue;
            }
        };
        let entry = counts.entry(op).or_default();
        let done = match op {
            "QLinearConv" | "QLinearMatMul" => {
                exact(&n, op == "QLinearConv", &consts, &types, &mut inits)
            }
            _ => integer(
                &n,
                op == "ConvInteger",
                &consts,
                &types,
                &scalars,
                &mut inits,
            ),
        };
        match done {
            Some(nodes) => {
                entry.0 += 1;
                out.extend(nodes);
            }
            None => {
                entry.1 += 1;
                out.push(n);
            }
        }
    }
    g.node = out;
    g.initializer.extend(inits);
    for (op, (done, kept)) in counts {
        if done > 0 {
            report.push(format!(
                "ran {done} {op} on float kernels with exact integer accumulation{}",
                if kept > 0 {
                    format!(
                        " ({kept} kept on integer kernels: run-time or unsupported parameters, \
                         or sums that could pass 2^24)"
                    )
                } else {
                    String::new()
                }
            ));
        }
    }
}

/// ONNX element type of each value whose type is declared or constant.
fn input_types(g: &GraphProto, consts: &HashMap<String, TensorProto>) -> HashMap<String, i32> {
    let mut out: HashMap<String, i32> = consts
        .iter()
        .map(|(k, t)| (k.clone(), t.data_type))
        .collect();
    for v in g.input.iter().chain(&g.value_info).chain(&g.output) {
        if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            out.insert(v.name.clone(), t.elem_type);
        }
    }
    out
}

fn values(consts: &HashMap<String, TensorProto>, name: &str) -> Option<(Vec<f64>, Vec<usize>)> {
    let t = load(consts.get(name)?)?;
    let shape = t.shape().to_vec();
    let t = t.cast_to::<f64>().ok()?;
    let v = t.try_as_plain_ram().ok()?.as_slice::<f64>().ok()?.to_vec();
    Some((v, shape))
}

fn f32s(consts: &HashMap<String, TensorProto>, name: &str) -> Option<Vec<f32>> {
    super::graph::const_f32(consts, name)
}

fn exact(
    n: &NodeProto,
    conv: bool,
    consts: &HashMap<String, TensorProto>,
    types: &HashMap<String, i32>,
    inits: &mut Vec<TensorProto>,
) -> Option<Vec<NodeProto>> {
    let input = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
    let x_type = consts
        .get(input(2))
        .map(|t| t.data_type)
        .or_else(|| types.get(input(0)).copied())?;
    let x_zp = f32s(consts, input(2))?;
    let [x_zp] = x_zp[..] else { return None };
    let x_scale = f32s(consts, input(1))?;
    let [x_scale] = x_scale[..] else { return None };
    let y_scale = f32s(consts, input(6))?;
    let [y_scale] = y_scale[..] else { return None };
    let y_zp_type = consts.get(input(7))?.data_type;
    if y_zp_type != UINT8 && y_zp_type != INT8 {
        return None;
    }
    let y_zp = f32s(consts, input(7))?;
    let [y_zp] = y_zp[..] else { return None };
    let w_scale = f32s(consts, input(4))?;
    let (w, w_shape) = values(consts, input(3))?;
    let w_zp = values(consts, input(5))
        .map(|v| v.0)
        .unwrap_or_else(|| vec![0.0]);
    // Output channels: Conv's first kernel axis, MatMul's last (after any batch axes).
    let (channels, _, batches) = kernel_axes(conv, &w_shape)?;
    let per = |v: &[f32], c: usize| -> Option<f32> {
        match v.len() {
            1 => Some(v[0]),
            l if l == channels => Some(v[c]),
            _ => None,
        }
    };
    let per64 = |v: &[f64], c: usize| -> Option<f64> {
        match v.len() {
            1 => Some(v[0]),
            l if l == channels => Some(v[c]),
            _ => None,
        }
    };
    let x_zp = x_zp as f64;
    let x_max = if x_type == UINT8 {
        x_zp.max(255.0 - x_zp)
    } else {
        (x_zp + 128.0).max(127.0 - x_zp)
    };
    let bias = if conv && !input(8).is_empty() {
        Some(values(consts, input(8))?.0)
    } else {
        None
    };
    // The kernel minus its zero point, in the float op's layout, and the bound per channel.
    let (wf, sums) = centred_kernel(&w, &w_shape, &w_zp, conv)?;
    let mut m = Vec::with_capacity(channels);
    // `fits`: sums and bias within 2^24; `fits_sums`: the sums alone (the bias then joins in
    // i32, where onnxruntime adds it too; quantizers clip biases near ±2^31).
    let (mut fits, mut fits_sums) = (true, true);
    for (c, &sum) in sums.iter().enumerate() {
        let b = bias.as_ref().map_or(Some(0.0), |b| per64(b, c))?;
        fits &= sum * x_max + b.abs() < EXACT;
        fits_sums &= sum * x_max < EXACT;
        // onnxruntime's multiplier, in its f32 order of operations.
        m.push(x_scale * per(&w_scale, c)? / y_scale);
    }
    // Sums that could pass 2^24: split the reduction (input channels of a plain convolution,
    // rows of a matrix product) into slices whose sums cannot, and add their exact partial
    // sums in i32.
    let chunks = if fits || fits_sums {
        None
    } else {
        let group = if conv {
            n.attribute
                .iter()
                .find(|a| a.name == "group")
                .map_or(1, |a| a.i)
        } else {
            1
        };
        if group != 1 || batches != 1 {
            return None;
        }
        Some(split(&wf, &w_shape, conv, x_max)?)
    };
    let bias_in_float = fits && chunks.is_none();
    let tmp = |what: &str| format!("{}__fedge_qx_{what}", n.output[0]);
    let dims: Vec<i64> = w_shape.iter().map(|&d| d as i64).collect();
    inits.push(f32_tensor(&tmp("one"), &[], &[1.0]));
    let xf = tmp("x");
    let acc = tmp("acc");
    let mut nodes = vec![node(
        "DequantizeLinear",
        xf.clone(),
        &[input(0), &tmp("one"), input(2)],
        &[&xf],
        vec![],
    )];
    let b_name = tmp("b");
    if let Some(b) = &bias {
        let b: Vec<f32> = (0..channels)
            .map(|c| per64(b, c).map(|v| v as f32))
            .collect::<Option<_>>()?;
        inits.push(f32_tensor(&b_name, &[channels as i64], &b));
    }
    let (op, attrs) = if conv {
        ("Conv", n.attribute.clone())
    } else {
        ("MatMul", vec![])
    };
    let acc_i = tmp("acc_i32");
    let cast_i32 = |from: &str, to: &str| {
        node(
            "Cast",
            format!("{to}_cast"),
            &[from],
            &[to],
            vec![int_attr("to", INT32 as i64)],
        )
    };
    match &chunks {
        None => {
            inits.push(f32_tensor(&tmp("w"), &dims, &wf));
            let w_name = tmp("w");
            let mut op_in: Vec<&str> = vec![&xf, &w_name];
            if bias.is_some() && bias_in_float {
                op_in.push(&b_name);
            }
            nodes.push(node(op, tmp(op), &op_in, &[&acc], attrs));
            if !bias_in_float {
                nodes.push(cast_i32(&acc, &tmp("sums_i32")));
            }
        }
        Some(chunks) => {
            let axis: i64 = if conv { 1 } else { -1 };
            let mut partial = Vec::new();
            for (i, &(start, end)) in chunks.iter().enumerate() {
                let (xs, ws, a, ai) = (
                    tmp(&format!("x{i}")),
                    tmp(&format!("w{i}")),
                    tmp(&format!("acc{i}")),
                    tmp(&format!("acc{i}_i32")),
                );
                let bounds = [tmp(&format!("s{i}")), tmp(&format!("e{i}")), tmp("axis")];
                inits.push(i64_tensor(&bounds[0], &[1], &[start as i64]));
                inits.push(i64_tensor(&bounds[1], &[1], &[end as i64]));
                nodes.push(node(
                    "Slice",
                    xs.clone(),
                    &[&xf, &bounds[0], &bounds[1], &bounds[2]],
                    &[&xs],
                    vec![],
                ));
                let (piece, piece_dims) = slice_kernel(&wf, &w_shape, conv, start, end);
                inits.push(f32_tensor(&ws, &piece_dims, &piece));
                let op_in: Vec<&str> = vec![&xs, &ws];
                nodes.push(node(op, a.clone(), &op_in, &[&a], attrs.clone()));
                nodes.push(cast_i32(&a, &ai));
                partial.push(ai);
            }
            inits.push(i64_tensor(&tmp("axis"), &[1], &[axis]));
            let mut total = partial[0].clone();
            for (i, p) in partial.iter().enumerate().skip(1) {
                let sum = if i + 1 == partial.len() {
                    tmp("sums_i32")
                } else {
                    tmp(&format!("sum{i}"))
                };
                nodes.push(node("Add", sum.clone(), &[&total, p], &[&sum], vec![]));
                total = sum;
            }
        }
    }
    // The accumulator: the float op's exact f32 output, or the i32 sum of slices and bias.
    let acc_in = match &bias {
        Some(b) if !bias_in_float => {
            let b: Vec<i32> = (0..channels)
                .map(|c| per64(b, c).map(|v| v as i32))
                .collect::<Option<_>>()?;
            let b_dims: Vec<i64> = if conv {
                std::iter::once(channels as i64)
                    .chain(std::iter::repeat_n(1, w_shape.len() - 2))
                    .collect()
            } else {
                vec![channels as i64]
            };
            inits.push(i32_tensor(&tmp("b_i32"), &b_dims, &b));
            nodes.push(node(
                "Add",
                tmp("bias_add"),
                &[&tmp("sums_i32"), &tmp("b_i32")],
                &[&acc_i],
                vec![],
            ));
            acc_i
        }
        _ if chunks.is_some() => tmp("sums_i32"),
        _ => acc,
    };
    // onnxruntime's requantisation in one pass: `saturate(round_half_even(acc · m[c]) + y_zp)`.
    // An op of fedge's own, so tract cannot fold the multiplier into the kernel's weights
    // (which would scale every product before the sum and lose the exact accumulator).
    let mut rq = node(
        REQUANTIZE,
        tmp("requantize"),
        &[&acc_in],
        &[&n.output[0]],
        vec![
            floats_attr("m", &m),
            int_attr("axis", if conv { 1 } else { -1 }),
            int_attr("zero_point", y_zp as i64),
            int_attr("signed", i64::from(y_zp_type == INT8)),
        ],
    );
    rq.domain = "ai.fedge".into();
    nodes.push(rq);
    Some(nodes)
}

/// Slices of the reduction axis (a convolution's input channels, a matrix product's rows)
/// whose sums of `|w - zp| · x_max` stay below 2^24 for every output channel; `None` if one
/// input channel alone could pass it.
fn split(wf: &[f32], w_shape: &[usize], conv: bool, x_max: f64) -> Option<Vec<(usize, usize)>> {
    let (channels, inputs, taps) = if conv {
        (
            w_shape[0],
            w_shape[1],
            w_shape[2..].iter().product::<usize>(),
        )
    } else {
        (w_shape[1], w_shape[0], 1)
    };
    // Sum of |w - zp| of output channel c over input index i.
    let weight = |c: usize, i: usize| -> f64 {
        (0..taps)
            .map(|t| {
                let at = if conv {
                    (c * inputs + i) * taps + t
                } else {
                    i * channels + c
                };
                wf[at].abs() as f64
            })
            .sum()
    };
    let mut chunks = Vec::new();
    let mut acc: Vec<f64> = vec![0.0; channels];
    let mut start = 0;
    for i in 0..inputs {
        let add: Vec<f64> = (0..channels).map(|c| weight(c, i)).collect();
        if add.iter().any(|w| w * x_max >= EXACT) {
            return None;
        }
        if acc.iter().zip(&add).any(|(a, w)| a + w * x_max >= EXACT) {
            chunks.push((start, i));
            start = i;
            acc = vec![0.0; channels];
        }
        for (a, w) in acc.iter_mut().zip(&add) {
            *a += w * x_max;
        }
    }
    chunks.push((start, inputs));
    Some(chunks)
}

/// The kernel's slice `start..end` of the reduction axis, and its shape.
fn slice_kernel(
    wf: &[f32],
    w_shape: &[usize],
    conv: bool,
    start: usize,
    end: usize,
) -> (Vec<f32>, Vec<i64>) {
    let mut dims: Vec<i64> = w_shape.iter().map(|&d| d as i64).collect();
    if conv {
        let (inputs, taps) = (w_shape[1], w_shape[2..].iter().product::<usize>());
        let out = (0..w_shape[0])
            .flat_map(|c| {
                wf[(c * inputs + start) * taps..(c * inputs + end) * taps]
                    .iter()
                    .copied()
            })
            .collect();
        dims[1] = (end - start) as i64;
        (out, dims)
    } else {
        let channels = w_shape[1];
        dims[0] = (end - start) as i64;
        (wf[start * channels..end * channels].to_vec(), dims)
    }
}

/// The kernel minus its zero points, as f32 in the kernel's own layout, and per output channel
/// the largest sum of its absolute values (over the kernel's batch slices, one for Conv and 2-D
/// MatMul); `None` if a zero point's length fits neither a scalar nor one per output channel,
/// or the kernel's rank or size fits neither op.
fn centred_kernel(
    w: &[f64],
    w_shape: &[usize],
    w_zp: &[f64],
    conv: bool,
) -> Option<(Vec<f32>, Vec<f64>)> {
    let (channels, k, batches) = kernel_axes(conv, w_shape)?;
    if w.len() != channels * k * batches {
        return None;
    }
    let mut wf = vec![0f32; w.len()];
    let mut sums = vec![0f64; channels];
    for (c, worst) in sums.iter_mut().enumerate() {
        let zp = match w_zp.len() {
            1 => w_zp[0],
            l if l == channels => w_zp[c],
            _ => return None,
        };
        for batch in 0..batches {
            let mut sum = 0f64;
            for j in 0..k {
                let at = if conv {
                    c * k + j
                } else {
                    (batch * k + j) * channels + c
                };
                let v = w[at] - zp;
                wf[at] = v as f32;
                sum += v.abs();
            }
            *worst = worst.max(sum);
        }
    }
    Some((wf, sums))
}

/// A kernel's output channels, reduction length and batch count: Conv's `[C, C_in/g, k...]`,
/// MatMul's `[batch..., K, C]` (a batched kernel's zero points and scales are per column `C`,
/// as ONNX broadcasts them). `None` for a rank that fits neither.
fn kernel_axes(conv: bool, w_shape: &[usize]) -> Option<(usize, usize, usize)> {
    match (conv, w_shape) {
        (true, [c, rest @ ..]) if rest.len() >= 2 => Some((*c, rest.iter().product(), 1)),
        (false, [batch @ .., k, c]) => Some((*c, *k, batch.iter().product())),
        _ => None,
    }
}

/// `ConvInteger` / `MatMulInteger` with a constant kernel, as
///
/// ```text
/// Cast(x, f32) - Cast(x_zp, f32) → Conv/MatMul(·, w - w_zp) → Cast(·, int32)
/// ```
///
/// The output is the same int32 accumulator, exactly, when the bound holds. The input zero
/// point may be computed at run time (`DynamicQuantizeLinear`, the dynamic quantizer's
/// pattern), as long as it is known to be a scalar: `|x - x_zp| ≤ 255` for 8-bit types whatever
/// its value.
fn integer(
    n: &NodeProto,
    conv: bool,
    consts: &HashMap<String, TensorProto>,
    types: &HashMap<String, i32>,
    scalars: &std::collections::HashSet<String>,
    inits: &mut Vec<TensorProto>,
) -> Option<Vec<NodeProto>> {
    let input = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
    if consts.contains_key(input(0)) {
        return None;
    }
    let x_type = types.get(input(0)).copied()?;
    if x_type != UINT8 && x_type != INT8 {
        return None;
    }
    let x_zp = input(2);
    let x_max = if x_zp.is_empty() {
        if x_type == UINT8 { 255.0 } else { 128.0 }
    } else if let Some(zp) = values(consts, x_zp) {
        let [zp] = zp.0[..] else { return None };
        if x_type == UINT8 {
            zp.max(255.0 - zp)
        } else {
            (zp + 128.0).max(127.0 - zp)
        }
    } else if scalars.contains(x_zp) {
        255.0
    } else {
        return None;
    };
    let (w, w_shape) = values(consts, input(1))?;
    let w_zp = if input(3).is_empty() {
        vec![0.0]
    } else {
        values(consts, input(3))?.0
    };
    let (wf, sums) = centred_kernel(&w, &w_shape, &w_zp, conv)?;
    let worst = sums.iter().fold(0f64, |a, &b| a.max(b));
    if worst * x_max >= EXACT {
        return None;
    }
    let tmp = |what: &str| format!("{}__fedge_qi_{what}", n.output.first().map_or("", |s| s));
    let dims: Vec<i64> = w_shape.iter().map(|&d| d as i64).collect();
    inits.push(f32_tensor(&tmp("w"), &dims, &wf));
    let cast = |name: String, from: &str, to: i32| {
        node(
            "Cast",
            name.clone(),
            &[from],
            &[&name],
            vec![int_attr("to", to as i64)],
        )
    };
    let mut nodes = vec![cast(tmp("xf"), input(0), FLOAT)];
    let mut xc = tmp("xf");
    if !x_zp.is_empty() {
        nodes.push(cast(tmp("zpf"), x_zp, FLOAT));
        nodes.push(node(
            "Sub",
            tmp("xc"),
            &[&tmp("xf"), &tmp("zpf")],
            &[&tmp("xc")],
            vec![],
        ));
        xc = tmp("xc");
    }
    let (op, attrs) = if conv {
        ("Conv", n.attribute.clone())
    } else {
        ("MatMul", vec![])
    };
    nodes.push(node(op, tmp(op), &[&xc, &tmp("w")], &[&tmp("acc")], attrs));
    nodes.push(node(
        "Cast",
        tmp("i32"),
        &[&tmp("acc")],
        &[&n.output[0]],
        vec![int_attr("to", INT32 as i64)],
    ));
    Some(nodes)
}

#[cfg(test)]
mod tests {
    use crate::testutil::{lcg, value_info};
    use prost::Message;
    use tract_onnx::pb::{self, ModelProto, OperatorSetIdProto};

    use super::super::graph::raw_tensor;
    use super::*;
    use crate::{Model, ModelOptions, Tensor};

    /// A small deterministic generator (no dependency, same numbers everywhere).
    fn model(n: NodeProto, inits: Vec<TensorProto>, x: &[usize], y: &[usize]) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "q".into(),
                node: vec![n],
                initializer: inits,
                input: vec![value_info("x", UINT8, x)],
                output: vec![value_info("y", UINT8, y)],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// `y = QLinearMatMul(x, as, az, b, bs, bz, ys, yz)`.
    fn qlinear_matmul() -> NodeProto {
        node(
            "QLinearMatMul",
            "mm".into(),
            &["x", "as", "az", "b", "bs", "bz", "ys", "yz"],
            &["y"],
            vec![],
        )
    }

    /// The rewrite on a one-node graph with input `x` ([1, k] uint8): its nodes and report.
    fn rewritten(n: NodeProto, inits: Vec<TensorProto>, k: usize) -> (GraphProto, Vec<String>) {
        let mut g = GraphProto {
            node: vec![n],
            initializer: inits,
            input: vec![value_info("x", UINT8, &[1, k])],
            ..Default::default()
        };
        let mut report = Vec::new();
        rewrite(&mut g, &mut report);
        (g, report)
    }

    /// onnxruntime's requantisation of an exact accumulator.
    fn requant(acc: i64, m: f32, zp: f32) -> u8 {
        ((acc as f32 * m).round_ties_even() + zp).clamp(0.0, 255.0) as u8
    }

    #[test]
    fn qlinearconv_on_float_kernels_gives_the_exact_integer_answer() {
        let (ci, co, h, w, k) = (6usize, 5usize, 7usize, 9usize, 3usize);
        let mut seed = 7;
        let x: Vec<u8> = (0..ci * h * w).map(|_| lcg(&mut seed) as u8).collect();
        let wt: Vec<i8> = (0..co * ci * k * k).map(|_| lcg(&mut seed) as i8).collect();
        let bias: Vec<i32> = (0..co).map(|c| c as i32 * 977 - 2000).collect();
        let (xs, xz, ys, yz) = (0.02f32, 131u8, 0.37f32, 117u8);
        let ws: Vec<f32> = (0..co).map(|c| 0.003 + c as f32 * 0.0007).collect();
        let scalar = |name: &str, v: f32| f32_tensor(name, &[], &[v]);
        let inits = vec![
            scalar("xs", xs),
            raw_tensor("xz", UINT8, &[], vec![xz]),
            raw_tensor(
                "w",
                INT8,
                &[co as i64, ci as i64, k as i64, k as i64],
                wt.iter().map(|&v| v as u8).collect(),
            ),
            f32_tensor("ws", &[co as i64], &ws),
            raw_tensor("wz", INT8, &[co as i64], vec![0; co]),
            scalar("ys", ys),
            raw_tensor("yz", UINT8, &[], vec![yz]),
            i32_tensor("b", &[co as i64], &bias),
        ];
        let n = node(
            "QLinearConv",
            "conv".into(),
            &["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
            &["y"],
            vec![int_attr("group", 1)],
        );
        let mut n = n;
        n.attribute.push(pb::AttributeProto {
            name: "pads".into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![1, 1, 1, 1],
            ..Default::default()
        });
        let bytes = model(n, inits, &[1, ci, h, w], &[1, co, h, w]);
        let m = Model::from_bytes(&bytes, &ModelOptions::default()).expect("load");
        assert!(
            m.graph()
                .rewrites()
                .iter()
                .any(|r| r.contains("1 QLinearConv on float kernels")),
            "{:?}",
            m.graph().rewrites()
        );
        // Where the machine has AVX2, the three ops run as one integer convolution.
        assert_eq!(
            m.graph()
                .rewrites()
                .iter()
                .any(|r| r.contains("1 int8 Conv as FedgeQConv")),
            crate::conv::fast(),
            "{:?}",
            m.graph().rewrites()
        );
        let got = m
            .run(&[Tensor::new(&[1, ci, h, w], &x).expect("x")])
            .expect("run")[0]
            .to_vec::<u8>()
            .expect("u8");
        let mut want = Vec::new();
        for c in 0..co {
            let mult = xs * ws[c] / ys;
            for oy in 0..h as i64 {
                for ox in 0..w as i64 {
                    let mut acc = bias[c] as i64;
                    for i in 0..ci {
                        for ky in 0..k as i64 {
                            for kx in 0..k as i64 {
                                let (iy, ix) = (oy + ky - 1, ox + kx - 1);
                                let xv = if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                    0
                                } else {
                                    x[(i * h + iy as usize) * w + ix as usize] as i64 - xz as i64
                                };
                                let wv = wt[((c * ci + i) * k + ky as usize) * k + kx as usize];
                                acc += xv * wv as i64;
                            }
                        }
                    }
                    want.push(requant(acc, mult, yz as f32));
                }
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn qlinearmatmul_on_float_kernels_gives_the_exact_integer_answer() {
        // A 2-D kernel, and a batched one ([3, k, cols] against a [3, rows, k] input) with
        // per-column zero points.
        for batch in [None, Some(3usize)] {
            let (rows, k, cols) = (4usize, 300usize, 7usize);
            let nb = batch.unwrap_or(1);
            let mut seed = 11;
            let a: Vec<u8> = (0..nb * rows * k).map(|_| lcg(&mut seed) as u8).collect();
            let b: Vec<u8> = (0..nb * k * cols).map(|_| lcg(&mut seed) as u8).collect();
            let (as_, az, bs, ys, yz) = (0.013f32, 120u8, 0.002f32, 0.9f32, 100u8);
            let bz: Vec<u8> = match batch {
                None => vec![128],
                Some(_) => (0..cols).map(|c| 120 + c as u8).collect(),
            };
            let lead = |d: &[usize]| -> Vec<usize> {
                batch.into_iter().chain(d.iter().copied()).collect()
            };
            let (a_dims, b_dims, y_dims) =
                (lead(&[rows, k]), lead(&[k, cols]), lead(&[rows, cols]));
            let scalar = |name: &str, v: f32| f32_tensor(name, &[], &[v]);
            let bz_dims: Vec<i64> = if batch.is_some() {
                vec![cols as i64]
            } else {
                vec![]
            };
            let inits = vec![
                scalar("as", as_),
                raw_tensor("az", UINT8, &[], vec![az]),
                raw_tensor(
                    "b",
                    UINT8,
                    &b_dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                    b.clone(),
                ),
                scalar("bs", bs),
                raw_tensor("bz", UINT8, &bz_dims, bz.clone()),
                scalar("ys", ys),
                raw_tensor("yz", UINT8, &[], vec![yz]),
            ];
            let bytes = model(qlinear_matmul(), inits, &a_dims, &y_dims);
            let m = Model::from_bytes(&bytes, &ModelOptions::default()).expect("load");
            assert!(
                m.graph()
                    .rewrites()
                    .iter()
                    .any(|r| r.contains("1 QLinearMatMul on float kernels")),
                "{batch:?}: {:?}",
                m.graph().rewrites()
            );
            let got = m.run(&[Tensor::new(&a_dims, &a).expect("a")]).expect("run")[0]
                .to_vec::<u8>()
                .expect("u8");
            let mult = as_ * bs / ys;
            let want: Vec<u8> = (0..nb * rows * cols)
                .map(|i| {
                    let (n, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
                    let zp = bz[c % bz.len()] as i64;
                    let acc: i64 = (0..k)
                        .map(|j| {
                            (a[(n * rows + r) * k + j] as i64 - az as i64)
                                * (b[(n * k + j) * cols + c] as i64 - zp)
                        })
                        .sum();
                    requant(acc, mult, yz as f32)
                })
                .collect();
            assert_eq!(got, want, "{batch:?}");
        }
    }

    #[test]
    fn a_kernel_whose_sums_could_pass_2_pow_24_is_split_into_exact_slices() {
        // 600 taps of |w - zp| = 255 against inputs up to 255: sums up to 39 million > 2^24.
        let (rows, k) = (3usize, 600usize);
        let mut seed = 17;
        let a: Vec<u8> = (0..rows * k).map(|_| lcg(&mut seed) as u8 | 0x80).collect();
        let (as_, bs, ys, yz) = (0.01f32, 0.01f32, 4000.0f32, 3u8);
        let inits = vec![
            f32_tensor("as", &[], &[as_]),
            raw_tensor("az", UINT8, &[], vec![0]),
            raw_tensor("b", UINT8, &[k as i64, 1], vec![255; k]),
            f32_tensor("bs", &[], &[bs]),
            raw_tensor("bz", UINT8, &[], vec![0]),
            f32_tensor("ys", &[], &[ys]),
            raw_tensor("yz", UINT8, &[], vec![yz]),
        ];
        let (g, report) = rewritten(qlinear_matmul(), inits.clone(), k);
        let slices = g.node.iter().filter(|n| n.op_type == "MatMul").count();
        assert!(slices >= 3, "{slices} slices: {report:?}");
        let bytes = model(qlinear_matmul(), inits, &[rows, k], &[rows, 1]);
        let m = Model::from_bytes(&bytes, &ModelOptions::default()).expect("load");
        let got = m
            .run(&[Tensor::new(&[rows, k], &a).expect("a")])
            .expect("run")[0]
            .to_vec::<u8>()
            .expect("u8");
        let want: Vec<u8> = (0..rows)
            .map(|r| {
                let acc: i64 = a[r * k..(r + 1) * k].iter().map(|&x| x as i64 * 255).sum();
                assert!(acc > 1 << 24, "the case must need the split");
                requant(acc, as_ * bs / ys, yz as f32)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn malformed_or_run_time_parameters_keep_the_node_and_never_panic() {
        let k = 8usize;
        let good = |name: &str| -> TensorProto {
            match name {
                "as" | "bs" | "ys" => f32_tensor(name, &[], &[0.5]),
                "b" => raw_tensor("b", UINT8, &[k as i64, 3], vec![7; k * 3]),
                _ => raw_tensor(name, UINT8, &[], vec![3]),
            }
        };
        let all = ["as", "az", "b", "bs", "bz", "ys", "yz"];
        // Each case: the initializers with one of them replaced (or left out).
        let cases: Vec<(&str, Option<TensorProto>)> = vec![
            // The kernel fed at run time (not a constant).
            ("b", None),
            // The output scale fed at run time.
            ("ys", None),
            // Per-column scales of the wrong length (4 for 3 columns).
            ("bs", Some(f32_tensor("bs", &[4], &[0.1; 4]))),
            // A vector input scale (QLinearMatMul's is a scalar).
            ("as", Some(f32_tensor("as", &[2], &[0.1, 0.2]))),
            // A kernel of rank 1.
            ("b", Some(raw_tensor("b", UINT8, &[12], vec![1; 12]))),
            // A zero point whose declared shape has no data behind it.
            ("az", Some(raw_tensor("az", UINT8, &[1], vec![]))),
            // Per-column kernel zero points of the wrong length.
            ("bz", Some(raw_tensor("bz", UINT8, &[2], vec![1, 2]))),
        ];
        for (which, replacement) in cases {
            let inits: Vec<TensorProto> = all
                .iter()
                .filter_map(|&name| {
                    if name == which {
                        replacement.clone()
                    } else {
                        Some(good(name))
                    }
                })
                .collect();
            let (g, report) = rewritten(qlinear_matmul(), inits, k);
            assert_eq!(g.node.len(), 1, "{which}: {report:?}");
            assert_eq!(g.node[0].op_type, "QLinearMatMul", "{which}");
            assert!(report.is_empty(), "{which}: {report:?}");
        }
        // The same node with every parameter well formed is rewritten.
        let (g, report) = rewritten(qlinear_matmul(), all.iter().map(|&n| good(n)).collect(), k);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["DequantizeLinear", "MatMul", REQUANTIZE],
            "{report:?}"
        );
    }

    /// A graph `x (f32) → DynamicQuantizeLinear → op(xq, w, xzp, wzp) → y (int32)`: the
    /// dynamic quantizer's pattern, with the input zero point computed at run time.
    fn dynamic(
        op: &str,
        w: TensorProto,
        wz: TensorProto,
        attrs: Vec<pb::AttributeProto>,
        x: &[usize],
        y: &[usize],
    ) -> Vec<u8> {
        let dql = node(
            "DynamicQuantizeLinear",
            "dql".into(),
            &["x"],
            &["xq", "xs", "xz"],
            vec![],
        );
        let n = node(op, "op".into(), &["xq", "w", "xz", "wz"], &["y"], attrs);
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "d".into(),
                node: vec![dql, n],
                initializer: vec![w, wz],
                input: vec![value_info("x", FLOAT, x)],
                output: vec![value_info("y", INT32, y)],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The rewritten model's int32 output, tract's integer kernels' output (rewrites off) and
    /// the rewrite report.
    fn both(bytes: &[u8], x: &Tensor) -> (Vec<i32>, Vec<i32>, Vec<String>) {
        let fast = Model::from_bytes(bytes, &ModelOptions::default()).expect("load");
        let plain = Model::from_bytes(
            bytes,
            &ModelOptions {
                rewrites: false,
                ..ModelOptions::default()
            },
        )
        .expect("load plain");
        let run = |m: &Model| {
            m.run(std::slice::from_ref(x)).expect("run")[0]
                .to_vec::<i32>()
                .expect("i32")
        };
        (run(&fast), run(&plain), fast.graph().rewrites().to_vec())
    }

    #[test]
    fn dynamic_conv_integer_on_float_kernels_equals_the_integer_kernels() {
        let (ci, co, h, w, k) = (8usize, 6usize, 9usize, 11usize, 3usize);
        let mut seed = 3;
        let x: Vec<f32> = (0..ci * h * w)
            .map(|_| (lcg(&mut seed) % 2000) as f32 / 250.0 - 3.0)
            .collect();
        let wt: Vec<u8> = (0..co * ci * k * k).map(|_| lcg(&mut seed) as u8).collect();
        let mut attrs = vec![int_attr("group", 1)];
        attrs.push(pb::AttributeProto {
            name: "pads".into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![1, 1, 1, 1],
            ..Default::default()
        });
        let bytes = dynamic(
            "ConvInteger",
            raw_tensor("w", INT8, &[co as i64, ci as i64, k as i64, k as i64], wt),
            raw_tensor("wz", INT8, &[], vec![5]),
            attrs,
            &[1, ci, h, w],
            &[1, co, h, w],
        );
        let input = Tensor::new(&[1, ci, h, w], &x).expect("x");
        let (fast, plain, report) = both(&bytes, &input);
        assert!(
            report
                .iter()
                .any(|r| r.contains("1 ConvInteger on float kernels")),
            "{report:?}"
        );
        assert_eq!(fast, plain);
        assert!(
            fast.iter().any(|&v| v.abs() > 1000),
            "a trivial output proves nothing"
        );
    }

    #[test]
    fn dynamic_matmul_integer_with_per_column_zero_points_equals_the_integer_kernels() {
        let (rows, k, cols) = (5usize, 200usize, 9usize);
        let mut seed = 5;
        let x: Vec<f32> = (0..rows * k)
            .map(|_| (lcg(&mut seed) % 1000) as f32 / 100.0 - 2.0)
            .collect();
        let b: Vec<u8> = (0..k * cols).map(|_| lcg(&mut seed) as u8).collect();
        let zps: Vec<u8> = (0..cols as u8).map(|c| 120 + c).collect();
        let bytes = dynamic(
            "MatMulInteger",
            raw_tensor("w", UINT8, &[k as i64, cols as i64], b),
            raw_tensor("wz", UINT8, &[cols as i64], zps),
            vec![],
            &[rows, k],
            &[rows, cols],
        );
        let input = Tensor::new(&[rows, k], &x).expect("x");
        let (fast, plain, report) = both(&bytes, &input);
        assert!(
            report
                .iter()
                .any(|r| r.contains("1 MatMulInteger on float kernels")),
            "{report:?}"
        );
        assert_eq!(fast, plain);
        assert!(
            fast.iter().any(|&v| v.abs() > 1000),
            "a trivial output proves nothing"
        );
    }

    #[test]
    fn integer_ops_whose_input_zero_point_may_not_be_a_scalar_keep_the_integer_kernels() {
        // MatMulInteger's input zero point fed as a graph input: it may be one per row.
        let k = 16usize;
        let n = node(
            "MatMulInteger",
            "mm".into(),
            &["x", "b", "az"],
            &["y"],
            vec![],
        );
        let mut g = GraphProto {
            node: vec![n],
            initializer: vec![raw_tensor("b", UINT8, &[k as i64, 2], vec![3; k * 2])],
            input: vec![
                value_info("x", UINT8, &[4, k]),
                value_info("az", UINT8, &[4]),
            ],
            ..Default::default()
        };
        let mut report = Vec::new();
        rewrite(&mut g, &mut report);
        assert_eq!(g.node.len(), 1, "{report:?}");
        assert_eq!(g.node[0].op_type, "MatMulInteger");
        // A kernel whose sums could pass 2^24: 300 taps of 255 against inputs up to 255.
        let k = 300usize;
        let n = node("MatMulInteger", "mm".into(), &["x", "b"], &["y"], vec![]);
        let mut g = GraphProto {
            node: vec![n],
            initializer: vec![raw_tensor("b", UINT8, &[k as i64, 1], vec![255; k])],
            input: vec![value_info("x", UINT8, &[1, k])],
            ..Default::default()
        };
        rewrite(&mut g, &mut report);
        assert_eq!(g.node[0].op_type, "MatMulInteger", "{report:?}");
        assert!(report.is_empty(), "{report:?}");
    }
}
