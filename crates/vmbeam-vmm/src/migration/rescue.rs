//! Finishing a handover whose aged guest hypervisor died half-way.
//!
//! The aged L1 is the part that ages and breaks, so it may crash while it
//! hands its guests over. Its guests cannot go back to it, but L0 holds
//! everything needed to finish the job itself: the nested VMs (vCPU state
//! in KVM, memory in L0's files) and the channel. L0 takes over the aged
//! side of the protocol where the dead L1 left it: it grants the guests not
//! yet granted, offers each one to the successor with a GUEST message,
//! waits for its ACCEPT, and ends with END. The successor cannot tell the
//! difference. What is lost is only what lived in the dead L1's own memory
//! and is not architectural: a nested guest's partly written console line
//! (its UART state is reset).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::handover::{
    kind, GuestMsg, MailboxHeader, MsgHeader, UartState, MAILBOX_PAYLOAD, MAILBOX_TO_AGED,
    MAILBOX_TO_SUCCESSOR, MAX_GUEST_RANGES, MAX_NESTED_VCPUS, MSG_MAGIC,
};
use vmbeam_abi::hypercall::GrantRange;
use vmbeam_abi::layout::CHANNEL_BASE;
use vmbeam_abi::state::VcpuState;

use crate::l1::hostvm::HostVm;
use crate::migration::handover::{grant_guest, Session};
use crate::nesting::nested::NestedState;

/// How long L0 waits for each answer of the successor.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn read_at<T: vmbeam_abi::Pod>(vm: &HostVm, gpa: u64) -> Option<T> {
    let mut b = vec![0u8; std::mem::size_of::<T>()];
    vm.mem.read().unwrap().read(gpa, &mut b).then_some(())?;
    vmbeam_abi::from_bytes(&b)
}

fn mailbox(vm: &HostVm, off: u64) -> Option<(MailboxHeader, MsgHeader)> {
    let h: MailboxHeader = read_at(vm, CHANNEL_BASE + off)?;
    let m: MsgHeader = read_at(vm, CHANNEL_BASE + off + MAILBOX_PAYLOAD)?;
    Some((h, m))
}

