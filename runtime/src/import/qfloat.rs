//! `QuantizeLinear` / `DequantizeLinear` that tract 0.23.9 cannot run as such — 16-bit integer
//! types, or a scale or zero point computed at run time (`DynamicQuantizeLinear` written out in
//! standard ops) — expanded into the exact float arithmetic the ONNX specification defines:
//!
//! - `Q(x, s, zp)  = saturate(round_half_even(x / s) + zp)` → `Div, Round, Add, Max, Min, Cast`;
//! - `DQ(x, s, zp) = (x − zp) · s` → `Cast, Sub, Mul`.
//!
//! Integer values up to 2^24 are exact in f32, so 8- and 16-bit results are bit-exact. Per-axis
//! parameters are reshaped to broadcast along `axis` (when the input's rank is known). Blocked
//! parameters (`block_size` B, opset 21) are repeated B times along `axis` by a `Gather` with
//! indices `i / B` (when the input's dimension there is known), then broadcast the same way.
//! float8 and 4-bit types are left alone (tract reports them).

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto, type_proto};

use crate::lowp;
use crate::tract_ops::CAST_NARROW;

use super::graph::{
    FLOAT, INT8, INT32, UINT8, attr_i, constants, consumers, f32_tensor, int_attr, is_graph_output,
    node, producers, raw_tensor,
};

const UINT16: i32 = 4;
const FLOAT16: i32 = 10;
const INT16: i32 = 5;

/// The saturation range of an ONNX integer type code (4- and 2-bit ones included).
fn range(t: i32) -> Option<(f32, f32)> {
    Some(match t {
        UINT8 => (0.0, 255.0),
        INT8 => (-128.0, 127.0),
        UINT16 => (0.0, 65535.0),
        INT16 => (-32768.0, 32767.0),
        _ => return lowp::int_range(t),
    })
}

/// Element type and rank of graph inputs, outputs and annotated values.
fn declared(g: &GraphProto) -> HashMap<String, (i32, Option<usize>)> {
    let mut out = HashMap::new();
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            out.insert(
                v.name.clone(),
                (t.elem_type, t.shape.as_ref().map(|s| s.dim.len())),
            );
        }
    }
    out
}

/// The ONNX element type of `name`: a narrow type `narrow::widen` widened, a constant's, a
/// `Cast`'s target, or a declared type.
fn elem_type(
    nodes: &[NodeProto],
    consts: &HashMap<String, TensorProto>,
    prod: &HashMap<String, usize>,
    decl: &HashMap<String, (i32, Option<usize>)>,
    name: &str,
) -> Option<i32> {
    if let Some(&(t, _)) = decl.get(name).filter(|d| lowp::is_narrow(d.0)) {
        return Some(t);
    }
    if let Some(t) = consts.get(name) {
        return Some(t.data_type);
    }
    if let Some(&i) = prod.get(name) {
        let n = &nodes[i];
        if n.op_type == "Cast" {
            return attr_i(n, "to").map(|t| t as i32);
        }
        if n.op_type == "Identity" {
            return elem_type(nodes, consts, prod, decl, &n.input[0]);
        }
    }
    decl.get(name).map(|d| d.0)
}

fn is_scalar(
    consts: &HashMap<String, TensorProto>,
    decl: &HashMap<String, (i32, Option<usize>)>,
    name: &str,
) -> bool {
    consts
        .get(name)
        .is_some_and(|t| t.dims.iter().product::<i64>() == 1)
        || decl.get(name).is_some_and(|d| d.1 == Some(0))
}

/// Concrete dimensions of graph inputs, outputs and annotated values (`None` for symbolic ones).
fn declared_dims(g: &GraphProto) -> HashMap<String, Vec<Option<usize>>> {
    let mut out = HashMap::new();
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
            && let Some(shape) = &t.shape
        {
            let dims = shape
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v))
                        if v > 0 =>
                    {
                        Some(v as usize)
                    }
                    _ => None,
                })
                .collect();
            out.insert(v.name.clone(), dims);
        }
    }
    out
}

