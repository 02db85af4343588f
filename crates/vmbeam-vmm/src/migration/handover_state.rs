//! The handover as an explicit state machine: one [`Handover`] value per
//! rejuvenation holds its phase and everything L0 knows about each guest on
//! its way from the aged guest hypervisor to the successor ([`GuestMove`]).
//!
//! It is plain data behind one mutex (`Session`'s), and that mutex is a
//! *leaf*: code holding it takes no other lock (no host VM table, no nested
//! VM, no record). Callers copy out what they need, drop it, and only then
//! lock anything else. That rule is what keeps a guest hypervisor's
//! hypercalls (which hold a nested VM while they look at the handover) from
//! ever deadlocking against the orchestrator or against the other guest
//! hypervisor (which look at the handover and then at nested VMs).
//!
//! The one bit of per-guest handover state that lives on the nested VM
//! itself is `NestedVm::frozen`, its run gate: RUN must test it under the
//! VM's own lock. Only this module's users (`handover`, `rejuvenate`,
//! `rescue`) set or clear it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::hypercall::{GrantRange, Status};
use vmbeam_abi::layout;

use crate::nesting::nested::{GuestRecord, NestedRef};

/// Phase of a handover. Transitions (each one a method of [`Handover`]):
///
/// ```text
/// Booting ─ready─▶ Ready ─ask─▶ HandingOver ─aged_done─▶ AgedDone ─commit─▶ Committing
///    └──────────────┴──────────────┴──────────────────────────┴─begin_abort─▶ Aborting ─aborted─▶ Aborted
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Successor booting; no guest is held.
    Booting,
    /// Successor said it is ready; no guest is held yet.
    Ready,
    /// The aged L1 grants guests and the successor adopts them.
    HandingOver,
    /// Every live guest is held and adopted; the aged L1 waits inside
    /// HANDOVER_DONE for L0's decision.
    AgedDone,
    /// Point of no return: L0 revokes the aged VM and commits the successor.
    Committing,
    /// Batch handover: every guest is offered and taken; L0 moves them one
    /// by one, each right after one of its exits under the aged L1.
    Moving,
    /// A rollback is under way: no grant, adoption or confirmation is
    /// accepted any more, and guests are being given back.
    Aborting(String),
    /// Rolled back: every guest is back with the aged L1 and runnable.
    Aborted(String),
}

/// The successor's side of one guest's move.
#[derive(Debug, Clone)]
pub struct SuccSide {
    /// The successor's handle of the nested VM.
    pub handle: u32,
    /// Zero-copy adoption of the aged VM's own nested KVM VM (`true`), or a
    /// VM the successor built on granted pages (copy modes, `false`).
    pub adopted: bool,
    /// Adopted: for each slot of the VM (in its order), the successor's L1
    /// address once confirmed by VM_MAP. Applied to the slots at commit, so
    /// a rollback has nothing to undo.
    pub slot_l1: Vec<Option<u64>>,
    /// Adopted: vCPUs confirmed by VCPU_CREATE.
    pub vcpus_confirmed: usize,
    /// The successor called SET_STATE on vCPU 0. For an adopted VM this is
    /// only a confirmation: L0 keeps the state KVM holds.
    pub state_set: bool,
}

impl SuccSide {
    /// True once the successor has done every step the guest needs.
    pub fn complete(&self, vcpus: usize) -> bool {
        if !self.state_set {
            return false;
        }
        !self.adopted || (self.slot_l1.iter().all(Option::is_some) && self.vcpus_confirmed == vcpus)
    }
}

/// Where a guest is in a batch handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStep {
    /// Offered by the aged L1 (it keeps running there).
    Offered,
    /// The successor is taking it (handle being allocated).
    Taking,
    /// The successor has a handle for it; its RUN waits for the guest.
    Taken,
    /// Its last run under the aged L1 is under way or done; the move
    /// completes at the aged L1's next hypercall (its exit is handled).
    LastRun,
    /// Being moved right now by one thread (the aged L1's hook or the
    /// orchestrator): nobody else moves it, and neither L1 runs it.
    Switching,
    /// Moved: it belongs to the successor (until the handover ends: a
    /// successor that dies during Moving gives it back, and it is `Failed`).
    Moved,
    /// The move failed; it stays with the aged L1.
    Failed,
}

/// The batch-handover part of a move.
#[derive(Clone)]
pub struct Batch {
    /// The nested VM (shared by both tables until it moves).
    pub vm: NestedRef,
    /// The aged L1's address of its `GuestLive` (0: L0 offered it, no state).
    pub live_aged: u64,
    /// The successor's address of its `GuestLive`.
    pub live_succ: u64,
    /// Step.
    pub step: BatchStep,
    /// When it moved.
    pub moved_at: Option<Instant>,
    /// The L1 address of each slot under the aged L1, in slot order, kept
    /// when it moves: a successor that dies during Moving gives it back.
    pub aged_l1: Vec<u64>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("live_aged", &self.live_aged)
            .field("live_succ", &self.live_succ)
            .field("step", &self.step)
            .finish()
    }
}

