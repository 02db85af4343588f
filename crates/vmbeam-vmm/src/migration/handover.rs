//! L0's side of a zero-copy handover: the session that ties an aged host VM
//! to its successor, and the hypercalls the two guest hypervisors use in it.
//!
//! L0 alone decides who the successor is. A GRANT maps the very host pages
//! behind a nested guest into the successor (a second mapping of the same
//! memfd range: nothing is copied) and freezes the guest under the aged L1.
//! The successor may build a nested VM on granted pages but cannot run it
//! until L0 commits, which happens only after the aged VM is revoked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::handover::{MailboxHeader, MAILBOX_TO_AGED, MAILBOX_TO_SUCCESSOR};
use vmbeam_abi::hypercall::{GrantRange, HypercallPage, Status, MAX_GRANT_RANGES};
use vmbeam_abi::layout;

use crate::host::hostvm::HostVm;
use crate::host::memory::{MemFile, Region, RegionKind};
use crate::migration::copy::{GuestCopy, SlotCopy};
use crate::migration::rejuvenate::Mode;
use crate::nesting::hypercall::{HcOutcome, HcResult};
use crate::nesting::nested::{GuestRecord, NestedRef, NestedState, NestedVm};
use crate::sync::{Rank, RankedCondvar, RankedMutex};

/// Phase of a handover session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Successor booting.
    Booting,
    /// Successor said it is ready.
    Ready,
    /// Aged L1 is moving guests.
    HandingOver,
    /// Aged L1 finished and waits in HANDOVER_DONE for L0's decision.
    AgedDone,
    /// L0 decided to revoke the aged VM and commit the successor.
    Committing,
    /// Given up; the message says why.
    Aborted(String),
}

/// One granted nested guest.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Guest name.
    pub guest: String,
    /// Identity.
    pub record: Arc<GuestRecord>,
    /// Handle under the aged L1.
    pub aged_handle: u32,
    /// Successor-side ranges.
    pub ranges: Vec<GrantRange>,
    /// Bytes.
    pub mem_bytes: u64,
    /// L0 checksum at grant time (paused).
    pub checksum_before: Option<u64>,
    /// Last exit under the aged L1.
    pub paused_at: Instant,
}

/// Mutable state of a session.
#[derive(Debug)]
pub struct SessionState {
    /// Phase.
    pub phase: Phase,
    /// Grants so far.
    pub grants: Vec<Grant>,
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
}

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
    /// Pre-copied destinations, by guest (precopy mode).
    pub precopied: RankedMutex<Vec<GuestCopy>>,
    /// State.
    pub st: RankedMutex<SessionState>,
    /// Signalled on every phase change.
    pub cv: RankedCondvar,
}

impl Session {
    /// A new session for `aged`.
    pub fn new(aged: Arc<HostVm>, channel: Arc<MemFile>, verify: bool, mode: Mode) -> Arc<Session> {
        Arc::new(Session {
            aged,
            successor: RankedMutex::new(Rank::SessionSuccessor, None),
            channel,
            verify,
            mode,
            precopied: RankedMutex::new(Rank::SessionCopies, Vec::new()),
            st: RankedMutex::new(
                Rank::SessionState,
                SessionState {
                    phase: Phase::Booting,
                    grants: Vec::new(),
                    next_grant_gpa: layout::GRANT_BASE,
                    channel_bytes: 0,
                    bytes_copied: 0,
                    verify_time: Duration::ZERO,
                    asked_at: None,
                },
            ),
            cv: RankedCondvar::new(),
        })
    }

    /// Sets the phase and wakes waiters.
    pub fn set_phase(&self, p: Phase) {
        let mut st = self.st.lock().unwrap();
        if p == Phase::HandingOver {
            st.asked_at = Some(Instant::now());
        }
        st.phase = p;
        drop(st);
        self.cv.notify_all();
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.st.lock().unwrap().phase.clone()
    }