/// With `defer_biases`, int32 `DequantizeLinear`s of constants read only as the bias of a
/// `Conv` or `Gemm` are left for `qdq` to fold into its integer ops; a second call without it
/// expands those it did not take.
pub(super) fn rewrite(
    g: &mut GraphProto,
    narrow: &HashMap<String, i32>,
    defer_biases: bool,
    report: &mut Vec<String>,
) {
    let consts = constants(g);
    let prod = producers(g);
    let readers = consumers(g);
    let bias_only = |n: &NodeProto| {
        n.op_type == "DequantizeLinear"
            && n.input
                .first()
                .is_some_and(|x| consts.get(x).is_some_and(|t| t.data_type == INT32))
            && n.output.len() == 1
            && !is_graph_output(g, &n.output[0])
            && readers.get(&n.output[0]).is_some_and(|r| {
                r.iter().all(|&j| {
                    let c = &g.node[j];
                    matches!(c.op_type.as_str(), "Conv" | "Gemm")
                        && c.domain.is_empty()
                        && c.input.iter().position(|s| s == &n.output[0]) == Some(2)
                })
            })
    };
    let deferred: Vec<bool> = g
        .node
        .iter()
        .map(|n| defer_biases && bias_only(n))
        .collect();
    let mut decl = declared(g);
    // Narrow types held widened: their own type, whatever the container says.
    for (name, &t) in narrow {
        decl.entry(name.clone()).or_insert((t, None)).0 = t;
    }
    let dims = declared_dims(g);
    let mut out_nodes = Vec::with_capacity(g.node.len());
    let mut inits = Vec::new();
    let mut count = 0usize;
    let nodes = std::mem::take(&mut g.node);
    for (i, n) in nodes.iter().enumerate() {
        if deferred[i] {
            out_nodes.push(n.clone());
            continue;
        }
        match expand(&nodes, i, n, &consts, &prod, &decl, &dims, &mut inits) {
            Some(new) => {
                count += 1;
                out_nodes.extend(new);
            }
            None => out_nodes.push(n.clone()),
        }
    }
    g.node = out_nodes;
    g.initializer.extend(inits);
    if count > 0 {
        report.push(format!("expanded {count} × QuantizeLinear/DequantizeLinear (16-bit, narrow, blocked or run-time parameters) into exact float ops"));
    }
}

