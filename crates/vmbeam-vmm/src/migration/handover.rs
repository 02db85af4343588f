//! L0's side of a zero-copy handover: the session that ties an aged host VM
//! to its successor, and the hypercalls the two guest hypervisors use in it.
//!
//! L0 alone decides who the successor is. A GRANT maps the very host pages
//! behind a nested guest into the successor (a second mapping of the same
//! memfd range: nothing is copied) and freezes the guest under the aged L1.
//! The successor may build a nested VM on granted pages but cannot run it
//! until L0 commits, which happens only after the aged VM is revoked.
//!
//! Lock order (see docs/architecture.md): a host VM's nested table, then a
//! nested VM, then its record. The session's state ([`Handover`]) is a leaf:
//! it is only reached through [`Session::with`], whose closure takes no
//! other lock, so every op here copies what it needs out of the handover,
//! lets go of it, and only then locks nested VMs (or the other way round).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::handover::{MailboxHeader, MAILBOX_TO_AGED, MAILBOX_TO_SUCCESSOR};
use vmbeam_abi::hypercall::{GrantRange, HypercallPage, Status, MAX_GRANT_RANGES};
use vmbeam_abi::layout;

use crate::base::sync::{Rank, RankedCondvar, RankedMutex};
use crate::host::memory::{MemFile, Region, RegionKind};
use crate::l1::dispatch::{HcOutcome, HcResult};
use crate::l1::hostvm::{Attachment, HostVm};
use crate::migration::copy::{GuestCopy, SlotCopy};
pub use crate::migration::handover_state::{
    Batch, BatchStep, GuestMove, Handover, Phase, SuccSide,
};
use crate::migration::mode::Mode;
use crate::nesting::nested::{NestedRef, NestedState, NestedVm};

/// How long after the handover's deadline an aged L1 waiting inside
/// HANDOVER_DONE gives up on L0's decision (L0 decides well before).
const DONE_GRACE: Duration = Duration::from_secs(10);

/// A handover between an aged host VM and its successor.
pub struct Session {
    /// The VM whose guests move.
    pub aged: Arc<HostVm>,
    /// The successor, once built.
    pub successor: RankedMutex<Option<Arc<HostVm>>>,
    /// The shared-page channel.
    pub channel: Arc<MemFile>,
    /// Whether to hash guests before and after.
    pub verify: bool,
    /// How memory moves.
    pub mode: Mode,
    /// Pre-copied destinations, by guest (precopy mode). A leaf lock.
    pub precopied: RankedMutex<Vec<GuestCopy>>,
    /// The state machine. A leaf lock: only [`Session::with`] takes it.
    st: RankedMutex<Handover>,
    /// Signalled on every phase change.
    cv: RankedCondvar,
}

impl Session {
    /// A new session for `aged`; nothing in it waits beyond `deadline`.
    pub fn new(
        aged: Arc<HostVm>,
        channel: Arc<MemFile>,
        verify: bool,
        mode: Mode,
        deadline: Instant,
    ) -> Arc<Session> {
        Arc::new(Session {
            aged,
            successor: RankedMutex::new(Rank::SessionSuccessor, None),
            channel,
            verify,
            mode,
            precopied: RankedMutex::new(Rank::SessionCopies, Vec::new()),
            st: RankedMutex::new(Rank::SessionState, Handover::new(deadline)),
            cv: RankedCondvar::new(),
        })
    }

    /// Runs `f` on the handover state and wakes every waiter afterwards.
    /// `f` must not take any other lock (the state is a leaf).
    pub fn with<R>(&self, f: impl FnOnce(&mut Handover) -> R) -> R {
        let r = f(&mut self.st.lock().unwrap());
        self.cv.notify_all();
        r
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.st.lock().unwrap().phase.clone()
    }

    /// The instant nothing in this handover waits beyond.
    pub fn deadline(&self) -> Instant {
        self.st.lock().unwrap().deadline
    }

