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

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::graph::{
    INT8, UINT8, attr, const_f32, constants, consumers, i32_tensor, int_attr, is_graph_output,
    producers,
};
use crate::conv::{Activation, CONV, ROWS};
use crate::qconv::{QCONV, pack};
use crate::tract_ops::REQUANTIZE;

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
    let kernel = attr(conv, "kernel_shape")?.ints.clone();
    let [kh, kw] = kernel[..] else { return None };
    let points = usize::try_from(kh * kw).ok()?;
    let packed = const_f32(consts, &conv.input[1])?;
    let taps = packed.len() / (m.div_ceil(ROWS) * ROWS).max(1);
    if mult.len() != m || m == 0 || points == 0 || !taps.is_multiple_of(points) {
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
    let base = format!("{}_fedge_qconv", rq.output[0]);
    let (k_name, b_name) = (format!("{base}_w"), format!("{base}_b"));
    let words: Vec<i32> = words.iter().map(|&w| w as i32).collect();
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut attributes: Vec<_> = conv
        .attribute
        .iter()
        .filter(|a| {
            matches!(
                a.name.as_str(),
                "strides" | "dilations" | "pads" | "kernel_shape"
            )
        })
        .cloned()
        .collect();
    attributes.push(int_attr("x_zero_point", x_zp));
    let mut m_attr = attr(rq, "m")?.clone();
    m_attr.floats = mult;
    attributes.push(m_attr);
    for name in ["zero_point", "signed"] {
        attributes.push(int_attr(name, attr(rq, name).map_or(0, |a| a.i)));
    }
    let node = NodeProto {
        op_type: QCONV.into(),
        domain: "ai.fedge".into(),
        name: base.clone(),
        input: vec![dq.input[0].clone(), k_name.clone(), b_name.clone()],
        output: rq.output.clone(),
        attribute: attributes,
        ..Default::default()
    };
    Some((
        node,
        [
            i32_tensor(&k_name, &shape, &words),
            i32_tensor(&b_name, &[m as i64], &bias),
        ],
        [d, r],
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
    let mut done = 0usize;
    for i in 0..g.node.len() {
        if g.node[i].op_type != CONV || g.node[i].domain != "ai.fedge" {
            continue;
        }
        let Some((node, inits, absorbed)) = fuse(g, i, &consts, &made, &readers) else {
            continue;
        };
        replaced.extend(g.node[i].input.iter().skip(1).cloned());
        for &j in &absorbed {
            replaced.extend(g.node[j].input.iter().skip(1).cloned());
            drop.insert(j);
        }
        g.node[i] = node;
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
        "ran {done} int8 Conv as {QCONV} (integer sums, requantised from the accumulator)"
    ));
}
