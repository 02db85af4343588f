//! Loading guest images: the guest hypervisor ELF into a host VM's RAM
//! (through linux-loader), and nested workload ELFs flattened into modules
//! that L1 copies into nested memory.

use std::io::Cursor;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors of image loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Not an ELF file.
    #[error("{what} is not an ELF image (bad magic)")]
    BadMagic {
        /// Which image.
        what: String,
    },
    /// The ELF is cut short or malformed.
    #[error("{what} is not a loadable x86-64 ELF: {source}")]
    Elf {
        /// Which image.
        what: String,
        /// Loader error.
        source: linux_loader::loader::Error,
    },
    /// The entry point is outside the loaded image or guest memory.
    #[error("{what}: entry point {entry:#x} is outside the loaded image [{start:#x}, {end:#x})")]
    BadEntry {
        /// Which image.
        what: String,
        /// Entry.
        entry: u64,
        /// First loaded byte.
        start: u64,
        /// End of loaded bytes.
        end: u64,
    },
    /// The image does not fit where it must go.
    #[error("{what} does not fit: needs [{start:#x}, {end:#x}), allowed [{lo:#x}, {hi:#x})")]
    TooBig {
        /// Which image.
        what: String,
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Lowest allowed.
        lo: u64,
        /// Highest allowed.
        hi: u64,
    },
    /// The headers are inconsistent.
    #[error("{what} is not a loadable x86-64 ELF: {msg}")]
    Malformed {
        /// Which image.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// Guest memory access failed.
    #[error("cannot prepare memory for {0}")]
    Memory(String),
}

/// Where and what an image loaded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// First byte loaded.
    pub start: u64,
    /// End of loaded bytes.
    pub end: u64,
    /// Entry point.
    pub entry: u64,
}

fn entry_of(image: &[u8]) -> u64 {
    let mut e = [0u8; 8];
    if image.len() >= 32 {
        e.copy_from_slice(&image[24..32]);
    }
    u64::from_le_bytes(e)
}

fn u16_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 2)
        .map(|x| u16::from_le_bytes([x[0], x[1]]) as u64)
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 8).map(|x| {
        let mut a = [0u8; 8];
        a.copy_from_slice(x);
        u64::from_le_bytes(a)
    })
}

/// The span `[start, end)` of the PT_LOAD segments, read from the program
/// headers (bounds-checked), before anything is written to guest memory.
fn load_span(what: &str, image: &[u8]) -> Result<(u64, u64), LoaderError> {
    let bad = |m: &str| LoaderError::Malformed {
        what: what.into(),
        msg: m.into(),
    };
    let phoff = u64_at(image, 32).ok_or_else(|| bad("truncated ELF header"))? as usize;
    let phentsize = u16_at(image, 54).ok_or_else(|| bad("truncated ELF header"))? as usize;
    let phnum = u16_at(image, 56).ok_or_else(|| bad("truncated ELF header"))? as usize;
    if phentsize < 56 {
        return Err(bad("program header entries are too small"));
    }
    let mut span: Option<(u64, u64)> = None;
    for i in 0..phnum {
        let o = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflows"))?;
        let p_type = image
            .get(o..o + 4)
            .ok_or_else(|| bad("truncated program headers"))?;
        if p_type != [1, 0, 0, 0] {
            continue;
        }
        let p_offset = u64_at(image, o + 8).ok_or_else(|| bad("truncated program headers"))?;
        let paddr = u64_at(image, o + 24).ok_or_else(|| bad("truncated program headers"))?;
        let filesz = u64_at(image, o + 32).ok_or_else(|| bad("truncated program headers"))?;
        let memsz = u64_at(image, o + 40).ok_or_else(|| bad("truncated program headers"))?;
        if filesz == 0 {
            continue;
        }
        if p_offset
            .checked_add(filesz)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(bad(
                "a segment extends past the end of the file (truncated image?)",
            ));
        }
        let end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or_else(|| bad("a segment wraps the address space"))?;
        span = Some(match span {
            None => (paddr, end),
            Some((a, b)) => (a.min(paddr), b.max(end)),
        });
    }
    span.ok_or_else(|| bad("no loadable segment"))
}