/// One guest on its way: granted by the aged L1 (or by L0 in a rescue).
#[derive(Debug, Clone)]
pub struct GuestMove {
    /// Guest name.
    pub guest: String,
    /// Identity.
    pub record: Arc<GuestRecord>,
    /// Handle under the aged L1.
    pub aged_handle: u32,
    /// Successor-side ranges, in slot order.
    pub ranges: Vec<GrantRange>,
    /// Slots of the nested VM when granted.
    pub slots: usize,
    /// vCPUs of the nested VM when granted.
    pub vcpus: usize,
    /// Bytes.
    pub mem_bytes: u64,
    /// L0 checksum at grant time (paused), with `verify`.
    pub checksum_before: Option<u64>,
    /// Virtio devices that move with the guest (their state stays in L0).
    pub devices: u32,
    /// Requests made available to them but not yet served, and frames
    /// they held, at the pause: served after the move, exactly once.
    pub device_in_flight: u64,
    /// Last exit under the aged L1.
    pub paused_at: Instant,
    /// The successor's nested VM for it, once it has one.
    pub succ: Option<SuccSide>,
    /// Batch handover only.
    pub batch: Option<Batch>,
}

/// A handover's state: phase, moves and counters.
#[derive(Debug)]
pub struct Handover {
    /// Phase.
    pub phase: Phase,
    /// Guests granted so far.
    pub moves: Vec<GuestMove>,
    /// Next free successor address in the grant window.
    pub next_grant_gpa: u64,
    /// Bytes the guest hypervisors put on the channel.
    pub channel_bytes: u64,
    /// Bytes of nested memory L0 copied (zero-copy: must stay 0).
    pub bytes_copied: u64,
    /// Time spent hashing memory for verification.
    pub verify_time: Duration,
    /// When L0 asked the aged L1 to hand over (no guest is paused before).
    pub asked_at: Option<Instant>,
    /// Nothing in this handover waits beyond this instant.
    pub deadline: Instant,
    /// Batch handover (OP_OFFER / OP_ADOPT, per-guest moves).
    pub batch: bool,
    /// Batch: the aged L1 said every guest is offered.
    pub offers_closed: bool,
    /// Batch: index in `moves` of the next guest to move.
    pub head: usize,
    /// Batch: when `head` became the head.
    pub head_since: Option<Instant>,
}

impl Handover {
    /// A handover that must be over by `deadline`.
    pub fn new(deadline: Instant) -> Handover {
        Handover {
            phase: Phase::Booting,
            moves: Vec::new(),
            next_grant_gpa: layout::GRANT_BASE,
            channel_bytes: 0,
            bytes_copied: 0,
            verify_time: Duration::ZERO,
            asked_at: None,
            deadline,
            batch: false,
            offers_closed: false,
            head: 0,
            head_since: None,
        }
    }

    /// Batch: HandingOver → Moving. Invariant: offers are closed and the
    /// successor holds a handle for every offered guest; from now on each
    /// guest moves on its own, in `moves` order.
    pub fn start_moving(&mut self) -> bool {
        let ok = self.batch
            && self.offers_closed
            && self
                .moves
                .iter()
                .all(|m| m.batch.as_ref().is_some_and(|b| b.step == BatchStep::Taken))
            && self.step(|p| *p == Phase::HandingOver, Phase::Moving);
        if ok {
            self.head = 0;
            self.head_since = Some(Instant::now());
        }
        ok
    }

    /// Batch: the guest whose move is next, while moving.
    pub fn head_move(&mut self) -> Option<&mut GuestMove> {
        if self.phase != Phase::Moving {
            return None;
        }
        let i = self.head;
        self.moves.get_mut(i)
    }

    /// Batch: the head moved (or failed); the next one is up. Invariant:
    /// every move before `head` is Moved or Failed.
    pub fn advance(&mut self) {
        self.head += 1;
        self.head_since = Some(Instant::now());
    }

    /// Batch: true once every move is Moved or Failed.
    pub fn all_moved(&self) -> bool {
        self.batch
            && self.moves.iter().all(|m| {
                m.batch
                    .as_ref()
                    .is_some_and(|b| matches!(b.step, BatchStep::Moved | BatchStep::Failed))
            })
    }

    /// Booting → Ready. Invariant: no guest is held, nothing was granted.
    pub fn ready(&mut self) -> bool {
        self.step(|p| *p == Phase::Booting, Phase::Ready)
    }

    /// Ready → HandingOver. Invariant: from now on, exactly the guests in
    /// `moves` are held (frozen) for the successor.
    pub fn ask(&mut self) -> bool {
        let ok = self.step(|p| *p == Phase::Ready, Phase::HandingOver);
        if ok {
            self.asked_at = Some(Instant::now());
        }
        ok
    }

    /// HandingOver → AgedDone. Invariant (checked by the caller just
    /// before, `handover::everyone_adopted`): every live guest of the aged
    /// VM is held and every move's successor side is complete.
    pub fn aged_done(&mut self) -> bool {
        if self.phase == Phase::Moving && self.all_moved() {
            self.phase = Phase::AgedDone;
            return true;
        }
        let batch = self.batch;
        self.step(|p| *p == Phase::HandingOver && !batch, Phase::AgedDone)
    }

