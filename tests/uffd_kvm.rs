//! Does KVM on this machine resolve a guest access to a memory slot whose
//! backing (a memfd, MAP_SHARED) is registered with userfaultfd? A tiny
//! 64-bit guest reads and writes one byte of each page of such a slot and
//! reports what it read by port I/O; a thread of the test answers each
//! fault with UFFDIO_COPY of a page whose bytes name it. A second KVM VM
//! whose slot maps the same memory (as a nested VM's slots do) touches the
//! other half. Every value must be the one the handler placed, every page
//! must have faulted exactly once, and the guest's writes must land.
//! Prints the time per fault against the same guest on memory that is
//! already there (docs/kvm-notes.md, "userfaultfd").

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use kvm_ioctls::VcpuExit;
use vmbeam_abi::layout;
use vmbeam_vmm::host::arch;
use vmbeam_vmm::host::memory::{GuestRam, MemFile, Region, RegionKind};
use vmbeam_vmm::migration::uffd::{self, Uffd};

const CODE: u64 = 0x20_0000;
const DATA_GPA: u64 = 0x40_0000;
const PAGES: u64 = 256;
const PORT: u16 = 0x10;

/// The byte page `i` holds.
fn mark(i: u64) -> u8 {
    (i % 251) as u8 + 1
}

/// `mov rbx, first; mov ecx, count; 1: mov al,[rbx]; out PORT,al;
/// mov [rbx+1],al; add rbx,0x1000; dec ecx; jnz 1b; hlt`
fn code(first: u64, count: u32) -> Vec<u8> {
    let mut c = vec![0x48, 0xbb];
    c.extend_from_slice(&first.to_le_bytes());
    c.push(0xb9);
    c.extend_from_slice(&count.to_le_bytes());
    c.extend_from_slice(&[0x8a, 0x03, 0xe6, PORT as u8, 0x88, 0x43, 0x01]);
    c.extend_from_slice(&[0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00]);
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xee, 0xf4]);
    c
}

/// Runs a fresh KVM VM whose data slot is `data` (a live mapping of
/// `PAGES` pages) over pages `first..first+count`; returns what the guest
/// read and how long KVM_RUN took.
fn run_guest(data: &Region, first: u64, count: u32) -> (Vec<u8>, Duration) {
    let kvm = vmbeam_vmm::l1::shared::open_kvm().unwrap();
    let vm = kvm.create_vm().unwrap();
    let _ = vm.set_tss_address(0xfffb_d000);
    let file = MemFile::new("uffd-probe-ram", 4 << 20).unwrap();
    let ram = Region::map(&file, 0, 4 << 20, 0, RegionKind::Ram, 0).unwrap();
    let ram = GuestRam { regions: vec![ram] };
    arch::write_boot_tables(&ram).unwrap();
    assert!(ram.write(CODE, &code(DATA_GPA + first * 4096, count)));
    for (slot, r) in [(0u32, &ram.regions[0]), (1, data)] {
        let m = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: r.map.as_ptr() as u64,
        };
        // SAFETY: both mappings outlive the VM (dropped at the end of this function).
        unsafe { vm.set_user_memory_region(m).unwrap() };
    }
    let mut cpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    cpu.set_cpuid2(&cpuid).unwrap();
    let base = cpu.get_sregs().unwrap();
    let s = vmbeam_abi::state::long_mode_sregs(layout::GDT_ADDR, layout::PML4_ADDR);
    cpu.set_sregs(&arch::sregs_to_kvm(&s, &base)).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        rsp: 0x1f_f000,
        ..Default::default()
    };
    cpu.set_regs(&regs).unwrap();
    let mut seen = Vec::new();
    let t = Instant::now();
    loop {
        match cpu.run().unwrap() {
            VcpuExit::IoOut(PORT, d) => seen.push(d[0]),
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?} after {} pages", seen.len()),
        }
        assert!(t.elapsed() < Duration::from_secs(120), "guest never halted");
    }
    (seen, t.elapsed())
}

