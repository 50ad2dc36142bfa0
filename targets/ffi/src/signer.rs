//! `fedge_signer`: an Ed25519 private key (ring) that seals envelopes.

use fedge_proto::Signer;

use crate::error::{Res, bytes, fedge_result, guard, out, write_bytes};
use crate::handle::{Tag, Tagged};

/// A private key (opaque). The key bytes never leave it except through
/// `fedge_signer_generate`'s PKCS#8 output.
#[derive(Debug)]
pub struct fedge_signer {
    pub(crate) signer: Signer,
}

impl Tag for fedge_signer {
    const TAG: u64 = 0x6665_6467_6573_6967; // "fedgesig"
    const NAME: &'static str = "fedge_signer";
}

pub(crate) unsafe fn get<'a>(s: *const fedge_signer) -> Result<&'a Signer, crate::error::Fail> {
    // SAFETY: forwarded.
    unsafe { Tagged::<fedge_signer>::get(s.cast()) }.map(|s| &s.signer)
}

fn store(signer: Signer, slot: &mut *mut fedge_signer) -> Res {
    *slot = Tagged::into_raw(fedge_signer { signer }).cast();
    Ok(())
}

/// Loads a key from its PKCS#8 document (`len` bytes at `pkcs8`, as written to a device key file).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_signer_from_pkcs8(
    pkcs8: *const u8,
    len: usize,
    signer_out: *mut *mut fedge_signer,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract.
        let doc = unsafe { bytes(pkcs8, len, "pkcs8") }?;
        let slot = out(signer_out, "signer_out")?;
        store(Signer::from_pkcs8(doc)?, slot)
    })
}

/// Generates a key from the system random generator. Its PKCS#8 document (at most 128 bytes) is
/// copied to `pkcs8_out` (capacity `cap`) with its length in `pkcs8_len`, for the caller to store
/// with mode 0600; the handle goes to `signer_out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_signer_generate(
    pkcs8_out: *mut u8,
    cap: usize,
    pkcs8_len: *mut usize,
    signer_out: *mut *mut fedge_signer,
) -> fedge_result {
    guard(|| {
        let slot = out(signer_out, "signer_out")?;
        let mut doc = [0u8; 128];
        let n = Signer::generate_pkcs8(&mut doc)?;
        let signer = Signer::from_pkcs8(&doc[..n])?;
        // SAFETY: caller contract.
        unsafe { write_bytes(&doc[..n], pkcs8_out, cap, pkcs8_len) }?;
        store(signer, slot)
    })
}

/// Writes the 32-byte public key.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_signer_public_key(
    signer: *const fedge_signer,
    key_out: *mut [u8; 32],
) -> fedge_result {
    guard(|| {
        // SAFETY: forwarded.
        let s = unsafe { get(signer) }?;
        *out(key_out, "key_out")? = s.public_key().0;
        Ok(())
    })
}

/// Frees a signer. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_signer_free(signer: *mut fedge_signer) {
    // SAFETY: caller contract.
    unsafe { Tagged::<fedge_signer>::free(signer.cast()) }
}