    /// AgedDone → Committing. Invariant: the successor is alive and, with
    /// `verify`, every guest's memory was checked; there is no way back.
    pub fn commit(&mut self) -> bool {
        self.step(|p| *p == Phase::AgedDone, Phase::Committing)
    }

    /// Any phase before Committing → Aborting. Invariant: no grant,
    /// adoption or confirmation is recorded from now on, so the rollback
    /// sees every guest it has to give back. False if already committing
    /// or aborting.
    pub fn begin_abort(&mut self, why: &str) -> bool {
        self.step(
            |p| {
                !matches!(
                    p,
                    Phase::Committing | Phase::Aborting(_) | Phase::Aborted(_)
                )
            },
            Phase::Aborting(why.to_string()),
        )
    }

    /// Aborting → Aborted. Invariant: every guest is back in the aged
    /// VM's table and runnable; the aged L1 may resume.
    pub fn aborted(&mut self) -> bool {
        match &self.phase {
            Phase::Aborting(m) => {
                self.phase = Phase::Aborted(m.clone());
                true
            }
            _ => false,
        }
    }

    fn step(&mut self, from: impl Fn(&Phase) -> bool, to: Phase) -> bool {
        if from(&self.phase) {
            self.phase = to;
            true
        } else {
            false
        }
    }

    /// True while grants and adoptions are accepted.
    pub fn handing_over(&self) -> bool {
        self.phase == Phase::HandingOver
    }

    /// Batch: the move of the successor's guest `handle`, if any.
    pub fn batch_of_successor(&mut self, handle: u32) -> Option<&mut GuestMove> {
        self.moves
            .iter_mut()
            .find(|m| m.batch.is_some() && m.succ.as_ref().is_some_and(|s| s.handle == handle))
    }

    /// Batch: the move of the aged L1's guest `handle`, if any.
    pub fn batch_of_aged(&mut self, handle: u32) -> Option<&mut GuestMove> {
        self.moves
            .iter_mut()
            .find(|m| m.batch.is_some() && m.aged_handle == handle)
    }

    /// Reserves `len` bytes of the successor's grant window; all of a
    /// guest's slots are reserved at once, so a refused grant advances
    /// nothing.
    pub fn reserve_grant(&mut self, len: u64) -> Result<u64, Status> {
        let at = self.next_grant_gpa;
        let end = at.checked_add(len).ok_or(Status::NoResources)?;
        if end > layout::GRANT_BASE + layout::GRANT_SIZE {
            return Err(Status::NoResources);
        }
        self.next_grant_gpa = end;
        Ok(at)
    }

    /// Gives back a reservation of a grant that failed. The window is a
    /// bump allocator: the space returns if nothing was reserved after it
    /// (the normal case: one aged vCPU grants one guest at a time).
    pub fn release_grant(&mut self, at: u64, len: u64) {
        if self.next_grant_gpa == at + len {
            self.next_grant_gpa = at;
        }
    }

    /// The move of guest `name`.
    pub fn move_named(&mut self, name: &str) -> Option<&mut GuestMove> {
        self.moves.iter_mut().find(|m| m.guest == name)
    }

    /// The move whose successor-side VM has handle `handle`.
    pub fn move_of_successor(&mut self, handle: u32) -> Option<&mut GuestMove> {
        self.moves
            .iter_mut()
            .find(|m| m.succ.as_ref().is_some_and(|s| s.handle == handle))
    }

    /// The adoption (zero-copy) of the successor's VM `handle`, while
    /// handing over.
    pub fn adoption(&mut self, handle: u32) -> Option<&mut GuestMove> {
        if !self.handing_over() {
            return None;
        }
        self.move_of_successor(handle)
            .filter(|m| m.succ.as_ref().is_some_and(|s| s.adopted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let mut h = Handover::new(Instant::now());
        assert!(!h.ask());
        assert!(h.ready());
        assert!(!h.ready());
        assert!(h.ask());
        assert!(h.asked_at.is_some());
        assert!(!h.commit());
        assert!(h.aged_done());
        assert!(h.commit());
        assert!(!h.begin_abort("late"), "no rollback after the commit point");
        let mut h = Handover::new(Instant::now());
        assert!(h.begin_abort("x"));
        assert!(!h.begin_abort("y"), "one rollback at a time");
        assert!(!h.ready());
        assert!(h.aborted());
        assert_eq!(h.phase, Phase::Aborted("x".into()));
    }

    #[test]
    fn a_refused_grant_gives_its_window_back() {
        let mut h = Handover::new(Instant::now());
        let a = h.reserve_grant(4 << 20).unwrap();
        assert_eq!(a, layout::GRANT_BASE);
        assert_eq!(
            h.reserve_grant(layout::GRANT_SIZE),
            Err(Status::NoResources)
        );
        assert_eq!(h.next_grant_gpa, layout::GRANT_BASE + (4 << 20));
        h.release_grant(a, 4 << 20);
        assert_eq!(h.next_grant_gpa, layout::GRANT_BASE);
        assert_eq!(h.reserve_grant(u64::MAX), Err(Status::NoResources));
    }
}
