//! Issue: zero-copy rejuvenation moves every nested guest to a fresh guest
//! hypervisor without copying memory, and rolls back on any failure.

mod common;

use std::time::Duration;

use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::rejuvenate::{RejuvenateOptions, Report};
use vmbeam_vmm::vmm::{Vmm, VmmError};

fn started(test: &str, nested: u32) -> (Vmm, std::path::PathBuf) {
    started_as(test, nested, "hv0")
}

/// Like `started`, with a host VM name of its own (so this test's memory
/// files can be told apart from other tests' in the same process).
fn started_as(test: &str, nested: u32, line: &str) -> (Vmm, std::path::PathBuf) {
    let dir = temp_dir(test);
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested,
            workloads: vec![Workload::Memtouch, Workload::Ticker],
            ..Default::default()
        },
    );
    vmm.start(line).unwrap();
    for i in 0..nested {
        wait_console(&dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
            t.lines().count() >= 3
        });
    }
    (vmm, dir)
}

fn wait_progress_beyond(dir: &std::path::Path, nested: u32, base: &[u64]) {
    for i in 0..nested {
        wait_beyond(dir, i, base[i as usize]);
    }
}

fn check_report(r: &Report, nested: usize, generation: u32) {
    assert_eq!(r.mode, "zero-copy");
    assert_eq!(r.to_generation, generation);
    assert_eq!(r.bytes_copied, 0);
    assert_eq!(r.guests.len(), nested);
    for g in &r.guests {
        assert!(g.running_after, "{g:?}");
        assert!(g.checksum_before.is_some());
        assert_eq!(g.checksum_before, g.checksum_after, "{g:?}");
        assert_eq!(g.mem_bytes, 16 << 20);
    }
    assert!(r.channel_bytes > 0);
    assert!(r.released_bytes > 0);
}

#[test]
fn rejuvenation_moves_every_guest_without_copying() {
    if !kvm_or_skip("rejuvenation_moves_every_guest_without_copying") {
        return;
    }
    let (vmm, dir) = started("zerocopy", 3);
    let base = progress(&dir, 3);
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    check_report(&r, 3, 2);
    // Same consoles keep counting.
    wait_progress_beyond(&dir, 3, &base);
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1, "the aged host VM is gone");
    assert_eq!(st.host_vms[0].generation, 2);
    assert_eq!(st.host_vms[0].nested.len(), 3);
    assert!(st.host_vms[0]
        .nested
        .iter()
        .all(|n| n.moves == 1 && n.generation == 2));
    let l1 = console(&dir, "hv0-g2");
    assert!(l1.contains("role=successor"), "{l1}");
    assert!(
        l1.contains("adopted 3 nested guests from generation 1"),
        "{l1}"
    );
    // memtouch never saw a corrupted word.
    assert_memtouch_clean(&dir, "l2-0", "after the first move");
    assert_memtouch_clean(&dir, "l2-2", "after the first move");
    // Rejuvenating twice more in a row works.
    for generation in [3, 4] {
        let base = progress(&dir, 3);
        let r = vmm
            .rejuvenate(Some("hv0"), &RejuvenateOptions::default())
            .unwrap();
        check_report(&r, 3, generation);
        wait_progress_beyond(&dir, 3, &base);
    }
    let st = vmm.status();
    assert_eq!(st.host_vms[0].generation, 4);
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == 3));
    assert!(vmm.failure().is_none());
}

/// Memory files of host VM `line` (generation `g`) still open in this process.
fn memfds(line: &str, g: u32) -> usize {
    let tag = format!("memfd:vmbeam-{line}/g{g}-");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().contains(&tag))
                .unwrap_or(false)
        })
        .count()
}

fn rollback_case(test: &str, fault: &str, expect: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let line = format!("rb{test}");
    let (vmm, dir) = started_as(test, 2, &line);
    let aged_files = memfds(&line, 1);
    assert!(aged_files >= 2, "ram and pool files of {line}/g1");
    let base = progress(&dir, 2);
    let opts = RejuvenateOptions {
        fault: vmbeam_vmm::control::api::parse_fault(fault).unwrap(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let e = vmm.rejuvenate(None, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VmmError::Rejuvenate(_)), "{msg}");
    assert!(msg.contains(expect), "{msg}");
    assert!(
        msg.contains("all 2 nested guests keep running under generation 1"),
        "{msg}"
    );
    // Every guest still runs under the aged guest hypervisor, and nothing
    // of the successor is left behind.
    wait_progress_beyond(&dir, 2, &base);
    assert_eq!(memfds(&line, 2), 0, "the successor's memory was released");
    assert_eq!(memfds(&line, 1), aged_files);
    let st = vmm.status();
    assert_eq!(st.host_vms[0].generation, 1);
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), 2);
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == 0));
    // And a later rejuvenation still succeeds.
    let base = progress(&dir, 2);
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    check_report(&r, 2, 2);
    wait_progress_beyond(&dir, 2, &base);
}

