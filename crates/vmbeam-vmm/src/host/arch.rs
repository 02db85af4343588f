//! x86-64 details of entering a guest in long mode and of moving vCPU
//! state: page tables, GDT, register set-up, and conversion between KVM's
//! register structures and the ABI's [`VcpuState`].

use kvm_bindings::{kvm_dtable, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vmbeam_abi::layout::{GDT_ADDR, IDENTITY_MAP_GIB, PDPT_ADDR, PD_BASE, PML4_ADDR};
use vmbeam_abi::state::{DTable, Regs, Segment, Sregs, VcpuState, GDT_ENTRIES};

use crate::host::memory::GuestRam;

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

/// Errors of vCPU state handling.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A KVM register ioctl failed.
    #[error("cannot {what} of vCPU: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// KVM error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory for page tables or GDT is missing.
    #[error("guest RAM too small for boot structures at {0:#x}")]
    NoRoom(u64),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

/// Writes the GDT and identity page tables (2 MiB pages, first
/// `IDENTITY_MAP_GIB` GiB) for the guest hypervisor.
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), ArchError> {
    let mut gdt = Vec::new();
    for e in GDT_ENTRIES {
        gdt.extend_from_slice(&e.to_le_bytes());
    }
    if !ram.write(GDT_ADDR, &gdt) {
        return Err(ArchError::NoRoom(GDT_ADDR));
    }
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | 0x3).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    for i in 0..IDENTITY_MAP_GIB {
        let e = (PD_BASE + i * 0x1000) | 0x3;
        pdpt[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
        let mut pd = vec![0u8; 4096];
        for j in 0..512u64 {
            let e = ((i << 30) + (j << 21)) | 0x83;
            pd[j as usize * 8..j as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        if !ram.write(PD_BASE + i * 0x1000, &pd) {
            return Err(ArchError::NoRoom(PD_BASE + i * 0x1000));
        }
    }
    if !ram.write(PML4_ADDR, &pml4) || !ram.write(PDPT_ADDR, &pdpt) {
        return Err(ArchError::NoRoom(PML4_ADDR));
    }
    Ok(())
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        _pad: 0,
    }
}

fn dt_to_kvm(d: &DTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DTable {
    DTable {
        base: d.base,
        limit: d.limit,
        _pad: [0; 3],
    }
}

/// ABI registers → KVM registers.
pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// KVM registers → ABI registers.
pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// Applies ABI special registers onto `base` (keeping KVM-only fields).
pub fn sregs_to_kvm(s: &Sregs, base: &kvm_sregs) -> kvm_sregs {
    let mut k = *base;
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt = dt_to_kvm(&s.gdt);
    k.idt = dt_to_kvm(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k
}

/// KVM special registers → ABI.
pub fn sregs_from_kvm(k: &kvm_sregs) -> Sregs {
    Sregs {
        cs: seg_from_kvm(&k.cs),
        ds: seg_from_kvm(&k.ds),
        es: seg_from_kvm(&k.es),
        fs: seg_from_kvm(&k.fs),
        gs: seg_from_kvm(&k.gs),
        ss: seg_from_kvm(&k.ss),
        tr: seg_from_kvm(&k.tr),
        ldt: seg_from_kvm(&k.ldt),
        gdt: dt_from_kvm(&k.gdt),
        idt: dt_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

/// Reads the movable state of a vCPU.
pub fn get_state(vcpu: &VcpuFd) -> Result<VcpuState, ArchError> {
    let regs = vcpu.get_regs().map_err(kvm("read registers"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .expect("one MSR fits");
    vcpu.get_msrs(&mut msrs).map_err(kvm("read the TSC"))?;
    Ok(VcpuState {
        regs: regs_from_kvm(&regs),
        sregs: sregs_from_kvm(&sregs),
        tsc: msrs.as_slice()[0].data,
    })
}

/// Writes the movable state into a vCPU.
pub fn set_state(vcpu: &VcpuFd, st: &VcpuState) -> Result<(), ArchError> {
    let base = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    vcpu.set_sregs(&sregs_to_kvm(&st.sregs, &base))
        .map_err(kvm("write special registers"))?;
    vcpu.set_regs(&regs_to_kvm(&st.regs))
        .map_err(kvm("write registers"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: st.tsc,
        ..Default::default()
    }])
    .expect("one MSR fits");
    vcpu.set_msrs(&msrs).map_err(kvm("write the TSC"))?;
    Ok(())
}

/// Gives a vCPU the host's supported CPUID (long mode needs the LM bit).
pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), ArchError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm("set CPUID"))
}

/// A one-line register dump for error messages.
pub fn describe_regs(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "registers unavailable".to_string(),
    }
}
