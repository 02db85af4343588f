//! Messages the aged guest hypervisor and its successor exchange on the
//! shared-page channel during a zero-copy handover.
//!
//! The channel is a memory region L0 maps into both host VMs. It has two
//! one-slot mailboxes, one per direction; a sender writes the payload, then
//! the length, then bumps the sequence number and rings the peer's doorbell
//! through L0. Messages carry state only (registers, UART, the memory map);
//! nested memory itself never crosses the channel: the pages are granted.
//! The receiver validates every message with [`GuestMsg::validate`].

use crate::hypercall::GrantRange;
use crate::state::VcpuState;
use crate::{Pod, NAME_LEN};

/// `MsgHeader::magic`.
pub const MSG_MAGIC: u32 = 0x6d62_6f76; // "vobm"
/// Version of the handover protocol.
pub const HANDOVER_VERSION: u16 = 1;

/// Offset of the aged → successor mailbox inside the channel.
pub const MAILBOX_TO_SUCCESSOR: u64 = 0;
/// Offset of the successor → aged mailbox inside the channel.
pub const MAILBOX_TO_AGED: u64 = 0x8_0000;
/// Bytes of a mailbox (header included).
pub const MAILBOX_SIZE: u64 = 0x8_0000;

/// Header of a mailbox: written last by the sender.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MailboxHeader {
    /// Bumped once per message.
    pub seq: u32,
    /// Length of the message that follows the header.
    pub len: u32,
    /// Reserved.
    pub _pad: [u32; 14],
}
/// Where the payload starts inside a mailbox.
pub const MAILBOX_PAYLOAD: u64 = core::mem::size_of::<MailboxHeader>() as u64;

/// Message kinds.
pub mod kind {
    /// Successor → aged: booted and ready.
    pub const HELLO: u16 = 1;
    /// Aged → successor: one nested guest ([`super::GuestMsg`]).
    pub const GUEST: u16 = 2;
    /// Successor → aged: guest adopted (not yet resumed).
    pub const ACCEPT: u16 = 3;
    /// Successor → aged: guest refused; `code` says why.
    pub const REJECT: u16 = 4;
    /// Aged → successor: no more guests.
    pub const END: u16 = 5;
}

/// Header of every message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgHeader {
    /// [`MSG_MAGIC`].
    pub magic: u32,
    /// [`HANDOVER_VERSION`].
    pub version: u16,
    /// One of [`kind`].
    pub kind: u16,
    /// Whole message length in bytes.
    pub len: u32,
    /// For ACCEPT/REJECT: the guest index; for END: the guest count.
    pub index: u32,
    /// For REJECT: reason code.
    pub code: u32,
    /// Reserved.
    pub _pad: u32,
}

impl MsgHeader {
    /// A header for a message of `kind` and total length `len`.
    pub fn new(kind: u16, len: usize) -> Self {
        MsgHeader {
            magic: MSG_MAGIC,
            version: HANDOVER_VERSION,
            kind,
            len: len as u32,
            index: 0,
            code: 0,
            _pad: 0,
        }
    }
}

/// Register state of the 16550 UART L1 emulates for a nested guest, plus
/// the console line not yet forwarded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct UartState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub _pad: [u8; 2],
    pub line_len: u32,
    pub _pad2: u32,
    pub line: [u8; UART_LINE],
}
/// Bytes of console line buffered in L1.
pub const UART_LINE: usize = 160;

impl Default for UartState {
    fn default() -> Self {
        UartState {
            ier: 0,
            lcr: 0x3,
            mcr: 0,
            scr: 0,
            dll: 1,
            dlm: 0,
            _pad: [0; 2],
            line_len: 0,
            _pad2: 0,
            line: [0; UART_LINE],
        }
    }
}

