//! DMA for `virtio-drivers` without a heap: the guest is identity-mapped,
//! so a physical address is its virtual address, and queue memory comes
//! from a bump allocator over a fixed, otherwise unused area of guest RAM
//! (the rings, and buffers a workload takes at start). Shared by the
//! nested workloads that drive virtio devices (feature `virtio`).

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Start of the DMA area (between the working set and the bulk area).
const DMA_BASE: u64 = 0x30_0000;
/// End of the DMA area.
const DMA_END: u64 = 0x40_0000;

static NEXT: AtomicU64 = AtomicU64::new(DMA_BASE);

/// Identity-mapped DMA with a bump allocator (never frees).
pub struct BumpHal;

// SAFETY: pages come from a range nothing else in the guest uses, each
// handed out once, zeroed and page aligned; addresses are identity mapped.
unsafe impl Hal for BumpHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let len = (pages * PAGE_SIZE) as u64;
        let at = NEXT.fetch_add(len, Ordering::SeqCst);
        if at + len > DMA_END {
            panic!("dma area exhausted");
        }
        // SAFETY: `[at, at + len)` is guest RAM in the DMA area, handed out
        // once; zeroing it is required by the trait.
        unsafe { core::ptr::write_bytes(at as *mut u8, 0, len as usize) };
        (at, NonNull::new(at as *mut u8).unwrap())
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}
