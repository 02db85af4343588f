//! Health counters L1 reports to L0 with OP_HEALTH.
//!
//! L0 decides when a guest hypervisor has aged (leaks, errors, uptime) from
//! these numbers, so L1 keeps them cheaply and sends them every few
//! scheduler passes or about once a second.
//!
//! It also holds the aging injector ([`age`]): with
//! `BootInfo::age_leak_pages = N` L1 leaks N pages of its nested pool for
//! every nested RUN it issues, which shows in `leaked_bytes` and makes
//! `pool_free_bytes` fall, so L0's rejuvenation policy can be exercised.

use crate::Hv;

/// Passes between reports at most.
const PASSES: u32 = 32;

/// Counters not kept elsewhere.
pub struct Health {
    /// Errors seen (failed starts, crashes, failed hypercalls).
    pub errors: u64,
    /// Nested exits handled.
    pub exits: u64,
    /// Pool bytes that can never be reused (a destroy failed); the aging
    /// injector's pages are counted by the pool and added when reporting.
    pub leaked: u64,
    t0: u64,
    last: u64,
    passes: u32,
}

impl Health {
    /// Counters starting at TSC `t0`.
    pub fn new(t0: u64) -> Self {
        Health {
            errors: 0,
            exits: 0,
            leaked: 0,
            t0,
            last: 0,
            passes: 0,
        }
    }
}

/// TSC ticks per millisecond.
fn khz(hv: &Hv) -> u64 {
    match hv.boot.tsc_khz {
        0 => 1_000_000,
        k => k,
    }
}

/// Aging injector: called once per nested RUN L1 issues; leaks
/// `age_leak_pages` pages of the pool (nothing when it is 0).
pub fn age(hv: &mut Hv) {
    let n = hv.boot.age_leak_pages;
    if n != 0 {
        hv.pool.leak_pages(n as u64);
    }
}

/// Bytes of live guests that sit in the grant window: memory a successor
/// adopted, outside its own pool but in use all the same (reported as
/// used, so the aging policy and `status` see the guests aboard).
pub fn granted_bytes(hv: &Hv) -> u64 {
    let (base, size) = (hv.boot.grant_base, hv.boot.grant_size);
    hv.guests[..hv.n_guests]
        .iter()
        .filter(|g| g.is_live())
        .flat_map(|g| g.ranges[..g.n_ranges.min(g.ranges.len())].iter())
        .filter(|r| r.l1_gpa >= base && r.l1_gpa - base < size)
        .map(|r| r.len)
        .sum()
}

/// Called after each scheduler pass; reports when due.
pub fn tick(hv: &mut Hv) {
    let now = guest_rt::rdtsc();
    hv.health.passes += 1;
    if hv.health.passes < PASSES && now.wrapping_sub(hv.health.last) < khz(hv) * 1000 {
        return;
    }
    hv.health.passes = 0;
    hv.health.last = now;
    let live = hv.guests[..hv.n_guests]
        .iter()
        .filter(|g| g.is_live())
        .count();
    let args = [
        hv.pool.free_bytes(),
        hv.pool.used_bytes() + granted_bytes(hv),
        live as u64,
        hv.hc.issued + 1,
        hv.health.leaked + hv.pool.leaked_bytes(),
        now.wrapping_sub(hv.health.t0) / khz(hv),
        hv.health.errors,
        hv.health.exits,
    ];
    if hv.hc.health(&args).is_err() {
        hv.health.errors += 1;
    }
}
