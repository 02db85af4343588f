//! Zero-copy rejuvenation moves every nested guest to a fresh guest
//! hypervisor without copying memory, and rolls back on any failure.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use common::{moves, procfs};
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::l1::hostvm::HostVm;
use vmbeam_vmm::migration::rejuvenate::{RejuvenateError, RejuvenateOptions, Report};
use vmbeam_vmm::vmm::{Vmm, VmmError};

/// Starts host VM line `test` (its own name, so that this test's memory
/// files and consoles can be told apart from other tests' in the same
/// process) with `nested` guests, memtouch and ticker in turn.
fn started(test: &str, nested: u32) -> (Vmm, common::TempDir) {
    started_as(test, nested, test)
}

/// Like `started`, with host VM line `line`.
fn started_as(test: &str, nested: u32, line: &str) -> (Vmm, common::TempDir) {
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
    assert_eq!(r.guests.len(), nested);
    for g in &r.guests {
        assert!(g.running_after, "{g:?}");
        assert_eq!(g.mem_bytes, 16 << 20);
    }
}

/// Rejuvenates line `line` zero-copy with `opts` and checks the move from
/// outside L0: the successor's grant mappings are the guests' own memfd
/// pages, the aged guest hypervisor's pages were released, and the channel
/// memfd holds what the report says crossed it. Returns the report.
fn move_checked(
    vmm: &Vmm,
    line: &str,
    opts: &RejuvenateOptions,
    nested: usize,
    generation: u32,
) -> Report {
    let aged = vmm.current(Some(line)).unwrap();
    let pages = moves::guest_pages(&aged, false);
    assert_eq!(pages.len(), nested, "{pages:?}");
    drop(aged);
    let fds = procfs::memfds();
    let r = vmm.rejuvenate(Some(line), opts).unwrap();
    check_report(&r, nested, generation);
    let succ = vmm.current(Some(line)).unwrap();
    assert_eq!(succ.spec.generation, generation);
    let kept = moves::check_same_pages(&succ, &pages);
    let left = moves::check_aged_released(&fds, line, generation - 1, &kept);
    let guests: u64 = r.guests.iter().map(|g| g.mem_bytes).sum();
    assert!(left <= guests, "{left} bytes of the aged files left");
    let mb = moves::channel_mailboxes(line);
    println!("{line}: channel {mb:?}, report {} bytes", r.channel_bytes);
    // Aged to successor: one GUEST per guest and END; back: HELLO and one
    // ACCEPT per guest.
    let n = nested as u32;
    assert_eq!((mb.to_successor, mb.to_aged), (n + 1, n + 1), "{mb:?}");
    // Every message starts with a header, and the last of each direction
    // is still in its mailbox: the report counts at least that much.
    let headers = (mb.to_successor + mb.to_aged) as u64
        * std::mem::size_of::<vmbeam_abi::handover::MsgHeader>() as u64;
    let last = (mb.last_to_successor + mb.last_to_aged) as u64;
    assert!(
        r.channel_bytes >= headers.max(last),
        "channel {mb:?}, report {}",
        r.channel_bytes
    );
    r
}

#[test]
fn rejuvenation_moves_every_guest_without_copying() {
    if !kvm_or_skip("rejuvenation_moves_every_guest_without_copying") {
        return;
    }
    let (vmm, dir) = started("zerocopy", 3);
    let base = progress(&dir, 3);
    move_checked(&vmm, "zerocopy", &RejuvenateOptions::default(), 3, 2);
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
    let l1 = console(&dir, "zerocopy/g2");
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
        move_checked(
            &vmm,
            "zerocopy",
            &RejuvenateOptions::default(),
            3,
            generation,
        );
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
        fault: vmbeam_vmm::api::parse_fault(fault).unwrap(),
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
    move_checked(&vmm, &line, &RejuvenateOptions::default(), 2, 2);
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
                fault: vmbeam_vmm::api::parse_fault("hang-at-boot").unwrap(),
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
        let aged = vmm.current(Some("copymodes")).unwrap();
        let pages = moves::guest_pages(&aged, false);
        drop(aged);
        let fds = procfs::memfds();
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
        }
        // memtouch's bulk is filled by L0, so at least that much must have crossed.
        let bulk = (16 << 20) - vmbeam_abi::l2::BULK_BASE;
        let succ = vmm.current(Some("copymodes")).unwrap();
        if mode == vmbeam_vmm::migration::rejuvenate::Mode::ZeroCopy {
            moves::check_same_pages(&succ, &pages);
        } else {
            assert!(
                r.bytes_copied >= bulk,
                "{mode:?} copied only {}",
                r.bytes_copied
            );
            // Each guest's pages are now in a memfd that did not exist
            // before the move, filled by the copy (memtouch's with at
            // least its bulk).
            let now = procfs::memfds();
            let grants = succ.grant_mappings();
            assert_eq!(grants.len(), 2, "{grants:?}");
            for g in &grants {
                let b = procfs::backing(g.host_addr, g.len).unwrap();
                assert!(
                    !fds.contains_key(&b.inode),
                    "{mode:?}: {g:?} in an old file"
                );
                let m = &now[&b.inode];
                let least = if g.guest.as_deref() == Some("l2-0") {
                    bulk
                } else {
                    1
                };
                assert!(m.allocated >= least, "{mode:?}: {m:?} holds too little");
            }
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
                fault: vmbeam_vmm::api::parse_fault("aged-crash-after-first").unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
    // The aged L1 handed over one guest and died; L0 offered the other two.
    assert_eq!(r.rescued, Some(2), "{r:?}");
    check_report(&r, 3, 2);
    wait_progress_beyond(&dir, 3, &base);
    let l1 = console(&dir, "agedcrash/g1");
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
    let r = move_checked(&vmm, "agedcrash", &RejuvenateOptions::default(), 3, 3);
    assert_eq!(r.rescued, None);
    wait_progress_beyond(&dir, 3, &base);
}

