//! `hypervisor`: the vmbeam guest hypervisor (L1).
//!
//! It runs in a host VM and drives nested guests (L2) through L0's
//! paravirtual hypercalls: a primary starts the guests listed in its boot
//! info, a successor adopts guests handed over by an aged predecessor, and
//! both then schedule them round robin. This file holds the entry point, the
//! boot checks and the state shared by the other modules.
#![no_std]
#![no_main]

/// Prints one line on the host VM's 16550 console.
macro_rules! say {
    ($($t:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!(guest_rt::Serial(vmbeam_abi::layout::CONSOLE_PORT), $($t)*);
    }};
}

mod handover;
mod health;
mod hypercall;
mod nested;
mod pool;
mod sched;
mod uart;

use vmbeam_abi::boot::{self, BootInfo, BOOT_MAGIC, MAX_NESTED};
use vmbeam_abi::hypercall::PING_XOR;
use vmbeam_abi::{layout, ABI_VERSION};

use health::Health;
use hypercall::Hypercalls;
use nested::Guest;
use pool::Pool;

// Entry from L0: rdi = boot info, rsi = vCPU index, rsp = this vCPU's stack.
// Only vCPU 0 runs the hypervisor; the stack is re-aligned for the SysV ABI.
core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    test rsi, rsi",
    "    jnz 2f",
    "    and rsp, -16",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    main = sym hv_main,
);

/// Everything the hypervisor knows; lives on vCPU 0's stack (no statics).
pub struct Hv {
    /// Where L0 put the boot info (the control word is read from there).
    pub boot_addr: u64,
    /// Copy of the boot info taken at entry.
    pub boot: BootInfo,
    /// The hypercall interface.
    pub hc: Hypercalls,
    /// Nested memory pool.
    pub pool: Pool,
    /// Nested guest table; `guests[..n_guests]` are in use.
    pub guests: [Guest; MAX_NESTED],
    /// Used entries of `guests`.
    pub n_guests: usize,
    /// Health counters.
    pub health: Health,
}

impl Hv {
    /// Reads the control word L0 may change at any time.
    pub fn control(&self) -> u32 {
        // SAFETY: the boot info page is identity-mapped RAM L0 keeps for this
        // VM; the control word is an aligned u32 inside it.
        unsafe {
            guest_rt::read_volatile((self.boot_addr + boot::CONTROL_OFFSET as u64) as *const u32)
        }
    }

    /// Name of guest `i`, for messages.
    pub fn name(&self, i: usize) -> &str {
        name_str(&self.guests[i].name)
    }
}

/// A NUL-padded name field as text ("?" if unusable).
pub fn name_str(n: &[u8; vmbeam_abi::NAME_LEN]) -> &str {
    vmbeam_abi::name_from_bytes(n).unwrap_or("?")
}

/// Sleeps in OP_WAIT forever (used when there is nothing left to do).
pub fn idle(hv: &mut Hv) -> ! {
    loop {
        let _ = hv.hc.wait(1_000_000);
    }
}

extern "C" fn hv_main(boot_addr: u64, _vcpu: u64) -> ! {
    let t0 = guest_rt::rdtsc();
    // SAFETY: L0 wrote a BootInfo at `boot_addr` (identity-mapped RAM)
    // before starting this vCPU; any bit pattern is a valid BootInfo.
    let boot: BootInfo = unsafe { core::ptr::read(boot_addr as *const BootInfo) };
    if boot.magic != BOOT_MAGIC || boot.abi_version != ABI_VERSION {
        say!(
            "vmbeam guest hypervisor: bad boot info (magic {:x} abi {}), halting",
            boot.magic,
            boot.abi_version
        );
        guest_rt::halt_forever();
    }
    let successor = boot.role == boot::ROLE_SUCCESSOR;
    say!(
        "vmbeam guest hypervisor v{} abi {}: vm={} gen={} role={} ram={}MiB pool={}MiB vcpus={}",
        env!("CARGO_PKG_VERSION"),
        ABI_VERSION,
        name_str(&boot.name),
        boot.generation,
        if successor { "successor" } else { "primary" },
        boot.ram_size >> 20,
        boot.pool_size >> 20,
        boot.vcpus
    );
    let page = match boot.hypercall_page_base {
        0 => layout::hypercall_page(0),
        p => p,
    };
    let mut hv = Hv {
        boot_addr,
        boot,
        hc: Hypercalls::new(page),
        pool: Pool::new(boot.pool_base, boot.pool_size),
        guests: [Guest::empty(); MAX_NESTED],
        n_guests: 0,
        health: Health::new(t0),
    };

    if boot.age_leak_pages != 0 {
        say!(
            "aging injector on: leaking {} page(s) of the nested pool per nested run",
            boot.age_leak_pages
        );
    }

    const PING: u64 = 0x0123_4567_89ab_cdef;
    match hv.hc.ping(PING) {
        Ok((abi, x)) if abi == ABI_VERSION as u64 && x == PING ^ PING_XOR => {
            say!("hypercall ping ok (abi {ABI_VERSION})");
        }
        Ok((abi, x)) => {
            say!("hypercall ping: bad answer abi={abi} xor={x:x}, halting");
            guest_rt::halt_forever();
        }
        Err(s) => {
            say!("hypercall ping failed: {s:?}, halting");
            guest_rt::halt_forever();
        }
    }

    match boot.role {
        boot::ROLE_PRIMARY => {
            nested::start_all(&mut hv);
            sched::run(&mut hv)
        }
        boot::ROLE_SUCCESSOR => handover::successor(&mut hv),
        r => {
            say!("unknown role {r}, halting");
            guest_rt::halt_forever()
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("hypervisor panic: {}", info.message());
    guest_rt::halt_forever()
}