/// What a guest hypervisor knows about one nested guest that KVM does not
/// hold: its UART model, the answer it owes to a pending read, and its
/// bookkeeping. In a batch handover each L1 keeps one per guest at an
/// address it tells L0 (OP_OFFER, OP_ADOPT), and L0 copies it from the aged
/// L1 to the successor at host speed when it moves the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestLive {
    /// Console model.
    pub uart: UartState,
    /// Answer owed to the guest's pending port or MMIO read.
    pub pending_in: u64,
    /// 1 if `pending_in` is owed.
    pub pending_valid: u32,
    /// Workload kind (informational).
    pub workload: u32,
    /// Pattern seed (informational).
    pub seed: u64,
    /// Exits handled so far.
    pub exits: u64,
    /// Times moved.
    pub moves: u64,
}

// SAFETY: `#[repr(C)]`, integers and a Pod array only, no padding holes
// that matter for reading (any bit pattern is valid).
unsafe impl crate::Pod for GuestLive {}

/// Most memory ranges of one nested guest.
pub const MAX_GUEST_RANGES: usize = 16;
/// Most vCPUs of one nested guest.
pub const MAX_NESTED_VCPUS: usize = 4;

/// One nested guest, as the aged L1 offers it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuestMsg {
    /// Header (kind GUEST).
    pub hdr: MsgHeader,
    /// Index of the guest in this handover (0-based).
    pub index: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Name.
    pub name: [u8; NAME_LEN],
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// Workload kind ([`crate::boot::workload`]).
    pub workload: u32,
    /// Valid entries in `ranges`.
    pub n_ranges: u32,
    /// Workload seed.
    pub seed: u64,
    /// Times this guest has been moved before.
    pub moves: u64,
    /// Exits L1 handled for it so far.
    pub exits: u64,
    /// Console state.
    pub uart: UartState,
    /// Memory, as the successor sees it after the grant.
    pub ranges: [GrantRange; MAX_GUEST_RANGES],
    /// vCPU state.
    pub state: [VcpuState; MAX_NESTED_VCPUS],
}

/// Why a guest message is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgError {
    /// Wrong magic, version, kind or length.
    BadHeader,
    /// Name empty or not UTF-8.
    BadName,
    /// vCPU count 0 or above [`MAX_NESTED_VCPUS`].
    BadVcpus,
    /// Range count 0 or above [`MAX_GUEST_RANGES`].
    BadRangeCount,
    /// A range is unaligned, empty, outside the grant window or overlaps another.
    BadRange,
    /// The ranges do not add up to `mem_bytes`.
    SizeMismatch,
}

impl GuestMsg {
    /// Checks everything a successor must check before acting on the message:
    /// header, name, counts, and that every range lies inside the grant window
    /// `[grant_base, grant_base + grant_size)`, is extent-aligned, and that no
    /// two ranges overlap on either side.
    pub fn validate(&self, grant_base: u64, grant_size: u64) -> Result<(), MsgError> {
        let h = &self.hdr;
        if h.magic != MSG_MAGIC
            || h.version != HANDOVER_VERSION
            || h.kind != kind::GUEST
            || h.len as usize != core::mem::size_of::<GuestMsg>()
        {
            return Err(MsgError::BadHeader);
        }
        if crate::name_from_bytes(&self.name).is_none() {
            return Err(MsgError::BadName);
        }
        if self.vcpus == 0 || self.vcpus as usize > MAX_NESTED_VCPUS {
            return Err(MsgError::BadVcpus);
        }
        let n = self.n_ranges as usize;
        if n == 0 || n > MAX_GUEST_RANGES {
            return Err(MsgError::BadRangeCount);
        }
        let ext = crate::layout::EXTENT_SIZE;
        let end = grant_base
            .checked_add(grant_size)
            .ok_or(MsgError::BadRange)?;
        let mut total: u64 = 0;
        for (i, r) in self.ranges[..n].iter().enumerate() {
            let r_end = r.succ_gpa.checked_add(r.len).ok_or(MsgError::BadRange)?;
            let l2_end = r.l2_gpa.checked_add(r.len).ok_or(MsgError::BadRange)?;
            if r.len == 0
                || r.len % ext != 0
                || r.succ_gpa % ext != 0
                || r.l2_gpa % ext != 0
                || r.succ_gpa < grant_base
                || r_end > end
            {
                return Err(MsgError::BadRange);
            }
            for o in &self.ranges[..i] {
                let o_end = o.succ_gpa + o.len;
                let o_l2_end = o.l2_gpa + o.len;
                if (r.succ_gpa < o_end && o.succ_gpa < r_end)
                    || (r.l2_gpa < o_l2_end && o.l2_gpa < l2_end)
                {
                    return Err(MsgError::BadRange);
                }
            }
            total = total.checked_add(r.len).ok_or(MsgError::BadRange)?;
        }
        if total != self.mem_bytes {
            return Err(MsgError::SizeMismatch);
        }
        Ok(())
    }
}