/// The boot-parameter page of every guest of `vm`, by name, read from
/// outside L0 through the nested VM's own mapping.
fn boot_pages(vm: &HostVm) -> BTreeMap<String, Vec<u8>> {
    let page = vmbeam_abi::l2::BOOT_PARAMS;
    moves::slots_of(vm)
        .into_iter()
        .map(|(name, slots)| {
            let s = slots
                .iter()
                .find(|s| s.l2_gpa <= page && page + 0x1000 <= s.l2_gpa + s.len)
                .expect("a slot holds the boot-parameter page");
            let addr = s.hva + (page - s.l2_gpa) as usize;
            (name, procfs::read_mem(addr, 0x1000).unwrap())
        })
        .collect()
}

/// The check can fail: one byte of a paused guest changed between its
/// before- and after-checksums (`flip-byte-before-verify`) must make the
/// move roll back, with every guest still running under the aged guest
/// hypervisor and its memory as it was, except the injected byte. The byte
/// is the last of the boot-parameter page (`fault::FLIP_BYTE_GPA`), which
/// memtouch neither verifies nor reads after it started; it stays changed.
#[test]
fn a_guest_changed_during_the_move_rolls_the_move_back() {
    let test = "flipbyte";
    if !kvm_or_skip("a_guest_changed_during_the_move_rolls_the_move_back") {
        return;
    }
    let (vmm, dir) = started(test, 2);
    let aged = vmm.current(Some(test)).unwrap();
    let before = boot_pages(&aged);
    let base = progress(&dir, 2);
    let opts = RejuvenateOptions {
        fault: vmbeam_vmm::api::parse_fault("flip-byte-before-verify").unwrap(),
        ..Default::default()
    };
    let e = vmm.rejuvenate(Some(test), &opts).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
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
    let flipped = msg
        .split("memory of ")
        .nth(1)
        .and_then(|r| r.split(" differs after the move").next())
        .unwrap_or_else(|| panic!("the error does not name a guest whose memory changed: {msg}"))
        .to_string();

    // The line still runs on the aged host VM, whose guests keep printing.
    let now = vmm.current(Some(test)).unwrap();
    assert!(Arc::ptr_eq(&now, &aged), "the line's host VM changed");
    assert_eq!(now.spec.generation, 1);
    wait_progress_beyond(&dir, 2, &base);
    let st = vmm.status();
    let hv = st.host_vms.iter().find(|h| h.name == test).unwrap();
    assert_eq!(
        (hv.generation, hv.status.as_str()),
        (1, "running"),
        "{hv:?}"
    );
    assert_eq!(hv.nested.len(), 2, "{hv:?}");
    assert!(
        hv.nested.iter().all(|n| n.moves == 0 && n.generation == 1),
        "{hv:?}"
    );
    assert_eq!(memfds(test, 2), 0, "the successor's memory was released");

    // Memory: only the injected byte of the named guest changed.
    let after = boot_pages(&aged);
    assert_eq!(after.len(), 2);
    let at = (vmbeam_abi::boot::fault::FLIP_BYTE_GPA - vmbeam_abi::l2::BOOT_PARAMS) as usize;
    for (name, page) in &after {
        let old = &before[name];
        let diff: Vec<usize> = (0..page.len()).filter(|&i| page[i] != old[i]).collect();
        if *name == flipped {
            assert_eq!(diff, [at], "{name}: bytes changed");
            assert_eq!(page[at], !old[at]);
        } else {
            assert!(diff.is_empty(), "{name}: bytes {diff:?} changed");
        }
    }
    moves::check_bulk(&aged, "l2-0", 0x5eed_0000);
    assert_memtouch_clean(&dir, "l2-0", "after the rolled-back move");

    // A move without the fault carries the guests, changed byte and all.
    let base = progress(&dir, 2);
    move_checked(&vmm, test, &RejuvenateOptions::default(), 2, 2);
    wait_progress_beyond(&dir, 2, &base);
    drop(aged);
    let succ = vmm.current(Some(test)).unwrap();
    assert_eq!(boot_pages(&succ), after);
}
