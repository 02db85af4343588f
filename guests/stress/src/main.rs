//! `stress`: a test-only guest hypervisor that uses every vCPU to push L0
//! to its bounds, for the tests of L0's resource bounds and races.
//!
//! Its modes are bits of `BootInfo.flags` (`vmbeam_abi::boot::stress`) and
//! combine:
//! - `RACE`: all vCPUs, in lock step (a barrier in shared RAM), VM_MAP the
//!   same L1 range into their own nested VMs and VM_CREATE the same name;
//!   at most one may win each round.
//! - `CHURN` (vCPU 0): creates nested VMs until L0 refuses, then cycles
//!   10 000 fresh names through VM_CREATE/CONSOLE_WRITE/VM_DESTROY, and
//!   goes on cycling.
//! - `FLOOD` (vCPU 1): writes a nested guest's console as fast as it can.
//! - `SPIN` (vCPUs 2 and 3, or all when alone): RUNs nested guests that
//!   never exit (`jmp $`), asking for the longest slice.
//! - `IRQ` (vCPU 0): a nested guest whose IDT counts interrupts: it
//!   injects vectors while the guest has interrupts disabled and enabled,
//!   and reads back what the guest counted.
//! - `STEAL` (vCPU 0): tries, over and over, to take another host VM's
//!   guest's name (`stress::STEAL_NAME`) with VM_CREATE, and writes
//!   `STOLEN` into its console whenever it gets it.
//!
//! Every vCPU reports with CONSOLE_WRITE to its own console, one whole
//! line per call, prefixed `stress: `; a line containing `UNEXPECTED`
//! means L0 broke a rule.
#![no_std]
#![no_main]

use core::fmt::{self, Write as _};
use core::ptr::{addr_of, addr_of_mut};

use vmbeam_abi::boot::{stress, BootInfo, BOOT_MAGIC, MAX_NESTED};
use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE, HYPERCALL_PORT};
use vmbeam_abi::{ABI_VERSION, NAME_LEN};

mod irq;

// Entry from L0: rdi = boot info, rsi = vCPU index, rsp = this vCPU's stack.
core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    main = sym stress_main,
);

/// 2 MiB.
const M2: u64 = EXTENT_SIZE;
/// Fresh names cycled by CHURN before it reports.
const CHURN_NAMES: u32 = 10_000;
/// Rounds of RACE.
const RACE_ROUNDS: u64 = 32;
/// Most vCPUs (one slot each in the shared words below).
const VCPUS: usize = layout::MAX_VCPUS as usize;

/// Words shared by the vCPUs: barrier counters (one per vCPU, written only
/// by it) and per-round results.
struct Shared {
    arrived: [u64; VCPUS],
    map_won: [u64; VCPUS],
    dup_won: [u64; VCPUS],
}

static mut SHARED: Shared = Shared {
    arrived: [0; VCPUS],
    map_won: [0; VCPUS],
    dup_won: [0; VCPUS],
};

fn put(word: *mut u64, v: u64) {
    // SAFETY: `word` points into SHARED, which lives for the whole run;
    // each word is written by one vCPU and read by others with volatile
    // accesses (aligned u64 accesses are atomic on x86).
    unsafe { word.write_volatile(v) }
}

fn get(word: *const u64) -> u64 {
    // SAFETY: as in `put`.
    unsafe { word.read_volatile() }
}

/// Waits until every one of `n` vCPUs has reached barrier `round`.
fn barrier(me: usize, n: usize, round: u64) {
    // SAFETY: only the address of the static is taken.
    let arrived = unsafe { addr_of_mut!(SHARED.arrived) } as *mut u64;
    // SAFETY: `me < VCPUS`.
    put(unsafe { arrived.add(me) }, round);
    // SAFETY: `j < n <= VCPUS`.
    while (0..n).any(|j| get(unsafe { arrived.add(j) }) < round) {
        core::hint::spin_loop();
    }
}

/// This vCPU's hypercall page.
pub struct Hc {
    page: *mut HypercallPage,
}

