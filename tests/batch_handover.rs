//! Batch rejuvenation: every nested guest moves to the successor on its own,
//! at host speed (L0 shares the nested KVM VM between both guest
//! hypervisors' tables and switches it over right after one of its exits).
//! Correctness only: all moved, memory intact, consoles continue, a
//! failure before the moves leaves every guest running under the aged L1,
//! and neither guest hypervisor dying while guests move loses one.

mod common;

use std::time::Duration;

use common::*;
use vmbeam_vmm::api::parse_fault;
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;

fn started(test: &str, line: &str, nested: u32) -> (Vmm, common::TempDir) {
    started_with_events(test, line, nested, Duration::from_secs(120))
}

/// The events logged so far whose `event` is `name`.
fn events(dir: &std::path::Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

/// Every guest of `n` progresses beyond `base`, memtouch saw no corrupted
/// word, and the line runs `n` guests under `generation`, bound to it.
fn all_alive(vmm: &Vmm, dir: &std::path::Path, n: u32, base: &[u64], generation: u32, when: &str) {
    for i in 0..n {
        wait_beyond(dir, i, base[i as usize]);
    }
    for i in (0..n).step_by(2) {
        common::assert_memtouch_clean(dir, &format!("l2-{i}"), when);
    }
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1, "{when}: {st:?}");
    assert_eq!(st.host_vms[0].generation, generation, "{when}: {st:?}");
    assert_eq!(st.host_vms[0].nested.len(), n as usize, "{when}: {st:?}");
    assert!(
        events(dir, "guest_lost").is_empty(),
        "{when}: a guest was lost: {:?}",
        events(dir, "guest_lost")
    );
}

fn batch() -> RejuvenateOptions {
    RejuvenateOptions {
        batch: true,
        ..Default::default()
    }
}

#[test]
fn a_batch_moves_every_guest_with_its_memory_and_console() {
    if !kvm_or_skip("batch_moves") {
        return;
    }
    let (vmm, dir) = started("batchmoves", "bat", 6);
    for round in 0..2u32 {
        let base = progress(&dir, 6);
        let r = vmm.rejuvenate(None, &batch()).unwrap();
        assert_eq!(r.to_generation, 2 + round, "{r:?}");
        assert_eq!(r.bytes_copied, 0);
        assert_eq!(r.guests.len(), 6, "{r:?}");
        for g in &r.guests {
            assert!(g.running_after, "{g:?}");
            assert_eq!(g.moves, round + 1, "{g:?}");
            assert_eq!(g.checksum_before, g.checksum_after, "{g:?}");
        }
        for i in 0..6 {
            wait_beyond(&dir, i, base[i as usize]);
        }
    }
    for i in (0..6).step_by(2) {
        common::assert_memtouch_clean(&dir, &format!("l2-{i}"), "after two batch moves");
    }
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].generation, 3);
    assert_eq!(st.host_vms[0].nested.len(), 6);
    // A channel-protocol rejuvenation still works after batches.
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    assert_eq!(r.guests.len(), 6);
}

#[test]
fn a_guest_the_successor_cannot_take_leaves_every_guest_with_the_aged_hypervisor() {
    if !kvm_or_skip("batch_rollback") {
        return;
    }
    let (vmm, dir) = started("batchrollback", "batrb", 4);
    let base = progress(&dir, 4);
    // The successor takes the first guest and then no other: the batch
    // cannot start moving, so nothing has paused and nothing moves.
    let e = vmm
        .rejuvenate(
            None,
            &RejuvenateOptions {
                fault: vmbeam_vmm::api::parse_fault("reject-first").unwrap(),
                timeout: Duration::from_secs(3),
                ..batch()
            },
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("all 4 nested guests keep running under generation 1"),
        "{msg}"
    );
    for i in 0..4 {
        wait_beyond(&dir, i, base[i as usize]);
    }
    let st = vmm.status();
    assert_eq!(st.host_vms[0].generation, 1);
    assert!(st.host_vms[0].nested.iter().all(|n| n.moves == 0), "{st:?}");
    assert_eq!(st.host_vms[0].nested.len(), 4);
    // The same guests then move in a batch that works.
    let base = progress(&dir, 4);
    let r = vmm.rejuvenate(None, &batch()).unwrap();
    assert!(
        r.guests.iter().all(|g| g.running_after && g.moves == 1),
        "{r:?}"
    );
    for i in 0..4 {
        wait_beyond(&dir, i, base[i as usize]);
    }
}

#[test]
fn a_successor_that_dies_while_guests_move_gives_every_moved_guest_back() {
    if !kvm_or_skip("batch_succ_dies") {
        return;
    }
    let (vmm, dir) = started("batchsuccdies", "batsd", 4);
    let base = progress(&dir, 4);
    // The successor runs the first guest it adopted (so it has moved
    // there), then triple-faults while the others are still on their way
    // (the aged L1 runs only that guest meanwhile, so L0 forces the other
    // moves, 100 ms apart).
    let e = vmm
        .rejuvenate(
            None,
            &RejuvenateOptions {
                fault: parse_fault("crash-after-moves").unwrap(),
                timeout: Duration::from_secs(30),
                ..batch()
            },
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("all 4 nested guests keep running under generation 1"),
        "{msg}"
    );
    let back = events(&dir, "moved_back");
    assert!(
        !back.is_empty() && back.len() < 4,
        "the first guest had moved and must have come back, and some had not moved yet: {back:?} ({msg})"
    );
    all_alive(&vmm, &dir, 4, &base, 1, "after the successor died");
    let st = vmm.status();
    assert!(
        st.host_vms[0]
            .nested
            .iter()
            .all(|n| n.moves == 0 && n.generation == 1),
        "{st:?}"
    );
    // The same guests then move in a batch that works.
    let base = progress(&dir, 4);
    let r = vmm.rejuvenate(None, &batch()).unwrap();
    assert_eq!(r.guests.len(), 4, "{r:?}");
    for g in &r.guests {
        assert!(g.running_after && g.moves == 1, "{g:?}");
        assert_eq!(g.checksum_before, g.checksum_after, "{g:?}");
    }
    all_alive(&vmm, &dir, 4, &base, 2, "after the next batch");
}

#[test]
fn an_aged_hypervisor_that_dies_while_guests_move_loses_none() {
    if !kvm_or_skip("batch_aged_dies") {
        return;
    }
    let (vmm, dir) = started("batchageddies", "batad", 4);
    let base = progress(&dir, 4);
    // The aged L1 crashes as soon as it learns its first guest moved: L0
    // moves the rest itself.
    let r = vmm
        .rejuvenate(
            None,
            &RejuvenateOptions {
                fault: parse_fault("aged-crash-after-first").unwrap(),
                timeout: Duration::from_secs(30),
                ..batch()
            },
        )
        .unwrap();
    assert_eq!(r.to_generation, 2, "{r:?}");
    assert_eq!(r.guests.len(), 4, "{r:?}");
    for g in &r.guests {
        assert!(g.running_after && g.moves == 1, "{g:?}");
    }
    assert!(
        console(&dir, "batad/g1").contains("fault: crashing after the first move"),
        "the aged hypervisor did not crash while guests moved:\n{}",
        console(&dir, "batad/g1")
    );
    all_alive(&vmm, &dir, 4, &base, 2, "after the aged hypervisor died");
    let base = progress(&dir, 4);
    let r = vmm.rejuvenate(None, &batch()).unwrap();
    assert!(
        r.guests.iter().all(|g| g.running_after && g.moves == 2),
        "{r:?}"
    );
    all_alive(&vmm, &dir, 4, &base, 3, "after the next batch");
}
