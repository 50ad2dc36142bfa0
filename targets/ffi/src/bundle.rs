//! Verifying a signed model bundle (as `fedge bundle build` writes and the agent installs).

use fedge_proto::envelope::decode;
use fedge_proto::msg::Bundle;
use fedge_proto::{Envelope, Kind, PublicKey};

use crate::error::{bytes, fail, fedge_result, fedge_result::*, guard, out};

/// What a verified bundle holds. `model` points into the caller's bundle buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fedge_bundle_info {
    pub version: u64,
    pub created_unix_s: u64,
    /// NUL-terminated bundle name (at most 64 characters).
    pub name: [u8; 65],
    pub model: *const u8,
    pub model_len: usize,
    pub tolerance: f32,
}

/// Verifies `len` bytes of a bundle against the operator's 32-byte `public_key` (size bound
/// `max_len` checked first) and fills `info_out`. Returns `FEDGE_ERR_BAD_SIGNATURE` for a bundle
/// signed by another key or altered in any byte.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_bundle_verify(
    bundle: *const u8,
    len: usize,
    max_len: usize,
    public_key: *const [u8; 32],
    info_out: *mut fedge_bundle_info,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract.
        let wire = unsafe { bytes(bundle, len, "bundle") }?;
        // SAFETY: caller contract.
        let Some(key) = (unsafe { public_key.as_ref() }) else {
            return fail(FEDGE_ERR_NULL, "public_key is NULL");
        };
        let info = out(info_out, "info_out")?;
        let env = Envelope::open(wire, max_len)?.verify(&PublicKey(*key))?;
        if env.kind != Kind::Bundle {
            return fail(FEDGE_ERR_WRONG_KIND, "not a bundle envelope");
        }
        let b: Bundle<'_> = decode(env.payload)?;
        let mut name = [0u8; 65];
        let n = b.name.len().min(64);
        name[..n].copy_from_slice(&b.name.as_bytes()[..n]);
        *info = fedge_bundle_info {
            version: b.version,
            created_unix_s: b.created_unix_s,
            name,
            model: b.model.as_ptr(),
            model_len: b.model.len(),
            tolerance: b.tolerance,
        };
        Ok(())
    })
}
