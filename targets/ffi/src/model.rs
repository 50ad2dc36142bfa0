//! `fedge_model`: load an ONNX model, describe its inputs, run it with caller buffers.

use std::ffi::c_char;

use fedge_runtime::{DType, Dim, Model, ModelOptions, RuntimeError, Tensor};

use crate::error::{Fail, Res, bytes, c_str, fail, fedge_result, fedge_result::*, guard, out};
use crate::handle::{Tag, Tagged};

/// Most dimensions a tensor can have through the C ABI.
pub const FEDGE_MAX_RANK: usize = 8;

/// Element types (values are stable).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fedge_dtype {
    FEDGE_DTYPE_F32 = 1,
    FEDGE_DTYPE_U8 = 2,
    FEDGE_DTYPE_I8 = 3,
    FEDGE_DTYPE_U16 = 4,
    FEDGE_DTYPE_I16 = 5,
    FEDGE_DTYPE_I32 = 6,
    FEDGE_DTYPE_I64 = 7,
    FEDGE_DTYPE_BOOL = 9,
    FEDGE_DTYPE_F16 = 10,
    FEDGE_DTYPE_F64 = 11,
    FEDGE_DTYPE_U32 = 12,
    FEDGE_DTYPE_U64 = 13,
}

/// The ONNX `TensorProto.DataType` numbering, so C code can use either.
fn to_dtype(code: u32) -> Option<DType> {
    i32::try_from(code).ok().and_then(DType::from_onnx_code)
}

fn from_dtype(d: DType) -> u32 {
    u32::try_from(d.onnx_code()).unwrap_or(0)
}

/// A tensor crossing the boundary. For inputs, `data` points at `byte_len` bytes the caller owns.
/// For outputs, `data` is a caller buffer of capacity `byte_len`; on success `dtype`, `rank`,
/// `shape` and `byte_len` are overwritten with the result's.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fedge_tensor {
    /// A `fedge_dtype` value.
    pub dtype: u32,
    pub rank: u32,
    /// The first `rank` entries are used; -1 means unknown (in `fedge_model_input`).
    pub shape: [i64; FEDGE_MAX_RANK],
    pub data: *mut u8,
    pub byte_len: usize,
}

/// A loaded model (opaque).
#[derive(Debug)]
pub struct fedge_model {
    model: Model,
}

impl Tag for fedge_model {
    const TAG: u64 = 0x6665_6467_656d_6f64; // "fedgemod"
    const NAME: &'static str = "fedge_model";
}

fn model_err(e: RuntimeError) -> Fail {
    let code = match &e {
        RuntimeError::Io { .. } => FEDGE_ERR_IO,
        RuntimeError::InputCount { .. }
        | RuntimeError::InputDtype { .. }
        | RuntimeError::InputShape { .. }
        | RuntimeError::NonFinite { .. }
        | RuntimeError::UnknownInput(_)
        | RuntimeError::TensorSize { .. } => FEDGE_ERR_INPUT,
        RuntimeError::Backend(_) => FEDGE_ERR_RUN,
        _ => FEDGE_ERR_MODEL,
    };
    Fail(code, e.to_string())
}

fn options(threads: u32) -> ModelOptions {
    ModelOptions::default().threads(threads.max(1) as usize)
}

fn finish_load(r: Result<Model, RuntimeError>, model_out: &mut *mut fedge_model) -> Res {
    let model = r.map_err(model_err)?;
    *model_out = Tagged::into_raw(fedge_model { model }).cast();
    Ok(())
}

/// Loads the ONNX model at `path` (NUL-terminated UTF-8) for the CPU with `threads` threads (0 or 1:
/// single-threaded). On success `*model_out` holds a handle to free with `fedge_model_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_load_path(
    path: *const c_char,
    threads: u32,
    model_out: *mut *mut fedge_model,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract (NUL-terminated string).
        let path = unsafe { c_str(path, "path") }?;
        let slot = out(model_out, "model_out")?;
        finish_load(Model::load(path, &options(threads)), slot)
    })
}

