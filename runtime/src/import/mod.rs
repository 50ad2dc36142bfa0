//! fedge's import pipeline: protobuf-level rewrites that run before tract sees a model.
//!
//! Layout:
//! - [`graph`]: helpers over `GraphProto` (constants, producers, node builders);
//! - `shapes`: constant inputs, symbolic dimensions, stale `value_info`;
//! - `fold`: `If` nodes whose condition is constant once inputs are fixed;
//! - `narrow`: 4-/2-bit integer and 8-/4-bit float types held in i8/u8/f32, narrowing casts;
//! - `msft`: onnxruntime's `com.microsoft` QOperator ops decomposed into standard ops;
//! - `qfloat`: Q/DQ tract cannot run (16-bit, narrow types, blocked or run-time parameters) as
//!   exact float arithmetic;
//! - `qexact`: int8 convolutions and matrix products with constant kernels on float kernels,
//!   with exact integer sums;
//! - `exactdiv`: onnxruntime's arithmetic where tract's differs, in graphs that quantize: float
//!   divisions as divisions (tract multiplies by reciprocals), one-pass `QuantizeLinear`,
//!   `QLinearAdd` and `GlobalAveragePool`;
//! - `conv`: float convolutions on fedge's kernels (depthwise everywhere, dense where the
//!   machine has AVX2 and FMA), with the batch norm and the activation after them folded in
//!   (CPU backend);
//! - `qconv`: the exact int8 convolutions `qexact` and `conv` leave as dequantize, float
//!   convolution and requantize, as one integer convolution (CPU backend, AVX2);
//! - `lut`: 8-bit to 8-bit element-wise chains (dequantize, activation, quantize) as table
//!   lookups (CPU backend);
//! - `scalebias`: the dynamic quantizer's casts, scale and bias after an integer accumulator
//!   in one pass (CPU backend);
//! - `qdq`: QDQ patterns rewritten into tract's integer ops, and the softmax pattern tract gets
//!   wrong rewritten into exact float arithmetic.

mod conv;
mod exactdiv;
mod fold;
pub(crate) mod graph;
mod lut;
mod msft;
mod narrow;
mod qconv;
mod qdq;
mod qexact;
mod qfloat;
mod scalebias;
mod shapes;

use std::collections::BTreeSet;

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto};

use crate::error::{Result, RuntimeError};
use crate::options::ModelOptions;

/// A model after the import pipeline, with a line per rewrite applied.
#[derive(Debug, Clone)]
pub(crate) struct Imported {
    pub proto: ModelProto,
    pub report: Vec<String>,
}

pub(crate) fn decode(bytes: &[u8]) -> Result<ModelProto> {
    if bytes.is_empty() {
        return Err(RuntimeError::EmptyModel);
    }
    let proto = ModelProto::decode(bytes)
        .map_err(|e| RuntimeError::NotOnnx(format!("protobuf decoding failed: {e}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| RuntimeError::NotOnnx("no graph in the file".into()))?;
    if proto.ir_version <= 0 || proto.opset_import.is_empty() {
        return Err(RuntimeError::NotOnnx(
            "no IR version or opset import".into(),
        ));
    }
    if graph.output.is_empty() {
        return Err(RuntimeError::InvalidModel(
            "the graph has no outputs".into(),
        ));
    }
    Ok(proto)
}

pub(crate) fn import(bytes: &[u8], opts: &ModelOptions) -> Result<Imported> {
    let mut proto = decode(bytes)?;
    let mut report = Vec::new();
    let opset = proto.opset_import.clone();
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| RuntimeError::NotOnnx("no graph".into()))?;
    let narrow = narrow::widen(graph, &mut report)?;
    shapes::bake_constants(graph, &opts.constants, &mut report)?;
    shapes::resolve_dims(graph, opts, &mut report);
    if opts.rewrites {
        if opts.integer_kernels && opts.backend == "cpu" {
            exactdiv::qlinear_add(graph, &mut report);
        }
        msft::decompose(graph, &mut report);
        let defer = opts.integer_kernels;
        qfloat::rewrite(graph, &narrow, defer, &mut report);
        if !opts.integer_kernels {
            msft::dequantize_integer_ops(graph, &mut report);
        }
        qdq::rewrite(graph, opts.integer_kernels, &mut report);
        if defer {
            qfloat::rewrite(graph, &narrow, false, &mut report);
        }
        // The GPU backend has int8 kernels of its own; the CPU's are tract's, and slow.
        if opts.integer_kernels && opts.backend == "cpu" {
            qexact::rewrite(graph, &mut report);
            if exactdiv::quantizes(graph) {
                exactdiv::rewrite(graph, &mut report);
                exactdiv::quantize(graph, &mut report);
                exactdiv::dynamic_quantize(graph, &mut report);
                exactdiv::global_average_pool(graph, &mut report);
            }
            lut::rewrite(graph, &opset, &mut report);
            scalebias::rewrite(graph, &mut report);
        }
        if opts.backend == "cpu" {
            conv::rewrite(graph, &mut report);
            if opts.integer_kernels {
                qconv::rewrite(graph, &mut report);
            }
        }
    }
    fold::fold_ifs(&mut proto, &mut report);
    check_ops(&proto)?;
    for line in &report {
        tracing::debug!(rewrite = %line, "import");
    }
    Ok(Imported { proto, report })
}

/// `proto` with `constants` baked in and the `If`s they decide folded: a plan specialised to
/// the values of control inputs (silero VAD's sample rate).
pub(crate) fn specialize(
    proto: &ModelProto,
    constants: &std::collections::BTreeMap<String, crate::tensor::Tensor>,
    input_shapes: std::collections::BTreeMap<String, Vec<usize>>,
) -> Result<ModelProto> {
    let mut proto = proto.clone();
    let mut report = Vec::new();
    if let Some(g) = proto.graph.as_mut() {
        shapes::bake_constants(g, constants, &mut report)?;
        let opts = ModelOptions {
            input_shapes,
            ..ModelOptions::default()
        };
        shapes::resolve_dims(g, &opts, &mut report);
    }
    fold::fold_ifs(&mut proto, &mut report);
    tracing::debug!(?report, "specialised plan");
    Ok(proto)
}

/// Whether the top-level graph still has `If` nodes.
pub(crate) fn has_if(proto: &ModelProto) -> bool {
    proto
        .graph
        .iter()
        .flat_map(|g| &g.node)
        .any(|n| n.op_type == "If")
}

/// Every op type no backend implements, named all at once.
fn check_ops(proto: &ModelProto) -> Result<()> {
    let known = crate::tract_ops::onnx().op_register.0;
    let mut missing = BTreeSet::new();
    if let Some(g) = &proto.graph {
        collect_unknown(g, &known, &mut missing);
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::UnsupportedOps(missing.into_iter().collect()))
    }
}

fn collect_unknown<V>(
    g: &GraphProto,
    known: &std::collections::HashMap<String, V>,
    out: &mut BTreeSet<String>,
) {
    for n in &g.node {
        if !known.contains_key(&n.op_type) {
            let domain = if n.domain.is_empty() {
                "ai.onnx"
            } else {
                &n.domain
            };
            out.insert(format!("{} ({domain})", n.op_type));
        }
        for sub in n.attribute.iter().filter_map(|a| a.g.as_ref()) {
            collect_unknown(sub, known, out);
        }
    }
}
