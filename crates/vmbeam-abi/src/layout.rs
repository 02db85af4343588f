//! Guest-physical layout of a host VM as L0 builds it and L1 relies on it.
//!
//! Fixed addresses keep the boot path free of negotiation: L0 writes the
//! page tables, GDT and boot info where L1 expects them, and both sides agree
//! where the nested pool, the grant window and the channel live.

/// GDT written by L0 (null, 64-bit code, data).
pub const GDT_ADDR: u64 = 0x500;
/// Boot information page ([`crate::boot::BootInfo`]); its address is passed in `rdi`.
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// First per-vCPU hypercall page; vCPU `n` uses `HYPERCALL_PAGE_BASE + n * 0x1000`.
pub const HYPERCALL_PAGE_BASE: u64 = 0x2000;
/// Most vCPUs a host VM may have (one hypercall page each).
pub const MAX_VCPUS: u32 = 4;
/// Top-level page table (PML4).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// First page directory; `IDENTITY_MAP_GIB` of them follow, 2 MiB pages.
pub const PD_BASE: u64 = 0xB000;
/// Amount of guest-physical space identity-mapped for L1 (GiB).
pub const IDENTITY_MAP_GIB: u64 = 64;
/// Where the guest hypervisor image is linked and loaded.
pub const KERNEL_BASE: u64 = 0x20_0000;
/// Initial stack top of vCPU 0; vCPU `n` gets `STACK_TOP - n * STACK_SIZE`.
pub const STACK_TOP: u64 = 0x80_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x10_0000;
/// Start of the module area, where L0 places workload images for L1.
pub const MODULE_BASE: u64 = 0x80_0000;
/// Size of the module area.
pub const MODULE_AREA_SIZE: u64 = 0x80_0000;
/// Smallest host VM RAM that holds all of the above.
pub const MIN_RAM: u64 = 0x100_0000;
/// Largest host VM RAM (must stay below the channel).
pub const MAX_RAM: u64 = 0xC000_0000;
/// Shared-page channel between an aged guest hypervisor and its successor.
pub const CHANNEL_BASE: u64 = 0xF000_0000;
/// Size of the channel region.
pub const CHANNEL_SIZE: u64 = 0x10_0000;
/// Start of the nested-memory pool (sparse, L1 allocates nested RAM from it).
pub const POOL_BASE: u64 = 0x1_0000_0000;
/// Largest pool.
pub const MAX_POOL: u64 = 28 << 30;
/// Start of the grant window: where L0 maps pages granted by a predecessor.
pub const GRANT_BASE: u64 = 32 << 30;
/// Size of the grant window.
pub const GRANT_SIZE: u64 = 32 << 30;
/// Granularity of nested memory extents (and of grants).
pub const EXTENT_SIZE: u64 = 2 << 20;
/// I/O port of the hypercall doorbell (32-bit `out` of the op number).
pub const HYPERCALL_PORT: u16 = 0x0510;
/// I/O port of the host VM's 16550 console.
pub const CONSOLE_PORT: u16 = 0x3f8;

/// Hypercall page of vCPU `n`.
pub const fn hypercall_page(vcpu: u32) -> u64 {
    HYPERCALL_PAGE_BASE + vcpu as u64 * 0x1000
}

const _: () = assert!(hypercall_page(MAX_VCPUS) <= PML4_ADDR);
const _: () = assert!(PD_BASE + IDENTITY_MAP_GIB * 0x1000 <= KERNEL_BASE);
const _: () = assert!(POOL_BASE + MAX_POOL <= GRANT_BASE);
const _: () = assert!(GRANT_BASE + GRANT_SIZE <= IDENTITY_MAP_GIB << 30);
const _: () = assert!(MAX_RAM <= CHANNEL_BASE);
