//! The nested-memory pool: a bitmap of 2 MiB extents.
//!
//! L0 gives L1 a sparse pool of guest-physical memory; L1 carves nested
//! guests' RAM out of it and maps it into them. A static bitmap (no heap)
//! sized for the largest pool keeps allocation simple and first fit.
//!
//! The aging injector ([`Pool::leak_pages`]) loses 4 KiB pages of the pool
//! on purpose: it takes whole extents out of the bitmap (from the top, so
//! allocations keep first fit at the bottom) and hands their pages to
//! nobody, one page at a time, so free memory falls smoothly.

use vmbeam_abi::handover::MAX_GUEST_RANGES;
use vmbeam_abi::layout::{EXTENT_SIZE, MAX_POOL};

/// Most extents of a pool.
const MAX_EXTENTS: usize = (MAX_POOL / EXTENT_SIZE) as usize;
/// Bitmap words.
const WORDS: usize = MAX_EXTENTS.div_ceil(64);
/// Bytes of a page the aging injector leaks.
pub const PAGE_SIZE: u64 = 4096;
/// Pages per extent.
const PAGES_PER_EXTENT: u64 = EXTENT_SIZE / PAGE_SIZE;

/// One piece of a nested guest's memory: L1 GPA `l1_gpa` seen at nested
/// GPA `l2_gpa`, `len` bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    /// Where L1 sees the memory (identity-mapped).
    pub l1_gpa: u64,
    /// Where the nested guest sees it.
    pub l2_gpa: u64,
    /// Length in bytes (extent multiple).
    pub len: u64,
}

/// Ranges of one allocation.
pub type Ranges = [Range; MAX_GUEST_RANGES];

/// Extent bitmap over `[base, base + extents * EXTENT_SIZE)`.
pub struct Pool {
    base: u64,
    extents: usize,
    used: usize,
    bits: [u64; WORDS],
    /// Pages not yet leaked of the extent the injector is eating (counted as free).
    leak_left: u64,
    /// Pages leaked so far.
    leaked: u64,
}

impl Pool {
    /// A pool over `[base, base + size)` (clamped to the bitmap's capacity).
    pub fn new(base: u64, size: u64) -> Self {
        Pool {
            base,
            extents: ((size / EXTENT_SIZE) as usize).min(MAX_EXTENTS),
            used: 0,
            bits: [0; WORDS],
            leak_left: 0,
            leaked: 0,
        }
    }

    /// Bytes not allocated (and not leaked).
    pub fn free_bytes(&self) -> u64 {
        (self.extents - self.used) as u64 * EXTENT_SIZE + self.leak_left * PAGE_SIZE
    }

    /// Bytes allocated or leaked.
    pub fn used_bytes(&self) -> u64 {
        self.used as u64 * EXTENT_SIZE - self.leak_left * PAGE_SIZE
    }

    /// Bytes lost to [`Pool::leak_pages`].
    pub fn leaked_bytes(&self) -> u64 {
        self.leaked * PAGE_SIZE
    }

    /// Aging injector: loses `pages` 4 KiB pages of free pool for good.
    /// Stops when the pool is exhausted; returns the pages actually lost.
    pub fn leak_pages(&mut self, mut pages: u64) -> u64 {
        let mut lost = 0;
        while pages > 0 {
            if self.leak_left == 0 {
                // Take the highest free extent out of the bitmap.
                let Some(e) = (0..self.extents).rev().find(|&e| !self.is_used(e)) else {
                    break;
                };
                self.mark(e, 1, true);
                self.used += 1;
                self.leak_left = PAGES_PER_EXTENT;
            }
            let take = pages.min(self.leak_left);
            self.leak_left -= take;
            pages -= take;
            lost += take;
        }
        self.leaked += lost;
        lost
    }

    fn is_used(&self, e: usize) -> bool {
        self.bits[e / 64] & (1 << (e % 64)) != 0
    }

    /// Next free extent at or after `e` (skipping full words), or `extents`.
    fn next_free(&self, mut e: usize) -> usize {
        while e < self.extents {
            if e.is_multiple_of(64) && self.bits[e / 64] == u64::MAX {
                e += 64;
            } else if self.is_used(e) {
                e += 1;
            } else {
                return e;
            }
        }
        self.extents
    }

    /// Length of the free run starting at free extent `e`, at most `max`.
    fn run(&self, e: usize, max: usize) -> usize {
        let mut n = 0;
        while n < max && e + n < self.extents && !self.is_used(e + n) {
            n += 1;
        }
        n
    }

    fn mark(&mut self, e: usize, n: usize, used: bool) {
        for k in e..e + n {
            if used {
                self.bits[k / 64] |= 1 << (k % 64);
            } else {
                self.bits[k / 64] &= !(1 << (k % 64));
            }
        }
    }

    /// Allocates `bytes` (rounded up to extents) into `out`, nested
    /// addresses consecutive from 0: one contiguous run if any fits (first
    /// fit), else the first free runs. Returns the range count.
    pub fn alloc(&mut self, bytes: u64, out: &mut Ranges) -> Option<usize> {
        let need = bytes.div_ceil(EXTENT_SIZE) as usize;
        if need == 0 || need > self.extents - self.used {
            return None;
        }
        // Pass 1: first contiguous run; pass 2: first free runs.
        let mut n = 0;
        let mut got = 0;
        let mut e = self.next_free(0);
        while e < self.extents {
            let run = self.run(e, need);
            if run == need {
                out[0] = self.range(e, run, 0);
                n = 1;
                got = need;
                break;
            }
            e = self.next_free(e + run);
        }
        e = self.next_free(0);
        while got < need && n < MAX_GUEST_RANGES && e < self.extents {
            let run = self.run(e, need - got);
            out[n] = self.range(e, run, got as u64 * EXTENT_SIZE);
            n += 1;
            got += run;
            e = self.next_free(e + run);
        }
        if got < need {
            return None;
        }
        for r in &out[..n] {
            self.mark(
                ((r.l1_gpa - self.base) / EXTENT_SIZE) as usize,
                (r.len / EXTENT_SIZE) as usize,
                true,
            );
        }
        self.used += need;
        Some(n)
    }

    fn range(&self, e: usize, n: usize, l2_gpa: u64) -> Range {
        Range {
            l1_gpa: self.base + e as u64 * EXTENT_SIZE,
            l2_gpa,
            len: n as u64 * EXTENT_SIZE,
        }
    }

    /// Returns ranges from `alloc` to the pool (others are ignored).
    pub fn free(&mut self, ranges: &[Range]) {
        for r in ranges {
            if r.l1_gpa < self.base {
                continue;
            }
            let e = ((r.l1_gpa - self.base) / EXTENT_SIZE) as usize;
            let n = (r.len / EXTENT_SIZE) as usize;
            if e + n > self.extents {
                continue;
            }
            for k in e..e + n {
                if self.is_used(k) {
                    self.used -= 1;
                }
            }
            self.mark(e, n, false);
        }
    }
}
