//! Partitioned execution of one decluttered tract graph: nodes with a WGSL kernel run on the
//! GPU with their tensors resident there; the others run through tract's own op evaluation on
//! the CPU. Tensors cross only at partition borders.
//!
//! Everything a run needs is built once per input-shape set ([`Plan::build`]): buffers for every
//! GPU-resident value, parameter buffers, bind groups, staging buffers for readbacks. A run only
//! writes inputs, encodes dispatches and copies, submits, and maps the staging buffers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{
    Conv, KernelFormat, MaxPool, PaddingSpec, PoolSpec, SumPool,
};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::resize::{
    AxisPlan, Interpolator, NearestUpsample, Resize, cubic_weights, linear_weights, plan_axis,
    window_size,
};
use tract_onnx::tract_core::ops::nn::{
    DataFormat, LeakyRelu, Reduce, Reducer, Softmax, SoftmaxKind,
};
use tract_onnx::tract_core::ops::quant::{
    DequantizeLinearF32, LookupTable, QuantizeLinearI8, QuantizeLinearU8,
};
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::plan::EvalContext;
use tract_onnx_opl::resize::{
    AspectRatio, CoordTransform, Nearest as OnnxNearest, Resize as OnnxResize,
};

use super::GpuError;
use super::context::Ctx;
use super::kernels::{self, Kernel};
use crate::error::{Result, RuntimeError};

/// Where a value lives on the GPU: a buffer (shared by views) and the value's type and shape.
#[derive(Clone)]
struct GpuValue {
    buf: Arc<wgpu::Buffer>,
    dt: DatumType,
    shape: Vec<usize>,
}

/// One dispatch: pipeline, bind group (built once), workgroup counts.
struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: (u32, u32, u32),
}

/// Parameters a run writes before its dispatches: quantization parameters computed on the CPU.
struct ParamWrite {
    outlet: OutletId,
    buf: Arc<wgpu::Buffer>,
    /// Word offset in the parameter buffer.
    at: u64,
    as_f32: bool,
}

enum Step {
    /// A host value (graph input or CPU result) written to its GPU buffer.
    Upload(OutletId),
    Params(ParamWrite),
    Gpu {
        node: usize,
        dispatches: Vec<Dispatch>,
    },
    /// GPU values read back, all in one submission.
    Download(Vec<(OutletId, Arc<wgpu::Buffer>)>),
    Cpu(usize),
    /// A node tract evaluates only inside a plan (`Scan`, stateful ops): its own small plan,
    /// fed with the node's non-constant inputs.
    CpuPlan {
        node: usize,
        plan: Arc<TypedRunnableModel>,
        fed: Vec<OutletId>,
    },
}

/// Heavy ops: those a GPU backend is chosen for.
fn is_heavy(op: &dyn TypedOp) -> bool {
    op.downcast_ref::<EinSum>().is_some() || op.downcast_ref::<Conv>().is_some()
}

/// What the partition did, for `fedge check --backend gpu` and the auto selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partition {
    pub gpu_nodes: usize,
    pub cpu_nodes: usize,
    /// Matrix products and convolutions: on the GPU, and in total.
    pub heavy_on_gpu: usize,
    pub heavy: usize,
    pub uploads: usize,
    pub downloads: usize,
    /// Ops left to the CPU, by name, with counts.
    pub cpu_ops: BTreeMap<String, usize>,
    /// Ops run on the GPU, by name, with counts.
    pub gpu_ops: BTreeMap<String, usize>,
}

pub(crate) struct Plan {
    ctx: Arc<Ctx>,
    model: TypedModel,
    steps: Vec<Step>,
    inputs: Vec<OutletId>,
    outputs: Vec<OutletId>,
    gpu: HashMap<OutletId, GpuValue>,
    pub partition: Partition,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

fn backend_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::backend(e)
}

fn elem_size(dt: DatumType) -> Option<u64> {
    match dt.unquantized() {
        DatumType::F32 | DatumType::I32 | DatumType::U32 => Some(4),
        DatumType::I16 | DatumType::U16 => Some(2),
        DatumType::I8 | DatumType::U8 => Some(1),
        _ => None,
    }
}

fn is_f32(dt: DatumType) -> bool {
    dt == DatumType::F32
}

fn is_8bit(dt: DatumType) -> bool {
    matches!(dt.unquantized(), DatumType::I8 | DatumType::U8)
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

/// A node's GPU work, before buffers exist: the kernel(s), parameters and operand outlets.
struct Job {
    kernel: &'static Kernel,
    params: Vec<u32>,
    /// Operands: an outlet, or a constant made at plan time (padded bias, packed rows, ...).
    operands: Vec<Operand>,
    /// Output: the node's output, or a scratch buffer of this many bytes.
    output: Out,
    threads: Groups,
    /// Quantization parameters taken from host values per run: (outlet, word offset, f32).
    host_params: Vec<(OutletId, usize, bool)>,
}

enum Operand {
    Outlet(OutletId),
    Const(Vec<u8>),
    /// The output of an earlier job of the same node.
    Scratch(usize),
}

enum Out {
    Node,
    /// Output buffer at offset 0 of the node's output, written by several jobs (concat).
    Scratch(u64),
}

enum Groups {
    Threads(u64),
    Explicit(u32, u32, u32),
}

/// A value's concrete shape and type.
fn fact(model: &TypedModel, o: OutletId) -> Option<(DatumType, Vec<usize>)> {
    let f = model.outlet_fact(o).ok()?;
    Some((f.datum_type, f.shape.as_concrete()?.to_vec()))
}

/// The constant value of an outlet, if it has one.
fn konst(model: &TypedModel, o: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(o).ok()?.konst.clone()
}

fn pad6(v: &[usize], fill: usize) -> Option<Vec<u32>> {
    if v.len() > 6 {
        return None;
    }
    let mut out = vec![fill as u32; 6 - v.len()];
    for &x in v {
        out.push(u32::try_from(x).ok()?);
    }
    Some(out)
}

/// Strides of `shape` broadcast to `out` (0 where the input has size 1 and the output not).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    if shape.len() != out.len() {
        return None;
    }
    let s = contiguous_strides(shape);
    Some(
        shape
            .iter()
            .zip(out)
            .zip(s)
            .map(|((&d, &o), s)| if d == 1 && o != 1 { 0 } else { s })
            .collect(),
    )
}

fn single_job(
    kernel: &'static Kernel,
    params: Vec<u32>,
    inputs: &[OutletId],
    threads: u64,
) -> Vec<Job> {
    vec![Job {
        kernel,
        params,
        operands: inputs.iter().map(|&o| Operand::Outlet(o)).collect(),
        output: Out::Node,
        threads: Groups::Threads(threads),
        host_params: Vec::new(),
    }]
}

