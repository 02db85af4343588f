//! `hostile`: a deliberately hostile guest hypervisor, for tests of L0.
//!
//! It is entered like the real guest hypervisor (rdi = boot info address,
//! rsi = vCPU index; only vCPU 0 does anything) but, instead of running
//! nested guests, it throws a table of malformed, out-of-range and
//! out-of-role hypercalls at L0 and checks that each one is refused with the
//! status the ABI promises. Every case prints one console line
//! `hostile: {case} -> {status:?} {ok|UNEXPECTED}`. One legitimate sequence
//! (create, map, vCPU, destroy) must then still work. The run ends with
//! `hostile: done {n_ok} ok {n_bad} unexpected`, after which the guest idles
//! in OP_WAIT forever so the host VM keeps running.
//!
//! Booted as a *successor* (boot info role `ROLE_SUCCESSOR`, see
//! `RejuvenateOptions::successor_image`) it runs the script of
//! [`successor`] instead: a successor that tries to take or harm the guests
//! it is offered, printing `hostile-successor: ...` lines.
#![no_std]
#![no_main]

use core::fmt;
use core::ptr::{addr_of, addr_of_mut};

use vmbeam_abi::boot::{BootInfo, BOOT_MAGIC, MAX_NESTED, ROLE_SUCCESSOR};
use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, EXTENT_SIZE, HYPERCALL_PORT};
use vmbeam_abi::state::VcpuState;
use vmbeam_abi::{name_to_bytes, ABI_VERSION, NAME_LEN};

/// Prints one line on the host VM's 16550 console.
macro_rules! say {
    ($($t:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!(guest_rt::Serial(layout::CONSOLE_PORT), $($t)*);
    }};
}

mod aged;
mod successor;

// Entry from L0: rdi = boot info, rsi = vCPU index, rsp = this vCPU's stack.
// vCPU 0 runs the script; the others wait to race a VM_CREATE for it (see
// `successor::racer`). The stack is re-aligned for the SysV ABI.
core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    test rsi, rsi",
    "    jnz 3f",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    "3:  call {racer}",
    "    jmp 2b",
    main = sym hostile_main,
    racer = sym successor::racer,
);

/// 2 MiB: the extent size every nested mapping must be aligned to.
const M2: u64 = EXTENT_SIZE;
/// Highest nested guest-physical address L0 accepts (64 GiB).
const L2_LIMIT: u64 = vmbeam_abi::l2::MAX_GIB << 30;
/// An aligned address whose 2 MiB-multiple successor overflows a u64.
const TOP: u64 = 0u64.wrapping_sub(M2);
/// A handle L0 never hands out this early.
const BOGUS: u64 = 0xdead;
/// Value written to `status` before each call, so an unanswered call shows.
const SENTINEL: i32 = 0x5eed_0bad;

/// A status as L0 wrote it: a known [`Status`] or an unknown raw word.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Got {
    S(Status),
    Raw(i32),
}

impl fmt::Debug for Got {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Got::S(s) => s.fmt(f),
            Got::Raw(v) => write!(f, "status({v})"),
        }
    }
}

const OK: Got = Got::S(Status::Ok);

/// What a case expects.
#[derive(Clone, Copy)]
enum Want {
    /// Exactly this status.
    Is(Status),
    /// Any refusal L0 defines (not Ok, not an unanswered call).
    Refused,
    /// Either of two statuses.
    Either(Status, Status),
}

/// This vCPU's hypercall page.
struct Hc {
    page: *mut HypercallPage,
}

impl Hc {
    /// Writes `op` and `args` (rest zero), rings L0 and decodes the status.
    fn call(&mut self, op: u32, args: &[u64]) -> Got {
        let p = self.page;
        // SAFETY: `p` is vCPU 0's hypercall page, identity-mapped RAM that only
        // this vCPU and L0 (during the `out` below) touch.
        unsafe {
            addr_of_mut!((*p).op).write_volatile(op);
            addr_of_mut!((*p).status).write_volatile(SENTINEL);
            let a = addr_of_mut!((*p).args) as *mut u64;
            for i in 0..8 {
                a.add(i).write_volatile(args.get(i).copied().unwrap_or(0));
            }
        }
        guest_rt::outl(HYPERCALL_PORT, op);
        // SAFETY: as above; L0 wrote the results during the `out`.
        let st = unsafe { addr_of!((*p).status).read_volatile() };
        match Status::from_i32(st) {
            Some(s) => Got::S(s),
            None => Got::Raw(st),
        }
    }

