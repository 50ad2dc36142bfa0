use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
///
/// Each variant says what the caller can act on; tract's own errors are kept as text in
/// [`RuntimeError::Backend`] with the context chain they carried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the model is empty (0 bytes)")]
    EmptyModel,
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    #[error("the model uses operators no backend implements: {}", .0.join(", "))]
    UnsupportedOps(Vec<String>),
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("the model takes {expected} inputs, {got} were given")]
    InputCount { expected: usize, got: usize },
    #[error("input `{name}`: expected dtype {expected}, got {got}")]
    InputDtype {
        name: String,
        expected: String,
        got: String,
    },
    #[error("input `{name}`: expected shape {expected}, got {got:?}")]
    InputShape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    #[error(
        "input `{name}` has {count} non-finite values (NaN or infinity), first at index {first}"
    )]
    NonFinite {
        name: String,
        count: usize,
        first: usize,
    },
    #[error("unknown input `{0}`")]
    UnknownInput(String),
    #[error("tensor data has {got} elements but shape {shape:?} needs {expected}")]
    TensorSize {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("unsupported tensor dtype {0}")]
    UnsupportedDtype(String),
    #[error("backend `{name}` is not available: {reason}")]
    BackendUnavailable { name: String, reason: String },
    #[error("unknown backend `{0}` (known: cpu, gpu, gpu-or-cpu)")]
    UnknownBackend(String),
    #[error("bad .npy/.npz data: {0}")]
    Npy(String),
    #[error("{0}")]
    Backend(String),
    #[error("gpu: {0}")]
    Gpu(#[from] GpuError),
}

/// What can go wrong on the GPU backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("the GPU device was lost ({0}); prepare the model again")]
    DeviceLost(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("{what} needs {needed} but this adapter allows at most {max}")]
    Limit { what: String, needed: u64, max: u64 },
    #[error("kernel {kernel} does not compile on this adapter: {detail}")]
    Kernel {
        kernel: &'static str,
        detail: String,
    },
    #[error("GPU validation error: {0}")]
    Validation(String),
    #[error("GPU readback failed: {0}")]
    Readback(String),
    #[error("the GPU did not finish in time: {0}")]
    Timeout(String),
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    /// Keeps tract's whole context chain (`a: b: c`) in one line.
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        RuntimeError::Backend(format!("{e:#}"))
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
