//! Float convolutions on fedge's kernels for the CPU backend: depthwise ones as
//! `FedgeDepthwiseConv` (`crate::dwconv`) everywhere, dense ones (one group) as `FedgeConv`
//! (`crate::conv`) where the machine has AVX2 and FMA. Folded into each:
//!
//! - the per-channel affine step that follows convolutions in exported CNNs, into the filter
//!   and bias: a `BatchNormalization` in inference form, or a `Mul` and then an `Add` by
//!   per-channel constants (a batch norm already decomposed);
//! - then the activation after it, applied as each output is written: `Relu`, `LeakyRelu`,
//!   `Clip` with constant bounds, `HardSwish`, or `Mul(y, HardSigmoid(y))`.
//!
//! A `Conv` qualifies when its filter is a float32 constant (`[C, 1, KH, KW]` with
//! `group = C ≥ 2` for depthwise, `[M, C, KH, KW]` with `group = 1` for dense), its padding is
//! explicit (`auto_pad` absent, `NOTSET` or `VALID`) and its bias, if any, is a constant.
//! Everything else stays tract's. Steps are only folded into a convolution whose output (and
//! each intermediate) has no other reader and is not a graph output.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::graph::{FLOAT, attr, attr_f, attr_i, const_f32, constants, f32_tensor, ints_attr};
use crate::conv::{Activation, CONV};
use crate::dwconv::DEPTHWISE_CONV;

/// A filter and bias being built.
struct Filter {
    /// Output channels.
    channels: usize,
    /// Weights per output channel.
    taps: usize,
    /// Dense (`FedgeConv`) rather than depthwise.
    dense: bool,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Filter {
    /// `x · s[c] + t[c]` after the convolution, folded in.
    fn scale_shift(&mut self, s: &[f32], t: &[f32]) {
        for c in 0..self.channels {
            for w in &mut self.w[c * self.taps..(c + 1) * self.taps] {
                *w *= s[c];
            }
            self.b[c] = self.b[c] * s[c] + t[c];
        }
    }
}

fn ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

/// A per-channel constant of `channels` values (`[C]`, `[C, 1, 1]`, `[1, C, 1, 1]`, or one
/// value for all), or `None`.
fn per_channel(
    consts: &HashMap<String, TensorProto>,
    name: &str,
    channels: usize,
) -> Option<Vec<f32>> {
    let t = consts.get(name)?;
    if t.data_type != FLOAT {
        return None;
    }
    let v = const_f32(consts, name)?;
    let dims: Vec<i64> = t.dims.clone();
    if v.len() == 1 && dims.len() <= 4 {
        return Some(vec![v[0]; channels]);
    }
    let channel_axis_ok = match dims.as_slice() {
        [c] | [c, 1, 1] | [1, c, 1, 1] => *c as usize == channels,
        _ => false,
    };
    (channel_axis_ok && v.len() == channels).then_some(v)
}

/// The filter of a qualifying `Conv`, with its attributes for the fedge op; dense ones only
/// when `dense` (the machine runs `FedgeConv` fast).
fn qualify(
    n: &NodeProto,
    consts: &HashMap<String, TensorProto>,
    dense: bool,
) -> Option<(Filter, Vec<AttributeProto>)> {
    if n.op_type != "Conv" || !n.domain.is_empty() || n.input.len() < 2 || n.output.len() != 1 {
        return None;
    }
    let wt = consts.get(&n.input[1])?;
    let [c, ci, kh, kw] = wt.dims[..] else {
        return None;
    };
    let channels = usize::try_from(c).ok()?;
    let group = attr_i(n, "group").unwrap_or(1);
    let is_dense = group == 1 && ci >= 1 && dense;
    let is_depthwise = ci == 1 && group == c && channels >= 2;
    if wt.data_type != FLOAT || !(is_dense || is_depthwise) || kh < 1 || kw < 1 {
        return None;
    }
    match attr(n, "auto_pad").map(|a| a.s.as_slice()) {
        None | Some(b"NOTSET") | Some(b"VALID") | Some(b"") => {}
        _ => return None,
    }
    if let Some(k) = ints(n, "kernel_shape")
        && k != [kh, kw]
    {
        return None;
    }
    let valid = attr(n, "auto_pad").is_some_and(|a| a.s == b"VALID");
    let strides = ints(n, "strides").unwrap_or_else(|| vec![1, 1]);
    let dilations = ints(n, "dilations").unwrap_or_else(|| vec![1, 1]);
    let pads = match ints(n, "pads") {
        Some(_) if valid => return None,
        Some(p) => p,
        None => vec![0; 4],
    };
    if strides.len() != 2
        || dilations.len() != 2
        || pads.len() != 4
        || strides.iter().chain(&dilations).any(|&v| v < 1)
        || pads.iter().any(|&v| v < 0)
    {
        return None;
    }
    let taps = usize::try_from(ci * kh * kw).ok()?;
    let w = const_f32(consts, &n.input[1])?;
    let b = match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(name) => per_channel(consts, name, channels)
            .filter(|_| consts.get(name).is_some_and(|t| t.dims.len() == 1))?,
        None => vec![0.0; channels],
    };
    (w.len() == channels * taps).then_some((
        Filter {
            channels,
            taps,
            dense: is_dense,
            w,
            b,
        },
        vec![
            ints_attr("strides", &strides),
            ints_attr("dilations", &dilations),
            // ONNX orders pads as all begins then all ends: top, left, bottom, right.
            ints_attr("pads", &pads),
        ],
    ))
}

