//! Interrupt mode: instead of spinning on the used ring, blkcheck sleeps in
//! `hlt` until its disk's interrupt arrives. The interrupt comes from L0's
//! irqfd through the nested VM's in-kernel 8259 PIC, so this mode shows
//! the whole interrupt path a Linux guest would use.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::outb;

/// Interrupts taken so far.
#[no_mangle]
pub static BLKCHECK_IRQS: AtomicU64 = AtomicU64::new(0);

/// Vector of PIC line 0 (lines 0..8 use vectors 0x20..0x28).
const PIC_BASE: u8 = 0x20;

global_asm!(
    ".global blkcheck_irq_entry",
    "blkcheck_irq_entry:",
    "push rax",
    "inc qword ptr [rip + {irqs}]",
    "mov al, 0x20",
    "out 0x20, al",
    "pop rax",
    "iretq",
    irqs = sym BLKCHECK_IRQS,
);

extern "C" {
    fn blkcheck_irq_entry();
}

/// 256 interrupt gates of 16 bytes.
#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

#[repr(C, packed)]
struct IdtPtr {
    limit: u16,
    base: u64,
}

/// Installs the handler for the master PIC's vectors, programs the PIC
/// with only `line` unmasked and enables interrupts.
pub fn init(line: u8) {
    let handler = blkcheck_irq_entry as *const () as usize as u64;
    let lo = (handler & 0xffff) | (0x8 << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
    let hi = handler >> 32;
    // SAFETY: the IDT is written once, before interrupts are enabled, by
    // the only vCPU; nothing else refers to it.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for v in PIC_BASE as usize..PIC_BASE as usize + 8 {
        idt.0[2 * v] = lo;
        idt.0[2 * v + 1] = hi;
    }
    let ptr = IdtPtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt.0.as_ptr() as u64,
    };
    // SAFETY: `ptr` describes the static IDT above; lidt only loads it.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
    // 8259 master: edge triggered, cascade, 8086 mode, vectors from 0x20.
    outb(0x20, 0x11);
    outb(0x21, PIC_BASE);
    outb(0x21, 0x04);
    outb(0x21, 0x01);
    outb(0x21, !(1u8 << line));
    // Slave: initialized and fully masked.
    outb(0xa0, 0x11);
    outb(0xa1, PIC_BASE + 8);
    outb(0xa1, 0x02);
    outb(0xa1, 0x01);
    outb(0xa1, 0xff);
}

/// Sleeps until `done()` holds, one interrupt at a time. `sti; hlt` is
/// atomic with respect to interrupts (the `sti` shadow), so an interrupt
/// that arrives after the check still wakes the `hlt`.
pub fn wait(mut done: impl FnMut() -> bool) {
    loop {
        // SAFETY: masks interrupts on this vCPU only.
        unsafe { asm!("cli", options(nomem, nostack)) };
        if done() {
            break;
        }
        // SAFETY: enables interrupts and waits for one.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
    // SAFETY: as above.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Interrupts taken so far.
pub fn count() -> u64 {
    BLKCHECK_IRQS.load(Ordering::Relaxed)
}