#[test]
fn kvm_resolves_guest_faults_on_a_userfaultfd_registered_memfd_slot() {
    if !kvm_or_skip("kvm_resolves_guest_faults_on_a_userfaultfd_registered_memfd_slot") {
        return;
    }
    let features = Uffd::kernel_features().unwrap();
    println!(
        "userfaultfd features {features:#x}: missing-shmem {} minor-shmem {}",
        features & uffd::FEATURE_MISSING_SHMEM != 0,
        features & uffd::FEATURE_MINOR_SHMEM != 0
    );

    // Baseline: the same guest on pages that are there.
    let file = MemFile::new("uffd-probe-base", PAGES * 4096).unwrap();
    let data = Region::map(&file, 0, PAGES * 4096, DATA_GPA, RegionKind::Pool, 1).unwrap();
    for i in 0..PAGES {
        // SAFETY: inside the fresh mapping.
        unsafe { *data.map.as_ptr().add((i * 4096) as usize) = mark(i) };
    }
    let (seen, base) = run_guest(&data, 0, PAGES as u32);
    assert_eq!(seen, (0..PAGES).map(mark).collect::<Vec<_>>());

    // The same on a registered, empty memfd mapping.
    let file = MemFile::new("uffd-probe", PAGES * 4096).unwrap();
    let data = Region::map(&file, 0, PAGES * 4096, DATA_GPA, RegionKind::Pool, 1).unwrap();
    let start = data.map.as_ptr() as u64;
    let u = Arc::new(Uffd::open().unwrap());
    u.register(start, PAGES * 4096, uffd::MODE_MISSING).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let serve_ns = Arc::new(AtomicU64::new(0));
    let handler = {
        let (u, stop, faults, serve_ns) =
            (u.clone(), stop.clone(), faults.clone(), serve_ns.clone());
        std::thread::spawn(move || {
            let mut per_page = vec![0u32; PAGES as usize];
            while !stop.load(Ordering::SeqCst) {
                let Some(f) = u.next_fault(Duration::from_millis(50)).unwrap() else {
                    continue;
                };
                let t = Instant::now();
                let page = (f.addr - start) / 4096;
                assert!(page < PAGES, "fault outside the range: {:#x}", f.addr);
                per_page[page as usize] += 1;
                let buf = vec![mark(page); 4096];
                u.copy(start + page * 4096, &buf).unwrap();
                faults.fetch_add(1, Ordering::SeqCst);
                serve_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::SeqCst);
            }
            per_page
        })
    };
    // Two KVM VMs over the same mapping, as a host VM and its nested VM.
    let half = (PAGES / 2) as u32;
    let (seen_a, t_a) = run_guest(&data, 0, half);
    let (seen_b, t_b) = run_guest(&data, PAGES / 2, half);
    stop.store(true, Ordering::SeqCst);
    let per_page = handler.join().unwrap();
    assert_eq!(seen_a, (0..PAGES / 2).map(mark).collect::<Vec<_>>());
    assert_eq!(seen_b, (PAGES / 2..PAGES).map(mark).collect::<Vec<_>>());
    assert!(
        per_page.iter().all(|&n| n == 1),
        "each page must fault once: {per_page:?}"
    );
    for i in 0..PAGES {
        // SAFETY: inside the mapping; every page is present now.
        let b = unsafe { *data.map.as_ptr().add((i * 4096 + 1) as usize) };
        assert_eq!(b, mark(i), "the guest's write to page {i} was lost");
    }
    let n = faults.load(Ordering::SeqCst);
    let with = t_a + t_b;
    println!(
        "{PAGES} pages: {:.1} ms with faults vs {:.1} ms present: {:.1} µs per fault \
         ({:.1} µs of it in the handler's UFFDIO_COPY)",
        with.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        (with.as_secs_f64() - base.as_secs_f64()) * 1e6 / n as f64,
        serve_ns.load(Ordering::SeqCst) as f64 / 1e3 / n as f64
    );
}
