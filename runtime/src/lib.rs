//! fedge-runtime: run float32 and int8 ONNX models on edge devices.
//!
//! tract parses, types and optimises; fedge's import pipeline runs first and makes real
//! exports load and run right (symbolic dimensions, constant `If`s, onnxruntime's quantized
//! formats). Backends sit behind one trait and are picked by name (`cpu`, `gpu`, `gpu-or-cpu`).
//!
//! Layout:
//! - [`Model`] / [`Graph`] (`model`): load, inspect, validate and run;
//! - [`ModelOptions`] (`options`): threads, backend, shapes, constant inputs;
//! - [`Backend`], [`Registry`] (`backend`) and the tract CPU backend (`cpu`);
//! - `gpu` (feature `gpu`): the wgpu backend with per-node CPU fallback;
//! - [`Tensor`] (`tensor`) and [`npy`]: host tensors and numpy files;
//! - [`manifest`]: a model's `manifest.toml` (source, licence, shapes, tolerances, references);
//! - [`train`]: on-device training of a model's head (the federated-learning state), its data
//!   and its export back to ONNX;
//! - `import`: the protobuf-level rewrites.
//!
//! ```no_run
//! use fedge_runtime::{Model, ModelOptions, Tensor};
//! let model = Model::load("models/zoo/ppocr_cls/model.onnx", &ModelOptions::default().threads(2))?;
//! let input = Tensor::new(&[1, 3, 48, 192], &vec![0.5f32; 3 * 48 * 192])?;
//! let outputs = model.run(&[input])?;
//! println!("{:?}", outputs[0].as_f32());
//! # Ok::<(), fedge_runtime::RuntimeError>(())
//! ```

mod backend;
mod conv;
mod cpu;
mod dwconv;
mod error;
#[cfg(feature = "gpu")]
pub mod gpu;
mod import;
mod lowp;
pub mod manifest;
mod model;
pub mod npy;
mod options;
mod qconv;
mod tensor;
#[cfg(test)]
mod testutil;
mod tract_ops;
pub mod train;

pub use backend::{Backend, Executable, NodeTime, Placement, Registry};
pub use error::{GpuError, Result, RuntimeError};
pub use model::{Dim, Graph, Model, QuantFormat, TensorInfo};
pub use options::ModelOptions;
pub use tensor::{DType, Element, Tensor};

/// Decodes an ONNX `TensorProto` (as stored in the ONNX test data `.pb` files). Narrow types
/// come widened, as fedge runs them: 4- and 2-bit integers as `i8`/`u8`, 8-bit and 4-bit floats
/// (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ, E2M1) as the `f32` values they encode.
///
/// # Errors
/// [`RuntimeError::NotOnnx`] when the bytes are not a tensor, [`RuntimeError::UnsupportedDtype`]
/// for element types fedge has no host type for (strings, complex).
pub fn decode_tensor_proto(bytes: &[u8]) -> Result<Tensor> {
    use prost::Message;
    let pb = tract_onnx::pb::TensorProto::decode(bytes)
        .map_err(|e| RuntimeError::NotOnnx(format!("tensor protobuf: {e}")))?;
    let t = import::graph::load(&pb)
        .ok_or_else(|| RuntimeError::NotOnnx("unreadable tensor".into()))?;
    cpu::from_tract(&t)
}