    /// Waits until the phase satisfies `pred`, `timeout` passes, or `tick`
    /// (called at least every 20 ms, without the state locked) returns an
    /// error message.
    pub fn wait_phase(
        &self,
        timeout: Duration,
        pred: impl Fn(&Phase) -> bool,
        tick: impl Fn() -> Option<String>,
    ) -> Result<Phase, String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let g = self.st.lock().unwrap();
                if pred(&g.phase) {
                    return Ok(g.phase.clone());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let (g, _) = self
                    .cv
                    .wait_timeout(g, left.min(Duration::from_millis(20)))
                    .unwrap();
                if pred(&g.phase) {
                    return Ok(g.phase.clone());
                }
            }
            if let Some(e) = tick() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {timeout:?}"));
            }
        }
    }

    /// Waits up to `timeout` until `pred` holds on the handover state
    /// (checked under its lock, so no change is missed); returns whether it
    /// does.
    pub fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&Handover) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.st.lock().unwrap();
        loop {
            if pred(&g) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Waits up to `timeout` for any change of the handover state.
    pub fn wait_change(&self, timeout: Duration) {
        let g = self.st.lock().unwrap();
        drop(self.cv.wait_timeout(g, timeout));
    }

    /// True if `vm` is the aged side.
    pub fn is_aged(&self, vm: &HostVm) -> bool {
        self.aged.id == vm.id
    }

    /// The successor, if any.
    pub fn successor(&self) -> Option<Arc<HostVm>> {
        self.successor.lock().unwrap().clone()
    }

    /// For the aged side's ops: the session must be handing over and the
    /// caller must be the aged VM; returns the successor.
    fn aged_op(&self, vm: &HostVm) -> Result<Arc<HostVm>, Status> {
        if !self.is_aged(vm) {
            return Err(Status::NotPermitted);
        }
        if !self.with(|h| h.handing_over()) {
            return Err(Status::BadState);
        }
        self.successor().ok_or(Status::BadState)
    }
}

/// The session attached to `vm`, if any: the host VM layer keeps it as an
/// [`Attachment`] without knowing its type.
pub fn attached(vm: &HostVm) -> Option<Arc<Session>> {
    let a = vm.session.lock().unwrap().clone()?;
    a.downcast::<Session>().ok()
}

/// Attaches `session` to `vm` (or, with `None`, detaches what is there).
pub fn attach(vm: &HostVm, session: Option<Arc<Session>>) {
    *vm.session.lock().unwrap() = session.map(|s| s as Attachment);
}

fn session_of(vm: &HostVm) -> Result<Arc<Session>, Status> {
    attached(vm).ok_or(Status::NotPermitted)
}

/// The session `vm` is the successor in, if any.
fn successor_session(vm: &HostVm) -> Option<Arc<Session>> {
    session_of(vm).ok().filter(|s| !s.is_aged(vm))
}

/// True if `vm` is the successor of a running handover.
pub fn is_successor_in_handover(vm: &HostVm) -> bool {
    successor_session(vm).is_some()
}

/// True if `vm` is the aged side of a running handover.
pub fn is_aged_in_handover(vm: &HostVm) -> bool {
    session_of(vm).is_ok_and(|s| s.is_aged(vm))
}

/// OP_HANDOVER_READY.
pub fn op_ready(vm: &HostVm) -> HcResult {
    let s = session_of(vm)?;
    if s.is_aged(vm) {
        return Err(Status::NotPermitted);
    }
    if !s.with(|h| h.ready()) {
        return Err(Status::BadState);
    }
    Ok(HcOutcome::Continue)
}

/// OP_GRANT: maps the nested guest's pages into the successor.
pub fn op_grant(vm: &HostVm, handle: u64, p: &mut HypercallPage) -> HcResult {
    let s = session_of(vm)?;
    let succ = s.aged_op(vm)?;
    let ranges = grant_guest(&s, vm, &succ, handle)?;
    for (i, r) in ranges.iter().enumerate() {
        let b = vmbeam_abi::as_bytes(r);
        p.data[i * b.len()..(i + 1) * b.len()].copy_from_slice(b);
    }
    p.ret[0] = ranges.len() as u64;
    Ok(HcOutcome::Continue)
}

/// What GRANT took from the nested VM while it held it.
struct Held {
    record: Arc<crate::nesting::nested::GuestRecord>,
    aged_handle: u32,
    lens: Vec<(u64, u64)>,
    sources: Vec<(Arc<MemFile>, u64)>,
    vcpus: usize,
    mem_bytes: u64,
    paused_at: Instant,
    checksum: Option<u64>,
    hashing: Duration,
    copied: u64,
    devices: u32,
    device_in_flight: u64,
}

