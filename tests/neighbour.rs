//! A guest hypervisor doing everything hostile at once (the test-only
//! `guests/stress` with all its modes: fresh names (the first 2 000 of an
//! endless churn; `tests/bounds.rs` checks all 10 000), VM_MAP and
//! VM_CREATE races from 4 vCPUs, a console flood, never-exiting nested
//! guests) beside a healthy host VM in one `Vmm`: `status` keeps
//! answering, this process's descriptors, threads and resident memory stay
//! within fixed bounds, the neighbour's guests keep running, and the
//! neighbour can be rejuvenated afterwards. Alone in its test binary, so
//! the process footprint is this test's own.

mod common;
mod stresskit;

use std::time::{Duration, Instant};

use stresskit::*;
use vmbeam_abi::boot::stress;

#[test]
fn a_hostile_neighbour_cannot_starve_or_exhaust_l0() {
    if !common::kvm_or_skip("a_hostile_neighbour_cannot_starve_or_exhaust_l0") {
        return;
    }
    let dir = common::temp_dir("bounds-neighbour");
    let v = vmm(&dir, 4, 2);
    v.start("hv0").unwrap();
    assert!(
        v.wait_healthy(Duration::from_secs(60)),
        "hv0 never reported health"
    );
    let progress0 = common::progress(&dir, 2);
    let base = footprint();
    let base_workers = kvm_workers();
    start_stress(
        &v,
        stress::CHURN | stress::RACE | stress::FLOOD | stress::SPIN,
    );
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut peak = base;
    loop {
        let (st, took) = status_within(&v, Duration::from_secs(3));
        let st = st.expect("status did not answer within 3 s");
        worst = worst.max(took);
        assert_eq!(line(&st, "hv0").status, "running");
        let f = footprint();
        peak = Footprint {
            fds: peak.fds.max(f.fds),
            threads: peak.threads.max(f.threads),
            rss: peak.rss.max(f.rss),
        };
        // Fixed bounds, whatever the stress guest does: its nested VMs
        // (at most MAX_NESTED_VMS, each a KVM VM, a vCPU or so and a
        // console), its 4 vCPU and slice threads, and the API thread of a
        // status call. The kernel adds one `kvm-nx-lpage-recovery` worker
        // to this process per KVM VM, so those are bounded by the number of
        // VMs and counted apart from L0's own threads.
        assert!(f.fds <= base.fds + 400, "fds {} -> {}", base.fds, f.fds);
        let kvm_workers = kvm_workers();
        assert!(
            kvm_workers <= 2 + vmbeam_vmm::host::bounds::MAX_NESTED_VMS,
            "{kvm_workers} KVM workers: {:?}",
            thread_names()
        );
        assert!(
            f.threads.saturating_sub(kvm_workers) <= base.threads.saturating_sub(base_workers) + 12,
            "threads {} -> {}: {:?}",
            base.threads,
            f.threads,
            thread_names()
        );
        assert!(
            f.rss <= base.rss + (256 << 20),
            "rss {} -> {}",
            base.rss,
            f.rss
        );
        if common::console(&dir, STRESS).contains("churn: 2000 names") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "{}",
            common::console(&dir, STRESS)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "stress ran {:?}: slowest status {worst:?}, base {base:?}, peak {peak:?}, threads now {:?}",
        t0.elapsed(),
        thread_names()
    );
    let text = common::console(&dir, STRESS);
    assert!(!text.contains("UNEXPECTED"), "{text}");
    assert!(text.contains("race done"), "{text}");
    // The flood and spin guests count against the same bound.
    assert!(text.contains(" nested VMs, then Err(TooMany)"), "{text}");
    assert!(text.contains("churn: 2000 names, 0 failed calls"), "{text}");
    assert!(limit_event(&dir, "nested_vms"), "{:?}", events(&dir));
    let hv = line(&v.status(), "stress").clone();
    assert!(
        hv.limits.get("nested_vms").copied().unwrap_or(0) >= 1,
        "{:?}",
        hv.limits
    );
    assert!(
        hv.limits.get("console_rate").copied().unwrap_or(0) >= 1,
        "{:?}",
        hv.limits
    );
    assert!(
        v.shared.live_records() <= 2 + 1 + 1 + 2,
        "{} records",
        v.shared.live_records()
    );
    // The neighbour's guests kept going, and it can still be rejuvenated.
    for i in 0..2 {
        common::wait_beyond(&dir, i, progress0[i as usize]);
    }
    let report = v
        .rejuvenate(Some("hv0"), &Default::default())
        .expect("rejuvenation of the neighbour");
    assert!(report.guests.iter().all(|g| g.running_after), "{report:?}");
    let st = v.status();
    assert_eq!(line(&st, "hv0").generation, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// This process's thread names, counted, for a failure message.
fn thread_names() -> Vec<(String, usize)> {
    let mut names = std::collections::BTreeMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_insert(0) += 1;
    }
    names.into_iter().collect()
}

/// The kernel's per-KVM-VM worker threads in this process.
fn kvm_workers() -> usize {
    thread_names()
        .iter()
        .filter(|(n, _)| n.starts_with("kvm-"))
        .map(|(_, c)| c)
        .sum()
}
