use std::path::PathBuf;

/// Why the agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path}: {source}")]
    Key {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("protocol: {0}")]
    Proto(#[from] fedge_proto::ProtoError),
}

impl AgentError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
