//! virtio-blk over a raw image file: read, write, flush and get-id, with a
//! read-only option. The image size is the disk size.
//!
//! Every request is served completely while the device lock is held (file
//! I/O at host speed, then the used ring), so a request is never half
//! done: across a pause or a move of the guest each request the driver
//! made available completes exactly once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::devices::mmio::{Backend, DeviceCounters};
use crate::devices::queue::{complete, next_chain, Chain, QueueError};

/// Sector size.
pub const SECTOR: u64 = 512;
/// Most data bytes one request may carry.
pub const MAX_REQUEST: u64 = 1 << 20;
/// Queue size offered.
const QUEUE_SIZES: &[u16] = &[128];
/// Requests served per notification before the others get a turn.
const BUDGET: usize = 256;
/// virtio-blk request header length (type, reserved, sector).
const HEADER: u64 = 16;

/// A block device over an image file.
pub struct Blk {
    file: Arc<File>,
    path: String,
    ro: bool,
    sectors: u64,
    id: [u8; 20],
}

impl Blk {
    /// A disk of `size` bytes (a multiple of [`SECTOR`]).
    pub fn new(file: Arc<File>, path: &str, ro: bool, size: u64, id: &str) -> Blk {
        let mut b = [0u8; 20];
        let n = id.len().min(20);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        Blk {
            file,
            path: path.to_string(),
            ro,
            sectors: size / SECTOR,
            id: b,
        }
    }

    /// Serves one checked chain; returns (bytes written to the guest, status).
    fn request(&mut self, ch: &Chain, mem: &GuestMemoryMmap, c: &mut DeviceCounters) -> (u32, u8) {
        let mut hdr = [0u8; HEADER as usize];
        let wlen = ch.writable_len();
        if wlen == 0 || !ch.read_at(mem, 0, &mut hdr) {
            // No status byte to answer in, or no header: nothing to write.
            return (0, VIRTIO_BLK_S_IOERR as u8);
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let status_at = wlen - 1;
        let (written, status) = match kind {
            VIRTIO_BLK_T_IN => self.read(ch, mem, sector, status_at, c),
            VIRTIO_BLK_T_OUT => (0, self.write(ch, mem, sector, c)),
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (0, VIRTIO_BLK_S_OK),
                Err(_) => (0, VIRTIO_BLK_S_IOERR),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = status_at.min(20) as usize;
                if ch.write_at(mem, 0, &self.id[..n]) {
                    (n as u64, VIRTIO_BLK_S_OK)
                } else {
                    (0, VIRTIO_BLK_S_IOERR)
                }
            }
            _ => (0, VIRTIO_BLK_S_UNSUPP),
        };
        if status != VIRTIO_BLK_S_OK {
            c.errors += 1;
        }
        let s = status as u8;
        if !ch.write_at(mem, status_at, &[s]) {
            return (written as u32, VIRTIO_BLK_S_IOERR as u8);
        }
        c.requests += 1;
        ((written + 1) as u32, s)
    }

    /// Whether `[sector, sector + len)` is a whole-sector range of the disk.
    fn in_disk(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR)
            && len <= MAX_REQUEST
            && sector
                .checked_add(len / SECTOR)
                .is_some_and(|end| end <= self.sectors)
    }

    fn read(
        &mut self,
        ch: &Chain,
        mem: &GuestMemoryMmap,
        sector: u64,
        len: u64,
        c: &mut DeviceCounters,
    ) -> (u64, u32) {
        if !self.in_disk(sector, len) {
            return (0, VIRTIO_BLK_S_IOERR);
        }
        let mut buf = vec![0u8; len as usize];
        if self.file.read_exact_at(&mut buf, sector * SECTOR).is_err() {
            return (0, VIRTIO_BLK_S_IOERR);
        }
        if !ch.write_at(mem, 0, &buf) {
            return (0, VIRTIO_BLK_S_IOERR);
        }
        c.bytes_in += len;
        (len, VIRTIO_BLK_S_OK)
    }

    fn write(
        &mut self,
        ch: &Chain,
        mem: &GuestMemoryMmap,
        sector: u64,
        c: &mut DeviceCounters,
    ) -> u32 {
        let len = ch.readable_len().saturating_sub(HEADER);
        if self.ro {
            return VIRTIO_BLK_S_IOERR;
        }
        if !self.in_disk(sector, len) {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut buf = vec![0u8; len as usize];
        if !ch.read_at(mem, HEADER, &mut buf) {
            return VIRTIO_BLK_S_IOERR;
        }
        if self.file.write_all_at(&buf, sector * SECTOR).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        c.bytes_out += len;
        VIRTIO_BLK_S_OK
    }
}

impl Backend for Blk {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.ro {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_blk_config: capacity (sectors) first; the rest of
        // its fields belong to features we do not offer and read as zero.
        let mut c = vec![0u8; 60];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn process(
        &mut self,
        _qi: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut DeviceCounters,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        for _ in 0..BUDGET {
            let Some(ch) = next_chain(q, mem, MAX_REQUEST + HEADER + 1)? else {
                break;
            };
            let (len, _) = self.request(&ch, mem, c);
            complete(q, mem, ch.head, len)?;
            used = true;
        }
        Ok(used)
    }

    fn describe(&self) -> String {
        format!(
            "virtio-blk {} ({} sectors{})",
            self.path,
            self.sectors,
            if self.ro { ", read-only" } else { "" }
        )
    }
}
