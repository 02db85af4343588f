//! The batch handover: every nested guest moves on its own, at host speed,
//! with a pause that does not grow with the number of guests.
//!
//! The guest hypervisors only agree; L0 does the moving. The aged L1 offers
//! each guest (OP_OFFER) with the address of its [`GuestLive`] (what it
//! knows that KVM does not: the UART model, an owed read answer, counters)
//! and keeps scheduling. The successor takes each offered guest (OP_ADOPT)
//! and gets a handle for the very same nested KVM VM, which both tables
//! now share, and schedules it at once: its RUN waits in L0 until the guest
//! arrives. Then L0 moves the guests one by one, in the successor's order:
//! when the aged L1 runs the next guest, that run is its last one there
//! (slice capped); at the aged L1's next hypercall the exit has been
//! handled, so L0 copies the guest's `GuestLive` from the aged L1's memory
//! into the successor's, completes an owed read, points the slots at the
//! successor's addresses, rebinds the record and releases the successor's
//! waiting RUN. No page is copied and nothing is frozen while other guests
//! move; each guest's pause is one exit handling plus one wake-up.
//!
//! Until the handover ends, a moved guest can still go back: if the
//! successor dies during Moving, L0 moves each moved guest back to the aged
//! L1 the same way ([`move_back`]), so no guest is lost with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::handover::{GuestLive, UART_LINE};
use vmbeam_abi::hypercall::{HypercallPage, Status, OP_CONSOLE_WRITE};
use vmbeam_abi::NAME_LEN;

use crate::host::memory::RegionKind;
use crate::l1::dispatch::{HcOutcome, HcResult};
use crate::l1::hostvm::HostVm;
use crate::migration::handover::{grant_or_offer, BatchStep, Phase, Session, SuccSide};
use crate::nesting::nested::NestedState;

/// Longest slice a guest gets while guests move: the aged L1 must reach
/// each guest's last run quickly, and the successor must be back for the
/// next arrival quickly.
pub const MOVING_SLICE: Duration = Duration::from_micros(500);
/// How long OP_ADOPT waits for the next offer before answering `Again`.
const ADOPT_WAIT: Duration = Duration::from_millis(20);

fn session_of(vm: &HostVm) -> Option<Arc<Session>> {
    crate::migration::handover::attached(vm)
}

/// The batch session `vm` is the aged side of.
fn aged_batch(vm: &HostVm) -> Option<Arc<Session>> {
    session_of(vm).filter(|s| s.is_aged(vm) && s.with(|h| h.batch))
}

/// The batch session `vm` is the successor in.
fn successor_batch(vm: &HostVm) -> Option<Arc<Session>> {
    session_of(vm).filter(|s| !s.is_aged(vm) && s.with(|h| h.batch))
}

/// True if `[gpa, gpa + size)` is inside `vm`'s own RAM (not its pool,
/// grant window or channel).
fn in_ram(vm: &HostVm, gpa: u64, size: usize) -> bool {
    gpa.is_multiple_of(8)
        && vm
            .mem
            .read()
            .unwrap()
            .find(gpa, size as u64)
            .is_some_and(|r| r.kind == RegionKind::Ram)
}

fn read_live(vm: &HostVm, gpa: u64) -> Option<GuestLive> {
    if gpa == 0 || !in_ram(vm, gpa, std::mem::size_of::<GuestLive>()) {
        return None;
    }
    let mut b = vec![0u8; std::mem::size_of::<GuestLive>()];
    vm.mem.read().unwrap().read(gpa, &mut b).then_some(())?;
    vmbeam_abi::from_bytes(&b)
}

fn write_live(vm: &HostVm, gpa: u64, live: &GuestLive) -> bool {
    in_ram(vm, gpa, std::mem::size_of::<GuestLive>())
        && vm
            .mem
            .read()
            .unwrap()
            .write(gpa, vmbeam_abi::as_bytes(live))
}

/// OP_OFFER: the aged L1 offers nested VM `handle`, live state at `live`.
pub fn op_offer(vm: &HostVm, handle: u64, live: u64) -> HcResult {
    let s = aged_batch(vm).ok_or(Status::NotPermitted)?;
    if !s.with(|h| h.handing_over() && !h.offers_closed) {
        return Err(Status::BadState);
    }
    if !in_ram(vm, live, std::mem::size_of::<GuestLive>()) {
        return Err(Status::OutOfRange);
    }
    let succ = s.successor().ok_or(Status::BadState)?;
    grant_or_offer(&s, vm, &succ, handle, Some(live))?;
    Ok(HcOutcome::Continue)
}

