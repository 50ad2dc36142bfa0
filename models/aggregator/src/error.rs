//! Error types at the crate's boundary.

use std::path::PathBuf;

/// A configuration or job specification that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The store failed; the aggregator stops rather than acknowledge what it could not persist.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store: {0}")]
    Db(String),
    #[error("store record {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::Db(e.to_string())
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Why the service could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("aggregator key {0}: {1}")]
    Key(PathBuf, #[source] std::io::Error),
    #[error("broker: {0}")]
    Broker(String),
    #[error("http listener on {0}: {1}")]
    Http(std::net::SocketAddr, #[source] std::io::Error),
    #[error("strategy: {0}")]
    Strategy(String),
    #[error("protocol: {0}")]
    Proto(fedge_proto::ProtoError),
}

impl From<fedge_proto::ProtoError> for AggregatorError {
    fn from(e: fedge_proto::ProtoError) -> Self {
        Self::Proto(e)
    }
}
