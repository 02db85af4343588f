//! `vmbeam rejuvenate`: replacing a guest hypervisor by a freshly booted one
//! and moving every nested guest across without copying its memory.
//!
//! The orchestration walks the handover's state machine
//! (`handover_state::Phase`) one phase function at a time:
//! [`Rejuvenation::boot_successor`] → [`Rejuvenation::hand_over`] →
//! [`Rejuvenation::verify`] → [`Rejuvenation::revoke`] →
//! [`Rejuvenation::commit`], or [`Rejuvenation::rollback`] from any phase
//! before the commit point. Each phase emits one `handover` event. Any
//! failure before commit rolls back: the successor is destroyed and every
//! guest keeps running under the aged guest hypervisor. If it is the aged
//! guest hypervisor that died, L0 finishes the handover itself (rescue),
//! with a second fresh successor if the first one fails it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::boot::{control, fault, ROLE_SUCCESSOR};

use crate::base::progress::{Phase as JobPhase, Progress};
use crate::host::loader::FlatImage;
use crate::host::memory::Region;
use crate::l1::hostvm::Shared;
use crate::l1::hostvm::{HostVm, VmStatus};
use crate::migration::handover::{self, GuestMove, Phase, Session};
use crate::nesting::nested::NestedState;

/// Batch: how long the next guest may wait for its last run under the aged
/// L1 before L0 moves it itself.
const FORCE_AFTER: Duration = Duration::from_millis(100);

/// Where a rejuvenation reports its phases: `(event, fields)`, the hook
/// behind the events file (`Vmm::event`).
pub type EventSink<'a> = &'a (dyn Fn(&str, serde_json::Value) + Sync);

pub use crate::migration::mode::Mode;

/// Options of one rejuvenation.
#[derive(Debug, Clone)]
pub struct RejuvenateOptions {
    /// Mode.
    pub mode: Mode,
    /// Fault-injection flags for the successor (tests).
    pub fault: u64,
    /// Hash every guest before and after (channel protocol: inside the
    /// pause, so it counts as downtime; batch: outside every pause).
    pub verify: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Pre-copy: stop iterating when the rest can be copied within this.
    pub downtime_budget: Duration,
    /// For tests and diagnostics: boot this guest hypervisor ELF as the
    /// successor instead of the VMM's image (`None`, the default, boots the
    /// VMM's own). Not settable through the HTTP API.
    pub successor_image: Option<Vec<u8>>,
    /// Batch handover (zero-copy only): each guest moves on its own at host
    /// speed, right after one of its exits, instead of all guests pausing
    /// for the whole channel protocol. See docs/handover.md.
    pub batch: bool,
    /// Progress to report to and the cancel flag to obey (API jobs). A
    /// cancel is honoured at every point before commit: the handover rolls
    /// back.
    pub progress: Option<Arc<Progress>>,
}

impl Default for RejuvenateOptions {
    fn default() -> Self {
        RejuvenateOptions {
            mode: Mode::ZeroCopy,
            fault: 0,
            verify: true,
            timeout: Duration::from_secs(60),
            downtime_budget: Duration::from_millis(300),
            successor_image: None,
            batch: false,
            progress: None,
        }
    }
}

/// Errors of a rejuvenation. In every case each nested guest still runs
/// under exactly one guest hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum RejuvenateError {
    /// The aged VM is not running.
    #[error("host VM {vm} is not running ({status}); nothing to rejuvenate")]
    NotRunning {
        /// VM.
        vm: String,
        /// Its status.
        status: String,
    },
    /// The successor could not be built.
    #[error("cannot boot the successor of {vm}: {msg}; every nested guest keeps running under generation {generation}")]
    Boot {
        /// VM.
        vm: String,
        /// Cause.
        msg: String,
        /// Generation still running.
        generation: u32,
    },
    /// The aged guest hypervisor died mid-handover and L0 could not finish
    /// the handover in its place, even with a second fresh successor: the
    /// guests it could not place are lost (each one has a `guest_lost`
    /// event), and every successor was destroyed.
    #[error("rejuvenation of {vm} failed: {msg}; the guest hypervisor is dead and no successor took its guests: {lost} nested guests lost")]
    Rescue {
        /// VM.
        vm: String,
        /// Cause.
        msg: String,
        /// Guests lost.
        lost: usize,
    },
    /// The handover failed and was rolled back.
    #[error("rejuvenation of {vm} failed: {msg}; rolled back: all {guests} nested guests keep running under generation {generation}")]
    RolledBack {
        /// VM.
        vm: String,
        /// Cause.
        msg: String,
        /// Guests kept.
        guests: usize,
        /// Generation still running.
        generation: u32,
    },
}

pub use crate::migration::report::{cpu_ms, rss_bytes, GuestReport, Report};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Fault injection ([`fault::FLIP_BYTE_BEFORE_VERIFY`]): inverts one byte of
/// the first granted guest, paused between its two checksums.
fn flip_first_granted(moves: &[GuestMove], succ: &HostVm) {
    let Some(m) = moves.first() else { return };
    let n = m
        .succ
        .as_ref()
        .and_then(|side| succ.nested_vm(side.handle as u64));
    if let Some(n) = n {
        let _ = n.lock().unwrap().flip_byte(fault::FLIP_BYTE_GPA);
    }
}

