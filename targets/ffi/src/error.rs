//! Result codes, the panic boundary and error text.

use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Result of every fallible function. The numbers are stable; new codes are added inside their
/// block.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fedge_result {
    FEDGE_OK = 0,
    /// A required pointer argument was NULL.
    FEDGE_ERR_NULL = 100,
    /// A caller buffer is too small (the detail says how large it must be).
    FEDGE_ERR_BUFFER_TOO_SMALL = 101,
    /// An argument is out of range (rank, count, dtype, kind...).
    FEDGE_ERR_INVALID_ARGUMENT = 102,
    /// A string argument is not valid UTF-8.
    FEDGE_ERR_UTF8 = 103,
    /// A handle is not of the expected type (or was already freed).
    FEDGE_ERR_BAD_HANDLE = 104,
    /// A file could not be read.
    FEDGE_ERR_IO = 200,
    /// The model could not be loaded (not ONNX, unsupported operators, invalid graph).
    FEDGE_ERR_MODEL = 201,
    /// Inputs do not match the model (count, type, shape, non-finite values).
    FEDGE_ERR_INPUT = 202,
    /// Running the model failed.
    FEDGE_ERR_RUN = 203,
    /// A signature does not verify.
    FEDGE_ERR_BAD_SIGNATURE = 300,
    /// A message is malformed or of another protocol version.
    FEDGE_ERR_MALFORMED = 301,
    /// A message is larger than the caller's bound.
    FEDGE_ERR_OVERSIZE = 302,
    /// A key could not be parsed or generated.
    FEDGE_ERR_KEY = 303,
    /// The message is valid but not of the expected kind.
    FEDGE_ERR_WRONG_KIND = 304,
    /// A Rust panic was caught at the boundary (a bug: please report it).
    FEDGE_ERR_PANIC = 900,
}

use fedge_result::*;

impl fedge_result {
    fn text(self) -> &'static str {
        match self {
            FEDGE_OK => "ok",
            FEDGE_ERR_NULL => "a required pointer argument is NULL",
            FEDGE_ERR_BUFFER_TOO_SMALL => "a caller buffer is too small",
            FEDGE_ERR_INVALID_ARGUMENT => "an argument is out of range",
            FEDGE_ERR_UTF8 => "a string argument is not valid UTF-8",
            FEDGE_ERR_BAD_HANDLE => "the handle is not of the expected type",
            FEDGE_ERR_IO => "a file could not be read",
            FEDGE_ERR_MODEL => "the model could not be loaded",
            FEDGE_ERR_INPUT => "the inputs do not match the model",
            FEDGE_ERR_RUN => "running the model failed",
            FEDGE_ERR_BAD_SIGNATURE => "the signature does not verify",
            FEDGE_ERR_MALFORMED => "the message is malformed",
            FEDGE_ERR_OVERSIZE => "the message exceeds the size limit",
            FEDGE_ERR_KEY => "the key is not valid",
            FEDGE_ERR_WRONG_KIND => "the message is not of the expected kind",
            FEDGE_ERR_PANIC => "internal error (panic caught at the C boundary)",
        }
    }
}

/// A failure: its code and a detail for [`fedge_last_error`].
pub(crate) struct Fail(pub fedge_result, pub String);

pub(crate) type Res = Result<(), Fail>;

pub(crate) fn fail<T>(code: fedge_result, detail: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(code, detail.into()))
}

