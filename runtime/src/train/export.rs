//! The trained model as a standard ONNX file: `[backbone →] Flatten → Gemm (→ Relu → Gemm) →
//! Softmax`.

use std::collections::HashSet;

use prost::Message;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension::Value as DimValue};
use tract_onnx::pb::type_proto::{Tensor as TensorType, Value as TypeValue};
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::head::Head;
use super::{Result, TrainError};
use crate::import::graph::{FLOAT, f32_tensor, int_attr, node};

/// The input of an exported head without a backbone: float32 `[N, features]`.
pub const INPUT_NAME: &str = "x";
/// The output of every exported model: float32 `[N, classes]` class probabilities.
pub const OUTPUT_NAME: &str = "probabilities";

/// The default-domain opset of a head without a backbone.
const OPSET: i64 = 13;
/// ONNX IR version 8 (ONNX 1.10), which opset 13 fits in.
const IR_VERSION: i64 = 8;

/// Writes `head`, after `backbone` when given, as an ONNX model (protobuf bytes).
///
/// Without a backbone the model takes [`INPUT_NAME`], float32 `[N, features]` with a symbolic
/// batch `N`. With one, the backbone's inputs stay the model's inputs and `backbone_output` (a
/// graph output or any tensor a node produces; the only graph output when `None`) feeds the
/// head through `Flatten(axis = 1)`, so `[N, C, 1, 1]` pooled features work too. The backbone
/// is cut to the nodes that tensor needs, its outputs are replaced by [`OUTPUT_NAME`], and its
/// opsets are kept (opset 13 added when it has no default domain). Head tensors take fresh
/// names (`head.fc1.weight`, …, suffixed `_1`, `_2` on collision); a backbone tensor called
/// [`OUTPUT_NAME`] is renamed.
///
/// The head is `Gemm(transB = 1)` per layer with `Relu` between and `Softmax(axis = 1)` last, so
/// the parameters go into the file in [`Head`]'s own layout.
///
/// # Errors
/// [`TrainError::Export`] when the backbone is not ONNX, `backbone_output` is given without a
/// backbone or names no tensor, the backbone has several outputs and none is named, or the
/// tensor's declared shape does not hold [`Head::features`] values per row.
pub fn export_onnx(
    head: &Head,
    backbone: Option<&[u8]>,
    backbone_output: Option<&str>,
) -> Result<Vec<u8>> {
    let model = match backbone {
        Some(bytes) => merged(head, bytes, backbone_output)?,
        None if backbone_output.is_some() => {
            return Err(export_error(
                "a backbone output is named but no backbone given",
            ));
        }
        None => head_only(head),
    };
    Ok(model.encode_to_vec())
}

fn export_error(what: impl Into<String>) -> TrainError {
    TrainError::Export(what.into())
}

fn head_only(head: &Head) -> ModelProto {
    let mut names = Names::default();
    names.taken.insert(INPUT_NAME.into());
    let mut graph = GraphProto {
        name: "fedge_head".into(),
        input: vec![tensor_info(INPUT_NAME, symbolic_batch(), head.features())],
        ..Default::default()
    };
    append_head(&mut graph, head, INPUT_NAME, &mut names);
    graph.output = vec![tensor_info(OUTPUT_NAME, symbolic_batch(), head.classes())];
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    with_metadata(model, head)
}

fn merged(head: &Head, bytes: &[u8], output: Option<&str>) -> Result<ModelProto> {
    let mut model = ModelProto::decode(bytes)
        .map_err(|e| export_error(format!("the backbone is not ONNX: {e}")))?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| export_error("the backbone has no graph"))?;
    let mut feature = pick_output(graph, output)?;
    let batch = check_features(graph, &feature, head.features())?;
    prune(graph, &feature);
    let mut names = Names::default();
    names.collect(graph);
    if names.taken.contains(OUTPUT_NAME) {
        let to = names.fresh(OUTPUT_NAME);
        rename(graph, OUTPUT_NAME, &to);
        if feature == OUTPUT_NAME {
            feature = to;
        }
    }
    let flat = names.fresh("head.flatten");
    graph.node.push(node(
        "Flatten",
        flat.clone(),
        &[&feature],
        &[&flat],
        vec![int_attr("axis", 1)],
    ));
    append_head(graph, head, &flat, &mut names);
    graph.output = vec![tensor_info(OUTPUT_NAME, batch, head.classes())];
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        model.opset_import.push(OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        });
    }
    // Initializers that are not graph inputs need IR 4.
    model.ir_version = model.ir_version.max(4);
    Ok(with_metadata(model, head))
}