/// Grants nested VM `handle` of the aged VM `vm` to the successor: pauses
/// it, maps (or copies) its pages into the successor's grant window and
/// records the move. Returns the successor-side ranges. A refused grant
/// leaves nothing behind: the guest is runnable again, and neither the
/// grant window nor the successor's regions have changed.
pub(crate) fn grant_guest(
    s: &Session,
    vm: &HostVm,
    succ: &HostVm,
    handle: u64,
) -> Result<Vec<GrantRange>, Status> {
    grant_or_offer(s, vm, succ, handle, None)
}

/// [`grant_guest`], or with `offer = Some(live)` the batch handover's
/// offer: the same mapping into the successor, but the guest keeps running
/// (no freeze, no hash) and its move records where its live state is.
pub(crate) fn grant_or_offer(
    s: &Session,
    vm: &HostVm,
    succ: &HostVm,
    handle: u64,
    offer: Option<u64>,
) -> Result<Vec<GrantRange>, Status> {
    let n = vm.nested_vm(handle).ok_or(Status::NoSuchHandle)?;
    let asked = s.with(|h| h.asked_at);
    let held = hold(s, &n, asked, offer.is_none())?;
    let unhold = || {
        if offer.is_none() {
            n.lock().unwrap().frozen = false;
        }
    };
    let total: u64 = held.lens.iter().map(|(_, len)| len).sum();
    let start = match s.with(|h| h.reserve_grant(total)) {
        Ok(a) => a,
        Err(e) => {
            unhold();
            return Err(e);
        }
    };
    // Map every slot first, then publish them all: a mapping that fails
    // leaves the successor as it was.
    let mut regions = Vec::new();
    let mut ranges = Vec::new();
    let mut gpa = start;
    for ((l2_gpa, len), (file, offset)) in held.lens.iter().zip(&held.sources) {
        let region = Region::map(
            file,
            *offset,
            *len,
            gpa,
            RegionKind::Grant {
                guest: held.record.name.clone(),
            },
            succ.alloc_slot(),
        );
        match region {
            Ok(r) => regions.push(r),
            Err(_) => {
                drop(regions);
                s.with(|h| h.release_grant(start, total));
                unhold();
                return Err(Status::NoResources);
            }
        }
        ranges.push(GrantRange {
            succ_gpa: gpa,
            l2_gpa: *l2_gpa,
            len: *len,
        });
        gpa += len;
    }
    let mv = GuestMove {
        guest: held.record.name.clone(),
        record: held.record.clone(),
        aged_handle: held.aged_handle,
        ranges: ranges.clone(),
        slots: held.lens.len(),
        vcpus: held.vcpus,
        mem_bytes: held.mem_bytes,
        checksum_before: held.checksum,
        paused_at: held.paused_at,
        devices: held.devices,
        device_in_flight: held.device_in_flight,
        succ: None,
        batch: offer.map(|live| Batch {
            vm: n.clone(),
            live_aged: live,
            live_succ: 0,
            step: BatchStep::Offered,
            moved_at: None,
            aged_l1: Vec::new(),
        }),
    };
    let recorded = s.with(|h| {
        h.verify_time += held.hashing;
        h.bytes_copied += held.copied;
        if !h.handing_over() || h.moves.iter().any(|m| m.guest == mv.guest) {
            h.release_grant(start, total);
            return false;
        }
        h.moves.push(mv);
        true
    });
    if !recorded {
        // A rollback started meanwhile: it must find this guest runnable.
        unhold();
        return Err(Status::BadState);
    }
    for r in regions {
        // The successor's own KVM slot for these pages is installed right
        // after commit: its guest hypervisor names them (VM_MAP) during the
        // handover but never touches them, and a slot costs time in
        // proportion to its size.
        succ.add_region_deferred(r);
    }
    Ok(ranges)
}

