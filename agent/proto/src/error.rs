//! The one error type of the protocol crate.

use core::fmt;

/// Why a message could not be encoded, decoded, verified or accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// The message is larger than the receiver's bound (checked before anything is decoded).
    Oversize { len: usize, max: usize },
    /// Too short to hold an envelope, or trailing bytes after it, or a field that does not decode.
    Malformed,
    /// The envelope speaks another protocol version.
    Version { got: u8 },
    /// An identifier (fleet, device, job, sender) is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]`.
    BadId,
    /// The signature does not verify against the sender's key.
    BadSignature,
    /// A key could not be parsed (PKCS#8 document or 32-byte public key).
    BadKey,
    /// The sequence number is not above the last one seen from this sender.
    Replay { last: u64, seq: u64 },
    /// The envelope carries a different kind than the receiver expected on this topic.
    WrongKind,
    /// The caller's output buffer is too small.
    BufferFull,
    /// A chunk index past the end, or a chunk of the wrong length.
    BadChunk { index: u32 },
    /// A chunk manifest that is inconsistent (count vs size) or above the receiver's bound.
    BadManifest,
    /// Reassembled data does not hash to the manifest's sha256.
    HashMismatch,
    /// Not every chunk has arrived yet.
    Incomplete { missing: u32 },
    /// The system random generator failed (key generation).
    Rng,
    /// A sealed update does not open: altered, bound to another job/round/device, or sealed to
    /// a key the receiver does not hold.
    Decrypt,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oversize { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max}")
            }
            Self::Malformed => f.write_str("malformed message"),
            Self::Version { got } => {
                write!(
                    f,
                    "protocol version {got} is not supported (this build speaks {})",
                    crate::PROTOCOL_VERSION
                )
            }
            Self::BadId => f.write_str("identifier must be 1-64 characters of [A-Za-z0-9._-]"),
            Self::BadSignature => f.write_str("signature does not verify"),
            Self::BadKey => f.write_str("key is not valid"),
            Self::Replay { last, seq } => write!(f, "replayed sequence {seq} (last seen {last})"),
            Self::WrongKind => f.write_str("unexpected message kind"),
            Self::BufferFull => f.write_str("output buffer too small"),
            Self::BadChunk { index } => write!(f, "chunk {index} does not fit the manifest"),
            Self::BadManifest => f.write_str("chunk manifest is inconsistent or too large"),
            Self::HashMismatch => {
                f.write_str("sha256 of the reassembled object does not match its manifest")
            }
            Self::Incomplete { missing } => write!(f, "{missing} chunks still missing"),
            Self::Rng => f.write_str("system random generator failed"),
            Self::Decrypt => f.write_str("sealed update does not decrypt"),
        }
    }
}

impl core::error::Error for ProtoError {}

impl From<postcard::Error> for ProtoError {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::SerializeBufferFull => Self::BufferFull,
            _ => Self::Malformed,
        }
    }
}
