//! The paravirtual nesting interface: how L1 asks L0 for work.
//!
//! A hypercall is one port-I/O exit: L1 fills the [`HypercallPage`] of the
//! vCPU it runs on, then writes the op number to
//! [`crate::layout::HYPERCALL_PORT`] with a 32-bit `out`. L0 reads the page,
//! does the work at host speed, writes `status`, `ret` and (for some ops)
//! `exit`, `state` or `data`, and resumes L1 after the `out`.

use crate::state::VcpuState;
use crate::Pod;

/// Answers with the ABI version (`ret[0]`) and `args[0] ^ PING_XOR` (`ret[1]`).
pub const OP_PING: u32 = 1;
/// Writes `data[..args[1]]` to a console: `args[0]` is a nested handle or [`CONSOLE_SELF`].
pub const OP_CONSOLE_WRITE: u32 = 2;
/// Reports L1 health counters: `args` as listed by [`HEALTH_ARGS`].
pub const OP_HEALTH: u32 = 3;
/// Sleeps until the channel doorbell rings, the control word changes or `args[0]` µs pass.
pub const OP_WAIT: u32 = 4;
/// Creates a nested VM named by `data[..16]`; `ret[0]` is its handle.
pub const OP_VM_CREATE: u32 = 10;
/// Destroys nested VM `args[0]`.
pub const OP_VM_DESTROY: u32 = 11;
/// Maps caller GPA `args[1]`, length `args[3]`, at nested GPA `args[2]` of VM `args[0]`.
pub const OP_VM_MAP: u32 = 12;
/// Creates a vCPU in VM `args[0]`; `ret[0]` is its index.
pub const OP_VCPU_CREATE: u32 = 13;
/// Reads vCPU `args[1]` of VM `args[0]` into `state`; `args[2]` answers a pending port read.
pub const OP_VCPU_GET_STATE: u32 = 14;
/// Writes `state` into vCPU `args[1]` of VM `args[0]`.
pub const OP_VCPU_SET_STATE: u32 = 15;
/// Runs vCPU `args[1]` of VM `args[0]` for at most `args[2]` µs; `args[3]` answers a
/// pending port or MMIO read. The exit is written to `exit`.
pub const OP_VCPU_RUN: u32 = 16;
/// Queues external interrupt vector `args[2]` for vCPU `args[1]` of VM `args[0]`.
pub const OP_INJECT_IRQ: u32 = 17;
/// Fills nested GPA range `args[1]`..+`args[2]` of VM `args[0]` with the pattern of seed `args[3]`.
pub const OP_FILL_PATTERN: u32 = 18;
/// Describes device `args[1]` the operator bound to nested VM `args[0]`:
/// `ret[0]` = virtio device id, `ret[1]` = 1 if placed, `ret[2]` = its
/// window, `ret[3]` = its interrupt line. `NoSuchHandle` past the last one.
pub const OP_DEVICE_QUERY: u32 = 30;
/// Places device `args[1]` of nested VM `args[0]` at nested address
/// `args[2]` (a [`DEVICE_WINDOW`]-sized virtio-mmio window) with interrupt
/// line `args[3]`; `ret[0]` = virtio device id.
pub const OP_DEVICE_PLACE: u32 = 31;
/// Size of a device window.
pub const DEVICE_WINDOW: u64 = 0x1000;