/// The GPU jobs for one node, or `None` when it stays on the CPU.
fn jobs_for(model: &TypedModel, node: &TypedNode) -> Option<Vec<Job>> {
    if node.outputs.len() != 1 {
        return None;
    }
    let out = OutletId::new(node.id, 0);
    let (odt, oshape) = fact(model, out)?;
    let n_out: usize = oshape.iter().product();
    let ins: Vec<(DatumType, Vec<usize>)> = node
        .inputs
        .iter()
        .map(|&i| fact(model, i))
        .collect::<Option<_>>()?;
    let op: &dyn TypedOp = node.op.as_ref();
    if let Some(bin) = op.downcast_ref::<TypedBinOp>() {
        let code = kernels::binary_code(bin.0.name())?;
        let sa = broadcast_strides(&ins[0].1, &oshape)?;
        let sb = broadcast_strides(&ins[1].1, &oshape)?;
        if is_f32(odt) && ins.iter().all(|(d, _)| is_f32(*d)) {
            let mut p = vec![u32::try_from(n_out).ok()?, code];
            p.extend(pad6(&oshape, 1)?);
            p.extend(pad6(&sa, 0)?);
            p.extend(pad6(&sb, 0)?);
            return Some(single_job(&kernels::BINARY, p, &node.inputs, n_out as u64));
        }
        // Plain integers (not quantized: their arithmetic is not the stored values').
        let kind = match odt {
            DatumType::U8 => 0,
            DatumType::I8 => 1,
            DatumType::I32 => 2,
            DatumType::U32 => 3,
            DatumType::U16 => 4,
            DatumType::I16 => 5,
            _ => return None,
        };
        if code == 6 || ins.iter().any(|(d, _)| *d != odt) {
            return None;
        }
        let mut p = vec![u32::try_from(n_out).ok()?, code, kind];
        p.extend(pad6(&oshape, 1)?);
        p.extend(pad6(&sa, 0)?);
        p.extend(pad6(&sb, 0)?);
        let threads = match kind {
            0 | 1 => n_out.div_ceil(4),
            4 | 5 => n_out.div_ceil(2),
            _ => n_out,
        };
        return Some(single_job(
            &kernels::IBINARY,
            p,
            &node.inputs,
            threads as u64,
        ));
    }
    if let Some(ew) = op.downcast_ref::<ElementWiseOp>() {
        let quant = if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
            Some((q.scale, q.zero_point as i32))
        } else {
            ew.0.downcast_ref::<QuantizeLinearI8>()
                .map(|q| (q.scale, q.zero_point as i32))
        };
        if let Some(lut) = ew.0.downcast_ref::<LookupTable>() {
            let table = lut.table.table();
            if table.len() != 256
                || !is_8bit(ins[0].0)
                || ins[0].0.unquantized() != odt.unquantized()
            {
                return None;
            }
            let mut p = vec![u32::try_from(n_out).ok()?];
            p.extend(
                table
                    .chunks(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            let words = n_out.div_ceil(4) as u64;
            return Some(single_job(&kernels::LUT, p, &node.inputs, words));
        }
        if let Some((scale, zero)) = quant {
            let xk = match ins[0].0 {
                DatumType::F32 => 3,
                DatumType::I32 => 2,
                _ => return None,
            };
            let yk = match odt.unquantized() {
                DatumType::U8 => 0,
                DatumType::I8 => 1,
                _ => return None,
            };
            let p = vec![
                u32::try_from(n_out).ok()?,
                0,
                xk,
                yk,
                scale.to_bits(),
                zero as u32,
            ];
            let words = n_out.div_ceil(4) as u64;
            return Some(single_job(&kernels::QUANT, p, &node.inputs, words));
        }
        let code = kernels::unary_code(&ew.0.name())?;
        if !(is_f32(odt) && is_f32(ins[0].0)) {
            return None;
        }
        let alpha = ew.0.downcast_ref::<LeakyRelu>().map_or(0.0, |l| l.alpha);
        let p = vec![u32::try_from(n_out).ok()?, code, alpha.to_bits()];
        return Some(single_job(&kernels::UNARY, p, &node.inputs, n_out as u64));
    }
    if let Some(rs) = op.downcast_ref::<Resize>() {
        let ishape = &ins[0].1;
        if !(is_f32(odt) && is_f32(ins[0].0)) || ishape.len() != oshape.len() {
            return None;
        }
        let given = rs
            .optional_scales_input
            .and_then(|ix| node.inputs.get(ix))
            .map(|&o| konst(model, o).and_then(|t| values::<f32>(&t)));
        let scales: Vec<f32> = match given {
            Some(None) => return None,
            Some(Some(v)) if v.len() == ishape.len() => v,
            _ => oshape
                .iter()
                .zip(ishape)
                .map(|(&o, &i)| o as f32 / i as f32)
                .collect(),
        };
        let plans = (0..ishape.len()).filter_map(|axis| {
            let (len_in, len_out) = (ishape[axis], oshape[axis]);
            (!(len_in == len_out && scales[axis] == 1.0))
                .then(|| (axis, rs.plan_axis(scales[axis], len_in, len_out)))
        });
        return resample_jobs(node, ishape, plans.collect(), 0.0);
    }
    if let Some(rs) = op.downcast_ref::<OnnxResize>() {
        return onnx_resize(model, node, rs, &ins, &oshape, odt);
    }
    if let Some(up) = op.downcast_ref::<NearestUpsample>() {
        let ishape = &ins[0].1;
        if !(is_f32(odt) && is_f32(ins[0].0)) || up.scales.len() != ishape.len() {
            return None;
        }
        let plans = up
            .scales
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s > 1)
            .map(|(axis, &s)| {
                let len_out = ishape[axis] * s;
                let plan = AxisPlan {
                    window: 1,
                    indices: (0..len_out).map(|x| x / s).collect(),
                    weights: vec![1.0; len_out],
                    extrapolated: vec![false; len_out],
                };
                (axis, plan)
            });
        return resample_jobs(node, ishape, plans.collect(), 0.0);
    }
    if let Some(cast) = op.downcast_ref::<Cast>() {
        let kind = |dt: DatumType| match dt.unquantized() {
            DatumType::U8 => Some(0u32),
            DatumType::I8 => Some(1),
            DatumType::I32 => Some(2),
            DatumType::F32 => Some(3),
            _ => None,
        };
        // Casts from or to quantized types (de)quantize in tract: those stay on the CPU.
        if ins[0].0.is_quantized() || cast.to.is_quantized() {
            return None;
        }
        let (xk, yk) = (kind(ins[0].0)?, kind(cast.to)?);
        let threads = if yk < 2 { n_out.div_ceil(4) } else { n_out } as u64;
        let p = vec![u32::try_from(n_out).ok()?, xk, yk];
        return Some(single_job(&kernels::CAST, p, &node.inputs, threads));
    }
    if let Some(dq) = op.downcast_ref::<DequantizeLinearF32>() {
        let xk = match ins[0].0.unquantized() {
            DatumType::U8 => 0,
            DatumType::I8 => 1,
            DatumType::I32 => 2,
            _ => return None,
        };
        if !is_f32(odt) {
            return None;
        }
        let p = vec![
            u32::try_from(n_out).ok()?,
            1,
            xk,
            3,
            dq.scale.to_bits(),
            dq.zero_point as u32,
        ];
        return Some(single_job(&kernels::QUANT, p, &node.inputs, n_out as u64));
    }
    if let Some(red) = op.downcast_ref::<Reduce>() {
        let code = match red.reducer {
            Reducer::Sum => 0,
            Reducer::Max => 1,
            Reducer::Min => 2,
            Reducer::Prod => 3,
            Reducer::MeanOfSquares => 4,
            _ => return None,
        };
        let ishape = &ins[0].1;
        if !(is_f32(odt) && is_f32(ins[0].0)) || ishape.len() > 6 || ishape.len() != oshape.len() {
            return None;
        }
        let strides = contiguous_strides(ishape);
        let lead = 6 - ishape.len();
        let mut oshape6 = vec![1u32; 6];
        let mut ostr = vec![0u32; 6];
        let mut rshape = vec![1u32; 6];
        let mut rstr = vec![0u32; 6];
        for (d, (&size, &stride)) in ishape.iter().zip(&strides).enumerate() {
            let (sh, st) = if red.axes.contains(&d) {
                (&mut rshape, &mut rstr)
            } else {
                (&mut oshape6, &mut ostr)
            };
            sh[lead + d] = u32::try_from(size).ok()?;
            st[lead + d] = u32::try_from(stride).ok()?;
        }
        let count: usize = red
            .axes
            .iter()
            .map(|&a| ishape.get(a).copied())
            .product::<Option<usize>>()?;
        if count == 0 {
            return None;
        }
        let mut p = vec![u32::try_from(n_out).ok()?, code, u32::try_from(count).ok()?];
        p.extend(oshape6);
        p.extend(ostr);
        p.extend(rshape);
        p.extend(rstr);
        return Some(single_job(&kernels::REDUCE, p, &node.inputs, n_out as u64));
    }
    if let Some(axis_op) = op.downcast_ref::<AxisOp>() {
        // Add/Rm/Reshape are views (see `Plan::build`); a move is a transposing copy.
        let AxisOp::Move(..) = axis_op else {
            return None;
        };
        if elem_size(odt)? != 4 {
            return None;
        }
        let in_strides = contiguous_strides(&ins[0].1);
        let mut src = vec![0usize; oshape.len()];
        for (i, s) in in_strides.iter().enumerate() {
            src[axis_op.transform_axis(i)?] = *s;
        }
        let dst = contiguous_strides(&oshape);
        let mut p = vec![u32::try_from(n_out).ok()?, 0, 0];
        p.extend(pad6(&oshape, 1)?);
        p.extend(pad6(&src, 0)?);
        p.extend(pad6(&dst, 0)?);
        return Some(single_job(&kernels::COPY, p, &node.inputs, n_out as u64));
    }
    if let Some(concat) = op.downcast_ref::<TypedConcat>() {
        if elem_size(odt)? != 4 || ins.iter().any(|(d, _)| *d != odt) {
            return None;
        }
        let dst = contiguous_strides(&oshape);
        let mut at = 0usize;
        let mut jobs = Vec::new();
        for (k, (_, shape)) in ins.iter().enumerate() {
            let n: usize = shape.iter().product();
            let mut p = vec![
                u32::try_from(n).ok()?,
                0,
                u32::try_from(at * dst[concat.axis]).ok()?,
            ];
            p.extend(pad6(shape, 1)?);
            p.extend(pad6(&contiguous_strides(shape), 0)?);
            p.extend(pad6(&dst, 0)?);
            at += shape[concat.axis];
            if n == 0 {
                continue;
            }
            jobs.push(Job {
                kernel: &kernels::COPY,
                params: p,
                operands: vec![Operand::Outlet(node.inputs[k])],
                output: Out::Node,
                threads: Groups::Threads(n as u64),
                host_params: Vec::new(),
            });
        }
        return (!jobs.is_empty()).then_some(jobs);
    }
    if let Some(slice) = op.downcast_ref::<Slice>() {
        if elem_size(odt)? != 4 {
            return None;
        }
        let start = usize::try_from(slice.start.as_i64()?).ok()?;
        let src = contiguous_strides(&ins[0].1);
        let mut p = vec![
            u32::try_from(n_out).ok()?,
            u32::try_from(start * src[slice.axis]).ok()?,
            0,
        ];
        p.extend(pad6(&oshape, 1)?);
        p.extend(pad6(&src, 0)?);
        p.extend(pad6(&contiguous_strides(&oshape), 0)?);
        return Some(single_job(
            &kernels::COPY,
            p,
            &node.inputs[..1],
            n_out as u64,
        ));
    }
    if let Some(sm) = op.downcast_ref::<Softmax>() {
        if sm.axes.len() != 1 || sm.quant_output_dt.is_some() || !is_f32(odt) {
            return None;
        }
        let axis = sm.axes[0];
        let len = oshape[axis];
        let inner: usize = oshape[axis + 1..].iter().product();
        let rows = n_out / len.max(1);
        let log = matches!(sm.kind, SoftmaxKind::LogSoftmax) as u32;
        let p = vec![
            u32::try_from(rows).ok()?,
            u32::try_from(len).ok()?,
            u32::try_from(inner).ok()?,
            log,
        ];
        return Some(single_job(&kernels::SOFTMAX, p, &node.inputs, rows as u64));
    }
    if let Some(ein) = op.downcast_ref::<EinSum>() {
        return match ein.q_params {
            None => einsum_f32(model, node, ein, &ins, &oshape, odt),
            Some(q) => einsum_q8(model, node, ein, &ins, &oshape, q),
        };
    }
    if let Some(conv) = op.downcast_ref::<Conv>() {
        return match conv.q_params {
            None => conv_f32(model, node, conv, &ins, &oshape, odt),
            Some(q) => conv_q8(model, node, conv, &ins, &oshape, q),
        };
    }
    if let Some(mp) = op.downcast_ref::<MaxPool>() {
        if mp.with_index_outputs.is_some() {
            return None;
        }
        return pool(node, &mp.pool_spec, 0, &ins, &oshape, odt);
    }
    if let Some(sp) = op.downcast_ref::<SumPool>() {
        let kind = match (sp.normalize, sp.count_include_pad) {
            (false, _) => 1,
            (true, false) => 2,
            (true, true) => 3,
        };
        return pool(node, &sp.pool_spec, kind, &ins, &oshape, odt);
    }
    None
}

