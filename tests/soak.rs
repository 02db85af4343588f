//! Soak: many zero-copy rejuvenations back to back with three nested guests
//! running. Every report must show the guests moved intact (checksum before
//! == after, nothing copied, each guest running under the successor), the
//! guests must keep making progress, and the process must not accumulate
//! anything per generation: open fds, memfds, KVM VM and vCPU fds, threads
//! and resident memory are compared with a baseline taken after the first
//! rejuvenation (so that everything created once, lazily, already exists).
//!
//! This file holds a single test so that the process counts are its own.
//! `VMBEAM_SOAK_ROUNDS` changes the number of rejuvenations (default 15).

mod common;

use std::path::Path;
use std::time::Duration;

use common::moves;
use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::rejuvenate::{RejuvenateOptions, Report};

const GUESTS: u32 = 3;

/// Resident memory may differ by this much from the baseline: allocator
/// caches (freed heap is not always returned to the kernel), thread stacks
/// of the successor's vCPU and slice threads touched to a different depth,
/// and page tables. Guest memory is not part of the margin: every
/// generation maps the same memfd pages of the guests, and the aged VM's
/// own RAM and pool pages are punched. A leak of one guest hypervisor per
/// generation (32 MiB of RAM, of which L1 touches a few MiB) or of one
/// guest's mapping (16 MiB, all touched by the fill and the hash) would
/// pass the margin within two or three rounds.
const RSS_MARGIN: u64 = 16 << 20;

/// Open fds may exceed the baseline by this much (a log file or socket
/// opened lazily by a later round); a leak of one fd per generation over
/// 14 rounds is far above it. Memfds and KVM VM and vCPU fds must match
/// exactly: each one held longer is a whole generation's memory or VM.
const FD_MARGIN: usize = 2;
/// Threads may exceed the baseline by one (a teardown helper that has not
/// exited yet when the counts have otherwise settled).
const THREAD_MARGIN: usize = 1;

/// What the process holds, from /proc/self.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    fds: usize,
    memfds: usize,
    kvm_vms: usize,
    kvm_vcpus: usize,
    threads: usize,
    rss: u64,
}

fn held() -> Held {
    let links: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let count = |pat: &str| links.iter().filter(|l| l.contains(pat)).count();
    Held {
        fds: links.len(),
        memfds: count("memfd:vmbeam"),
        kvm_vms: count("anon_inode:kvm-vm"),
        kvm_vcpus: count("anon_inode:kvm-vcpu"),
        threads: std::fs::read_dir("/proc/self/task").unwrap().count(),
        rss: vmbeam_vmm::migration::rejuvenate::rss_bytes(),
    }
}

/// The counts once teardown that runs after `rejuvenate` returned (if any)
/// is done: polls until memfds, KVM fds, fds and threads are back at the
/// baseline, for at most 10 s, and returns the last reading either way.
fn settled(base: &Held) -> Held {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = held();
        let back = now.memfds == base.memfds
            && now.kvm_vms == base.kvm_vms
            && now.kvm_vcpus == base.kvm_vcpus
            && now.fds <= base.fds
            && now.threads <= base.threads;
        if back || std::time::Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_progress_beyond(dir: &Path, base: &[u64], round: u32) {
    for i in 0..GUESTS {
        wait_beyond(dir, i, base[i as usize]);
        if i % 2 == 0 {
            assert_memtouch_clean(dir, &format!("l2-{i}"), &format!("by round {round}"));
        }
    }
}

fn check_report(r: &Report, generation: u32) {
    assert_eq!(r.mode, "zero-copy");
    assert_eq!(r.to_generation, generation, "{r:?}");
    assert_eq!(r.guests.len(), GUESTS as usize, "{r:?}");
    for g in &r.guests {
        assert!(g.running_after, "generation {generation}: {g:?}");
        assert_eq!(g.moves, generation - 1, "{g:?}");
    }
}

/// Rejuvenates the first line and checks from `/proc/self/maps` that the
/// successor maps every guest's own memfd pages.
fn moved(vmm: &vmbeam_vmm::vmm::Vmm, opts: &RejuvenateOptions) -> Report {
    let pages = moves::guest_pages(&vmm.current(None).unwrap(), false);
    let r = vmm.rejuvenate(None, opts).unwrap();
    moves::check_same_pages(&vmm.current(None).unwrap(), &pages);
    r
}

#[test]
fn repeated_zero_copy_rejuvenations_leak_nothing() {
    if !kvm_or_skip("repeated_zero_copy_rejuvenations_leak_nothing") {
        return;
    }
    let rounds: u32 = std::env::var("VMBEAM_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
        .max(2);
    let dir = temp_dir("soak");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: GUESTS,
            workloads: vec![Workload::Memtouch, Workload::Ticker],
            ..Default::default()
        },
    );
    let at_start = held();
    vmm.start("hv0").unwrap();
    for i in 0..GUESTS {
        wait_console(&dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
            t.lines().count() >= 3
        });
    }
    let opts = RejuvenateOptions::default();

    // Round 1 creates what exists once per process or per guest (consoles,
    // guest records, the kick handler); the baseline is taken after it.
    let p = progress(&dir, GUESTS);
    check_report(&moved(&vmm, &opts), 2);
    wait_progress_beyond(&dir, &p, 1);
    let base = held();
    println!("at start {at_start:?}\nbaseline after round 1 {base:?}");

    for round in 2..=rounds {
        let p = progress(&dir, GUESTS);
        let r = moved(&vmm, &opts);
        check_report(&r, round + 1);
        wait_progress_beyond(&dir, &p, round);
        let now = held();
        println!(
            "round {round}: handover {:.1} ms, released {} KiB, {now:?}",
            r.handover_ms,
            r.released_bytes >> 10
        );
    }

    let end = settled(&base);
    println!("after {rounds} rounds {end:?}");
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1, "one host VM line");
    assert_eq!(st.host_vms[0].generation, rounds + 1);
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), GUESTS as usize);
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == rounds));
    assert!(vmm.failure().is_none());
    // Exactly one host VM and its nested VMs exist, as after round 1; the
    // fd-backed objects of each generation were all released.
    assert_eq!(end.kvm_vms, base.kvm_vms, "KVM VMs: {base:?} -> {end:?}");
    assert_eq!(end.kvm_vcpus, base.kvm_vcpus, "vCPUs: {base:?} -> {end:?}");
    assert_eq!(end.memfds, base.memfds, "memfds: {base:?} -> {end:?}");
    assert!(end.fds <= base.fds + FD_MARGIN, "fds: {base:?} -> {end:?}");
    assert!(
        end.threads <= base.threads + THREAD_MARGIN,
        "threads: {base:?} -> {end:?}"
    );
    assert!(
        end.rss <= base.rss + RSS_MARGIN,
        "RSS grew from {} to {} MiB over {} rounds",
        base.rss >> 20,
        end.rss >> 20,
        rounds - 1
    );
    drop(vmm);
    let gone = held();
    assert_eq!(gone.kvm_vms, 0, "{gone:?}");
    assert_eq!(gone.memfds, 0, "{gone:?}");
}
