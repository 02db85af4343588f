//! Evidence that a zero-copy move kept every guest's pages where they were,
//! taken from `/proc/self` (see `procfs`) around a rejuvenation: which
//! memfd pages back each guest's slots before, which back the successor's
//! grant mappings after, which of the aged guest hypervisor's pages are
//! still allocated, and what the two guest hypervisors left on the channel.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use super::procfs::{self, Backing};
use vmbeam_abi::handover::{MailboxHeader, MsgHeader, MAILBOX_TO_AGED, MAILBOX_TO_SUCCESSOR};
use vmbeam_vmm::l1::hostvm::HostVm;

/// One slot of a guest before the move.
#[derive(Debug, Clone)]
pub struct SlotBefore {
    /// Nested guest-physical start.
    pub l2_gpa: u64,
    /// The memfd pages behind the nested VM's mapping of it.
    pub backing: Backing,
}

/// A guest's pages before the move.
#[derive(Debug, Clone)]
pub struct GuestPages {
    /// Its slots, by nested address.
    pub slots: Vec<SlotBefore>,
    /// Checksum of its memory read through the host VM's mapping
    /// (`Some` when asked for).
    pub sum: Option<u64>,
}

/// The slots of every nested VM of `vm` (by nested address), copied out so
/// that no lock of L0 is held while a test reads or asserts; each copy
/// keeps its host mapping alive.
pub fn slots_of(vm: &HostVm) -> Vec<(String, Vec<vmbeam_vmm::nesting::nested::NestedSlot>)> {
    let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    vms.iter()
        .map(|n| {
            let n = n.lock().unwrap();
            let mut slots = n.slots.clone();
            slots.sort_by_key(|s| s.l2_gpa);
            (n.name.clone(), slots)
        })
        .collect()
}

/// The pages of every guest of `vm`, by name: for each slot the file range
/// behind the nested VM's mapping, checked to be the one behind the host
/// VM's own mapping of the same L1 pages. With `sums`, also a checksum of
/// each guest's memory read through the host VM's mapping (meaningful only
/// for a guest that does not write its memory meanwhile).
pub fn guest_pages(vm: &HostVm, sums: bool) -> BTreeMap<String, GuestPages> {
    let mut out = BTreeMap::new();
    for (name, slots) in slots_of(vm) {
        let mut sum = vmbeam_abi::checksum::CHECKSUM_INIT;
        let mut before = Vec::new();
        for s in &slots {
            let nested = procfs::backing(s.hva, s.len).unwrap();
            let l1 = vm
                .host_mapping(s.l1_gpa, s.len)
                .expect("the slot's L1 pages are in one region of the host VM");
            let host = procfs::backing(l1.host_addr, s.len).unwrap();
            assert_eq!(
                nested, host,
                "{name}: the nested VM and its host VM map different pages"
            );
            assert_eq!(procfs::fd_inode(l1.fd), host.inode);
            if sums {
                sum = procfs::fold_bytes(sum, &procfs::read_mem(l1.host_addr, s.len).unwrap());
            }
            before.push(SlotBefore {
                l2_gpa: s.l2_gpa,
                backing: nested,
            });
        }
        out.insert(
            name,
            GuestPages {
                slots: before,
                sum: sums.then_some(sum),
            },
        );
    }
    out
}

/// Checks that the successor's grant mappings for every guest of `before`
/// are backed by exactly the memfd pages the guest had before (one per
/// slot), and, where `before` has a checksum, that the same checksum read
/// through the successor's own mappings matches. Returns the backing of
/// every grant mapping.
pub fn check_same_pages(succ: &HostVm, before: &BTreeMap<String, GuestPages>) -> Vec<Backing> {
    same_pages(succ, before).unwrap_or_else(|e| panic!("{e}"))
}