/// N, C, spatial (H, W) of a channels-first pool spec's input; 1D as H = 1.
fn nchw(spec: &PoolSpec, shape: &[usize]) -> Option<[usize; 4]> {
    let (n, rest) = match spec.data_format {
        DataFormat::NCHW => (shape[0], &shape[1..]),
        DataFormat::CHW => (1, shape),
        _ => return None,
    };
    match rest.len() {
        2 => Some([n, rest[0], 1, rest[1]]),
        3 => Some([n, rest[0], rest[1], rest[2]]),
        _ => None,
    }
}

/// (kh, kw, sh, sw, dh, dw, ph, pw) of a 1D or 2D pool spec for input spatial dims `hw`.
fn window(spec: &PoolSpec, hw: &[usize]) -> Option<[usize; 8]> {
    let k = &spec.kernel_shape;
    let s = spec.strides();
    let d = spec.dilations();
    let pads = spec.computed_padding(hw);
    match k.len() {
        1 => Some([1, k[0], 1, s[0], 1, d[0], 0, pads[0].pad_before]),
        2 => Some([
            k[0],
            k[1],
            s[0],
            s[1],
            d[0],
            d[1],
            pads[0].pad_before,
            pads[1].pad_before,
        ]),
        _ => None,
    }
}

fn pool(
    node: &TypedNode,
    spec: &PoolSpec,
    kind: u32,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    odt: DatumType,
) -> Option<Vec<Job>> {
    // Max pooling also on plain uint8/int8 (compared exactly as f32 in the kernel).
    let elem = match odt {
        DatumType::F32 => 0,
        DatumType::U8 if kind == 0 => 1,
        DatumType::I8 if kind == 0 => 2,
        _ => return None,
    };
    if ins[0].0 != odt {
        return None;
    }
    let (n, c, dhw) = ncdhw(spec, &ins[0].1)?;
    let (_, _, odhw) = ncdhw(spec, oshape)?;
    let rank = spec.kernel_shape.len();
    let pads = spec.computed_padding(&ins[0].1[ins[0].1.len() - rank..]);
    let (s, d) = (spec.strides(), spec.dilations());
    let front = |v: &mut Vec<usize>, fill: usize| {
        while v.len() < 3 {
            v.insert(0, fill);
        }
    };
    let mut k: Vec<usize> = spec.kernel_shape.to_vec();
    let mut st: Vec<usize> = s.to_vec();
    let mut di: Vec<usize> = d.to_vec();
    let mut pb: Vec<usize> = pads.iter().map(|p| p.pad_before).collect();
    front(&mut k, 1);
    front(&mut st, 1);
    front(&mut di, 1);
    front(&mut pb, 0);
    let n_out = n * c * odhw.iter().product::<usize>();
    let mut p: Vec<u32> = [n_out, n, c]
        .iter()
        .chain(&dhw)
        .chain(&odhw)
        .chain(&k)
        .chain(&st)
        .chain(&di)
        .chain(&pb)
        .map(|&v| u32::try_from(v).ok())
        .collect::<Option<_>>()?;
    p.push(kind);
    // For `count_include_pad`: the padded extent of each axis. In ONNX ceil mode the last
    // window can run past the explicit padding and the overhang is not counted (as tract and
    // onnxruntime do); otherwise every window lies inside it and the divisor is the kernel.
    let mut limit: Vec<u32> = match &spec.padding {
        PaddingSpec::ExplicitOnnxPool(_, _, true) => dhw[3 - rank..]
            .iter()
            .zip(&pads)
            .map(|(&len, p)| u32::try_from(p.pad_before + len + p.pad_after).ok())
            .collect::<Option<_>>()?,
        _ => vec![u32::MAX; rank],
    };
    while limit.len() < 3 {
        limit.insert(0, u32::MAX);
    }
    p.extend(limit);
    p.push(elem);
    let threads = if elem == 0 { n_out } else { n_out.div_ceil(4) };
    Some(single_job(
        &kernels::POOL,
        p,
        &node.inputs[..1],
        threads as u64,
    ))
}

/// N, C and the spatial dims padded to three (`[D, H, W]`, leading 1s) of an NCHW or CHW
/// shape with one to three spatial axes.
fn ncdhw(spec: &PoolSpec, shape: &[usize]) -> Option<(usize, usize, [usize; 3])> {
    let (n, rest) = match spec.data_format {
        DataFormat::NCHW => (*shape.first()?, shape.get(1..)?),
        DataFormat::CHW => (1, shape),
        _ => return None,
    };
    let (c, sp) = rest.split_first()?;
    if sp.is_empty() || sp.len() > 3 || sp.len() != spec.kernel_shape.len() {
        return None;
    }
    let mut dhw = [1usize; 3];
    dhw[3 - sp.len()..].copy_from_slice(sp);
    Some((n, *c, dhw))
}

fn conv_f32(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    odt: DatumType,
) -> Option<Vec<Job>> {
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || ins.len() != 3
        || !is_f32(odt)
        || !ins.iter().all(|(d, _)| is_f32(*d))
    {
        return None;
    }
    let spec = &conv.pool_spec;
    let [n, c, h, w] = nchw(spec, &ins[0].1)?;
    let [_, co, oh, ow] = nchw(spec, oshape)?;
    let hw: Vec<usize> = if spec.kernel_shape.len() == 1 {
        vec![w]
    } else {
        vec![h, w]
    };
    let win = window(spec, &hw)?;
    let kshape = &ins[1].1;
    if kshape.first() != Some(&co) || kshape.get(1).copied()? * conv.group != c {
        return None;
    }
    // Bias: a constant broadcast to CO values, a CO vector, or none.
    let (bias, has_bias) = match konst(model, node.inputs[2]) {
        Some(b) => {
            let v = values::<f32>(&b)?;
            let full: Vec<f32> = match v.len() {
                1 => vec![v[0]; co],
                l if l == co => v.to_vec(),
                _ => return None,
            };
            let any = full.iter().any(|&x| x != 0.0);
            (Operand::Const(bytemuck::cast_slice(&full).to_vec()), any)
        }
        None if ins[2].1.iter().product::<usize>() == co => (Operand::Outlet(node.inputs[2]), true),
        None => return None,
    };
    let n_out = n * co * oh * ow;
    let mut p: Vec<u32> = [n_out, n, c, h, w, co, oh, ow]
        .iter()
        .chain(&win)
        .map(|&v| u32::try_from(v).ok())
        .collect::<Option<_>>()?;
    p.push(u32::try_from(conv.group).ok()?);
    p.push(has_bias as u32);
    Some(vec![Job {
        kernel: &kernels::CONV,
        params: p,
        operands: vec![
            Operand::Outlet(node.inputs[0]),
            Operand::Outlet(node.inputs[1]),
            bias,
        ],
        output: Out::Node,
        threads: Groups::Threads(n_out as u64),
        host_params: Vec::new(),
    }])
}

