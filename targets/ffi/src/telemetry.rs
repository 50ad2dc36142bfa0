//! Telemetry payloads for firmware: a plain C struct to and from the protocol's encoding.

use fedge_proto::envelope::{decode, encode_into};
use fedge_proto::msg::{Latency, Telemetry};

use crate::error::{bytes, fedge_result, guard, out, write_bytes};

/// The counters a device reports (the protocol's `Telemetry` without model and events).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct fedge_telemetry {
    pub uptime_s: u64,
    pub inferences: u64,
    pub infer_errors: u64,
    pub latency_count: u64,
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
    pub rss_bytes: u64,
    pub outbox_bytes: u64,
}

/// Encodes `telemetry` as a `Telemetry` payload into `out` (capacity `cap`; 80 bytes always
/// suffice), to seal with `fedge_envelope_seal(.., FEDGE_KIND_TELEMETRY, ..)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_telemetry_encode(
    telemetry: *const fedge_telemetry,
    out_buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract.
        let Some(t) = (unsafe { telemetry.as_ref() }) else {
            return crate::error::fail(fedge_result::FEDGE_ERR_NULL, "telemetry is NULL");
        };
        let msg = Telemetry {
            uptime_s: t.uptime_s,
            model: None,
            inferences: t.inferences,
            infer_errors: t.infer_errors,
            latency: Latency {
                count: t.latency_count,
                p50_us: t.p50_us,
                p90_us: t.p90_us,
                p99_us: t.p99_us,
                max_us: t.max_us,
            },
            rss_bytes: t.rss_bytes,
            outbox_bytes: t.outbox_bytes,
            rejected: heapless::Vec::new(),
            events: heapless::Vec::new(),
        };
        let mut buf = [0u8; 128];
        let n = encode_into(&msg, &mut buf)?.len();
        // SAFETY: caller contract.
        unsafe { write_bytes(&buf[..n], out_buf, cap, out_len) }
    })
}

/// Decodes a `Telemetry` payload (for example a verified envelope's payload) into `telemetry_out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_telemetry_decode(
    payload: *const u8,
    len: usize,
    telemetry_out: *mut fedge_telemetry,
) -> fedge_result {
    guard(|| {
        // SAFETY: caller contract.
        let p = unsafe { bytes(payload, len, "payload") }?;
        let slot = out(telemetry_out, "telemetry_out")?;
        let t: Telemetry<'_> = decode(p)?;
        *slot = fedge_telemetry {
            uptime_s: t.uptime_s,
            inferences: t.inferences,
            infer_errors: t.infer_errors,
            latency_count: t.latency.count,
            p50_us: t.latency.p50_us,
            p90_us: t.latency.p90_us,
            p99_us: t.latency.p99_us,
            max_us: t.latency.max_us,
            rss_bytes: t.rss_bytes,
            outbox_bytes: t.outbox_bytes,
        };
        Ok(())
    })
}
