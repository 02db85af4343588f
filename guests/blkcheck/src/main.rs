//! `blkcheck`: a nested workload that proves its virtio disk keeps every
//! write, through the `virtio-drivers` crate's block driver.
//!
//! Round r verifies that every sector still holds what round r−1 wrote,
//! writes every sector with content derived from (seed, sector, r),
//! flushes, reads everything back and verifies it, then prints
//! `round=r ok=… bad=…` (sectors verified so far, and mismatches).
//! With `param0` = N it stops after round N and prints `done`, so a host
//! can compare the image with the expected one.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::ptr::NonNull;
use guest_rt::Serial;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use vmbeam_abi::checksum::pattern_word;
use vmbeam_abi::l2::{
    L2BootParams, BOOT_PARAMS, CONSOLE_PORT, L2_MAGIC, MAX_DEVICES, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};

mod hal;

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

/// Finds the first virtio block device among the windows the guest
/// hypervisor may have placed.
fn find_disk() -> Option<MmioTransport<'static>> {
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
                return Some(t);
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
    let Some(t) = find_disk() else {
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
                if disk.read_blocks(first as usize, &mut buf).is_err() {
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
            if disk.write_blocks(first as usize, &buf).is_err() {
                errors += 1;
            }
        }
        if disk.flush().is_err() {
            errors += 1;
        }
        // (3) Read it back.
        for c in 0..chunks {
            let first = c * CHUNK as u64;
            if disk.read_blocks(first as usize, &mut buf).is_err() {
                errors += 1;
                continue;
            }
            let b = count_bad(&buf, seed, r, first);
            bad += b;
            ok += CHUNK as u64 - b;
        }
        let _ = writeln!(
            out,
            "blkcheck {name} round={r} ok={ok} bad={bad} errors={errors}"
        );
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