/// OP_OFFER_END: the aged L1 offered `count` guests, which must be every
/// live guest it has.
pub fn op_offer_end(vm: &HostVm, count: u64) -> HcResult {
    let s = aged_batch(vm).ok_or(Status::NotPermitted)?;
    let offered: Vec<Arc<crate::nesting::nested::GuestRecord>> = s.with(|h| {
        if !h.handing_over() || h.offers_closed {
            return Vec::new();
        }
        h.moves.iter().map(|m| m.record.clone()).collect()
    });
    if offered.len() as u64 != count || count == 0 {
        return Err(Status::BadState);
    }
    let table: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    for n in table {
        let n = n.lock().unwrap();
        if let Some(r) = &n.record {
            if n.state != NestedState::Crashed && !offered.iter().any(|o| Arc::ptr_eq(o, r)) {
                return Err(Status::BadState);
            }
        }
    }
    s.with(|h| h.offers_closed = true);
    Ok(HcOutcome::Continue)
}

/// Closes the offers on behalf of an aged L1 that died: L0 offers every
/// live guest it had not offered, with no live state (defaults).
pub fn offer_rest(s: &Session) -> Result<(), String> {
    let aged = &s.aged;
    let succ = s.successor().ok_or("no successor")?;
    let handles: Vec<u32> = aged.nested.lock().unwrap().vms.keys().copied().collect();
    for h in handles {
        let Some(n) = aged.nested_vm(h as u64) else {
            continue;
        };
        let (rec, live) = {
            let n = n.lock().unwrap();
            (
                n.record.clone(),
                n.state != NestedState::Crashed && n.vcpu_count() > 0,
            )
        };
        let Some(rec) = rec else { continue };
        if !live || s.with(|st| st.moves.iter().any(|m| Arc::ptr_eq(&m.record, &rec))) {
            continue;
        }
        grant_or_offer(s, aged, &succ, h as u64, Some(0))
            .map_err(|e| format!("offer of {}: {e:?}", rec.name))?;
    }
    s.with(|h| h.offers_closed = true);
    Ok(())
}

/// OP_ADOPT: the successor takes the next offered guest; L0 writes its
/// live state at `live` and the description into the page.
pub fn op_adopt(vm: &HostVm, live: u64, p: &mut HypercallPage) -> HcResult {
    let s = successor_batch(vm).ok_or(Status::NotPermitted)?;
    if !in_ram(vm, live, std::mem::size_of::<GuestLive>()) {
        return Err(Status::OutOfRange);
    }
    let pick = |s: &Session| {
        s.with(|h| {
            match h.phase {
                Phase::Ready | Phase::Booting => return Ok(None),
                Phase::HandingOver => {}
                _ => return Err(Status::BadState),
            }
            for (i, m) in h.moves.iter_mut().enumerate() {
                if let Some(b) = m.batch.as_mut().filter(|b| b.step == BatchStep::Offered) {
                    b.step = BatchStep::Taking;
                    return Ok(Some(i));
                }
            }
            let busy = h.moves.iter().any(|m| {
                m.batch
                    .as_ref()
                    .is_some_and(|b| b.step == BatchStep::Taking)
            });
            if h.offers_closed && !busy {
                Err(Status::NoSuchHandle)
            } else {
                Ok(None)
            }
        })
    };
    let i = match pick(&s)? {
        Some(i) => i,
        None => {
            s.wait_change(ADOPT_WAIT);
            match pick(&s)? {
                Some(i) => i,
                None => return Err(Status::Again),
            }
        }
    };
    let (nvm, live_aged, name, mem_bytes, ranges) = s.with(|h| {
        let m = &h.moves[i];
        let b = m.batch.as_ref().expect("batch move");
        (
            b.vm.clone(),
            b.live_aged,
            m.guest.clone(),
            m.mem_bytes,
            m.ranges.clone(),
        )
    });
    // The same nested VM, under a new handle of the successor's.
    let handle = {
        let mut t = vm.nested.lock().unwrap();
        if t.vms.len() >= vmbeam_abi::boot::MAX_NESTED {
            drop(t);
            s.with(|h| {
                if let Some(b) = h.moves[i].batch.as_mut() {
                    b.step = BatchStep::Offered;
                }
            });
            return Err(Status::TooMany);
        }
        t.next_handle = t.next_handle.wrapping_add(1).max(1);
        while t.vms.contains_key(&t.next_handle) {
            t.next_handle = t.next_handle.wrapping_add(1).max(1);
        }
        let h = t.next_handle;
        t.vms.insert(h, nvm);
        h
    };
    let mut snapshot = read_live(&s.aged, live_aged).unwrap_or_default();
    snapshot.pending_valid = 0;
    snapshot.uart.line_len = snapshot.uart.line_len.min(UART_LINE as u32);
    write_live(vm, live, &snapshot);
    s.with(|h| {
        let m = &mut h.moves[i];
        m.succ = Some(SuccSide {
            handle,
            adopted: true,
            slot_l1: m.ranges.iter().map(|r| Some(r.succ_gpa)).collect(),
            vcpus_confirmed: m.vcpus,
            state_set: true,
        });
        if let Some(b) = m.batch.as_mut() {
            b.live_succ = live;
            b.step = BatchStep::Taken;
        }
    });
    p.ret[0] = handle as u64;
    p.ret[1] = mem_bytes;
    p.ret[2] = ranges.len() as u64;
    p.data[..NAME_LEN].copy_from_slice(&vmbeam_abi::name_to_bytes(&name));
    for (k, r) in ranges.iter().enumerate() {
        let b = vmbeam_abi::as_bytes(r);
        let at = NAME_LEN + k * b.len();
        p.data[at..at + b.len()].copy_from_slice(b);
    }
    Ok(HcOutcome::Continue)
}

