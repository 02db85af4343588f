//! `blkcheck`: a nested workload that proves its virtio disk keeps every
//! write, through the `virtio-drivers` crate's block driver.
//!
//! Round r verifies that every sector still holds what round r−1 wrote,
//! writes every sector with content derived from (seed, sector, r),
//! flushes, reads everything back and verifies it, then prints
//! `round=r ok=… bad=…` (sectors verified so far, and mismatches).
//! With `param0` = N it stops after round N and prints `done`, so a host
//! can compare the image with the expected one. With bit 0 of `param1`
//! set it waits for each request's interrupt in `hlt` instead of polling
//! the used ring, and each line also reports `irqs=`.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::ptr::NonNull;
use guest_rt::Serial;
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use vmbeam_abi::checksum::pattern_word;
use vmbeam_abi::l2::{
    L2BootParams, BOOT_PARAMS, CONSOLE_PORT, L2_MAGIC, MAX_DEVICES, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};

use guest_rt::virtio_hal as hal;
mod irq;

/// Sectors per request.
const CHUNK: usize = 8;
/// Bytes per request.
const CHUNK_BYTES: usize = CHUNK * SECTOR_SIZE;

/// Word `k` of sector `s` as round `r` writes it.
fn word(seed: u64, r: u64, s: u64, k: usize) -> u64 {
    pattern_word(seed ^ (r << 40), s * SECTOR_SIZE as u64 + k as u64 * 8)
}

fn fill(buf: &mut [u8], seed: u64, r: u64, first: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let s = first + (i * 8 / SECTOR_SIZE) as u64;
        let k = i % (SECTOR_SIZE / 8);
        w.copy_from_slice(&word(seed, r, s, k).to_le_bytes());
    }
}

/// Sectors of `buf` (starting at `first`) that do not hold round `r`'s data.
fn count_bad(buf: &[u8], seed: u64, r: u64, first: u64) -> u64 {
    let mut bad = 0;
    for (j, sec) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
        let s = first + j as u64;
        let ok = sec
            .chunks_exact(8)
            .enumerate()
            .all(|(k, w)| u64::from_le_bytes(w.try_into().unwrap()) == word(seed, r, s, k));
        if !ok {
            bad += 1;
        }
    }
    bad
}

type Disk = VirtIOBlk<hal::BumpHal, MmioTransport<'static>>;

/// Reads `buf` at sector `first`, polling or sleeping on interrupts.
fn read(disk: &mut Disk, irqs: bool, first: u64, buf: &mut [u8]) -> bool {
    if !irqs {
        return disk.read_blocks(first as usize, buf).is_ok();
    }
    let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
    // SAFETY: `req`, `buf` and `resp` are not touched until the request
    // completes, and are passed again to complete it.
    let Ok(token) = (unsafe { disk.read_blocks_nb(first as usize, &mut req, buf, &mut resp) })
    else {
        return false;
    };
    irq::wait(|| disk.peek_used() == Some(token));
    disk.ack_interrupt();
    // SAFETY: the same buffers as above.
    unsafe { disk.complete_read_blocks(token, &req, buf, &mut resp) }.is_ok()
}

/// Writes `buf` at sector `first`, polling or sleeping on interrupts.
fn write(disk: &mut Disk, irqs: bool, first: u64, buf: &[u8]) -> bool {
    if !irqs {
        return disk.write_blocks(first as usize, buf).is_ok();
    }
    let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
    // SAFETY: as in `read`.
    let Ok(token) = (unsafe { disk.write_blocks_nb(first as usize, &mut req, buf, &mut resp) })
    else {
        return false;
    };
    irq::wait(|| disk.peek_used() == Some(token));
    disk.ack_interrupt();
    // SAFETY: as in `read`.
    unsafe { disk.complete_write_blocks(token, &req, buf, &mut resp) }.is_ok()
}