/// Freezes nested VM `n` for a grant and takes what the grant needs, under
/// the VM's own lock only.
fn hold(s: &Session, n: &NestedRef, asked: Option<Instant>, freeze: bool) -> Result<Held, Status> {
    let mut n = n.lock().unwrap();
    let record = n.record.clone().ok_or(Status::BadState)?;
    if n.state == NestedState::Crashed || n.frozen {
        return Err(Status::BadState);
    }
    if n.slots.is_empty() || n.slots.len() > MAX_GRANT_RANGES || n.vcpu_count() == 0 {
        return Err(Status::BadState);
    }
    // The guest stopped running at its last exit, but not before L0 asked
    // for the handover (a halted guest had not been running anyway).
    let paused_at = match (n.last_exit, asked) {
        (Some(e), Some(a)) => e.max(a),
        (Some(e), None) => e,
        (None, a) => a.unwrap_or_else(Instant::now),
    };
    // Its devices stop writing its memory too, until it runs again.
    n.devices.pause();
    let (devices, device_in_flight) = (n.devices.len() as u32, n.devices.in_flight());
    let t = Instant::now();
    let checksum = (s.verify && freeze).then(|| n.checksum_all());
    let hashing = t.elapsed();
    // Where the successor's pages come from: the guest's own pages
    // (zero-copy), or fresh memory filled by copying (copy, precopy).
    let slots = n.slots.clone();
    let mut sources: Vec<(Arc<MemFile>, u64)> = Vec::new();
    let mut copied = 0u64;
    match s.mode {
        Mode::ZeroCopy => {
            for slot in &slots {
                sources.push((slot.file.clone(), slot.file_offset));
            }
        }
        Mode::Copy | Mode::Precopy => {
            let pre = {
                let mut p = s.precopied.lock().unwrap();
                p.iter()
                    .position(|g| g.guest == record.name)
                    .map(|i| p.swap_remove(i))
            };
            let copies: Vec<SlotCopy> = match pre {
                Some(g) if g.slots.len() == slots.len() => {
                    // Stop-and-copy of what was dirtied since the last round.
                    for (i, sc) in g.slots.iter().enumerate() {
                        let bm = n.take_dirty(i).map_err(|_| Status::Internal)?;
                        copied += sc.copy_dirty(&bm);
                    }
                    let _ = n.set_dirty_logging(false);
                    g.slots
                }
                _ => {
                    let mut v = Vec::new();
                    for slot in &slots {
                        let sc =
                            SlotCopy::new(&record.name, slot).map_err(|_| Status::NoResources)?;
                        copied += sc.copy_all();
                        v.push(sc);
                    }
                    v
                }
            };
            for sc in copies {
                sources.push((sc.dst.clone(), 0));
            }
        }
    }
    n.frozen = freeze;
    Ok(Held {
        record,
        aged_handle: n.handle,
        lens: slots.iter().map(|s| (s.l2_gpa, s.len)).collect(),
        sources,
        vcpus: n.vcpu_count(),
        mem_bytes: n.mem_bytes(),
        paused_at,
        checksum,
        hashing,
        copied,
        devices,
        device_in_flight,
    })
}

/// Called when the successor maps granted pages of `guest` into its nested
/// VM `handle` that it built itself (copy modes, or a granted guest no
/// longer in the aged table): binds the guest's record to it and freezes it.
pub fn bind_granted(vm: &HostVm, handle: u32, n: &NestedRef, guest: &str) -> Result<(), Status> {
    let s = successor_session(vm).ok_or(Status::NotPermitted)?;
    let (record, bound) = s
        .with(|h| {
            let hand = h.handing_over();
            h.move_named(guest)
                .filter(|_| hand)
                .map(|m| (m.record.clone(), m.succ.as_ref().map(|x| x.handle)))
        })
        .ok_or(Status::NotPermitted)?;
    if bound.is_some_and(|b| b != handle) {
        return Err(Status::NotPermitted);
    }
    {
        let mut n = n.lock().unwrap();
        if n.name != guest {
            return Err(Status::NotPermitted);
        }
        match &n.record {
            Some(r) if !Arc::ptr_eq(r, &record) => return Err(Status::NotPermitted),
            _ => {}
        }
        n.record = Some(record);
        n.frozen = true;
    }
    s.with(|h| {
        if let Some(m) = h.move_named(guest) {
            if m.succ.is_none() {
                m.succ = Some(SuccSide {
                    handle,
                    adopted: false,
                    slot_l1: Vec::new(),
                    vcpus_confirmed: 0,
                    state_set: false,
                });
            }
        }
    });
    Ok(())
}