fn send(aged: &HostVm, succ: &HostVm, msg: &[u8]) -> Result<(), String> {
    let base = CHANNEL_BASE + MAILBOX_TO_SUCCESSOR;
    let (h, _) = mailbox(aged, MAILBOX_TO_SUCCESSOR).ok_or("channel unreadable")?;
    let mem = aged.mem.read().unwrap();
    if !mem.write(base + MAILBOX_PAYLOAD, msg)
        || !mem.write(base + 4, &(msg.len() as u32).to_le_bytes())
    {
        return Err("channel not writable".into());
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write(base, &h.seq.wrapping_add(1).to_le_bytes());
    drop(mem);
    succ.doorbell.ring();
    Ok(())
}

/// Waits for the successor's next reply (a new sequence number).
fn reply(aged: &HostVm, succ: &HostVm, seen: u32) -> Result<MsgHeader, String> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let (h, m) = mailbox(aged, MAILBOX_TO_AGED).ok_or("channel unreadable")?;
        if h.seq != seen {
            return Ok(m);
        }
        if !matches!(succ.status(), crate::l1::hostvm::VmStatus::Running) {
            return Err("the successor stopped".into());
        }
        if Instant::now() >= deadline {
            return Err("the successor did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Completes the handover on behalf of the dead aged L1. On success the
/// session is in `AgedDone` and every live guest is adopted; returns how
/// many guests were offered by L0.
pub fn rescue(s: &Arc<Session>, succ: &Arc<HostVm>) -> Result<usize, String> {
    let aged = &s.aged;
    aged.stop_vcpus();
    if !s.with(|h| h.handing_over()) {
        return Err(format!("the handover is no longer open ({:?})", s.phase()));
    }
    // Where did the dead L1 stop? If its last GUEST has no answer yet, the
    // successor is still working on it: wait for that answer.
    let (_, out) = mailbox(aged, MAILBOX_TO_SUCCESSOR).ok_or("channel unreadable")?;
    let (in_h, mut last) = mailbox(aged, MAILBOX_TO_AGED).ok_or("channel unreadable")?;
    let mut seen = in_h.seq;
    if last.magic != MSG_MAGIC {
        // The successor has not said HELLO yet (it does right after READY).
        last = reply(aged, succ, seen)?;
        seen = mailbox(aged, MAILBOX_TO_AGED)
            .map(|(h, _)| h.seq)
            .unwrap_or(seen);
    }
    let offered_last = out.magic == MSG_MAGIC && out.kind == kind::GUEST;
    if offered_last
        && !(last.magic == MSG_MAGIC
            && last.index == out.index
            && matches!(last.kind, kind::ACCEPT | kind::REJECT))
    {
        last = reply(aged, succ, seen)?;
        seen = mailbox(aged, MAILBOX_TO_AGED)
            .map(|(h, _)| h.seq)
            .unwrap_or(seen);
    }
    let mut next = 0u32;
    if offered_last {
        if last.kind == kind::REJECT {
            return Err(format!(
                "the successor refused guest {} (code {})",
                out.index, last.code
            ));
        }
        next = out.index + 1;
    }
    // Offer every live guest the successor has not adopted yet.
    let adopted = |rec: &Arc<crate::nesting::nested::GuestRecord>| {
        succ.nested.lock().unwrap().vms.values().any(|n| {
            n.lock()
                .unwrap()
                .record
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, rec))
        })
    };
    let mut handles: Vec<u32> = aged.nested.lock().unwrap().vms.keys().copied().collect();
    handles.sort();
    let mut offered = 0;
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
        if !live || adopted(&rec) {
            continue;
        }
        let granted = s.with(|st| {
            st.moves
                .iter()
                .find(|m| Arc::ptr_eq(&m.record, &rec))
                .map(|m| m.ranges.clone())
        });
        let ranges = match granted {
            Some(r) => r,
            None => grant_guest(s, aged, succ, h as u64)
                .map_err(|e| format!("grant of {}: {e:?}", rec.name))?,
        };
        let (state, mem, name) = {
            let mut n = n.lock().unwrap();
            let st = n
                .save_vcpus()
                .map_err(|e| format!("state of {}: {e:?}", rec.name))?;
            (st, n.mem_bytes(), n.name.clone())
        };
        if ranges.len() > MAX_GUEST_RANGES || state.is_empty() || state.len() > MAX_NESTED_VCPUS {
            return Err(format!("{name} cannot be described in one message"));
        }
        let mut msg = GuestMsg {
            hdr: MsgHeader::new(kind::GUEST, std::mem::size_of::<GuestMsg>()),
            index: next,
            vcpus: state.len() as u32,
            name: vmbeam_abi::name_to_bytes(&name),
            mem_bytes: mem,
            workload: 0,
            n_ranges: ranges.len() as u32,
            seed: 0,
            moves: rec.info.lock().unwrap().moves as u64,
            exits: 0,
            uart: UartState::default(),
            ranges: [GrantRange::default(); MAX_GUEST_RANGES],
            state: [VcpuState::default(); MAX_NESTED_VCPUS],
        };
        msg.hdr.index = next;
        msg.ranges[..ranges.len()].copy_from_slice(&ranges);
        msg.state[..state.len()].copy_from_slice(&state);
        send(aged, succ, vmbeam_abi::as_bytes(&msg))?;
        let r = reply(aged, succ, seen)?;
        seen = mailbox(aged, MAILBOX_TO_AGED)
            .map(|(h, _)| h.seq)
            .unwrap_or(seen);
        if r.magic != MSG_MAGIC || r.index != next || r.kind != kind::ACCEPT {
            return Err(format!(
                "the successor did not accept {name} (reply kind {} code {})",
                r.kind, r.code
            ));
        }
        next += 1;
        offered += 1;
    }
    let mut end = MsgHeader::new(kind::END, std::mem::size_of::<MsgHeader>());
    end.index = next;
    send(aged, succ, vmbeam_abi::as_bytes(&end))?;
    // The successor adopts while it answers; give it a moment to finish the
    // last one, then check exactly what HANDOVER_DONE would have checked.
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while !crate::migration::handover::everyone_adopted(s, aged, succ) {
        if Instant::now() >= deadline {
            return Err("the successor did not adopt every guest".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !s.with(|h| h.aged_done()) {
        return Err(format!("the handover was given up ({:?})", s.phase()));
    }
    Ok(offered)
}