/// A quantized convolution (QLinearConv, ConvInteger, or a fused QDQ pattern) as an integer
/// matrix product: the kernel packed as rows of `CO`, the input packed as im2col rows (one per
/// output pixel and group), then the int8 matmul kernel with the output seen as
/// `[N, G, CO/G, OH, OW]`, so that each group only meets its own rows.
fn conv_q8(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    q: DatumType,
) -> Option<Vec<Job>> {
    if conv.kernel_fmt != KernelFormat::OIHW
        || ins.len() != 9
        || !is_8bit(ins[0].0)
        || !is_8bit(ins[1].0)
    {
        return None;
    }
    let kind = match q.unquantized() {
        DatumType::U8 => 0u32,
        DatumType::I8 => 1,
        DatumType::I32 => 2,
        _ => return None,
    };
    let spec = &conv.pool_spec;
    let [n, c, h, w] = nchw(spec, &ins[0].1)?;
    let [_, co, oh, ow] = nchw(spec, oshape)?;
    let hw: Vec<usize> = if spec.kernel_shape.len() == 1 {
        vec![w]
    } else {
        vec![h, w]
    };
    let win = window(spec, &hw)?;
    let g = conv.group;
    let kshape = &ins[1].1;
    if g == 0 || kshape.first() != Some(&co) || kshape.get(1).copied()? * g != c || co % g != 0 {
        return None;
    }
    let cog = co / g;
    let k: usize = kshape[1..].iter().product();
    let k4 = k.div_ceil(4);
    let unsigned = |dt: DatumType| dt.unquantized() == DatumType::U8;
    // Padding taps hold the input's zero point (a constant, or written by each run).
    let x_zero = match konst(model, node.inputs[3]) {
        Some(t) => {
            let [z] = param_words(&t, false)?[..] else {
                return None;
            };
            Some(z)
        }
        None if ins[3].1.iter().product::<usize>() == 1 => None,
        None => return None,
    };
    let to_u32 =
        |v: &[usize]| -> Option<Vec<u32>> { v.iter().map(|&x| u32::try_from(x).ok()).collect() };
    // The kernel: CO rows of K contiguous values.
    let wwords = co * k4;
    let mut pw = to_u32(&[wwords, co, k, k4, 0, k, 1, unsigned(ins[1].0) as usize, 0])?;
    pw.extend([1, 1, 1, 1, 0, 0, 0, 0]);
    let wbytes =
        konst(model, node.inputs[1]).and_then(|t| pack_rows(&t, co, k, unsigned(ins[1].0)));
    let (pack_w, w_op) = match wbytes {
        // A constant kernel is packed once, here.
        Some(bytes) => (None, Operand::Const(bytes)),
        None => (
            Some(Job {
                kernel: &kernels::PACK_I8,
                params: pw,
                operands: vec![Operand::Outlet(node.inputs[1])],
                output: Out::Scratch((wwords.max(1) * 4) as u64),
                threads: Groups::Threads(wwords as u64),
                host_params: Vec::new(),
            }),
            Operand::Scratch(0),
        ),
    };
    // The input as im2col rows.
    let xwords = n * g * oh * ow * k4;
    let mut px = to_u32(&[xwords, k, k4, n, c, h, w, oh, ow])?;
    px.extend(to_u32(&win)?);
    px.push(u32::try_from(g).ok()?);
    px.push(unsigned(ins[0].0) as u32);
    let pad_at = px.len();
    px.push(x_zero.unwrap_or(0) & 0xff);
    let pack_x = Job {
        kernel: &kernels::IM2COL_I8,
        params: px,
        operands: vec![Operand::Outlet(node.inputs[0])],
        output: Out::Scratch((xwords.max(1) * 4) as u64),
        threads: Groups::Threads(xwords as u64),
        host_params: match x_zero {
            Some(_) => Vec::new(),
            None => vec![(node.inputs[3], pad_at, false)],
        },
    };
    // The matmul: A = kernel rows (m = output channel), B = im2col rows.
    let n_out = n * co * oh * ow;
    let mut p: Vec<u32> = vec![0; 51];
    p[0] = u32::try_from(n_out).ok()?;
    p[1] = u32::try_from(k).ok()?;
    p[2] = u32::try_from(k4).ok()?;
    p[3] = kind;
    p[4] = 5;
    // Output axes [1, N, G, CO/G, OH, OW]: (size, A row, B row, m) strides.
    let axes = [
        (1, 0, 0, 0),
        (n, 0, g * oh * ow, 0),
        (g, cog, oh * ow, cog),
        (cog, 1, 0, 1),
        (oh, 0, ow, 0),
        (ow, 0, 1, 0),
    ];
    for (d, (size, ra, rb, ms)) in axes.into_iter().enumerate() {
        p[5 + d] = u32::try_from(size).ok()?;
        p[11 + d] = u32::try_from(ra).ok()?;
        p[17 + d] = u32::try_from(rb).ok()?;
        p[23 + d] = u32::try_from(ms).ok()?;
    }
    p[49] = if unsigned(ins[1].0) { 128 } else { 0 };
    p[50] = if unsigned(ins[0].0) { 128 } else { 0 };
    // Conv inputs: bias(2) x0(3) x_scale(4) w0(5) w_scale(6) y0(7) y_scale(8); the kernel is
    // operand A of the matmul, so its zero point and scale take A's slots.
    let slots = [
        (2usize, 47usize, false),
        (5, 35, false),
        (6, 37, true),
        (3, 39, false),
        (4, 41, true),
        (7, 43, false),
        (8, 45, true),
    ];
    let mut host_params = Vec::new();
    for (input, slot, as_f32) in slots {
        let len: usize = ins[input].1.iter().product();
        let mode = match len {
            1 => 0,
            l if l == co && ins[input].1.len() == 1 && matches!(input, 2 | 5 | 6) => 1,
            _ => return None,
        };
        put_qparam(model, node.inputs[input], (slot, mode, len, as_f32), &mut p)
            .map(|host| host_params.extend(host))?;
    }
    let threads = if kind == 2 { n_out } else { n_out.div_ceil(4) };
    let x_op = Operand::Scratch(pack_w.is_some() as usize);
    let mut jobs: Vec<Job> = pack_w.into_iter().collect();
    jobs.push(pack_x);
    jobs.push(Job {
        kernel: &kernels::QMATMUL,
        params: p,
        operands: vec![w_op, x_op],
        output: Out::Node,
        threads: Groups::Threads(threads as u64),
        host_params,
    });
    Some(jobs)
}

/// A constant 8-bit operand packed on the host exactly as `pack_i8.wgsl` packs it: `rows` rows
/// of `k` contiguous values, 4 per u32 (zero padded), uint8 flipped into the signed domain.
fn pack_rows(t: &Tensor, rows: usize, k: usize, unsigned: bool) -> Option<Vec<u8>> {
    let raw = t.as_bytes();
    if raw.len() != rows * k {
        return None;
    }
    let k4 = k.div_ceil(4);
    let flip = if unsigned { 0x80 } else { 0 };
    let mut out = vec![0u8; (rows * k4 * 4).max(4)];
    for r in 0..rows {
        for j in 0..k {
            out[r * k4 * 4 + j] = raw[r * k + j] ^ flip;
        }
    }
    Some(out)
}

