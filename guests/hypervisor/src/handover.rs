//! Zero-copy handover of nested guests between an aged L1 and its successor.
//!
//! When L0 rejuvenates a host VM it boots a successor L1 next to the aged
//! one and asks the aged L1 to hand over. The two talk through one-slot
//! mailboxes in a shared channel: the aged side offers each guest (vCPU
//! state, UART, memory granted through L0), the successor adopts it or
//! refuses, and only when every guest is accepted does L0 switch over. Any
//! failure aborts and the aged L1 simply keeps running its guests.

use crate::hypercall::HcResult;
use crate::nested::{Guest, GuestState};
use crate::pool::Range;
use crate::{idle, name_str, sched, Hv};
use core::mem::size_of;
use core::sync::atomic::{compiler_fence, Ordering};
use vmbeam_abi::boot::{control, fault, MAX_NESTED};
use vmbeam_abi::handover::{
    kind, GuestMsg, MailboxHeader, MsgError, MsgHeader, UartState, MAILBOX_PAYLOAD, MAILBOX_SIZE,
    MAILBOX_TO_AGED, MAILBOX_TO_SUCCESSOR, MAX_GUEST_RANGES, MAX_NESTED_VCPUS, MSG_MAGIC,
    UART_LINE,
};
use vmbeam_abi::hypercall::{GrantRange, Status};
use vmbeam_abi::state::VcpuState;
use vmbeam_abi::{as_bytes, from_bytes};

/// OP_HANDOVER_ABORT reasons (aged side).
mod abort {
    /// The successor rejected a guest.
    pub const REJECTED: u64 = 1;
    /// A hypercall failed.
    pub const HYPERCALL: u64 = 2;
    /// The successor sent something unexpected.
    pub const PROTOCOL: u64 = 3;
    /// OP_HANDOVER_DONE returned.
    pub const DONE_FAILED: u64 = 4;
}

/// REJECT codes (successor side) beyond `MsgError` (1..=6).
mod reject {
    /// A hypercall failed while adopting.
    pub const HYPERCALL: u32 = 7;
    /// Fault injection (`fault::REJECT_FIRST`).
    pub const FAULT: u32 = 8;
    /// The guest table is full.
    pub const FULL: u32 = 9;
}

fn msg_error_code(e: MsgError) -> u32 {
    match e {
        MsgError::BadHeader => 1,
        MsgError::BadName => 2,
        MsgError::BadVcpus => 3,
        MsgError::BadRangeCount => 4,
        MsgError::BadRange => 5,
        MsgError::SizeMismatch => 6,
    }
}

/// Largest message we read (the biggest one is `GuestMsg`).
const MSG_MAX: usize = size_of::<GuestMsg>();
/// Payload capacity of a mailbox.
const MAILBOX_CAP: u64 = MAILBOX_SIZE - MAILBOX_PAYLOAD;
/// Wait between mailbox polls (OP_WAIT also wakes on the doorbell).
const POLL_US: u64 = 20_000;

/// One direction of the channel, at an identity-mapped address.
struct Mailbox(u64);

impl Mailbox {
    fn seq(&self) -> u32 {
        // SAFETY: the header is at the start of the mailbox, in the channel
        // L0 maps into this VM (identity-mapped, page-aligned).
        unsafe { guest_rt::read_volatile(self.0 as *const u32) }
    }

    fn len(&self) -> u32 {
        // SAFETY: as in `seq`.
        unsafe { guest_rt::read_volatile((self.0 + 4) as *const u32) }
    }

