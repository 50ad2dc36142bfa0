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