/// One resampling dispatch per axis that changes, chained through scratch buffers.
/// ONNX Resize in the modes tract's core op lacks (the `round_prefer_floor` and `ceil`
/// nearest modes, `sizes` with a kept aspect ratio, `tf_crop_and_resize`, antialiasing,
/// `exclude_outside`, other cubic coefficients): the per-axis plans built as tract-onnx-opl's
/// `Resize::eval` builds them, so the GPU reads the same taps and weights as the CPU.
fn onnx_resize(
    model: &TypedModel,
    node: &TypedNode,
    rs: &OnnxResize,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    odt: DatumType,
) -> Option<Vec<Job>> {
    let ishape = &ins[0].1;
    let rank = ishape.len();
    if !(is_f32(odt) && is_f32(ins[0].0)) || oshape.len() != rank {
        return None;
    }
    let axes = rs.resized_axes(rank).ok()?;
    let input = |ix: Option<usize>| -> Option<Vec<f32>> {
        let t = konst(model, *node.inputs.get(ix?)?)?;
        let t = t.cast_to::<f32>().ok()?;
        (t.len() == axes.len()).then(|| values::<f32>(&t)).flatten()
    };
    let mut scale = vec![1.0f32; rank];
    if let Some(s) = input(rs.optional_scales_input) {
        axes.iter().zip(s).for_each(|(&a, s)| scale[a] = s);
    } else if rs.keep_aspect_ratio_policy != AspectRatio::Stretch {
        let sizes = input(rs.optional_sizes_input)?;
        let ratios = axes.iter().zip(sizes).map(|(&a, s)| s / ishape[a] as f32);
        let s = if rs.keep_aspect_ratio_policy == AspectRatio::NotLarger {
            ratios.reduce(f32::min)
        } else {
            ratios.reduce(f32::max)
        }?;
        axes.iter().for_each(|&a| scale[a] = s);
    } else {
        // A scales input that is not a constant leaves the op on the CPU.
        if rs
            .optional_scales_input
            .and_then(|ix| ins.get(ix))
            .is_some_and(|(_, shape)| shape.iter().product::<usize>() != 0)
        {
            return None;
        }
        axes.iter()
            .for_each(|&a| scale[a] = oshape[a] as f32 / ishape[a] as f32);
    }
    let tf_crop = rs.coord_transformer == CoordTransform::TfCropAndResize;
    let mut roi = vec![(0.0f32, 1.0f32); rank];
    if tf_crop {
        let r = konst(model, *node.inputs.get(rs.optional_roi_input?)?)?;
        let r = values::<f32>(&*r.cast_to::<f32>().ok()?)?;
        if r.len() != 2 * axes.len() {
            return None;
        }
        for (i, &a) in axes.iter().enumerate() {
            roi[a] = (r[i], r[i + axes.len()]);
        }
    }
    let plans = (0..rank)
        .filter(|&a| tf_crop || ishape[a] != oshape[a] || scale[a] != 1.0)
        .map(|a| {
            (
                a,
                onnx_resize_plan(rs, scale[a], ishape[a], oshape[a], roi[a]),
            )
        })
        .collect();
    resample_jobs(node, ishape, plans, rs.extrapolation_value())
}

/// One axis of an ONNX Resize: tract-onnx-opl's (private) `Resize::plan_axis`, restated.
fn onnx_resize_plan(
    rs: &OnnxResize,
    scale: f32,
    len_in: usize,
    len_out: usize,
    roi: (f32, f32),
) -> AxisPlan {
    let window = window_size(&rs.interpolator, rs.antialias, scale);
    let coord: Box<dyn Fn(usize) -> Option<f32>> = match &rs.coord_transformer {
        CoordTransform::Plain(t) => {
            let t = t.clone();
            Box::new(move |x| Some(t.transform(x, scale, len_in, len_out)))
        }
        CoordTransform::TfCropAndResize => {
            let last = len_in as f32 - 1.0;
            let span = last * (roi.1 - roi.0);
            let width = scale * len_in as f32;
            Box::new(move |x| {
                let offset = if width == 1.0 {
                    span / 2.0
                } else {
                    x as f32 * span / (width - 1.0)
                };
                let x = offset + roi.0 * last;
                (x >= 0.0 && x <= last).then_some(x)
            })
        }
    };
    let exclude = rs.exclude_outside;
    let (antialias, a) = (rs.antialias, rs.cubic_coeff_a());
    match rs.interpolator {
        Interpolator::Linear => plan_axis(len_in, len_out, window, exclude, coord, |r, w| {
            linear_weights(r, scale, antialias, w)
        }),
        Interpolator::Cubic => plan_axis(len_in, len_out, window, exclude, coord, |r, w| {
            cubic_weights(r, scale, a, antialias, w)
        }),
        Interpolator::Nearest => plan_axis(len_in, len_out, window, exclude, coord, |r, w| {
            let right = r == 1.0
                || match rs.nearest {
                    OnnxNearest::Floor => false,
                    OnnxNearest::Ceil => true,
                    OnnxNearest::RoundPreferFloor => r > 0.5,
                    OnnxNearest::RoundPreferCeil => r >= 0.5,
                };
            w[0] = !right as u8 as f32;
            w[1] = right as u8 as f32;
        }),
    }
}

fn resample_jobs(
    node: &TypedNode,
    ishape: &[usize],
    plans: Vec<(usize, AxisPlan)>,
    extrapolation: f32,
) -> Option<Vec<Job>> {
    if plans.is_empty() {
        return None;
    }
    let mut shape = ishape.to_vec();
    let mut jobs = Vec::new();
    let last = plans.len() - 1;
    for (k, (axis, plan)) in plans.into_iter().enumerate() {
        let (len_in, len_out, window) = (shape[axis], plan.extrapolated.len(), plan.window);
        if plan.indices.len() != window * len_out || plan.weights.len() != window * len_out {
            return None;
        }
        shape[axis] = len_out;
        let n_out: usize = shape.iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut p: Vec<u32> = [n_out, len_in, len_out, inner, window]
            .iter()
            .map(|&v| u32::try_from(v).ok())
            .collect::<Option<_>>()?;
        p.push(extrapolation.to_bits());
        for x in 0..len_out {
            for &i in &plan.indices[x * window..][..window] {
                p.push(u32::try_from(i).ok()?);
            }
            p.extend(
                plan.weights[x * window..][..window]
                    .iter()
                    .map(|w| w.to_bits()),
            );
            p.push(plan.extrapolated[x] as u32);
        }
        jobs.push(Job {
            kernel: &kernels::RESAMPLE,
            params: p,
            operands: vec![match k {
                0 => Operand::Outlet(node.inputs[0]),
                k => Operand::Scratch(k - 1),
            }],
            output: if k == last {
                Out::Node
            } else {
                Out::Scratch((n_out.max(1) * 4) as u64)
            },
            threads: Groups::Threads(n_out as u64),
            host_params: Vec::new(),
        });
    }
    Some(jobs)
}

/// How an einsum's axes map onto a batched matrix product.
struct MatMulAxes {
    /// Output axes, in order: (size, role).
    out: Vec<(usize, Role)>,
    m: usize,
    n: usize,
    k: usize,
    /// Strides of A and B along m, n and k, and along each batch axis (in `batch` order).
    a_m: usize,
    a_k: usize,
    b_k: usize,
    b_n: usize,
    batch: Vec<(usize, usize, usize)>, // (size, a stride, b stride)
    /// Which axis letter is m and n (for per-axis quantization parameters).
    m_repr: Option<char>,
    n_repr: Option<char>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Batch(usize),
    M,
    N,
}

fn matmul_axes(
    ein: &EinSum,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
) -> Option<MatMulAxes> {
    let sa = contiguous_strides(&ins[0].1);
    let sb = contiguous_strides(&ins[1].1);
    let mut roles: Vec<Option<Role>> = vec![None; oshape.len()];
    let mut m = None;
    let mut n = None;
    let mut k = None;
    let mut batch = Vec::new();
    let pos = |v: &TVec<usize>| -> Option<Option<usize>> {
        match v.len() {
            0 => Some(None),
            1 => Some(Some(v[0])),
            _ => None,
        }
    };
    for axis in ein.axes.iter_all_axes() {
        let a = pos(&axis.inputs[0])?;
        let b = pos(&axis.inputs[1])?;
        let o = pos(&axis.outputs[0])?;
        let stride = |p: Option<usize>, s: &[usize], shape: &[usize]| {
            p.map_or(0, |p| if shape[p] == 1 { 0 } else { s[p] })
        };
        let (st_a, st_b) = (stride(a, &sa, &ins[0].1), stride(b, &sb, &ins[1].1));
        match o {
            Some(o) => {
                let size = oshape[o];
                if a.is_some() && b.is_none() && m.is_none() {
                    m = Some((o, size, st_a, axis.repr));
                    roles[o] = Some(Role::M);
                } else if b.is_some() && a.is_none() && n.is_none() {
                    n = Some((o, size, st_b, axis.repr));
                    roles[o] = Some(Role::N);
                } else {
                    roles[o] = Some(Role::Batch(batch.len()));
                    batch.push((size, st_a, st_b));
                }
            }
            None => {
                let size = a.map(|p| ins[0].1[p]).or(b.map(|p| ins[1].1[p]))?;
                if a.is_some() && b.is_some() && k.is_none() {
                    k = Some((size, st_a, st_b));
                } else if size != 1 {
                    return None;
                }
            }
        }
    }
    let out = roles
        .into_iter()
        .zip(oshape)
        .map(|(r, &s)| Some((s, r?)))
        .collect::<Option<Vec<_>>>()?;
    let (kk, a_k, b_k) = k.unwrap_or((1, 0, 0));
    Some(MatMulAxes {
        out,
        m: m.map_or(1, |m| m.1),
        n: n.map_or(1, |n| n.1),
        k: kk,
        a_m: m.map_or(0, |m| m.2),
        a_k,
        b_k,
        b_n: n.map_or(0, |n| n.2),
        batch,
        m_repr: m.map(|m| m.3),
        n_repr: n.map(|n| n.3),
    })
}