    /// Writes a message: payload, then length, then seq + 1, then rings.
    fn send(&self, hv: &mut Hv, msg: &[u8]) -> HcResult<()> {
        // SAFETY: the mailbox lies in the channel L0 maps into this VM
        // (identity-mapped); `msg` is far smaller than its payload area.
        unsafe {
            core::ptr::copy_nonoverlapping(
                msg.as_ptr(),
                (self.0 + MAILBOX_PAYLOAD) as *mut u8,
                msg.len(),
            )
        };
        compiler_fence(Ordering::SeqCst);
        let seq = self.seq().wrapping_add(1);
        // SAFETY: as in `seq`; the length is written before the sequence
        // number, which tells the peer the message is complete.
        unsafe {
            guest_rt::write_volatile((self.0 + 4) as *mut u32, msg.len() as u32);
            guest_rt::write_volatile(self.0 as *mut u32, seq);
        }
        hv.hc.notify()
    }

    /// Waits for a message newer than `*last` and copies it into `buf`;
    /// returns its length, or `None` if L0 set the control word to ABORT
    /// (or, for a successor, to COMMIT).
    fn recv(&self, hv: &mut Hv, last: &mut u32, buf: &mut [u8; MSG_MAX]) -> Option<u64> {
        self.recv_spamming(hv, last, buf, None)
    }

    /// [`Mailbox::recv`]; with `spam = Some(count)` (fault injection) it
    /// calls HANDOVER_DONE(count) instead of waiting between polls.
    fn recv_spamming(
        &self,
        hv: &mut Hv,
        last: &mut u32,
        buf: &mut [u8; MSG_MAX],
        spam: Option<u64>,
    ) -> Option<u64> {
        loop {
            let s = self.seq();
            if s != *last {
                *last = s;
                compiler_fence(Ordering::SeqCst);
                let len = self.len() as u64;
                buf.fill(0);
                let n = (len as usize).min(MSG_MAX);
                // SAFETY: as in `send`; `n` fits both `buf` and the mailbox.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        (self.0 + MAILBOX_PAYLOAD) as *const u8,
                        buf.as_mut_ptr(),
                        n,
                    )
                };
                return Some(len);
            }
            if matches!(hv.control(), control::ABORT | control::COMMIT) {
                return None;
            }
            match spam {
                Some(count) => {
                    let _ = hv.hc.handover_done(count);
                }
                None => {
                    let _ = hv.hc.wait(POLL_US);
                }
            }
        }
    }
}

const _: () = assert!(size_of::<MailboxHeader>() as u64 == MAILBOX_PAYLOAD);

/// A bare message (HELLO, ACCEPT, REJECT, END).
fn short(k: u16, index: u32, code: u32) -> MsgHeader {
    let mut h = MsgHeader::new(k, size_of::<MsgHeader>());
    h.index = index;
    h.code = code;
    h
}

fn header(buf: &[u8]) -> MsgHeader {
    from_bytes(buf).unwrap_or_default()
}

/// How an offer ended early.
enum Stop {
    /// L0 aborted (control word ABORT).
    Host,
    /// We abort with this reason (already printed).
    Local(u64),
}

/// Fault injection on the aged side (tests), chosen by L0's control word.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AgedFault {
    /// A well-behaved aged L1.
    None,
    /// Crash once the first guest is accepted, leaving L0 to finish.
    CrashAfterFirst,
    /// Send garbage CPU state in every GUEST message.
    LieState,
    /// Call HANDOVER_DONE over and over while the successor adopts.
    SpamDone,
}

impl AgedFault {
    /// The fault a handover control word asks for (`None` if it is no
    /// handover request).
    pub fn of_control(c: u32) -> Option<AgedFault> {
        Some(match c {
            control::HANDOVER => AgedFault::None,
            control::HANDOVER_THEN_CRASH => AgedFault::CrashAfterFirst,
            control::HANDOVER_LIE_STATE => AgedFault::LieState,
            control::HANDOVER_SPAM_DONE => AgedFault::SpamDone,
            _ => return None,
        })
    }
}