/// [`check_same_pages`] that says what differs instead of panicking.
pub fn same_pages(
    succ: &HostVm,
    before: &BTreeMap<String, GuestPages>,
) -> Result<Vec<Backing>, String> {
    let grants = succ.grant_mappings();
    let mut all = Vec::new();
    for (name, pages) in before {
        let mine: Vec<_> = grants
            .iter()
            .filter(|g| g.guest.as_deref() == Some(name.as_str()))
            .collect();
        if mine.len() != pages.slots.len() {
            return Err(format!(
                "{name}: {} grant mappings for {} slots: {mine:?}",
                mine.len(),
                pages.slots.len()
            ));
        }
        let mut by_l2 = Vec::new();
        for g in &mine {
            let b = procfs::backing(g.host_addr, g.len)?;
            if procfs::fd_inode(g.fd) != b.inode {
                return Err(format!(
                    "{name}: the mapping at {:#x} is not of the file L0 names",
                    g.host_addr
                ));
            }
            let slot = pages.slots.iter().find(|s| s.backing == b).ok_or_else(|| {
                format!(
                    "{name}: the successor's mapping at {:#x} is backed by {b:?}, \
                     which is none of the guest's pages before the move: {:?}",
                    g.host_addr, pages.slots
                )
            })?;
            all.push(b);
            by_l2.push((slot.l2_gpa, g.host_addr, g.len));
        }
        if let Some(before_sum) = pages.sum {
            // Same order as before: by nested address.
            by_l2.sort();
            let mut sum = vmbeam_abi::checksum::CHECKSUM_INIT;
            for (_, addr, len) in by_l2 {
                sum = procfs::fold_bytes(sum, &procfs::read_mem(addr, len)?);
            }
            if sum != before_sum {
                return Err(format!(
                    "{name}: memory read through the successor's mapping differs from \
                     before the move ({sum:016x}, was {before_sum:016x})"
                ));
            }
        }
    }
    Ok(all)
}