/// Called before each hypercall of the aged L1 (but CONSOLE_WRITE, which
/// is part of handling an exit): if a guest had its last run, its exit has
/// now been handled, so it moves; a halted head moves at once.
pub fn aged_hook(vm: &HostVm, op: u32) {
    if op == OP_CONSOLE_WRITE {
        return;
    }
    let Some(s) = aged_batch(vm) else { return };
    let ready = s.with(|h| {
        let i = h.head;
        let m = h.head_move()?;
        let b = m.batch.as_ref()?;
        match b.step {
            BatchStep::LastRun => Some((i, true)),
            BatchStep::Taken => Some((i, false)),
            _ => None,
        }
    });
    let Some((i, last_run)) = ready else { return };
    if !last_run {
        // A guest the aged L1 will not run (halted, or never started)
        // moves without a last run.
        let vmx = s.with(|h| h.moves[i].batch.as_ref().map(|b| b.vm.clone()));
        let idle = vmx.is_some_and(|v| {
            let n = v.lock().unwrap();
            matches!(n.state, NestedState::Halted | NestedState::Created)
        });
        if !idle {
            return;
        }
    }
    if let Err(e) = complete_move(&s, i) {
        fail_move(&s, i, &e);
    }
}

/// What RUN of `handle` by `vm` must do in a batch handover.
pub enum Gate {
    /// Not part of a batch move: run as usual.
    Free,
    /// Run, with the slice capped.
    Capped(Duration),
}

/// The batch part of RUN: the aged L1's RUN of a moved guest is `Moved`,
/// and its run of the next guest to move is that guest's last one there;
/// the successor's RUN of a guest not yet arrived waits for it (bounded by
/// the handover's deadline).
pub fn run_gate(vm: &HostVm, handle: u32) -> Result<Gate, Status> {
    let Some(s) = session_of(vm) else {
        return Ok(Gate::Free);
    };
    if !s.with(|h| h.batch) {
        return Ok(Gate::Free);
    }
    if s.is_aged(vm) {
        return s.with(|h| {
            // While guests are offered and moved, every run is short: the
            // aged L1 must see the request and reach each guest quickly.
            let capped = matches!(h.phase, Phase::Moving | Phase::HandingOver);
            let moving = h.phase == Phase::Moving;
            let head = h.head;
            let gate = if capped {
                Gate::Capped(MOVING_SLICE)
            } else {
                Gate::Free
            };
            let Some((i, m)) = h
                .moves
                .iter_mut()
                .enumerate()
                .find(|(_, m)| m.batch.is_some() && m.aged_handle == handle)
            else {
                return Ok(gate);
            };
            let b = m.batch.as_mut().expect("batch move");
            match b.step {
                BatchStep::Moved | BatchStep::Switching => Err(Status::Moved),
                BatchStep::Taken if moving && i == head => {
                    b.step = BatchStep::LastRun;
                    Ok(gate)
                }
                _ => Ok(gate),
            }
        });
    }
    // Successor: wait until the guest is here.
    let arrived = |h: &crate::migration::handover::Handover| {
        h.moves
            .iter()
            .find(|m| m.batch.is_some() && m.succ.as_ref().is_some_and(|x| x.handle == handle))
            .and_then(|m| m.batch.as_ref())
            .map(|b| (b.step, h.phase == Phase::Moving))
    };
    let deadline = s.deadline();
    loop {
        let mut step = None;
        s.wait_for(Duration::from_millis(20), |h| {
            step = arrived(h);
            !matches!(
                step,
                Some((
                    BatchStep::Taken
                        | BatchStep::LastRun
                        | BatchStep::Taking
                        | BatchStep::Switching,
                    _
                ))
            )
        });
        match step {
            None => return Ok(Gate::Free),
            Some((BatchStep::Moved, true)) => return Ok(Gate::Capped(MOVING_SLICE)),
            Some((BatchStep::Moved, false)) => return Ok(Gate::Free),
            Some((BatchStep::Failed, _)) => return Err(Status::NoSuchHandle),
            Some(_) => {}
        }
        if Instant::now() >= deadline || crate::migration::handover::stopping(vm) {
            return Err(Status::BadState);
        }
    }
}