/// Aged side: offers every guest to the successor; on any failure the
/// guests keep running here.
pub fn aged(hv: &mut Hv, fault: AgedFault) {
    say!("handover: started");
    match offer_all(hv, fault) {
        Ok(n) => {
            say!("handover: {n} guests accepted, done");
            // L0 revokes this VM during the call, so normally no return.
            let r = hv.hc.handover_done(n);
            say!("handover: done returned {r:?}, resuming guests");
            hv.health.errors += 1;
            let _ = hv.hc.handover_abort(abort::DONE_FAILED);
        }
        Err(Stop::Host) => say!("handover: aborted by host, resuming guests"),
        Err(Stop::Local(code)) => {
            hv.health.errors += 1;
            let _ = hv.hc.handover_abort(code);
            say!("handover: aborted (reason {code}), resuming guests");
        }
    }
}

fn offer_all(hv: &mut Hv, fault: AgedFault) -> Result<u64, Stop> {
    let ch = hv.boot.channel_base;
    if ch == 0 {
        say!("handover: no channel");
        return Err(Stop::Local(abort::PROTOCOL));
    }
    let out = Mailbox(ch + MAILBOX_TO_SUCCESSOR);
    let inbox = Mailbox(ch + MAILBOX_TO_AGED);
    let mut last = 0;
    let mut buf = [0u8; MSG_MAX];
    // (1) Wait for HELLO. Anything else is stale and ignored, including the
    // HELLO this L1 itself sent when it was a successor (same generation).
    loop {
        inbox.recv(hv, &mut last, &mut buf).ok_or(Stop::Host)?;
        let h = header(&buf);
        if h.magic == MSG_MAGIC && h.kind == kind::HELLO && h.index != hv.boot.generation {
            break;
        }
    }
    say!("handover: successor ready");
    let hc_fail = |what: &str, s: Status| {
        say!("handover: {what} failed: {s:?}");
        Stop::Local(abort::HYPERCALL)
    };
    // (2) Offer each live guest.
    let mut count: u32 = 0;
    for i in 0..hv.n_guests {
        let g = hv.guests[i];
        if !matches!(g.state, GuestState::Running | GuestState::Halted) {
            continue;
        }
        let state = hv
            .hc
            .vcpu_get_state(g.handle, 0, g.live.pending_in * g.live.pending_valid as u64)
            .map_err(|s| hc_fail("get_state", s))?;
        hv.guests[i].live.pending_valid = 0;
        let mut msg = GuestMsg {
            hdr: MsgHeader::new(kind::GUEST, size_of::<GuestMsg>()),
            index: count,
            vcpus: 1,
            name: g.name,
            mem_bytes: g.mem_bytes,
            workload: g.live.workload,
            n_ranges: 0,
            seed: g.live.seed,
            moves: g.live.moves,
            exits: g.live.exits,
            uart: g.live.uart,
            ranges: [GrantRange::default(); MAX_GUEST_RANGES],
            state: [VcpuState::default(); MAX_NESTED_VCPUS],
        };
        msg.hdr.index = count;
        msg.state[0] = state;
        if fault == AgedFault::LieState {
            // Garbage a successor must not be able to load into the guest.
            msg.state[0] = from_bytes(&[0xa5u8; size_of::<VcpuState>()]).unwrap_or_default();
            msg.state[0].regs.rip = 0xdead_0000;
        }
        msg.n_ranges = hv
            .hc
            .grant(g.handle, &mut msg.ranges)
            .map_err(|s| hc_fail("grant", s))? as u32;
        out.send(hv, as_bytes(&msg))
            .map_err(|s| hc_fail("notify", s))?;
        let spam = (fault == AgedFault::SpamDone).then_some(count as u64 + 1);
        inbox
            .recv_spamming(hv, &mut last, &mut buf, spam)
            .ok_or(Stop::Host)?;
        let h = header(&buf);
        let name = name_str(&g.name);
        if h.magic != MSG_MAGIC || h.index != count {
            say!("handover: bad reply for {name}");
            return Err(Stop::Local(abort::PROTOCOL));
        }
        match h.kind {
            kind::ACCEPT => {
                say!("handover: {name} accepted");
                if fault == AgedFault::CrashAfterFirst {
                    say!("fault: aged hypervisor crashing after the first guest");
                    guest_rt::crash();
                }
            }
            kind::REJECT => {
                say!("handover: {name} rejected (code {})", h.code);
                return Err(Stop::Local(abort::REJECTED));
            }
            _ => {
                say!("handover: bad reply for {name}");
                return Err(Stop::Local(abort::PROTOCOL));
            }
        }
        count += 1;
    }
    // (3) No more guests.
    out.send(hv, as_bytes(&short(kind::END, count, 0)))
        .map_err(|s| hc_fail("notify", s))?;
    Ok(count as u64)
}

