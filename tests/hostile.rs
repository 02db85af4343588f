//! A guest hypervisor that throws malformed, out-of-range and
//! out-of-role hypercalls at L0 must get a clean refusal for each, must not
//! be able to crash or wedge L0, and must not disturb a well-behaved host VM
//! running next to it in the same process.
//!
//! The hostile guest (`guests/hostile`) checks every status itself and
//! prints one line per case; these tests read its console. Booted as the
//! successor of a real guest hypervisor in a rejuvenation, it must not be
//! able to take or harm the guests it is offered either.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::host::memory::MemFile;
use vmbeam_vmm::l1::hostvm::{HostVm, HostVmSpec};
use vmbeam_vmm::migration::rejuvenate::{RejuvenateError, RejuvenateOptions};
use vmbeam_vmm::vmm::{Vmm, VmmError};

/// Console of the hostile host VM line "hostile", generation 1.
const HOSTILE_CONSOLE: &str = "hostile/g1";

/// A VMM whose guest hypervisor is the hostile one, with no nested guests.
fn hostile_vmm(dir: &Path) -> Vmm {
    let config = VmmConfig {
        nested: 0,
        console_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let images = vmbeam::images(Some(vmbeam::HOSTILE_ELF.to_vec())).unwrap();
    Vmm::new(config, images).unwrap()
}

/// Waits for the hostile guest's `done` line, failing early if its host VM fails.
fn wait_done(vmm: &Vmm, dir: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = common::console(dir, HOSTILE_CONSOLE);
        if text.lines().any(|l| l.starts_with("hostile: done")) {
            return text;
        }
        if let Some(f) = vmm.failure() {
            panic!("the hostile host VM failed: {f}\nits console:\n{text}");
        }
        if Instant::now() >= deadline {
            panic!("the hostile guest did not finish in {timeout:?}; its console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks the hostile guest's report and that L0 survived it intact.
fn check_report(vmm: &Vmm, text: &str) {
    for l in text.lines() {
        println!("[hostile-g1] {l}");
    }
    let unexpected: Vec<&str> = text.lines().filter(|l| l.contains("UNEXPECTED")).collect();
    assert!(
        unexpected.is_empty(),
        "L0 gave unexpected answers:\n{}",
        unexpected.join("\n")
    );
    let done = text
        .lines()
        .find(|l| l.starts_with("hostile: done"))
        .expect("done line");
    let words: Vec<&str> = done.split_whitespace().collect();
    // "hostile: done {n_ok} ok {n_bad} unexpected"
    assert_eq!(words.len(), 6, "{done}");
    assert_eq!(
        (words[3], words[4], words[5]),
        ("ok", "0", "unexpected"),
        "{done}"
    );
    let n_ok: usize = words[2].parse().expect("count of passed cases");
    let ok_lines = text
        .lines()
        .filter(|l| l.starts_with("hostile: ") && l.ends_with(" ok"))
        .count();
    assert_eq!(n_ok, ok_lines, "the done line must count every case line");
    assert!(n_ok >= 60, "too few cases ran: {done}");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    let hv = st
        .host_vms
        .iter()
        .find(|h| h.name == "hostile")
        .expect("hostile host VM in status");
    assert_eq!(hv.status, "running", "{hv:?}");
    // Everything the guest created it destroyed again; L0 kept nothing.
    assert!(hv.nested.is_empty(), "{:?}", hv.nested);
}

/// Console lines of nested guests l2-0 and l2-1 of host VM "normal" (or
/// else the first one).
fn nested_lines(vmm: &Vmm) -> (u64, u64) {
    let st = vmm.status();
    let lines = |name: &str| {
        st.host_vms
            .iter()
            .find(|h| h.name == "normal")
            .or(st.host_vms.first())
            .and_then(|h| h.nested.iter().find(|n| n.name == name))
            .map(|n| n.console_lines)
            .unwrap_or(0)
    };
    (lines("l2-0"), lines("l2-1"))
}

/// Waits until both nested guests of `vmm` printed more than `than`.
fn wait_progress(vmm: &Vmm, than: (u64, u64), what: &str) -> (u64, u64) {
    let timeout = Duration::from_secs(120);
    let deadline = Instant::now() + timeout;
    loop {
        let now = nested_lines(vmm);
        if now.0 > than.0 && now.1 > than.1 {
            return now;
        }
        if let Some(f) = vmm.failure() {
            panic!("the normal host VM failed {what}: {f}");
        }
        if Instant::now() >= deadline {
            panic!(
                "the normal VM's nested guests stopped printing {what}: lines {now:?}, \
                 before {than:?}, after {timeout:?}; status {:?}",
                vmm.status()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hostile_hypercalls_are_refused() {
    if !common::kvm_or_skip("hostile_hypercalls_are_refused") {
        return;
    }
    let dir = common::temp_dir("hostile-alone");
    let vmm = hostile_vmm(&dir);
    vmm.start("hostile").unwrap();
    let text = wait_done(&vmm, &dir, Duration::from_secs(60));
    check_report(&vmm, &text);
    // Alone in its VMM, the name l2-0 is free: created and destroyed again.
    assert!(
        text.contains("VM_CREATE l2-0 (a name a neighbour may hold) -> Ok ok")
            && text.contains("VM_DESTROY l2-0 -> Ok ok"),
        "{text}"
    );
    // It keeps idling in OP_WAIT: L0 keeps serving its hypercalls.
    let calls = || vmm.status().host_vms[0].hypercalls;
    let before = calls();
    common::wait_until(Duration::from_secs(30), "hypercalls after done", || {
        calls() > before
    });
    assert_eq!(vmm.failure(), None);
    assert_eq!(vmm.status().host_vms[0].status, "running");
}

/// Boots the hostile guest hypervisor as host VM line `line` of `vmm`,
/// next to whatever the VMM already runs (same KVM, guest records, console
/// directory and status), with no nested guests of its own.
fn start_hostile_in(vmm: &Vmm, line: &str) -> Arc<HostVm> {
    let c = &vmm.config;
    let spec = HostVmSpec {
        line: line.to_string(),
        generation: 1,
        role: vmbeam_abi::boot::ROLE_PRIMARY,
        ram: c.ram,
        pool: c.pool_size(),
        vcpus: c.vcpus,
        nested: Vec::new(),
        flags: 0,
        slice_us: c.slice_us,
        age_leak_pages: 0,
    };
    let channel =
        MemFile::new(&format!("{line}-channel"), vmbeam_abi::layout::CHANNEL_SIZE).unwrap();
    let vm = HostVm::boot(
        vmm.shared.clone(),
        spec,
        vmbeam::HOSTILE_ELF,
        &vmm.images.modules,
        channel,
        None,
    )
    .unwrap();
    vmm.add_line(vm.clone());
    vm
}

/// The neighbour's nested guests as status shows them.
fn neighbour_guests(vmm: &Vmm) -> Vec<vmbeam_vmm::vmm::NestedStatus> {
    vmm.status()
        .host_vms
        .into_iter()
        .find(|h| h.name == "normal")
        .expect("the neighbour in status")
        .nested
}

#[test]
fn hostile_guest_does_not_disturb_a_neighbour() {
    if !common::kvm_or_skip("hostile_guest_does_not_disturb_a_neighbour") {
        return;
    }
    // One VMM runs both: they share KVM, the guest records (names), the
    // console directory and the status tree.
    let dir = common::temp_dir("hostile-neighbour");
    let vmm = common::vmm(&dir, VmmConfig::default());
    vmm.start("normal").unwrap();
    let before = wait_progress(&vmm, (0, 0), "at start");

    let hostile = start_hostile_in(&vmm, "hostile");
    let text = wait_done(&vmm, &dir, Duration::from_secs(120));
    let at_done = nested_lines(&vmm);
    println!(
        "normal nested console lines: {before:?} at hostile start, {at_done:?} at hostile done"
    );
    check_report(&vmm, &text);
    // The neighbour's guest l2-0 holds that name: the hostile guest
    // hypervisor could not take it.
    assert!(
        text.contains("VM_CREATE l2-0 (a name a neighbour may hold) -> NotPermitted ok"),
        "{text}"
    );
    // Its records are the neighbour's still, and nothing of the hostile
    // guest hypervisor reached the neighbour's consoles.
    let guests = neighbour_guests(&vmm);
    assert_eq!(guests.len(), 2, "{guests:?}");
    for g in &guests {
        assert_eq!((g.host_vm.as_str(), g.generation), ("normal", 1), "{g:?}");
        let c = common::console(&dir, &g.name);
        assert!(!c.contains("hostile"), "{}: {c}", g.name);
    }
    common::assert_memtouch_clean(&dir, "l2-0", "next to the hostile guest hypervisor");

    // The neighbour keeps printing while the hostile VM is still up...
    let during = wait_progress(&vmm, at_done, "while the hostile VM runs");
    assert!(during.0 > before.0 && during.1 > before.1);
    assert_eq!(vmm.failure(), None);
    assert_eq!(hostile.status(), vmbeam_vmm::l1::hostvm::VmStatus::Running);

    // ...and after it is stopped.
    hostile.stop_vcpus();
    hostile.set_status(vmbeam_vmm::l1::hostvm::VmStatus::Stopped);
    drop(hostile.drop_nested());
    let gone = nested_lines(&vmm);
    wait_progress(&vmm, gone, "after the hostile VM stopped");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    let normal = st.host_vms.iter().find(|h| h.name == "normal").unwrap();
    assert_eq!(normal.status, "running");
    assert_eq!(normal.nested.len(), 2);
    assert!(
        normal.nested.iter().all(|n| n.state != "crashed"),
        "{:?}",
        normal.nested
    );
    common::assert_memtouch_clean(&dir, "l2-0", "after the hostile VM stopped");
}

/// Console of the aged guest hypervisor (line "hv0", generation 1).
const AGED_CONSOLE: &str = "hv0/g1";
/// Console of the successor generation 2 (the hostile one, at first).
const SUCCESSOR_CONSOLE: &str = "hv0/g2";

/// Starts host VM `line` (2 nested guests, consoles in `dir`) and
/// rejuvenates it with the hostile guest hypervisor as the successor;
/// returns the VMM and the error the rejuvenation must end with.
fn rejuvenate_to_hostile(dir: &Path, line: &str) -> (Vmm, VmmError) {
    let vmm = common::vmm(dir, VmmConfig::default());
    vmm.start(line).unwrap();
    wait_progress(&vmm, (0, 0), "at start");
    let opts = RejuvenateOptions {
        successor_image: Some(vmbeam::HOSTILE_ELF.to_vec()),
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let e = vmm
        .rejuvenate(None, &opts)
        .expect_err("a hostile successor must not get the guests");
    (vmm, e)
}

#[test]
fn a_hostile_successor_cannot_take_or_harm_the_guests() {
    if !common::kvm_or_skip("a_hostile_successor_cannot_take_or_harm_the_guests") {
        return;
    }
    let dir = common::temp_dir("hostile-successor");
    let (vmm, e) = rejuvenate_to_hostile(&dir, "hv0");
    let msg = e.to_string();
    println!("rejuvenation with a hostile successor: {msg}");
    assert!(
        matches!(
            e,
            VmmError::Rejuvenate(RejuvenateError::RolledBack { guests: 2, .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains("all 2 nested guests keep running under generation 1"),
        "{msg}"
    );
    // The aged guest hypervisor refused the garbage reply (or L0 gave up).
    let aged = common::console(&dir, AGED_CONSOLE);
    assert!(
        aged.contains("handover: bad reply") || msg.contains("timed out"),
        "neither did the aged guest hypervisor refuse the garbage nor did L0 time out: \
         {msg}\naged console:\n{aged}"
    );

    // The hostile successor ran its whole script and every answer was right.
    let text = common::wait_console(&dir, SUCCESSOR_CONSOLE, Duration::from_secs(60), |t| {
        t.lines().any(|l| l.starts_with("hostile-successor: done"))
    });
    for l in text.lines() {
        println!("[{SUCCESSOR_CONSOLE}] {l}");
    }
    let unexpected: Vec<&str> = text.lines().filter(|l| l.contains("UNEXPECTED")).collect();
    assert!(
        unexpected.is_empty(),
        "L0 gave the hostile successor unexpected answers:\n{}",
        unexpected.join("\n")
    );
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    // "hostile-successor: done {n_ok} ok {n_bad} unexpected", last line.
    assert_eq!(
        words.len(),
        6,
        "the console must end with the done line: {last}"
    );
    assert_eq!(
        (words[0], words[1], words[3], words[4], words[5]),
        ("hostile-successor:", "done", "ok", "0", "unexpected"),
        "{last}"
    );
    let n_ok: usize = words[2].parse().expect("count of passed steps");
    let ok_lines = text
        .lines()
        .filter(|l| l.starts_with("hostile-successor: ") && l.ends_with(" ok"))
        .count();
    assert_eq!(n_ok, ok_lines, "the done line must count every step line");
    // The offer arrived, so the steps after adoption ran too.
    assert!(
        text.contains("VM_DESTROY of the adopted guest (given back) -> Ok ok"),
        "{text}"
    );

    // Both guests stayed with generation 1 and keep running there.
    let after = nested_lines(&vmm);
    wait_progress(&vmm, after, "after the hostile successor");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1, "{st:?}");
    let hv = &st.host_vms[0];
    assert_eq!(
        (hv.generation, hv.status.as_str()),
        (1, "running"),
        "{hv:?}"
    );
    assert_eq!(hv.nested.len(), 2, "{:?}", hv.nested);
    assert!(
        hv.nested
            .iter()
            .all(|n| n.generation == 1 && n.moves == 0 && n.state != "crashed"),
        "{:?}",
        hv.nested
    );
    common::assert_memtouch_clean(&dir, "l2-0", "after the hostile successor");

    // A normal rejuvenation still works and moves both guests intact:
    // the successor maps the very pages the guests had.
    let pages = common::moves::guest_pages(&vmm.current(None).unwrap(), false);
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    assert_eq!((r.from_generation, r.to_generation), (1, 2), "{r:?}");
    assert_eq!(r.guests.len(), 2, "{r:?}");
    for g in &r.guests {
        assert!(g.running_after, "{g:?}");
    }
    common::moves::check_same_pages(&vmm.current(None).unwrap(), &pages);
    let moved = nested_lines(&vmm);
    wait_progress(&vmm, moved, "after a normal rejuvenation");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    assert_eq!(st.host_vms[0].generation, 2);
    assert!(st.host_vms[0]
        .nested
        .iter()
        .all(|n| n.generation == 2 && n.moves == 1));
    common::assert_memtouch_clean(&dir, "l2-0", "after a normal rejuvenation");
}

/// The hostile successor confirmed a slot of the guest it was offered (L0
/// then records the successor's address for it) before giving the guest
/// back: the guest must be entirely the aged guest hypervisor's again, so
/// the whole host VM can still move to another VMM (every slot is found in
/// the aged VM's own memory).
#[test]
fn guests_given_back_by_a_hostile_successor_can_still_migrate() {
    if !common::kvm_or_skip("guests_given_back_by_a_hostile_successor_can_still_migrate") {
        return;
    }
    let dir = common::temp_dir("hostile-successor-src");
    let (src, e) = rejuvenate_to_hostile(&dir, "hvm");
    assert!(
        matches!(e, VmmError::Rejuvenate(RejuvenateError::RolledBack { .. })),
        "{e}"
    );
    let text = common::console(&dir, "hvm/g2");
    assert!(
        text.contains("VM_MAP offered range exactly -> Ok ok"),
        "the hostile successor did not get to confirm a slot:\n{text}"
    );
    let ddir = common::temp_dir("hostile-successor-dst");
    let dst = Arc::new(common::vmm(&ddir, VmmConfig::default()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let d = dst.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            if let Ok(vm) = vmbeam_vmm::migration::remote::receive(&d.shared, s, &|n| d.has_line(n))
            {
                d.add_line(vm);
            }
        }
    });
    let r = src
        .migrate(None, &format!("tcp://{addr}"), Duration::from_millis(300))
        .expect("the host VM must still migrate after the hostile successor");
    assert_eq!(r.guests.len(), 2, "{r:?}");
    let round = common::memtouch_round(&common::console(&dir, "l2-0")).unwrap_or(0);
    common::wait_console(&ddir, "l2-0", Duration::from_secs(60), |t| {
        common::memtouch_round(t).is_some_and(|n| n > round)
    });
    common::assert_memtouch_clean(&ddir, "l2-0", "on the destination");
    // Every word of memtouch's bulk arrived, read from outside L0.
    common::moves::check_bulk(&dst.current(None).unwrap(), "l2-0", 0x5eed_0000);
    assert_eq!(dst.failure(), None);
}

/// Every vCPU of a hostile successor VM_CREATEs the name of the guest it
/// was offered at the same moment, while the guest is being adopted: L0
/// moves the guest into the successor's table for exactly one of them and
/// refuses the others (a table never holds a name twice), and the
/// rejuvenation still ends cleanly (here: rolled back, since the hostile
/// successor then gives the guest back and lies to the aged side) with
/// every guest running.
#[test]
fn racing_vm_creates_of_an_offered_guest_adopt_it_once() {
    if !common::kvm_or_skip("racing_vm_creates_of_an_offered_guest_adopt_it_once") {
        return;
    }
    let dir = common::temp_dir("adopt-race");
    let vmm = common::vmm(
        &dir,
        VmmConfig {
            vcpus: vmbeam_abi::layout::MAX_VCPUS,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    wait_progress(&vmm, (0, 0), "at start");
    let opts = RejuvenateOptions {
        successor_image: Some(vmbeam::HOSTILE_ELF.to_vec()),
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let e = vmm
        .rejuvenate(None, &opts)
        .expect_err("a hostile successor must not get the guests");
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            VmmError::Rejuvenate(RejuvenateError::RolledBack { guests: 2, .. })
        ),
        "{msg}"
    );
    let text = common::wait_console(&dir, SUCCESSOR_CONSOLE, Duration::from_secs(60), |t| {
        t.lines().any(|l| l.starts_with("hostile-successor: done"))
    });
    let n = vmbeam_abi::layout::MAX_VCPUS;
    assert!(
        text.contains(&format!(
            "(VM_CREATE of the offered name raced by {n} vCPUs: 1 adopted it, {} refused)",
            n - 1
        )),
        "{text}"
    );
    assert!(
        text.contains("VM_CREATE of the offered name raced by every vCPU, one adopts it -> Ok ok"),
        "{text}"
    );
    let unexpected: Vec<&str> = text.lines().filter(|l| l.contains("UNEXPECTED")).collect();
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    // No guest was lost: both stay with generation 1 and keep running.
    let after = nested_lines(&vmm);
    wait_progress(&vmm, after, "after the adoption race");
    assert_eq!(vmm.failure(), None);
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1, "{st:?}");
    let hv = &st.host_vms[0];
    assert_eq!((hv.generation, hv.status.as_str()), (1, "running"));
    let mut names: Vec<&str> = hv.nested.iter().map(|n| n.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["l2-0", "l2-1"], "{:?}", hv.nested);
    assert!(
        hv.nested
            .iter()
            .all(|n| n.generation == 1 && n.state != "crashed"),
        "{:?}",
        hv.nested
    );
    common::assert_memtouch_clean(&dir, "l2-0", "after the adoption race");
}
