//! Sealing and opening signed envelopes (the fedge wire format) into caller buffers.

use std::ffi::c_char;

use fedge_proto::{Envelope, Kind, PublicKey};

use crate::error::{bytes, c_str, fail, fedge_result, fedge_result::*, guard, out};

/// Envelope kinds (values are stable; they follow the protocol's encoding).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fedge_kind {
    FEDGE_KIND_STATUS = 0,
    FEDGE_KIND_TELEMETRY = 1,
    FEDGE_KIND_COMMAND = 2,
    FEDGE_KIND_ROUND_ANNOUNCE = 3,
    FEDGE_KIND_CHUNK = 4,
    FEDGE_KIND_UPDATE = 5,
    FEDGE_KIND_ACK = 6,
    FEDGE_KIND_BUNDLE = 7,
}

const KINDS: [Kind; 8] = [
    Kind::Status,
    Kind::Telemetry,
    Kind::Command,
    Kind::RoundAnnounce,
    Kind::Chunk,
    Kind::Update,
    Kind::Ack,
    Kind::Bundle,
];

pub(crate) fn kind_code(k: Kind) -> u32 {
    KINDS
        .iter()
        .position(|x| *x == k)
        .map_or(u32::MAX, |i| i as u32)
}

/// An opened, verified envelope. `sender` and `payload` point into the caller's wire buffer and
/// live as long as it does.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fedge_envelope_view {
    /// A `fedge_kind` value.
    pub kind: u32,
    pub seq: u64,
    pub round: u64,
    /// The sender id (not NUL-terminated).
    pub sender: *const u8,
    pub sender_len: usize,
    pub payload: *const u8,
    pub payload_len: usize,
}

/// Seals `payload` in an envelope of `kind` from `sender` (NUL-terminated id) with sequence `seq`
/// and round `round`, signed by `signer`, into `out` (capacity `cap`); the wire length goes to
/// `out_len`. The wire size is the payload plus at most 100 bytes.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fedge_envelope_seal(
    signer: *const crate::signer::fedge_signer,
    kind: u32,
    sender: *const c_char,
    seq: u64,
    round: u64,
    payload: *const u8,
    payload_len: usize,
    out_buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> fedge_result {
    guard(|| {
        // SAFETY: forwarded caller contracts.
        let s = unsafe { crate::signer::get(signer) }?;
        let Some(kind) = KINDS.get(kind as usize).copied() else {
            return fail(FEDGE_ERR_INVALID_ARGUMENT, format!("kind {kind}"));
        };
        // SAFETY: caller contract.
        let sender = unsafe { c_str(sender, "sender") }?;
        // SAFETY: caller contract.
        let payload = unsafe { bytes(payload, payload_len, "payload") }?;
        let len_slot = out(out_len, "out_len")?;
        if out_buf.is_null() {
            return fail(FEDGE_ERR_NULL, "out is NULL");
        }
        // Seal into a scratch buffer so the caller's is written only on success.
        let wire = Envelope::new(kind, sender, seq, round, payload).seal(s)?;
        if wire.len() > cap {
            return fail(
                FEDGE_ERR_BUFFER_TOO_SMALL,
                format!("needs {} bytes, buffer has {cap}", wire.len()),
            );
        }
        // SAFETY: checked.
        unsafe { std::ptr::copy_nonoverlapping(wire.as_ptr(), out_buf, wire.len()) };
        *len_slot = wire.len();
        Ok(())
    })
}

/// Opens `len` bytes of wire data: rejects more than `max_len` bytes before decoding, decodes,
/// verifies the signature with the 32-byte `public_key`, and fills `view_out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_envelope_open(
    wire: *const u8,
    len: usize,
    max_len: usize,
    public_key: *const [u8; 32],
    view_out: *mut fedge_envelope_view,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract.
        let wire = unsafe { bytes(wire, len, "wire") }?;
        // SAFETY: caller contract (32 readable bytes).
        let Some(key) = (unsafe { public_key.as_ref() }) else {
            return fail(FEDGE_ERR_NULL, "public_key is NULL");
        };
        let view = out(view_out, "view_out")?;
        let env = Envelope::open(wire, max_len)?.verify(&PublicKey(*key))?;
        *view = fedge_envelope_view {
            kind: kind_code(env.kind),
            seq: env.seq,
            round: env.round,
            sender: env.sender.as_ptr(),
            sender_len: env.sender.len(),
            payload: env.payload.as_ptr(),
            payload_len: env.payload.len(),
        };
        Ok(())
    })
}