/// Aged side of a batch handover: offers every live guest to L0 with the
/// address of its live state, and goes back to scheduling. L0 moves each
/// guest on its own, right after one of its exits; its next RUN here then
/// answers `Moved`.
pub fn aged_batch(hv: &mut Hv) {
    let mut n = 0u64;
    for i in 0..hv.n_guests {
        if !matches!(hv.guests[i].state, GuestState::Running | GuestState::Halted) {
            continue;
        }
        let live = core::ptr::addr_of!(hv.guests[i].live) as u64;
        match hv.hc.offer(hv.guests[i].handle, live) {
            Ok(()) => n += 1,
            Err(s) => say!("handover: offer of {} failed: {s:?}", hv.name(i)),
        }
    }
    if let Err(s) = hv.hc.offer_end(n) {
        say!("handover: offer end failed: {s:?}");
    }
}

/// The batch handover ended without this guest hypervisor being destroyed
/// (the control word left `HANDOVER_BATCH`): it rolled back, and L0 gave
/// every guest that had moved back to this table under its old handle,
/// with its live state written back in place. They run here again. (Had
/// one not come back, its next RUN fails and it is released as usual.)
pub fn batch_ended(hv: &mut Hv) {
    let mut back = 0;
    for g in hv.guests[..hv.n_guests].iter_mut() {
        if g.state == GuestState::Away {
            g.state = GuestState::Running;
            back += 1;
        }
    }
    if back > 0 {
        say!("handover: rolled back, {back} moved guests run here again");
    }
}

/// Successor side of a batch handover: takes every offered guest from L0
/// (each one arrives, with its live state, when L0 moves it; RUN waits for
/// it) and schedules them at once.
fn successor_batch(hv: &mut Hv) -> ! {
    let mut taken = 0;
    loop {
        if taken == 1 && hv.boot.flags & fault::REJECT_FIRST != 0 {
            // Fault injection: a successor that cannot take a second guest.
            say!("fault: taking no more guests");
            idle(hv);
        }
        if hv.n_guests >= MAX_NESTED {
            break;
        }
        let slot = hv.n_guests;
        let live = core::ptr::addr_of!(hv.guests[slot].live) as u64;
        let mut g = Guest::empty();
        let mut ranges = [GrantRange::default(); MAX_GUEST_RANGES];
        match hv.hc.adopt(live, &mut g.name, &mut ranges) {
            Ok((handle, mem, n)) => {
                g.handle = handle;
                g.mem_bytes = mem;
                g.n_ranges = n;
                for (d, r) in g.ranges.iter_mut().zip(&ranges[..n]) {
                    *d = Range {
                        l1_gpa: r.succ_gpa,
                        l2_gpa: r.l2_gpa,
                        len: r.len,
                    };
                }
                // L0 wrote the live state already; keep it.
                g.live = hv.guests[slot].live;
                g.state = GuestState::Running;
                g.owned_by_pool = false;
                hv.guests[slot] = g;
                hv.n_guests += 1;
                taken += 1;
            }
            Err(Status::Again) => {}
            Err(Status::NoSuchHandle) => break,
            Err(s) => {
                say!("handover: adopt failed: {s:?}");
                hv.health.errors += 1;
                break;
            }
        }
    }
    say!(
        "adopted {taken} nested guests from generation {}",
        hv.boot.generation.saturating_sub(1)
    );
    if hv.boot.flags & fault::CRASH_AFTER_MOVES != 0 && hv.n_guests > 0 {
        // Fault injection: run the first adopted guest once (the RUN waits
        // until it has moved here), then die while the others move.
        sched::step(hv, 0);
        say!("fault: crashing after the first guest moved here");
        guest_rt::crash();
    }
    sched::run(hv)
}