/// Moves guest `i` of the batch to the successor, at host speed.
/// Invariant after: the guest's record is bound to the successor, the
/// successor's `GuestLive` holds the aged L1's, the slots name the
/// successor's addresses, the aged table no longer has it; the successor's
/// RUN of it proceeds. Nothing of the guest's memory is touched.
pub fn complete_move(s: &Session, i: usize) -> Result<(), String> {
    let succ = s.successor().ok_or("no successor")?;
    // Claim the move: exactly one thread switches a guest over, and only
    // while moving (a rollback that began stops every further move).
    let claimed = s.with(|h| {
        if h.phase != Phase::Moving {
            return None;
        }
        let b = h.moves.get_mut(i)?.batch.as_mut()?;
        if matches!(b.step, BatchStep::Taken | BatchStep::LastRun) {
            b.step = BatchStep::Switching;
            Some(())
        } else {
            None
        }
    });
    if claimed.is_none() {
        return Ok(());
    }
    let (nvm, live_aged, live_succ, aged_handle, side, record, ranges) = s
        .with(|h| {
            let m = &h.moves[i];
            let b = m.batch.as_ref()?;
            Some((
                b.vm.clone(),
                b.live_aged,
                b.live_succ,
                m.aged_handle,
                m.succ.clone()?,
                m.record.clone(),
                m.ranges.clone(),
            ))
        })
        .ok_or("not taken")?;
    let mut live = read_live(&s.aged, live_aged).unwrap_or_default();
    let asked = s.with(|h| h.asked_at);
    let paused_at;
    let aged_l1;
    {
        // The switch-over itself, under the VM's own lock. Everything L0
        // keeps for the guest lives in this `NestedVm` (KVM VM, vCPUs,
        // slots, its virtio `DeviceSet`) and moves with it as it is; L0-side
        // state kept anywhere else would be handed over here.
        let mut n = nvm.lock().unwrap();
        if n.state == NestedState::Crashed {
            return Err(format!("{} crashed before it could move", record.name));
        }
        if live.pending_valid != 0 {
            n.answer_pending(live.pending_in);
        }
        aged_l1 = n.slots.iter().map(|x| x.l1_gpa).collect::<Vec<u64>>();
        for (k, r) in ranges.iter().enumerate() {
            n.set_slot_l1(k, r.succ_gpa);
        }
        paused_at = match (n.last_exit, asked) {
            (Some(e), Some(a)) => e.max(a),
            (Some(e), None) => e,
            (None, a) => a.unwrap_or_else(Instant::now),
        };
        if n.state == NestedState::Halted {
            // The successor schedules it again; it halts again at once if
            // nothing woke it.
            n.state = NestedState::Running;
        }
        n.handle = side.handle;
        let mut info = record.info.lock().unwrap();
        info.bound_vm = succ.id;
        info.handle = side.handle;
        info.host_vm = succ.spec.line.clone();
        info.generation = succ.spec.generation;
        info.moves += 1;
        info.paused_at = Some(paused_at);
        info.resumed_at = None;
    }
    live.pending_valid = 0;
    live.moves += 1;
    live.uart.line_len = live.uart.line_len.min(UART_LINE as u32);
    if !write_live(&succ, live_succ, &live) {
        // The successor's own loss (it named an address it cannot have):
        // the guest moves anyway, with the successor's UART model unset.
        succ.console().write_line(
            format!("vmbeam: cannot write the live state of {}", record.name).as_bytes(),
        );
    }
    s.aged.nested.lock().unwrap().vms.remove(&aged_handle);
    s.with(|h| {
        let m = &mut h.moves[i];
        m.paused_at = paused_at;
        if let Some(b) = m.batch.as_mut() {
            b.step = BatchStep::Moved;
            b.moved_at = Some(Instant::now());
            b.aged_l1 = aged_l1;
        }
        if h.head == i {
            h.advance();
        }
    });
    Ok(())
}

