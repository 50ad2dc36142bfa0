//! Folds `If` nodes whose condition is a constant once inputs are fixed (silero VAD's sample
//! rate, say) into the branch taken. tract types both branches of an `If`, and a branch that is
//! not taken may not type at all with the fixed inputs.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, ValueInfoProto};
use tract_onnx::prelude::*;

use super::graph::{attr, node, producers};

pub(super) fn fold_ifs(proto: &mut ModelProto, report: &mut Vec<String>) {
    let mut folded = 0;
    while let Some((idx, branch)) = next_foldable(proto) {
        let Some(g) = proto.graph.as_mut() else {
            return;
        };
        let if_node = g.node[idx].clone();
        let Some(body) = attr(&if_node, branch).and_then(|a| a.g.clone()) else {
            return;
        };
        let inlined = inline(&defined_names(g), &if_node, body, branch);
        g.node.splice(idx..=idx, inlined.nodes);
        g.initializer.extend(inlined.initializers);
        folded += 1;
    }
    if folded > 0 {
        report.push(format!(
            "folded {folded} If node(s) with a constant condition"
        ));
    }
}

/// The first top-level `If` whose condition evaluates to a constant, and the branch it takes.
fn next_foldable(proto: &ModelProto) -> Option<(usize, &'static str)> {
    let g = proto.graph.as_ref()?;
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "If")
        .find_map(|(i, n)| {
            let cond = eval_condition(proto, n.input.first()?)?;
            Some((i, if cond { "then_branch" } else { "else_branch" }))
        })
}

/// Evaluates `name` with tract on the sub-graph of its ancestors: a constant once the graph's
/// constants and its inputs' declared (concrete) shapes are known, e.g. `Shape → Gather → Equal`.
fn eval_condition(proto: &ModelProto, name: &str) -> Option<bool> {
    let g = proto.graph.as_ref()?;
    let inputs: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    let inits: HashSet<&str> = g.initializer.iter().map(|i| i.name.as_str()).collect();
    let prod = producers(g);
    let mut keep = HashSet::new();
    let mut used_inputs = HashSet::new();
    let mut stack = vec![name.to_string()];
    while let Some(t) = stack.pop() {
        if inits.contains(t.as_str()) || t.is_empty() {
            continue;
        }
        if inputs.contains(t.as_str()) {
            used_inputs.insert(t);
            continue;
        }
        let &p = prod.get(&t)?;
        if g.node[p].attribute.iter().any(|a| a.g.is_some()) {
            return None;
        }
        if keep.insert(p) {
            stack.extend(g.node[p].input.iter().cloned());
        }
    }
    // Symbolic dimensions can fold to a constant that only holds for some values: decide
    // only on fully concrete input shapes.
    let concrete = |i: &ValueInfoProto| match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(tract_onnx::pb::type_proto::Value::TensorType(tt)) => {
            tt.shape.as_ref().is_some_and(|s| {
                s.dim.iter().all(|d| {
                    matches!(
                        d.value,
                        Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(_))
                    )
                })
            })
        }
        _ => false,
    };
    if g.input
        .iter()
        .any(|i| used_inputs.contains(&i.name) && !concrete(i))
    {
        return None;
    }
    let mut sub = proto.clone();
    let sg = sub.graph.as_mut()?;
    sg.node = g
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    sg.input
        .retain(|i| inits.contains(i.name.as_str()) || used_inputs.contains(&i.name));
    sg.output = vec![ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }];
    sg.value_info.clear();
    let model = crate::tract_ops::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_output_types(true)
        .model_for_proto_model(&sub)
        .ok()?;
    let typed = model.into_typed().ok()?.into_decluttered().ok()?;
    let outlet = *typed.output_outlets().ok()?.first()?;
    let konst = typed.outlet_fact(outlet).ok()?.konst.clone()?;
    let t = konst.cast_to::<bool>().ok()?;
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<bool>().map(|s| s.first().copied()))
        .ok()?
}

fn rename_inputs(g: &mut GraphProto, rename: &HashMap<String, String>) {
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut() {
            if let Some(r) = rename.get(i) {
                *i = r.clone();
            }
        }
        for a in n.attribute.iter_mut() {
            if let Some(sub) = a.g.as_mut() {
                rename_inputs(sub, rename);
            }
        }
    }
}

/// Every name the top-level graph defines: inputs, initializers, node outputs.
fn defined_names(g: &GraphProto) -> HashSet<String> {
    let mut out: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    out.extend(g.initializer.iter().map(|t| t.name.clone()));
    out.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    out
}

struct Inlined {
    nodes: Vec<NodeProto>,
    initializers: Vec<tract_onnx::pb::TensorProto>,
}

/// The branch's nodes with its own names prefixed, then `Identity` nodes onto the `If`'s outputs.
/// Names the branch defines that the outer graph defines too are renamed (in nested subgraphs
/// as well); the rest keep their names, so nested subgraphs still resolve them.
fn inline(outer: &HashSet<String>, if_node: &NodeProto, body: GraphProto, branch: &str) -> Inlined {
    let base = if if_node.name.is_empty() {
        &if_node.output[0]
    } else {
        &if_node.name
    };
    let prefix = format!("{base}/{branch}/");
    let mut defined: HashSet<String> = body.initializer.iter().map(|t| t.name.clone()).collect();
    defined.extend(body.node.iter().flat_map(|n| n.output.iter().cloned()));
    let rename: HashMap<String, String> = defined
        .into_iter()
        .filter(|n| !n.is_empty() && outer.contains(n))
        .map(|n| (n.clone(), format!("{prefix}{n}")))
        .collect();
    let re = |s: &String| rename.get(s).cloned().unwrap_or_else(|| s.clone());
    let mut nodes: Vec<NodeProto> = body
        .node
        .iter()
        .map(|n| {
            let mut n = NodeProto {
                input: n.input.iter().map(re).collect(),
                output: n.output.iter().map(re).collect(),
                ..n.clone()
            };
            for a in n.attribute.iter_mut() {
                if let Some(sub) = a.g.as_mut() {
                    rename_inputs(sub, &rename);
                }
            }
            n
        })
        .collect();
    for (o, target) in body.output.iter().zip(&if_node.output) {
        nodes.push(node(
            "Identity",
            format!("{prefix}out/{target}"),
            &[&re(&o.name)],
            &[target],
            vec![],
        ));
    }
    let initializers = body
        .initializer
        .into_iter()
        .map(|mut t| {
            t.name = re(&t.name);
            t
        })
        .collect();
    Inlined {
        nodes,
        initializers,
    }
}
