use thiserror::Error;

/// Everything that can go wrong in `fedge-fl`.
///
/// Every variant is a bad input or a refused aggregation; the crate never panics on its inputs.
/// Errors from [`Strategy::accumulate`](crate::Strategy::accumulate),
/// [`Strategy::finish`](crate::Strategy::finish) and
/// [`Strategy::restore`](crate::Strategy::restore) leave the strategy as it was.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum FlError {
    /// `accumulate` or `finish` was called with no round begun.
    #[error("no round is open: call begin first")]
    NoOpenRound,
    /// An update's parameter count differs from the round's global model.
    #[error("update from {client} has {got} parameters, the model has {expected}")]
    ShapeMismatch {
        client: String,
        expected: usize,
        got: usize,
    },
    /// An update holds NaN or ±Inf.
    #[error("update from {client} holds a non-finite value at index {index}")]
    NonFiniteUpdate { client: String, index: usize },
    /// An update's staleness weight is negative, NaN or infinite.
    #[error("update from {client} has an invalid staleness weight {staleness_weight}")]
    InvalidWeight {
        client: String,
        staleness_weight: f32,
    },
    /// The client already contributed to this round.
    #[error("{client} already contributed to this round")]
    DuplicateClient { client: String },
    /// `finish` was called with fewer updates than the strategy's minimum.
    #[error("{got} updates, at least {min} needed")]
    TooFewUpdates { got: usize, min: usize },
    /// Every accepted update has weight zero, so there is no average.
    #[error("the {updates} updates have a total weight of zero")]
    ZeroTotalWeight { updates: usize },
    /// Krum needs `n >= 2f + 3` updates and `m <= n` selected ones.
    #[error(
        "krum with f = {byzantine} and m = {keep} needs at least {needed} updates, got {updates}"
    )]
    TooFewForKrum {
        updates: usize,
        byzantine: usize,
        keep: usize,
        needed: usize,
    },
    /// The aggregate overflowed to a non-finite value.
    #[error("the aggregate is non-finite at index {index}")]
    NonFiniteResult { index: usize },
    /// `begin` was given an empty global model.
    #[error("the global model is empty")]
    EmptyModel,
    /// `begin` was given a global model holding NaN or ±Inf.
    #[error("the global model holds a non-finite value at index {index}")]
    NonFiniteModel { index: usize },
    /// The global model's size differs from the server optimiser state's.
    #[error("the global model has {got} parameters, the server state {expected}")]
    ModelSizeChanged { expected: usize, got: usize },
    /// A strategy or helper option is out of its range.
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },
    /// Two vectors that must have the same length do not.
    #[error("length mismatch: {left} vs {right}")]
    LengthMismatch { left: usize, right: usize },
    /// A value given to a helper or codec is NaN or ±Inf.
    #[error("non-finite value at index {index}")]
    NonFiniteValue { index: usize },
    /// A value is outside what the codec can represent.
    #[error("value {value} at index {index} is out of the codec's range")]
    OutOfRange { index: usize, value: f32 },
    /// Too many values to encode (the header holds a u32 count).
    #[error("{len} values exceed the codec's limit of {max}")]
    TooManyValues { len: usize, max: usize },
    /// An encoded buffer is shorter than its header says.
    #[error("encoded update truncated: {expected} bytes expected, {got} present")]
    Truncated { expected: u64, got: usize },
    /// An encoded buffer is longer than its header says.
    #[error("encoded update oversized: {expected} bytes expected, {got} present")]
    TrailingBytes { expected: u64, got: usize },
    /// The codec id in the header is unknown.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// The header's format version is not one this build reads.
    #[error("unsupported codec format version {0}")]
    UnsupportedVersion(u8),
    /// The header's block size is invalid for its codec.
    #[error("invalid block size {block} for codec id {codec}")]
    InvalidBlockSize { codec: u8, block: u16 },
    /// An int8 block scale is negative, NaN or infinite.
    #[error("int8 block {block} has an invalid scale")]
    InvalidScale { block: usize },
    /// A checkpoint was made by another strategy.
    #[error("checkpoint of {found} given to {expected}")]
    CheckpointMismatch {
        expected: &'static str,
        found: String,
    },
    /// A checkpoint's contents contradict each other.
    #[error("corrupt checkpoint: {reason}")]
    CorruptCheckpoint { reason: &'static str },
}
