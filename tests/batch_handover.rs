//! Batch rejuvenation: every nested guest moves to the successor on its own,
//! at host speed (L0 shares the nested KVM VM between both guest
//! hypervisors' tables and switches it over right after one of its exits).
//! Correctness only: all moved, memory intact, consoles continue, and a
//! failure before the moves leaves every guest running under the aged L1.

mod common;

use std::time::Duration;

use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;

fn started(test: &str, line: &str, nested: u32) -> (Vmm, common::TempDir) {
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
        wait_console(&dir, &format!("l2-{i}"), Duration::from_secs(120), |t| {
            t.lines().count() >= 3
        });
    }
    (vmm, dir)
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