/// Loads an ONNX model from `len` bytes at `data` (copied; the buffer may be freed afterwards).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_load_bytes(
    data: *const u8,
    len: usize,
    threads: u32,
    model_out: *mut *mut fedge_model,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract (len readable bytes).
        let bytes = unsafe { bytes(data, len, "data") }?;
        let slot = out(model_out, "model_out")?;
        finish_load(Model::from_bytes(bytes, &options(threads)), slot)
    })
}

/// Frees a model. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_free(model: *mut fedge_model) {
    // SAFETY: caller contract (a handle from fedge_model_load_*, freed once).
    unsafe { Tagged::<fedge_model>::free(model.cast()) }
}

unsafe fn get<'a>(model: *const fedge_model) -> Result<&'a Model, Fail> {
    // SAFETY: forwarded.
    unsafe { Tagged::<fedge_model>::get(model.cast()) }.map(|m| &m.model)
}

/// Writes the number of inputs and outputs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_counts(
    model: *const fedge_model,
    inputs_out: *mut usize,
    outputs_out: *mut usize,
) -> fedge_result {
    guard(|| {
        // SAFETY: forwarded.
        let m = unsafe { get(model) }?;
        let i = out(inputs_out, "inputs_out")?;
        let o = out(outputs_out, "outputs_out")?;
        *i = m.inputs().len();
        *o = m.output_names().len();
        Ok(())
    })
}

/// Describes input `index`: dtype, rank and shape (-1 for a dimension not fixed by the model);
/// `data` is set to NULL and `byte_len` to the size for a fully known shape (else 0). The input's
/// name is copied, NUL-terminated, into `name` (capacity `name_cap`; may be NULL when `name_cap`
/// is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_input(
    model: *const fedge_model,
    index: usize,
    info_out: *mut fedge_tensor,
    name: *mut c_char,
    name_cap: usize,
) -> fedge_result {
    guard(|| {
        // SAFETY: forwarded.
        let m = unsafe { get(model) }?;
        let info = out(info_out, "info_out")?;
        let Some(t) = m.inputs().get(index) else {
            return fail(
                FEDGE_ERR_INVALID_ARGUMENT,
                format!("input {index} of {}", m.inputs().len()),
            );
        };
        if t.shape.len() > FEDGE_MAX_RANK {
            return fail(
                FEDGE_ERR_INVALID_ARGUMENT,
                format!("rank {} above {FEDGE_MAX_RANK}", t.shape.len()),
            );
        }
        if name_cap > 0 && name.is_null() {
            return fail(FEDGE_ERR_NULL, "name is NULL");
        }
        if name_cap > 0 && t.name.len() >= name_cap {
            return fail(
                FEDGE_ERR_BUFFER_TOO_SMALL,
                format!("name needs {} bytes", t.name.len() + 1),
            );
        }
        let mut shape = [0i64; FEDGE_MAX_RANK];
        let mut known = true;
        for (s, d) in shape.iter_mut().zip(&t.shape) {
            *s = match d {
                Dim::Fixed(n) => *n as i64,
                _ => {
                    known = false;
                    -1
                }
            };
        }
        let dtype = t.dtype.map_or(0, from_dtype);
        let elems: i64 = shape[..t.shape.len()].iter().product();
        let size = t.dtype.map_or(0, |d| d.size_of());
        if name_cap > 0 {
            // SAFETY: checked non-NULL and large enough.
            unsafe {
                std::ptr::copy_nonoverlapping(t.name.as_ptr(), name.cast::<u8>(), t.name.len());
                *name.add(t.name.len()) = 0;
            }
        }
        *info = fedge_tensor {
            dtype,
            rank: t.shape.len() as u32,
            shape,
            data: std::ptr::null_mut(),
            byte_len: if known { elems as usize * size } else { 0 },
        };
        Ok(())
    })
}

