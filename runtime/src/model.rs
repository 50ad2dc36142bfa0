//! `Model`: an imported graph bound to a backend, with validated `run`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tract_onnx::pb::ModelProto;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;

use crate::backend::{Executable, Placement, Registry};
use crate::error::{Result, RuntimeError};
use crate::import;
use crate::options::ModelOptions;
use crate::tensor::{DType, Tensor};

/// One dimension of a declared input shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A named symbolic dimension (`batch`); equal names must get equal values.
    Symbol(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Name, element type and shape of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub shape: Vec<Dim>,
}

impl TensorInfo {
    /// The shape as text: `[1, 3, batch, ?]`.
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// The quantization scheme a model file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantFormat {
    Float,
    /// QuantizeLinear/DequantizeLinear pairs around float ops.
    Qdq,
    /// `QLinear*` operators (onnxruntime's QOperator format).
    QOperator,
    /// DynamicQuantizeLinear with MatMulInteger/ConvInteger.
    Dynamic,
    /// MatMulInteger/ConvInteger with static parameters.
    Integer,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Float => "float",
            QuantFormat::Qdq => "qdq",
            QuantFormat::QOperator => "qoperator",
            QuantFormat::Dynamic => "dynamic",
            QuantFormat::Integer => "integer",
        }
    }

    fn detect(ops: &BTreeMap<String, usize>) -> QuantFormat {
        let has = |op: &str| ops.contains_key(op);
        if ops.keys().any(|k| k.starts_with("QLinear") || k == "QGemm") {
            QuantFormat::QOperator
        } else if has("DynamicQuantizeLinear") {
            QuantFormat::Dynamic
        } else if has("DequantizeLinear") {
            QuantFormat::Qdq
        } else if has("MatMulInteger") || has("ConvInteger") {
            QuantFormat::Integer
        } else {
            QuantFormat::Float
        }
    }
}

/// An imported ONNX graph: what the file declares plus fedge's rewrites, before any backend.
#[derive(Debug, Clone)]
pub struct Graph {
    pub(crate) proto: ModelProto,
    pub(crate) inputs: Vec<TensorInfo>,
    outputs: Vec<String>,
    ops: BTreeMap<String, usize>,
    format: QuantFormat,
    report: Vec<String>,
}

fn histogram(proto: &ModelProto) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for n in proto.graph.iter().flat_map(|g| &g.node) {
        *h.entry(n.op_type.clone()).or_default() += 1;
    }
    h
}

fn declared_inputs(proto: &ModelProto) -> Vec<TensorInfo> {
    let Some(g) = &proto.graph else { return vec![] };
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| {
            let tt = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(TypeValue::TensorType(tt)) => Some(tt),
                _ => None,
            };
            let shape = tt
                .and_then(|t| t.shape.as_ref())
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(DimValue::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                            // Exporters write `?` for "any": not a shared symbol.
                            Some(DimValue::DimParam(p)) if !p.is_empty() && p != "?" => {
                                Dim::Symbol(p.clone())
                            }
                            _ => Dim::Unknown,
                        })
                        .collect()
                })
                .unwrap_or_default();
            TensorInfo {
                name: i.name.clone(),
                dtype: tt.and_then(|t| DType::from_onnx_code(t.elem_type)),
                shape,
            }
        })
        .collect()
}

impl Graph {
    /// Decodes and imports a model (fedge's rewrites, constant inputs, dimensions).
    ///
    /// # Errors
    /// [`RuntimeError::EmptyModel`], [`RuntimeError::NotOnnx`], [`RuntimeError::InvalidModel`],
    /// [`RuntimeError::UnsupportedOps`] (every unknown op named), [`RuntimeError::UnknownInput`].
    pub fn import(bytes: &[u8], opts: &ModelOptions) -> Result<Graph> {
        let original = histogram(&import::decode(bytes)?);
        let imported = import::import(bytes, opts)?;
        let proto = imported.proto;
        let outputs = proto
            .graph
            .iter()
            .flat_map(|g| &g.output)
            .map(|o| o.name.clone())
            .collect();
        Ok(Graph {
            inputs: declared_inputs(&proto),
            outputs,
            format: QuantFormat::detect(&original),
            ops: original,
            report: imported.report,
            proto,
        })
    }

    /// Inputs the caller passes to `run`, in order.
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Operator counts of the file as written (before rewrites).
    pub fn op_histogram(&self) -> &BTreeMap<String, usize> {
        &self.ops
    }

    /// Operator counts after fedge's rewrites.
    pub fn imported_op_histogram(&self) -> BTreeMap<String, usize> {
        histogram(&self.proto)
    }

    pub fn quant_format(&self) -> QuantFormat {
        self.format
    }

    /// One line per rewrite the import applied.
    pub fn rewrites(&self) -> &[String] {
        &self.report
    }

    pub fn opset(&self) -> i64 {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(0, |o| o.version)
    }
}

/// A model ready to run: an imported [`Graph`] prepared on one backend.
#[derive(Debug)]
pub struct Model {
    graph: Graph,
    exec: Box<dyn Executable>,
    backend: &'static str,
    backend_reason: String,
    allow_non_finite: bool,
}

