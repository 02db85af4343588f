//! A zero-copy handover driven by a buggy or hostile guest hypervisor on
//! either side: L0 must neither wedge (every wait has a deadline, the
//! rejuvenation lock is released, status keeps answering), nor let the aged
//! side's lies reach a guest, nor leak a successor or freeze the guests
//! when it has to finish the handover of a dead guest hypervisor itself.

mod common;
mod stresskit;

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use vmbeam_abi::boot::stress;
use vmbeam_vmm::api::parse_fault;
use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::migration::rejuvenate::{self, RejuvenateOptions, Report};
use vmbeam_vmm::vmm::Vmm;

fn started(test: &str, line: &str, nested: u32) -> (Arc<Vmm>, common::TempDir) {
    let (vmm, dir) = started_with_events(test, line, nested, Duration::from_secs(60));
    (Arc::new(vmm), dir)
}

/// Runs a rejuvenation on its own thread and waits at most `limit` for it:
/// a rejuvenation that never returns fails the test instead of hanging it
/// (the thread keeps its own reference to the VMM, so nothing here blocks
/// on it).
fn rejuvenate_within(
    vmm: &Arc<Vmm>,
    opts: RejuvenateOptions,
    limit: Duration,
) -> Result<Report, String> {
    let (tx, rx) = mpsc::channel();
    let v = vmm.clone();
    std::thread::spawn(move || {
        let _ = tx.send(v.rejuvenate(None, &opts).map_err(|e| e.to_string()));
    });
    // Meanwhile `status` must keep answering promptly.
    let t = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => return r,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("rejuvenation thread: {e}"),
        }
        let s = Instant::now();
        let _ = vmm.status();
        assert!(
            s.elapsed() < Duration::from_secs(5),
            "status took {:?} during the handover",
            s.elapsed()
        );
        assert!(
            t.elapsed() < limit,
            "the rejuvenation did not return within {limit:?}: L0 is wedged"
        );
    }
}

