//! Small helpers over ONNX protobuf graphs: constant lookup, node and tensor construction.

use std::collections::HashMap;

use tract_onnx::pb::{self, AttributeProto, GraphProto, NodeProto, TensorProto};
use tract_onnx::prelude::{DatumType, Tensor as TractTensor};

pub(crate) const FLOAT: i32 = 1;
pub(crate) const UINT8: i32 = 2;
pub(crate) const INT8: i32 = 3;
pub(crate) const INT32: i32 = 6;
pub(crate) const INT64: i32 = 7;

/// Decodes a constant with tract's own loader (raw, typed and external data alike); narrow
/// types (`crate::lowp`) come widened to their container type.
pub(crate) fn load(t: &TensorProto) -> Option<TractTensor> {
    let resolver = tract_onnx::data_resolver::MmapDataResolver;
    if crate::lowp::is_narrow(t.data_type) {
        let wide = crate::lowp::widen(t)?;
        return tract_onnx::tensor::load_tensor(&resolver, &wide, None).ok();
    }
    tract_onnx::tensor::load_tensor(&resolver, t, None).ok()
}

/// Constants of a graph by name: initializers and `Constant` nodes with a `value` tensor.
pub(crate) fn constants(g: &GraphProto) -> HashMap<String, TensorProto> {
    let mut out: HashMap<String, TensorProto> = g
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    for n in g
        .node
        .iter()
        .filter(|n| n.op_type == "Constant" && n.output.len() == 1)
    {
        if let Some(t) = n
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.clone())
        {
            out.insert(n.output[0].clone(), t);
        }
    }
    out
}

/// Index of the node producing each tensor name.
pub(crate) fn producers(g: &GraphProto) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            out.insert(o.clone(), i);
        }
    }
    out
}

/// Every tensor name read by a node of `g` or of its subgraphs, and `g`'s outputs.
pub(crate) fn names_read(g: &GraphProto, out: &mut std::collections::HashSet<String>) {
    out.extend(g.output.iter().map(|o| o.name.clone()));
    for n in &g.node {
        out.extend(n.input.iter().cloned());
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                names_read(sub, out);
            }
        }
    }
}

/// Indices of the nodes reading each tensor name (subgraphs count as readers of their node).
pub(crate) fn consumers(g: &GraphProto) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            out.entry(inp.clone()).or_default().push(i);
        }
        for sub in n.attribute.iter().filter_map(|a| a.g.as_ref()) {
            for name in outer_names_used(sub) {
                out.entry(name).or_default().push(i);
            }
        }
    }
    out
}

fn outer_names_used(g: &GraphProto) -> Vec<String> {
    let mut names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    for n in &g.node {
        for sub in n.attribute.iter().filter_map(|a| a.g.as_ref()) {
            names.extend(outer_names_used(sub));
        }
    }
    names
}

pub(crate) fn is_graph_output(g: &GraphProto, name: &str) -> bool {
    g.output.iter().any(|o| o.name == name)
}

pub(crate) fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).map(|a| a.i)
}

pub(crate) fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    attr(n, name).map(|a| a.f)
}

pub(crate) fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub(crate) fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub(crate) fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

pub(crate) fn floats_attr(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Floats as i32,
        floats: v.to_vec(),
        ..Default::default()
    }
}

pub(crate) fn node(
    op: &str,
    name: String,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

/// An int64 initializer.
pub(crate) fn i64_tensor(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    raw_tensor(
        name,
        INT64,
        dims,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A constant initializer from little-endian bytes.
pub(crate) fn raw_tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type,
        dims: dims.to_vec(),
        raw_data: raw,
        ..Default::default()
    }
}

pub(crate) fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        FLOAT,
        dims,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

pub(crate) fn i32_tensor(name: &str, dims: &[i64], data: &[i32]) -> TensorProto {
    raw_tensor(
        name,
        INT32,
        dims,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A scalar zero point of the given ONNX integer type.
pub(crate) fn zero_point(name: &str, data_type: i32) -> TensorProto {
    raw_tensor(name, data_type, &[], vec![0])
}

/// ONNX type code of a tract datum type (the integer types quantization uses).
pub(crate) fn onnx_type(dt: DatumType) -> Option<i32> {
    Some(match dt.unquantized() {
        DatumType::F32 => FLOAT,
        DatumType::U8 => UINT8,
        DatumType::I8 => INT8,
        DatumType::I32 => INT32,
        DatumType::I64 => INT64,
        _ => return None,
    })
}

/// A constant's values as f32 (any numeric type), or `None` when not a constant.
pub(crate) fn const_f32(consts: &HashMap<String, TensorProto>, name: &str) -> Option<Vec<f32>> {
    let t = load(consts.get(name)?)?;
    let t = t.cast_to::<f32>().ok()?;
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>().map(|s| s.to_vec()))
        .ok()
}