/// Data extents `(offset, len)` of the memfd with inode `inode` open in
/// this process (none if it is closed), from SEEK_DATA / SEEK_HOLE.
pub fn data_extents(inode: u64) -> Vec<(u64, u64)> {
    let Some(path) = procfs::memfd_path(inode) else {
        return Vec::new();
    };
    let f = std::fs::File::open(&path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < size {
        // SAFETY: lseek on a descriptor this function owns only moves its offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole };
        out.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    out
}

/// Checks that after a move nothing of the aged generation `from` of line
/// `line` is still allocated except pages a guest maps (`kept`): its RAM
/// memfd is closed or empty, and every data extent of its pool memfd lies
/// inside a guest's range. Returns the aged files' allocated bytes after.
pub fn check_aged_released(
    before: &BTreeMap<u64, procfs::Memfd>,
    line: &str,
    from: u32,
    kept: &[Backing],
) -> u64 {
    let mut left = 0;
    for (ino, m) in before {
        let ram = m.name.contains(&format!("vmbeam-{line}/g{from}-ram"));
        let pool = m.name.contains(&format!("vmbeam-{line}/g{from}-pool"));
        if !ram && !pool {
            continue;
        }
        // The guests' ranges in this file, adjacent ones merged.
        let mut ranges: Vec<(u64, u64)> = kept
            .iter()
            .filter(|k| k.inode == *ino)
            .map(|k| (k.offset, k.offset + k.len))
            .collect();
        ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (off, len) in data_extents(*ino) {
            left += len;
            let inside = merged.iter().any(|&(a, b)| a <= off && off + len <= b);
            assert!(
                inside,
                "{}: {len:#x} bytes at {off:#x} are still allocated after the move \
                 and no guest maps them (guests: {kept:?})",
                m.name
            );
        }
    }
    left
}

/// What the two guest hypervisors left in the channel's mailboxes.
#[derive(Debug, Clone, Copy)]
pub struct Mailboxes {
    /// Messages sent aged → successor (the mailbox's sequence number).
    pub to_successor: u32,
    /// Length of the last of them.
    pub last_to_successor: u32,
    /// Messages sent successor → aged.
    pub to_aged: u32,
    /// Length of the last of them.
    pub last_to_aged: u32,
}

/// Reads the mailbox headers of line `line`'s channel memfd (through the
/// file, not through any VM's mapping) and checks that each last message
/// starts with a valid message header.
pub fn channel_mailboxes(line: &str) -> Mailboxes {
    let memfds = procfs::memfds();
    let (ino, _) = memfds
        .iter()
        .find(|(_, m)| m.name.contains(&format!("vmbeam-{line}-channel")))
        .unwrap_or_else(|| panic!("no channel memfd of {line}: {memfds:?}"));
    let f = std::fs::File::open(procfs::memfd_path(*ino).unwrap()).unwrap();
    let read = |at: u64, len: usize| {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, at).unwrap();
        b
    };
    let hlen = std::mem::size_of::<MailboxHeader>();
    let mbox = |at: u64| {
        let h: MailboxHeader = vmbeam_abi::from_bytes(&read(at, hlen)).unwrap();
        if h.seq > 0 {
            let m: MsgHeader =
                vmbeam_abi::from_bytes(&read(at + hlen as u64, std::mem::size_of::<MsgHeader>()))
                    .unwrap();
            assert_eq!(m.magic, vmbeam_abi::handover::MSG_MAGIC, "{h:?} {m:?}");
        }
        (h.seq, h.len)
    };
    let (to_successor, last_to_successor) = mbox(MAILBOX_TO_SUCCESSOR);
    let (to_aged, last_to_aged) = mbox(MAILBOX_TO_AGED);
    Mailboxes {
        to_successor,
        last_to_successor,
        to_aged,
        last_to_aged,
    }
}

/// Checks from outside L0 (through the nested VM's mapping, read with
/// `/proc/self/mem`) that every word of memtouch guest `name`'s bulk area
/// in `vm` holds the pattern L0 filled it with from `seed`: memtouch only
/// samples it, and nothing writes it after the fill.
pub fn check_bulk(vm: &HostVm, name: &str, seed: u64) {
    if let Err(e) = bulk_intact(vm, name, seed) {
        panic!("{e}");
    }
}

/// [`check_bulk`] that says what differs instead of panicking; returns
/// the number of words checked.
pub fn bulk_intact(vm: &HostVm, name: &str, seed: u64) -> Result<u64, String> {
    let (_, slots) = slots_of(vm)
        .into_iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| format!("no guest {name}"))?;
    let mut words = 0u64;
    for s in &slots {
        let start = s.l2_gpa.max(vmbeam_abi::l2::BULK_BASE);
        let end = s.l2_gpa + s.len;
        if start >= end {
            continue;
        }
        let bytes = procfs::read_mem(s.hva + (start - s.l2_gpa) as usize, end - start)?;
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            let addr = start + i as u64 * 8;
            let want = vmbeam_abi::checksum::pattern_word(seed, addr);
            let got = u64::from_le_bytes(w.try_into().unwrap());
            if got != want {
                return Err(format!(
                    "{name}: bulk word at {addr:#x} is {got:#018x}, not {want:#018x}"
                ));
            }
            words += 1;
        }
    }
    if words == 0 {
        return Err(format!("{name} has no bulk area"));
    }
    Ok(words)
}

/// After a copying move: every grant mapping of `succ` is backed by a
/// memfd that was not open before the move (`before`, from
/// `procfs::memfds`).
pub fn in_new_files(
    succ: &HostVm,
    before: &BTreeMap<u64, procfs::Memfd>,
) -> Result<Vec<Backing>, String> {
    let grants = succ.grant_mappings();
    if grants.is_empty() {
        return Err("the successor maps no granted pages".into());
    }
    grants
        .iter()
        .map(|g| {
            let b = procfs::backing(g.host_addr, g.len)?;
            if before.contains_key(&b.inode) {
                Err(format!("{g:?} is backed by a file that existed before"))
            } else {
                Ok(b)
            }
        })
        .collect()
}