/// Finds the first virtio block device among the windows the guest
/// hypervisor may have placed.
fn find_disk() -> Option<(MmioTransport<'static>, u64)> {
    for i in 0..MAX_DEVICES as u64 {
        let base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE;
        // SAFETY: the window is mapped by L1's page tables; an unplaced
        // window reads as all ones (no magic), and MmioTransport::new only
        // reads registers.
        let t = unsafe {
            MmioTransport::new(
                NonNull::new(base as *mut VirtIOHeader).unwrap(),
                VIRTIO_MMIO_SIZE as usize,
            )
        };
        if let Ok(t) = t {
            if t.device_type() == DeviceType::Block {
                return Some((t, i));
            }
        }
    }
    None
}

#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    // SAFETY: L1 wrote the boot parameters at this fixed address before start.
    let p: L2BootParams = unsafe { core::ptr::read_volatile(BOOT_PARAMS as *const L2BootParams) };
    let mut out = Serial(CONSOLE_PORT);
    if p.magic != L2_MAGIC {
        let _ = writeln!(out, "blkcheck: bad boot params");
        guest_rt::halt_forever();
    }
    let name = vmbeam_abi::name_from_bytes(&p.name).unwrap_or("?");
    let seed = p.seed;
    let Some((t, window)) = find_disk() else {
        let _ = writeln!(out, "blkcheck {name} no disk");
        guest_rt::halt_forever();
    };
    let mut disk = match VirtIOBlk::<hal::BumpHal, _>::new(t) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "blkcheck {name} driver init failed: {e:?}");
            guest_rt::halt_forever();
        }
    };
    let irqs = p.param1 & 1 != 0;
    if irqs {
        // The bundled guest hypervisor gives window i line 5 + i.
        irq::init((vmbeam_abi::l2::VIRTIO_IRQ_BASE as u64 + window) as u8);
    }
    let sectors = disk.capacity();
    let mut id = [0u8; 20];
    let idn = disk.device_id(&mut id).unwrap_or(0);
    let id = core::str::from_utf8(&id[..idn]).unwrap_or("?");
    let _ = writeln!(
        out,
        "blkcheck {name} start sectors={sectors} id={id} ro={}",
        disk.readonly()
    );
    let chunks = sectors / CHUNK as u64;
    let mut buf = [0u8; CHUNK_BYTES];
    let (mut ok, mut bad, mut errors) = (0u64, 0u64, 0u64);
    let mut r: u64 = 0;
    loop {
        r += 1;
        // (1) What the previous round wrote is still there.
        if r > 1 {
            for c in 0..chunks {
                let first = c * CHUNK as u64;
                if !read(&mut disk, irqs, first, &mut buf) {
                    errors += 1;
                    continue;
                }
                let b = count_bad(&buf, seed, r - 1, first);
                bad += b;
                ok += CHUNK as u64 - b;
            }
        }
        // (2) Write this round's content, flush.
        for c in 0..chunks {
            let first = c * CHUNK as u64;
            fill(&mut buf, seed, r, first);
            if !write(&mut disk, irqs, first, &buf) {
                errors += 1;
            }
        }
        if disk.flush().is_err() {
            errors += 1;
        }
        // (3) Read it back.
        for c in 0..chunks {
            let first = c * CHUNK as u64;
            if !read(&mut disk, irqs, first, &mut buf) {
                errors += 1;
                continue;
            }
            let b = count_bad(&buf, seed, r, first);
            bad += b;
            ok += CHUNK as u64 - b;
        }
        let _ = write!(
            out,
            "blkcheck {name} round={r} ok={ok} bad={bad} errors={errors}"
        );
        if irqs {
            let _ = write!(out, " irqs={}", irq::count());
        }
        let _ = writeln!(out);
        if p.param0 != 0 && r == p.param0 {
            let _ = writeln!(
                out,
                "blkcheck {name} done round={r} ok={ok} bad={bad} errors={errors}"
            );
            guest_rt::halt_forever();
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    guest_rt::halt_forever()
}