    /// Result word `i` (< 8) of the last call.
    fn ret(&self, i: usize) -> u64 {
        // SAFETY: see `call`; every caller passes `i < 8`.
        unsafe {
            (addr_of!((*self.page).ret) as *const u64)
                .add(i.min(7))
                .read_volatile()
        }
    }

    /// Puts `bytes` (at most `DATA_LEN`) at the start of the data area.
    fn put_data(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(DATA_LEN);
        // SAFETY: see `call`; `n` fits the data area.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                addr_of_mut!((*self.page).data) as *mut u8,
                n,
            )
        }
    }

    /// The `state` field, as L0 left it.
    fn state(&self) -> VcpuState {
        // SAFETY: see `call`; any bit pattern is a valid VcpuState.
        unsafe { addr_of!((*self.page).state).read_volatile() }
    }

    /// The `exit` field, as L0 left it.
    fn exit(&self) -> NestedExit {
        // SAFETY: see `call`; any bit pattern is a valid NestedExit.
        unsafe { addr_of!((*self.page).exit).read_volatile() }
    }

    /// Overwrites the `state` field.
    fn set_state(&mut self, s: &VcpuState) {
        // SAFETY: see `call`.
        unsafe { addr_of_mut!((*self.page).state).write_volatile(*s) }
    }

    /// Fills the `state` field with `byte`.
    fn fill_state(&mut self, byte: u8) {
        // SAFETY: see `call`; the write covers exactly the `state` field.
        unsafe {
            core::ptr::write_bytes(
                addr_of_mut!((*self.page).state) as *mut u8,
                byte,
                core::mem::size_of::<VcpuState>(),
            )
        }
    }

    /// OP_VM_CREATE of a raw name field; returns the status and the handle.
    fn create(&mut self, name: &[u8; NAME_LEN]) -> (Got, u64) {
        self.put_data(name);
        let g = self.call(OP_VM_CREATE, &[]);
        (g, if g == OK { self.ret(0) } else { 0 })
    }
}

/// The case runner: issues calls, compares, prints and counts.
struct Run {
    hc: Hc,
    /// Prefix of every line (`hostile` or `hostile-successor`).
    tag: &'static str,
    ok: u32,
    bad: u32,
}

impl Run {
    /// Records `case` with result `got` against `want`.
    fn check(&mut self, case: &str, got: Got, want: Want) -> bool {
        let pass = match want {
            Want::Is(s) => got == Got::S(s),
            Want::Refused => matches!(got, Got::S(s) if s != Status::Ok),
            Want::Either(a, b) => got == Got::S(a) || got == Got::S(b),
        };
        self.tally(case, got, pass)
    }

    /// Issues OP_VCPU_RUN and checks it returns Ok with exit `reason`.
    fn run(&mut self, case: &str, args: &[u64], reason: u32) -> NestedExit {
        let g = self.hc.call(OP_VCPU_RUN, args);
        let e = self.hc.exit();
        say!(
            "hostile: ({case}: exit reason {} port {:#x} detail {:#x})",
            e.reason,
            e.port,
            e.detail
        );
        self.tally(case, g, g == OK && e.reason == reason);
        e
    }

    /// Counts and prints one case.
    fn tally(&mut self, case: &str, got: Got, pass: bool) -> bool {
        if pass {
            self.ok += 1;
        } else {
            self.bad += 1;
        }
        let verdict = if pass { "ok" } else { "UNEXPECTED" };
        say!("{}: {case} -> {got:?} {verdict}", self.tag);
        pass
    }

    /// Issues `op(args)` and checks the status is `want`.
    fn expect(&mut self, case: &str, op: u32, args: &[u64], want: Status) -> Got {
        let g = self.hc.call(op, args);
        self.check(case, g, Want::Is(want));
        g
    }

