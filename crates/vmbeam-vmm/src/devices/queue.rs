//! Walking virtqueue descriptor chains that a driver we do not trust wrote.
//!
//! The rings are read with rust-vmm's `virtio-queue`; this module adds the
//! checks a device needs before it touches a byte: every descriptor lies
//! inside the nested guest's memory, a chain ends with a descriptor that
//! has no NEXT flag (a chain that loops, or that runs off the table, is
//! refused rather than truncated), device-readable descriptors come before
//! device-writable ones, and a chain carries at most a fixed number of
//! bytes. Each violation is an error the device answers with a reset;
//! nothing here panics or reads outside guest memory.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most descriptors a chain may have (also bounded by the queue size).
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;

/// Why a queue or chain was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The driver set a queue size that is zero, not a power of two or
    /// above the device's maximum.
    #[error("queue size {0} is not a power of two between 1 and {1}")]
    BadSize(u16, u16),
    /// The rings are misaligned or outside guest memory.
    #[error("queue rings are misaligned or lie outside guest memory")]
    BadRings,
    /// The queue is used before it is ready.
    #[error("queue is not ready")]
    NotReady,
    /// The avail index moved by more than the queue size.
    #[error("avail ring index moved by more than the queue size")]
    BadAvailIndex,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain does not end: a loop, a NEXT index past the table, or a
    /// descriptor table outside guest memory.
    #[error("descriptor chain does not end (a loop, a bad next index or a table outside memory)")]
    Unterminated,
    /// The chain has more descriptors or bytes than a request may carry.
    #[error(
        "descriptor chain is too long ({0} bytes or more than {MAX_CHAIN_DESCRIPTORS} descriptors)"
    )]
    TooLarge(u64),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    Order,
    /// Writing the used ring failed.
    #[error("used ring write failed")]
    Used,
}

/// One descriptor of a checked chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A checked descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index (what goes into the used ring).
    pub head: u16,
    /// Descriptors in order: readable ones, then writable ones.
    pub segs: Vec<Segment>,
}

impl Chain {
    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| !s.writable)
            .map(|s| s.len as u64)
            .sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.writable)
            .map(|s| s.len as u64)
            .sum()
    }

    /// Copies device-readable bytes `[from, from + out.len())` into `out`.
    pub fn read_at(&self, mem: &GuestMemoryMmap, from: u64, out: &mut [u8]) -> bool {
        copy_segments(
            self.segs.iter().filter(|s| !s.writable),
            from,
            out.len() as u64,
            |a, o, n| mem.read_slice(&mut out[o..o + n], GuestAddress(a)).is_ok(),
        )
    }

    /// Copies `data` into the device-writable bytes starting at `from`.
    pub fn write_at(&self, mem: &GuestMemoryMmap, from: u64, data: &[u8]) -> bool {
        copy_segments(
            self.segs.iter().filter(|s| s.writable),
            from,
            data.len() as u64,
            |a, o, n| mem.write_slice(&data[o..o + n], GuestAddress(a)).is_ok(),
        )
    }
}

/// Calls `f(guest_addr, offset_in_buffer, len)` for each piece of the byte
/// range `[from, from + len)` of the concatenated segments.
fn copy_segments<'a>(
    segs: impl Iterator<Item = &'a Segment>,
    from: u64,
    len: u64,
    mut f: impl FnMut(u64, usize, usize) -> bool,
) -> bool {
    let mut pos = 0u64; // start of the current segment in the stream
    let mut done = 0u64;
    for s in segs {
        if done == len {
            break;
        }
        let seg_end = pos + s.len as u64;
        let want = from + done;
        if want < seg_end {
            let off = want - pos;
            let n = (s.len as u64 - off).min(len - done);
            if !f(s.addr + off, done as usize, n as usize) {
                return false;
            }
            done += n;
        }
        pos = seg_end;
    }
    done == len
}

/// A nested guest's memory as the devices see it: the host mappings of its
/// slots, at their nested addresses.
pub struct DeviceMemory {
    /// The regions, for `virtio-queue`.
    pub mem: GuestMemoryMmap,
    // Keeps the host mappings that `mem` points into alive.
    _keep: Vec<Arc<MmapRegion>>,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("regions", &self._keep.len())
            .finish()
    }
}

/// One slot for [`DeviceMemory::new`]: nested address, host address,
/// length, and the mapping that contains `[hva, hva + len)`.
pub type SlotView = (u64, usize, usize, Arc<MmapRegion>);