/// Successor's VM_CREATE during a zero-copy handover: if `name` was granted,
/// the aged guest hypervisor's nested VM itself (KVM VM, vCPUs, slots)
/// moves to the successor's table under `handle` instead of a new one being
/// built. The VM stays frozen.
pub fn try_adopt(vm: &HostVm, name: &str, handle: u32) -> Option<NestedRef> {
    let s = successor_session(vm)?;
    if s.mode != Mode::ZeroCopy {
        return None;
    }
    let aged_handle = s.with(|h| {
        let hand = h.handing_over();
        h.move_named(name)
            .filter(|m| hand && m.succ.is_none())
            .map(|m| m.aged_handle)
    })?;
    let n = s.aged.nested.lock().unwrap().vms.remove(&aged_handle)?;
    let (slots, vcpus) = {
        let mut g = n.lock().unwrap();
        g.handle = handle;
        (g.slots.len(), g.vcpu_count())
    };
    let recorded = s.with(|h| {
        let hand = h.handing_over();
        match h.move_named(name) {
            Some(m) if hand && m.succ.is_none() && m.slots == slots && m.vcpus == vcpus => {
                m.succ = Some(SuccSide {
                    handle,
                    adopted: true,
                    slot_l1: vec![None; slots],
                    vcpus_confirmed: 0,
                    state_set: false,
                });
                true
            }
            _ => false,
        }
    });
    if !recorded {
        n.lock().unwrap().handle = aged_handle;
        s.aged.nested.lock().unwrap().vms.insert(aged_handle, n);
        return None;
    }
    Some(n)
}

/// True if the successor's nested VM `handle` is an adoption in progress.
pub fn is_adoption(vm: &HostVm, handle: u32) -> bool {
    successor_session(vm).is_some_and(|s| s.with(|h| h.adoption(handle).is_some()))
}

/// Successor's VM_MAP into an adopted VM: confirms one slot. The successor
/// must name, at its own address `l1_gpa`, exactly the pages that slot
/// already maps (the same memfd range), or the call is refused.
/// `backing` is the caller's region kind, memfd and offset of `l1_gpa`;
/// `range` is VM_MAP's `(l1_gpa, l2_gpa, len)`.
pub fn confirm_slot(
    vm: &HostVm,
    handle: u32,
    n: &NestedRef,
    backing: &(RegionKind, Arc<MemFile>, u64),
    range: (u64, u64, u64),
) -> Result<(), Status> {
    let (region, file, offset) = backing;
    let (l1_gpa, l2_gpa, len) = range;
    let s = successor_session(vm).ok_or(Status::NotPermitted)?;
    let guest = s
        .with(|h| h.adoption(handle).map(|m| m.guest.clone()))
        .ok_or(Status::NotPermitted)?;
    match region {
        RegionKind::Grant { guest: g } if *g == guest => {}
        _ => return Err(Status::NotPermitted),
    }
    let i = n.lock().unwrap().find_slot(l2_gpa, len, file, *offset)?;
    s.with(|h| {
        let m = h.adoption(handle).ok_or(Status::NotPermitted)?;
        let side = m.succ.as_mut().ok_or(Status::NotPermitted)?;
        match side.slot_l1.get_mut(i) {
            Some(c @ None) => {
                *c = Some(l1_gpa);
                Ok(())
            }
            Some(Some(_)) => Err(Status::Overlap),
            None => Err(Status::BadArg),
        }
    })
}

/// Successor's VCPU_CREATE on an adopted VM: confirms the next existing
/// vCPU and returns its index (`None` if `handle` is not an adoption).
pub fn confirm_vcpu(vm: &HostVm, handle: u32) -> Option<Result<u32, Status>> {
    let s = successor_session(vm)?;
    s.with(|h| {
        let m = h.adoption(handle)?;
        let vcpus = m.vcpus;
        let side = m.succ.as_mut()?;
        Some(if side.vcpus_confirmed < vcpus {
            side.vcpus_confirmed += 1;
            Ok(side.vcpus_confirmed as u32 - 1)
        } else {
            Err(Status::TooMany)
        })
    })
}

