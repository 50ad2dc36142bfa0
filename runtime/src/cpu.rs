//! The CPU backend: tract's optimised plan, one per distinct set of input shapes.

use std::sync::{Arc, Mutex};

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::backend::{Backend, Executable};
use crate::error::{Result, RuntimeError};
use crate::model::{Dim, Graph, TensorInfo};
use crate::options::ModelOptions;
use crate::tensor::{DType, Tensor as HostTensor};

/// Plans kept per model; a new set of input shapes past this evicts the oldest.
const MAX_PLANS: usize = 4;

#[derive(Debug)]
pub(crate) struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    fn prepare(&self, graph: &Graph, opts: &ModelOptions) -> Result<Box<dyn Executable>> {
        let exec = CpuExec::new(graph, opts);
        if let Some(shapes) = exec.static_shapes().filter(|_| exec.control.is_empty()) {
            exec.plan(
                &PlanKey {
                    shapes,
                    values: Vec::new(),
                },
                &[],
            )?;
        }
        Ok(Box::new(exec))
    }
}

type Plan = Arc<TypedRunnableModel>;

/// What a plan is specialised to: every input's shape, and the values of `specialize` inputs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlanKey {
    pub shapes: Vec<Vec<usize>>,
    pub values: Vec<HostTensor>,
}

pub(crate) struct CpuExec {
    proto: tract_onnx::pb::ModelProto,
    inputs: Vec<TensorInfo>,
    /// Whether plans re-import the graph for their shapes and control values (`If`s remain).
    specialize: bool,
    /// Indices of inputs baked into the plan by value (integer scalars that may decide an `If`).
    control: Vec<usize>,
    executor: Option<Executor>,
    /// Optimised plans, most recent last, at most `MAX_PLANS`.
    plans: Mutex<Vec<(PlanKey, Plan)>>,
}

impl std::fmt::Debug for CpuExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuExec")
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

pub(crate) fn datum(d: DType) -> DatumType {
    match d {
        DType::F32 => f32::datum_type(),
        DType::F64 => f64::datum_type(),
        DType::F16 => DatumType::F16,
        DType::I64 => i64::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::I16 => i16::datum_type(),
        DType::I8 => i8::datum_type(),
        DType::U8 => u8::datum_type(),
        DType::U16 => u16::datum_type(),
        DType::U32 => u32::datum_type(),
        DType::U64 => u64::datum_type(),
        DType::Bool => bool::datum_type(),
    }
}

