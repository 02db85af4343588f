//! A zero-copy move, checked from outside the code that performs it.
//!
//! Two memtouch guests finish their rounds and halt, so their memory stays
//! still. Before the move the test records, from `/proc/self/maps`, which
//! memfd pages (inode, offset) back each guest's slots, hashes the guest's
//! memory itself through the aged host VM's mapping (`/proc/self/mem`), and
//! notes the process's memfds and resident set. After the move each of the
//! successor host VM's grant mappings must be backed by exactly those memfd
//! pages, no memfd may exist that was not there before except the
//! successor's own RAM and pool, allocated memfd bytes and the resident set
//! (also at its peak during the move) must not grow by a guest's worth, and
//! the hash taken through the successor's own mapping must equal the one
//! taken before. A second move must leave the memfd count where the first
//! left it.
//!
//! This file holds a single test so that the process figures are its own.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::moves;
use common::procfs;
use common::*;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;

const GUESTS: u32 = 2;
const GUEST_MEM: u64 = 64 << 20;

/// How much the resident set and the allocated memfd bytes may grow in a
/// move: the successor guest hypervisor's own RAM and pool pages (its
/// image, page tables, stacks; a few MiB) and the new vCPU threads. A copy
/// of the guests would add `GUESTS * GUEST_MEM` (128 MiB), 8 times this.
const MARGIN: u64 = 16 << 20;

/// Names of the memfds in `after` that are not in `before`, sorted.
fn new_memfds(
    before: &BTreeMap<u64, procfs::Memfd>,
    after: &BTreeMap<u64, procfs::Memfd>,
) -> Vec<String> {
    let mut v: Vec<String> = after
        .iter()
        .filter(|(ino, _)| !before.contains_key(ino))
        .map(|(_, m)| m.name.clone())
        .collect();
    v.sort();
    v
}

fn allocated(m: &BTreeMap<u64, procfs::Memfd>) -> u64 {
    m.values().map(|f| f.allocated).sum()
}

#[test]
fn a_zero_copy_move_keeps_every_page_where_it_was() {
    if !kvm_or_skip("a_zero_copy_move_keeps_every_page_where_it_was") {
        return;
    }
    let dir = temp_dir("zero-copy");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: GUESTS,
            nested_mem: GUEST_MEM,
            workloads: vec![Workload::Memtouch],
            workload_param: 2,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    for i in 0..GUESTS {
        wait_console(&dir, &format!("l2-{i}"), Duration::from_secs(60), |t| {
            t.contains("done round=2")
        });
        assert_memtouch_clean(&dir, &format!("l2-{i}"), "before the move");
    }

    let mut prev_memfds: Option<usize> = None;
    for generation in [2u32, 3] {
        let aged = vmm.current(None).unwrap();
        let before = moves::guest_pages(&aged, true);
        assert_eq!(before.len(), GUESTS as usize, "{before:?}");
        let fds_before = procfs::memfds();
        let rss_before = procfs::rss();
        procfs::reset_peak_rss();
        drop(aged);

        let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();

        let peak = procfs::peak_rss();
        let succ = vmm.current(None).unwrap();
        assert_eq!(succ.spec.generation, generation);
        let fds_after = procfs::memfds();
        let rss_after = procfs::rss();
        println!(
            "move to generation {generation}: RSS {} -> {} MiB (peak {} MiB), \
             memfds {} -> {}, allocated {} -> {} MiB",
            rss_before >> 20,
            rss_after >> 20,
            peak >> 20,
            fds_before.len(),
            fds_after.len(),
            allocated(&fds_before) >> 20,
            allocated(&fds_after) >> 20
        );

        // Every page of every guest is where it was.
        let kept = moves::check_same_pages(&succ, &before);
        // L0's own hash agrees with the one taken from outside.
        for g in &r.guests {
            let sum = before[&g.name].sum.unwrap();
            assert_eq!(g.checksum_before, Some(format!("{sum:016x}")), "{g:?}");
        }
        // No memfd was created for the guests: the only new files are the
        // successor's own RAM and pool, and the guests' pages are in files
        // that existed before.
        assert_eq!(
            new_memfds(&fds_before, &fds_after),
            [
                format!("/memfd:vmbeam-hv0/g{generation}-pool (deleted)"),
                format!("/memfd:vmbeam-hv0/g{generation}-ram (deleted)"),
            ],
            "memfds before {fds_before:?}\nafter {fds_after:?}"
        );
        for k in &kept {
            assert!(
                fds_before.contains_key(&k.inode),
                "guest pages in a new file"
            );
        }
        // The aged guest hypervisor's own pages were returned to the host.
        moves::check_aged_released(&fds_before, "hv0", generation - 1, &kept);
        // Nothing the size of a guest was allocated, held or touched.
        assert!(
            allocated(&fds_after) <= allocated(&fds_before) + MARGIN,
            "memfd pages grew: {fds_before:?} -> {fds_after:?}"
        );
        assert!(
            rss_after <= rss_before + MARGIN,
            "RSS {rss_before} -> {rss_after}"
        );
        assert!(
            peak <= rss_before + MARGIN,
            "RSS peaked at {peak} during the move, from {rss_before}"
        );
        // The process holds as many memfds after each move (the aged
        // guest hypervisor's RAM and pool went, the successor's came).
        if let Some(n) = prev_memfds {
            assert_eq!(fds_after.len(), n, "{fds_after:?}");
        }
        prev_memfds = Some(fds_after.len());
        assert!(r.guests.iter().all(|g| g.running_after), "{r:?}");
    }
    assert!(vmm.failure().is_none());
}