// SAFETY: `#[repr(C)]`, integers and arrays of integers only.
unsafe impl Pod for MsgHeader {}
// SAFETY: as above.
unsafe impl Pod for MailboxHeader {}
// SAFETY: as above.
unsafe impl Pod for UartState {}
// SAFETY: as above.
unsafe impl Pod for GuestMsg {}

const _: () = assert!(core::mem::size_of::<MailboxHeader>() == 64);
const _: () = assert!((core::mem::size_of::<GuestMsg>() as u64) < MAILBOX_SIZE - MAILBOX_PAYLOAD);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{EXTENT_SIZE, GRANT_BASE, GRANT_SIZE};

    fn good() -> GuestMsg {
        let mut m = GuestMsg {
            hdr: MsgHeader::new(kind::GUEST, core::mem::size_of::<GuestMsg>()),
            index: 0,
            vcpus: 1,
            name: crate::name_to_bytes("l2-0"),
            mem_bytes: 2 * EXTENT_SIZE,
            workload: 1,
            n_ranges: 1,
            seed: 1,
            moves: 0,
            exits: 0,
            uart: UartState::default(),
            ranges: [GrantRange::default(); MAX_GUEST_RANGES],
            state: [VcpuState::default(); MAX_NESTED_VCPUS],
        };
        m.ranges[0] = GrantRange {
            succ_gpa: GRANT_BASE,
            l2_gpa: 0,
            len: 2 * EXTENT_SIZE,
        };
        m
    }

    #[test]
    fn valid_message_passes_and_round_trips() {
        let m = good();
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Ok(()));
        let back: GuestMsg = crate::from_bytes(crate::as_bytes(&m)).unwrap();
        assert_eq!(back.validate(GRANT_BASE, GRANT_SIZE), Ok(()));
        assert_eq!(back.ranges[0], m.ranges[0]);
    }

    #[test]
    fn hostile_messages_are_refused() {
        let mut m = good();
        m.hdr.version = 99;
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadHeader));
        let mut m = good();
        m.ranges[0].succ_gpa = 0;
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadRange));
        let mut m = good();
        m.ranges[0].len = u64::MAX - EXTENT_SIZE + 1;
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadRange));
        let mut m = good();
        m.n_ranges = 2;
        m.ranges[1] = m.ranges[0];
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadRange));
        let mut m = good();
        m.mem_bytes = EXTENT_SIZE;
        assert_eq!(
            m.validate(GRANT_BASE, GRANT_SIZE),
            Err(MsgError::SizeMismatch)
        );
        let mut m = good();
        m.n_ranges = 100;
        assert_eq!(
            m.validate(GRANT_BASE, GRANT_SIZE),
            Err(MsgError::BadRangeCount)
        );
        let mut m = good();
        m.vcpus = 0;
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadVcpus));
        let mut m = good();
        m.name = [0; NAME_LEN];
        assert_eq!(m.validate(GRANT_BASE, GRANT_SIZE), Err(MsgError::BadName));
    }
}
