//! The GPU backend: wgpu compute shaders on any Vulkan, Metal, DX12 or GL adapter, with
//! per-node fallback to tract on the CPU.
//!
//! - `context`: one device per process (adapter, device, queue), the pipeline and layout caches
//!   and the counters that show nothing is compiled per run;
//! - `kernels` and `kernels/*.wgsl`: the compute kernels;
//! - `exec`: the partition of a decluttered tract graph into GPU and CPU nodes, and runs.

mod context;
mod exec;
mod kernels;

use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::prelude::*;

pub use crate::error::GpuError;
pub use context::GpuCounters;
pub use exec::Partition;

use crate::backend::{Backend, Executable, Placement};
use crate::cpu::{CpuExec, PlanKey, from_tract};
use crate::error::{Result, RuntimeError};
use crate::model::Graph;
use crate::options::ModelOptions;
use crate::tensor::Tensor as HostTensor;
use context::Ctx;

/// Plans kept per model; a new set of input shapes past this evicts the oldest.
const MAX_PLANS: usize = 4;

static CTX: OnceLock<Result<Arc<Ctx>, GpuError>> = OnceLock::new();

/// The process's GPU context, opened on first use.
fn context() -> Result<Arc<Ctx>, GpuError> {
    CTX.get_or_init(|| {
        let ctx = Ctx::new().map(Arc::new);
        if let Err(e) = &ctx {
            tracing::info!(reason = %e, "no usable GPU adapter");
        }
        ctx
    })
    .clone()
}

/// The adapter the GPU backend uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    /// `Vulkan`, `Metal`, `Dx12`, `Gl`.
    pub api: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu` (a software rasteriser), ...
    pub kind: String,
    pub driver: String,
    /// A software implementation (lavapipe, llvmpipe, WARP): correct, not fast.
    pub software: bool,
}

/// The adapter the GPU backend opens (opening it on first call).
///
/// # Errors
/// [`GpuError::NoAdapter`] when no adapter or device is usable.
pub fn adapter() -> Result<Adapter, GpuError> {
    let ctx = context()?;
    let i = &ctx.info;
    Ok(Adapter {
        name: i.name.clone(),
        api: format!("{:?}", i.backend),
        kind: format!("{:?}", i.device_type),
        driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        software: context::is_software(i),
    })
}

/// Pipelines, layouts, bind groups and buffers created so far in this process, and
/// submissions and readbacks made; `None` before the GPU context exists.
pub fn counters() -> Option<GpuCounters> {
    match CTX.get() {
        Some(Ok(ctx)) => Some(ctx.counters()),
        _ => None,
    }
}

#[derive(Debug)]
pub(crate) struct GpuBackend;

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn check(&self) -> Result<(), String> {
        context().map(drop).map_err(|e| e.to_string())
    }

    fn auto_check(&self) -> Result<(), String> {
        let a = adapter().map_err(|e| e.to_string())?;
        if a.software {
            return Err(format!(
                "the only GPU adapter is a software one ({}, {}): the CPU backend is faster",
                a.name, a.api
            ));
        }
        Ok(())
    }

    fn prepare(&self, graph: &Graph, opts: &ModelOptions) -> Result<Box<dyn Executable>> {
        let ctx = context()?;
        let exec = GpuExec {
            src: CpuExec::new(graph, opts),
            ctx,
            plans: Mutex::new(Vec::new()),
        };
        if let Some(shapes) = exec.src.static_shapes().filter(|_| !exec.src.has_control()) {
            let key = PlanKey {
                shapes,
                values: Vec::new(),
            };
            exec.plan(&key, &[])?;
        }
        Ok(Box::new(exec))
    }
}

struct GpuExec {
    src: CpuExec,
    ctx: Arc<Ctx>,
    /// Plans by input shapes, most recent last. A plan's buffers serve one run at a time, so
    /// each sits behind its own lock.
    plans: Mutex<Vec<(PlanKey, Arc<Mutex<exec::Plan>>)>>,
}

impl std::fmt::Debug for GpuExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExec")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl GpuExec {
    fn plan(&self, key: &PlanKey, inputs: &[HostTensor]) -> Result<Arc<Mutex<exec::Plan>>> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| RuntimeError::Backend("plan cache poisoned".into()))?;
        if let Some((_, p)) = plans.iter().find(|(k, _)| k == key) {
            return Ok(p.clone());
        }
        let typed = self
            .src
            .inference_model(key, inputs)?
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(RuntimeError::backend)?;
        let plan = Arc::new(Mutex::new(exec::Plan::build(self.ctx.clone(), typed)?));
        if plans.len() >= MAX_PLANS {
            plans.remove(0);
        }
        plans.push((key.clone(), plan.clone()));
        Ok(plan)
    }

    fn latest(&self) -> Option<Partition> {
        let plans = self.plans.lock().ok()?;
        let (_, p) = plans.last()?;
        Some(p.lock().ok()?.partition.clone())
    }
}

impl Executable for GpuExec {
    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>> {
        let key = self.src.key(&inputs);
        let plan = self.plan(&key, &inputs)?;
        let values = self.src.feed(&inputs)?;
        let plan = plan
            .lock()
            .map_err(|_| RuntimeError::Backend("GPU plan poisoned by an earlier panic".into()))?;
        let out = plan.run(values)?;
        out.iter().map(|v| from_tract(v)).collect()
    }

    fn describe(&self) -> Vec<String> {
        let i = &self.ctx.info;
        let mut lines = vec![format!(
            "gpu: {} ({:?}, {:?}{})",
            i.name,
            i.backend,
            i.device_type,
            if context::is_software(i) {
                ", software"
            } else {
                ""
            }
        )];
        if let Some(p) = self.latest() {
            let list = |m: &std::collections::BTreeMap<String, usize>| {
                m.iter()
                    .map(|(k, v)| format!("{k}×{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            lines.push(format!(
                "partition: {} node(s) on the GPU, {} on the CPU; heavy ops (matmul, conv) on the GPU: {}/{}",
                p.gpu_nodes, p.cpu_nodes, p.heavy_on_gpu, p.heavy
            ));
            lines.push(format!("  gpu: {}", list(&p.gpu_ops)));
            if !p.cpu_ops.is_empty() {
                lines.push(format!("  cpu: {}", list(&p.cpu_ops)));
            }
            lines.push(format!(
                "transfers per run: {} upload(s), {} readback(s)",
                p.uploads, p.downloads
            ));
        }
        lines
    }

    fn placement(&self) -> Option<Placement> {
        self.latest().map(|p| Placement {
            nodes: p.gpu_nodes,
            fallback: p.cpu_nodes,
            heavy: p.heavy_on_gpu,
            heavy_total: p.heavy,
        })
    }
}

#[cfg(test)]
mod tests;