impl Hc {
    /// Calls `op` with `args`; the status, decoded.
    pub fn call(&mut self, op: u32, args: &[u64]) -> Result<(), Status> {
        let p = self.page;
        // SAFETY: `p` is this vCPU's hypercall page, identity-mapped RAM
        // that only this vCPU and L0 (during the `out`) touch.
        unsafe {
            addr_of_mut!((*p).status).write_volatile(1);
            let a = addr_of_mut!((*p).args) as *mut u64;
            for i in 0..8 {
                a.add(i).write_volatile(args.get(i).copied().unwrap_or(0));
            }
        }
        guest_rt::outl(HYPERCALL_PORT, op);
        // SAFETY: as above.
        let st = unsafe { addr_of!((*p).status).read_volatile() };
        match Status::from_i32(st) {
            Some(Status::Ok) => Ok(()),
            Some(s) => Err(s),
            None => Err(Status::Internal),
        }
    }

    /// Result word `i` of the last call.
    pub fn ret(&self, i: usize) -> u64 {
        // SAFETY: see `call`; `i` is clamped into the array.
        unsafe {
            (addr_of!((*self.page).ret) as *const u64)
                .add(i.min(7))
                .read_volatile()
        }
    }

    fn put_data(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(DATA_LEN);
        // SAFETY: see `call`; `n` fits the data area.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                addr_of_mut!((*self.page).data) as *mut u8,
                n,
            )
        }
        n
    }

    /// VM_CREATE `name`; the handle.
    pub fn create(&mut self, name: &[u8; NAME_LEN]) -> Result<u64, Status> {
        self.put_data(name);
        self.call(OP_VM_CREATE, &[]).map(|()| self.ret(0))
    }

    /// CONSOLE_WRITE of `bytes` to `handle`.
    pub fn console(&mut self, handle: u64, bytes: &[u8]) -> Result<(), Status> {
        let n = self.put_data(bytes);
        self.call(OP_CONSOLE_WRITE, &[handle, n as u64])
    }

    /// The vCPU state field, as L0 left it.
    pub fn state(&self) -> vmbeam_abi::state::VcpuState {
        // SAFETY: see `call`; any bit pattern is a valid VcpuState.
        unsafe { addr_of!((*self.page).state).read_volatile() }
    }

    /// Overwrites the vCPU state field.
    pub fn set_state(&mut self, s: &vmbeam_abi::state::VcpuState) {
        // SAFETY: see `call`.
        unsafe { addr_of_mut!((*self.page).state).write_volatile(*s) }
    }

    /// The exit field, as L0 left it.
    pub fn exit(&self) -> NestedExit {
        // SAFETY: see `call`; any bit pattern is a valid NestedExit.
        unsafe { addr_of!((*self.page).exit).read_volatile() }
    }
}

/// One console line, sent whole with CONSOLE_WRITE.
pub struct Line {
    buf: [u8; 200],
    len: usize,
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// Prints one line on this host VM's console.
pub fn say_line(hc: &mut Hc, args: fmt::Arguments) {
    let mut l = Line {
        buf: [0; 200],
        len: 0,
    };
    let _ = l.write_str("stress: ");
    let _ = l.write_fmt(args);
    let _ = hc.console(CONSOLE_SELF, &l.buf[..l.len]);
}

macro_rules! say {
    ($hc:expr, $($t:tt)*) => { $crate::say_line($hc, format_args!($($t)*)) };
}
pub(crate) use say;

/// `prefix` followed by the decimal digits of `n`, NUL-padded.
fn name(prefix: &[u8], n: u64) -> [u8; NAME_LEN] {
    let mut b = [0u8; NAME_LEN];
    b[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 20];
    let mut k = 0;
    let mut v = n;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..k.min(NAME_LEN - prefix.len()) {
        b[prefix.len() + i] = digits[k - 1 - i];
    }
    b
}

/// Writes `bytes` at L1 physical address `at` (identity-mapped).
pub fn poke(at: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: callers pass pool memory of their own nested VM, which
        // L0's page tables identity-map and only that VM and we use.
        unsafe { guest_rt::write_volatile((at + i as u64) as *mut u8, b) };
    }
}

