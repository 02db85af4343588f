//! Guest RAM of a host VM: memfd-backed, `MAP_SHARED` regions.
//!
//! Every byte of guest memory lives in a memfd so that the very same host
//! pages can be mapped a second time — into a successor host VM during a
//! zero-copy handover, or into a nested VM's memory slots — without copying.
//! A [`Region`] is one mapping of a file range at a guest-physical address;
//! several regions (in several VMs) may name the same file range.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Errors of guest memory management.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create {size}-byte memory file '{name}': {source}")]
    CreateFile {
        /// File name.
        name: String,
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of '{name}' at offset {offset:#x}: {source}")]
    Map {
        /// File name.
        name: String,
        /// Length.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// vm-memory error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Building the vm-memory view failed.
    #[error("cannot build guest memory view: {0}")]
    View(String),
    /// fallocate(PUNCH_HOLE) failed.
    #[error("cannot release pages of '{name}': {source}")]
    Punch {
        /// File name.
        name: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// A memfd holding guest memory.
#[derive(Debug)]
pub struct MemFile {
    /// Debug name (`/proc/self/fd` shows it).
    pub name: String,
    /// The file.
    pub file: Arc<File>,
    /// Size in bytes.
    pub size: u64,
}

impl MemFile {
    /// Creates a sparse memfd of `size` bytes.
    pub fn new(name: &str, size: u64) -> Result<Arc<MemFile>, MemoryError> {
        let err = |source| MemoryError::CreateFile {
            name: name.to_string(),
            size,
            source,
        };
        let cname = CString::new(format!("vmbeam-{name}")).expect("name has no NUL");
        // SAFETY: `cname` is a valid C string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(err)?;
        Ok(Arc::new(MemFile {
            name: name.to_string(),
            file: Arc::new(file),
            size,
        }))
    }

    /// Bytes of the file that are backed by host pages right now.
    pub fn allocated_bytes(&self) -> u64 {
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open for the life of `self`; `st` is writable.
        let r = unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) };
        if r == 0 {
            st.st_blocks as u64 * 512
        } else {
            0
        }
    }

    /// Splits `[offset, offset+len)` into `(start, len, has_data)` pieces
    /// using SEEK_DATA/SEEK_HOLE; if the file system cannot tell, the whole
    /// range is reported as data.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let fd = self.file.as_raw_fd();
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            // SAFETY: lseek on our own fd only moves (and reports) a file offset.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e == Some(libc::ENXIO) {
                    out.push((at, end - at, false));
                } else {
                    out.push((at, end - at, true));
                }
                break;
            }
            let data = (data as u64).min(end);
            if data > at {
                out.push((at, data - at, false));
            }
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            out.push((data, hole - data, true));
            at = hole;
        }
        out
    }

    /// Returns the pages of `[offset, offset + len)` to the host.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on our own fd with a checked range; it only
        // discards file contents, which no live mapping of ours still needs.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(MemoryError::Punch {
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// What a region of a host VM is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    /// The guest hypervisor's own RAM at GPA 0.
    Ram,
    /// The nested-memory pool.
    Pool,
    /// The shared-page channel.
    Channel,
    /// Pages granted by a predecessor for nested guest `guest`.
    Grant {
        /// Nested guest name the pages belong to.
        guest: String,
    },
}

/// One mapping of a file range into a host VM.
#[derive(Debug, Clone)]
pub struct Region {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// Purpose.
    pub kind: RegionKind,
    /// Backing file.
    pub file: Arc<MemFile>,
    /// Offset of `gpa` in `file`.
    pub offset: u64,
    /// The host mapping (kept alive by every user, e.g. nested VM slots).
    pub map: Arc<MmapRegion>,
    /// KVM memory slot in the host VM.
    pub slot: u32,
}