/// Gives moved guest `i` back to the aged L1 after the successor died
/// during Moving: the reverse of [`complete_move`], at host speed. Callers
/// have begun the rollback (no move is claimed any more) and stopped the
/// successor's vCPUs; its RAM (and the guest's `GuestLive` there, at the
/// address OP_ADOPT named) is still mapped. Invariant after: the record is
/// bound to the aged L1 under its old handle, the aged L1's `GuestLive`
/// holds the successor's (an owed read answered, `moves` as before), the
/// slots name the aged L1's addresses, the nested VM is in the aged table
/// and no longer in the successor's, and the move is `Failed`, so the aged
/// L1's RUN of it proceeds. Nothing of the guest's memory is touched.
pub fn move_back(s: &Session, i: usize) -> Result<(), String> {
    let succ = s.successor().ok_or("no successor")?;
    let (nvm, live_aged, live_succ, aged_handle, side, record, aged_l1) = s
        .with(|h| {
            let m = h.moves.get(i)?;
            let b = m.batch.as_ref()?;
            (b.step == BatchStep::Moved).then_some(())?;
            Some((
                b.vm.clone(),
                b.live_aged,
                b.live_succ,
                m.aged_handle,
                m.succ.clone(),
                m.record.clone(),
                b.aged_l1.clone(),
            ))
        })
        .ok_or("not moved")?;
    // Unreadable (the successor named an address it cannot have, or its
    // memory is gone): the guest goes back with default live state, as
    // when L0 offers for a dead aged L1.
    let mut live = read_live(&succ, live_succ).unwrap_or_default();
    {
        let mut n = nvm.lock().unwrap();
        if n.state == NestedState::Crashed {
            return Err(format!("{} crashed under the successor", record.name));
        }
        if live.pending_valid != 0 {
            n.answer_pending(live.pending_in);
        }
        for (k, l1) in aged_l1.iter().enumerate() {
            n.set_slot_l1(k, *l1);
        }
        n.handle = aged_handle;
        let mut info = record.info.lock().unwrap();
        info.bound_vm = s.aged.id;
        info.handle = aged_handle;
        info.host_vm = s.aged.spec.line.clone();
        info.generation = s.aged.spec.generation;
        info.moves = info.moves.saturating_sub(1);
        info.paused_at = None;
        info.resumed_at = None;
    }
    live.pending_valid = 0;
    live.moves = live.moves.saturating_sub(1);
    live.uart.line_len = live.uart.line_len.min(UART_LINE as u32);
    if live_aged != 0 && !write_live(&s.aged, live_aged, &live) {
        s.aged.console().write_line(
            format!(
                "vmbeam: cannot write back the live state of {}",
                record.name
            )
            .as_bytes(),
        );
    }
    if let Some(side) = side {
        succ.nested.lock().unwrap().vms.remove(&side.handle);
    }
    s.aged.nested.lock().unwrap().vms.insert(aged_handle, nvm);
    s.with(|h| {
        let m = &mut h.moves[i];
        m.succ = None;
        if let Some(b) = m.batch.as_mut() {
            b.step = BatchStep::Failed;
        }
    });
    Ok(())
}

/// Guest `i`'s move failed: it stays with the aged L1 (its handle there
/// is untouched and it is runnable), and the successor loses its handle.
pub fn fail_move(s: &Session, i: usize, why: &str) {
    let side = s.with(|h| {
        let m = &mut h.moves[i];
        if let Some(b) = m.batch.as_mut() {
            b.step = BatchStep::Failed;
        }
        if h.head == i {
            h.advance();
        }
        h.moves[i].succ.take()
    });
    if let (Some(side), Some(succ)) = (side, s.successor()) {
        succ.nested.lock().unwrap().vms.remove(&side.handle);
    }
    s.aged
        .console()
        .write_line(format!("vmbeam: a guest could not move and stays here: {why}").as_bytes());
}
