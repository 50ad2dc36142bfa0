//! Constant inputs, symbolic dimensions and stale `value_info`.

use std::collections::BTreeMap;

use tract_onnx::pb::GraphProto;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;

use super::graph::raw_tensor;
use crate::error::{Result, RuntimeError};
use crate::options::ModelOptions;
use crate::tensor::Tensor;

/// Turns the inputs named in `constants` into initializers.
pub(super) fn bake_constants(
    g: &mut GraphProto,
    constants: &BTreeMap<String, Tensor>,
    report: &mut Vec<String>,
) -> Result<()> {
    for (name, t) in constants {
        let pos = g
            .input
            .iter()
            .position(|i| &i.name == name)
            .ok_or_else(|| RuntimeError::UnknownInput(name.clone()))?;
        g.input.remove(pos);
        g.initializer.retain(|i| &i.name != name);
        let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        g.initializer.push(raw_tensor(
            name,
            t.dtype().onnx_code(),
            &dims,
            t.as_bytes().to_vec(),
        ));
        report.push(format!(
            "input `{name}` baked in as a constant {:?}",
            t.shape()
        ));
    }
    Ok(())
}

/// Replaces symbolic input dimensions by the values the options give, and drops `value_info`
/// and output shapes (tract infers them; stale ones clash with concrete input shapes).
pub(super) fn resolve_dims(g: &mut GraphProto, opts: &ModelOptions, report: &mut Vec<String>) {
    let initializers: std::collections::HashSet<String> =
        g.initializer.iter().map(|i| i.name.clone()).collect();
    for input in g
        .input
        .iter_mut()
        .filter(|i| !initializers.contains(&i.name))
    {
        let given = opts.input_shapes.get(&input.name);
        let Some(TypeValue::TensorType(tt)) = input.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        let Some(shape) = tt.shape.as_mut() else {
            continue;
        };
        if let Some(given) = given {
            shape.dim = given
                .iter()
                .map(|&d| tract_onnx::pb::tensor_shape_proto::Dimension {
                    value: Some(DimValue::DimValue(d as i64)),
                    ..Default::default()
                })
                .collect();
            continue;
        }
        for d in shape.dim.iter_mut() {
            if let Some(DimValue::DimParam(p)) = &d.value
                && let Some(&v) = opts.dims.get(p)
            {
                d.value = Some(DimValue::DimValue(v as i64));
            }
        }
    }
    if !g.value_info.is_empty() {
        report.push(format!("dropped {} value_info entries", g.value_info.len()));
        g.value_info.clear();
    }
}
