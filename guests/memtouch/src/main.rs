//! `memtouch`: a nested workload that proves its memory survives moves.
//!
//! Each round it verifies a few samples of the bulk area L0 filled with the
//! seeded pattern, rewrites one page of its working set and prints the
//! checksum of the whole working set, so a host can check that a move kept
//! every byte and that the guest kept running.
#![no_std]
#![no_main]

use core::fmt::Write;
use guest_rt::Serial;
use vmbeam_abi::checksum::{checksum_words, pattern_word};
use vmbeam_abi::l2::{
    L2BootParams, BOOT_PARAMS, BULK_BASE, CONSOLE_PORT, L2_MAGIC, WS_BASE, WS_LEN,
};

/// Bulk words verified per round.
const SAMPLES: u32 = 16;
/// Bytes rewritten per round (one page of the working set).
const PAGE: u64 = 0x1000;

#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    // SAFETY: L1 wrote the boot parameters at this fixed address before start.
    let p: L2BootParams = unsafe { core::ptr::read_volatile(BOOT_PARAMS as *const L2BootParams) };
    let mut out = Serial(CONSOLE_PORT);
    if p.magic != L2_MAGIC {
        let _ = writeln!(out, "memtouch: bad boot params");
        guest_rt::halt_forever();
    }
    let name = vmbeam_abi::name_from_bytes(&p.name).unwrap_or("?");
    let seed = p.seed;
    let _ = writeln!(
        out,
        "memtouch {name} start mem={}MiB seed={seed:x}",
        p.mem_bytes >> 20
    );
    let bulk_words = p.mem_bytes.saturating_sub(BULK_BASE) / 8;
    // xorshift64 state for the sample addresses (never zero).
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    if x == 0 {
        x = 1;
    }
    let mut bad: u64 = 0;
    let mut r: u64 = 0;
    loop {
        r += 1;
        // (1) Verify samples of the bulk area L0 filled.
        if bulk_words != 0 {
            for _ in 0..SAMPLES {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let addr = BULK_BASE + (x % bulk_words) * 8;
                // SAFETY: `addr` is 8-aligned and inside guest RAM
                // [BULK_BASE, mem_bytes), identity-mapped by L1's page tables.
                let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
                if v != pattern_word(seed, addr) {
                    bad += 1;
                }
            }
        }
        // (2) Rewrite page r % 16 of the working set.
        let page = WS_BASE + (r % (WS_LEN / PAGE)) * PAGE;
        for w in 0..PAGE / 8 {
            let addr = page + w * 8;
            // SAFETY: the working set is guest RAM reserved for this workload
            // (above the stack, below the bulk area); nothing else uses it.
            unsafe { core::ptr::write_volatile(addr as *mut u64, pattern_word(seed ^ r, addr)) };
        }
        // (3) Checksum the whole working set.
        // SAFETY: as above; the slice covers exactly the working set and no
        // mutable access to it is live.
        let ws =
            unsafe { core::slice::from_raw_parts(WS_BASE as *const u64, (WS_LEN / 8) as usize) };
        let sum = checksum_words(ws);
        // (4) Report.
        let _ = writeln!(out, "memtouch {name} round={r} sum={sum:016x} bad={bad}");
        if p.param0 != 0 && r == p.param0 {
            let _ = writeln!(
                out,
                "memtouch {name} done round={r} sum={sum:016x} bad={bad}"
            );
            guest_rt::halt_forever();
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    guest_rt::halt_forever()
}
