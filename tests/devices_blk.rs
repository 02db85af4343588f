//! virtio-blk for nested guests: blkcheck (virtio-drivers) keeps every
//! write across three zero-copy rejuvenations in a row, and the image, read
//! from the host by `qemu-img compare`, holds exactly what it last wrote.
//! Also: bad bindings are refused with one sentence before any VM starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use vmbeam_abi::checksum::pattern_word;
use vmbeam_vmm::config::{VmmConfig, Workload};
use vmbeam_vmm::devices::binding::parse_disk;
use vmbeam_vmm::migration::rejuvenate::{Mode, RejuvenateOptions};
use vmbeam_vmm::vmm::Vmm;

/// Sectors of the test disk (blkcheck rewrites all of them every round).
const SECTORS: u64 = 64;
/// Rounds blkcheck runs before it stops.
const ROUNDS: u64 = 14;
/// The seed the VMM gives l2-0.
const SEED: u64 = 0x5eed_0000;

/// `round=N ok=A bad=B errors=E` numbers of the last round line.
fn last_round(text: &str) -> Option<(u64, u64, u64, u64)> {
    text.lines().rev().find_map(|l| {
        let num = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|n| n.parse::<u64>().ok())
        };
        Some((num("round=")?, num("ok=")?, num("bad=")?, num("errors=")?))
    })
}

/// The image blkcheck leaves after round `r` (blkcheck's formula).
fn expected_image(path: &Path, r: u64) {
    let mut img = Vec::with_capacity((SECTORS * 512) as usize);
    for s in 0..SECTORS {
        for k in 0..64u64 {
            img.extend_from_slice(&pattern_word(SEED ^ (r << 40), s * 512 + k * 8).to_le_bytes());
        }
    }
    std::fs::write(path, img).unwrap();
}

fn qemu_img_compare(a: &Path, b: &Path) -> Option<(bool, String)> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some((out.status.success(), text))
}

fn disk_vmm(dir: &Path, img: &Path) -> Vmm {
    disk_vmm_with(dir, img, ROUNDS, 0)
}

fn disk_vmm_with(dir: &Path, img: &Path, rounds: u64, param1: u64) -> Vmm {
    vmm(
        dir,
        VmmConfig {
            nested: 1,
            workloads: vec![Workload::Blkcheck],
            workload_param: rounds,
            workload_param1: param1,
            devices: vec![parse_disk(&format!("l2-0={}", img.display())).unwrap()],
            ..Default::default()
        },
    )
}

#[test]
fn blkcheck_survives_three_rejuvenations_and_the_image_is_exact() {
    if !kvm_or_skip("blkcheck_survives_three_rejuvenations_and_the_image_is_exact") {
        return;
    }
    let dir = temp_dir("blk3");
    let img: PathBuf = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    let vmm = disk_vmm(&dir, &img);
    vmm.start("hv0").unwrap();
    let t = wait_console(&dir, "l2-0", Duration::from_secs(120), |t| {
        last_round(t).is_some()
    });
    assert!(
        t.contains(&format!("start sectors={SECTORS} id=l2-0")),
        "{t}"
    );
    // Copy modes do not carry device state: refused, and nothing changes.
    let copy = RejuvenateOptions {
        mode: Mode::Copy,
        ..Default::default()
    };
    let e = vmm.rejuvenate(None, &copy).unwrap_err().to_string();
    assert!(e.contains("l2-0") && e.contains("zero-copy"), "{e}");
    assert_eq!(vmm.status().host_vms[0].generation, 1);
    for gen in 2..=4 {
        let before = last_round(&console(&dir, "l2-0")).unwrap().0;
        let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
        assert_eq!(r.to_generation, gen);
        assert!(r.guests.iter().all(|g| g.running_after), "{r:?}");
        let t = wait_console(&dir, "l2-0", Duration::from_secs(120), |t| {
            last_round(t).is_some_and(|x| x.0 > before)
        });
        assert!(
            !t.contains("done"),
            "blkcheck finished before rejuvenation {gen} was over; raise ROUNDS:\n{t}"
        );
        let st = vmm.status();
        let n = &st.host_vms[0].nested[0];
        assert_eq!(n.generation, gen);
        assert_eq!(n.devices.len(), 1, "the disk moved with the guest");
        assert!(n.devices[0].counters.requests > 0);
    }
    let t = wait_console(&dir, "l2-0", Duration::from_secs(300), |t| {
        t.contains("done")
    });
    let (round, ok, bad, errors) = last_round(&t).unwrap();
    assert_eq!(round, ROUNDS, "{t}");
    assert_eq!(bad, 0, "{t}");
    assert_eq!(errors, 0, "{t}");
    // Round 1 verifies once, every later round twice (old data, new data).
    assert_eq!(ok, SECTORS * (2 * ROUNDS - 1), "{t}");
    let st = vmm.status();
    let c = st.host_vms[0].nested[0].devices[0].counters;
    assert_eq!(c.errors, 0);
    assert_eq!(c.resets_needed, 0);
    assert_eq!(c.bytes_out, SECTORS * 512 * ROUNDS);
    vmm.shutdown();
    drop(vmm);
    let want = dir.join("expected.img");
    expected_image(&want, ROUNDS);
    match qemu_img_compare(&img, &want) {
        Some((same, text)) => assert!(same, "qemu-img compare: {text}"),
        None => panic!("qemu-img is needed for this test (Debian package qemu-utils)"),
    }
    // The judge can tell images apart: one flipped byte is a difference.
    let mut b = std::fs::read(&want).unwrap();
    b[4097] ^= 1;
    std::fs::write(&want, b).unwrap();
    assert!(!qemu_img_compare(&img, &want).unwrap().0);
}

