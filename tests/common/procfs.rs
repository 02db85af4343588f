//! What backs this process's memory, read from `/proc/self` rather than
//! from L0: which file (inode) and offset a host address maps, which
//! memfds are open and how much of each is allocated, reading memory
//! through a given host mapping, and resident-set figures.
//!
//! The tests use it to check a zero-copy move from outside the code that
//! performs it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// The file range behind a host address range, from `/proc/self/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backing {
    /// Device (major << 32 | minor) of the file.
    pub dev: u64,
    /// Inode of the file.
    pub inode: u64,
    /// Offset of the first byte in the file.
    pub offset: u64,
    /// Length of the range.
    pub len: u64,
}

struct MapLine {
    start: usize,
    end: usize,
    offset: u64,
    dev: u64,
    inode: u64,
}

fn maps() -> Vec<MapLine> {
    let text = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, b) = w.next()?.split_once('-')?;
            let _perms = w.next()?;
            let offset = u64::from_str_radix(w.next()?, 16).ok()?;
            let (maj, min) = w.next()?.split_once(':')?;
            let dev =
                (u64::from_str_radix(maj, 16).ok()? << 32) | u64::from_str_radix(min, 16).ok()?;
            let inode = w.next()?.parse().ok()?;
            Some(MapLine {
                start: usize::from_str_radix(a, 16).ok()?,
                end: usize::from_str_radix(b, 16).ok()?,
                offset,
                dev,
                inode,
            })
        })
        .collect()
}

/// The file range that `[addr, addr + len)` of this process maps, checking
/// that every mapping covering it is of the same file at contiguous offsets.
pub fn backing(addr: usize, len: u64) -> Result<Backing, String> {
    let all = maps();
    let end = addr + len as usize;
    let mut at = addr;
    let mut first: Option<Backing> = None;
    while at < end {
        let m = all
            .iter()
            .find(|m| m.start <= at && at < m.end)
            .ok_or_else(|| format!("{at:#x} is not mapped in this process"))?;
        if m.inode == 0 {
            return Err(format!("{at:#x} is anonymous memory, not a file mapping"));
        }
        let off = m.offset + (at - m.start) as u64;
        match first {
            None => {
                first = Some(Backing {
                    dev: m.dev,
                    inode: m.inode,
                    offset: off,
                    len,
                })
            }
            Some(f) => {
                if (f.dev, f.inode) != (m.dev, m.inode) || f.offset + (at - addr) as u64 != off {
                    return Err(format!(
                        "{addr:#x}+{len:#x} is not one contiguous file range: {f:?} then inode {} offset {off:#x} at {at:#x}",
                        m.inode
                    ));
                }
            }
        }
        at = m.end;
    }
    first.ok_or_else(|| "empty range".into())
}

/// One open memfd of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memfd {
    /// Name, as `/proc/self/fd` shows it (`/memfd:vmbeam-… (deleted)`).
    pub name: String,
    /// Device of the file.
    pub dev: u64,
    /// Bytes of the file backed by host pages (`st_blocks` × 512).
    pub allocated: u64,
}

/// Every memfd open in this process, by inode (several fds of one file
/// count once).
pub fn memfds() -> BTreeMap<u64, Memfd> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let name = link.to_string_lossy().into_owned();
        if !name.starts_with("/memfd:") {
            continue;
        }
        // metadata() follows the magic link to the memfd itself.
        let Ok(md) = std::fs::metadata(e.path()) else {
            continue;
        };
        out.insert(
            md.ino(),
            Memfd {
                name,
                dev: md.dev(),
                allocated: md.blocks() * 512,
            },
        );
    }
    out
}

/// Inode of the file open as descriptor `fd` in this process.
pub fn fd_inode(fd: i32) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|e| panic!("fd {fd}: {e}"))
        .ino()
}

/// `len` bytes of this process's memory at `addr`, read through
/// `/proc/self/mem` (so through whatever mapping is at `addr`; an unmapped
/// address is an error, not a crash).
pub fn read_mem(addr: usize, len: u64) -> Result<Vec<u8>, String> {
    let f = File::open("/proc/self/mem").map_err(|e| format!("open /proc/self/mem: {e}"))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, addr as u64)
        .map_err(|e| format!("read {len:#x} bytes at {addr:#x}: {e}"))?;
    Ok(buf)
}

/// Folds `bytes` (a multiple of 8 long) into the running checksum `sum`
/// word by word, as L0 and the workloads checksum guest memory.
pub fn fold_bytes(sum: u64, bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(sum, |s, c| {
        vmbeam_abi::checksum::fold(s, u64::from_le_bytes(c.try_into().unwrap()))
    })
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"))
}

/// Resident set of this process now, bytes.
pub fn rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set since the last [`reset_peak_rss`], bytes.
pub fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Resets the peak resident set to the current one (`clear_refs` 5).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

/// A `/proc/self/fd` path of the memfd with inode `inode`, if one is open.
pub fn memfd_path(inode: u64) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_link(p).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
                && std::fs::metadata(p).is_ok_and(|m| m.ino() == inode)
        })
}