/// Successor's SET_STATE on an adopted VM (`None` if not an adoption): a
/// confirmation only. The nested KVM VM is adopted as it is, with the vCPU
/// state KVM holds; what the channel says about CPU state has no effect.
pub fn confirm_state(vm: &HostVm, handle: u32, idx: u64) -> Option<Result<(), Status>> {
    let s = successor_session(vm)?;
    s.with(|h| {
        let m = h.adoption(handle)?;
        let side = m.succ.as_mut()?;
        Some(if idx < side.vcpus_confirmed as u64 {
            if idx == 0 {
                side.state_set = true;
            }
            Ok(())
        } else {
            Err(Status::NoSuchHandle)
        })
    })
}

/// Successor's SET_STATE of vCPU 0 of a VM it built on granted pages.
pub fn note_state_set(vm: &HostVm, handle: u32) {
    if let Some(s) = successor_session(vm) {
        s.with(|h| {
            if let Some(side) = h.move_of_successor(handle).and_then(|m| m.succ.as_mut()) {
                side.state_set = true;
            }
        });
    }
}

/// Gives every VM the successor adopted back to the aged guest hypervisor,
/// under its old handle. Nothing else needs undoing: adoption changes the
/// VM only at commit. Call with the successor's vCPUs stopped.
pub fn return_adopted(s: &Session, aged: &HostVm, succ: &HostVm) {
    let back: Vec<(u32, u32)> = s.with(|h| {
        h.moves
            .iter_mut()
            .filter_map(|m| match m.succ.take() {
                Some(side) if side.adopted => Some((side.handle, m.aged_handle)),
                other => {
                    m.succ = other;
                    None
                }
            })
            .collect()
    });
    for (succ_handle, aged_handle) in back {
        let v = succ.nested.lock().unwrap().vms.remove(&succ_handle);
        if let Some(v) = v {
            v.lock().unwrap().handle = aged_handle;
            aged.nested.lock().unwrap().vms.insert(aged_handle, v);
        }
    }
}

