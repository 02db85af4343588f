//! The contract between the vmbeam host VMM (L0) and its guests.
//!
//! L0, the guest hypervisor (L1) and the nested workloads (L2) are built
//! separately (L1 and L2 for `x86_64-unknown-none`), so every structure they
//! exchange through memory lives here, `#[repr(C)]`, versioned, with
//! compile-time layout checks. Nothing in this crate allocates or touches
//! hardware: it is plain data plus the few pure functions (pattern, checksum)
//! that two sides must compute identically.
#![no_std]
#![warn(missing_docs)]

pub mod boot;
pub mod checksum;
pub mod handover;
pub mod hypercall;
pub mod l2;
pub mod layout;
pub mod state;

/// Version of the whole ABI. L0 refuses a guest hypervisor that reports another.
pub const ABI_VERSION: u32 = 4;

/// Copies `src` into a fixed, NUL-padded name field, truncating if needed.
pub fn name_to_bytes(src: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let n = src.len().min(NAME_LEN);
    out[..n].copy_from_slice(&src.as_bytes()[..n]);
    out
}

/// Reads a NUL-padded name field; `None` if it is not UTF-8 or is empty.
pub fn name_from_bytes(src: &[u8; NAME_LEN]) -> Option<&str> {
    let n = src.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if n == 0 {
        return None;
    }
    core::str::from_utf8(&src[..n]).ok()
}

/// Length of every name field (host VM and nested guest names).
pub const NAME_LEN: usize = 16;

/// Views a plain-data value as bytes.
///
/// Only for the `#[repr(C)]` types of this crate, which have no padding
/// holes that matter and no invalid bit patterns.
pub fn as_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` promises a `#[repr(C)]` type made only of integers and
    // arrays of integers, so every byte of it may be read.
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>()) }
}

/// Reads a plain-data value from the start of `bytes` (unaligned); `None` if too short.
pub fn from_bytes<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked above and `T: Pod` accepts any bit
    // pattern; `read_unaligned` has no alignment requirement.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// Marker for `#[repr(C)]` types built only from integers, so any byte
/// pattern is a valid value.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Pod: Copy + 'static {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_truncate() {
        let b = name_to_bytes("l2-0");
        assert_eq!(name_from_bytes(&b), Some("l2-0"));
        let long = name_to_bytes("a-very-long-name-that-is-cut");
        assert_eq!(name_from_bytes(&long), Some("a-very-long-name"));
        assert_eq!(name_from_bytes(&[0u8; NAME_LEN]), None);
        let mut bad = [0u8; NAME_LEN];
        bad[0] = 0xff;
        assert_eq!(name_from_bytes(&bad), None);
    }
}
