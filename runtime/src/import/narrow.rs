//! Narrow ONNX types (4- and 2-bit integers, 8-bit and 4-bit floats; `crate::lowp`) held in
//! their container types: declared types, initializers and `Constant`s are widened, and
//! `Cast`/`CastLike` to a narrow type become `FedgeCastNarrow`, which rounds, saturates or
//! wraps as ONNX defines. `QuantizeLinear`/`DequantizeLinear` with narrow types are expanded
//! by `qfloat`, which reads the original types from the map this pass returns.

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, TensorProto, type_proto};

use crate::error::{Result, RuntimeError};

use super::graph::{attr_i, int_attr};
use crate::lowp;
use crate::tract_ops::CAST_NARROW;

/// Widens every narrow type of the top-level graph; returns the narrow type of each value
/// that had one, or an error naming a narrow constant whose data cannot be read.
pub(super) fn widen(g: &mut GraphProto, report: &mut Vec<String>) -> Result<HashMap<String, i32>> {
    let unreadable = |name: &str, t: &TensorProto| {
        RuntimeError::InvalidModel(format!(
            "constant `{name}` of ONNX type {} with shape {:?}: its packed data is missing, \
             short, or stored outside the file",
            t.data_type, t.dims
        ))
    };
    let mut narrow = HashMap::new();
    for v in g
        .input
        .iter_mut()
        .chain(g.output.iter_mut())
        .chain(g.value_info.iter_mut())
    {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
            && let Some(c) = lowp::container(t.elem_type)
        {
            narrow.insert(v.name.clone(), t.elem_type);
            t.elem_type = c;
        }
    }
    for init in g.initializer.iter_mut() {
        if lowp::is_narrow(init.data_type) {
            let w = lowp::widen(init).ok_or_else(|| unreadable(&init.name, init))?;
            narrow.insert(init.name.clone(), init.data_type);
            *init = w;
        }
    }
    let mut casts = 0;
    for n in g.node.iter_mut().filter(|n| n.domain.is_empty()) {
        match n.op_type.as_str() {
            "Constant" if n.output.len() == 1 => {
                if let Some(a) = n.attribute.iter_mut().find(|a| a.name == "value")
                    && let Some(t) = a.t.as_mut()
                    && lowp::is_narrow(t.data_type)
                {
                    let w = lowp::widen(t).ok_or_else(|| unreadable(&n.output[0], t))?;
                    narrow.insert(n.output[0].clone(), t.data_type);
                    *t = w;
                }
            }
            "Cast" | "CastLike" if n.output.len() == 1 => {
                let to = if n.op_type == "Cast" {
                    attr_i(n, "to").and_then(|t| i32::try_from(t).ok())
                } else {
                    n.input.get(1).and_then(|like| narrow.get(like)).copied()
                };
                let Some(to) = to.filter(|&t| lowp::is_narrow(t)) else {
                    continue;
                };
                let saturate = attr_i(n, "saturate").unwrap_or(1);
                n.op_type = CAST_NARROW.into();
                n.domain = "ai.fedge".into();
                n.input.truncate(1);
                n.attribute = vec![
                    int_attr("to", i64::from(to)),
                    int_attr("saturate", saturate),
                ];
                narrow.insert(n.output[0].clone(), to);
                casts += 1;
            }
            _ => {}
        }
    }
    if !narrow.is_empty() {
        report.push(format!(
            "held {} value(s) of 4-/2-bit integer or 8-/4-bit float types in i8/u8/f32{}",
            narrow.len(),
            if casts > 0 {
                format!(", {casts} narrowing cast(s) rounded as ONNX defines")
            } else {
                String::new()
            }
        ));
    }
    Ok(narrow)
}