/// Successor side: says ready, adopts the offered guests, then waits for
/// L0's verdict and either runs them or drops them.
pub fn successor(hv: &mut Hv) -> ! {
    let flags = hv.boot.flags;
    if flags & fault::HANG_AT_BOOT != 0 {
        say!("fault: hanging at boot");
        idle(hv);
    }
    if let Err(s) = hv.hc.handover_ready() {
        say!("handover: ready failed: {s:?}");
        idle(hv);
    }
    if flags & vmbeam_abi::boot::protocol::BATCH != 0 {
        successor_batch(hv);
    }
    let ch = hv.boot.channel_base;
    let out = Mailbox(ch + MAILBOX_TO_AGED);
    let inbox = Mailbox(ch + MAILBOX_TO_SUCCESSOR);
    // The aged side writes only after our HELLO, so whatever the inbox holds
    // now is stale (a channel reused from an earlier handover).
    let mut last = if ch == 0 { 0 } else { inbox.seq() };
    let hello = short(kind::HELLO, hv.boot.generation, 0);
    if ch == 0 || out.send(hv, as_bytes(&hello)).is_err() {
        say!("handover: cannot reach the aged hypervisor");
        idle(hv);
    }
    say!("handover: ready, waiting for guests");
    let mut buf = [0u8; MSG_MAX];
    let mut offered = 0;
    let mut accepted = 0;
    loop {
        let Some(len) = inbox.recv(hv, &mut last, &mut buf) else {
            if hv.control() == control::COMMIT {
                // L0 found every guest adopted before END arrived.
                break;
            }
            drop_adopted(hv);
        };
        if accepted > 0 && flags & fault::CRASH_AFTER_FIRST != 0 {
            say!("fault: crashing after first adoption");
            guest_rt::crash();
        }
        let h = header(&buf);
        if h.magic != MSG_MAGIC {
            continue;
        }
        match h.kind {
            kind::GUEST => {
                if offered == 0 && flags & fault::CRASH_BEFORE_ADOPT != 0 {
                    say!("fault: crashing before adoption");
                    guest_rt::crash();
                }
                offered += 1;
                let Some(msg) = from_bytes::<GuestMsg>(&buf) else {
                    continue;
                };
                let reply = match check(hv, &msg, len, offered == 1) {
                    Err(code) => {
                        say!("handover: rejected guest {} (code {code})", msg.index);
                        short(kind::REJECT, msg.index, code)
                    }
                    Ok(()) => match adopt(hv, &msg) {
                        Err(code) => short(kind::REJECT, msg.index, code),
                        Ok(()) => {
                            accepted += 1;
                            short(kind::ACCEPT, msg.index, 0)
                        }
                    },
                };
                if out.send(hv, as_bytes(&reply)).is_err() {
                    hv.health.errors += 1;
                }
            }
            kind::END => break,
            _ => {}
        }
    }
    say!("handover: got {accepted} guests, waiting for commit");
    loop {
        match hv.control() {
            control::COMMIT => break,
            control::ABORT => drop_adopted(hv),
            _ => {
                let _ = hv.hc.wait(POLL_US);
            }
        }
    }
    let mut n = 0;
    for g in hv.guests[..hv.n_guests].iter_mut() {
        if g.state == GuestState::Adopted {
            g.state = GuestState::Running;
            n += 1;
        }
    }
    say!(
        "adopted {n} nested guests from generation {}",
        hv.boot.generation.saturating_sub(1)
    );
    sched::run(hv)
}

