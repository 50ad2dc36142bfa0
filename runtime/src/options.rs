use std::collections::BTreeMap;

use crate::tensor::Tensor;

/// How to load a model. `ModelOptions::default()` runs on the CPU, one thread, with fedge's
/// import rewrites on and non-finite float inputs rejected.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Threads for matrix products; 1 runs everything on the caller's thread.
    pub threads: usize,
    /// Backend name: `cpu`, `gpu` or `gpu-or-cpu`.
    pub backend: String,
    /// Concrete shapes for inputs, by input name.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Values for symbolic dimensions (`batch`, `N`, `DynamicDimension.0`, ...).
    pub dims: BTreeMap<String, usize>,
    /// Inputs baked into the graph as constants (they are then not passed to `run`).
    pub constants: BTreeMap<String, Tensor>,
    /// Accept NaN and infinity in float inputs (rejected by default).
    pub allow_non_finite: bool,
    /// fedge's graph rewrites before tract (off only to measure what they change).
    pub rewrites: bool,
    /// Run int8 convolutions and matrix products with onnxruntime's integer results
    /// (QLinearConv, QLinearMatMul; the default): on the CPU backend those with constant
    /// kernels run on tract's float kernels with exact integer accumulation, the rest on
    /// tract's integer kernels. Off, every one runs as float kernels between exact quantize
    /// steps, with the scales applied before the sum: single rounding-step differences can
    /// grow through deep networks (see `docs/runtime.md`).
    pub integer_kernels: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            threads: 1,
            backend: "cpu".into(),
            input_shapes: BTreeMap::new(),
            dims: BTreeMap::new(),
            constants: BTreeMap::new(),
            allow_non_finite: false,
            rewrites: true,
            integer_kernels: true,
        }
    }
}

impl ModelOptions {
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    pub fn backend(mut self, name: impl Into<String>) -> Self {
        self.backend = name.into();
        self
    }

    pub fn input_shape(mut self, name: impl Into<String>, shape: &[usize]) -> Self {
        self.input_shapes.insert(name.into(), shape.to_vec());
        self
    }

    pub fn dim(mut self, symbol: impl Into<String>, value: usize) -> Self {
        self.dims.insert(symbol.into(), value);
        self
    }

    pub fn constant(mut self, input: impl Into<String>, value: Tensor) -> Self {
        self.constants.insert(input.into(), value);
        self
    }

    pub fn allow_non_finite(mut self, allow: bool) -> Self {
        self.allow_non_finite = allow;
        self
    }

    pub fn integer_kernels(mut self, on: bool) -> Self {
        self.integer_kernels = on;
        self
    }

    pub fn rewrites(mut self, on: bool) -> Self {
        self.rewrites = on;
        self
    }
}