    /// Creates a nested VM that later cases need; checked as a case.
    fn create(&mut self, case: &str, name: &str) -> u64 {
        let (g, h) = self.hc.create(&name_to_bytes(name));
        self.check(case, g, Want::Is(Status::Ok));
        h
    }
}

/// Name `prefix` followed by two decimal digits of `i`.
fn numbered(prefix: &[u8], i: usize) -> [u8; NAME_LEN] {
    let mut n = [0u8; NAME_LEN];
    let k = prefix.len().min(NAME_LEN - 2);
    n[..k].copy_from_slice(&prefix[..k]);
    n[k] = b'0' + (i / 10 % 10) as u8;
    n[k + 1] = b'0' + (i % 10) as u8;
    n
}

extern "C" fn hostile_main(boot_addr: u64, _vcpu: u64) -> ! {
    // SAFETY: L0 wrote a BootInfo at `boot_addr` (identity-mapped RAM)
    // before starting this vCPU; any bit pattern is a valid BootInfo.
    let boot: BootInfo = unsafe { core::ptr::read_volatile(boot_addr as *const BootInfo) };
    if boot.magic != BOOT_MAGIC || boot.abi_version != ABI_VERSION {
        say!("hostile: bad boot info, halting");
        guest_rt::halt_forever();
    }
    let page = match boot.hypercall_page_base {
        0 => layout::hypercall_page(0),
        p => p,
    };
    let hc = Hc {
        page: page as *mut HypercallPage,
    };
    if boot.role == ROLE_SUCCESSOR {
        successor::run(
            Run {
                hc,
                tag: successor::TAG,
                ok: 0,
                bad: 0,
            },
            &boot,
        );
    }
    let pool = boot.pool_base;
    let pool_end = pool + boot.pool_size;
    say!(
        "hostile: start: pool {:#x}..{:#x}, ram {} MiB",
        pool,
        pool_end,
        boot.ram_size >> 20
    );
    let mut r = Run {
        hc,
        tag: "hostile",
        ok: 0,
        bad: 0,
    };
    if boot.pool_size < 48 << 20 {
        say!("hostile: pool smaller than 48 MiB, cannot run the cases UNEXPECTED");
        r.bad += 1;
    } else {
        attack(&mut r, pool, pool_end);
    }
    say!("hostile: done {} ok {} unexpected", r.ok, r.bad);
    // As an aged guest hypervisor: answer the first handover request with
    // the probe of `aged`.
    let control = (boot_addr + vmbeam_abi::boot::CONTROL_OFFSET as u64) as *const u32;
    let mut probed = false;
    loop {
        // SAFETY: the boot info page is identity-mapped RAM L0 keeps for
        // this VM; the control word is an aligned u32 inside it.
        let c = unsafe { control.read_volatile() };
        if c == vmbeam_abi::boot::control::HANDOVER && !probed {
            probed = true;
            aged::run(
                Run {
                    hc: Hc { page: r.hc.page },
                    tag: "hostile-aged",
                    ok: 0,
                    bad: 0,
                },
                pool,
                boot.pool_size,
            );
        }
        let _ = r.hc.call(OP_WAIT, &[20_000]);
    }
}

