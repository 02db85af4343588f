//! Layout and boot parameters of a nested guest (L2), as L1 builds it.
//!
//! The workloads are tiny `no_std` programs; L1 copies their image, writes
//! page tables, a GDT and [`L2BootParams`] into the guest's memory and
//! starts it in 64-bit mode. L0 fills the bulk area with a seeded pattern.

use crate::{Pod, NAME_LEN};

/// Boot parameters page.
pub const BOOT_PARAMS: u64 = 0x1000;
/// GDT.
pub const GDT: u64 = 0x2000;
/// PML4.
pub const PML4: u64 = 0x3000;
/// PDPT.
pub const PDPT: u64 = 0x4000;
/// First page directory; one per GiB of guest memory follows.
pub const PD_BASE: u64 = 0x5000;
/// Most GiB a nested guest may have (page directories fit below the image).
pub const MAX_GIB: u64 = 64;
/// Where workload images are linked and loaded.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Largest workload image.
pub const MAX_IMAGE: u64 = 0xC_0000;
/// Initial stack top (grows down towards the image).
pub const STACK_TOP: u64 = 0x20_0000;
/// Working set a workload rewrites.
pub const WS_BASE: u64 = 0x20_0000;
/// Length of the working set.
pub const WS_LEN: u64 = 0x1_0000;
/// Start of the bulk memory L0 fills with the pattern.
pub const BULK_BASE: u64 = 0x40_0000;
/// Smallest nested guest.
pub const MIN_MEM: u64 = 0x80_0000;
/// Port of the nested guest's 16550 console (emulated by L1).
pub const CONSOLE_PORT: u16 = 0x3f8;

/// Nested address of the first virtio-mmio window a bundled guest
/// hypervisor places (device `i` at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`).
/// It lies in the 4th GiB, above the RAM of any guest with devices.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (one page).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt line (GSI) of the first device the bundled guest hypervisor places.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most devices one nested guest may have.
pub const MAX_DEVICES: usize = 4;
/// Page directory through which L1 maps the virtio windows (one 2 MiB,
/// uncached page at [`VIRTIO_MMIO_BASE`]) for a guest with devices.
pub const DEVICE_PD: u64 = 0x4_6000;
/// Guest RAM a nested guest with devices may have at most: the windows sit
/// above it.
pub const MAX_MEM_WITH_DEVICES: u64 = 3 << 30;

/// `L2BootParams::magic`.
pub const L2_MAGIC: u64 = 0x766d_6265_616d_4c32; // "vmbeamL2"

/// What a workload finds at [`BOOT_PARAMS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct L2BootParams {
    /// [`L2_MAGIC`].
    pub magic: u64,
    /// Guest name.
    pub name: [u8; NAME_LEN],
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// Pattern seed of the bulk area.
    pub seed: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Workload parameter 0.
    pub param0: u64,
    /// Workload parameter 1.
    pub param1: u64,
}

// SAFETY: `#[repr(C)]`, integers and arrays of integers only.
unsafe impl Pod for L2BootParams {}

const _: () = assert!(PD_BASE + MAX_GIB * 0x1000 <= IMAGE_BASE);
const _: () = assert!(PD_BASE + MAX_GIB * 0x1000 <= DEVICE_PD && DEVICE_PD + 0x1000 <= IMAGE_BASE);
const _: () = assert!(VIRTIO_MMIO_BASE >= MAX_MEM_WITH_DEVICES);
const _: () = assert!(IMAGE_BASE + MAX_IMAGE <= STACK_TOP);