/// The single consumer of `name` when it is a foldable per-channel affine step: its index and
/// `(scale, shift)`.
fn affine_after(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    name: &str,
    channels: usize,
) -> Option<(usize, Vec<f32>, Vec<f32>)> {
    let i = sole_reader(g, name)?;
    let n = &g.node[i];
    if !n.domain.is_empty() || n.output.len() != 1 {
        return None;
    }
    match n.op_type.as_str() {
        "BatchNormalization" if n.input.len() == 5 && n.input[0] == name => {
            if attr_i(n, "training_mode").unwrap_or(0) != 0 {
                return None;
            }
            let eps = attr_f(n, "epsilon").unwrap_or(1e-5);
            let p: Vec<Vec<f32>> = n.input[1..]
                .iter()
                .map(|s| per_channel(consts, s, channels))
                .collect::<Option<_>>()?;
            let (gamma, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
            let s: Vec<f32> = (0..channels)
                .map(|c| gamma[c] / (var[c] + eps).sqrt())
                .collect();
            let t = (0..channels).map(|c| beta[c] - mean[c] * s[c]).collect();
            Some((i, s, t))
        }
        "Mul" => Some((
            i,
            per_channel(consts, other_input(n, name)?, channels)?,
            vec![0.0; channels],
        )),
        "Add" => Some((
            i,
            vec![1.0; channels],
            per_channel(consts, other_input(n, name)?, channels)?,
        )),
        _ => None,
    }
}

/// Index of the single reader of `name`, unless `name` is a graph output or has other readers.
fn sole_reader(g: &GraphProto, name: &str) -> Option<usize> {
    if super::graph::is_graph_output(g, name) {
        return None;
    }
    match super::graph::consumers(g).get(name)?.as_slice() {
        [i] => Some(*i),
        _ => None,
    }
}

/// Whether node `i` is a standard ONNX op with one output.
fn plain(g: &GraphProto, i: usize) -> bool {
    g.node[i].domain.is_empty() && g.node[i].output.len() == 1
}

/// A scalar float constant.
fn scalar(consts: &HashMap<String, TensorProto>, name: &str) -> Option<f32> {
    match const_f32(consts, name)?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// The activation reading `name` (alone), the nodes it spans and its output.
fn activation_after(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    name: &str,
) -> Option<(Vec<usize>, Activation, String)> {
    if super::graph::is_graph_output(g, name) {
        return None;
    }
    let readers = super::graph::consumers(g).get(name)?.clone();
    if let [i] = readers[..] {
        let n = &g.node[i];
        if !plain(g, i) || n.input.first().map(String::as_str) != Some(name) {
            return None;
        }
        let act = match (n.op_type.as_str(), n.input.len()) {
            ("Relu", 1) => Activation::Relu,
            ("LeakyRelu", 1) => Activation::LeakyRelu {
                alpha: attr_f(n, "alpha").unwrap_or(0.01),
            },
            ("HardSwish", 1) => Activation::HardSwish {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            },
            ("Clip", 1..=3) => {
                let bound = |k: usize, name: &str, default: f32| match n.input.get(k) {
                    Some(s) if !s.is_empty() => scalar(consts, s),
                    _ => Some(attr_f(n, name).unwrap_or(default)),
                };
                Activation::Clip {
                    lo: bound(1, "min", f32::NEG_INFINITY)?,
                    hi: bound(2, "max", f32::INFINITY)?,
                }
            }
            _ => return None,
        };
        return Some((vec![i], act, n.output[0].clone()));
    }
    let [a, b] = readers[..] else {
        return None;
    };
    hard_sigmoid_product(g, name, a, b)
        .or_else(|| hard_sigmoid_product(g, name, b, a))
        .or_else(|| clip_swish(g, consts, name, a, b))
        .or_else(|| clip_swish(g, consts, name, b, a))
}

/// Whether `n` reads exactly `a` and `b`, in either order.
fn reads_pair(n: &NodeProto, a: &str, b: &str) -> bool {
    matches!(n.input.as_slice(), [x, y] if (x == a && y == b) || (x == b && y == a))
}

/// The other input of a two-input node that reads `name`.
fn other_input<'a>(n: &'a NodeProto, name: &str) -> Option<&'a String> {
    match n.input.as_slice() {
        [a, b] if a == name => Some(b),
        [a, b] if b == name => Some(a),
        _ => None,
    }
}