/// Successor only: says it booted and waits for guests.
pub const OP_HANDOVER_READY: u32 = 20;
/// Aged L1 only: grants the memory of nested VM `args[0]` to the successor; the
/// successor-side ranges are written to `data` as [`GrantRange`]s, count in `ret[0]`.
pub const OP_GRANT: u32 = 21;
/// Rings the peer's doorbell on the channel.
pub const OP_NOTIFY: u32 = 22;
/// Aged L1 only: every guest was accepted (`args[0]` = count); L0 revokes this VM.
pub const OP_HANDOVER_DONE: u32 = 23;
/// Aged L1 only: the handover failed (`args[0]` = reason code); L0 drops the successor.
pub const OP_HANDOVER_ABORT: u32 = 24;
/// Aged L1 only, batch handover: offers nested VM `args[0]` to the
/// successor. `args[1]` is the L1 address of the guest's
/// [`crate::handover::GuestLive`], which L0 reads when it moves the guest.
/// The guest keeps running until then.
pub const OP_OFFER: u32 = 25;
/// Aged L1 only, batch handover: every live guest was offered (`args[0]` =
/// count).
pub const OP_OFFER_END: u32 = 26;
/// Successor only, batch handover: takes the next offered guest. `args[0]`
/// is the L1 address where L0 writes its [`crate::handover::GuestLive`]
/// (now, and again when the guest arrives). Returns `ret[0]` = handle,
/// `ret[1]` = memory bytes, `ret[2]` = range count, `data` = name
/// (16 bytes) then the [`GrantRange`]s. `Again`: nothing offered yet, call
/// again; `NoSuchHandle`: every guest was taken. RUN of a taken guest
/// waits in L0 until the guest has arrived.
pub const OP_ADOPT: u32 = 27;

/// Value XORed into the ping argument so a ping proves L0 read it.
pub const PING_XOR: u64 = 0x7662_6561_6d21_2121;
/// Console handle meaning "the calling guest hypervisor itself".
pub const CONSOLE_SELF: u64 = u64::MAX;

/// Order of the counters in `args` of [`OP_HEALTH`].
pub const HEALTH_ARGS: [&str; 8] = [
    "pool_free_bytes",
    "pool_used_bytes",
    "nested_guests",
    "nested_ops",
    "leaked_bytes",
    "uptime_ms",
    "errors",
    "exits_handled",
];

/// Status codes written to [`HypercallPage::status`].
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Unknown op number.
    BadOp = -1,
    /// An argument is malformed (zero length, bad name, bad index).
    BadArg = -2,
    /// A range is not inside memory the caller owns.
    OutOfRange = -3,
    /// A range overlaps one already mapped.
    Overlap = -4,
    /// An address or length is not aligned.
    Misaligned = -5,
    /// A count exceeds a limit.
    TooMany = -6,
    /// No such nested VM or vCPU.
    NoSuchHandle = -7,
    /// The object is in the wrong state for this op.
    BadState = -8,
    /// L0 ran out of a resource (memory slots, KVM objects).
    NoResources = -9,
    /// The caller may not do this (wrong role, revoked).
    NotPermitted = -10,
    /// The handover was aborted by L0.
    Aborted = -12,
    /// Nothing yet: call again (OP_ADOPT before the next offer).
    Again = -15,
    /// The nested guest moved to the successor: forget it (RUN in a batch
    /// handover).
    Moved = -16,
    /// L0 failed internally; the caller's state is unchanged.
    Internal = -14,
}

impl Status {
    /// Decodes a status word.
    pub fn from_i32(v: i32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            -1 => Status::BadOp,
            -2 => Status::BadArg,
            -3 => Status::OutOfRange,
            -4 => Status::Overlap,
            -5 => Status::Misaligned,
            -6 => Status::TooMany,
            -7 => Status::NoSuchHandle,
            -8 => Status::BadState,
            -9 => Status::NoResources,
            -10 => Status::NotPermitted,
            -12 => Status::Aborted,
            -15 => Status::Again,
            -16 => Status::Moved,
            -14 => Status::Internal,
            _ => return None,
        })
    }
}

/// Why a nested vCPU stopped running ([`NestedExit::reason`]).
pub mod exit {
    /// The time slice ended (or L0 needed the thread back).
    pub const SLICE: u32 = 1;
    /// Port write: `port`, `size`, `data`.
    pub const IO_OUT: u32 = 2;
    /// Port read: `port`, `size`; answer in the next RUN's `args[3]`.
    pub const IO_IN: u32 = 3;
    /// MMIO read at `addr`, `size`; answer in the next RUN's `args[3]`.
    pub const MMIO_READ: u32 = 4;
    /// MMIO write at `addr`, `size`, `data`.
    pub const MMIO_WRITE: u32 = 5;
    /// The guest executed HLT.
    pub const HLT: u32 = 6;
    /// The guest triple-faulted (or asked for shutdown).
    pub const SHUTDOWN: u32 = 7;
    /// The guest cannot run: entry failure or emulation failure (`detail`).
    pub const FAIL: u32 = 8;
}