fn einsum_f32(
    _model: &TypedModel,
    node: &TypedNode,
    ein: &EinSum,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    odt: DatumType,
) -> Option<Vec<Job>> {
    if ins.len() != 2 || !is_f32(odt) || !ins.iter().all(|(d, _)| is_f32(*d)) {
        return None;
    }
    let ax = matmul_axes(ein, ins, oshape)?;
    if ax.batch.len() > 4 {
        return None;
    }
    let ostrides = contiguous_strides(oshape);
    let mut c_m = 0;
    let mut c_n = 0;
    let mut c_batch = vec![0usize; ax.batch.len()];
    for (o, (_, role)) in ax.out.iter().enumerate() {
        match role {
            Role::M => c_m = ostrides[o],
            Role::N => c_n = ostrides[o],
            Role::Batch(b) => c_batch[*b] = ostrides[o],
        }
    }
    let nbatch: usize = ax.batch.iter().map(|b| b.0).product();
    let mut bsize = vec![1usize; 4 - ax.batch.len()];
    let mut a_bs = vec![0usize; 4 - ax.batch.len()];
    let mut b_bs = a_bs.clone();
    let mut c_bs = a_bs.clone();
    for (k, &(s, a, b)) in ax.batch.iter().enumerate() {
        bsize.push(s);
        a_bs.push(a);
        b_bs.push(b);
        c_bs.push(c_batch[k]);
    }
    let mut p: Vec<usize> = vec![ax.m, ax.n, ax.k, nbatch];
    p.extend(&bsize);
    p.extend(&a_bs);
    p.extend(&b_bs);
    p.extend(&c_bs);
    p.extend([ax.a_m, ax.a_k, ax.b_k, ax.b_n, c_m, c_n]);
    let p: Vec<u32> = p
        .into_iter()
        .map(|v| u32::try_from(v).ok())
        .collect::<Option<_>>()?;
    let gx = u32::try_from(ax.n.div_ceil(16)).ok()?;
    let gy = u32::try_from(ax.m.div_ceil(16)).ok()?;
    let gz = u32::try_from(nbatch).ok()?;
    if [gx, gy, gz].iter().any(|&g| g as u64 > kernels::MAX_GROUPS) {
        return None;
    }
    Some(vec![Job {
        kernel: &kernels::MATMUL,
        params: p,
        operands: node.inputs.iter().map(|&o| Operand::Outlet(o)).collect(),
        output: Out::Node,
        threads: Groups::Explicit(gx.max(1), gy.max(1), gz.max(1)),
        host_params: Vec::new(),
    }])
}

/// The quantized matrix product: pack A and B into signed 4-byte rows, then the integer kernel.
fn einsum_q8(
    model: &TypedModel,
    node: &TypedNode,
    ein: &EinSum,
    ins: &[(DatumType, Vec<usize>)],
    oshape: &[usize],
    q: DatumType,
) -> Option<Vec<Job>> {
    if ins.len() != 9 || !is_8bit(ins[0].0) || !is_8bit(ins[1].0) || oshape.len() > 6 {
        return None;
    }
    let kind = match q.unquantized() {
        DatumType::U8 => 0u32,
        DatumType::I8 => 1,
        DatumType::I32 => 2,
        _ => return None,
    };
    let ax = matmul_axes(ein, &ins[..2], oshape)?;
    if ax.batch.len() > 4 {
        return None;
    }
    let nbatch: usize = ax.batch.iter().map(|b| b.0).product();
    let k4 = ax.k.div_ceil(4);
    let unsigned = |dt: DatumType| dt.unquantized() == DatumType::U8;
    let pack = |rows: usize, row_stride: usize, k_stride: usize, which: usize| -> Option<Job> {
        let words = nbatch * rows * k4;
        let mut p: Vec<usize> = vec![words, rows, ax.k, k4, 0, row_stride, k_stride];
        p.push(unsigned(ins[which].0) as usize);
        p.push(ax.batch.len());
        let pad = 4 - ax.batch.len();
        p.extend(std::iter::repeat_n(1, pad).chain(ax.batch.iter().map(|b| b.0)));
        p.extend(
            std::iter::repeat_n(0, pad)
                .chain(ax.batch.iter().map(|b| if which == 0 { b.1 } else { b.2 })),
        );
        Some(Job {
            kernel: &kernels::PACK_I8,
            params: p
                .into_iter()
                .map(|v| u32::try_from(v).ok())
                .collect::<Option<_>>()?,
            operands: vec![Operand::Outlet(node.inputs[which])],
            output: Out::Scratch((words.max(1) * 4) as u64),
            threads: Groups::Threads(words as u64),
            host_params: Vec::new(),
        })
    };
    let pack_a = pack(ax.m, ax.a_m, ax.a_k, 0)?;
    let pack_b = pack(ax.n, ax.b_n, ax.b_k, 1)?;
    // Header, then the quantization parameters.
    let n_out: usize = oshape.iter().product();
    let mut p: Vec<u32> = vec![0; 51];
    p[0] = u32::try_from(n_out).ok()?;
    p[1] = u32::try_from(ax.k).ok()?;
    p[2] = u32::try_from(k4).ok()?;
    p[3] = kind;
    p[4] = oshape.len() as u32;
    let lead = 6 - ax.out.len();
    let mut bstride = vec![0usize; ax.batch.len()];
    let mut acc = 1;
    for (k, b) in ax.batch.iter().enumerate().rev() {
        bstride[k] = acc;
        acc *= b.0;
    }
    for d in 0..6 {
        p[5 + d] = 1;
    }
    for (o, (size, role)) in ax.out.iter().enumerate() {
        let d = lead + o;
        p[5 + d] = u32::try_from(*size).ok()?;
        let (ra, rb, ms, ns) = match role {
            Role::M => (1, 0, 1, 0),
            Role::N => (0, 1, 0, 1),
            Role::Batch(b) => (bstride[*b] * ax.m, bstride[*b] * ax.n, 0, 0),
        };
        p[11 + d] = u32::try_from(ra).ok()?;
        p[17 + d] = u32::try_from(rb).ok()?;
        p[23 + d] = ms;
        p[29 + d] = ns;
    }
    p[49] = if unsigned(ins[0].0) { 128 } else { 0 };
    p[50] = if unsigned(ins[1].0) { 128 } else { 0 };
    // Slots: bias(2) a0(3) a_scale(4) b0(5) b_scale(6) c0(7) c_scale(8) → header slot.
    let slots = [
        (2usize, 47usize, false),
        (3, 35, false),
        (4, 37, true),
        (5, 39, false),
        (6, 41, true),
        (7, 43, false),
        (8, 45, true),
    ];
    let mut host_params = Vec::new();
    for (input, slot, as_f32) in slots {
        let shape = &ins[input].1;
        let len: usize = shape.iter().product();
        let mode = if len == 1 {
            0
        } else {
            let axis = ein
                .axes
                .iter_all_axes()
                .find(|a| a.inputs[input].first() == Some(&0) && shape.len() == 1)?;
            if Some(axis.repr) == ax.m_repr && len == ax.m {
                1
            } else if Some(axis.repr) == ax.n_repr && len == ax.n {
                2
            } else {
                return None;
            }
        };
        put_qparam(model, node.inputs[input], (slot, mode, len, as_f32), &mut p)
            .map(|host| host_params.extend(host))?;
    }
    let threads = if kind == 2 { n_out } else { n_out.div_ceil(4) };
    Some(vec![
        pack_a,
        pack_b,
        Job {
            kernel: &kernels::QMATMUL,
            params: p,
            operands: vec![Operand::Scratch(0), Operand::Scratch(1)],
            output: Out::Node,
            threads: Groups::Threads(threads as u64),
            host_params,
        },
    ])
}

/// A quantization parameter tensor as parameter words: f32 bits or i32.
/// Appends one quantization parameter (`len` values) to `p` and points `p[slot]` (its
/// broadcast mode) and `p[slot + 1]` (its offset) at it: the values of a constant, or zeros
/// and the write that fills them on each run when it is computed on the CPU.
fn put_qparam(
    model: &TypedModel,
    input: OutletId,
    (slot, mode, len, as_f32): (usize, u32, usize, bool),
    p: &mut Vec<u32>,
) -> Option<Option<(OutletId, usize, bool)>> {
    let off = p.len();
    p[slot] = mode;
    p[slot + 1] = u32::try_from(off).ok()?;
    match konst(model, input) {
        Some(t) => {
            p.extend(param_words(&t, as_f32)?);
            Some(None)
        }
        None => {
            p.extend(std::iter::repeat_n(0, len));
            Some(Some((input, off, as_f32)))
        }
    }
}

fn param_words(t: &Tensor, as_f32: bool) -> Option<Vec<u32>> {
    let plain = if t.datum_type().is_quantized() {
        t.clone()
            .cast_to_dt(t.datum_type().unquantized())
            .ok()?
            .into_owned()
    } else {
        t.clone()
    };
    if as_f32 {
        Some(values::<f32>(&plain)?.iter().map(|f| f.to_bits()).collect())
    } else {
        Some(values::<i32>(&plain)?.iter().map(|&i| i as u32).collect())
    }
}