impl Model {
    /// Loads an ONNX file.
    ///
    /// # Errors
    /// [`RuntimeError::Io`] when the file cannot be read, else as [`Model::from_bytes`].
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
        Model::from_bytes(&bytes, opts)
    }

    /// Loads an ONNX model from memory on the backend `opts.backend` names.
    ///
    /// # Errors
    /// Any import error of [`Graph::import`]; [`RuntimeError::UnknownBackend`] and
    /// [`RuntimeError::BackendUnavailable`]; [`RuntimeError::Backend`] when the backend
    /// cannot plan the graph.
    pub fn from_bytes(bytes: &[u8], opts: &ModelOptions) -> Result<Model> {
        Model::from_bytes_with(bytes, opts, &Registry::default())
    }

    /// As [`Model::from_bytes`], resolving the backend in `registry`.
    ///
    /// # Errors
    /// As [`Model::from_bytes`].
    pub fn from_bytes_with(
        bytes: &[u8],
        opts: &ModelOptions,
        registry: &Registry,
    ) -> Result<Model> {
        let (mut backend, mut backend_reason) = registry.resolve(&opts.backend)?;
        // The import knows which backend runs the graph (int8 ops are rewritten for the CPU).
        let for_backend = |name: &str| ModelOptions {
            backend: name.into(),
            ..opts.clone()
        };
        let mut graph = Graph::import(bytes, &for_backend(backend.name()))?;
        let mut exec = backend.prepare(&graph, opts)?;
        // `gpu-or-cpu` keeps the GPU only when it runs the model's heavy ops itself.
        if opts.backend == "gpu-or-cpu"
            && let Some(Placement {
                heavy: on,
                heavy_total: total,
                ..
            }) = exec.placement()
            && on < total
        {
            let (cpu, _) = registry.resolve("cpu")?;
            backend_reason = format!(
                "fell back to the CPU: the GPU backend runs {on} of the model's {total} matrix products and convolutions"
            );
            graph = Graph::import(bytes, &for_backend(cpu.name()))?;
            exec = cpu.prepare(&graph, opts)?;
            backend = cpu;
        }
        tracing::info!(backend = backend.name(), reason = %backend_reason, "backend selected");
        Ok(Model {
            graph,
            exec,
            backend: backend.name(),
            backend_reason,
            allow_non_finite: opts.allow_non_finite,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn inputs(&self) -> &[TensorInfo] {
        self.graph.inputs()
    }

    pub fn output_names(&self) -> &[String] {
        self.graph.output_names()
    }

    /// The backend running this model and why it was chosen.
    pub fn backend(&self) -> (&'static str, &str) {
        (self.backend, &self.backend_reason)
    }

    /// What the backend does with the graph (for `fedge check`).
    pub fn describe(&self) -> Vec<String> {
        self.exec.describe()
    }

    /// How a partitioning backend (the GPU) placed the nodes of its latest plan.
    pub fn placement(&self) -> Option<Placement> {
        self.exec.placement()
    }

    /// Runs the model on inputs in declaration order.
    ///
    /// # Errors
    /// [`RuntimeError::InputCount`], [`RuntimeError::InputDtype`], [`RuntimeError::InputShape`],
    /// [`RuntimeError::NonFinite`] for bad inputs (checked before anything runs);
    /// [`RuntimeError::Backend`] when evaluation fails.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.validate(inputs)?;
        self.exec.run(inputs.to_vec())
    }

    /// Runs the model `runs` times timing every node of the backend's optimised plan: where the
    /// time goes. `None` for backends that cannot (the GPU backend).
    ///
    /// # Errors
    /// As [`Model::run`].
    pub fn profile(&self, inputs: &[Tensor], runs: usize) -> Result<Option<Vec<crate::NodeTime>>> {
        self.validate(inputs)?;
        self.exec.profile(inputs.to_vec(), runs).transpose()
    }

    /// Runs with inputs given by name.
    ///
    /// # Errors
    /// [`RuntimeError::UnknownInput`] for a name the model does not take, a missing one as
    /// [`RuntimeError::InputCount`], else as [`Model::run`].
    pub fn run_named(&self, named: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
        if let Some((n, _)) = named
            .iter()
            .find(|(n, _)| !self.inputs().iter().any(|i| &i.name == n))
        {
            return Err(RuntimeError::UnknownInput(n.clone()));
        }
        let ordered: Vec<Tensor> = self
            .inputs()
            .iter()
            .filter_map(|i| {
                named
                    .iter()
                    .find(|(n, _)| n == &i.name)
                    .map(|(_, t)| t.clone())
            })
            .collect();
        if ordered.len() != self.inputs().len() {
            return Err(RuntimeError::InputCount {
                expected: self.inputs().len(),
                got: ordered.len(),
            });
        }
        self.run(&ordered)
    }

    fn validate(&self, inputs: &[Tensor]) -> Result<()> {
        let decl = self.inputs();
        if inputs.len() != decl.len() {
            return Err(RuntimeError::InputCount {
                expected: decl.len(),
                got: inputs.len(),
            });
        }
        let mut symbols: HashMap<&str, usize> = HashMap::new();
        for (info, t) in decl.iter().zip(inputs) {
            if let Some(d) = info.dtype
                && d != t.dtype()
            {
                return Err(RuntimeError::InputDtype {
                    name: info.name.clone(),
                    expected: d.to_string(),
                    got: t.dtype().to_string(),
                });
            }
            let shape_err = || RuntimeError::InputShape {
                name: info.name.clone(),
                expected: info.shape_string(),
                got: t.shape().to_vec(),
            };
            if !info.shape.is_empty() || !t.shape().is_empty() {
                if info.shape.len() != t.shape().len() {
                    return Err(shape_err());
                }
                for (d, &n) in info.shape.iter().zip(t.shape()) {
                    match d {
                        Dim::Fixed(f) if *f != n => return Err(shape_err()),
                        Dim::Symbol(s) if *symbols.entry(s).or_insert(n) != n => {
                            return Err(shape_err());
                        }
                        _ => {}
                    }
                }
            }
            if !self.allow_non_finite
                && let Some((count, first)) = t.non_finite()
            {
                return Err(RuntimeError::NonFinite {
                    name: info.name.clone(),
                    count,
                    first,
                });
            }
        }
        Ok(())
    }
}
