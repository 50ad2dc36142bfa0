//! The `Backend` trait and the registry that resolves `cpu`, `gpu` and `gpu-or-cpu`.

use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::model::{Graph, TensorInfo};
use crate::options::ModelOptions;
use crate::tensor::Tensor;

/// Something that can run imported ONNX graphs.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name, as used on the command line (`cpu`, `gpu`).
    fn name(&self) -> &'static str;

    /// Whether this backend can run here now; the error says why not.
    ///
    /// # Errors
    /// A human-readable reason (no adapter, feature off, ...).
    fn check(&self) -> Result<(), String>;

    /// Whether `gpu-or-cpu` should pick this backend; by default whenever it can run.
    ///
    /// # Errors
    /// Why not (for the GPU: no adapter, or only a software one).
    fn auto_check(&self) -> Result<(), String> {
        self.check()
    }

    /// Prepares a graph for repeated runs.
    ///
    /// # Errors
    /// [`RuntimeError`] when the graph cannot be typed, optimised or planned.
    fn prepare(&self, graph: &Graph, opts: &ModelOptions) -> Result<Box<dyn Executable>>;
}

/// A prepared model on one backend. `run` gets inputs already validated against `inputs()`.
pub trait Executable: Send + Sync + std::fmt::Debug {
    /// Runs the model once.
    ///
    /// # Errors
    /// [`RuntimeError::Backend`] when evaluation fails.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// What the backend does with the graph, one line per fact (for `fedge check`).
    fn describe(&self) -> Vec<String> {
        Vec::new()
    }

    /// Which nodes this backend runs itself and which it hands to the CPU, for backends that
    /// partition (the GPU backend, after its first plan).
    fn placement(&self) -> Option<Placement> {
        None
    }

    /// Output descriptions, when the backend knows them before a run.
    fn outputs(&self) -> Option<Vec<TensorInfo>> {
        None
    }

    /// Runs the model `runs` times timing every node of the optimised plan, for backends that
    /// can (the CPU backend); `None` otherwise.
    ///
    /// # Errors
    /// [`RuntimeError::Backend`] when evaluation fails.
    fn profile(&self, inputs: Vec<Tensor>, runs: usize) -> Option<Result<Vec<NodeTime>>> {
        let _ = (inputs, runs);
        None
    }
}

/// Time spent in one node of an optimised plan, summed over the profiled runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// The node's name in the optimised plan (rewritten nodes carry their ONNX node's name).
    pub node: String,
    /// The optimised op's name (tract's, e.g. `Conv`, `EinSum`, `OptMatMul`, `Add`).
    pub op: String,
    /// Total seconds over all profiled runs.
    pub seconds: f64,
}

/// How a partitioning backend placed a graph's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placement {
    /// Nodes the backend runs itself (views excluded).
    pub nodes: usize,
    /// Nodes handed to tract on the CPU.
    pub fallback: usize,
    /// Matrix products and convolutions the backend runs itself, and in total.
    pub heavy: usize,
    pub heavy_total: usize,
}

/// The backends compiled into this build, and name resolution.
#[derive(Debug, Clone)]
pub struct Registry {
    backends: Vec<Arc<dyn Backend>>,
}

impl Default for Registry {
    fn default() -> Self {
        #[allow(unused_mut)]
        let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(crate::cpu::CpuBackend)];
        #[cfg(feature = "gpu")]
        backends.push(Arc::new(crate::gpu::GpuBackend));
        Registry { backends }
    }
}

impl Registry {
    /// Adds (or replaces) a backend.
    pub fn register(&mut self, backend: Arc<dyn Backend>) {
        self.backends.retain(|b| b.name() != backend.name());
        self.backends.push(backend);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    fn get(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.backends.iter().find(|b| b.name() == name).cloned()
    }

    /// Resolves a backend name; the string says why this one was chosen.
    ///
    /// # Errors
    /// [`RuntimeError::UnknownBackend`] for a name that is none of `cpu`, `gpu`, `gpu-or-cpu`;
    /// [`RuntimeError::BackendUnavailable`] when the one asked for cannot run here.
    pub fn resolve(&self, name: &str) -> Result<(Arc<dyn Backend>, String)> {
        match name {
            "cpu" | "gpu" => {
                let b = self
                    .get(name)
                    .ok_or_else(|| RuntimeError::BackendUnavailable {
                        name: name.into(),
                        reason: "this build has no GPU backend (built without the `gpu` feature)"
                            .into(),
                    })?;
                b.check()
                    .map_err(|reason| RuntimeError::BackendUnavailable {
                        name: name.into(),
                        reason,
                    })?;
                Ok((b, format!("{name} requested")))
            }
            "gpu-or-cpu" => {
                let why = match self.get("gpu").map(|g| (g.auto_check(), g)) {
                    Some((Ok(()), g)) => return Ok((g, "a GPU adapter is available".into())),
                    Some((Err(reason), _)) => reason,
                    None => "this build has no GPU backend".into(),
                };
                let (cpu, _) = self.resolve("cpu")?;
                Ok((cpu, format!("fell back to the CPU: {why}")))
            }
            other => Err(RuntimeError::UnknownBackend(other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "gpu"))]
    fn gpu_is_cleanly_unavailable_without_the_feature() {
        let r = Registry::default();
        let err = r.resolve("gpu").expect_err("no gpu backend");
        assert!(
            matches!(err, RuntimeError::BackendUnavailable { .. }),
            "{err}"
        );
    }

    #[test]
    fn gpu_or_cpu_falls_back_with_a_reason() {
        let (b, why) = Registry::default().resolve("gpu-or-cpu").expect("cpu");
        assert_eq!(b.name(), "cpu");
        assert!(why.contains("fell back"), "{why}");
    }

    #[test]
    fn unknown_names_are_rejected() {
        assert!(matches!(
            Registry::default().resolve("tpu"),
            Err(RuntimeError::UnknownBackend(_))
        ));
    }
}
