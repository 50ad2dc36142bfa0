//! The fedge wire protocol.
//!
//! Everything that crosses MQTT between the operator, the aggregator and the devices is defined
//! here, once: topic names ([`topic`]), message payloads ([`msg`]), the signed envelope that wraps
//! every payload ([`envelope`]), the chunking of large objects ([`chunk`]), replay protection
//! ([`replay`]), device selection ([`msg::Selection`]) and update encryption ([`seal`]).
//!
//! The crate is `no_std` without its `alloc`/`std` features: every type borrows from the received
//! buffer, fixed-size data lives in arrays or [`heapless`] containers, and encoding writes into a
//! caller's slice. The `alloc` feature adds `Vec`-returning helpers and chunk reassembly; `std` adds
//! key generation and `std::error::Error`.
//!
//! Encoding is [postcard](https://docs.rs/postcard) (compact, varint integers); signatures are
//! Ed25519 through [`ring`]. The normative description is `docs/protocol.md`.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod chunk;
pub mod envelope;
pub mod error;
pub mod hex;
pub mod keys;
pub mod msg;
pub mod replay;
pub mod seal;
pub mod topic;

pub use envelope::{Envelope, Kind, Unverified};
pub use error::ProtoError;
pub use keys::{PublicKey, Signer};

/// The protocol version carried in every envelope and in every topic (`fedge/v1/...`).
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of an Ed25519 signature, the fixed trailer of every envelope.
pub const SIGNATURE_LEN: usize = 64;

/// Longest identifier (fleet, device, job, sender) the protocol accepts.
pub const MAX_ID_LEN: usize = 64;

/// Checks an identifier: 1 to [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`, so it is safe as one MQTT
/// topic level (no `/`, `+`, `#`, no empty level) and as a file name (no `..`).
pub fn check_id(id: &str) -> Result<(), ProtoError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(ProtoError::BadId) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("dev-01.a_b").is_ok());
        for bad in ["", ".", "..", "a/b", "a+b", "a#", "é", &"x".repeat(65)] {
            assert_eq!(check_id(bad), Err(ProtoError::BadId), "{bad}");
        }
    }
}
