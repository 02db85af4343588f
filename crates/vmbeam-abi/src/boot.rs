//! The boot-information page L0 writes for each guest hypervisor.
//!
//! It tells L1 everything it cannot discover: its memory map, where the
//! nested pool, grant window and channel are, its role (first boot or
//! successor in a rejuvenation), which nested guests to start, and it holds
//! the control word through which L0 asks L1 to hand over.

use crate::{Pod, NAME_LEN};

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = 0x766d_6265_616d_4249; // "vmbeamBI"
/// First guest hypervisor of a host: starts the nested guests in `nested`.
pub const ROLE_PRIMARY: u32 = 0;
/// Freshly booted successor: waits for guests on the channel.
pub const ROLE_SUCCESSOR: u32 = 1;

/// Control word values (L0 → L1).
pub mod control {
    /// Nothing asked.
    pub const NONE: u32 = 0;
    /// Hand every nested guest over to the successor on the channel.
    pub const HANDOVER: u32 = 1;
    /// The handover was aborted: keep (or resume) every guest.
    pub const ABORT: u32 = 2;
    /// Successor: the aged VM is revoked; resume the adopted guests.
    pub const COMMIT: u32 = 3;
    /// Test only: like HANDOVER, but the aged L1 crashes right after its
    /// first guest is accepted (exercises L0's rescue of the handover).
    pub const HANDOVER_THEN_CRASH: u32 = 4;
    /// Test only: like HANDOVER, but the aged L1 lies about each guest's
    /// CPU state in its GUEST messages (L0 must ignore it).
    pub const HANDOVER_LIE_STATE: u32 = 5;
    /// Test only: like HANDOVER, but the aged L1 calls HANDOVER_DONE again
    /// and again while the successor adopts.
    pub const HANDOVER_SPAM_DONE: u32 = 6;
    /// Hand every nested guest over in a batch: offer each one to L0
    /// (OP_OFFER), then keep scheduling; L0 moves each guest on its own
    /// right after one of its exits, and RUN of a moved guest answers
    /// `Status::Moved`.
    pub const HANDOVER_BATCH: u32 = 7;
    /// Test only: like HANDOVER_BATCH, but the aged L1 runs only its first
    /// guest (so the others move only when L0 forces them) and crashes when
    /// it learns that this guest has moved (exercises L0 moving the rest
    /// itself).
    pub const HANDOVER_BATCH_THEN_CRASH: u32 = 8;
    /// Test only: like HANDOVER_BATCH, but the aged L1 runs only its first
    /// guest (so the others move only when L0 forces them, 100 ms apart,
    /// and a successor that dies after the first move dies during Moving).
    pub const HANDOVER_BATCH_FIRST_ONLY: u32 = 9;

    /// True for every control word that asks for a batch handover.
    pub const fn is_batch(c: u32) -> bool {
        matches!(
            c,
            HANDOVER_BATCH | HANDOVER_BATCH_THEN_CRASH | HANDOVER_BATCH_FIRST_ONLY
        )
    }
}

/// Protocol flags (`BootInfo::flags`, above the fault-injection bits).
pub mod protocol {
    /// Successor: adopt guests with OP_ADOPT (batch handover) instead of
    /// the channel protocol.
    pub const BATCH: u64 = 1 << 32;
}