/// A tensor's values cast to `T`, in row-major order.
fn values<T: Datum + Copy>(t: &Tensor) -> Option<Vec<T>> {
    let c = t.cast_to::<T>().ok()?;
    Some(c.to_plain_array_view::<T>().ok()?.iter().copied().collect())
}

/// Host bytes of a tensor for a GPU buffer (quantized types as their raw bytes).
fn host_bytes(t: &Tensor) -> Vec<u8> {
    let mut b = t.as_bytes().to_vec();
    b.resize(b.len().div_ceil(4).max(1) * 4, 0);
    b
}

impl Plan {
    /// Partitions `model` (decluttered, concrete shapes) and builds every GPU resource a run needs.
    pub(crate) fn build(ctx: Arc<Ctx>, model: TypedModel) -> Result<Plan> {
        ctx.alive()?;
        let order = model.eval_order().map_err(backend_err)?;
        let inputs = model.input_outlets().map_err(backend_err)?.to_vec();
        let outputs = model.output_outlets().map_err(backend_err)?.to_vec();
        let mut b = Builder {
            ctx: &ctx,
            gpu: HashMap::new(),
            host: std::collections::HashSet::new(),
            steps: Vec::new(),
            partition: Partition::default(),
            pending_downloads: Vec::new(),
        };
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let built = b.walk(&model, &order, &outputs);
        let oom = pollster::block_on(scope.pop());
        if let Some(e) = oom {
            return Err(GpuError::OutOfMemory(e.to_string()).into());
        }
        built?;
        let Builder {
            gpu,
            steps,
            partition,
            ..
        } = b;
        tracing::info!(
            gpu_nodes = partition.gpu_nodes,
            cpu_nodes = partition.cpu_nodes,
            uploads = partition.uploads,
            downloads = partition.downloads,
            "GPU plan built"
        );
        Ok(Plan {
            ctx,
            model,
            steps,
            inputs,
            outputs,
            gpu,
            partition,
        })
    }

    /// Runs the plan on tract tensors in the model's input order.
    pub(crate) fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>> {
        self.ctx.alive()?;
        let ctx = &self.ctx;
        let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = self.run_steps(inputs);
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        ctx.alive()?;
        if let Some(e) = oom {
            return Err(GpuError::OutOfMemory(e.to_string()).into());
        }
        if let Some(e) = validation {
            return Err(GpuError::Validation(e.to_string()).into());
        }
        result
    }

    fn run_steps(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>> {
        let ctx = &self.ctx;
        let mut host: HashMap<OutletId, TValue> = HashMap::new();
        for (o, v) in self.inputs.iter().zip(inputs) {
            host.insert(*o, v);
        }
        let new_encoder = || {
            ctx.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("fedge.run"),
                })
        };
        let mut encoder: Option<wgpu::CommandEncoder> = None;
        for step in &self.steps {
            match step {
                Step::Upload(o) => {
                    let v = host
                        .get(o)
                        .ok_or_else(|| RuntimeError::Backend(format!("no host value for {o:?}")))?;
                    let g = &self.gpu[o];
                    ctx.queue.write_buffer(&g.buf, 0, &host_bytes(v));
                }
                Step::Params(w) => {
                    let v = host.get(&w.outlet).ok_or_else(|| {
                        RuntimeError::Backend(format!("no host value for {:?}", w.outlet))
                    })?;
                    let words = param_words(v, w.as_f32).ok_or_else(|| {
                        RuntimeError::Backend("quantization parameter of an unexpected type".into())
                    })?;
                    ctx.queue
                        .write_buffer(&w.buf, w.at * 4, bytemuck::cast_slice(&words));
                }
                Step::Gpu { node, dispatches } => {
                    let enc = encoder.get_or_insert_with(new_encoder);
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(&self.model.nodes()[*node].name),
                        timestamp_writes: None,
                    });
                    for d in dispatches {
                        pass.set_pipeline(&d.pipeline);
                        pass.set_bind_group(0, &d.bind_group, &[]);
                        pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
                    }
                }
                Step::Download(list) => {
                    let mut enc = encoder.take().unwrap_or_else(new_encoder);
                    for (o, staging) in list {
                        let g = &self.gpu[o];
                        enc.copy_buffer_to_buffer(&g.buf, 0, staging, 0, staging.size());
                    }
                    ctx.queue.submit([enc.finish()]);
                    ctx.counters.submissions.fetch_add(1, Ordering::Relaxed);
                    for (o, t) in self.read(list)? {
                        host.insert(o, t.into_tvalue());
                    }
                }
                Step::CpuPlan { node, plan, fed } => {
                    let args: TVec<TValue> = fed
                        .iter()
                        .map(|i| host.get(i).cloned())
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            RuntimeError::Backend(format!("node {node} is missing an input"))
                        })?;
                    let out = plan.run(args).map_err(|e| {
                        RuntimeError::Backend(format!("{}: {e:#}", self.model.nodes()[*node].name))
                    })?;
                    for (k, v) in out.into_iter().enumerate() {
                        host.insert(OutletId::new(*node, k), v);
                    }
                }
                Step::Cpu(id) => {
                    let node = &self.model.nodes()[*id];
                    let args: TVec<TValue> = node
                        .inputs
                        .iter()
                        .map(|i| {
                            host.get(i)
                                .cloned()
                                .or_else(|| konst(&self.model, *i).map(|t| t.into_tvalue()))
                        })
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            RuntimeError::Backend(format!("node {} is missing an input", node.name))
                        })?;
                    let out = node
                        .op
                        .eval(&EvalContext::out_of_plan(), args)
                        .map_err(|e| RuntimeError::Backend(format!("{}: {e:#}", node.name)))?;
                    for (k, v) in out.into_iter().enumerate() {
                        host.insert(OutletId::new(*id, k), v);
                    }
                }
            }
        }
        if let Some(enc) = encoder.take() {
            // Dispatches whose results nobody reads back (none in a well-formed plan).
            ctx.queue.submit([enc.finish()]);
        }
        self.outputs
            .iter()
            .map(|o| {
                host.get(o)
                    .cloned()
                    .or_else(|| konst(&self.model, *o).map(|t| t.into_tvalue()))
                    .ok_or_else(|| RuntimeError::Backend(format!("output {o:?} was not computed")))
            })
            .collect()
    }

    /// Maps the staging buffers of one readback (one wait) and turns their bytes into tensors.
    fn read(&self, list: &[(OutletId, Arc<wgpu::Buffer>)]) -> Result<Vec<(OutletId, Tensor)>> {
        let ctx = &self.ctx;
        let (tx, rx) = std::sync::mpsc::channel();
        for (k, (_, staging)) in list.iter().enumerate() {
            let tx = tx.clone();
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send((k, r));
            });
        }
        drop(tx);
        ctx.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(std::time::Duration::from_secs(600)),
            })
            .map_err(|e| GpuError::Timeout(e.to_string()))?;
        ctx.alive()?;
        for _ in list {
            let (_, r) = rx
                .recv()
                .map_err(|_| GpuError::Readback("a map callback never ran".into()))?;
            r.map_err(|e| GpuError::Readback(e.to_string()))?;
        }
        ctx.counters.readbacks.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(list.len());
        for (o, staging) in list {
            let g = &self.gpu[o];
            let mut t = Tensor::zero_dt(g.dt, &g.shape).map_err(backend_err)?;
            {
                let view = staging
                    .get_mapped_range(..)
                    .map_err(|e| GpuError::Readback(e.to_string()))?;
                let dst = t.as_bytes_mut();
                let n = dst.len();
                dst.copy_from_slice(&view[..n]);
            }
            staging.unmap();
            out.push((*o, t));
        }
        Ok(out)
    }
}

/// How the CPU runs `node`: tract's out-of-plan evaluation, or a one-node plan for ops that only
/// run inside one.
fn cpu_step(model: &TypedModel, node: &TypedNode) -> Result<Step> {
    let op: &dyn TypedOp = node.op.as_ref();
    let in_plan_only = op
        .downcast_ref::<tract_onnx::tract_core::ops::scan::Scan>()
        .is_some()
        || matches!(op.state(&EvalContext::out_of_plan()), Ok(Some(_)));
    if !in_plan_only {
        return Ok(Step::Cpu(node.id));
    }
    let mut sub = TypedModel::default();
    let mut fed = Vec::new();
    let mut wires = TVec::new();
    for (k, &i) in node.inputs.iter().enumerate() {
        let f = model.outlet_fact(i).map_err(backend_err)?;
        let w = match &f.konst {
            Some(c) => sub.add_const(format!("c{k}"), c.clone()),
            None => {
                fed.push(i);
                sub.add_source(format!("i{k}"), f.without_value())
            }
        }
        .map_err(backend_err)?;
        wires.push(w);
    }
    let outs = sub
        .wire_node(&node.name, node.op.clone(), &wires)
        .map_err(backend_err)?;
    sub.select_output_outlets(&outs).map_err(backend_err)?;
    let plan = sub
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| RuntimeError::Backend(format!("{}: {e:#}", node.name)))?;
    Ok(Step::CpuPlan {
        node: node.id,
        plan,
        fed,
    })
}

