//! Nested guests run inside the guest hypervisor through the
//! paravirtual interface, each with its own console.

mod common;

use std::time::Duration;

use common::*;
use vmbeam_abi::l2::{WS_BASE, WS_LEN};
use vmbeam_vmm::config::{VmmConfig, Workload};

#[test]
fn two_nested_guests_both_make_progress() {
    if !kvm_or_skip("two_nested_guests_both_make_progress") {
        return;
    }
    let dir = temp_dir("progress");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 2,
            workloads: vec![Workload::Ticker, Workload::Memtouch],
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    let t = wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        last_counter(t, "tick ").is_some_and(|n| n >= 3)
    });
    assert!(t.starts_with("ticker l2-0 start mem=16MiB"), "{t}");
    let m = wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        memtouch_round(t).is_some_and(|n| n >= 2)
    });
    assert!(m.contains("memtouch l2-1 start mem=16MiB"), "{m}");
    assert_memtouch_clean(&dir, "l2-1", "after two rounds");
    // Both keep going, on their own consoles.
    let t0 = last_counter(&console(&dir, "l2-0"), "tick ").unwrap();
    let r0 = memtouch_round(&console(&dir, "l2-1")).unwrap();
    wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        last_counter(t, "tick ").is_some_and(|n| n > t0 + 1)
    });
    wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        memtouch_round(t).is_some_and(|n| n > r0)
    });
    assert!(!console(&dir, "l2-0").contains("memtouch"));
    assert!(!console(&dir, "l2-1").contains("tick "));
    let st = vmm.status();
    let nested = &st.host_vms[0].nested;
    assert_eq!(nested.len(), 2);
    assert!(nested
        .iter()
        .all(|n| n.exits > 0 && n.vcpus == 1 && n.mem_bytes == 16 << 20));
    let l1 = console(&dir, "hv0/g1");
    assert!(l1.contains("started l2-0: 16MiB ticker"), "{l1}");
    assert!(l1.contains("started l2-1: 16MiB memtouch"), "{l1}");
}

#[test]
fn l0_checksum_matches_what_the_workload_reports() {
    if !kvm_or_skip("l0_checksum_matches_what_the_workload_reports") {
        return;
    }
    let dir = temp_dir("checksum");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 1,
            workloads: vec![Workload::Memtouch],
            workload_param: 3,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    let text = wait_console(&dir, "l2-0", Duration::from_secs(60), |t| {
        t.contains("done round=3")
    });
    let done = text.lines().find(|l| l.contains("done round=3")).unwrap();
    let reported = done
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sum="))
        .unwrap();
    assert_eq!(memtouch_bad_counts(done), [0], "{done}");
    let l0 = vmm.checksum("l2-0", WS_BASE, WS_LEN).unwrap();
    assert_eq!(format!("{l0:016x}"), reported);
    // And a different range does not match (the check can fail).
    let other = vmm.checksum("l2-0", WS_BASE, WS_LEN - 8).unwrap();
    assert_ne!(format!("{other:016x}"), reported);
    assert!(vmm.checksum("l2-0", u64::MAX - 7, 8).is_err());
    assert!(vmm.checksum("nope", 0, 8).is_err());
}

#[test]
fn a_triple_faulting_nested_guest_does_not_take_down_its_siblings() {
    if !kvm_or_skip("a_triple_faulting_nested_guest_does_not_take_down_its_siblings") {
        return;
    }
    let dir = temp_dir("l2fault");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 3,
            workloads: vec![Workload::Ticker, Workload::Memtouch, Workload::Ticker],
            // ticker faults on purpose after 3 ticks; memtouch keeps going (param is rounds, 3)
            workload_param: 3,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    let l1 = wait_console(&dir, "hv0/g1", Duration::from_secs(60), |t| {
        t.contains("nested guest l2-0 crashed") && t.contains("nested guest l2-2 crashed")
    });
    assert!(l1.contains("nested guest l2-0 crashed: shutdown"), "{l1}");
    let t = console(&dir, "l2-0");
    assert!(t.contains("ticker l2-0 faulting on purpose"), "{t}");
    // The sibling finishes its rounds; L1 and L0 keep running.
    wait_console(&dir, "l2-1", Duration::from_secs(60), |t| {
        t.contains("done round=3")
    });
    assert!(vmm.failure().is_none());
    let st = vmm.status();
    assert_eq!(st.host_vms[0].status, "running");
    let names: Vec<_> = st.host_vms[0]
        .nested
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(names, vec!["l2-1"], "crashed guests are destroyed by L1");
    let before = st.host_vms[0].hypercalls;
    wait_until(
        Duration::from_secs(30),
        "L1 keeps making hypercalls",
        || vmm.status().host_vms[0].hypercalls > before,
    );
}

#[test]
fn an_unsupported_instruction_in_a_nested_guest_is_named_on_its_console() {
    if !kvm_or_skip("an_unsupported_instruction_in_a_nested_guest_is_named_on_its_console") {
        return;
    }
    let dir = temp_dir("l2avx");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 2,
            workloads: vec![Workload::Ticker, Workload::Memtouch],
            // ticker: fault with an AVX instruction after 2 ticks; memtouch: 2 rounds.
            workload_param: (1 << 63) | 2,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    let l1 = wait_console(&dir, "hv0/g1", Duration::from_secs(60), |t| {
        t.contains("nested guest l2-0 crashed")
    });
    let t = console(&dir, "l2-0");
    // On an emulating KVM this is an emulation failure with the bytes of
    // `vpxor`; on hardware KVM the guest has no AVX enabled and it is #UD.
    if l1.contains("crashed: fail") {
        assert!(
            t.contains("[vmbeam] nested guest stopped: KVM internal error (emulation failure)")
                && t.contains("instruction bytes: c5 fd ef c0"),
            "{t}"
        );
    } else {
        assert!(l1.contains("crashed: shutdown"), "{l1}");
    }
    assert!(vmm.failure().is_none());
}