/// What a nested vCPU did when RUN returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NestedExit {
    /// One of [`exit`].
    pub reason: u32,
    /// Access size in bytes for I/O and MMIO.
    pub size: u32,
    /// Port for I/O exits.
    pub port: u32,
    /// Reserved.
    pub _pad: u32,
    /// Data written by the guest (I/O out, MMIO write), little-endian.
    pub data: u64,
    /// MMIO address.
    pub addr: u64,
    /// Nanoseconds the vCPU spent inside KVM_RUN during this RUN.
    pub run_ns: u64,
    /// Extra detail: failure reason or suberror.
    pub detail: u64,
}

/// One range of successor memory created by a grant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantRange {
    /// Where the successor sees the pages (its own guest-physical address).
    pub succ_gpa: u64,
    /// Where the nested guest sees them.
    pub l2_gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Bytes of free-form data in a hypercall page.
pub const DATA_LEN: usize = 2048;
/// Most ranges one grant can return.
pub const MAX_GRANT_RANGES: usize = DATA_LEN / core::mem::size_of::<GrantRange>();

/// The per-vCPU hypercall page.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HypercallPage {
    /// Op number (also the value written to the port).
    pub op: u32,
    /// Result, a [`Status`] value.
    pub status: i32,
    /// Arguments, per op.
    pub args: [u64; 8],
    /// Results, per op.
    pub ret: [u64; 8],
    /// Exit record of RUN.
    pub exit: NestedExit,
    /// vCPU state for GET_STATE / SET_STATE.
    pub state: VcpuState,
    /// Free-form data (names, console bytes, grant ranges).
    pub data: [u8; DATA_LEN],
}

impl Default for HypercallPage {
    fn default() -> Self {
        HypercallPage {
            op: 0,
            status: 0,
            args: [0; 8],
            ret: [0; 8],
            exit: NestedExit::default(),
            state: VcpuState::default(),
            data: [0; DATA_LEN],
        }
    }
}

// SAFETY: `#[repr(C)]`, integers and arrays of integers only.
unsafe impl Pod for NestedExit {}
// SAFETY: as above.
unsafe impl Pod for GrantRange {}
// SAFETY: as above.
unsafe impl Pod for HypercallPage {}

/// Byte offset of `status` in the page (L0 writes it last).
pub const STATUS_OFFSET: usize = 4;
const _: () = assert!(core::mem::size_of::<NestedExit>() == 48);
const _: () = assert!(core::mem::size_of::<HypercallPage>() <= 4096);
const _: () = assert!(core::mem::offset_of!(HypercallPage, status) == STATUS_OFFSET);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Ok,
            Status::BadOp,
            Status::BadArg,
            Status::OutOfRange,
            Status::Overlap,
            Status::Misaligned,
            Status::TooMany,
            Status::NoSuchHandle,
            Status::BadState,
            Status::NoResources,
            Status::NotPermitted,
            Status::Aborted,
            Status::Internal,
        ] {
            assert_eq!(Status::from_i32(s as i32), Some(s));
        }
        assert_eq!(Status::from_i32(-99), None);
    }

    #[test]
    fn page_round_trips_through_bytes() {
        let mut p = HypercallPage {
            op: OP_VCPU_RUN,
            ..Default::default()
        };
        p.args[2] = 10_000;
        p.exit.reason = exit::IO_OUT;
        p.state.regs.rip = 0x10_0000;
        p.data[5] = 9;
        let bytes = crate::as_bytes(&p);
        let q: HypercallPage = crate::from_bytes(bytes).unwrap();
        assert_eq!(q.op, OP_VCPU_RUN);
        assert_eq!(q.args[2], 10_000);
        assert_eq!(q.exit, p.exit);
        assert_eq!(q.state, p.state);
        assert_eq!(q.data[5], 9);
        assert!(crate::from_bytes::<HypercallPage>(&bytes[..100]).is_none());
    }
}