/// `irqs=N` of the last line that has it.
fn last_irqs(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("irqs="))
            .and_then(|n| n.parse().ok())
    })
}

#[test]
fn blkcheck_sleeps_on_its_disk_interrupt_across_a_rejuvenation() {
    if !kvm_or_skip("blkcheck_sleeps_on_its_disk_interrupt_across_a_rejuvenation") {
        return;
    }
    let dir = temp_dir("blkirq");
    let img: PathBuf = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    let rounds = 6;
    // Bit 0 of param1: each request waits in `sti; hlt` for the interrupt,
    // so the guest only gets anywhere if irqfd → in-kernel PIC → vCPU works.
    let vmm = disk_vmm_with(&dir, &img, rounds, 1);
    vmm.start("hv0").unwrap();
    let t = wait_console(&dir, "l2-0", Duration::from_secs(120), |t| {
        last_irqs(t).is_some()
    });
    let before = last_irqs(&t).unwrap();
    assert!(before > 0, "{t}");
    let r = vmm.rejuvenate(None, &RejuvenateOptions::default()).unwrap();
    assert!(r.guests.iter().all(|g| g.running_after), "{r:?}");
    let t = wait_console(&dir, "l2-0", Duration::from_secs(300), |t| {
        t.contains("done")
    });
    let (round, _, bad, errors) = last_round(&t).unwrap();
    assert_eq!((round, bad, errors), (rounds, 0, 0), "{t}");
    let after = last_irqs(&t).unwrap();
    // Every request waits for an interrupt: 8 sectors each, one pass of
    // writes and one of reads in round 1, a write and two reads later.
    let requests = SECTORS / 8 * (2 + 3 * (rounds - 1));
    assert!(after > before, "interrupts after the rejuvenation: {t}");
    assert!(
        after >= requests / 2,
        "{after} interrupts for {requests} requests: {t}"
    );
    let st = vmm.status();
    let d = &st.host_vms[0].nested[0].devices[0];
    assert_eq!(st.host_vms[0].generation, 2);
    assert!(d.counters.interrupts >= after, "{d:?}");
    vmm.shutdown();
}

#[test]
fn bad_disk_bindings_are_refused_before_boot() {
    let dir = temp_dir("blkbad");
    let cfg = |spec: String| VmmConfig {
        nested: 1,
        workloads: vec![Workload::Blkcheck],
        console_dir: Some(dir.to_path_buf()),
        devices: vec![parse_disk(&spec).unwrap()],
        ..Default::default()
    };
    let err = |spec: String| match Vmm::new(cfg(spec), vmbeam::images(None).unwrap()) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    if !kvm_or_skip("bad_disk_bindings_are_refused_before_boot") {
        return;
    }
    let e = err(format!("l2-0={}/missing.img", dir.display()));
    assert!(e.contains("cannot be read"), "{e}");
    let e = err(format!("l2-3={}/missing.img", dir.display()));
    assert!(e.contains("does not create"), "{e}");
    let ro = dir.join("ro.img");
    std::fs::write(&ro, vec![0u8; 4096]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = err(format!("l2-0={}", ro.display()));
    assert!(e.contains("read-only file"), "{e}");
    assert!(Vmm::new(
        cfg(format!("l2-0={},ro", ro.display())),
        vmbeam::images(None).unwrap()
    )
    .is_ok());
}
