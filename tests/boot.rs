//! The host VMM boots the bundled guest hypervisor; broken images
//! and faulting guests give clear errors.

mod common;

use std::time::Duration;

use common::*;
use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::host::loader::tiny_elf;
use vmbeam_vmm::l1::hostvm::VmStatus;
use vmbeam_vmm::vmm::{Vmm, VmmError};

#[test]
fn boots_embedded_hypervisor_banner_and_ping() {
    if !kvm_or_skip("boots_embedded_hypervisor_banner_and_ping") {
        return;
    }
    let dir = temp_dir("boot");
    let vmm = vmm(
        &dir,
        VmmConfig {
            nested: 0,
            ..Default::default()
        },
    );
    vmm.start("hv0").unwrap();
    let text = wait_console(&dir, "hv0/g1", Duration::from_secs(30), |t| {
        t.contains("hypercall ping ok")
    });
    let banner = format!(
        "vmbeam guest hypervisor v0.1.0 abi {}: vm=hv0 gen=1 role=primary ram=32MiB",
        vmbeam_abi::ABI_VERSION
    );
    assert!(text.contains(&banner), "{text}");
    assert!(
        vmm.wait_healthy(Duration::from_secs(30)),
        "no health report"
    );
    let st = vmm.status();
    assert_eq!(st.host_vms.len(), 1);
    assert_eq!(st.host_vms[0].status, "running");
    assert!(st.host_vms[0].hypercalls >= 2);
    assert!(vmm.failure().is_none());
}

fn boot_image(test: &str, image: Vec<u8>) -> (Vmm, Result<(), VmmError>, common::TempDir) {
    let dir = temp_dir(test);
    let images = vmbeam::images(Some(image)).unwrap();
    let vmm = Vmm::new(
        VmmConfig {
            nested: 0,
            console_dir: Some(dir.to_path_buf()),
            ..Default::default()
        },
        images,
    )
    .unwrap();
    let r = vmm.start("bad").map(|_| ());
    (vmm, r, dir)
}

#[test]
fn broken_guest_images_are_refused() {
    if !kvm_or_skip("broken_guest_images_are_refused") {
        return;
    }
    let good = tiny_elf(&[0xf4], 0x20_0000, 0x20_0000);

    let mut bad_magic = good.clone();
    bad_magic[1] = b'X';
    let (_v, r, _dir) = boot_image("badmagic", bad_magic);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("not an ELF image (bad magic)"), "{e}");

    let (_v, r, _dir) = boot_image("truncated", good[..good.len() - 1].to_vec());
    let e = r.unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    let (_v, r, _dir) = boot_image("tooshort", good[..40].to_vec());
    let e = r.unwrap_err().to_string();
    assert!(e.contains("not a loadable"), "{e}");

    let outside = tiny_elf(&[0xf4], 0x20_0000, 0x7000_0000);
    let (_v, r, _dir) = boot_image("entry", outside);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("entry point 0x70000000 is outside"), "{e}");

    let low = tiny_elf(&[0xf4], 0x1000, 0x1000);
    let (_v, r, _dir) = boot_image("low", low);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
}

fn wait_failed(vmm: &Vmm) -> String {
    let vm = vmm.current(None).unwrap();
    match vm.wait_status(Duration::from_secs(20), |s| {
        matches!(s, VmStatus::Failed(_))
    }) {
        VmStatus::Failed(m) => m,
        other => panic!("guest did not fail in time: {other:?}"),
    }
}

#[test]
fn invalid_instruction_gives_a_clear_error() {
    if !kvm_or_skip("invalid_instruction_gives_a_clear_error") {
        return;
    }
    // ud2 with no IDT: #UD -> #DF -> triple fault.
    let (vmm, r, _dir) = boot_image("ud2", tiny_elf(&[0x0f, 0x0b], 0x20_0000, 0x20_0000));
    r.unwrap();
    let m = wait_failed(&vmm);
    assert!(
        m.contains("host VM bad (generation 1) stopped: triple fault"),
        "{m}"
    );
    assert!(m.contains("rip=0x20"), "{m}");
    assert_eq!(vmm.failure().as_deref(), Some(m.as_str()));
}

#[test]
fn unsupported_instruction_names_the_bytes() {
    if !kvm_or_skip("unsupported_instruction_names_the_bytes") {
        return;
    }
    // vpxor ymm0, ymm0, ymm0 (AVX). On KVM that runs guest code through its
    // instruction emulator this is an emulation failure; on hardware KVM the
    // guest has no AVX enabled (CR4.OSXSAVE clear) so it is #UD -> triple fault.
    let (vmm, r, _dir) = boot_image(
        "avx",
        tiny_elf(&[0xc5, 0xfd, 0xef, 0xc0, 0xf4], 0x20_0000, 0x20_0000),
    );
    r.unwrap();
    let m = wait_failed(&vmm);
    assert!(
        m.contains("instruction bytes at rip: c5 fd ef c0") || m.contains("triple fault"),
        "{m}"
    );
    assert!(m.contains("rip=0x200000"), "{m}");
}
