//! `ticker`: a nested workload that prints a monotonic count and a
//! timestamp, so any pause of the guest shows as a gap in its console.
#![no_std]
#![no_main]

use core::fmt::Write;
use guest_rt::Serial;
use vmbeam_abi::l2::{L2BootParams, BOOT_PARAMS, CONSOLE_PORT};

#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    // SAFETY: L1 wrote the boot parameters at this fixed address before start.
    let p: L2BootParams = unsafe { core::ptr::read_volatile(BOOT_PARAMS as *const L2BootParams) };
    let mut out = Serial(CONSOLE_PORT);
    let name = vmbeam_abi::name_from_bytes(&p.name).unwrap_or("?");
    let khz = if p.tsc_khz == 0 { 1_000_000 } else { p.tsc_khz };
    let _ = writeln!(out, "ticker {name} start mem={}MiB", p.mem_bytes >> 20);
    let start = guest_rt::rdtsc();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let us = (guest_rt::rdtsc() - start) / (khz / 1000).max(1);
        let _ = writeln!(out, "tick {n} t={us}us");
        // param0: fault on purpose after that many ticks (0 = never); with
        // bit 63 set the fault is an AVX instruction instead of ud2.
        let avx = p.param0 & (1 << 63) != 0;
        let after = p.param0 & !(1 << 63);
        if after != 0 && n >= after {
            let _ = writeln!(out, "ticker {name} faulting on purpose");
            if avx {
                guest_rt::crash_avx();
            }
            guest_rt::crash();
        }
        // A short spin so the console is not flooded.
        let t0 = guest_rt::rdtsc();
        while guest_rt::rdtsc() - t0 < khz * 20 {}
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    guest_rt::halt_forever()
}
