//! Copy-based migration between host VMs on one host, the baselines that
//! show what zero-copy saves (and what users need where memory cannot be
//! shared).
//!
//! Both modes give the successor *fresh* memory for each nested guest (a new
//! memfd mapped into the successor's grant window, so the successor's side
//! of the protocol is the same as for zero-copy) and move every page across
//! through L0 at host speed:
//! - `copy`: stop-and-copy — everything is copied while the guest is paused
//!   (inside GRANT).
//! - `precopy`: while the guest keeps running under the aged guest
//!   hypervisor, L0 copies all pages, then repeatedly the pages KVM's dirty
//!   log reports, until what is left fits the downtime budget; the rest is
//!   copied during GRANT, with the guest paused.
//!
//! Every byte that is copied is counted in the session's `bytes_copied`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::host::memory::MemFile;
use crate::nesting::nested::{NestedRef, NestedSlot};

/// Errors of copy-based migration.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The operation was cancelled between two rounds.
    #[error("cancelled on request")]
    Cancelled,
    /// A fresh memory file could not be made.
    #[error("cannot allocate fresh memory for {guest}: {source}")]
    Memory {
        /// Guest.
        guest: String,
        /// Cause.
        source: crate::host::memory::MemoryError,
    },
    /// KVM dirty logging failed.
    #[error("dirty logging failed for {guest}: {status:?}")]
    DirtyLog {
        /// Guest.
        guest: String,
        /// L0 status.
        status: vmbeam_abi::hypercall::Status,
    },
}

/// Page size of the dirty log.
pub const PAGE: u64 = 4096;

/// Destination of one nested-memory slot.
pub struct SlotCopy {
    /// Source slot (its mapping is kept alive by the Arc inside).
    pub src: NestedSlot,
    /// Fresh file that receives the pages.
    pub dst: Arc<MemFile>,
    /// Host mapping of `dst`.
    pub dst_map: Arc<vm_memory::MmapRegion>,
}

impl SlotCopy {
    /// Allocates the fresh destination for a slot.
    pub fn new(guest: &str, src: &NestedSlot) -> Result<SlotCopy, CopyError> {
        let err = |source| CopyError::Memory {
            guest: guest.to_string(),
            source,
        };
        let dst = MemFile::new(&format!("{guest}-copy"), src.len).map_err(err)?;
        let r = crate::host::memory::Region::map(
            &dst,
            0,
            src.len,
            0,
            crate::host::memory::RegionKind::Pool,
            0,
        )
        .map_err(err)?;
        Ok(SlotCopy {
            src: src.clone(),
            dst,
            dst_map: r.map,
        })
    }

    /// Copies every page of the slot that holds data (holes stay holes);
    /// returns the bytes copied.
    pub fn copy_all(&self) -> u64 {
        let mut n = 0;
        for (off, len, data) in self.src.file.extents(self.src.file_offset, self.src.len) {
            if data {
                let rel = off - self.src.file_offset;
                self.copy_range(rel, len);
                n += len;
            }
        }
        n
    }

    /// Copies the pages whose bits are set in `bitmap`; returns bytes copied.
    pub fn copy_dirty(&self, bitmap: &[u64]) -> u64 {
        let mut n = 0;
        for page in dirty_page_numbers(bitmap) {
            if page * PAGE < self.src.len {
                self.copy_range(page * PAGE, PAGE);
                n += PAGE;
            }
        }
        n
    }

    fn copy_range(&self, rel: u64, len: u64) {
        debug_assert!(rel + len <= self.src.len);
        // SAFETY: both ranges lie inside live mappings of `src.len` bytes
        // (the source slot's mapping, kept alive by `src.map`, and `dst_map`);
        // they are different files, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.src.hva + rel as usize) as *const u8,
                self.dst_map.as_ptr().add(rel as usize),
                len as usize,
            )
        };
    }
}

/// Pre-copy state of one nested guest.
pub struct GuestCopy {
    /// Guest name.
    pub guest: String,
    /// One entry per slot, in slot order.
    pub slots: Vec<SlotCopy>,
}

/// Page numbers whose bits are set in a KVM dirty bitmap, in order.
pub fn dirty_page_numbers(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &bits)| {
        let mut b = bits;
        std::iter::from_fn(move || {
            (b != 0).then(|| {
                let i = b.trailing_zeros() as u64;
                b &= b - 1;
                w as u64 * 64 + i
            })
        })
    })
}

/// Counts set bits.
pub fn dirty_pages(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| w.count_ones() as u64).sum()
}

/// Outcome of the live phase of pre-copy.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PrecopyStats {
    /// Rounds done while the guests ran (the first copies everything).
    pub rounds: u32,
    /// Pages left dirty when the live phase stopped.
    pub remaining_pages: u64,
    /// Whether the remainder fit the downtime budget (else it stopped at the round limit).
    pub converged: bool,
    /// Bytes copied while the guests ran.
    pub live_bytes: u64,
}