/// `Mul(y, HardSigmoid(y))` (nodes `h` and `m`), the hard-swish of older exporters.
fn hard_sigmoid_product(
    g: &GraphProto,
    name: &str,
    h: usize,
    m: usize,
) -> Option<(Vec<usize>, Activation, String)> {
    let (hn, mn) = (&g.node[h], &g.node[m]);
    let gate = hn.output.first()?;
    let ok = hn.op_type == "HardSigmoid"
        && hn.input.len() == 1
        && mn.op_type == "Mul"
        && plain(g, h)
        && plain(g, m)
        && sole_reader(g, gate) == Some(m)
        && reads_pair(mn, name, gate);
    ok.then(|| {
        (
            vec![h, m],
            Activation::HardSwish {
                alpha: attr_f(hn, "alpha").unwrap_or(0.2),
                beta: attr_f(hn, "beta").unwrap_or(0.5),
            },
            mn.output[0].clone(),
        )
    })
}

/// `Div(Mul(y, Clip(Add(y, shift), lo, hi)), div)` (`Add` node `a`, `Mul` node `m`; the
/// division `Div` or `FedgeExactDiv`), with constant scalars: Paddle's hard-swish.
pub(super) fn clip_swish(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    name: &str,
    a: usize,
    m: usize,
) -> Option<(Vec<usize>, Activation, String)> {
    let (an, mn) = (&g.node[a], &g.node[m]);
    if an.op_type != "Add" || mn.op_type != "Mul" || !plain(g, a) || !plain(g, m) {
        return None;
    }
    let shift = scalar(consts, other_input(an, name)?)?;
    let c = sole_reader(g, &an.output[0])?;
    let cn = &g.node[c];
    if cn.op_type != "Clip" || !plain(g, c) || cn.input.len() != 3 || cn.input[0] != an.output[0] {
        return None;
    }
    let (lo, hi) = (scalar(consts, &cn.input[1])?, scalar(consts, &cn.input[2])?);
    if sole_reader(g, &cn.output[0])? != m || !reads_pair(mn, name, &cn.output[0]) {
        return None;
    }
    let d = sole_reader(g, &mn.output[0])?;
    let dn = &g.node[d];
    // fedge's exact division (written where a quantize follows) divides as `Div` defines.
    let div_op = (dn.op_type == "Div" && plain(g, d))
        || (dn.op_type == crate::tract_ops::EXACT_DIV
            && dn.domain == "ai.fedge"
            && dn.output.len() == 1);
    if !div_op || dn.input.len() != 2 || dn.input[0] != mn.output[0] {
        return None;
    }
    let div = scalar(consts, &dn.input[1])?;
    Some((
        vec![a, c, m, d],
        Activation::ClipSwish { shift, lo, hi, div },
        dn.output[0].clone(),
    ))
}