impl Region {
    /// Maps `[offset, offset+size)` of `file` at `gpa`.
    pub fn map(
        file: &Arc<MemFile>,
        offset: u64,
        size: u64,
        gpa: u64,
        kind: RegionKind,
        slot: u32,
    ) -> Result<Region, MemoryError> {
        let fo = FileOffset::from_arc(file.file.clone(), offset);
        let map = MmapRegion::build(
            Some(fo),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Map {
            name: file.name.clone(),
            size,
            offset,
            source,
        })?;
        Ok(Region {
            gpa,
            size,
            kind,
            file: file.clone(),
            offset,
            map: Arc::new(map),
            slot,
        })
    }

    /// Host address of guest-physical `gpa` (must be inside the region).
    pub fn host_addr(&self, gpa: u64) -> *mut u8 {
        debug_assert!(gpa >= self.gpa && gpa < self.gpa + self.size);
        // SAFETY: the offset is inside the mapping (checked by callers).
        unsafe { self.map.as_ptr().add((gpa - self.gpa) as usize) }
    }

    /// True if `[gpa, gpa+len)` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        match gpa.checked_add(len) {
            Some(end) => gpa >= self.gpa && end <= self.gpa + self.size,
            None => false,
        }
    }
}

/// All regions of one host VM.
#[derive(Debug, Default)]
pub struct GuestRam {
    /// Regions, unordered.
    pub regions: Vec<Region>,
}

impl GuestRam {
    /// The region holding all of `[gpa, gpa+len)`, if one does.
    pub fn find(&self, gpa: u64, len: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(gpa, len))
    }

    /// Host pointer to `[gpa, gpa+len)` if it lies in one region.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        self.find(gpa, len as u64).map(|r| r.host_addr(gpa))
    }

    /// Copies `data` to `gpa`; false if it is not inside one region.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.host_ptr(gpa, data.len()) {
            Some(p) => {
                // SAFETY: the range lies inside a live shared mapping; guest
                // memory may change under us, which plain copies accept.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => false,
        }
    }

    /// Copies `out.len()` bytes from `gpa`; false if not inside one region.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        match self.host_ptr(gpa, out.len()) {
            Some(p) => {
                // SAFETY: as in `write`.
                unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                true
            }
            None => false,
        }
    }

    /// A vm-memory view of the RAM region (for the ELF loader).
    pub fn ram_view(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let ram = self
            .regions
            .iter()
            .find(|r| r.kind == RegionKind::Ram)
            .ok_or_else(|| MemoryError::View("no RAM region".into()))?;
        let region = GuestRegionMmap::with_arc(ram.map.clone(), GuestAddress(ram.gpa))
            .ok_or_else(|| MemoryError::View("RAM region wraps the address space".into()))?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::View(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_share_pages_and_punch_releases() {
        let f = MemFile::new("t", 4 << 20).unwrap();
        let a = Region::map(&f, 0, 4 << 20, 0, RegionKind::Pool, 0).unwrap();
        let b = Region::map(&f, 2 << 20, 2 << 20, 1 << 30, RegionKind::Pool, 1).unwrap();
        let ram = GuestRam {
            regions: vec![a, b],
        };
        assert!(ram.write((2 << 20) + 8, &[1, 2, 3]));
        let mut out = [0u8; 3];
        assert!(ram.read((1 << 30) + 8, &mut out));
        assert_eq!(out, [1, 2, 3]);
        assert!(f.allocated_bytes() >= 4096);
        let ext = f.extents(0, 4 << 20);
        assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), 4 << 20);
        assert!(ext.iter().any(|e| e.2) && ext.iter().any(|e| !e.2));
        f.punch_hole(0, 4 << 20).unwrap();
        assert!(f.extents(0, 4 << 20).iter().all(|e| !e.2));
        assert_eq!(f.allocated_bytes(), 0);
        assert!(ram.read((1 << 30) + 8, &mut out));
        assert_eq!(out, [0, 0, 0]);
        assert!(!ram.write(u64::MAX - 1, &[0; 4]));
    }
}