/// Fault-injection flags for tests (`BootInfo::flags`); zero in production.
pub mod fault {
    /// Successor rejects the first guest offered.
    pub const REJECT_FIRST: u64 = 1 << 0;
    /// Successor triple-faults before adopting anything.
    pub const CRASH_BEFORE_ADOPT: u64 = 1 << 1;
    /// Successor triple-faults after adopting the first guest.
    pub const CRASH_AFTER_FIRST: u64 = 1 << 2;
    /// Successor never says it is ready.
    pub const HANG_AT_BOOT: u64 = 1 << 3;
    /// The aged L1 crashes after its first guest is accepted (L0 writes
    /// `control::HANDOVER_THEN_CRASH` instead of `HANDOVER`).
    pub const AGED_CRASH_AFTER_FIRST: u64 = 1 << 4;
    /// L0 changes one byte (at nested address [`FLIP_BYTE_GPA`]) of the
    /// first granted guest after its before-checksum and before its
    /// after-checksum, so the move's verification must fail and roll back.
    pub const FLIP_BYTE_BEFORE_VERIFY: u64 = 1 << 5;
    /// The byte [`FLIP_BYTE_BEFORE_VERIFY`] inverts: the last byte of the
    /// nested guest's boot-parameter page, which no workload reads after
    /// it started and memtouch does not verify.
    pub const FLIP_BYTE_GPA: u64 = crate::l2::BOOT_PARAMS + 0xfff;
    /// The aged L1 sends garbage CPU state (`control::HANDOVER_LIE_STATE`).
    pub const AGED_LIE_STATE: u64 = 1 << 8;
    /// The aged L1 spams HANDOVER_DONE (`control::HANDOVER_SPAM_DONE`).
    pub const AGED_SPAM_DONE: u64 = 1 << 9;
    /// Successor repeats every VM_MAP of an adoption many times (each
    /// repeat is refused), to widen races with the aged side.
    pub const SPAM_MAP: u64 = 1 << 10;
    /// Batch: the successor runs the first guest it adopted once (its RUN
    /// waits until the guest has moved to it), then triple-faults; the aged
    /// L1 runs only that guest meanwhile (`control::HANDOVER_BATCH_FIRST_ONLY`),
    /// so the others are still on their way when it dies.
    pub const CRASH_AFTER_MOVES: u64 = 1 << 11;
}

/// Modes of the test-only stress guest hypervisor (`guests/stress`), in
/// `BootInfo.flags` above the fault bits; several may be combined.
pub mod stress {
    /// vCPU 0 fills the nested-VM bound, then cycles fresh names through
    /// VM_CREATE/VM_DESTROY (10 000, then on forever).
    pub const CHURN: u64 = 1 << 32;
    /// Every vCPU races VM_MAP of one range and VM_CREATE of one name
    /// against the others, round after round.
    pub const RACE: u64 = 1 << 33;
    /// vCPU 1 floods a nested guest's console with CONSOLE_WRITE.
    pub const FLOOD: u64 = 1 << 34;
    /// vCPUs 2 and 3 (every vCPU if alone) RUN nested guests that never
    /// exit, with the longest slice.
    pub const SPIN: u64 = 1 << 35;
    /// vCPU 0 runs a nested guest with an IDT that counts interrupts, and
    /// injects them with INJECT_IRQ, with interrupts enabled and disabled.
    pub const IRQ: u64 = 1 << 36;
    /// vCPU 0 tries, over and over, to take the name [`STEAL_NAME`]
    /// (VM_CREATE) and, whenever it gets it, writes `STOLEN` into that
    /// guest's console (CONSOLE_WRITE); it reports every 1000 tries.
    pub const STEAL: u64 = 1 << 37;
    /// The name `STEAL` tries to take: the first nested guest of a line.
    pub const STEAL_NAME: &str = "l2-0";
}

/// Kinds of workload images.
pub mod workload {
    /// Fills and verifies memory, prints counter and checksum.
    pub const MEMTOUCH: u32 = 1;
    /// Prints a count and a timestamp.
    pub const TICKER: u32 = 2;
    /// Writes, reads back and verifies blocks of its virtio disk.
    pub const BLKCHECK: u32 = 3;
    /// Answers ARP, ICMP echo, UDP and TCP echo on its virtio network card.
    pub const NETECHO: u32 = 4;
}

/// A workload image placed by L0 in L1's module area, flattened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Module {
    /// One of [`workload`].
    pub kind: u32,
    /// Reserved.
    pub _pad: u32,
    /// Where the flat image is in L1 memory.
    pub gpa: u64,
    /// Image length in bytes.
    pub size: u64,
    /// Nested GPA the image must be copied to.
    pub load_addr: u64,
    /// Nested entry point.
    pub entry: u64,
}

/// A nested guest L1 should start at first boot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NestedSpec {
    /// Name (unique on the host).
    pub name: [u8; NAME_LEN],
    /// RAM in bytes (multiple of the extent size).
    pub mem_bytes: u64,
    /// Index into `BootInfo::modules`.
    pub module: u32,
    /// Reserved.
    pub _pad: u32,
    /// Pattern seed for L0's fill of bulk memory.
    pub seed: u64,
    /// Workload parameter (memtouch: rounds before halting, 0 = forever;
    /// ticker: ticks before a deliberate fault, 0 = never).
    pub param0: u64,
    /// Second workload parameter (reserved).
    pub param1: u64,
}