fn host_dtype(dt: DatumType) -> Option<DType> {
    Some(match dt.unquantized() {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::F16 => DType::F16,
        DatumType::I64 => DType::I64,
        DatumType::I32 => DType::I32,
        DatumType::I16 => DType::I16,
        DatumType::I8 => DType::I8,
        DatumType::U8 => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

pub(crate) fn to_tract(t: &HostTensor) -> Result<Tensor> {
    macro_rules! typed {
        ($ty:ty) => {
            Tensor::from_shape::<$ty>(t.shape(), &t.to_vec::<$ty>().unwrap_or_default())
        };
    }
    let r = match t.dtype() {
        DType::F32 => typed!(f32),
        DType::F64 => typed!(f64),
        DType::I64 => typed!(i64),
        DType::I32 => typed!(i32),
        DType::I16 => typed!(i16),
        DType::I8 => typed!(i8),
        DType::U8 => typed!(u8),
        DType::U16 => typed!(u16),
        DType::U32 => typed!(u32),
        DType::U64 => typed!(u64),
        DType::Bool => typed!(bool),
        // f16 → f32 → f16 is exact.
        DType::F16 => {
            let wide: Vec<f32> = t.to_f64_lossy().iter().map(|&v| v as f32).collect();
            Tensor::from_shape::<f32>(t.shape(), &wide)
                .and_then(|x| x.cast_to_dt(DatumType::F16).map(|c| c.into_owned()))
        }
    };
    r.map_err(RuntimeError::backend)
}

pub(crate) fn from_tract(t: &Tensor) -> Result<HostTensor> {
    // tract folds Shape/Size into symbolic-dimension tensors; ONNX says int64.
    let owned;
    let t = if t.datum_type() == DatumType::TDim {
        owned = t
            .cast_to::<i64>()
            .map_err(RuntimeError::backend)?
            .into_owned();
        &owned
    } else {
        t
    };
    let dt = host_dtype(t.datum_type())
        .ok_or_else(|| RuntimeError::UnsupportedDtype(format!("{:?}", t.datum_type())))?;
    let t = if t.datum_type().is_quantized() {
        t.clone()
            .cast_to_dt(t.datum_type().unquantized())
            .map_err(RuntimeError::backend)?
            .into_owned()
    } else {
        t.clone()
    };
    let bytes = if dt == DType::Bool {
        t.try_as_plain_ram()
            .and_then(|v| v.as_slice::<bool>())
            .map_err(RuntimeError::backend)?
            .iter()
            .map(|&b| b as u8)
            .collect()
    } else {
        t.as_bytes().to_vec()
    };
    HostTensor::from_le_bytes(dt, t.shape(), bytes)
}

impl CpuExec {
    pub(crate) fn new(graph: &Graph, opts: &ModelOptions) -> CpuExec {
        let executor = (opts.threads > 1).then(|| Executor::multithread(opts.threads));
        // A graph that still has `If`s is re-imported per plan with concrete shapes, and its
        // integer scalars (which may decide an `If`) baked per value.
        let specialize = crate::import::has_if(&graph.proto);
        let control = if specialize {
            graph
                .inputs
                .iter()
                .enumerate()
                .filter(|(_, i)| {
                    i.shape.is_empty() && matches!(i.dtype, Some(DType::I64 | DType::I32))
                })
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        CpuExec {
            proto: graph.proto.clone(),
            inputs: graph.inputs.clone(),
            specialize,
            control,
            executor,
            plans: Mutex::new(Vec::new()),
        }
    }

    /// Whether plans depend on input values (integer scalars deciding an `If`).
    pub(crate) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// The key of the plan for `inputs`.
    pub(crate) fn key(&self, inputs: &[HostTensor]) -> PlanKey {
        PlanKey {
            shapes: inputs.iter().map(|t| t.shape().to_vec()).collect(),
            values: self.control.iter().map(|&k| inputs[k].clone()).collect(),
        }
    }

    /// The tract tensors fed to a plan (control inputs are baked into it).
    pub(crate) fn feed(&self, inputs: &[HostTensor]) -> Result<TVec<TValue>> {
        inputs
            .iter()
            .enumerate()
            .filter(|(k, _)| !self.control.contains(k))
            .map(|(_, t)| to_tract(t).map(|t| t.into_tvalue()))
            .collect()
    }

    /// Input shapes, when the graph fixes every one of them.
    pub(crate) fn static_shapes(&self) -> Option<Vec<Vec<usize>>> {
        self.inputs
            .iter()
            .map(|i| {
                i.shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Some(*n),
                        _ => None,
                    })
                    .collect()
            })
            .collect()
    }

    /// The graph as tract's inference model, with the input facts of `key` (and its control
    /// values baked when the graph has `If`s).
    pub(crate) fn inference_model(
        &self,
        key: &PlanKey,
        inputs: &[HostTensor],
    ) -> Result<InferenceModel> {
        let proto = if self.specialize {
            let consts = self
                .control
                .iter()
                .map(|&k| (self.inputs[k].name.clone(), inputs[k].clone()))
                .collect();
            let shapes = self
                .inputs
                .iter()
                .zip(&key.shapes)
                .map(|(i, s)| (i.name.clone(), s.clone()))
                .collect();
            std::borrow::Cow::Owned(crate::import::specialize(&self.proto, &consts, shapes)?)
        } else {
            std::borrow::Cow::Borrowed(&self.proto)
        };
        let mut model = crate::tract_ops::onnx()
            .with_ignore_output_shapes(true)
            .model_for_proto_model(&proto)
            .map_err(RuntimeError::backend)?;
        let fed = self
            .inputs
            .iter()
            .zip(&key.shapes)
            .enumerate()
            .filter(|(k, _)| !self.control.contains(k));
        for (i, (_, (info, shape))) in fed.enumerate() {
            let fact = match info.dtype {
                Some(d) => InferenceFact::dt_shape(datum(d), shape.clone()),
                None => InferenceFact::default().with_shape(shape.clone()),
            };
            model = model
                .with_input_fact(i, fact)
                .map_err(RuntimeError::backend)?;
        }
        Ok(model)
    }

    fn plan(&self, key: &PlanKey, inputs: &[HostTensor]) -> Result<Plan> {
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| RuntimeError::Backend("plan cache poisoned".into()))?;
        if let Some((_, p)) = plans.iter().find(|(k, _)| k == key) {
            return Ok(p.clone());
        }
        let model = self.inference_model(key, inputs)?;
        let opts = RunOptions {
            executor: self.executor.clone(),
            ..Default::default()
        };
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable_with_options(&opts))
            .map_err(RuntimeError::backend)?;
        tracing::debug!(shapes = ?key.shapes, "planned for new input shapes");
        if plans.len() >= MAX_PLANS {
            plans.remove(0);
        }
        plans.push((key.clone(), plan.clone()));
        Ok(plan)
    }
}