    /// Waits until the phase satisfies `pred`, `timeout` passes, or `tick`
    /// (called every 20 ms) returns an error message.
    pub fn wait_phase(
        &self,
        timeout: Duration,
        pred: impl Fn(&Phase) -> bool,
        tick: impl Fn() -> Option<String>,
    ) -> Result<Phase, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.st.lock().unwrap();
        loop {
            if pred(&g.phase) {
                return Ok(g.phase.clone());
            }
            drop(g);
            if let Some(e) = tick() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {:?}", timeout));
            }
            g = self.st.lock().unwrap();
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    fn is_aged(&self, vm: &HostVm) -> bool {
        self.aged.id == vm.id
    }

    /// For the aged side's ops: the session must be handing over and the
    /// caller must be the aged VM; returns the successor.
    fn aged_op(&self, vm: &HostVm) -> Result<Arc<HostVm>, Status> {
        if !self.is_aged(vm) {
            return Err(Status::NotPermitted);
        }
        if self.phase() != Phase::HandingOver {
            return Err(Status::BadState);
        }
        self.successor
            .lock()
            .unwrap()
            .clone()
            .ok_or(Status::BadState)
    }
}

fn session_of(vm: &HostVm) -> Result<Arc<Session>, Status> {
    vm.session
        .lock()
        .unwrap()
        .clone()
        .ok_or(Status::NotPermitted)
}

/// True if `vm` is the successor of a running handover.
pub fn is_successor_in_handover(vm: &HostVm) -> bool {
    match vm.session.lock().unwrap().as_ref() {
        Some(s) => !s.is_aged(vm),
        None => false,
    }
}

/// OP_HANDOVER_READY.
pub fn op_ready(vm: &HostVm) -> HcResult {
    let s = session_of(vm)?;
    if s.is_aged(vm) {
        return Err(Status::NotPermitted);
    }
    let mut st = s.st.lock().unwrap();
    if st.phase != Phase::Booting {
        return Err(Status::BadState);
    }
    st.phase = Phase::Ready;
    s.cv.notify_all();
    Ok(HcOutcome::Continue)
}

/// OP_GRANT: maps the nested guest's pages into the successor.
pub fn op_grant(vm: &HostVm, handle: u64, p: &mut HypercallPage) -> HcResult {
    let mut froze = false;
    let r = grant_inner(vm, handle, p, &mut froze);
    if r.is_err() && froze {
        // A refused grant leaves the guest with the aged L1, runnable.
        if let Some(n) = vm.nested_vm(handle) {
            n.lock().unwrap().frozen = false;
        }
    }
    r
}

fn grant_inner(vm: &HostVm, handle: u64, p: &mut HypercallPage, froze: &mut bool) -> HcResult {
    let s = session_of(vm)?;
    let succ = s.aged_op(vm)?;
    let ranges = grant_guest(&s, vm, &succ, handle, froze)?;
    for (i, r) in ranges.iter().enumerate() {
        let b = vmbeam_abi::as_bytes(r);
        p.data[i * b.len()..(i + 1) * b.len()].copy_from_slice(b);
    }
    p.ret[0] = ranges.len() as u64;
    Ok(HcOutcome::Continue)
}