fn with_metadata(mut model: ModelProto, head: &Head) -> ModelProto {
    let widths: Vec<String> = (0..head.n_layers())
        .map(|l| head.layer(l).inputs.to_string())
        .chain([head.classes().to_string()])
        .collect();
    model.producer_name = "fedge".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    model.metadata_props.retain(|p| p.key != "fedge.head");
    model.metadata_props.push(StringStringEntryProto {
        key: "fedge.head".into(),
        value: format!("{:?} {}", head.kind(), widths.join("x")),
    });
    model
}

/// Appends the head's nodes and initializers reading `input`; its last node writes
/// [`OUTPUT_NAME`].
fn append_head(graph: &mut GraphProto, head: &Head, input: &str, names: &mut Names) {
    let mut prev = input.to_string();
    for l in 0..head.n_layers() {
        let d = head.layer(l);
        let base = format!("head.fc{}", l + 1);
        let (w, b) = (
            names.fresh(&format!("{base}.weight")),
            names.fresh(&format!("{base}.bias")),
        );
        graph
            .initializer
            .push(f32_tensor(&w, &[d.outputs as i64, d.inputs as i64], d.w));
        graph
            .initializer
            .push(f32_tensor(&b, &[d.outputs as i64], d.b));
        let out = names.fresh(&base);
        graph.node.push(node(
            "Gemm",
            out.clone(),
            &[&prev, &w, &b],
            &[&out],
            vec![int_attr("transB", 1)],
        ));
        prev = out;
        if l + 1 < head.n_layers() {
            let relu = names.fresh(&format!("head.relu{}", l + 1));
            graph
                .node
                .push(node("Relu", relu.clone(), &[&prev], &[&relu], vec![]));
            prev = relu;
        }
    }
    let softmax = names.fresh("head.softmax");
    graph.node.push(node(
        "Softmax",
        softmax,
        &[&prev],
        &[OUTPUT_NAME],
        vec![int_attr("axis", 1)],
    ));
}