/// Creates nested VM `n` on pool extent `extent`, running the real-mode
/// `code` at address 0, with one vCPU; its handle.
pub fn real_mode_vm(
    hc: &mut Hc,
    n: &[u8; NAME_LEN],
    pool: u64,
    extent: u64,
    code: &[u8],
) -> Result<u64, Status> {
    let h = hc.create(n)?;
    let l1 = pool + extent * M2;
    hc.call(OP_VM_MAP, &[h, l1, 0, M2])?;
    poke(l1, code);
    hc.call(OP_VCPU_CREATE, &[h])?;
    hc.call(OP_VCPU_GET_STATE, &[h, 0, 0])?;
    let mut s = hc.state();
    s.sregs.cs.base = 0;
    s.sregs.cs.selector = 0;
    s.regs.rip = 0;
    s.regs.rsp = 0x1000;
    s.sregs.ss.base = 0;
    s.sregs.ss.selector = 0;
    s.sregs.ds.base = 0;
    s.sregs.ds.selector = 0;
    s.regs.rflags = 2;
    hc.set_state(&s);
    hc.call(OP_VCPU_SET_STATE, &[h, 0])?;
    Ok(h)
}

extern "C" fn stress_main(boot_addr: u64, vcpu: u64) -> ! {
    // SAFETY: L0 wrote a BootInfo at `boot_addr` before starting this vCPU.
    let boot: BootInfo = unsafe { core::ptr::read_volatile(boot_addr as *const BootInfo) };
    let me = vcpu as usize;
    let mut hc = Hc {
        page: layout::hypercall_page(vcpu as u32) as *mut HypercallPage,
    };
    if boot.magic != BOOT_MAGIC || boot.abi_version != ABI_VERSION || me >= VCPUS {
        guest_rt::halt_forever();
    }
    let n = (boot.vcpus as usize).min(VCPUS);
    let f = boot.flags;
    let pool = boot.pool_base;
    if me == 0 {
        say!(&mut hc, "start: {} vCPUs, flags {:#x}", n, f >> 32);
    }
    // Extents: [0, 8) per-vCPU work, [8, 8 + RACE_ROUNDS) race targets.
    if f & stress::RACE != 0 {
        race(&mut hc, me, n, pool);
    }
    let alone = f & (stress::CHURN | stress::FLOOD | stress::IRQ | stress::STEAL) == 0;
    match me {
        0 if f & stress::IRQ != 0 => irq::run(&mut hc, pool),
        0 if f & stress::STEAL != 0 => steal(&mut hc),
        0 if f & stress::CHURN != 0 => churn(&mut hc),
        1 if f & stress::FLOOD != 0 => flood(&mut hc),
        _ if f & stress::SPIN != 0 && (alone || me >= 2) => spin(&mut hc, me, pool),
        _ => {}
    }
    loop {
        let _ = hc.call(OP_WAIT, &[1_000_000]);
    }
}

fn race(hc: &mut Hc, me: usize, n: usize, pool: u64) {
    // SAFETY: only addresses of the static are taken.
    let map_won = unsafe { addr_of_mut!(SHARED.map_won) } as *mut u64;
    // SAFETY: as above.
    let dup_won = unsafe { addr_of_mut!(SHARED.dup_won) } as *mut u64;
    let (mut worst_map, mut worst_dup, mut bad) = (0, 0, 0);
    for round in 0..RACE_ROUNDS {
        let b = round * 4;
        let own = hc.create(&name(b"race", round * VCPUS as u64 + me as u64));
        barrier(me, n, b + 1);
        // Everyone maps the same L1 extent into its own VM, and creates
        // the same name.
        let target = pool + (8 + round) * M2;
        let mapped = match own {
            Ok(h) => hc.call(OP_VM_MAP, &[h, target, 0, M2]).is_ok(),
            Err(_) => false,
        };
        let dup = hc.create(&name(b"dup", round));
        // SAFETY: `me < VCPUS`.
        put(unsafe { map_won.add(me) }, mapped as u64);
        // SAFETY: as above.
        put(unsafe { dup_won.add(me) }, dup.is_ok() as u64);
        barrier(me, n, b + 2);
        if me == 0 {
            // SAFETY: `j < n <= VCPUS`.
            let maps: u64 = (0..n).map(|j| get(unsafe { map_won.add(j) })).sum();
            // SAFETY: as above.
            let dups: u64 = (0..n).map(|j| get(unsafe { dup_won.add(j) })).sum();
            worst_map = worst_map.max(maps);
            worst_dup = worst_dup.max(dups);
            if maps > 1 || dups != 1 {
                bad += 1;
            }
        }
        barrier(me, n, b + 3);
        if let Ok(h) = own {
            let _ = hc.call(OP_VM_DESTROY, &[h]);
        }
        if let Ok(h) = dup {
            let _ = hc.call(OP_VM_DESTROY, &[h]);
        }
        barrier(me, n, b + 4);
    }
    if me == 0 {
        say!(
            hc,
            "race done: {} rounds on {} vCPUs, most map winners {}, most name winners {}{}",
            RACE_ROUNDS,
            n,
            worst_map,
            worst_dup,
            if bad == 0 { "" } else { " UNEXPECTED" }
        );
    }
}