#[test]
fn successor_rejecting_a_guest_rolls_back() {
    rollback_case("reject", "reject-first", "aborted the handover");
}

#[test]
fn successor_crashing_before_adopting_rolls_back() {
    rollback_case("crashbefore", "crash-before-adopt", "the successor died");
}

#[test]
fn successor_crashing_after_adopting_one_rolls_back() {
    rollback_case("crashafter", "crash-after-first", "the successor died");
}

#[test]
fn successor_that_never_boots_rolls_back() {
    rollback_case("hang", "hang-at-boot", "did not become ready");
}

#[test]
fn a_second_rejuvenation_while_one_runs_is_refused() {
    if !kvm_or_skip("a_second_rejuvenation_while_one_runs_is_refused") {
        return;
    }
    let (vmm, _dir) = started("busy", 1);
    let vmm = std::sync::Arc::new(vmm);
    let v2 = vmm.clone();
    let slow = std::thread::spawn(move || {
        v2.rejuvenate(
            None,
            &RejuvenateOptions {
                fault: vmbeam_vmm::control::api::parse_fault("hang-at-boot").unwrap(),
                timeout: Duration::from_secs(3),
                ..Default::default()
            },
        )
    });
    // Wait until the first one is under way (its session exists).
    let aged = vmm.current(None).unwrap();
    let t = std::time::Instant::now();
    while aged.session.lock().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "first rejuvenation never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = vmm
        .rejuvenate(None, &RejuvenateOptions::default())
        .unwrap_err();
    assert!(matches!(e, VmmError::Busy), "{e}");
    assert!(slow.join().unwrap().is_err());
    assert!(matches!(
        vmm.rejuvenate(Some("nope"), &RejuvenateOptions::default()),
        Err(VmmError::NoSuchVm(_))
    ));
}

#[test]
fn copy_and_precopy_move_guests_by_copying_every_page() {
    if !kvm_or_skip("copy_and_precopy_move_guests_by_copying_every_page") {
        return;
    }
    let (vmm, dir) = started("copymodes", 2);
    for (mode, generation) in [
        (vmbeam_vmm::migration::rejuvenate::Mode::Copy, 2),
        (vmbeam_vmm::migration::rejuvenate::Mode::Precopy, 3),
        (vmbeam_vmm::migration::rejuvenate::Mode::ZeroCopy, 4),
    ] {
        let base = progress(&dir, 2);
        let r = vmm
            .rejuvenate(
                None,
                &RejuvenateOptions {
                    mode,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(r.to_generation, generation);
        assert_eq!(r.mode, mode.as_str());
        for g in &r.guests {
            assert!(g.running_after, "{g:?}");
            assert_eq!(g.checksum_before, g.checksum_after, "{g:?}");
        }
        // memtouch's bulk is filled by L0, so at least that much must have crossed.
        let bulk = (16 << 20) - vmbeam_abi::l2::BULK_BASE;
        if mode == vmbeam_vmm::migration::rejuvenate::Mode::ZeroCopy {
            assert_eq!(r.bytes_copied, 0);
        } else {
            assert!(
                r.bytes_copied >= bulk,
                "{mode:?} copied only {}",
                r.bytes_copied
            );
        }
        if mode == vmbeam_vmm::migration::rejuvenate::Mode::Precopy {
            let p = r.precopy.as_ref().expect("precopy stats");
            assert!(p.rounds >= 2, "{p:?}");
            assert!(p.live_bytes >= bulk, "{p:?}");
        }
        wait_progress_beyond(&dir, 2, &base);
    }
    assert_memtouch_clean(&dir, "l2-0", "after copy, precopy and zero-copy moves");
}

#[test]
fn an_aged_hypervisor_dying_mid_handover_is_finished_by_l0() {
    if !kvm_or_skip("an_aged_hypervisor_dying_mid_handover_is_finished_by_l0") {
        return;
    }
    let (vmm, dir) = started("agedcrash", 3);
    let base = progress(&dir, 3);
    let r = vmm
        .rejuvenate(
            None,
            &RejuvenateOptions {
                fault: vmbeam_vmm::control::api::parse_fault("aged-crash-after-first").unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
    // The aged L1 handed over one guest and died; L0 offered the other two.
    assert_eq!(r.rescued, Some(2), "{r:?}");
    check_report(&r, 3, 2);
    wait_progress_beyond(&dir, 3, &base);
    let l1 = console(&dir, "hv0-g1");
    assert!(
        l1.contains("fault: aged hypervisor crashing after the first guest"),
        "{l1}"
    );
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].generation, 2);
    assert_eq!(st.host_vms[0].nested.len(), 3);
    assert!(vmm.failure().is_none());
    // The new generation works normally afterwards.
    let base = progress(&dir, 3);
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    check_report(&r, 3, 3);
    assert_eq!(r.rescued, None);
    wait_progress_beyond(&dir, 3, &base);
}