impl CpuExec {
    fn profile_plan(&self, inputs: Vec<HostTensor>, runs: usize) -> Result<Vec<crate::NodeTime>> {
        use std::time::Instant;
        use tract_onnx::tract_core::plan::{SimpleState, eval};
        let key = self.key(&inputs);
        let plan = self.plan(&key, &inputs)?;
        let mut state = SimpleState::new(&plan).map_err(RuntimeError::backend)?;
        let mut times = vec![0f64; plan.model().nodes().len()];
        let values = self.feed(&inputs)?;
        let mut run = || -> TractResult<()> {
            for _ in 0..runs {
                state.run_plan_with_eval(values.clone(), |ctx, st, node, inp| {
                    let t = Instant::now();
                    let out = eval(ctx, st, node, inp);
                    if let Some(slot) = times.get_mut(node.id) {
                        *slot += t.elapsed().as_secs_f64();
                    }
                    out
                })?;
            }
            Ok(())
        };
        match &self.executor {
            Some(e) => tract_linalg::multithread::multithread_tract_scope(e.clone(), run),
            None => run(),
        }
        .map_err(RuntimeError::backend)?;
        Ok(plan
            .model()
            .nodes()
            .iter()
            .filter(|n| times[n.id] > 0.0)
            .map(|n| crate::NodeTime {
                node: n.name.clone(),
                op: n.op().name().to_string(),
                seconds: times[n.id],
            })
            .collect())
    }
}

impl Executable for CpuExec {
    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>> {
        let key = self.key(&inputs);
        let plan = self.plan(&key, &inputs)?;
        let values = self.feed(&inputs)?;
        let run = || plan.run(values);
        let out = match &self.executor {
            Some(e) => tract_linalg::multithread::multithread_tract_scope(e.clone(), run),
            None => run(),
        }
        .map_err(RuntimeError::backend)?;
        out.iter().map(|v| from_tract(v)).collect()
    }

    fn profile(
        &self,
        inputs: Vec<HostTensor>,
        runs: usize,
    ) -> Option<Result<Vec<crate::NodeTime>>> {
        Some(self.profile_plan(inputs, runs))
    }

    fn describe(&self) -> Vec<String> {
        let plans = self.plans.lock().map(|p| p.len()).unwrap_or(0);
        vec![format!(
            "cpu: tract 0.23 optimised plan ({plans} input shape set(s) planned)"
        )]
    }
}