fn steal(hc: &mut Hc) -> ! {
    let mut victim = [0u8; NAME_LEN];
    victim[..stress::STEAL_NAME.len()].copy_from_slice(stress::STEAL_NAME.as_bytes());
    let (mut tries, mut taken) = (0u64, 0u64);
    loop {
        tries += 1;
        if let Ok(h) = hc.create(&victim) {
            taken += 1;
            let _ = hc.console(h, b"STOLEN by the stress guest hypervisor");
            let _ = hc.call(OP_VM_DESTROY, &[h]);
        }
        if tries % 1000 == 0 {
            say!(
                hc,
                "steal: {} tries, {} taken{}",
                tries,
                taken,
                if taken == 0 { "" } else { " UNEXPECTED" }
            );
        }
    }
}

fn churn(hc: &mut Hc) {
    // The bound first: nested VMs until L0 refuses.
    let mut handles = [0u64; MAX_NESTED + 8];
    let mut made = 0;
    let mut refusal = Ok(());
    for (i, slot) in handles.iter_mut().enumerate() {
        match hc.create(&name(b"bound", i as u64)) {
            Ok(h) => {
                *slot = h;
                made += 1;
            }
            Err(s) => {
                refusal = Err(s);
                break;
            }
        }
    }
    for h in &handles[..made] {
        let _ = hc.call(OP_VM_DESTROY, &[*h]);
    }
    say!(hc, "bound: {} nested VMs, then {:?}", made, refusal);
    let mut i: u64 = 0;
    let mut failed = 0u64;
    loop {
        match hc.create(&name(b"churn", i)) {
            Ok(h) => {
                if hc.console(h, b"hello").is_err() {
                    failed += 1;
                }
                if hc.call(OP_VM_DESTROY, &[h]).is_err() {
                    failed += 1;
                }
            }
            Err(_) => failed += 1,
        }
        i += 1;
        if i == CHURN_NAMES as u64 {
            say!(hc, "churn done: {} names, {} failed calls", i, failed);
        } else if i.is_multiple_of(1000) {
            say!(hc, "churn: {} names, {} failed calls", i, failed);
        }
    }
}

fn flood(hc: &mut Hc) {
    let Ok(h) = hc.create(&name(b"flood", 0)) else {
        say!(hc, "flood: cannot create its guest UNEXPECTED");
        return;
    };
    let line = [b'#'; DATA_LEN];
    let (mut calls, mut refused, mut other) = (0u64, 0u64, 0u64);
    loop {
        match hc.console(h, &line) {
            Ok(()) => {}
            Err(Status::TooMany) => refused += 1,
            Err(_) => other += 1,
        }
        calls += 1;
        if calls.is_multiple_of(4096) {
            say!(
                hc,
                "flood: {} lines, {} refused{}",
                calls,
                refused,
                if other == 0 { "" } else { " UNEXPECTED" }
            );
        }
    }
}

fn spin(hc: &mut Hc, me: usize, pool: u64) {
    let h = match real_mode_vm(
        hc,
        &name(b"spin", me as u64),
        pool,
        me as u64,
        &[0xeb, 0xfe],
    ) {
        Ok(h) => h,
        Err(s) => {
            say!(hc, "spin{}: set-up failed: {:?} UNEXPECTED", me, s);
            return;
        }
    };
    say!(hc, "spin{}: running", me);
    let mut runs = 0u64;
    loop {
        match hc.call(OP_VCPU_RUN, &[h, 0, u64::MAX, 0]) {
            Ok(()) if hc.exit().reason == exit::SLICE => {}
            r => {
                say!(
                    hc,
                    "spin{}: RUN gave {:?} exit {} UNEXPECTED",
                    me,
                    r,
                    hc.exit().reason
                );
                return;
            }
        }
        runs += 1;
        if runs.is_multiple_of(8) {
            say!(hc, "spin{}: {} slices", me, runs);
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    guest_rt::halt_forever()
}