fn pick_output(graph: &GraphProto, output: Option<&str>) -> Result<String> {
    match output {
        Some(name) => {
            let known = graph.output.iter().any(|o| o.name == name)
                || graph.input.iter().any(|i| i.name == name)
                || graph
                    .node
                    .iter()
                    .any(|n| n.output.iter().any(|o| o == name));
            if known {
                Ok(name.to_string())
            } else {
                Err(export_error(format!("the backbone has no tensor `{name}`")))
            }
        }
        None => match graph.output.as_slice() {
            [only] => Ok(only.name.clone()),
            outs => Err(export_error(format!(
                "the backbone has {} outputs ({}); name the one that feeds the head",
                outs.len(),
                outs.iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
    }
}

/// Checks a declared shape of `feature` against the head's inputs; returns its batch
/// dimension (symbolic `N` when undeclared).
fn check_features(graph: &GraphProto, feature: &str, features: usize) -> Result<Dimension> {
    let declared = graph
        .output
        .iter()
        .chain(&graph.value_info)
        .chain(&graph.input)
        .find(|v| v.name == feature)
        .and_then(|v| {
            let TypeValue::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
            t.shape.as_ref().map(|s| s.dim.clone())
        });
    let Some(dims) = declared.filter(|d| !d.is_empty()) else {
        return Ok(symbolic_batch());
    };
    if dims.len() < 2 {
        return Err(export_error(format!(
            "backbone output `{feature}` has rank {}; the head needs [batch, features…]",
            dims.len()
        )));
    }
    let row: Option<i64> = dims[1..]
        .iter()
        .map(|d| match d.value {
            Some(DimValue::DimValue(v)) => Some(v),
            _ => None,
        })
        .product();
    match row {
        Some(n) if n != features as i64 => Err(export_error(format!(
            "backbone output `{feature}` has {n} values per row, the head takes {features}"
        ))),
        _ => Ok(dims[0].clone()),
    }
}

/// Keeps only the nodes `feature` depends on and the initializers, value infos and
/// initializer-backed inputs they read; clears the outputs. Data inputs stay.
fn prune(graph: &mut GraphProto, feature: &str) {
    let mut needed: HashSet<String> = HashSet::from([feature.to_string()]);
    let mut keep = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().cloned());
            for g in subgraphs(n) {
                needed.extend(names_read(g));
            }
        }
    }
    let mut keep = keep.into_iter();
    graph.node.retain(|_| keep.next().unwrap_or(false));
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph
        .sparse_initializer
        .retain(|t| t.values.as_ref().is_some_and(|v| needed.contains(&v.name)));
    graph
        .input
        .retain(|i| !initializers.contains(&i.name) || needed.contains(&i.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    graph.output.clear();
}

fn subgraphs(n: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    n.attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

/// Every tensor name the nodes of `g` (and their subgraphs) read.
fn names_read(g: &GraphProto) -> Vec<String> {
    let mut out: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    for sub in g.node.iter().flat_map(subgraphs) {
        out.extend(names_read(sub));
    }
    out
}

/// Renames tensor `from` to `to` throughout `g` and its subgraphs.
fn rename(g: &mut GraphProto, from: &str, to: &str) {
    let fix = |s: &mut String| {
        if s == from {
            *s = to.to_string();
        }
    };
    for n in &mut g.node {
        n.input.iter_mut().chain(n.output.iter_mut()).for_each(fix);
        for a in &mut n.attribute {
            a.g.iter_mut()
                .chain(a.graphs.iter_mut())
                .for_each(|sub| rename(sub, from, to));
        }
    }
    g.initializer.iter_mut().for_each(|t| fix(&mut t.name));
    g.input
        .iter_mut()
        .chain(g.output.iter_mut())
        .chain(g.value_info.iter_mut())
        .for_each(|v| fix(&mut v.name));
}

/// Names in use, and fresh ones derived from a base.
#[derive(Debug, Default)]
struct Names {
    taken: HashSet<String>,
}

impl Names {
    fn collect(&mut self, g: &GraphProto) {
        for n in &g.node {
            self.taken.insert(n.name.clone());
            self.taken.extend(n.input.iter().chain(&n.output).cloned());
            subgraphs(n).for_each(|sub| self.collect(sub));
        }
        self.taken
            .extend(g.initializer.iter().map(|t| t.name.clone()));
        let infos = g.input.iter().chain(&g.output).chain(&g.value_info);
        self.taken.extend(infos.map(|v| v.name.clone()));
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 0;
        while self.taken.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.taken.insert(name.clone());
        name
    }
}

fn symbolic_batch() -> Dimension {
    Dimension {
        value: Some(DimValue::DimParam("N".into())),
        ..Default::default()
    }
}

fn tensor_info(name: &str, batch: Dimension, width: usize) -> ValueInfoProto {
    let width = Dimension {
        value: Some(DimValue::DimValue(width as i64)),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorType {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto {
                    dim: vec![batch, width],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::HeadKind;

    fn decode(bytes: &[u8]) -> ModelProto {
        ModelProto::decode(bytes).expect("protobuf")
    }

    #[test]
    fn head_only_export_is_gemm_relu_gemm_softmax_with_the_parameters() {
        let head = Head::mlp(4, 3, 2, 9);
        let model = decode(&export_onnx(&head, None, None).expect("export"));
        let g = model.graph.expect("graph");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Gemm", "Relu", "Gemm", "Softmax"]);
        assert_eq!(
            (g.input[0].name.as_str(), g.output[0].name.as_str()),
            (INPUT_NAME, OUTPUT_NAME)
        );
        let raw: Vec<u8> = g
            .initializer
            .iter()
            .flat_map(|t| t.raw_data.clone())
            .collect();
        let want: Vec<u8> = head.params().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(raw, want, "initializers in parameter order");
        assert_eq!(model.opset_import[0].version, OPSET);
    }

    #[test]
    fn fresh_names_avoid_collisions() {
        let mut names = Names::default();
        names
            .taken
            .extend(["head.fc1".to_string(), "head.fc1_1".to_string()]);
        assert_eq!(names.fresh("head.fc1"), "head.fc1_2");
        assert_eq!(names.fresh("head.fc1"), "head.fc1_3");
        assert_eq!(names.fresh("other"), "other");
    }

    #[test]
    fn backbone_errors_are_reported() {
        let head = Head::new(HeadKind::Softmax, 4, 2, 0).expect("head");
        assert!(export_onnx(&head, Some(b"not onnx at all"), None).is_err());
        assert!(export_onnx(&head, None, Some("features")).is_err());
    }
}
