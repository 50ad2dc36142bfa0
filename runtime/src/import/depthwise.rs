//! Float depthwise convolutions as `FedgeDepthwiseConv` (`crate::dwconv`) on the CPU backend,
//! with the per-channel affine step that follows them in exported MobileNets folded into the
//! filter and bias: a `BatchNormalization` in inference form, or a `Mul` and then an `Add` by
//! per-channel constants (a batch norm already decomposed).
//!
//! A `Conv` qualifies when its filter is a float32 constant `[C, 1, KH, KW]` with `group = C`
//! (C ≥ 2), its padding is explicit (`auto_pad` absent, `NOTSET` or `VALID`) and its bias, if
//! any, is a constant. Everything else stays tract's.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::graph::{FLOAT, attr, attr_f, attr_i, const_f32, constants, f32_tensor, ints_attr};
use crate::dwconv::DEPTHWISE_CONV;

/// A depthwise filter and bias being built.
struct Filter {
    channels: usize,
    taps: usize,
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

/// The filter of a qualifying depthwise `Conv`, with its attributes for the fedge op.
fn qualify(
    n: &NodeProto,
    consts: &HashMap<String, TensorProto>,
) -> Option<(Filter, Vec<AttributeProto>)> {
    if n.op_type != "Conv" || !n.domain.is_empty() || n.input.len() < 2 || n.output.len() != 1 {
        return None;
    }
    let wt = consts.get(&n.input[1])?;
    let [c, 1, kh, kw] = wt.dims[..] else {
        return None;
    };
    let channels = usize::try_from(c).ok()?;
    if wt.data_type != FLOAT || channels < 2 || attr_i(n, "group")? != c || kh < 1 || kw < 1 {
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
    let taps = (kh * kw) as usize;
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
    if super::graph::is_graph_output(g, name) {
        return None;
    }
    let consumers = super::graph::consumers(g);
    let [i] = consumers.get(name)?.as_slice() else {
        return None;
    };
    let n = &g.node[*i];
    if !n.domain.is_empty() || n.output.len() != 1 {
        return None;
    }
    fn other<'a>(n: &'a NodeProto, name: &str) -> Option<&'a String> {
        match n.input.as_slice() {
            [a, b] if a == name => Some(b),
            [a, b] if b == name => Some(a),
            _ => None,
        }
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
            Some((*i, s, t))
        }
        "Mul" => Some((
            *i,
            per_channel(consts, other(n, name)?, channels)?,
            vec![0.0; channels],
        )),
        "Add" => Some((
            *i,
            vec![1.0; channels],
            per_channel(consts, other(n, name)?, channels)?,
        )),
        _ => None,
    }
}

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    let (mut done, mut folded) = (0usize, 0usize);
    let consts = constants(g);
    let mut i = 0;
    while i < g.node.len() {
        let Some((mut filter, attributes)) = qualify(&g.node[i], &consts) else {
            i += 1;
            continue;
        };
        let mut out = g.node[i].output[0].clone();
        while let Some((j, s, t)) = affine_after(g, &consts, &out, filter.channels) {
            filter.scale_shift(&s, &t);
            out = g.node[j].output[0].clone();
            g.node.remove(j);
            folded += 1;
        }
        let n = &g.node[i];
        let base = if n.name.is_empty() {
            out.clone()
        } else {
            n.name.clone()
        };
        let (w_name, b_name) = (format!("{base}_fedge_dw_w"), format!("{base}_fedge_dw_b"));
        let k = &consts[&n.input[1]].dims;
        let dims = [filter.channels as i64, 1, k[2], k[3]];
        g.initializer.push(f32_tensor(&w_name, &dims, &filter.w));
        g.initializer
            .push(f32_tensor(&b_name, &[filter.channels as i64], &filter.b));
        let n = &mut g.node[i];
        n.op_type = DEPTHWISE_CONV.into();
        n.domain = "ai.fedge".into();
        n.input = vec![n.input[0].clone(), w_name, b_name];
        n.output = vec![out];
        n.attribute = attributes;
        done += 1;
        i += 1;
    }
    if done > 0 {
        report.push(format!(
            "ran {done} depthwise Conv as {DEPTHWISE_CONV}, {folded} per-channel scale/shift folded in"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::{int_attr, node};
    use super::*;

    fn conv_graph(group: i64, follow: &str) -> GraphProto {
        let mut g = GraphProto::default();
        let w: Vec<f32> = (0..2 * 9).map(|v| v as f32).collect();
        g.initializer.push(f32_tensor("w", &[2, 1, 3, 3], &w));
        g.initializer.push(f32_tensor("b", &[2], &[1.0, 2.0]));
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
        match follow {
            "muladd" => {
                g.node
                    .push(node("Mul", "m".into(), &["y", "s"], &["z"], vec![]));
                g.node
                    .push(node("Add", "a".into(), &["t", "z"], &["out"], vec![]));
            }
            _ => g
                .node
                .push(node("Relu", "r".into(), &["y"], &["out"], vec![])),
        }
        g
    }

    #[test]
    fn folds_a_following_mul_and_add_into_filter_and_bias() {
        let mut g = conv_graph(2, "muladd");
        let mut report = vec![];
        rewrite(&mut g, &mut report);
        assert_eq!(g.node.len(), 1, "{:?}", g.node);
        let n = &g.node[0];
        assert_eq!(n.op_type, DEPTHWISE_CONV);
        assert_eq!(n.output, ["out"]);
        let consts = constants(&g);
        let w = const_f32(&consts, &n.input[1]).expect("constant");
        let b = const_f32(&consts, &n.input[2]).expect("constant");
        assert_eq!(w[0..2], [0.0, 2.0]);
        assert_eq!(w[9..11], [27.0, 30.0]);
        assert_eq!(b, [2.5, 5.5]);
        assert_eq!(
            report,
            ["ran 1 depthwise Conv as FedgeDepthwiseConv, 2 per-channel scale/shift folded in"]
        );
    }

    #[test]
    fn grouped_but_not_depthwise_and_other_followers_are_left_alone() {
        let mut g = conv_graph(1, "relu");
        rewrite(&mut g, &mut vec![]);
        assert_eq!(g.node[0].op_type, "Conv");
        let mut g = conv_graph(2, "relu");
        rewrite(&mut g, &mut vec![]);
        assert_eq!(g.node[0].op_type, DEPTHWISE_CONV);
        assert_eq!(g.node[1].op_type, "Relu");
    }
}
