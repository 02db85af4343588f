//! The few machine primitives every vmbeam guest needs (port I/O, TSC, a
//! serial writer for `core::fmt`, halting), so each guest stays a page of
//! logic. Built for `x86_64-unknown-none`: no SSE, no heap.
#![no_std]

use core::arch::asm;
use core::fmt;

#[cfg(feature = "virtio")]
pub mod virtio_hal;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the guest owns all its ports.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`; `memory` clobber because L0 reads guest memory
    // (the hypercall page) during this exit and writes results into it.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads a counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// Stops this vCPU for good (interrupts off, HLT in a loop).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Executes an invalid instruction (for fault tests): without an IDT this
/// becomes a triple fault.
pub fn crash() -> ! {
    // SAFETY: deliberately raises #UD; the guest has no IDT, so it shuts down.
    unsafe { asm!("ud2", options(nomem, nostack)) }
    halt_forever()
}

/// Executes an AVX instruction (for fault tests): a KVM that runs guest
/// code through its instruction emulator stops with an emulation failure;
/// elsewhere (AVX not enabled in CR4) it is #UD and a triple fault.
pub fn crash_avx() -> ! {
    // SAFETY: deliberately executes `vpxor ymm0, ymm0, ymm0` as raw bytes so
    // the compiler needs no AVX target feature; the guest stops here.
    unsafe { asm!(".byte 0xc5, 0xfd, 0xef, 0xc0", options(nomem, nostack)) }
    halt_forever()
}

/// A `core::fmt` writer to a 16550 data port (no FIFO checks: the VMM's
/// UART model is always ready).
pub struct Serial(pub u16);

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(self.0, b);
        }
        Ok(())
    }
}

/// Reads a volatile value.
///
/// # Safety
/// `p` must be aligned and point into memory the guest maps and may read
/// (its own RAM, or memory L0 shares with it).
#[inline(always)]
pub unsafe fn read_volatile<T: Copy>(p: *const T) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(p) }
}

/// Writes a volatile value.
///
/// # Safety
/// As for [`read_volatile`], and the memory must be writable by the guest.
#[inline(always)]
pub unsafe fn write_volatile<T: Copy>(p: *mut T, v: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(p, v) }
}