impl From<fedge_proto::ProtoError> for Fail {
    fn from(e: fedge_proto::ProtoError) -> Self {
        use fedge_proto::ProtoError as E;
        let code = match e {
            E::Oversize { .. } => FEDGE_ERR_OVERSIZE,
            E::BadSignature => FEDGE_ERR_BAD_SIGNATURE,
            E::BadKey | E::Rng => FEDGE_ERR_KEY,
            E::BufferFull => FEDGE_ERR_BUFFER_TOO_SMALL,
            E::BadId => FEDGE_ERR_INVALID_ARGUMENT,
            E::WrongKind => FEDGE_ERR_WRONG_KIND,
            _ => FEDGE_ERR_MALFORMED,
        };
        Fail(code, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` behind the panic boundary, records the failure detail, returns the code.
pub(crate) fn guard(f: impl FnOnce() -> Res) -> fedge_result {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(Fail(FEDGE_ERR_PANIC, msg))
    });
    match r {
        Ok(()) => FEDGE_OK,
        Err(Fail(code, detail)) => {
            LAST_ERROR.with(|e| *e.borrow_mut() = detail);
            code
        }
    }
}

/// Copies `text` and a NUL into `buf` (capacity `cap`), truncating at a UTF-8 boundary; writes the
/// full length (without NUL) to `out_len` when it is not NULL.
unsafe fn copy_text(text: &str, buf: *mut c_char, cap: usize, out_len: *mut usize) -> fedge_result {
    if buf.is_null() {
        return FEDGE_ERR_NULL;
    }
    if cap == 0 {
        return FEDGE_ERR_BUFFER_TOO_SMALL;
    }
    let mut n = text.len().min(cap - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: buf is non-NULL and the caller promises `cap` writable bytes; n + 1 <= cap.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
        if !out_len.is_null() {
            *out_len = text.len();
        }
    }
    FEDGE_OK
}

/// Copies the description of `code` into `buf` (NUL-terminated, truncated to `cap`); the untruncated
/// length goes to `out_len` when it is not NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_result_text(
    code: u32,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> fedge_result {
    let text = ALL
        .iter()
        .find(|c| **c as u32 == code)
        .map_or("unknown result code", |c| c.text());
    // SAFETY: forwarded caller contract.
    unsafe { copy_text(text, buf, cap, out_len) }
}

/// Copies the detail of the last failure on the calling thread into `buf` (NUL-terminated,
/// truncated to `cap`); empty when nothing failed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedge_last_error(
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> fedge_result {
    LAST_ERROR.with(|e| {
        let text = e.borrow();
        // SAFETY: forwarded caller contract.
        unsafe { copy_text(&text, buf, cap, out_len) }
    })
}

const ALL: [fedge_result; 16] = [
    FEDGE_OK,
    FEDGE_ERR_NULL,
    FEDGE_ERR_BUFFER_TOO_SMALL,
    FEDGE_ERR_INVALID_ARGUMENT,
    FEDGE_ERR_UTF8,
    FEDGE_ERR_BAD_HANDLE,
    FEDGE_ERR_IO,
    FEDGE_ERR_MODEL,
    FEDGE_ERR_INPUT,
    FEDGE_ERR_RUN,
    FEDGE_ERR_BAD_SIGNATURE,
    FEDGE_ERR_MALFORMED,
    FEDGE_ERR_OVERSIZE,
    FEDGE_ERR_KEY,
    FEDGE_ERR_WRONG_KIND,
    FEDGE_ERR_PANIC,
];

/// Reads a NUL-terminated UTF-8 string argument.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return fail(FEDGE_ERR_NULL, format!("{what} is NULL"));
    }
    // SAFETY: non-NULL; the caller promises a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_str()
        .or_else(|_| fail(FEDGE_ERR_UTF8, format!("{what} is not UTF-8")))
}

/// Borrows `len` bytes at `p` (NULL allowed only when `len == 0`).
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(FEDGE_ERR_NULL, format!("{what} is NULL"));
    }
    // SAFETY: non-NULL; the caller promises `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Checks an out-pointer.
pub(crate) fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL checked; the caller promises a valid, aligned, writable T.
    unsafe { p.as_mut() }.map_or_else(|| fail(FEDGE_ERR_NULL, format!("{what} is NULL")), Ok)
}

/// Copies `data` into the caller buffer `(buf, cap)` and writes the length, or fails without writing.
pub(crate) unsafe fn write_bytes(
    data: &[u8],
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> Res {
    let len_slot = out(out_len, "out_len")?;
    if buf.is_null() {
        return fail(FEDGE_ERR_NULL, "output buffer is NULL");
    }
    if data.len() > cap {
        return fail(
            FEDGE_ERR_BUFFER_TOO_SMALL,
            format!("needs {} bytes, buffer has {cap}", data.len()),
        );
    }
    // SAFETY: checked non-NULL and large enough.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    *len_slot = data.len();
    Ok(())
}
