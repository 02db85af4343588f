//! Verification of a batch handover, kept out of every guest's pause.
//!
//! Before the moves start, while the guests still run under the aged guest
//! hypervisor, L0 turns on KVM dirty logging for each guest and hashes each
//! of its pages through the aged side's mapping (the nested VM's slots).
//! After every guest has moved and resumed, it hashes each page again, this
//! time through the *successor's* mapping (its grant regions, a separate
//! `mmap` of the same memfd range), and only then reads the dirty bitmaps:
//! the pages the guest itself wrote at any time in between. Every other
//! page must hash the same on both sides. The two digests (over the clean
//! pages) go into the report as `checksum_before` and `checksum_after`; the
//! number of pages they cover is `verified_pages`. Holes in the memfd
//! (pages never written) are skipped without being touched.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use vmbeam_abi::checksum::{fold, CHECKSUM_INIT};

use crate::host::memory::MemFile;

/// Bytes per hashed page (KVM's dirty-log granularity).
pub const PAGE: u64 = 4096;

/// One contiguous piece of a guest as one side sees it.
pub struct View {
    /// Nested guest-physical address of the piece.
    pub l2_gpa: u64,
    /// Host address of its first byte in this side's mapping.
    pub host: *const u8,
    /// Backing memfd and offset (to skip holes).
    pub file: Arc<MemFile>,
    /// Offset in `file`.
    pub file_offset: u64,
    /// Length.
    pub len: u64,
}

/// Hash of each data page, by nested guest-physical address.
#[derive(Debug, Default, Clone)]
pub struct PageHashes(pub BTreeMap<u64, u64>);

/// Hashes every data page of `views`.
///
/// # Safety
/// Each view's `host..host + len` must be a live mapping for the duration
/// of the call.
pub unsafe fn hash_pages(views: &[View]) -> PageHashes {
    let mut out = BTreeMap::new();
    for v in views {
        for (off, len, data) in v.file.extents(v.file_offset, v.len) {
            if !data {
                continue;
            }
            let rel = off - v.file_offset;
            let mut at = rel - rel % PAGE;
            while at < rel + len && at < v.len {
                let mut h = CHECKSUM_INIT;
                for w in 0..PAGE / 8 {
                    // SAFETY: `at + w * 8` is inside the view (`at < len`,
                    // page-aligned views); the caller keeps it mapped. The
                    // guest may write it concurrently, hence volatile.
                    let x = unsafe {
                        std::ptr::read_volatile(v.host.add((at + w * 8) as usize) as *const u64)
                    };
                    h = fold(h, x);
                }
                out.insert(v.l2_gpa + at, h);
                at += PAGE;
            }
        }
    }
    PageHashes(out)
}

/// Hash of a page of zeros (a hole reads as one).
pub fn zero_page_hash() -> u64 {
    (0..PAGE / 8).fold(CHECKSUM_INIT, |h, _| fold(h, 0))
}

/// Digests of both sides over every page either side has data in, except
/// the `dirty` ones; a page one side has no data in counts as zeros there
/// (a hole, or a page the guest only read, which the memfd then backs with
/// zeros). Returns (before, after, pages compared). Order-independent.
pub fn digests(before: &PageHashes, after: &PageHashes, dirty: &HashSet<u64>) -> (u64, u64, u64) {
    let zero = zero_page_hash();
    let mix = |page: u64, h: u64| fold(fold(CHECKSUM_INIT, page), h);
    let (mut d0, mut d1, mut n) = (0u64, 0u64, 0u64);
    let pages: std::collections::BTreeSet<u64> =
        before.0.keys().chain(after.0.keys()).copied().collect();
    for page in pages {
        if dirty.contains(&page) {
            continue;
        }
        d0 = d0.wrapping_add(mix(page, *before.0.get(&page).unwrap_or(&zero)));
        d1 = d1.wrapping_add(mix(page, *after.0.get(&page).unwrap_or(&zero)));
        n += 1;
    }
    (d0, d1, n)
}

/// The nested addresses of the pages set in `bitmap` (one bit per page of a
/// slot at `l2_gpa`).
pub fn dirty_pages(l2_gpa: u64, bitmap: &[u64], into: &mut HashSet<u64>) {
    for (i, w) in bitmap.iter().enumerate() {
        let mut w = *w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            into.insert(l2_gpa + (i as u64 * 64 + b) * PAGE);
            w &= w - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_are_excluded_and_holes_read_as_zeros() {
        let mut p = PageHashes::default();
        p.0.insert(0, 1);
        p.0.insert(PAGE, 2);
        let mut q = p.clone();
        q.0.insert(PAGE, 3);
        let none = HashSet::new();
        let (a, b, _) = digests(&p, &q, &none);
        assert_ne!(a, b);
        let mut dirty = HashSet::new();
        dirty_pages(0, &[0b10], &mut dirty);
        assert!(dirty.contains(&PAGE));
        let (a, b, n) = digests(&p, &q, &dirty);
        assert_eq!((a == b, n), (true, 1));
        // A page only read since (zeros on one side, a hole on the other).
        q.0.insert(2 * PAGE, zero_page_hash());
        let (a, b, _) = digests(&p, &q, &dirty);
        assert_eq!(a, b);
        q.0.insert(3 * PAGE, 7);
        let (a, b, _) = digests(&p, &q, &dirty);
        assert_ne!(a, b, "a page written without the dirty log must show");
    }
}