/// Runs the model. `inputs` holds `n_inputs` tensors in the model's input order; `outputs` holds
/// `n_outputs` (at least the model's output count) caller buffers. Nothing is written to `outputs`
/// unless every output fits its buffer (`FEDGE_ERR_BUFFER_TOO_SMALL` otherwise; the detail names
/// the size needed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_model_run(
    model: *const fedge_model,
    inputs: *const fedge_tensor,
    n_inputs: usize,
    outputs: *mut fedge_tensor,
    n_outputs: usize,
) -> fedge_result {
    guard(|| {
        // SAFETY: forwarded.
        let m = unsafe { get(model) }?;
        if n_inputs > 0 && inputs.is_null() {
            return fail(FEDGE_ERR_NULL, "inputs is NULL");
        }
        if outputs.is_null() {
            return fail(FEDGE_ERR_NULL, "outputs is NULL");
        }
        if n_outputs < m.output_names().len() {
            return fail(
                FEDGE_ERR_INVALID_ARGUMENT,
                format!(
                    "model has {} outputs, {n_outputs} buffers given",
                    m.output_names().len()
                ),
            );
        }
        // SAFETY: checked non-NULL; caller promises n_inputs readable structs.
        let ins = if n_inputs == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(inputs, n_inputs) }
        };
        let mut tensors = Vec::with_capacity(ins.len());
        for (k, t) in ins.iter().enumerate() {
            let dtype = to_dtype(t.dtype).map_or_else(
                || {
                    fail(
                        FEDGE_ERR_INVALID_ARGUMENT,
                        format!("input {k}: dtype {}", t.dtype),
                    )
                },
                Ok,
            )?;
            let rank = t.rank as usize;
            if rank > FEDGE_MAX_RANK {
                return fail(
                    FEDGE_ERR_INVALID_ARGUMENT,
                    format!("input {k}: rank {rank} above {FEDGE_MAX_RANK}"),
                );
            }
            let mut shape = Vec::with_capacity(rank);
            for &d in &t.shape[..rank] {
                let d = usize::try_from(d).or_else(|_| {
                    fail(
                        FEDGE_ERR_INVALID_ARGUMENT,
                        format!("input {k}: negative dimension {d}"),
                    )
                })?;
                shape.push(d);
            }
            let want = shape
                .iter()
                .try_fold(dtype.size_of(), |a, &d| a.checked_mul(d));
            if want != Some(t.byte_len) {
                return fail(
                    FEDGE_ERR_INPUT,
                    format!(
                        "input {k}: byte_len {} does not match shape {shape:?} of {}",
                        t.byte_len,
                        dtype.name()
                    ),
                );
            }
            // SAFETY: caller promises byte_len readable bytes at data.
            let data = unsafe { bytes(t.data, t.byte_len, "input data") }?;
            tensors.push(Tensor::from_le_bytes(dtype, &shape, data.to_vec()).map_err(model_err)?);
        }
        let results = m.run(&tensors).map_err(model_err)?;
        // SAFETY: checked non-NULL; caller promises n_outputs writable structs.
        let outs = unsafe { std::slice::from_raw_parts_mut(outputs, n_outputs) };
        for (k, (r, o)) in results.iter().zip(outs.iter()).enumerate() {
            if r.shape().len() > FEDGE_MAX_RANK {
                return fail(
                    FEDGE_ERR_RUN,
                    format!(
                        "output {k}: rank {} above {FEDGE_MAX_RANK}",
                        r.shape().len()
                    ),
                );
            }
            if o.data.is_null() {
                return fail(FEDGE_ERR_NULL, format!("output {k}: data is NULL"));
            }
            if r.as_bytes().len() > o.byte_len {
                return fail(
                    FEDGE_ERR_BUFFER_TOO_SMALL,
                    format!(
                        "output {k}: needs {} bytes, buffer has {}",
                        r.as_bytes().len(),
                        o.byte_len
                    ),
                );
            }
        }
        for (r, o) in results.iter().zip(outs.iter_mut()) {
            let b = r.as_bytes();
            // SAFETY: checked above: non-NULL and large enough.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), o.data, b.len()) };
            o.dtype = from_dtype(r.dtype());
            o.rank = r.shape().len() as u32;
            o.shape = [0; FEDGE_MAX_RANK];
            for (s, &d) in o.shape.iter_mut().zip(r.shape()) {
                *s = d as i64;
            }
            o.byte_len = b.len();
        }
        Ok(())
    })
}

// The handle is `Send`: tract plans are.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<fedge_model>();
};
