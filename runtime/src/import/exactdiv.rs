//! Float `Div` nodes of quantized graphs as `FedgeExactDiv` (see `crate::tract_ops`), so that
//! tract divides as onnxruntime does instead of multiplying by a reciprocal.
//!
//! `QuantizeLinear(x, s, zp)` with a constant scalar scale becomes
//! `QuantizeLinear(FedgeExactDiv(x, s), 1, zp)` for the same reason: tract quantizes through
//! `x · (1/s)`, onnxruntime through `x / s`, and values on a rounding tie land on different
//! integers (onnxruntime's `QLinearAdd` is `round((sa·(a-za) + sb·(b-zb)) / sc) + zc` in f32).
//!
//! Only divisions known to be on floats are rewritten: an operand is a float constant or graph
//! input, the output of an op defined on floats only (`Sqrt`, `Exp`, ...), of a cast to a
//! float, or of arithmetic on such values. Integer and shape arithmetic keeps tract's `Div`,
//! which also folds symbolic dimensions.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, TensorProto};

use super::graph::{INT8, UINT8, const_f32, constants, f32_tensor, float_attr, int_attr, node};
use crate::tract_ops::{
    DYNAMIC_QUANTIZE_LINEAR, EXACT_DIV, GLOBAL_AVERAGE_POOL, QLINEAR_ADD, QUANTIZE_LINEAR,
};

/// ONNX element types of the floats: float, float16, double, bfloat16.
const FLOATS: [i32; 4] = [1, 10, 11, 16];

/// Ops whose outputs are floats whatever their inputs (ONNX defines them on floats only).
const FLOAT_ONLY: [&str; 8] = [
    "Sqrt",
    "Exp",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Softplus",
    "DequantizeLinear",
    "Reciprocal",
];

/// Ops whose output has the type of their first inputs.
const SAME_TYPE: [&str; 14] = [
    "Add",
    "Sub",
    "Mul",
    "Max",
    "Min",
    "Abs",
    "Neg",
    "Clip",
    "Relu",
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "ReduceSum",
    "Identity",
];

/// Whether the graph rounds or quantizes anywhere, which is where a one-ulp difference
/// becomes a whole step.
pub(super) fn quantizes(g: &GraphProto) -> bool {
    g.node.iter().any(|n| {
        matches!(
            n.op_type.as_str(),
            "QuantizeLinear"
                | "DynamicQuantizeLinear"
                | "QLinearConv"
                | "QLinearMatMul"
                | "Round"
                | crate::tract_ops::CAST_NARROW
                | crate::tract_ops::REQUANTIZE
        )
    })
}

