//! The hostile guest hypervisor as the *aged* side of a handover: when L0
//! asks it to hand over (control word `HANDOVER`), it does not offer its
//! guests but probes L0's grant bookkeeping, then aborts.
//!
//! It fills the successor's grant window with 2 MiB grants of throw-away
//! nested VMs (each destroyed right after its grant) until 2 MiB of window
//! are left, asks for a grant that does not fit (two slots, 2 MiB and
//! 2 GiB: refused), and then grants a 2 MiB guest, which must land exactly
//! where the refused grant would have started: a refused grant advances
//! nothing. Lines are `hostile-aged: {case} -> {status:?} {ok|UNEXPECTED}`,
//! ending with `hostile-aged: done {n_ok} ok {n_bad} unexpected`.

use vmbeam_abi::hypercall::*;
use vmbeam_abi::layout::{self, GRANT_BASE, GRANT_SIZE};

use crate::{numbered, Got, Run, Want, M2, OK};

/// Size of each window-filling grant.
const FILL: u64 = 2 << 30;

/// Creates a nested VM on `slots` of the pool (`(pool offset, l2, len)`)
/// with one vCPU; returns its handle (0 if a step failed, as a case).
fn guest(
    r: &mut Run,
    name: &[u8; vmbeam_abi::NAME_LEN],
    pool: u64,
    slots: &[(u64, u64, u64)],
) -> u64 {
    let (g, h) = r.hc.create(name);
    if g != OK {
        r.check("VM_CREATE", g, Want::Is(Status::Ok));
        return 0;
    }
    for &(off, l2, len) in slots {
        let g = r.hc.call(OP_VM_MAP, &[h, pool + off, l2, len]);
        if g != OK {
            r.check("VM_MAP", g, Want::Is(Status::Ok));
            return 0;
        }
    }
    let g = r.hc.call(OP_VCPU_CREATE, &[h]);
    if g != OK {
        r.check("VCPU_CREATE", g, Want::Is(Status::Ok));
        return 0;
    }
    h
}

/// The probe; returns when it has aborted the handover.
pub fn run(mut r: Run, pool: u64, pool_size: u64) {
    use Status::*;
    if pool_size < FILL + 2 * M2 {
        say!("hostile-aged: pool too small for the grant probe, aborting");
        let _ = r.hc.call(OP_HANDOVER_ABORT, &[9]);
        return;
    }
    // Fill the window up to 2 MiB short of its end.
    let fills = (GRANT_SIZE - M2) / FILL;
    let mut fill_ok = OK;
    for i in 0..fills as usize {
        let h = guest(&mut r, &numbered(b"hag-", i), pool, &[(0, 0, FILL)]);
        let g = r.hc.call(OP_GRANT, &[h]);
        if g != OK && fill_ok == OK {
            fill_ok = g;
        }
        let _ = r.hc.call(OP_VM_DESTROY, &[h]);
    }
    r.check("GRANT fills the window", fill_ok, Want::Is(Ok));
    let at = GRANT_BASE + fills * FILL;
    let small = GRANT_BASE + GRANT_SIZE - at;
    say!("hostile-aged: {:#x} bytes of window left at {at:#x}", small);
    // Two slots: the first fits, the second does not.
    let h = guest(
        &mut r,
        &numbered(b"hag-big", 0),
        pool,
        &[(0, 0, M2), (M2, M2, FILL)],
    );
    r.expect(
        "GRANT larger than the window left",
        OP_GRANT,
        &[h],
        NoResources,
    );
    r.expect("VM_DESTROY of the refused guest", OP_VM_DESTROY, &[h], Ok);
    // A guest that fits lands where the refused one would have.
    let h = guest(&mut r, &numbered(b"hag-fit", 0), pool, &[(0, 0, M2)]);
    let g = r.hc.call(OP_GRANT, &[h]);
    // SAFETY: the data area of the hypercall page holds the granted ranges.
    let got = unsafe { core::ptr::addr_of!((*r.hc.page).data).read_volatile() };
    let range: GrantRange =
        vmbeam_abi::from_bytes(&got[..core::mem::size_of::<GrantRange>()]).unwrap_or_default();
    say!(
        "hostile-aged: (grant after the refused one at {:#x}, expected {at:#x})",
        range.succ_gpa
    );
    r.check("GRANT that fits", g, Want::Is(Ok));
    let placed = if range.succ_gpa == at {
        OK
    } else {
        Got::Raw(-1)
    };
    r.check(
        "refused grant left the window as it was",
        placed,
        Want::Is(Ok),
    );
    r.expect("HANDOVER_ABORT", OP_HANDOVER_ABORT, &[9], Ok);
    say!("hostile-aged: done {} ok {} unexpected", r.ok, r.bad);
}