/// The table of hostile cases, then the legitimate sequence.
fn attack(r: &mut Run, pool: u64, pool_end: u64) {
    use Status::*;

    // Unknown ops.
    r.expect("op 0", 0, &[], BadOp);
    r.expect("op 5 (unassigned)", 5, &[], BadOp);
    r.expect("op 19 (unassigned)", 19, &[], BadOp);
    r.expect("op 0xffffffff", u32::MAX, &[], BadOp);

    // Bad names.
    let (g, _) = r.hc.create(&[0; NAME_LEN]);
    r.check("VM_CREATE empty name", g, Want::Is(BadArg));
    let mut raw = [0u8; NAME_LEN];
    raw[..4].copy_from_slice(&[0xff, 0xfe, b'x', 0x80]);
    let (g, _) = r.hc.create(&raw);
    r.check("VM_CREATE non-UTF-8 name", g, Want::Is(BadArg));
    let (g, _) = r.hc.create(&name_to_bytes("bad name"));
    r.check("VM_CREATE name with space", g, Want::Is(BadArg));
    let (g, _) = r.hc.create(&name_to_bytes("../etc"));
    r.check("VM_CREATE name with slash", g, Want::Is(BadArg));
    let (g, _) = r.hc.create(&name_to_bytes("a\nb"));
    r.check("VM_CREATE name with newline", g, Want::Is(BadArg));

    let ha = r.create("VM_CREATE hostile-a (setup)", "hostile-a");
    let (g, _) = r.hc.create(&name_to_bytes("hostile-a"));
    r.check("VM_CREATE duplicate name", g, Want::Is(BadArg));
    // The name of a guest another host VM may run in the same VMM (its
    // first guest): refused while that guest holds it; with no such
    // neighbour it is free, so it is created and destroyed again. The
    // host side knows which applies and checks the line.
    let (g, h) = r.hc.create(&name_to_bytes("l2-0"));
    r.check(
        "VM_CREATE l2-0 (a name a neighbour may hold)",
        g,
        Want::Either(NotPermitted, Ok),
    );
    if g == OK {
        r.expect("VM_DESTROY l2-0", OP_VM_DESTROY, &[h], Ok);
    }
    let hb = r.create("VM_CREATE hostile-b (setup)", "hostile-b");

    // VM_MAP: ownership, ranges, alignment, overlaps, limits.
    let far = 1 << 30; // a free nested address
    r.expect(
        "VM_MAP first slot (setup)",
        OP_VM_MAP,
        &[ha, pool, 0, M2],
        Ok,
    );
    r.expect(
        "VM_MAP of L1 RAM",
        OP_VM_MAP,
        &[ha, 0x40_0000, far, M2],
        OutOfRange,
    );
    r.expect(
        "VM_MAP of L1 GPA 0",
        OP_VM_MAP,
        &[ha, 0, far, M2],
        OutOfRange,
    );
    let ch = layout::CHANNEL_BASE;
    r.expect(
        "VM_MAP of the channel",
        OP_VM_MAP,
        &[ha, ch, far, M2],
        OutOfRange,
    );
    let gw = layout::GRANT_BASE;
    r.expect(
        "VM_MAP of the grant window",
        OP_VM_MAP,
        &[ha, gw, far, M2],
        OutOfRange,
    );
    r.expect(
        "VM_MAP beyond pool end",
        OP_VM_MAP,
        &[ha, pool_end, far, M2],
        OutOfRange,
    );
    let a = [ha, pool_end - M2, far, 2 * M2];
    r.expect("VM_MAP across pool end", OP_VM_MAP, &a, OutOfRange);
    r.expect(
        "VM_MAP L1 end overflows u64",
        OP_VM_MAP,
        &[ha, TOP, far, 2 * M2],
        OutOfRange,
    );
    r.expect(
        "VM_MAP length overflows u64",
        OP_VM_MAP,
        &[ha, pool, far, TOP],
        OutOfRange,
    );
    let free = pool + 20 * M2; // never mapped by anyone
    let a = [ha, free + 0x1000, far, M2];
    r.expect("VM_MAP misaligned l1", OP_VM_MAP, &a, Misaligned);
    r.expect(
        "VM_MAP misaligned l2",
        OP_VM_MAP,
        &[ha, free, 0x1000, M2],
        Misaligned,
    );
    r.expect(
        "VM_MAP misaligned len",
        OP_VM_MAP,
        &[ha, free, far, 0x1000],
        Misaligned,
    );
    r.expect("VM_MAP zero length", OP_VM_MAP, &[ha, free, far, 0], BadArg);
    r.expect(
        "VM_MAP L2 overlap",
        OP_VM_MAP,
        &[ha, pool + M2, 0, M2],
        Overlap,
    );
    let a = [ha, pool + M2, 0, 2 * M2];
    r.expect("VM_MAP L2 partial overlap", OP_VM_MAP, &a, Overlap);
    r.expect(
        "VM_MAP same L1 range twice",
        OP_VM_MAP,
        &[ha, pool, far, M2],
        Overlap,
    );
    r.expect(
        "VM_MAP pool of VM a into VM b",
        OP_VM_MAP,
        &[hb, pool, 0, M2],
        Overlap,
    );
    let a = [hb, pool, 0, 2 * M2];
    r.expect("VM_MAP pool half of VM a into VM b", OP_VM_MAP, &a, Overlap);
    let a = [ha, pool + M2, L2_LIMIT, M2];
    r.expect("VM_MAP L2 at nested limit", OP_VM_MAP, &a, OutOfRange);
    let a = [ha, pool + M2, L2_LIMIT - M2, 2 * M2];
    r.expect("VM_MAP L2 across nested limit", OP_VM_MAP, &a, OutOfRange);
    r.expect(
        "VM_MAP L2 end overflows u64",
        OP_VM_MAP,
        &[ha, pool + M2, TOP, M2],
        OutOfRange,
    );
    r.expect(
        "VM_MAP bogus handle",
        OP_VM_MAP,
        &[BOGUS, free, 0, M2],
        NoSuchHandle,
    );
    r.expect(
        "VM_MAP handle 0",
        OP_VM_MAP,
        &[0, free, 0, M2],
        NoSuchHandle,
    );
    let a = [ha + (1 << 32), free, far, M2];
    r.expect("VM_MAP handle a+2^32", OP_VM_MAP, &a, NoSuchHandle);
    // Fill VM a up to the slot limit, then one more.
    let mut fill = OK;
    for k in 1..16 {
        let g = r.hc.call(OP_VM_MAP, &[ha, pool + k * M2, k * M2, M2]);
        if g != OK && fill == OK {
            fill = g;
        }
    }
    r.check("VM_MAP slots 2..16 (setup)", fill, Want::Is(Ok));
    let a = [ha, pool + 16 * M2, 16 * M2, M2];
    r.expect("VM_MAP 17th slot", OP_VM_MAP, &a, TooMany);

    // vCPUs.
    r.expect(
        "VCPU_CREATE bogus handle",
        OP_VCPU_CREATE,
        &[BOGUS],
        NoSuchHandle,
    );
    let mut vc = OK;
    for i in 0..4 {
        let g = r.hc.call(OP_VCPU_CREATE, &[ha]);
        if (g != OK || r.hc.ret(0) != i) && vc == OK {
            vc = if g == OK { Got::Raw(0) } else { g };
        }
    }
    r.check("VCPU_CREATE 4 vCPUs (setup)", vc, Want::Is(Ok));
    r.expect("VCPU_CREATE 5th vCPU", OP_VCPU_CREATE, &[ha], TooMany);
    let op = OP_VCPU_GET_STATE;
    r.expect(
        "VCPU_GET_STATE bogus handle",
        op,
        &[BOGUS, 0, 0],
        NoSuchHandle,
    );
    r.expect("VCPU_GET_STATE vCPU 4", op, &[ha, 4, 0], NoSuchHandle);
    r.expect(
        "VCPU_GET_STATE vCPU 2^63",
        op,
        &[ha, 1 << 63, 0],
        NoSuchHandle,
    );
    let op = OP_VCPU_SET_STATE;
    r.expect("VCPU_SET_STATE bogus handle", op, &[BOGUS, 0], NoSuchHandle);
    r.expect("VCPU_SET_STATE vCPU 4", op, &[ha, 4], NoSuchHandle);
    let op = OP_VCPU_RUN;
    r.expect(
        "VCPU_RUN bogus handle",
        op,
        &[BOGUS, 0, 1000, 0],
        NoSuchHandle,
    );
    r.expect("VCPU_RUN vCPU 4", op, &[ha, 4, 1000, 0], NoSuchHandle);
    r.expect(
        "VCPU_RUN vCPU 2^64-1",
        op,
        &[ha, u64::MAX, 1000, 0],
        NoSuchHandle,
    );
    let op = OP_INJECT_IRQ;
    r.expect("INJECT_IRQ bogus handle", op, &[BOGUS, 0, 40], NoSuchHandle);
    r.expect("INJECT_IRQ vCPU 4", op, &[ha, 4, 40], NoSuchHandle);
    r.expect("INJECT_IRQ vector 2", op, &[ha, 0, 2], BadArg);
    r.expect("INJECT_IRQ vector 31", op, &[ha, 0, 31], BadArg);
    r.expect("INJECT_IRQ vector 256", op, &[ha, 0, 256], BadArg);

    // FILL_PATTERN.
    let op = OP_FILL_PATTERN;
    r.expect(
        "FILL_PATTERN bogus handle",
        op,
        &[BOGUS, 0, 4096, 1],
        NoSuchHandle,
    );
    r.expect("FILL_PATTERN one page (setup)", op, &[ha, 0, 4096, 1], Ok);
    let end = 16 * M2; // VM a maps nested [0, 32 MiB)
    r.expect(
        "FILL_PATTERN beyond mapped",
        op,
        &[ha, end, 4096, 1],
        OutOfRange,
    );
    let a = [ha, end - 4096, 8192, 1];
    r.expect("FILL_PATTERN across mapped end", op, &a, OutOfRange);
    let a = [ha, 0u64.wrapping_sub(4096), 8192, 1];
    r.expect("FILL_PATTERN end overflows u64", op, &a, OutOfRange);
    r.expect(
        "FILL_PATTERN misaligned gpa",
        op,
        &[ha, 4, 4096, 1],
        Misaligned,
    );
    r.expect(
        "FILL_PATTERN misaligned len",
        op,
        &[ha, 0, 12, 1],
        Misaligned,
    );
    r.expect("FILL_PATTERN zero length", op, &[ha, 0, 0, 1], BadArg);

    // Garbage special registers: L0 must refuse them without crashing.
    let get = OP_VCPU_GET_STATE;
    r.expect("VCPU_GET_STATE vCPU 0 (setup)", get, &[ha, 0, 0], Ok);
    let mut s = r.hc.state();
    s.sregs.cr0 = 0x8000_0000; // PG without PE
    s.sregs.efer = 0xdead_0000_0000_0d01; // reserved bits, LME|LMA, SCE
    r.hc.set_state(&s);
    let g = r.hc.call(OP_VCPU_SET_STATE, &[ha, 0]);
    r.check(
        "VCPU_SET_STATE CR0.PG without PE, junk EFER",
        g,
        Want::Refused,
    );
    r.expect("VCPU_GET_STATE vCPU 1 (setup)", get, &[ha, 1, 0], Ok);
    let mut s = r.hc.state();
    s.sregs.cr4 = u64::MAX;
    r.hc.set_state(&s);
    let g = r.hc.call(OP_VCPU_SET_STATE, &[ha, 1]);
    r.check("VCPU_SET_STATE all CR4 bits", g, Want::Refused);
    r.hc.fill_state(0xff);
    let g = r.hc.call(OP_VCPU_SET_STATE, &[ha, 2]);
    r.check("VCPU_SET_STATE all-ones state", g, Want::Refused);
    r.expect("VCPU_GET_STATE after garbage", get, &[ha, 0, 0], Ok);

    // Real runs of a tiny real-mode program on vCPU 3 of VM a: L0 must bound
    // the slice whatever L1 asks, report exits, and refuse a state change
    // while a port read is pending.
    let code: [(u64, &[u8]); 4] = [
        (0x00, &[0xeb, 0xfe]),             // jmp $
        (0x10, &[0xe6, 0x80, 0xeb, 0xfc]), // out 0x80, al; jmp 0x10
        (0x20, &[0xe4, 0x80, 0xeb, 0xfc]), // in al, 0x80; jmp 0x20
        (0x30, &[0xf4, 0xeb, 0xfd]),       // hlt; jmp 0x30
    ];
    for (at, bytes) in code {
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: `pool` (nested address 0 of VM a) is pool memory that
            // L0's page tables identity-map and only VM a and we use.
            unsafe { guest_rt::write_volatile((pool + at + i as u64) as *mut u8, b) };
        }
    }
    r.expect("VCPU_GET_STATE vCPU 3 (setup)", get, &[ha, 3, 0], Ok);
    let mut s = r.hc.state();
    s.sregs.cs.base = 0;
    s.sregs.cs.selector = 0;
    s.regs.rflags = 2;
    let at = |r: &mut Run, case: &str, rip: u64| {
        let mut t = s;
        t.regs.rip = rip;
        r.hc.set_state(&t);
        let g = r.hc.call(OP_VCPU_SET_STATE, &[ha, 3]);
        r.check(case, g, Want::Is(Ok));
    };
    at(r, "VCPU_SET_STATE real mode, spin (setup)", 0);
    r.run("VCPU_RUN slice 0 us", &[ha, 3, 0, 0], exit::SLICE);
    r.run(
        "VCPU_RUN slice 2^64-1 us",
        &[ha, 3, u64::MAX, 0],
        exit::SLICE,
    );
    at(r, "VCPU_SET_STATE real mode, out (setup)", 0x10);
    r.run("VCPU_RUN to port write", &[ha, 3, 100_000, 0], exit::IO_OUT);
    at(r, "VCPU_SET_STATE real mode, in (setup)", 0x20);
    r.run("VCPU_RUN to port read", &[ha, 3, 100_000, 0], exit::IO_IN);
    r.hc.set_state(&s);
    let g = r.hc.call(OP_VCPU_SET_STATE, &[ha, 3]);
    r.check("VCPU_SET_STATE with a read pending", g, Want::Is(BadState));
    r.expect("VCPU_GET_STATE answers the read", get, &[ha, 3, 0x42], Ok);
    at(r, "VCPU_SET_STATE real mode, hlt (setup)", 0x30);
    r.run("VCPU_RUN to hlt", &[ha, 3, 100_000, 0], exit::HLT);
    // vCPU 2 still has its reset state: it starts at 0xfffffff0, where VM a
    // has no memory. Whatever KVM makes of that, L0 must answer.
    let g = r.hc.call(OP_VCPU_RUN, &[ha, 2, 100_000, 0]);
    let e = r.hc.exit();
    say!(
        "hostile: (VCPU_RUN from the reset vector: exit reason {} detail {:#x})",
        e.reason,
        e.detail
    );
    r.check("VCPU_RUN from the reset vector", g, Want::Is(Ok));
    if e.reason == exit::FAIL || e.reason == exit::SHUTDOWN {
        let a = [ha, 3, 100_000, 0];
        r.expect("VCPU_RUN after the VM crashed", OP_VCPU_RUN, &a, BadState);
        r.expect("VCPU_GET_STATE of the crashed vCPU", get, &[ha, 2, 0], Ok);
    }

    // A destroyed guest is gone for every op.
    let hd = r.create("VM_CREATE hostile-d (setup)", "hostile-d");
    r.expect("VM_DESTROY hostile-d (setup)", OP_VM_DESTROY, &[hd], Ok);
    r.expect("VM_DESTROY twice", OP_VM_DESTROY, &[hd], NoSuchHandle);
    r.expect(
        "VCPU_RUN destroyed",
        OP_VCPU_RUN,
        &[hd, 0, 1000, 0],
        NoSuchHandle,
    );
    r.expect("VCPU_CREATE destroyed", OP_VCPU_CREATE, &[hd], NoSuchHandle);
    let a = [hd, pool + 21 * M2, 0, M2];
    r.expect("VM_MAP destroyed", OP_VM_MAP, &a, NoSuchHandle);
    r.expect(
        "VM_DESTROY bogus handle",
        OP_VM_DESTROY,
        &[BOGUS],
        NoSuchHandle,
    );
    r.expect("VM_DESTROY handle 0", OP_VM_DESTROY, &[0], NoSuchHandle);
    let a = [ha + (1 << 32)];
    r.expect("VM_DESTROY handle a+2^32", OP_VM_DESTROY, &a, NoSuchHandle);
    r.expect(
        "VM_DESTROY handle 2^64-1",
        OP_VM_DESTROY,
        &[u64::MAX],
        NoSuchHandle,
    );

    // At most MAX_NESTED nested VMs (a and b exist).
    let mut fillers = [0u64; MAX_NESTED];
    let mut made = 0;
    let mut cr = OK;
    for (i, f) in fillers.iter_mut().enumerate().take(MAX_NESTED - 2) {
        let (g, h) = r.hc.create(&numbered(b"hostile-f", i));
        if g == OK {
            *f = h;
            made += 1;
        } else if cr == OK {
            cr = g;
        }
    }
    r.check("VM_CREATE up to 16 (setup)", cr, Want::Is(Ok));
    let (g, _) = r.hc.create(&name_to_bytes("hostile-x"));
    r.check("VM_CREATE 17th VM", g, Want::Is(TooMany));
    let mut de = OK;
    for &h in &fillers[..made] {
        let g = r.hc.call(OP_VM_DESTROY, &[h]);
        if g != OK && de == OK {
            de = g;
        }
    }
    r.check("VM_DESTROY fillers (setup)", de, Want::Is(Ok));

    // Consoles.
    let op = OP_CONSOLE_WRITE;
    let text = b"(hostile console write)";
    r.hc.put_data(text);
    let a = [CONSOLE_SELF, text.len() as u64];
    r.expect("CONSOLE_WRITE short line (setup)", op, &a, Ok);
    r.expect(
        "CONSOLE_WRITE length 2049",
        op,
        &[CONSOLE_SELF, 2049],
        TooMany,
    );
    r.expect(
        "CONSOLE_WRITE length 2^64-1",
        op,
        &[CONSOLE_SELF, u64::MAX],
        TooMany,
    );
    r.expect("CONSOLE_WRITE bogus handle", op, &[BOGUS, 4], NoSuchHandle);

    // Handover ops outside a handover.
    r.expect("GRANT outside handover", OP_GRANT, &[ha], NotPermitted);
    r.expect(
        "HANDOVER_DONE outside handover",
        OP_HANDOVER_DONE,
        &[0],
        NotPermitted,
    );
    r.expect(
        "HANDOVER_ABORT outside handover",
        OP_HANDOVER_ABORT,
        &[1],
        NotPermitted,
    );
    r.expect(
        "HANDOVER_READY outside handover",
        OP_HANDOVER_READY,
        &[],
        NotPermitted,
    );
    r.expect("NOTIFY outside handover", OP_NOTIFY, &[], NotPermitted);
    r.expect(
        "OFFER outside handover",
        OP_OFFER,
        &[ha, 0x10_0000],
        NotPermitted,
    );
    r.expect(
        "OFFER_END outside handover",
        OP_OFFER_END,
        &[1],
        NotPermitted,
    );
    r.expect(
        "ADOPT outside handover",
        OP_ADOPT,
        &[0x10_0000],
        NotPermitted,
    );

    // A storm of pings, each answered correctly.
    let mut storm = OK;
    for i in 0..2000u64 {
        let v = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let g = r.hc.call(OP_PING, &[v]);
        let right = r.hc.ret(0) == ABI_VERSION as u64 && r.hc.ret(1) == v ^ PING_XOR;
        if (g != OK || !right) && storm == OK {
            storm = if g == OK { Got::Raw(0) } else { g };
        }
    }
    r.check("2000 PINGs", storm, Want::Is(Ok));

    // Clean up, then one legitimate sequence must still work.
    r.expect("VM_DESTROY hostile-a", OP_VM_DESTROY, &[ha], Ok);
    r.expect("VM_DESTROY hostile-b", OP_VM_DESTROY, &[hb], Ok);
    let h = r.create("legit VM_CREATE", "hostile-ok");
    r.expect(
        "legit VM_MAP 2 MiB",
        OP_VM_MAP,
        &[h, pool + 22 * M2, 0, M2],
        Ok,
    );
    r.expect("legit VCPU_CREATE", OP_VCPU_CREATE, &[h], Ok);
    r.expect("legit VM_DESTROY", OP_VM_DESTROY, &[h], Ok);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("hostile: panic: {} UNEXPECTED", info.message());
    guest_rt::halt_forever()
}