struct Builder<'a> {
    ctx: &'a Ctx,
    gpu: HashMap<OutletId, GpuValue>,
    host: std::collections::HashSet<OutletId>,
    steps: Vec<Step>,
    partition: Partition,
    pending_downloads: Vec<(OutletId, Arc<wgpu::Buffer>)>,
}

impl Builder<'_> {
    fn buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<Arc<wgpu::Buffer>> {
        let size = size.div_ceil(4).max(1) * 4;
        let limits = &self.ctx.limits;
        let max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if size > max {
            return Err(GpuError::Limit {
                what: format!("buffer `{label}`"),
                needed: size,
                max,
            }
            .into());
        }
        self.ctx.counters.buffers.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(self.ctx.device.create_buffer(
            &wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            },
        )))
    }

    fn storage(&self, label: &str, size: u64) -> Result<Arc<wgpu::Buffer>> {
        self.buffer(
            label,
            size,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        )
    }

    fn with_data(&self, label: &str, bytes: &[u8]) -> Result<Arc<wgpu::Buffer>> {
        let buf = self.storage(label, bytes.len() as u64)?;
        let mut padded = bytes.to_vec();
        padded.resize(buf.size() as usize, 0);
        self.ctx.queue.write_buffer(&buf, 0, &padded);
        Ok(buf)
    }

    /// Makes `o` available on the GPU: constants uploaded once now, host values per run.
    fn need_gpu(&mut self, model: &TypedModel, o: OutletId) -> Result<GpuValue> {
        if let Some(g) = self.gpu.get(&o) {
            return Ok(g.clone());
        }
        self.flush_downloads();
        let (dt, shape) = fact(model, o)
            .ok_or_else(|| RuntimeError::Backend(format!("{o:?} has no concrete shape")))?;
        let label = format!("fedge.value.{}", model.nodes()[o.node].name);
        let g = if let Some(k) = konst(model, o) {
            GpuValue {
                buf: self.with_data(&label, &host_bytes(&k))?,
                dt,
                shape,
            }
        } else {
            let size = shape.iter().product::<usize>() as u64 * elem_size(dt).unwrap_or(4);
            let buf = self.storage(&label, size)?;
            self.steps.push(Step::Upload(o));
            self.partition.uploads += 1;
            GpuValue { buf, dt, shape }
        };
        self.gpu.insert(o, g.clone());
        Ok(g)
    }

    /// Makes `o` available on the host: a readback, batched with the ones right after it.
    fn need_host(&mut self, model: &TypedModel, o: OutletId) -> Result<()> {
        if self.host.contains(&o) || konst(model, o).is_some() {
            return Ok(());
        }
        let Some(g) = self.gpu.get(&o).cloned() else {
            return Err(RuntimeError::Backend(format!("{o:?} is computed nowhere")));
        };
        let staging = self.buffer(
            &format!("fedge.readback.{}", model.nodes()[o.node].name),
            g.buf.size(),
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        self.pending_downloads.push((o, staging));
        self.partition.downloads += 1;
        self.host.insert(o);
        Ok(())
    }

    fn flush_downloads(&mut self) {
        if !self.pending_downloads.is_empty() {
            self.steps
                .push(Step::Download(std::mem::take(&mut self.pending_downloads)));
        }
    }

    fn walk(&mut self, model: &TypedModel, order: &[usize], outputs: &[OutletId]) -> Result<()> {
        for &id in order {
            let node = &model.nodes()[id];
            let op: &dyn TypedOp = node.op.as_ref();
            if op.downcast_ref::<TypedSource>().is_some() {
                self.host.insert(OutletId::new(id, 0));
                continue;
            }
            if node.inputs.is_empty() && konst(model, OutletId::new(id, 0)).is_some() {
                continue;
            }
            let out = OutletId::new(id, 0);
            // Views: same buffer, new shape.
            if let Some(AxisOp::Add(_) | AxisOp::Rm(_) | AxisOp::Reshape(..)) =
                op.downcast_ref::<AxisOp>()
                && let Some(src) = self.gpu.get(&node.inputs[0]).cloned()
                && !self.host.contains(&node.inputs[0])
                && let Some((dt, shape)) = fact(model, out)
            {
                self.gpu.insert(
                    out,
                    GpuValue {
                        buf: src.buf,
                        dt,
                        shape,
                    },
                );
                *self.partition.gpu_ops.entry("view".into()).or_default() += 1;
                continue;
            }
            let jobs = jobs_for(model, node);
            let heavy = is_heavy(op);
            self.partition.heavy += heavy as usize;
            let name = op.name().to_string();
            match jobs {
                Some(jobs) => {
                    self.gpu_node(model, node, jobs)?;
                    self.partition.gpu_nodes += 1;
                    self.partition.heavy_on_gpu += heavy as usize;
                    *self.partition.gpu_ops.entry(name).or_default() += 1;
                }
                None => {
                    for &i in &node.inputs {
                        self.need_host(model, i)?;
                    }
                    self.flush_downloads();
                    self.steps.push(cpu_step(model, node)?);
                    for k in 0..node.outputs.len() {
                        self.host.insert(OutletId::new(id, k));
                    }
                    self.partition.cpu_nodes += 1;
                    *self.partition.cpu_ops.entry(name).or_default() += 1;
                }
            }
        }
        for &o in outputs {
            self.need_host(model, o)?;
        }
        self.flush_downloads();
        Ok(())
    }

    fn gpu_node(&mut self, model: &TypedModel, node: &TypedNode, jobs: Vec<Job>) -> Result<()> {
        let out = OutletId::new(node.id, 0);
        let (dt, shape) = fact(model, out)
            .ok_or_else(|| RuntimeError::Backend(format!("{} has no concrete shape", node.name)))?;
        let size = shape.iter().product::<usize>() as u64 * elem_size(dt).unwrap_or(4);
        let out_buf = self.storage(&format!("fedge.value.{}", node.name), size)?;
        let mut scratch: Vec<Arc<wgpu::Buffer>> = Vec::new();
        let mut dispatches = Vec::new();
        let mut writes = Vec::new();
        for (j, job) in jobs.into_iter().enumerate() {
            let (pipeline, layout) = self.ctx.pipeline(job.kernel)?;
            let params = self.with_data(
                &format!("fedge.params.{}.{j}", node.name),
                bytemuck::cast_slice(&job.params),
            )?;
            for (o, at, as_f32) in &job.host_params {
                self.need_host(model, *o)?;
                writes.push(ParamWrite {
                    outlet: *o,
                    buf: params.clone(),
                    at: *at as u64,
                    as_f32: *as_f32,
                });
            }
            let mut operands = Vec::new();
            for op in job.operands {
                operands.push(match op {
                    Operand::Outlet(o) => self.need_gpu(model, o)?.buf,
                    Operand::Const(bytes) => {
                        self.with_data(&format!("fedge.const.{}.{j}", node.name), &bytes)?
                    }
                    Operand::Scratch(k) => scratch
                        .get(k)
                        .cloned()
                        .ok_or_else(|| RuntimeError::Backend("bad scratch reference".into()))?,
                });
            }
            let target = match job.output {
                Out::Node => out_buf.clone(),
                Out::Scratch(bytes) => {
                    let b = self.storage(&format!("fedge.scratch.{}.{j}", node.name), bytes)?;
                    scratch.push(b.clone());
                    b
                }
            };
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            }];
            for (k, b) in operands.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: 1 + k as u32,
                    resource: b.as_entire_binding(),
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: 1 + operands.len() as u32,
                resource: target.as_entire_binding(),
            });
            let bind_group = self
                .ctx
                .device
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&format!("fedge.bind.{}.{j}", node.name)),
                    layout: &layout.0,
                    entries: &entries,
                });
            self.ctx
                .counters
                .bind_groups
                .fetch_add(1, Ordering::Relaxed);
            let groups = match job.threads {
                Groups::Threads(t) => kernels::groups_1d(t).ok_or_else(|| GpuError::Limit {
                    what: format!("threads of `{}`", node.name),
                    needed: t,
                    max: kernels::MAX_GROUPS * kernels::MAX_GROUPS * kernels::WG,
                })?,
                Groups::Explicit(x, y, z) => (x, y, z),
            };
            dispatches.push(Dispatch {
                pipeline,
                bind_group,
                groups,
            });
        }
        // Host-side parameters must be read back before this node; then written per run.
        self.flush_downloads();
        for w in writes {
            self.steps.push(Step::Params(w));
        }
        self.steps.push(Step::Gpu {
            node: node.id,
            dispatches,
        });
        self.gpu.insert(
            out,
            GpuValue {
                buf: out_buf,
                dt,
                shape,
            },
        );
        Ok(())
    }
}