/// Grants nested VM `handle` of the aged VM `vm` to the successor: pauses
/// it, maps (or copies) its pages into the successor's grant window and
/// records the grant. Returns the successor-side ranges.
pub(crate) fn grant_guest(
    s: &Session,
    vm: &HostVm,
    succ: &HostVm,
    handle: u64,
    froze: &mut bool,
) -> Result<Vec<GrantRange>, Status> {
    let n = vm.nested_vm(handle).ok_or(Status::NoSuchHandle)?;
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
    let asked = s.st.lock().unwrap().asked_at;
    let paused_at = match (n.last_exit, asked) {
        (Some(e), Some(a)) => e.max(a),
        (Some(e), None) => e,
        (None, a) => a.unwrap_or_else(Instant::now),
    };
    n.frozen = true;
    *froze = true;
    let checksum_before = if s.verify {
        let t = Instant::now();
        let c = n.checksum_all();
        s.st.lock().unwrap().verify_time += t.elapsed();
        Some(c)
    } else {
        None
    };
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
    let mut ranges = Vec::new();
    let mut st = s.st.lock().unwrap();
    st.bytes_copied += copied;
    for (slot, (file, offset)) in slots.iter().zip(sources) {
        let gpa = st.next_grant_gpa;
        if gpa + slot.len > layout::GRANT_BASE + layout::GRANT_SIZE {
            n.frozen = false;
            return Err(Status::NoResources);
        }
        let region = Region::map(
            &file,
            offset,
            slot.len,
            gpa,
            RegionKind::Grant {
                guest: record.name.clone(),
            },
            succ.alloc_slot(),
        )
        .map_err(|_| Status::NoResources)?;
        // The successor's own KVM slot for these pages is installed right
        // after commit: its guest hypervisor names them (VM_MAP) during the
        // handover but never touches them, and a slot costs time in
        // proportion to its size.
        succ.add_region_deferred(region);
        st.next_grant_gpa += slot.len;
        ranges.push(GrantRange {
            succ_gpa: gpa,
            l2_gpa: slot.l2_gpa,
            len: slot.len,
        });
    }
    st.grants.push(Grant {
        guest: record.name.clone(),
        record,
        aged_handle: n.handle,
        mem_bytes: n.mem_bytes(),
        ranges: ranges.clone(),
        checksum_before,
        paused_at,
    });
    Ok(ranges)
}

/// Called when the successor maps granted pages into a nested VM.
pub fn bind_adopted(vm: &HostVm, n: &mut NestedVm, guest: &str) -> Result<(), Status> {
    let s = session_of(vm)?;
    if s.is_aged(vm) || s.phase() != Phase::HandingOver {
        return Err(Status::NotPermitted);
    }
    if n.name != guest {
        return Err(Status::NotPermitted);
    }
    let st = s.st.lock().unwrap();
    let g = st
        .grants
        .iter()
        .find(|g| g.guest == guest)
        .ok_or(Status::NotPermitted)?;
    match &n.record {
        Some(r) if !Arc::ptr_eq(r, &g.record) => return Err(Status::NotPermitted),
        _ => {}
    }
    n.record = Some(g.record.clone());
    n.frozen = true;
    Ok(())
}

/// Successor's VM_CREATE during a zero-copy handover: if `name` was granted,
/// the aged guest hypervisor's nested VM itself (KVM VM, vCPUs, slots) moves
/// to the successor's table under `handle` instead of a new one being built.
pub fn try_adopt(vm: &HostVm, name: &str, handle: u32) -> Option<NestedRef> {
    let s = session_of(vm).ok()?;
    if s.is_aged(vm) || s.mode != Mode::ZeroCopy || s.phase() != Phase::HandingOver {
        return None;
    }
    let aged_handle = {
        let st = s.st.lock().unwrap();
        st.grants.iter().find(|g| g.guest == name)?.aged_handle
    };
    let n = s.aged.nested.lock().unwrap().vms.remove(&aged_handle)?;
    n.lock().unwrap().begin_adoption(handle);
    Some(n)
}

/// Gives every VM the successor adopted back to the aged guest hypervisor.
pub fn return_adopted(aged: &HostVm, succ: &HostVm) {
    let mut back = Vec::new();
    {
        let mut t = succ.nested.lock().unwrap();
        let handles: Vec<u32> = t
            .vms
            .iter()
            .filter(|(_, v)| v.lock().unwrap().adopted_from.is_some())
            .map(|(h, _)| *h)
            .collect();
        for h in handles {
            if let Some(v) = t.vms.remove(&h) {
                back.push(v);
            }
        }
    }
    let mut t = aged.nested.lock().unwrap();
    for v in back {
        let h = {
            let mut n = v.lock().unwrap();
            n.cancel_adoption();
            n.handle
        };
        t.vms.insert(h, v);
    }
}

/// Successor's VM_DESTROY of a VM it was adopting: it goes back to the aged
/// guest hypervisor instead (a successor cannot destroy a guest it was
/// only offered).
pub fn unadopt(vm: &HostVm, n: NestedRef) -> Result<(), Status> {
    let s = session_of(vm)?;
    let h = {
        let mut g = n.lock().unwrap();
        g.cancel_adoption();
        g.frozen = true; // still granted: stays paused until the handover ends
        g.handle
    };
    s.aged.nested.lock().unwrap().vms.insert(h, n);
    Ok(())
}

