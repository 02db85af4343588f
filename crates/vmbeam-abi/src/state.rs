//! Architectural state of a nested vCPU, as L1 reads it, moves it and sets it.
//!
//! These mirror the KVM register sets but are defined here so the `no_std`
//! guests need no KVM headers. They hold what a long-mode guest needs to be
//! moved: general registers, segments, descriptor tables, control registers,
//! EFER and the TSC (so the guest's clock does not jump on a move). Nested
//! workloads are built without SSE, so no FPU/XSAVE state is carried.

use crate::Pod;

/// General-purpose registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
    pub _pad: u8,
}

/// A descriptor-table register.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DTable {
    pub base: u64,
    pub limit: u16,
    pub _pad: [u16; 3],
}

/// Special registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DTable,
    pub idt: DTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Everything L1 moves for one nested vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: Sregs,
    /// Guest TSC value (IA32_TSC).
    pub tsc: u64,
}

// SAFETY: all three are `#[repr(C)]` and made only of integers.
unsafe impl Pod for Regs {}
// SAFETY: as above.
unsafe impl Pod for Sregs {}
// SAFETY: as above.
unsafe impl Pod for VcpuState {}

const _: () = assert!(core::mem::size_of::<Segment>() == 24);
const _: () = assert!(core::mem::size_of::<DTable>() == 16);
const _: () = assert!(core::mem::size_of::<Regs>() == 144);
const _: () = assert!(core::mem::size_of::<Sregs>() == 8 * 24 + 2 * 16 + 7 * 8);
const _: () = assert!(core::mem::size_of::<VcpuState>() == 144 + 280 + 8);

/// Flat 64-bit code segment (selector 0x8).
pub const fn code64() -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        _pad: 0,
    }
}

/// Flat data segment (selector 0x10).
pub const fn data64() -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 0x3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        _pad: 0,
    }
}

/// GDT entries matching [`code64`] and [`data64`] (null, code, data).
pub const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// CR0 for long mode: PE | ET | NE | WP | PG.
pub const CR0_LONG: u64 = 0x1 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4 for long mode: PAE.
pub const CR4_LONG: u64 = 0x20;
/// EFER for long mode: LME | LMA.
pub const EFER_LONG: u64 = 0x500;

/// Special registers of a flat 64-bit guest with page tables at `cr3`.
pub fn long_mode_sregs(gdt_base: u64, cr3: u64) -> Sregs {
    let data = data64();
    let mut tr = data;
    tr.selector = 0;
    tr.type_ = 0xb;
    tr.s = 0;
    tr.db = 0;
    tr.g = 0;
    tr.limit = 0xffff;
    let mut ldt = data;
    ldt.selector = 0;
    ldt.type_ = 0x2;
    ldt.s = 0;
    ldt.db = 0;
    ldt.g = 0;
    ldt.limit = 0xffff;
    Sregs {
        cs: code64(),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr,
        ldt,
        gdt: DTable {
            base: gdt_base,
            limit: (GDT_ENTRIES.len() * 8 - 1) as u16,
            _pad: [0; 3],
        },
        idt: DTable::default(),
        cr0: CR0_LONG,
        cr2: 0,
        cr3,
        cr4: CR4_LONG,
        cr8: 0,
        efer: EFER_LONG,
        apic_base: 0xfee0_0900,
    }
}