/// Moves every nested guest of `aged` to a fresh guest hypervisor.
/// On success returns the report and the successor. `events` receives one
/// `handover` event per phase.
pub fn rejuvenate(
    shared: &Arc<Shared>,
    hypervisor: &[u8],
    modules: &[(u32, FlatImage)],
    aged: &Arc<HostVm>,
    opts: &RejuvenateOptions,
    events: EventSink<'_>,
) -> Result<(Report, Arc<HostVm>), RejuvenateError> {
    match aged.status() {
        VmStatus::Running => {}
        s => {
            return Err(RejuvenateError::NotRunning {
                vm: aged.spec.line.clone(),
                status: format!("{s:?}"),
            })
        }
    }
    let mut r = Rejuvenation::new(shared, hypervisor, modules, aged, opts, events);
    r.boot_successor()?;
    if r.batch() {
        r.hand_over_batch()?;
        let revoked = r.revoke();
        return Ok(r.commit(revoked));
    }
    r.check_cancel()?;
    r.precopy()?;
    r.check_cancel()?;
    match r.hand_over() {
        Ok(()) => {}
        Err(Failure::AgedDied(m)) => r.rescue(m)?,
        Err(Failure::Other(m)) => return Err(r.rollback(m)),
    }
    r.verify().map_err(|m| r.rollback(m))?;
    // The last point where a cancel rolls back.
    r.check_cancel()?;
    r.progress(JobPhase::Committing);
    let revoked = r.revoke();
    Ok(r.commit(revoked))
}

/// Why the handover phase did not reach AgedDone.
enum Failure {
    /// The aged guest hypervisor died: L0 finishes the handover (rescue).
    AgedDied(String),
    /// Anything else: roll back.
    Other(String),
}

/// What revocation leaves for the commit: things to drop off the critical
/// path, and the memory it gave back.
struct Revoked {
    nested: Vec<crate::nesting::nested::NestedRef>,
    regions: Vec<Region>,
    released: u64,
}

/// One rejuvenation in progress: the phase functions below move it along
/// the handover's state machine.
struct Rejuvenation<'a> {
    shared: &'a Arc<Shared>,
    hypervisor: &'a [u8],
    modules: &'a [(u32, FlatImage)],
    aged: &'a Arc<HostVm>,
    opts: &'a RejuvenateOptions,
    events: EventSink<'a>,
    line: String,
    generation: u32,
    guests_now: usize,
    session: Arc<Session>,
    succ: Option<Arc<HostVm>>,
    t0: Instant,
    t_ready: Instant,
    rss_before: u64,
    cpu0: f64,
    precopy: Option<crate::migration::copy::PrecopyStats>,
    rescued: Option<usize>,
    after_sums: Vec<(String, u64)>,
    /// Batch with `verify`: each move's page hashes through the aged side.
    before_pages: Vec<crate::migration::verify::PageHashes>,
    /// Batch with `verify`: (guest, digest before, digest after).
    batch_sums: Vec<(String, u64, u64)>,
}