/// OP_NOTIFY: rings the peer.
pub fn op_notify(vm: &HostVm) -> HcResult {
    let s = session_of(vm)?;
    let (peer, out) = if s.is_aged(vm) {
        (
            s.successor
                .lock()
                .unwrap()
                .clone()
                .ok_or(Status::BadState)?,
            MAILBOX_TO_SUCCESSOR,
        )
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
        s.st.lock().unwrap().channel_bytes += h.len as u64;
    }
    peer.doorbell.ring();
    Ok(HcOutcome::Continue)
}

/// True if every live guest of the aged VM `vm` was granted and the
/// successor adopted each grant completely (vCPUs, state, all memory).
pub fn everyone_adopted(s: &Session, vm: &HostVm, succ: &HostVm) -> bool {
    for n in vm.nested.lock().unwrap().vms.values() {
        let n = n.lock().unwrap();
        if n.record.is_some() && n.state != NestedState::Crashed && !n.frozen {
            return false;
        }
    }
    // The grants are read first: the session state ranks after the tables.
    let grants: Vec<(Arc<GuestRecord>, u64)> =
        s.st.lock()
            .unwrap()
            .grants
            .iter()
            .map(|g| (g.record.clone(), g.mem_bytes))
            .collect();
    let succ_table = succ.nested.lock().unwrap();
    grants.iter().all(|(record, mem_bytes)| {
        succ_table.vms.values().any(|n| {
            let n = n.lock().unwrap();
            (n.adopted_from.is_none() || n.adoption_complete())
                && n.state_set
                && n.vcpu_count() > 0
                && n.record.as_ref().is_some_and(|r| Arc::ptr_eq(r, record))
                && n.mem_bytes() == *mem_bytes
        })
    })
}

/// OP_HANDOVER_DONE: checks no guest is left behind, then retires the caller.
pub fn op_done(vm: &HostVm, count: u64) -> HcResult {
    let s = session_of(vm)?;
    let succ = s.aged_op(vm)?;
    if s.st.lock().unwrap().grants.len() as u64 != count || !everyone_adopted(&s, vm, &succ) {
        return Err(Status::BadState);
    }
    s.set_phase(Phase::AgedDone);
    // The aged L1 stays inside this hypercall until L0 decides: revoke it
    // (Committing) or give its guests back (Aborted, e.g. the successor died
    // in the meantime).
    let decided = s.wait_phase(
        Duration::from_secs(120),
        |p| matches!(p, Phase::Committing | Phase::Aborted(_)),
        || stopping(vm).then(|| "stopping".to_string()),
    );
    match decided {
        Ok(Phase::Committing) => Ok(HcOutcome::Retire),
        Err(_) if stopping(vm) => Ok(HcOutcome::Retire),
        _ => {
            unfreeze(vm);
            Err(Status::Aborted)
        }
    }
}

/// OP_HANDOVER_ABORT: the aged L1 gives up; its guests stay with it.
pub fn op_abort(vm: &HostVm, code: u64) -> HcResult {
    let s = session_of(vm)?;
    if !s.is_aged(vm) {
        return Err(Status::NotPermitted);
    }
    match s.phase() {
        Phase::HandingOver | Phase::Ready => {}
        _ => return Err(Status::BadState),
    }
    // Take back what the successor was adopting before L1 resumes its
    // guests: stop the successor first so it cannot touch them meanwhile.
    if let Some(succ) = s.successor.lock().unwrap().clone() {
        succ.stop_vcpus();
        return_adopted(vm, &succ);
    }
    unfreeze(vm);
    s.set_phase(Phase::Aborted(format!(
        "the guest hypervisor aborted the handover (reason code {code})"
    )));
    Ok(HcOutcome::Continue)
}

/// Lets the aged VM run its guests again (after an abort).
pub fn unfreeze(vm: &HostVm) {
    for n in vm.nested.lock().unwrap().vms.values() {
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