#[allow(clippy::too_many_arguments)]
fn expand(
    nodes: &[NodeProto],
    i: usize,
    n: &NodeProto,
    consts: &HashMap<String, TensorProto>,
    prod: &HashMap<String, usize>,
    decl: &HashMap<String, (i32, Option<usize>)>,
    dims: &HashMap<String, Vec<Option<usize>>>,
    inits: &mut Vec<TensorProto>,
) -> Option<Vec<NodeProto>> {
    let quantize = match (n.op_type.as_str(), n.domain.as_str()) {
        ("QuantizeLinear", "" | "ai.onnx") => true,
        ("DequantizeLinear", "" | "ai.onnx") => false,
        _ => return None,
    };
    let block = attr_i(n, "block_size").unwrap_or(0);
    if block < 0 || n.input.len() < 2 || n.output.len() != 1 {
        return None;
    }
    let x = n.input[0].as_str();
    let scale = n.input[1].as_str();
    let zp = n.input.get(2).map(String::as_str).filter(|s| !s.is_empty());
    // The scale has the input's float type (Q) or the output's (DQ) when nothing else says.
    let scale_type = elem_type(nodes, consts, prod, decl, scale).or_else(|| {
        if quantize {
            elem_type(nodes, consts, prod, decl, x)
        } else {
            decl.get(n.output[0].as_str()).map(|d| d.0)
        }
    })?;
    // float16 scales: dequantized in f32 (integer and 8-bit float codes times a float16 are
    // exact there) and rounded once to float16.
    let half = scale_type == FLOAT16 && !quantize;
    if scale_type != FLOAT && !half {
        return None;
    }
    // The integer type: the zero point's, the `output_dtype` attribute's, or uint8.
    let int_type = match zp {
        Some(z) => elem_type(nodes, consts, prod, decl, z)?,
        None if quantize => attr_i(n, "output_dtype").map_or(UINT8, |t| t as i32),
        None => elem_type(nodes, consts, prod, decl, x)?,
    };
    let sixteen = matches!(int_type, UINT16 | INT16);
    let narrow_type = lowp::is_narrow(int_type);
    let float_narrow = narrow_type && lowp::int_range(int_type).is_none();
    let dynamic = !consts.contains_key(scale) || zp.is_some_and(|z| !consts.contains_key(z));
    let int32_dq = !quantize && int_type == INT32;
    if !(sixteen || dynamic || int32_dq || block > 0 || narrow_type || half) {
        return None;
    }
    if range(int_type).is_none() && !float_narrow && (quantize || int_type != INT32) {
        return None;
    }
    let p = format!(
        "{}__qfloat{i}",
        if n.name.is_empty() {
            n.output[0].as_str()
        } else {
            n.name.as_str()
        }
    );
    let mut out = Vec::new();
    // Blocked parameters: as many entries along `axis` as the input has, entry i from block
    // i / B. They have the input's rank, so they broadcast as they are.
    let (scale, zp) = if block > 0 {
        let x_dims = dims.get(x)?;
        let r = x_dims.len() as i64;
        let axis = attr_i(n, "axis").unwrap_or(1);
        let axis = if axis < 0 { axis + r } else { axis };
        let d = (*x_dims.get(usize::try_from(axis).ok()?)?)?;
        let idx = format!("{p}_block_idx");
        inits.push(raw_tensor(
            &idx,
            7,
            &[d as i64],
            (0..d as i64)
                .flat_map(|i| (i / block).to_le_bytes())
                .collect(),
        ));
        let mut gather = |what: &str, v: &str| -> String {
            let o = format!("{p}_{what}_blocks");
            out.push(node(
                "Gather",
                format!("{p}_{what}_gather"),
                &[v, &idx],
                &[&o],
                vec![int_attr("axis", axis)],
            ));
            o
        };
        (gather("scale", scale), zp.map(|z| gather("zp", z)))
    } else {
        (scale.to_string(), zp.map(str::to_string))
    };
    let (scale, zp) = (scale.as_str(), zp.as_deref());
    // Per-axis parameters broadcast along `axis`.
    let needs_reshape = block == 0 && !is_scalar(consts, decl, scale);
    let rank = decl.get(x).and_then(|d| d.1);
    let shape_name = format!("{p}_shape");
    if needs_reshape {
        let r = rank?;
        if r > 1 {
            let axis = attr_i(n, "axis").unwrap_or(1);
            let axis = if axis < 0 { axis + r as i64 } else { axis };
            if !(0..r as i64).contains(&axis) {
                return None;
            }
            let dims: Vec<i64> = (0..r as i64)
                .map(|d| if d == axis { -1 } else { 1 })
                .collect();
            inits.push(raw_tensor(
                &shape_name,
                7,
                &[r as i64],
                dims.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
    }
    let reshape = |name: &str, out: &mut Vec<NodeProto>| -> String {
        if needs_reshape && rank.is_some_and(|r| r > 1) {
            let o = format!("{p}_{}_b", out.len());
            out.push(node(
                "Reshape",
                format!("{p}_reshape{}", out.len()),
                &[name, &shape_name],
                &[&o],
                vec![],
            ));
            o
        } else {
            name.to_string()
        }
    };
    let scale = if half {
        let sf = format!("{p}_scale_f");
        out.push(node(
            "Cast",
            format!("{p}_scale_cast"),
            &[scale],
            &[&sf],
            vec![int_attr("to", i64::from(FLOAT))],
        ));
        sf
    } else {
        scale.to_string()
    };
    let s = reshape(&scale, &mut out);
    let zf = zp.map(|z| {
        let zc = format!("{p}_zp_f");
        out.push(node(
            "Cast",
            format!("{p}_zp_cast"),
            &[z],
            &[&zc],
            vec![int_attr("to", i64::from(FLOAT))],
        ));
        reshape(&zc, &mut out)
    });
    let y = n.output[0].as_str();
    if quantize && float_narrow {
        // 8- and 4-bit floats: `x / s + zp` rounded to the type (no rounding to integers).
        let div = format!("{p}_div");
        out.push(node("Div", div.clone(), &[x, &s], &[&div], vec![]));
        let shifted = match &zf {
            Some(z) => {
                let add = format!("{p}_add");
                out.push(node("Add", add.clone(), &[&div, z], &[&add], vec![]));
                add
            }
            None => div,
        };
        let mut cast = node(
            CAST_NARROW,
            format!("{p}_out"),
            &[&shifted],
            &[y],
            vec![
                int_attr("to", i64::from(int_type)),
                int_attr("saturate", attr_i(n, "saturate").unwrap_or(1)),
            ],
        );
        cast.domain = "ai.fedge".into();
        out.push(cast);
    } else if quantize {
        let (lo, hi) = range(int_type)?;
        let (div, rnd, add, sat_lo, sat_hi) = (
            format!("{p}_div"),
            format!("{p}_round"),
            format!("{p}_add"),
            format!("{p}_max"),
            format!("{p}_min"),
        );
        let (lo_c, hi_c) = (format!("{p}_lo"), format!("{p}_hi"));
        inits.push(f32_tensor(&lo_c, &[], &[lo]));
        inits.push(f32_tensor(&hi_c, &[], &[hi]));
        out.push(node("Div", div.clone(), &[x, &s], &[&div], vec![]));
        out.push(node("Round", rnd.clone(), &[&div], &[&rnd], vec![]));
        let shifted = match &zf {
            Some(z) => {
                out.push(node("Add", add.clone(), &[&rnd, z], &[&add], vec![]));
                add
            }
            None => rnd,
        };
        out.push(node(
            "Max",
            sat_lo.clone(),
            &[&shifted, &lo_c],
            &[&sat_lo],
            vec![],
        ));
        out.push(node(
            "Min",
            sat_hi.clone(),
            &[&sat_lo, &hi_c],
            &[&sat_hi],
            vec![],
        ));
        out.push(node(
            "Cast",
            format!("{p}_out"),
            &[&sat_hi],
            &[y],
            vec![int_attr(
                "to",
                i64::from(lowp::container(int_type).unwrap_or(int_type)),
            )],
        ));
    } else {
        let xf = format!("{p}_x_f");
        out.push(node(
            "Cast",
            format!("{p}_x_cast"),
            &[x],
            &[&xf],
            vec![int_attr("to", i64::from(FLOAT))],
        ));
        let centred = match &zf {
            Some(z) => {
                let c = format!("{p}_sub");
                out.push(node("Sub", c.clone(), &[&xf, z], &[&c], vec![]));
                c
            }
            None => xf,
        };
        let product = if half {
            format!("{p}_mul_f")
        } else {
            y.to_string()
        };
        out.push(node(
            "Mul",
            format!("{p}_mul"),
            &[&centred, &s],
            &[&product],
            vec![],
        ));
        if half {
            out.push(node(
                "Cast",
                format!("{p}_half"),
                &[&product],
                &[y],
                vec![int_attr("to", i64::from(FLOAT16))],
            ));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::graph::i32_tensor;
    use super::*;

    #[test]
    fn int32_biases_of_convolutions_are_deferred_to_the_integer_rewrites() {
        let graph = || GraphProto {
            node: vec![
                node(
                    "DequantizeLinear",
                    "bias_dq".into(),
                    &["b_q", "b_s"],
                    &["b"],
                    vec![],
                ),
                node("Conv", "conv".into(), &["x", "w", "b"], &["y"], vec![]),
            ],
            initializer: vec![
                i32_tensor("b_q", &[2], &[1000, -7]),
                f32_tensor("b_s", &[], &[0.5]),
            ],
            ..Default::default()
        };
        let ops =
            |g: &GraphProto| -> Vec<String> { g.node.iter().map(|n| n.op_type.clone()).collect() };
        let mut report = Vec::new();
        let mut g = graph();
        rewrite(&mut g, &HashMap::new(), true, &mut report);
        assert_eq!(ops(&g), ["DequantizeLinear", "Conv"]);
        assert!(report.is_empty(), "{report:?}");
        // Not deferred (or left over): expanded into float ops.
        rewrite(&mut g, &HashMap::new(), false, &mut report);
        assert!(
            !ops(&g).contains(&"DequantizeLinear".to_string()),
            "{:?}",
            ops(&g)
        );
        assert_eq!(report.len(), 1);
    }
}