/// Tensors known to be one point in space (`[N, C, 1, 1]`): what `GlobalAveragePool` and
/// `GlobalMaxPool` produce, carried through element-wise ops (with constants) and 1 × 1
/// convolutions. Dense convolutions of these are matrix-vector products, which tract's own
/// kernels do at memory speed.
fn single_points(g: &GraphProto, consts: &HashMap<String, TensorProto>) -> HashSet<String> {
    let mut points = HashSet::new();
    for n in &g.node {
        let Some(out) = n.output.first() else {
            continue;
        };
        let first_is_point = n.input.first().is_some_and(|x| points.contains(x));
        let others_const = n.input.iter().skip(1).all(|x| consts.contains_key(x));
        let point = match n.op_type.as_str() {
            "GlobalAveragePool" | "GlobalMaxPool" => true,
            "Relu" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "LeakyRelu" | "Tanh"
            | "Identity" | "Clip" => first_is_point && others_const,
            "Add" | "Mul" | "Sub" | "Div" => {
                n.input.iter().any(|x| points.contains(x))
                    && n.input
                        .iter()
                        .all(|x| points.contains(x) || consts.contains_key(x))
            }
            "Conv" => {
                let one = |name: &str| ints(n, name).is_none_or(|v| v.iter().all(|&d| d == 1));
                let unpadded = ints(n, "pads").is_none_or(|v| v.iter().all(|&d| d == 0));
                let kernel_1x1 = n
                    .input
                    .get(1)
                    .and_then(|w| consts.get(w))
                    .is_some_and(|w| w.dims.len() == 4 && w.dims[2] == 1 && w.dims[3] == 1);
                first_is_point && one("strides") && unpadded && kernel_1x1
            }
            _ => false,
        };
        if point && n.domain.is_empty() {
            points.insert(out.clone());
        }
    }
    points
}

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    let fast = crate::conv::fast();
    let (mut depthwise, mut dense_done, mut folded, mut activations) = (0usize, 0, 0, 0);
    let consts = constants(g);
    let points = single_points(g, &consts);
    // Constants read by the nodes replaced: dropped at the end when nothing else reads them,
    // so that the model does not hold both the original and the folded weights.
    let mut replaced: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < g.node.len() {
        let n = &g.node[i];
        let dense = fast && !n.input.first().is_some_and(|x| points.contains(x));
        let Some((mut filter, mut attributes)) = qualify(n, &consts, dense) else {
            i += 1;
            continue;
        };
        let mut out = g.node[i].output[0].clone();
        while let Some((j, s, t)) = affine_after(g, &consts, &out, filter.channels) {
            filter.scale_shift(&s, &t);
            out = g.node[j].output[0].clone();
            replaced.extend(g.node.remove(j).input);
            folded += 1;
        }
        if let Some((mut spanned, act, last)) = activation_after(g, &consts, &out) {
            attributes.extend(act.attributes());
            out = last;
            spanned.sort_unstable();
            for j in spanned.into_iter().rev() {
                replaced.extend(g.node.remove(j).input);
            }
            activations += 1;
        }
        let n = &g.node[i];
        let base = if n.name.is_empty() {
            out.clone()
        } else {
            n.name.clone()
        };
        let (w_name, b_name) = (
            format!("{base}_fedge_conv_w"),
            format!("{base}_fedge_conv_b"),
        );
        let dims = consts[&n.input[1]].dims.clone();
        if filter.dense {
            let (packed, shape) = crate::conv::pack(&filter.w, filter.channels, filter.taps);
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            g.initializer.push(f32_tensor(&w_name, &shape, &packed));
            attributes.push(ints_attr("kernel_shape", &dims[2..]));
        } else {
            g.initializer.push(f32_tensor(&w_name, &dims, &filter.w));
        }
        g.initializer
            .push(f32_tensor(&b_name, &[filter.channels as i64], &filter.b));
        let n = &mut g.node[i];
        n.op_type = if filter.dense { CONV } else { DEPTHWISE_CONV }.into();
        n.domain = "ai.fedge".into();
        replaced.extend(n.input.drain(1..));
        n.input = vec![n.input[0].clone(), w_name, b_name];
        n.output = vec![out];
        n.attribute = attributes;
        if filter.dense {
            dense_done += 1;
        } else {
            depthwise += 1;
        }
        i += 1;
    }
    if !replaced.is_empty() {
        let mut read = HashSet::new();
        super::graph::names_read(g, &mut read);
        g.initializer
            .retain(|t| !replaced.contains(&t.name) || read.contains(&t.name));
        g.node.retain(|n| {
            n.op_type != "Constant"
                || !n
                    .output
                    .iter()
                    .any(|o| replaced.contains(o) && !read.contains(o))
        });
    }
    if depthwise + dense_done > 0 {
        report.push(format!(
            "ran {depthwise} depthwise Conv as {DEPTHWISE_CONV} and {dense_done} dense Conv as {CONV}, \
             {folded} per-channel scale/shift and {activations} activations folded in"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::{float_attr, int_attr, node};
    use super::*;

    /// `Conv(x, w [out, 1, 3, 3], b)` with `group`, then `follow`.
    fn conv_graph(out: usize, group: i64, follow: &str) -> GraphProto {
        let mut g = GraphProto::default();
        let w: Vec<f32> = (0..out * 9).map(|v| v as f32).collect();
        g.initializer
            .push(f32_tensor("w", &[out as i64, 1, 3, 3], &w));
        let b: Vec<f32> = (1..=out).map(|v| v as f32).collect();
        g.initializer.push(f32_tensor("b", &[out as i64], &b));
        g.initializer
            .push(f32_tensor("s", &[1, 2, 1, 1], &[2.0, 3.0]));
        g.initializer
            .push(f32_tensor("t", &[2, 1, 1], &[0.5, -0.5]));
        let mut conv = node(
            "Conv",
            "c".into(),
            &["x", "w", "b"],
            &["y"],
            vec![int_attr("group", group)],
        );
        conv.attribute.push(ints_attr("pads", &[1, 1, 1, 1]));
        g.node.push(conv);
        let mut push = |op: &str, ins: &[&str], out: &str| {
            g.node.push(node(op, op.into(), ins, &[out], vec![]));
        };
        match follow {
            "muladd" => {
                push("Mul", &["y", "s"], "z");
                push("Add", &["t", "z"], "out");
            }
            "hardsigmoid_mul" => {
                push("HardSigmoid", &["y"], "h");
                push("Mul", &["h", "y"], "out");
            }
            "two_readers" => {
                push("Relu", &["y"], "out");
                push("Sigmoid", &["y"], "out2");
            }
            _ => push("Relu", &["y"], "out"),
        }
        g
    }

    fn ops(g: &GraphProto) -> Vec<&str> {
        g.node.iter().map(|n| n.op_type.as_str()).collect()
    }

    #[test]
    fn folds_a_following_mul_and_add_into_filter_and_bias() {
        let mut g = conv_graph(2, 2, "muladd");
        let mut report = vec![];
        rewrite(&mut g, &mut report);
        assert_eq!(ops(&g), [DEPTHWISE_CONV]);
        let n = &g.node[0];
        assert_eq!(n.output, ["out"]);
        let consts = constants(&g);
        let w = const_f32(&consts, &n.input[1]).expect("constant");
        let b = const_f32(&consts, &n.input[2]).expect("constant");
        assert_eq!(w[0..2], [0.0, 2.0]);
        assert_eq!(w[9..11], [27.0, 30.0]);
        assert_eq!(b, [2.5, 5.5]);
        assert_eq!(
            report,
            [
                "ran 1 depthwise Conv as FedgeDepthwiseConv and 0 dense Conv as FedgeConv, \
                 2 per-channel scale/shift and 0 activations folded in"
            ]
        );
    }

    #[test]
    fn folds_relu_and_the_hard_sigmoid_product_as_activations() {
        let mut g = conv_graph(2, 2, "relu");
        rewrite(&mut g, &mut vec![]);
        assert_eq!(ops(&g), [DEPTHWISE_CONV]);
        assert_eq!(g.node[0].output, ["out"]);
        let act = |n: &NodeProto| attr(n, "activation").map(|a| a.s.clone());
        assert_eq!(act(&g.node[0]), Some(b"relu".to_vec()));

        let mut g = conv_graph(2, 2, "hardsigmoid_mul");
        g.node[1].attribute.push(float_attr("alpha", 0.25));
        rewrite(&mut g, &mut vec![]);
        assert_eq!(ops(&g), [DEPTHWISE_CONV]);
        assert_eq!(g.node[0].output, ["out"]);
        assert_eq!(act(&g.node[0]), Some(b"hard_swish".to_vec()));
        assert_eq!(attr_f(&g.node[0], "alpha"), Some(0.25));
        assert_eq!(attr_f(&g.node[0], "beta"), Some(0.5));
    }

    #[test]
    fn outputs_with_other_readers_and_grouped_convolutions_are_left_alone() {
        let mut g = conv_graph(2, 2, "two_readers");
        rewrite(&mut g, &mut vec![]);
        assert_eq!(ops(&g), [DEPTHWISE_CONV, "Relu", "Sigmoid"]);
        assert_eq!(g.node[0].output, ["y"]);
        // Two groups of two output channels: neither depthwise nor dense.
        let mut g = conv_graph(4, 2, "relu");
        rewrite(&mut g, &mut vec![]);
        assert_eq!(ops(&g), ["Conv", "Relu"]);
    }

    #[test]
    fn dense_convolutions_run_on_fedge_conv_where_the_machine_has_avx2_and_fma() {
        let mut g = conv_graph(2, 1, "relu");
        rewrite(&mut g, &mut vec![]);
        if crate::conv::fast() {
            assert_eq!(ops(&g), [CONV]);
        } else {
            assert_eq!(ops(&g), ["Conv", "Relu"]);
        }
    }
}