/// Copies the pages of one round's dirty maps (per guest, per slot).
fn copy_rounds(copies: &[(NestedRef, GuestCopy)], maps: &[Vec<Vec<u64>>]) -> u64 {
    let mut n = 0;
    for ((_, gc), per) in copies.iter().zip(maps) {
        for (sc, bm) in gc.slots.iter().zip(per) {
            n += sc.copy_dirty(bm);
        }
    }
    n
}

/// Most live rounds before falling back to stop-and-copy of the remainder.
pub const MAX_ROUNDS: u32 = 30;

/// Runs the live phase of pre-copy for every guest in `vms` (the aged VM's
/// nested VMs) while they keep running. Leaves dirty logging on.
pub fn precopy_live(
    vms: &[NestedRef],
    budget: Duration,
) -> Result<(Vec<GuestCopy>, PrecopyStats), CopyError> {
    precopy_live_with(vms, budget, None)
}

/// [`precopy_live`] reporting each round to `progress` and stopping with
/// [`CopyError::Cancelled`] between rounds once it is cancelled.
pub fn precopy_live_with(
    vms: &[NestedRef],
    budget: Duration,
    progress: Option<&Arc<crate::base::progress::Progress>>,
) -> Result<(Vec<GuestCopy>, PrecopyStats), CopyError> {
    let cancelled = || crate::base::progress::check(progress).map_err(|_| CopyError::Cancelled);
    let mut copies = Vec::new();
    let mut stats = PrecopyStats::default();
    // Round 0: log on, copy everything.
    let t = Instant::now();
    for v in vms {
        let (name, slots) = {
            let mut n = v.lock().unwrap();
            if n.record.is_none() || n.state == crate::nesting::nested::NestedState::Crashed {
                continue;
            }
            n.set_dirty_logging(true)
                .map_err(|status| CopyError::DirtyLog {
                    guest: n.name.clone(),
                    status,
                })?;
            (n.name.clone(), n.slots.clone())
        };
        let mut sc = Vec::new();
        for s in &slots {
            cancelled()?;
            let c = SlotCopy::new(&name, s)?;
            let n = c.copy_all();
            stats.live_bytes += n;
            if let Some(p) = progress {
                p.add_bytes(n);
            }
            sc.push(c);
        }
        copies.push((
            v.clone(),
            GuestCopy {
                guest: name,
                slots: sc,
            },
        ));
    }
    stats.rounds = 1;
    if let Some(p) = progress {
        p.add_round();
    }
    let mut bytes_per_s = stats.live_bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
    loop {
        cancelled()?;
        // Pages dirtied since the last fetch, per guest and slot.
        let mut pending = 0;
        let mut maps = Vec::new();
        for (v, gc) in &copies {
            let n = v.lock().unwrap();
            let mut per = Vec::new();
            for i in 0..gc.slots.len() {
                let bm = n.take_dirty(i).map_err(|status| CopyError::DirtyLog {
                    guest: gc.guest.clone(),
                    status,
                })?;
                pending += dirty_pages(&bm);
                per.push(bm);
            }
            maps.push(per);
        }
        let estimate = Duration::from_secs_f64(pending as f64 * PAGE as f64 / bytes_per_s.max(1.0));
        if let Some(p) = progress {
            p.add_bytes_total(pending * PAGE);
            p.add_round();
        }
        if estimate <= budget || stats.rounds >= MAX_ROUNDS {
            // Those pages are copied now, live; whatever gets dirty after this
            // is copied in the stop-and-copy step.
            let n = copy_rounds(&copies, &maps);
            stats.live_bytes += n;
            if let Some(p) = progress {
                p.add_bytes(n);
            }
            stats.rounds += 1;
            stats.remaining_pages = pending;
            stats.converged = estimate <= budget;
            break;
        }
        let t = Instant::now();
        let n = copy_rounds(&copies, &maps);
        stats.live_bytes += n;
        if let Some(p) = progress {
            p.add_bytes(n);
        }
        stats.rounds += 1;
        if n > 0 {
            bytes_per_s = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
        }
        // Give the guests time to run (and dirty pages) between rounds.
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((copies.into_iter().map(|(_, g)| g).collect(), stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bits_become_page_numbers() {
        let bm = [1u64 | 1 << 63, 1, 0, 1 << 2];
        let pages: Vec<u64> = dirty_page_numbers(&bm).collect();
        assert_eq!(pages, vec![0, 63, 64, 194]);
        assert_eq!(dirty_pages(&bm), pages.len() as u64);
        assert_eq!(dirty_page_numbers(&[]).count(), 0);
    }
}