fn events(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn check_moved(r: &Report, nested: usize, generation: u32) {
    assert_eq!(r.to_generation, generation, "{r:?}");
    assert_eq!(r.guests.len(), nested, "{r:?}");
    for g in &r.guests {
        assert!(g.running_after, "{g:?}");
    }
}

/// Memory files of host VM `line` generation `g` open in this process.
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

#[test]
fn an_aged_hypervisor_spamming_done_during_adoption_cannot_wedge_l0() {
    if !kvm_or_skip("spam_done") {
        return;
    }
    let (vmm, dir) = started("spamdone", "spam", 4);
    // The aged L1 calls HANDOVER_DONE in a loop while the successor adopts
    // each guest, and the successor repeats every slot confirmation: the
    // two guest hypervisors hammer L0's handover state from both sides.
    for round in 0..2u32 {
        let base = progress(&dir, 4);
        let opts = RejuvenateOptions {
            fault: parse_fault("aged-spam-done").unwrap() | parse_fault("spam-map").unwrap(),
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let r = rejuvenate_within(&vmm, opts, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        check_moved(&r, 4, 2 + round);
        for i in 0..4 {
            wait_beyond(&dir, i, base[i as usize]);
        }
    }
    // The rejuvenation lock was released: a normal one works afterwards.
    let base = progress(&dir, 4);
    let r = rejuvenate_within(&vmm, RejuvenateOptions::default(), Duration::from_secs(90))
        .expect("a later rejuvenation");
    check_moved(&r, 4, 4);
    for i in 0..4 {
        wait_beyond(&dir, i, base[i as usize]);
    }
    assert!(vmm.failure().is_none());
    let ev = events(&dir);
    for phase in [
        "booting",
        "ready",
        "handing_over",
        "aged_done",
        "verified",
        "revoked",
        "committed",
    ] {
        assert!(
            ev.iter()
                .any(|e| e["event"] == "handover" && e["phase"] == phase),
            "no handover event for phase {phase}: {ev:?}"
        );
    }
}

#[test]
fn lies_about_cpu_state_in_the_channel_have_no_effect() {
    if !kvm_or_skip("lie_state") {
        return;
    }
    let (vmm, dir) = started("liestate", "liar", 2);
    let base = progress(&dir, 2);
    let opts = RejuvenateOptions {
        fault: parse_fault("aged-lie-state").unwrap(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let r = rejuvenate_within(&vmm, opts, Duration::from_secs(90)).expect("the move succeeds");
    check_moved(&r, 2, 2);
    // The guests continue where they were, as KVM held them: memtouch
    // still finds its memory intact and the ticker keeps counting.
    for i in 0..2 {
        wait_beyond(&dir, i, base[i as usize]);
    }
    let l1 = console(&dir, "liar/g2");
    assert!(!l1.contains("crashed"), "{l1}");
    assert_memtouch_clean(&dir, "l2-0", "after the move");
    let st = vmm.status();
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == 1), "{st:?}");
}

#[test]
fn a_failed_rescue_destroys_its_successor_and_keeps_the_guests_running() {
    if !kvm_or_skip("failed_rescue") {
        return;
    }
    let line = "rescuefail";
    let (vmm, dir) = started("rescuefail", line, 3);
    let base = progress(&dir, 3);
    // The aged L1 dies after its first guest is accepted, and the successor
    // dies when L0 offers it the next one: L0's rescue fails.
    let opts = RejuvenateOptions {
        fault: parse_fault("aged-crash-after-first").unwrap()
            | parse_fault("crash-after-first").unwrap(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let r = rejuvenate_within(&vmm, opts, Duration::from_secs(120))
        .expect("L0 places the guests with a second successor");
    check_moved(&r, 3, 2);
    assert!(r.rescued.is_some(), "{r:?}");
    for i in 0..3 {
        wait_beyond(&dir, i, base[i as usize]);
    }
    let ev = events(&dir);
    let failed = ev
        .iter()
        .find(|e| e["event"] == "handover" && e["phase"] == "rescue_failed")
        .unwrap_or_else(|| panic!("no rescue_failed event: {ev:?}"));
    assert!(failed["error"].as_str().is_some(), "{failed}");
    // Only the second successor's memory is left of generation 2 (the
    // failed one was destroyed, not kept alive by a reference cycle), and
    // the dead aged VM's own RAM went with it.
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].generation, 2);
    assert_eq!(st.host_vms[0].status, "running");
    assert_eq!(st.host_vms[0].nested.len(), 3);
    let g2 = memfds(line, 2);
    let reference = {
        // A normal rejuvenation's successor, for comparison.
        let r = rejuvenate_within(&vmm, RejuvenateOptions::default(), Duration::from_secs(90))
            .expect("a later rejuvenation");
        check_moved(&r, 3, 3);
        memfds(line, 3)
    };
    assert_eq!(
        g2, reference,
        "memory files of generation 2 vs a normal successor"
    );
}

#[test]
fn a_refused_grant_leaves_the_grant_window_as_it_was() {
    if !kvm_or_skip("refused_grant") {
        return;
    }
    let dir = temp_dir("refusedgrant");
    let config = VmmConfig {
        nested: 0,
        pool: Some(3 << 30),
        console_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let images = vmbeam::images(Some(vmbeam::HOSTILE_ELF.to_vec())).unwrap();
    let vmm = Arc::new(Vmm::new(config, images).unwrap());
    vmm.start("hostile").unwrap();
    wait_console(&dir, "hostile/g1", Duration::from_secs(120), |t| {
        t.contains("hostile: done")
    });
    // The hostile guest hypervisor, asked to hand over, probes the grant
    // window instead and aborts.
    let opts = RejuvenateOptions {
        // Hashing 32 GiB of sparse grants proves nothing here.
        verify: false,
        timeout: Duration::from_secs(60),
        successor_image: Some(vmbeam::HYPERVISOR_ELF.to_vec()),
        ..Default::default()
    };
    let e = rejuvenate_within(&vmm, opts, Duration::from_secs(120)).unwrap_err();
    assert!(e.contains("aborted the handover"), "{e}");
    let text = wait_console(&dir, "hostile/g1", Duration::from_secs(30), |t| {
        t.contains("hostile-aged: done")
    });
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("hostile-aged"))
        .collect();
    assert!(
        !lines.iter().any(|l| l.contains("UNEXPECTED")),
        "{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refused grant left the window as it was -> Ok ok")),
        "{}",
        lines.join("\n")
    );
    assert!(vmm.failure().is_none());
}

/// Between revocation and commit a guest on its way is in no guest
/// hypervisor's table: the aged one's nested VMs are gone and the
/// successor has not been told to run it yet. A neighbour host VM in the
/// same process (the stress guest hypervisor in `STEAL` mode, VM_CREATE of
/// the moving guest's name over and over, then CONSOLE_WRITE into it when
/// it wins) must be refused all along, and the moving guest's console must
/// not get its bytes. The rejuvenation's phase events hold the window open
/// until the neighbour has made hundreds of hypercalls inside it.
#[test]
fn a_neighbour_cannot_take_a_moving_guests_name_before_commit() {
    if !kvm_or_skip("steal_between_revoke_and_commit") {
        return;
    }
    let dir = temp_dir("steal");
    let v = stresskit::vmm(&dir, 2, 2);
    v.start("hv0").unwrap();
    for i in 0..2 {
        wait_console(&dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
            t.lines().count() >= 3
        });
    }
    stresskit::start_stress(&v, stress::STEAL);
    stresskit::wait_stress(
        &v,
        &dir,
        "steal: 1000 tries, 0 taken",
        Duration::from_secs(60),
    );
    let thief = v.current(Some("stress")).unwrap();
    let aged = v.current(Some("hv0")).unwrap();
    let base = progress(&dir, 2);
    // In the window: wait until the neighbour has made this many more
    // hypercalls (each a VM_CREATE of the moving guest's name).
    const IN_WINDOW: u64 = 300;
    let held = std::sync::Mutex::new(None::<u64>);
    let events = |event: &str, fields: serde_json::Value| {
        if event != "handover" || fields["phase"] != "revoked" {
            return;
        }
        let from = thief.hypercalls.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = thief.hypercalls.load(std::sync::atomic::Ordering::Relaxed);
            if now >= from + IN_WINDOW {
                *held.lock().unwrap() = Some(now - from);
                return;
            }
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let (report, succ) = rejuvenate::rejuvenate(
        &v.shared,
        &v.images.hypervisor,
        &v.images.modules,
        &aged,
        &RejuvenateOptions::default(),
        &events,
    )
    .expect("the rejuvenation commits");
    let calls = held
        .lock()
        .unwrap()
        .expect("the neighbour made no hypercalls between revocation and commit");
    println!("the neighbour made {calls} hypercalls between revocation and commit");
    check_moved(&report, 2, 2);
    // The neighbour kept trying after the window, and never got the name.
    let tries = |l: &str| -> u64 {
        l.split_whitespace()
            .skip_while(|w| *w != "steal:")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let most = |text: &str| {
        text.lines()
            .filter(|l| l.contains("steal:"))
            .map(tries)
            .max()
            .unwrap_or(0)
    };
    let before = most(&console(&dir, stresskit::STRESS));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = console(&dir, stresskit::STRESS);
        assert!(!text.contains("UNEXPECTED"), "{text}");
        if most(&text) > before + 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "the neighbour stopped:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..2 {
        wait_beyond(&dir, i, base[i as usize]);
        let c = console(&dir, &format!("l2-{i}"));
        assert!(
            !c.contains("STOLEN"),
            "l2-{i}'s console got the neighbour's bytes:\n{c}"
        );
    }
    assert_eq!(succ.nested.lock().unwrap().count(), 2);
    assert!(v.failure().is_none());
    drop(succ);
}