pub(super) fn rewrite(g: &mut GraphProto, report: &mut Vec<String>) {
    let consts: HashMap<String, TensorProto> = constants(g);
    // Values known to be floats, in node order (ONNX graphs are topologically sorted).
    let mut float: HashSet<String> = consts
        .iter()
        .filter(|(_, t)| FLOATS.contains(&t.data_type))
        .map(|(k, _)| k.clone())
        .collect();
    for v in &g.input {
        if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
            && FLOATS.contains(&t.elem_type)
        {
            float.insert(v.name.clone());
        }
    }
    let mut done = 0usize;
    for n in g.node.iter_mut().filter(|n| n.domain.is_empty()) {
        let op = n.op_type.as_str();
        let in_float = |i: usize| n.input.get(i).is_some_and(|x| float.contains(x));
        let out_float = FLOAT_ONLY.contains(&op)
            || (op == "Cast"
                && n.attribute
                    .iter()
                    .any(|a| a.name == "to" && FLOATS.contains(&(a.i as i32))))
            || (SAME_TYPE.contains(&op) && (in_float(0) || in_float(1)));
        if op == "Div" && n.input.len() == 2 && (in_float(0) || in_float(1)) {
            n.op_type = EXACT_DIV.into();
            n.domain = "ai.fedge".into();
            done += 1;
        }
        if out_float || n.op_type == EXACT_DIV {
            float.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    if done > 0 {
        report.push(format!(
            "computed {done} float Div as true divisions (tract would multiply by reciprocals)"
        ));
    }
}

/// `QuantizeLinear` with a constant scalar scale quantizes an exact quotient: as one
/// `FedgeQuantizeLinear` pass when its zero point is a constant 8-bit scalar too, else as
/// `QuantizeLinear(FedgeExactDiv(x, s), 1, zp)`.
pub(super) fn quantize(g: &mut GraphProto, report: &mut Vec<String>) {
    let consts = constants(g);
    let one = "__fedge_exact_q_one";
    let mut out = Vec::with_capacity(g.node.len());
    let (mut fused, mut divided) = (0usize, 0usize);
    for mut n in std::mem::take(&mut g.node) {
        let plain = n.op_type == "QuantizeLinear"
            && n.domain.is_empty()
            && n.input.len() >= 2
            && !n
                .attribute
                .iter()
                .any(|a| a.name == "output_dtype" || a.name == "block_size");
        let scale = plain
            .then(|| const_f32(&consts, &n.input[1]))
            .flatten()
            .filter(|s| s.len() == 1 && s[0].is_normal())
            .map(|s| s[0]);
        let Some(scale) = scale else {
            out.push(n);
            continue;
        };
        let zp_name = n.input.get(2).cloned().unwrap_or_default();
        let zp = if zp_name.is_empty() {
            Some((0.0, false))
        } else {
            consts.get(&zp_name).and_then(|t| {
                let v = const_f32(&consts, &zp_name)?;
                match (v.as_slice(), t.data_type) {
                    ([v], INT8) => Some((*v, true)),
                    ([v], UINT8) => Some((*v, false)),
                    _ => None,
                }
            })
        };
        if let Some((zp, signed)) = zp {
            let name = n.name.clone();
            let mut q = node(
                QUANTIZE_LINEAR,
                name,
                &[&n.input[0]],
                &[&n.output[0]],
                vec![
                    float_attr("scale", scale),
                    int_attr("zero_point", zp as i64),
                    int_attr("signed", signed as i64),
                ],
            );
            q.domain = "ai.fedge".into();
            out.push(q);
            fused += 1;
            continue;
        }
        if scale != 1.0 {
            let q = format!("{}__fedge_exact_q", n.output.first().map_or("", |s| s));
            let mut d = node(
                EXACT_DIV,
                q.clone(),
                &[&n.input[0], &n.input[1]],
                &[&q],
                vec![],
            );
            d.domain = "ai.fedge".into();
            out.push(d);
            n.input[0] = q;
            n.input[1] = one.into();
            divided += 1;
        }
        out.push(n);
    }
    g.node = out;
    if divided > 0 {
        g.initializer.push(f32_tensor(one, &[], &[1.0]));
    }
    if fused + divided > 0 {
        report.push(format!(
            "quantized {} QuantizeLinear through true divisions by their scales",
            fused + divided
        ));
    }
}

/// `DynamicQuantizeLinear` as `FedgeDynamicQuantizeLinear` (onnxruntime's arithmetic in two
/// vectorised passes).
pub(super) fn dynamic_quantize(g: &mut GraphProto, report: &mut Vec<String>) {
    let mut count = 0usize;
    for n in g.node.iter_mut().filter(|n| {
        n.op_type == "DynamicQuantizeLinear"
            && n.domain.is_empty()
            && n.input.len() == 1
            && n.output.len() == 3
    }) {
        n.op_type = DYNAMIC_QUANTIZE_LINEAR.into();
        n.domain = "ai.fedge".into();
        count += 1;
    }
    if count > 0 {
        report.push(format!(
            "computed {count} DynamicQuantizeLinear as onnxruntime does, in two passes each"
        ));
    }
}

/// onnxruntime's `QLinearAdd` (`com.microsoft`) with constant scalar scales and zero points as
/// `FedgeQLinearAdd`, which computes what onnxruntime's kernel computes (see
/// `crate::tract_ops::QLinearAddOrt`); the float decomposition rounds differently on ties.
pub(super) fn qlinear_add(g: &mut GraphProto, report: &mut Vec<String>) {
    let consts = constants(g);
    let scalar = |name: &str| -> Option<f32> {
        match const_f32(&consts, name)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    };
    let mut done = 0usize;
    for n in g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "QLinearAdd" && n.domain == "com.microsoft" && n.input.len() >= 7)
    {
        let input = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
        let zp = |i: usize| -> Option<f32> {
            if input(i).is_empty() {
                Some(0.0)
            } else {
                scalar(input(i))
            }
        };
        let types: Vec<i32> = [2, 5, 7]
            .iter()
            .filter_map(|&i| consts.get(input(i)).map(|t| t.data_type))
            .collect();
        let signed = match types.first() {
            Some(&t) if types.iter().all(|&u| u == t) && (t == INT8 || t == UINT8) => t == INT8,
            _ => continue,
        };
        let (Some(sa), Some(za), Some(sb), Some(zb), Some(sc), Some(zc)) = (
            scalar(input(1)),
            zp(2),
            scalar(input(4)),
            zp(5),
            scalar(input(6)),
            zp(7),
        ) else {
            continue;
        };
        if !(sa.is_normal() && sb.is_normal() && sc.is_normal()) {
            continue;
        }
        // onnxruntime's order of f32 operations.
        let (ra, rb) = (sa / sc, sb / sc);
        let fixed = zc - (ra * za + rb * zb);
        let (a, b) = (input(0).to_string(), input(3).to_string());
        *n = node(
            QLINEAR_ADD,
            n.name.clone(),
            &[&a, &b],
            &[&n.output[0]],
            vec![
                float_attr("ratio_a", ra),
                float_attr("ratio_b", rb),
                float_attr("fixed", fixed),
                int_attr("signed", signed as i64),
            ],
        );
        n.domain = "ai.fedge".into();
        done += 1;
    }
    if done > 0 {
        report.push(format!(
            "ran {done} QLinearAdd (com.microsoft) with onnxruntime's kernel arithmetic"
        ));
    }
}

/// `GlobalAveragePool` as `FedgeGlobalAveragePool` (onnxruntime's summation order, float32
/// only: skipped when the graph holds float16 or float64 values).
pub(super) fn global_average_pool(g: &mut GraphProto, report: &mut Vec<String>) {
    let wide = |t: i32| t == 10 || t == 11 || t == 16;
    let other_floats = g.initializer.iter().any(|t| wide(t.data_type))
        || g.input.iter().any(|v| {
            matches!(
                v.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(tract_onnx::pb::type_proto::Value::TensorType(t)) if wide(t.elem_type)
            )
        });
    if other_floats {
        return;
    }
    let mut done = 0usize;
    for n in g
        .node
        .iter_mut()
        .filter(|n| n.op_type == "GlobalAveragePool" && n.domain.is_empty() && n.input.len() == 1)
    {
        n.op_type = GLOBAL_AVERAGE_POOL.into();
        n.domain = "ai.fedge".into();
        done += 1;
    }
    if done > 0 {
        report.push(format!(
            "pooled {done} GlobalAveragePool in onnxruntime's summation order"
        ));
    }
}