/// Most modules.
pub const MAX_MODULES: usize = 4;
/// Most nested guests per guest hypervisor: the one limit L0 enforces
/// (VM_CREATE, an incoming migration) and L1 sizes its tables by.
pub const MAX_NESTED: usize = 64;

/// The boot-information page.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// [`ROLE_PRIMARY`] or [`ROLE_SUCCESSOR`].
    pub role: u32,
    /// 1 for the first guest hypervisor of a host VM line, +1 per rejuvenation.
    pub generation: u32,
    /// vCPUs of this host VM.
    pub vcpus: u32,
    /// Host VM name.
    pub name: [u8; NAME_LEN],
    /// Bytes of RAM at GPA 0.
    pub ram_size: u64,
    /// Nested pool start.
    pub pool_base: u64,
    /// Nested pool size.
    pub pool_size: u64,
    /// Grant window start.
    pub grant_base: u64,
    /// Grant window size.
    pub grant_size: u64,
    /// Channel start (0 if none).
    pub channel_base: u64,
    /// Channel size.
    pub channel_size: u64,
    /// First hypercall page.
    pub hypercall_page_base: u64,
    /// TSC frequency in kHz (for timestamps).
    pub tsc_khz: u64,
    /// Fault-injection flags ([`fault`]).
    pub flags: u64,
    /// Control word written by L0 at any time ([`control`]).
    pub control: u32,
    /// Number of valid `modules`.
    pub module_count: u32,
    /// Number of valid `nested`.
    pub nested_count: u32,
    /// Time slice L1 should ask for per RUN, in µs.
    pub slice_us: u32,
    /// Workload images.
    pub modules: [Module; MAX_MODULES],
    /// Nested guests to start (primary only).
    pub nested: [NestedSpec; MAX_NESTED],
    /// Aging injector (tests and demos): 4 KiB pages of its nested pool L1
    /// leaks for every nested RUN it issues; 0 (the default) turns it off.
    pub age_leak_pages: u32,
    /// Reserved, zero (keeps the structure free of padding).
    pub _reserved: u32,
}

/// Byte offset of `control` inside the page.
pub const CONTROL_OFFSET: usize = core::mem::offset_of!(BootInfo, control);

impl BootInfo {
    /// An empty boot info with magic and version set.
    pub fn new() -> Self {
        BootInfo {
            magic: BOOT_MAGIC,
            abi_version: crate::ABI_VERSION,
            role: ROLE_PRIMARY,
            generation: 1,
            vcpus: 1,
            name: [0; NAME_LEN],
            ram_size: 0,
            pool_base: 0,
            pool_size: 0,
            grant_base: 0,
            grant_size: 0,
            channel_base: 0,
            channel_size: 0,
            hypercall_page_base: 0,
            tsc_khz: 0,
            flags: 0,
            control: control::NONE,
            module_count: 0,
            nested_count: 0,
            slice_us: 0,
            modules: [Module::default(); MAX_MODULES],
            nested: [NestedSpec::default(); MAX_NESTED],
            age_leak_pages: 0,
            _reserved: 0,
        }
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: `#[repr(C)]`, integers and arrays of integers only.
unsafe impl Pod for BootInfo {}
// SAFETY: as above.
unsafe impl Pod for Module {}
// SAFETY: as above.
unsafe impl Pod for NestedSpec {}

const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);
const _: () = assert!(core::mem::size_of::<BootInfo>() == 3888);
const _: () = assert!(
    crate::layout::BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64
        <= crate::layout::HYPERCALL_PAGE_BASE
);
const _: () = assert!(core::mem::offset_of!(BootInfo, age_leak_pages) == 3880);
const _: () = assert!(core::mem::size_of::<NestedSpec>() == 56);
const _: () = assert!(core::mem::size_of::<Module>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trips() {
        let mut b = BootInfo::new();
        b.role = ROLE_SUCCESSOR;
        b.nested_count = 2;
        b.nested[1].name = crate::name_to_bytes("l2-1");
        b.nested[1].mem_bytes = 64 << 20;
        b.age_leak_pages = 3;
        let c: BootInfo = crate::from_bytes(crate::as_bytes(&b)).unwrap();
        assert_eq!(c.magic, BOOT_MAGIC);
        assert_eq!(c.role, ROLE_SUCCESSOR);
        assert_eq!(c.nested[1], b.nested[1]);
        assert_eq!(c.age_leak_pages, 3);
        assert_eq!(CONTROL_OFFSET % 4, 0);
    }
}