/// Successor's VM_DESTROY of a VM it is adopting: it goes back to the aged
/// guest hypervisor instead, still frozen (a successor cannot destroy a
/// guest it was only offered). `None` if `handle` is not an adoption.
/// After AgedDone it is refused: L0 is committing what it checked.
pub fn unadopt(vm: &HostVm, handle: u32) -> Option<Result<(), Status>> {
    let s = successor_session(vm)?;
    let aged_handle = s.with(|h| {
        if matches!(h.phase, Phase::AgedDone | Phase::Committing) {
            if h.move_of_successor(handle)
                .is_some_and(|m| m.succ.as_ref().is_some_and(|x| x.adopted))
            {
                return Some(Err(Status::NotPermitted));
            }
            return None;
        }
        let m = h.adoption(handle)?;
        m.succ = None;
        Some(Ok(m.aged_handle))
    })?;
    let aged_handle = match aged_handle {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let v = vm.nested.lock().unwrap().vms.remove(&handle);
    if let Some(v) = v {
        v.lock().unwrap().handle = aged_handle;
        s.aged.nested.lock().unwrap().vms.insert(aged_handle, v);
    }
    Some(Ok(()))
}

/// OP_NOTIFY: rings the peer.
pub fn op_notify(vm: &HostVm) -> HcResult {
    let s = session_of(vm)?;
    let (peer, out) = if s.is_aged(vm) {
        (s.successor().ok_or(Status::BadState)?, MAILBOX_TO_SUCCESSOR)
    } else {
        (s.aged.clone(), MAILBOX_TO_AGED)
    };
    let mut hdr = [0u8; std::mem::size_of::<MailboxHeader>()];
    if vm
        .mem
        .read()
        .unwrap()
        .read(layout::CHANNEL_BASE + out, &mut hdr)
    {
        let h: MailboxHeader = vmbeam_abi::from_bytes(&hdr).unwrap_or_default();
        s.with(|st| st.channel_bytes += h.len as u64);
    }
    peer.doorbell.ring();
    Ok(HcOutcome::Continue)
}

/// True if every live guest of the aged VM `vm` was granted and the
/// successor adopted each grant completely (vCPUs, state, all memory).
/// Takes a snapshot of the moves first, then looks at the nested VMs.
pub fn everyone_adopted(s: &Session, vm: &HostVm, succ: &HostVm) -> bool {
    let moves: Vec<GuestMove> = s.with(|h| h.moves.clone());
    let aged: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    for n in aged {
        let n = n.lock().unwrap();
        if n.record.is_some() && n.state != NestedState::Crashed && !n.frozen {
            return false;
        }
    }
    let table = succ.nested.lock().unwrap().vms.clone();
    moves.iter().all(|m| {
        let Some(side) = &m.succ else { return false };
        let Some(n) = table.get(&side.handle) else {
            return false;
        };
        let n = n.lock().unwrap();
        side.complete(m.vcpus)
            && n.vcpu_count() > 0
            && n.record.as_ref().is_some_and(|r| Arc::ptr_eq(r, &m.record))
            && n.mem_bytes() == m.mem_bytes
    })
}

/// OP_HANDOVER_DONE: checks no guest is left behind, then waits for L0's
/// decision (bounded by the handover's deadline).
pub fn op_done(vm: &HostVm, count: u64) -> HcResult {
    let s = session_of(vm)?;
    let succ = s.aged_op(vm)?;
    if s.with(|h| h.moves.len()) as u64 != count || !everyone_adopted(&s, vm, &succ) {
        return Err(Status::BadState);
    }
    if !s.with(|h| h.aged_done()) {
        return Err(Status::BadState);
    }
    // The aged L1 stays inside this hypercall until L0 decides: revoke it
    // (Committing) or give its guests back (Aborted, e.g. the successor died
    // in the meantime).
    let wait = s.deadline().saturating_duration_since(Instant::now()) + DONE_GRACE;
    let decided = s.wait_phase(
        wait,
        |p| matches!(p, Phase::Committing | Phase::Aborted(_)),
        || stopping(vm).then(|| "stopping".to_string()),
    );
    match decided {
        Ok(Phase::Committing) => Ok(HcOutcome::Retire),
        Err(_) if stopping(vm) => Ok(HcOutcome::Retire),
        _ => Err(Status::Aborted),
    }
}

/// OP_HANDOVER_ABORT: the aged L1 gives up; its guests stay with it.
pub fn op_abort(vm: &HostVm, code: u64) -> HcResult {
    let s = session_of(vm)?;
    if !s.is_aged(vm) {
        return Err(Status::NotPermitted);
    }
    let why = format!("the guest hypervisor aborted the handover (reason code {code})");
    if !s.with(|h| matches!(h.phase, Phase::Ready | Phase::HandingOver) && h.begin_abort(&why)) {
        return Err(Status::BadState);
    }
    // Take back what the successor was adopting before L1 resumes its
    // guests: stop the successor first so it cannot touch them meanwhile.
    give_back(&s, vm);
    s.with(|h| h.aborted());
    Ok(HcOutcome::Continue)
}

/// The rollback's core, once the phase is Aborting: stop the successor,
/// take back what it adopted, let the aged VM run every guest again.
pub fn give_back(s: &Session, aged: &HostVm) {
    if let Some(succ) = s.successor() {
        succ.stop_vcpus();
        return_adopted(s, aged, &succ);
    }
    unfreeze(aged);
}

/// Lets the aged VM run its guests again (after an abort).
pub fn unfreeze(vm: &HostVm) {
    let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    for n in vms {
        n.lock().unwrap().frozen = false;
    }
}

/// Records the first entry of an adopted guest under its new guest hypervisor.
pub fn note_first_entry(vm: &HostVm, n: &NestedVm) {
    if let Some(r) = &n.record {
        let mut info = r.info.lock().unwrap();
        if info.bound_vm == vm.id && info.paused_at.is_some() && info.resumed_at.is_none() {
            info.resumed_at = Some(Instant::now());
            drop(info);
            vm.shared.notify_vm_event();
        }
    }
}

/// Reads the stop flag of a VM (for waits).
pub fn stopping(vm: &HostVm) -> bool {
    vm.stop.load(Ordering::SeqCst)
}