/// Loads an ELF into `mem`, requiring all of it in `[lo, hi)` and the entry inside it.
/// Nothing is written to guest memory unless every check passes.
pub fn load_elf(
    what: &str,
    image: &[u8],
    mem: &GuestMemoryMmap,
    lo: u64,
    hi: u64,
) -> Result<Loaded, LoaderError> {
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoaderError::BadMagic { what: what.into() });
    }
    if image.len() < 64 || image[4] != 2 || image[5] != 1 {
        return Err(LoaderError::Malformed {
            what: what.into(),
            msg: "not a little-endian 64-bit ELF (or truncated header)".into(),
        });
    }
    let (start, end) = load_span(what, image)?;
    if start < lo || end > hi {
        return Err(LoaderError::TooBig {
            what: what.into(),
            start,
            end,
            lo,
            hi,
        });
    }
    let entry = entry_of(image);
    if entry < start || entry >= end {
        return Err(LoaderError::BadEntry {
            what: what.into(),
            entry,
            start,
            end,
        });
    }
    Elf::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(lo))).map_err(|source| {
        LoaderError::Elf {
            what: what.into(),
            source,
        }
    })?;
    Ok(Loaded { start, end, entry })
}

/// A workload ELF flattened to one blob for a fixed nested address.
#[derive(Debug, Clone)]
pub struct FlatImage {
    /// Nested address of `bytes[0]`.
    pub load_addr: u64,
    /// Entry point.
    pub entry: u64,
    /// The image.
    pub bytes: Vec<u8>,
}

/// Flattens a workload ELF that must load inside `[lo, hi)`.
pub fn flatten(what: &str, image: &[u8], lo: u64, hi: u64) -> Result<FlatImage, LoaderError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), hi as usize)])
        .map_err(|e| LoaderError::Memory(format!("{what}: {e}")))?;
    let l = load_elf(what, image, &mem, lo, hi)?;
    let mut bytes = vec![0u8; (l.end - l.start) as usize];
    mem.read_slice(&mut bytes, GuestAddress(l.start))
        .map_err(|e| LoaderError::Memory(format!("{what}: {e}")))?;
    Ok(FlatImage {
        load_addr: l.start,
        entry: l.entry,
        bytes,
    })
}

/// Builds a minimal static x86-64 ELF with one PT_LOAD segment of `code`
/// at `addr`, entry `entry`. Used by tests to make broken or tiny guests.
pub fn tiny_elf(code: &[u8], addr: u64, entry: u64) -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // 64-bit
    v[5] = 1; // little endian
    v[6] = 1; // version
    v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&entry.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    v[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    v[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    v[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    v[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    v[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes()); // vaddr
    v[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes()); // paddr
    v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    v[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    v[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    v.extend_from_slice(code);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_elf_flattens_and_bad_ones_are_refused() {
        let code = [0xf4u8, 0xeb, 0xfd];
        let img = tiny_elf(&code, 0x10_0000, 0x10_0000);
        let f = flatten("tiny", &img, 0x10_0000, 0x20_0000).unwrap();
        assert_eq!(f.bytes, code);
        assert_eq!(f.entry, 0x10_0000);

        let mut bad = img.clone();
        bad[0] = b'X';
        assert!(matches!(
            flatten("bad", &bad, 0x10_0000, 0x20_0000),
            Err(LoaderError::BadMagic { .. })
        ));
        assert!(matches!(
            flatten("cut", &img[..70], 0x10_0000, 0x20_0000),
            Err(LoaderError::Malformed { .. })
        ));
        assert!(matches!(
            flatten("cut2", &img[..img.len() - 1], 0x10_0000, 0x20_0000),
            Err(LoaderError::Malformed { .. })
        ));
        let far = tiny_elf(&code, 0x10_0000, 0x30_0000);
        assert!(matches!(
            flatten("far", &far, 0x10_0000, 0x20_0000),
            Err(LoaderError::BadEntry { .. })
        ));
        let low = tiny_elf(&code, 0x1000, 0x1000);
        assert!(flatten("low", &low, 0x10_0000, 0x20_0000).is_err());
    }
}