impl<'a> Rejuvenation<'a> {
    /// Creates the session (phase Booting) and attaches it to the aged VM.
    fn new(
        shared: &'a Arc<Shared>,
        hypervisor: &'a [u8],
        modules: &'a [(u32, FlatImage)],
        aged: &'a Arc<HostVm>,
        opts: &'a RejuvenateOptions,
        events: EventSink<'a>,
    ) -> Rejuvenation<'a> {
        let t0 = Instant::now();
        let rss_before = rss_bytes();
        let cpu0 = cpu_ms();
        let session = Self::new_session(aged, opts);
        if let Some(p) = &opts.progress {
            let vms: Vec<_> = aged.nested.lock().unwrap().vms.values().cloned().collect();
            p.set_guests_total(vms.len() as u64);
            if opts.mode != Mode::ZeroCopy {
                p.set_bytes_total(vms.iter().map(|v| v.lock().unwrap().mem_bytes()).sum());
            }
        }
        Rejuvenation {
            shared,
            hypervisor,
            modules,
            aged,
            opts,
            events,
            line: aged.spec.line.clone(),
            generation: aged.spec.generation,
            guests_now: aged.nested.lock().unwrap().vms.len(),
            session,
            succ: None,
            t0,
            t_ready: t0,
            rss_before,
            cpu0,
            precopy: None,
            rescued: None,
            after_sums: Vec::new(),
            before_pages: Vec::new(),
            batch_sums: Vec::new(),
        }
    }

    fn new_session(aged: &Arc<HostVm>, opts: &RejuvenateOptions) -> Arc<Session> {
        // Fresh channel contents for this session.
        let channel = aged.channel_file();
        let _ = channel.punch_hole(0, channel.size);
        // Boot wait + handover wait, each bounded below.
        let deadline = Instant::now() + opts.timeout.min(Duration::from_secs(30)) + opts.timeout;
        let session = Session::new(aged.clone(), channel, opts.verify, opts.mode, deadline);
        let batch = opts.batch && opts.mode == Mode::ZeroCopy;
        session.with(|h| h.batch = batch);
        *aged.session.lock().unwrap() = Some(session.clone());
        session
    }

    fn batch(&self) -> bool {
        self.session.with(|h| h.batch)
    }

    /// Moves the job's progress (if any) to `phase`.
    fn progress(&self, phase: JobPhase) {
        if let Some(p) = &self.opts.progress {
            p.set_phase(phase);
        }
    }

    /// Why to stop now, if the job was cancelled.
    fn cancelled(&self) -> Option<String> {
        crate::base::progress::check(self.opts.progress.as_ref())
            .err()
            .map(|e| e.to_string())
    }

    /// Rolls back if the job was cancelled (between phases, before commit).
    fn check_cancel(&mut self) -> Result<(), RejuvenateError> {
        match self.cancelled() {
            Some(m) => Err(self.rollback(m)),
            None => Ok(()),
        }
    }

    fn event(&self, phase: &str, mut fields: serde_json::Value) {
        tracing::info!(vm = %self.line, generation = self.generation, "rejuvenation phase: {phase}");
        fields["vm"] = self.line.clone().into();
        fields["phase"] = phase.into();
        fields["generation"] = self.generation.into();
        (self.events)("handover", fields);
    }

    fn batch_sum(&self, guest: &str) -> Option<(u64, u64)> {
        self.batch_sums
            .iter()
            .find(|(g, ..)| g == guest)
            .map(|(_, a, b)| (*a, *b))
    }

    fn succ(&self) -> &Arc<HostVm> {
        self.succ.as_ref().expect("successor booted")
    }

    fn succ_dead(&self) -> Option<String> {
        match self.succ.as_ref()?.status() {
            VmStatus::Failed(m) => Some(format!("the successor died: {m}")),
            VmStatus::Stopped | VmStatus::Retired => Some("the successor stopped".into()),
            _ => None,
        }
    }

    fn aged_dead(&self) -> Option<String> {
        match self.aged.status() {
            VmStatus::Failed(m) => Some(format!("the aged guest hypervisor died: {m}")),
            _ => None,
        }
    }

    /// Booting → Ready: boots the successor (fault flags `fault`, image
    /// `image`) and waits until it says it is ready. Invariant on success:
    /// the successor is alive and attached to the session; no guest is
    /// held. A boot error detaches the session (nothing was frozen).
    fn boot_with(&mut self, fault: u64, image: &[u8]) -> Result<(), RejuvenateError> {
        self.event("booting", serde_json::json!({}));
        self.progress(JobPhase::Booting);
        let mut spec = self.aged.spec.clone();
        spec.generation += 1;
        spec.role = ROLE_SUCCESSOR;
        spec.nested.clear();
        spec.flags = fault;
        let succ = match HostVm::boot(
            self.shared.clone(),
            spec,
            image,
            self.modules,
            self.session.channel.clone(),
            Some(self.session.clone()),
        ) {
            Ok(s) => s,
            Err(e) => {
                *self.aged.session.lock().unwrap() = None;
                self.event("boot_failed", serde_json::json!({"error": e.to_string()}));
                return Err(RejuvenateError::Boot {
                    vm: self.line.clone(),
                    msg: e.to_string(),
                    generation: self.generation,
                });
            }
        };
        *self.session.successor.lock().unwrap() = Some(succ.clone());
        self.succ = Some(succ);
        // (If the aged L1 dies meanwhile, its guests still need the successor.)
        let boot_wait = self.session.wait_phase(
            self.opts.timeout.min(Duration::from_secs(30)),
            |p| *p == Phase::Ready,
            || self.succ_dead().or_else(|| self.cancelled()),
        );
        if let Err(m) = boot_wait {
            return Err(self.rollback(format!("the successor did not become ready: {m}")));
        }
        self.t_ready = Instant::now();
        self.event(
            "ready",
            serde_json::json!({"boot_ms": ms(self.t_ready - self.t0)}),
        );
        Ok(())
    }

    fn boot_successor(&mut self) -> Result<(), RejuvenateError> {
        let image = self
            .opts
            .successor_image
            .as_deref()
            .unwrap_or(self.hypervisor);
        let protocol = if self.batch() {
            vmbeam_abi::boot::protocol::BATCH
        } else {
            0
        };
        self.boot_with(self.opts.fault | protocol, image)
    }

    /// Batch handover, Ready → HandingOver → Moving → AgedDone: the aged L1
    /// offers every guest and the successor takes each one (nothing pauses
    /// yet); then L0 moves them one by one (`batch::complete_move`), each
    /// right after one of its exits, forcing the head's move itself if the
    /// aged L1 does not get to it (or died). Invariant on success: every
    /// guest is bound to the successor and runnable there. Before Moving
    /// any failure rolls back (nothing paused); during Moving, a dead
    /// successor takes the guests already moved with it (they are lost,
    /// each with an event) and the others stay with the aged L1.
    fn hand_over_batch(&mut self) -> Result<(), RejuvenateError> {
        use crate::migration::batch;
        if !self.session.with(|h| h.ask()) {
            return Err(self.rollback("cannot hand over".into()));
        }
        self.event("handing_over", serde_json::json!({"batch": true}));
        self.aged
            .set_control(if self.opts.fault & fault::AGED_CRASH_AFTER_FIRST != 0 {
                control::HANDOVER_BATCH_THEN_CRASH
            } else if self.opts.fault & fault::CRASH_AFTER_MOVES != 0 {
                control::HANDOVER_BATCH_FIRST_ONLY
            } else {
                control::HANDOVER_BATCH
            });
        let deadline = Instant::now() + self.opts.timeout;
        // Offers and takes: nothing is paused yet.
        loop {
            let (closed, taken) = self.session.with(|h| {
                (
                    h.offers_closed,
                    h.moves.iter().all(|m| {
                        m.batch
                            .as_ref()
                            .is_some_and(|b| b.step == crate::migration::handover::BatchStep::Taken)
                    }),
                )
            });
            if closed && taken {
                break;
            }
            if let Some(m) = self.succ_dead() {
                return Err(self.rollback(m));
            }
            if let Phase::Aborted(m) | Phase::Aborting(m) = self.session.phase() {
                return Err(self.rollback(m));
            }
            if !closed && self.aged_dead().is_some() {
                // L0 offers what the dead aged L1 had not.
                self.rescued = Some(0);
                if let Err(m) = batch::offer_rest(&self.session) {
                    return Err(self.rollback(m));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.rollback(format!(
                    "the guests were not all offered and taken within {:?}",
                    self.opts.timeout
                )));
            }
            self.session.wait_change(Duration::from_millis(5));
        }
        if self.opts.verify {
            self.hash_before();
        }
        if !self.session.with(|h| h.start_moving()) {
            return Err(self.rollback("cannot start moving".into()));
        }
        let n = self.session.with(|h| h.moves.len());
        self.event("moving", serde_json::json!({"guests": n}));
        // Moves: each guest pauses on its own.
        loop {
            let (done, head, since) = self.session.with(|h| (h.all_moved(), h.head, h.head_since));
            if done {
                break;
            }
            if let Some(m) = self.succ_dead() {
                return Err(self.successor_lost(m));
            }
            let stuck = since.is_some_and(|t| t.elapsed() >= FORCE_AFTER);
            if stuck || self.aged_dead().is_some() || Instant::now() >= deadline {
                // The aged L1 did not get to this guest (or died): L0 moves
                // it itself (its exits were all handled long ago).
                // (A no-op if the aged L1 is switching it over right now.)
                if let Err(e) = batch::complete_move(&self.session, head) {
                    batch::fail_move(&self.session, head, &e);
                }
            }
            self.session.wait_change(Duration::from_millis(2));
        }
        // The last guests may have moved to a successor that died meanwhile:
        // they go back rather than being committed to it.
        if let Some(m) = self.succ_dead() {
            return Err(self.successor_lost(m));
        }
        self.session.with(|h| h.aged_done());
        self.event("aged_done", serde_json::json!({"guests": n}));
        Ok(())
    }

    /// Batch with `verify`, before any guest pauses: dirty logging on, and
    /// every page hashed through the aged side's mapping (the guests keep
    /// running; see `verify`).
    fn hash_before(&mut self) {
        use crate::migration::verify::{hash_pages, View};
        let t = Instant::now();
        let vms: Vec<_> = self.session.with(|h| {
            h.moves
                .iter()
                .map(|m| m.batch.as_ref().map(|b| b.vm.clone()))
                .collect()
        });
        for vm in vms {
            let Some(vm) = vm else {
                self.before_pages.push(Default::default());
                continue;
            };
            let (views, _maps) = {
                let mut n = vm.lock().unwrap();
                let _ = n.set_dirty_logging(true);
                let views: Vec<View> = n
                    .slots
                    .iter()
                    .map(|s| View {
                        l2_gpa: s.l2_gpa,
                        host: s.hva as *const u8,
                        file: s.file.clone(),
                        file_offset: s.file_offset,
                        len: s.len,
                    })
                    .collect();
                let maps: Vec<_> = n.slots.iter().map(|s| s.map.clone()).collect();
                (views, maps)
            };
            // SAFETY: `_maps` keeps every slot's mapping alive meanwhile.
            self.before_pages.push(unsafe { hash_pages(&views) });
        }
        self.session.with(|h| h.verify_time += t.elapsed());
    }

    /// Batch with `verify`, after every guest resumed: hashes each page
    /// through the successor's mapping, reads which pages the guest wrote
    /// since [`Rejuvenation::hash_before`], turns dirty logging off, and
    /// compares the digests of all other pages. A mismatch is reported
    /// (event `verify_failed`, unequal checksums); the guest is already
    /// running under the successor.
    fn verify_after(&mut self) {
        use crate::migration::verify::{digests, dirty_pages, hash_pages, View};
        use std::collections::HashSet;
        let t = Instant::now();
        let succ = self.succ().clone();
        let moves: Vec<GuestMove> = self.session.with(|h| h.moves.clone());
        for (k, m) in moves.iter().enumerate() {
            let (Some(b), Some(before)) = (&m.batch, self.before_pages.get(k)) else {
                continue;
            };
            let slots: Vec<(u64, Arc<crate::host::memory::MemFile>, u64, u64)> = {
                let n = b.vm.lock().unwrap();
                n.slots
                    .iter()
                    .map(|s| (s.l2_gpa, s.file.clone(), s.file_offset, s.len))
                    .collect()
            };
            let after = {
                let mem = succ.mem.read().unwrap();
                let mut views = Vec::new();
                for ((l2, file, off, len), r) in slots.iter().zip(&m.ranges) {
                    if let Some(p) = mem.host_ptr(r.succ_gpa, *len as usize) {
                        views.push(View {
                            l2_gpa: *l2,
                            host: p,
                            file: file.clone(),
                            file_offset: *off,
                            len: *len,
                        });
                    }
                }
                // SAFETY: the successor's regions stay mapped while `mem`
                // is read-locked.
                unsafe { hash_pages(&views) }
            };
            let mut dirty = HashSet::new();
            {
                let mut n = b.vm.lock().unwrap();
                for (i, (l2, ..)) in slots.iter().enumerate() {
                    if let Ok(bm) = n.take_dirty(i) {
                        dirty_pages(*l2, &bm, &mut dirty);
                    }
                }
                let _ = n.set_dirty_logging(false);
            }
            let (d0, d1, pages) = digests(before, &after, &dirty);
            if d0 != d1 {
                (self.events)(
                    "verify_failed",
                    serde_json::json!({"vm": self.line, "guest": m.guest,
                        "before": format!("{d0:016x}"), "after": format!("{d1:016x}")}),
                );
            }
            self.event(
                "verified",
                serde_json::json!({"guest": m.guest, "pages": pages, "equal": d0 == d1}),
            );
            self.batch_sums.push((m.guest.clone(), d0, d1));
        }
        self.session.with(|h| h.verify_time += t.elapsed());
    }

    /// Batch: the successor died while guests were moving. No guest is
    /// lost with it: the rollback begins (no further move is claimed), an
    /// in-flight move finishes, the successor's vCPUs stop, and L0 moves
    /// every moved guest back to the aged L1 (`batch::move_back`: its
    /// `GuestLive` read from the dead successor's RAM, which stays mapped
    /// until the successor is dropped below). The others never stopped
    /// running under the aged L1. Then the control word says ABORT, which
    /// makes the aged L1 run its moved guests again, and the successor is
    /// destroyed. A guest that cannot go back (it crashed under the
    /// successor) is reported with a `guest_lost` event.
    fn successor_lost(&mut self, why: String) -> RejuvenateError {
        use crate::migration::batch;
        use crate::migration::handover::BatchStep;
        self.progress(JobPhase::RollingBack);
        self.session.with(|h| h.begin_abort(&why));
        // A move claimed before the rollback began completes at host speed
        // (no L1 code runs inside it); bounded all the same.
        let settle = Instant::now() + Duration::from_secs(2);
        while Instant::now() < settle
            && self.session.with(|h| {
                h.moves.iter().any(|m| {
                    m.batch
                        .as_ref()
                        .is_some_and(|b| b.step == BatchStep::Switching)
                })
            })
        {
            self.session.wait_change(Duration::from_millis(2));
        }
        if let Some(s) = &self.succ {
            s.stop_vcpus();
        }
        let steps: Vec<(usize, Option<BatchStep>, String)> = self.session.with(|h| {
            h.moves
                .iter()
                .enumerate()
                .map(|(i, m)| (i, m.batch.as_ref().map(|b| b.step), m.guest.clone()))
                .collect()
        });
        let mut lost = 0;
        let mut back = 0;
        for (i, step, name) in steps {
            if step != Some(BatchStep::Moved) {
                batch::fail_move(&self.session, i, &why);
                continue;
            }
            match batch::move_back(&self.session, i) {
                Ok(()) => {
                    back += 1;
                    (self.events)(
                        "moved_back",
                        serde_json::json!({"vm": self.line, "guest": name, "error": why}),
                    );
                }
                Err(e) => {
                    lost += 1;
                    (self.events)(
                        "guest_lost",
                        serde_json::json!({"vm": self.line, "guest": name, "error": format!("{why}; {e}")}),
                    );
                }
            }
        }
        if self.opts.verify {
            let vms: Vec<_> = self.session.with(|h| {
                h.moves
                    .iter()
                    .filter_map(|m| m.batch.as_ref().map(|b| b.vm.clone()))
                    .collect()
            });
            for v in vms {
                let _ = v.lock().unwrap().set_dirty_logging(false);
            }
        }
        self.session.with(|h| h.aborted());
        self.aged.set_control(control::ABORT);
        if let Some(s) = self.succ.take() {
            drop(s.drop_nested());
            drop(s.drop_memory());
            *s.session.lock().unwrap() = None;
            s.set_status(VmStatus::Stopped);
        }
        *self.aged.session.lock().unwrap() = None;
        *self.session.successor.lock().unwrap() = None;
        self.event(
            "successor_lost",
            serde_json::json!({"error": why, "moved_back": back, "lost": lost}),
        );
        RejuvenateError::RolledBack {
            vm: self.line.clone(),
            msg: format!("{why}; {back} guests that had moved were moved back"),
            guests: self.guests_now - lost,
            generation: self.generation,
        }
    }

    /// Pre-copy (precopy mode only): copies while the guests keep running
    /// under the aged L1. Invariant: still phase Ready, no guest held.
    fn precopy(&mut self) -> Result<(), RejuvenateError> {
        if self.opts.mode != Mode::Precopy {
            return Ok(());
        }
        let vms = self.aged.nested.lock().unwrap().snapshot();
        self.progress(JobPhase::Precopy);
        match crate::migration::copy::precopy_live_with(
            &vms,
            self.opts.downtime_budget,
            self.opts.progress.as_ref(),
        ) {
            Ok((copies, stats)) => {
                self.session.with(|h| h.bytes_copied += stats.live_bytes);
                *self.session.precopied.lock().unwrap() = copies;
                self.precopy = Some(stats);
                Ok(())
            }
            Err(e) => {
                for v in &vms {
                    let _ = v.lock().unwrap().set_dirty_logging(false);
                }
                Err(self.rollback(e.to_string()))
            }
        }
    }

    /// Ready → HandingOver → AgedDone: asks the aged L1 to hand over and
    /// waits (bounded by `timeout`) until it is done, aborts, or either
    /// side dies. Invariant on success: every live guest is held and
    /// completely adopted, the successor is alive.
    fn hand_over(&mut self) -> Result<(), Failure> {
        if !self.session.with(|h| h.ask()) {
            return Err(Failure::Other(format!(
                "cannot hand over in phase {:?}",
                self.session.phase()
            )));
        }
        self.event("handing_over", serde_json::json!({}));
        self.progress(JobPhase::HandingOver);
        let f = self.opts.fault;
        self.aged
            .set_control(if f & fault::AGED_CRASH_AFTER_FIRST != 0 {
                control::HANDOVER_THEN_CRASH
            } else if f & fault::AGED_LIE_STATE != 0 {
                control::HANDOVER_LIE_STATE
            } else if f & fault::AGED_SPAM_DONE != 0 {
                control::HANDOVER_SPAM_DONE
            } else {
                control::HANDOVER
            });
        let done = if let Some(m) = self.aged_dead() {
            Err(m)
        } else {
            self.session.wait_phase(
                self.opts.timeout,
                |p| matches!(p, Phase::AgedDone | Phase::Aborted(_)),
                || {
                    self.succ_dead()
                        .or_else(|| self.aged_dead())
                        .or_else(|| self.cancelled())
                },
            )
        };
        match done {
            Ok(Phase::AgedDone) => {}
            // The aged L1 died: its guests cannot go back to it, so L0
            // finishes the handover itself.
            Err(m) if self.aged_dead().is_some() => return Err(Failure::AgedDied(m)),
            Ok(Phase::Aborted(m)) => return Err(Failure::Other(m)),
            Ok(p) => return Err(Failure::Other(format!("unexpected phase {p:?}"))),
            Err(m) => return Err(Failure::Other(m)),
        }
        // The successor must still be alive to take the guests; otherwise
        // the aged L1 (waiting inside HANDOVER_DONE) gets them back.
        if let Some(m) = self.succ_dead() {
            return Err(Failure::Other(m));
        }
        self.event(
            "aged_done",
            serde_json::json!({"guests": self.session.with(|h| h.moves.len())}),
        );
        Ok(())
    }

    /// The aged L1 died mid-handover: L0 takes its side of the protocol
    /// (`rescue::rescue`). If the successor fails that too, it is stopped
    /// and destroyed, the guests go back to L0's keeping, and L0 tries once
    /// more with a second fresh successor (the VMM's own image, no fault
    /// flags). If that fails as well, the guests are lost: each is
    /// destroyed and reported with a `guest_lost` event. Invariant on
    /// success: phase AgedDone, as after a normal hand over.
    fn rescue(&mut self, why: String) -> Result<(), RejuvenateError> {
        self.event("rescue", serde_json::json!({"cause": why}));
        let first = match self.succ_dead() {
            Some(m) => Err(m),
            None => crate::migration::rescue::rescue(&self.session, self.succ()),
        };
        let first_err = match first {
            Ok(n) => {
                self.rescued = Some(n);
                return Ok(());
            }
            Err(m) => m,
        };
        self.event(
            "rescue_failed",
            serde_json::json!({"error": first_err, "retry": true}),
        );
        self.discard_successor(&first_err);
        // Second attempt: a fresh session and successor, L0 on the aged side.
        self.session = Self::new_session(self.aged, self.opts);
        let second = match self.boot_with(0, self.hypervisor) {
            Ok(()) if self.session.with(|h| h.ask()) => {
                crate::migration::rescue::rescue(&self.session, self.succ())
            }
            Ok(()) => Err("cannot hand over".into()),
            Err(e) => Err(e.to_string()),
        };
        match second {
            Ok(n) => {
                self.rescued = Some(n);
                Ok(())
            }
            Err(m) => {
                if self.succ.is_some() {
                    self.discard_successor(&m);
                }
                Err(self.lose_guests(format!("{why}; then {first_err}; then {m}")))
            }
        }
    }

    /// A successor that failed a rescue: Aborting, stop it, take back what
    /// it adopted (into the dead aged VM's table, unfrozen so a new grant
    /// can take them), destroy it and break the session's reference cycle.
    fn discard_successor(&mut self, why: &str) {
        self.session.with(|h| h.begin_abort(why));
        handover::give_back(&self.session, self.aged);
        self.session.with(|h| h.aborted());
        if let Some(s) = self.succ.take() {
            drop(s.drop_nested());
            drop(s.drop_memory());
            *s.session.lock().unwrap() = None;
            s.set_status(VmStatus::Stopped);
        }
        *self.session.successor.lock().unwrap() = None;
        *self.aged.session.lock().unwrap() = None;
    }

    /// Nobody can run the dead aged L1's guests: destroy them (their memory
    /// is released) and report each one.
    fn lose_guests(&mut self, msg: String) -> RejuvenateError {
        *self.aged.session.lock().unwrap() = None;
        *self.session.successor.lock().unwrap() = None;
        let vms = self.aged.drop_nested();
        let names: Vec<String> = vms
            .iter()
            .filter_map(|v| v.lock().unwrap().record.as_ref().map(|r| r.name.clone()))
            .collect();
        for n in &names {
            (self.events)(
                "guest_lost",
                serde_json::json!({"vm": self.line, "guest": n, "error": msg}),
            );
        }
        drop(vms);
        RejuvenateError::Rescue {
            vm: self.line.clone(),
            msg,
            lost: names.len(),
        }
    }

    /// With `verify`: hashes every guest through the successor's nested VM
    /// and compares with the hash taken at grant. Invariant: phase still
    /// AgedDone, nothing revoked; a mismatch is a rollback.
    fn verify(&mut self) -> Result<(), String> {
        if !self.opts.verify {
            return Ok(());
        }
        self.progress(JobPhase::Verifying);
        let moves: Vec<GuestMove> = self.session.with(|h| h.moves.clone());
        if self.opts.fault & fault::FLIP_BYTE_BEFORE_VERIFY != 0 {
            flip_first_granted(&moves, self.succ());
        }
        for m in &moves {
            let n = m
                .succ
                .as_ref()
                .and_then(|side| self.succ().nested_vm(side.handle as u64));
            let t = Instant::now();
            let sum = n.and_then(|n| {
                let n = n.lock().unwrap();
                n.record
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(r, &m.record))
                    .then(|| n.checksum_all())
            });
            self.session.with(|h| h.verify_time += t.elapsed());
            match sum {
                Some(a) if Some(a) == m.checksum_before => {
                    self.after_sums.push((m.guest.clone(), a))
                }
                Some(a) => {
                    return Err(format!(
                    "memory of {} differs after the move (checksum {:016x} before, {a:016x} after)",
                    m.guest,
                    m.checksum_before.unwrap_or(0)
                ))
                }
                None => return Err(format!("the successor did not adopt {}", m.guest)),
            }
        }
        self.event("verified", serde_json::json!({"guests": moves.len()}));
        Ok(())
    }

    /// AgedDone → Committing, then revokes the aged VM: no vCPU, nested VM
    /// or slot of it survives, and its unused pages are punched. Invariant:
    /// past the commit point; the aged L1 can reach no page any more.
    fn revoke(&mut self) -> Revoked {
        self.session.with(|h| h.commit());
        let aged = self.aged;
        aged.stop_vcpus();
        aged.mark_retired();
        let allocated_before = aged.ram_file.allocated_bytes() + aged.pool_file.allocated_bytes();
        // Slots go now (the aged VM can no longer reach any page); the host
        // mappings and the nested KVM VMs are torn down after commit, off
        // the critical path, by the reaper.
        let nested = aged.drop_nested();
        let regions = aged.drop_memory();
        let mut keep: Vec<(u64, u64)> = Vec::new();
        let succ_table = self.succ().nested.lock().unwrap().snapshot();
        for n in &succ_table {
            for s in &n.lock().unwrap().slots {
                if Arc::ptr_eq(&s.file, &aged.pool_file) {
                    keep.push((s.file_offset, s.len));
                }
            }
        }
        keep.sort();
        let mut at = 0;
        for (off, len) in keep {
            if off > at {
                let _ = aged.pool_file.punch_hole(at, off - at);
            }
            at = at.max(off + len);
        }
        let _ = aged
            .pool_file
            .punch_hole(at, aged.pool_file.size.saturating_sub(at));
        let _ = aged.ram_file.punch_hole(0, aged.ram_file.size);
        let allocated_after = aged.ram_file.allocated_bytes() + aged.pool_file.allocated_bytes();
        *aged.session.lock().unwrap() = None;
        self.event("revoked", serde_json::json!({}));
        Revoked {
            nested,
            regions,
            released: allocated_before.saturating_sub(allocated_after),
        }
    }

    /// Committing → done: binds every guest to the successor, applies the
    /// adopted slots' new L1 addresses, unfreezes them, writes COMMIT, and
    /// waits (bounded) until each has run once. Invariant: every guest is
    /// in the successor's table, bound to it, runnable; the session is
    /// detached from both VMs.
    fn commit(&mut self, revoked: Revoked) -> (Report, Arc<HostVm>) {
        let succ = self.succ().clone();
        let moves: Vec<GuestMove> = self.session.with(|h| h.moves.clone());
        for m in moves.iter().filter(|m| m.batch.is_none()) {
            let Some(side) = &m.succ else { continue };
            let Some(n) = succ.nested_vm(side.handle as u64) else {
                continue;
            };
            let mut n = n.lock().unwrap();
            if side.adopted {
                for (i, l1) in side.slot_l1.iter().enumerate() {
                    if let Some(l1) = l1 {
                        n.set_slot_l1(i, *l1);
                    }
                }
            }
            let mut info = m.record.info.lock().unwrap();
            info.bound_vm = succ.id;
            info.handle = n.handle;
            info.host_vm = succ.spec.line.clone();
            info.generation = succ.spec.generation;
            info.moves += 1;
            info.paused_at = Some(m.paused_at);
            info.resumed_at = None;
            drop(info);
            n.frozen = false;
            if n.state == NestedState::Crashed {
                n.state = NestedState::Created;
            }
        }
        *succ.session.lock().unwrap() = None;
        succ.set_control(control::COMMIT);
        let t_commit = Instant::now();
        // Off the critical path: the successor's own view of the granted
        // pages. Its guest hypervisor names them but does not touch them,
        // and a KVM slot costs time in proportion to its size, so in a batch
        // they are installed on a thread of their own after the report.
        let install = {
            let succ = succ.clone();
            move || {
                if let Err(e) = succ.install_deferred_slots() {
                    succ.console().write_line(
                        format!(
                            "vmbeam: cannot map granted memory into {}: {e}",
                            succ.name()
                        )
                        .as_bytes(),
                    );
                }
            }
        };
        if self.batch() {
            let _ = std::thread::Builder::new()
                .name("vmbeam-slots".into())
                .spawn(install);
        } else {
            install();
        }
        let Revoked {
            nested,
            regions,
            released,
        } = revoked;
        let reaper = std::thread::Builder::new()
            .name("vmbeam-reaper".into())
            .spawn(move || {
                drop(nested);
                drop(regions);
            })
            .ok();
        // Wait for every guest to run under the successor.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.shared.vm_events();
            let all = moves
                .iter()
                .all(|m| m.record.info.lock().unwrap().resumed_at.is_some());
            if all || Instant::now() >= deadline || self.succ_dead().is_some() {
                break;
            }
            self.shared.wait_vm_event(seen, Duration::from_millis(20));
        }
        if let Some(r) = reaper {
            let _ = r.join();
        }
        if self.opts.verify && !self.before_pages.is_empty() {
            self.verify_after();
        }
        let (verify_time, bytes_copied, channel_bytes) = self
            .session
            .with(|h| (h.verify_time, h.bytes_copied, h.channel_bytes));
        let report = Report {
            mode: self.opts.mode.as_str().into(),
            vm: self.line.clone(),
            from_generation: self.generation,
            to_generation: succ.spec.generation,
            boot_ms: ms(self.t_ready - self.t0),
            handover_ms: ms(t_commit - self.t_ready),
            total_ms: ms(self.t0.elapsed()),
            bytes_copied,
            channel_bytes,
            released_bytes: released,
            host_rss_before: self.rss_before,
            host_rss_after: rss_bytes(),
            cpu_ms: cpu_ms() - self.cpu0,
            verify_ms: ms(verify_time),
            guests: moves
                .iter()
                .map(|m| {
                    let info = m.record.info.lock().unwrap().clone();
                    // The guest-visible pause, nothing subtracted.
                    let downtime = info
                        .resumed_at
                        .map(|r| r.saturating_duration_since(m.paused_at));
                    GuestReport {
                        name: m.guest.clone(),
                        mem_bytes: m.mem_bytes,
                        downtime_us: downtime.map(|d| d.as_micros() as u64).unwrap_or(0),
                        checksum_before: m
                            .checksum_before
                            .or_else(|| self.batch_sum(&m.guest).map(|s| s.0))
                            .map(|c| format!("{c:016x}")),
                        checksum_after: self
                            .after_sums
                            .iter()
                            .find(|(name, _)| *name == m.guest)
                            .map(|(_, a)| *a)
                            .or_else(|| self.batch_sum(&m.guest).map(|s| s.1))
                            .map(|a| format!("{a:016x}")),
                        running_after: info.resumed_at.is_some() && info.bound_vm == succ.id,
                        moves: info.moves,
                        devices: m.devices,
                        device_in_flight: m.device_in_flight,
                    }
                })
                .collect(),
            precopy: self.precopy.clone(),
            rescued: self.rescued,
            transfer: None,
        };
        *self.session.successor.lock().unwrap() = None;
        if let Some(p) = &self.opts.progress {
            p.set_guests_done(report.guests.iter().filter(|g| g.running_after).count() as u64);
            if self.opts.mode == Mode::Copy {
                p.add_bytes(report.bytes_copied);
            }
        }
        self.event(
            "committed",
            serde_json::json!({"to_generation": succ.spec.generation, "guests": moves.len(),
                "total_ms": report.total_ms}),
        );
        (report, succ)
    }

    /// Any phase before Committing → Aborting → Aborted: stops the
    /// successor, gives back every guest it adopted, unfreezes every guest
    /// of the aged VM, and only then tells the aged L1 (it resumes its
    /// guests as soon as it sees ABORT); then destroys the successor and
    /// detaches the session from both sides. Invariant: every guest runs
    /// under the aged guest hypervisor; nothing of the successor is left.
    fn rollback(&mut self, msg: String) -> RejuvenateError {
        self.progress(JobPhase::RollingBack);
        self.session.with(|h| h.begin_abort(&msg));
        handover::give_back(&self.session, self.aged);
        if self.opts.mode == Mode::Precopy || self.batch() {
            let vms = self.aged.nested.lock().unwrap().snapshot();
            for v in vms {
                let _ = v.lock().unwrap().set_dirty_logging(false);
            }
        }
        self.session.with(|h| h.aborted());
        self.aged.set_control(control::ABORT);
        if let Some(s) = self.succ.take() {
            drop(s.drop_nested());
            drop(s.drop_memory());
            *s.session.lock().unwrap() = None;
            s.set_status(VmStatus::Stopped);
        }
        *self.aged.session.lock().unwrap() = None;
        *self.session.successor.lock().unwrap() = None;
        self.event("rolled_back", serde_json::json!({"error": msg}));
        RejuvenateError::RolledBack {
            vm: self.line.clone(),
            msg,
            guests: self.guests_now,
            generation: self.generation,
        }
    }
}