impl DeviceMemory {
    /// Builds the view. Fails (None) if the ranges overlap or a host range
    /// is not inside its mapping.
    pub fn new(slots: &[SlotView]) -> Option<DeviceMemory> {
        let mut regions = Vec::new();
        let mut keep = Vec::new();
        let mut sorted: Vec<&SlotView> = slots.iter().collect();
        sorted.sort_by_key(|s| s.0);
        for (gpa, hva, len, map) in sorted {
            let start = map.as_ptr() as usize;
            if *hva < start || hva.checked_add(*len)? > start + map.size() || *len == 0 {
                return None;
            }
            // SAFETY: `[hva, hva + len)` lies inside `map` (checked above),
            // a live shared mapping; `keep` holds `map` for as long as this
            // non-owning region exists, so the pointer stays valid.
            let r = unsafe {
                MmapRegion::build_raw(
                    *hva as *mut u8,
                    *len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .ok()?;
            regions.push(GuestRegionMmap::new(r, GuestAddress(*gpa))?);
            keep.push(map.clone());
        }
        let mem = GuestMemoryMmap::from_regions(regions).ok()?;
        Some(DeviceMemory { mem, _keep: keep })
    }
}

impl DeviceMemory {
    /// Anonymous memory at the given (nested address, length) ranges, for
    /// tests and fuzzing of the device model without a KVM VM.
    pub fn anonymous(ranges: &[(u64, usize)]) -> Option<DeviceMemory> {
        let mut views = Vec::new();
        for &(gpa, len) in ranges {
            let map = Arc::new(MmapRegion::new(len).ok()?);
            views.push((gpa, map.as_ptr() as usize, len, map));
        }
        DeviceMemory::new(&views)
    }

    /// Writes `data` at nested address `gpa`; false if not all of it is
    /// guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        self.mem.write_slice(data, GuestAddress(gpa)).is_ok()
    }

    /// Reads `out.len()` bytes at nested address `gpa`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.mem.read_slice(out, GuestAddress(gpa)).is_ok()
    }
}

/// Checks what the driver programmed before the queue goes live.
pub fn check_queue(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    let size = q.size();
    if size == 0 || !size.is_power_of_two() || size > q.max_size() {
        return Err(QueueError::BadSize(size, q.max_size()));
    }
    if !q.is_valid(mem) {
        return Err(QueueError::BadRings);
    }
    Ok(())
}

/// Takes the next available chain, checked, or `None` if the driver made
/// none available. `max_bytes` bounds the chain's total length.
pub fn next_chain(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    max_bytes: u64,
) -> Result<Option<Chain>, QueueError> {
    let size = q.size();
    let mut iter = q.iter(mem).map_err(|e| match e {
        virtio_queue::Error::InvalidAvailRingIndex => QueueError::BadAvailIndex,
        virtio_queue::Error::QueueNotReady => QueueError::NotReady,
        _ => QueueError::BadRings,
    })?;
    let Some(chain) = iter.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut segs = Vec::new();
    let mut total = 0u64;
    let mut ended = false;
    let limit = MAX_CHAIN_DESCRIPTORS.min(size as usize);
    for d in chain {
        if segs.len() >= limit {
            return Err(QueueError::TooLarge(total));
        }
        let (addr, len) = (d.addr().0, d.len());
        let access = if d.is_write_only() {
            vm_memory::Permissions::Write
        } else {
            vm_memory::Permissions::Read
        };
        total += len as u64;
        if total > max_bytes {
            return Err(QueueError::TooLarge(total));
        }
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize, access) {
            return Err(QueueError::OutsideMemory { addr, len });
        }
        let writable = d.is_write_only();
        if !writable && segs.iter().any(|s: &Segment| s.writable) {
            return Err(QueueError::Order);
        }
        segs.push(Segment {
            addr,
            len,
            writable,
        });
        ended = !d.has_next();
    }
    if !ended {
        // The iterator stops without error on a loop (its budget is the
        // queue size), on a next index past the table and on a descriptor
        // it cannot read: all of them leave a last descriptor with NEXT.
        return Err(QueueError::Unterminated);
    }
    Ok(Some(Chain { head, segs }))
}

/// Puts a finished chain in the used ring.
pub fn complete(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    q.add_used(mem, head, len).map_err(|_| QueueError::Used)
}
