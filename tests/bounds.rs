//! A guest hypervisor that pushes L0 to its bounds from every vCPU (the
//! test-only `guests/stress`) gets a clear status for every refusal and
//! cannot exhaust L0: records and consoles of destroyed guests are
//! released, the nested-VM bound holds, VM_MAP and VM_CREATE races have
//! one winner, console floods are cut to the rate, `status` never waits
//! behind a nested RUN, INJECT_IRQ waits until the guest can take it, and a
//! healthy host VM beside all of it keeps running and
//! can be rejuvenated (`tests/neighbour.rs`).

mod common;
mod stresskit;

use std::time::{Duration, Instant};

use stresskit::*;
use vmbeam_abi::boot::stress;

#[test]
fn status_never_waits_behind_a_nested_run() {
    if !common::kvm_or_skip("status_never_waits_behind_a_nested_run") {
        return;
    }
    let dir = common::temp_dir("bounds-spin");
    let v = vmm(&dir, 4, 0);
    start_stress(&v, stress::SPIN);
    for i in 0..4 {
        wait_stress(
            &v,
            &dir,
            &format!("spin{i}: running"),
            Duration::from_secs(60),
        );
    }
    let mut runs_before = 0;
    for round in 0..4 {
        // Every vCPU is inside a 1 s RUN of a guest that never exits.
        let (st, took) = status_within(&v, Duration::from_secs(2));
        println!("status {round} answered in {took:?}");
        let st = st.expect("status did not answer within 2 s");
        let hv = line(&st, "stress");
        assert_eq!(hv.nested.len(), 4, "{:?}", hv.nested);
        assert!(hv
            .nested
            .iter()
            .all(|n| n.vcpus == 1 && n.name.starts_with("spin")));
        let runs: u64 = hv.nested.iter().map(|n| n.runs).sum();
        assert!(runs >= runs_before);
        runs_before = runs;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(runs_before > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn map_and_create_races_have_one_winner() {
    if !common::kvm_or_skip("map_and_create_races_have_one_winner") {
        return;
    }
    let dir = common::temp_dir("bounds-race");
    let v = vmm(&dir, 4, 0);
    start_stress(&v, stress::RACE);
    let done = wait_stress(&v, &dir, "race done", Duration::from_secs(120));
    println!("{done}");
    assert!(
        done.ends_with("on 4 vCPUs, most map winners 1, most name winners 1"),
        "{done}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_console_flood_is_cut_to_the_rate() {
    if !common::kvm_or_skip("a_console_flood_is_cut_to_the_rate") {
        return;
    }
    let dir = common::temp_dir("bounds-flood");
    let v = vmm(&dir, 2, 0);
    let t0 = Instant::now();
    start_stress(&v, stress::FLOOD);
    let l = wait_stress(&v, &dir, "flood: 4096 lines", Duration::from_secs(120));
    let refused: u64 = l
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(refused > 0, "{l}");
    let size = std::fs::metadata(dir.join("flood0.log")).unwrap().len();
    let elapsed = t0.elapsed();
    println!("{l}: {size} bytes kept in {elapsed:?}");
    let rate = vmbeam_vmm::host::console::CONSOLE_RATE;
    let allowed = vmbeam_vmm::host::console::CONSOLE_BURST
        + (elapsed.as_secs_f64() * rate as f64) as u64
        + 4096;
    assert!(
        size <= allowed,
        "console file {size} bytes, at most {allowed}"
    );
    let st = v.status();
    let g = &line(&st, "stress").nested[0];
    assert_eq!(g.name, "flood0");
    assert!(g.console_dropped_bytes > 0, "{g:?}");
    assert!(limit_event(&dir, "console_rate"), "{:?}", events(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inject_irq_waits_for_the_guest_to_take_it() {
    if !common::kvm_or_skip("inject_irq_waits_for_the_guest_to_take_it") {
        return;
    }
    let dir = common::temp_dir("bounds-irq");
    let v = vmm(&dir, 1, 0);
    start_stress(&v, stress::IRQ);
    let l = wait_stress(&v, &dir, "irq: counted", Duration::from_secs(60));
    println!("{l}");
    assert!(
        l.ends_with(
            "counted 0 with interrupts off, 1 once they were on, 2 after an injection with them on ok"
        ),
        "{l}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fresh_names_leave_no_records_or_files_behind() {
    if !common::kvm_or_skip("fresh_names_leave_no_records_or_files_behind") {
        return;
    }
    let dir = common::temp_dir("bounds-churn");
    let v = vmm(&dir, 1, 0);
    start_stress(&v, stress::CHURN);
    let bound = wait_stress(&v, &dir, "bound:", Duration::from_secs(60));
    let want = format!(
        "bound: {} nested VMs, then Err(TooMany)",
        vmbeam_abi::boot::MAX_NESTED
    );
    assert!(bound.ends_with(&want), "{bound}");
    let before = footprint();
    let t0 = Instant::now();
    let done = wait_stress(&v, &dir, "churn done", Duration::from_secs(180));
    let after = footprint();
    println!("{done} in {:?}; {before:?} -> {after:?}", t0.elapsed());
    assert!(done.ends_with("10000 names, 0 failed calls"), "{done}");
    // Every destroyed guest's record and console went with it: at most
    // the one being cycled right now is alive (its console file is open).
    let live = v.shared.live_records();
    assert!(
        live <= 1,
        "{live} records alive after 10000 destroyed guests"
    );
    assert!(
        after.fds <= before.fds + 16,
        "fds {} -> {}",
        before.fds,
        after.fds
    );
    let st = v.status();
    let hv = line(&st, "stress");
    assert!(
        hv.limits.get("nested_vms").copied().unwrap_or(0) >= 1,
        "{:?}",
        hv.limits
    );
    assert!(limit_event(&dir, "nested_vms"), "{:?}", events(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}
