//! Tagged boxes behind the opaque handles, so a handle of the wrong type is an error code.

use crate::error::{Fail, fail, fedge_result::FEDGE_ERR_BAD_HANDLE, fedge_result::FEDGE_ERR_NULL};

/// A value with a type tag in front.
#[repr(C)]
pub(crate) struct Tagged<T> {
    tag: u64,
    pub value: T,
}

pub(crate) trait Tag {
    const TAG: u64;
    const NAME: &'static str;
}

impl<T: Tag> Tagged<T> {
    pub fn into_raw(value: T) -> *mut Tagged<T> {
        Box::into_raw(Box::new(Tagged { tag: T::TAG, value }))
    }

    /// Borrows the value behind a handle after checking NULL and the tag.
    pub unsafe fn get<'a>(p: *const Tagged<T>) -> Result<&'a T, Fail> {
        if p.is_null() {
            return fail(FEDGE_ERR_NULL, format!("{} handle is NULL", T::NAME));
        }
        // SAFETY: non-NULL; the caller promises a pointer from a fedge function. The tag is the
        // first field of every handle, so reading it is valid for any of them.
        let tag = unsafe { std::ptr::addr_of!((*p).tag).read() };
        if tag != T::TAG {
            return fail(
                FEDGE_ERR_BAD_HANDLE,
                format!("not a {} handle (or already freed)", T::NAME),
            );
        }
        // SAFETY: tag checked.
        Ok(unsafe { &(*p).value })
    }

    /// Frees a handle (NULL is a no-op; a wrong tag is left alone).
    pub unsafe fn free(p: *mut Tagged<T>) {
        // SAFETY: as in `get`.
        if p.is_null() || unsafe { std::ptr::addr_of!((*p).tag).read() } != T::TAG {
            return;
        }
        // SAFETY: allocated by `into_raw`; the tag is cleared so a later use is detected while the
        // allocator has not reused the memory.
        unsafe {
            (*p).tag = 0;
            drop(Box::from_raw(p));
        }
    }
}