/// Checks a GUEST message before acting on it; `Err` is the REJECT code.
fn check(hv: &Hv, msg: &GuestMsg, len: u64, first: bool) -> Result<(), u32> {
    if len > MAILBOX_CAP || (msg.hdr.len as u64) > len {
        return Err(msg_error_code(MsgError::BadHeader));
    }
    msg.validate(hv.boot.grant_base, hv.boot.grant_size)
        .map_err(msg_error_code)?;
    if msg.vcpus != 1 {
        return Err(msg_error_code(MsgError::BadVcpus));
    }
    if first && hv.boot.flags & fault::REJECT_FIRST != 0 {
        return Err(reject::FAULT);
    }
    if hv.n_guests >= MAX_NESTED {
        return Err(reject::FULL);
    }
    Ok(())
}

/// Recreates a validated guest in L0 on the granted memory.
fn adopt(hv: &mut Hv, msg: &GuestMsg) -> Result<(), u32> {
    let name = name_str(&msg.name);
    let h = match hv.hc.vm_create(&msg.name) {
        Ok(h) => h,
        Err(s) => {
            say!("handover: adopt {name}: vm_create failed: {s:?}");
            return Err(reject::HYPERCALL);
        }
    };
    let mut g = Guest::empty();
    let spam = hv.boot.flags & fault::SPAM_MAP != 0;
    let r = msg.ranges[..msg.n_ranges as usize]
        .iter()
        .try_for_each(|r| {
            hv.hc
                .vm_map(h, r.succ_gpa, r.l2_gpa, r.len)
                .map_err(|s| ("vm_map", s))?;
            if spam {
                // Fault injection: the same confirmation again and again
                // (each one refused) while the aged side calls into L0.
                for _ in 0..200 {
                    let _ = hv.hc.vm_map(h, r.succ_gpa, r.l2_gpa, r.len);
                }
            }
            Ok(())
        });
    let r = r.and_then(|()| {
        let v = hv.hc.vcpu_create(h).map_err(|s| ("vcpu_create", s))?;
        hv.hc
            .vcpu_set_state(h, v, &msg.state[0])
            .map_err(|s| ("vcpu_set_state", s))
    });
    if let Err((what, s)) = r {
        say!("handover: adopt {name}: {what} failed: {s:?}");
        if hv.hc.vm_destroy(h).is_err() {
            hv.health.errors += 1;
        }
        return Err(reject::HYPERCALL);
    }
    g.name = msg.name;
    g.handle = h;
    g.mem_bytes = msg.mem_bytes;
    g.n_ranges = msg.n_ranges as usize;
    for (d, s) in g.ranges.iter_mut().zip(&msg.ranges[..g.n_ranges]) {
        *d = Range {
            l1_gpa: s.succ_gpa,
            l2_gpa: s.l2_gpa,
            len: s.len,
        };
    }
    g.live.workload = msg.workload;
    g.live.seed = msg.seed;
    g.live.uart = sanitize(msg.uart);
    g.state = GuestState::Adopted;
    g.live.exits = msg.exits;
    g.live.moves = msg.moves + 1;
    g.owned_by_pool = false;
    hv.guests[hv.n_guests] = g;
    hv.n_guests += 1;
    say!("handover: adopted {name} handle={h}");
    Ok(())
}

/// Keeps a received UART state within bounds.
fn sanitize(mut u: UartState) -> UartState {
    u.line_len = u.line_len.min(UART_LINE as u32);
    u
}

/// L0 aborted the handover: destroys every adopted VM and idles.
fn drop_adopted(hv: &mut Hv) -> ! {
    let mut n = 0;
    for i in 0..hv.n_guests {
        if hv.guests[i].state == GuestState::Adopted {
            if hv.hc.vm_destroy(hv.guests[i].handle).is_err() {
                hv.health.errors += 1;
            }
            hv.guests[i].state = GuestState::Crashed;
            n += 1;
        }
    }
    say!("handover: aborted by host, dropped {n} adopted guests");
    idle(hv)
}
