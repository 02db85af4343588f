//! `vmbeam rejuvenate`: replacing a guest hypervisor by a freshly booted one
//! and moving every nested guest across without copying its memory.
//!
//! The orchestration is a short state machine driven by L0:
//! boot successor → (Ready) → ask aged L1 to hand over → (AgedDone) →
//! revoke the aged VM (stop vCPUs, destroy nested VMs, drop slots, release
//! pages) → commit (successor may now run the guests). Any failure before
//! commit rolls back: the successor is destroyed and every guest keeps
//! running under the aged guest hypervisor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::boot::{control, fault, ROLE_SUCCESSOR};

use crate::host::hostvm::{HostVm, VmStatus};
use crate::host::loader::FlatImage;
use crate::migration::handover::{self, Phase, Session};
use crate::nesting::nested::NestedState;
use crate::progress::{Phase as JobPhase, Progress};
use crate::shared::Shared;

/// How nested memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pages are remapped into the successor; nothing is copied.
    ZeroCopy,
    /// Stop-and-copy through L0.
    Copy,
    /// Iterative pre-copy with dirty logging.
    Precopy,
}

impl Mode {
    /// Name as on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::ZeroCopy => "zero-copy",
            Mode::Copy => "copy",
            Mode::Precopy => "precopy",
        }
    }
}

/// Options of one rejuvenation.
#[derive(Debug, Clone)]
pub struct RejuvenateOptions {
    /// Mode.
    pub mode: Mode,
    /// Fault-injection flags for the successor (tests).
    pub fault: u64,
    /// Hash every guest before and after (excluded from downtime).
    pub verify: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Pre-copy: stop iterating when the rest can be copied within this.
    pub downtime_budget: Duration,
    /// For tests and diagnostics: boot this guest hypervisor ELF as the
    /// successor instead of the VMM's image (`None`, the default, boots the
    /// VMM's own). Not settable through the HTTP API.
    pub successor_image: Option<Vec<u8>>,
    /// Progress to report to and the cancel flag to obey (jobs). A cancel
    /// is honoured at every point before commit: the handover rolls back.
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
    /// the handover in its place; the guests are paused in L0, not lost.
    #[error("rejuvenation of {vm} failed: {msg}; the nested guests are preserved, paused, in L0")]
    Rescue {
        /// VM.
        vm: String,
        /// Cause.
        msg: String,
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

/// Per-guest part of the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuestReport {
    /// Name.
    pub name: String,
    /// RAM bytes.
    pub mem_bytes: u64,
    /// Last exit under the aged L1 → first entry under the successor,
    /// minus verification hashing.
    pub downtime_us: u64,
    /// L0 hash of the whole guest memory when paused (hex).
    pub checksum_before: Option<String>,
    /// L0 hash of the whole guest memory before resuming (hex).
    pub checksum_after: Option<String>,
    /// Ran under the successor.
    pub running_after: bool,
    /// Moves so far.
    pub moves: u32,
}

/// Result of a rejuvenation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Mode.
    pub mode: String,
    /// Host VM line.
    pub vm: String,
    /// Generation retired.
    pub from_generation: u32,
    /// Generation now running.
    pub to_generation: u32,
    /// Successor boot, ms.
    pub boot_ms: f64,
    /// Handover (ask → commit), ms.
    pub handover_ms: f64,
    /// Whole operation, ms.
    pub total_ms: f64,
    /// Bytes of nested memory copied.
    pub bytes_copied: u64,
    /// Bytes the guest hypervisors exchanged on the channel.
    pub channel_bytes: u64,
    /// Host memory returned when the aged VM was released.
    pub released_bytes: u64,
    /// Resident set of L0 before.
    pub host_rss_before: u64,
    /// Resident set of L0 after.
    pub host_rss_after: u64,
    /// CPU time of L0 (all threads, including guest time) during the operation, ms.
    pub cpu_ms: f64,
    /// Time spent hashing for verification (excluded from downtime), ms.
    pub verify_ms: f64,
    /// Per guest.
    pub guests: Vec<GuestReport>,
    /// Pre-copy rounds (precopy mode only).
    pub precopy: Option<crate::migration::copy::PrecopyStats>,
    /// Guests L0 offered itself because the aged guest hypervisor died
    /// mid-handover (absent when it did not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescued: Option<usize>,
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// CPU time of this process (user + system), in ms.
pub fn cpu_ms() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Moves every nested guest of `aged` to a fresh guest hypervisor.
/// On success returns the report and the successor.
pub fn rejuvenate(
    shared: &Arc<Shared>,
    hypervisor: &[u8],
    modules: &[(u32, FlatImage)],
    aged: &Arc<HostVm>,
    opts: &RejuvenateOptions,
) -> Result<(Report, Arc<HostVm>), RejuvenateError> {
    let line = aged.spec.line.clone();
    let generation = aged.spec.generation;
    match aged.status() {
        VmStatus::Running => {}
        s => {
            return Err(RejuvenateError::NotRunning {
                vm: line,
                status: format!("{s:?}"),
            })
        }
    }
    let t0 = Instant::now();
    let rss_before = rss_bytes();
    let cpu0 = cpu_ms();

    // Fresh channel contents for this session.
    let channel = aged.channel_file();
    let _ = channel.punch_hole(0, channel.size);
    let session = Session::new(aged.clone(), channel.clone(), opts.verify, opts.mode);
    *aged.session.lock().unwrap() = Some(session.clone());

    let guests_now = aged.nested.lock().unwrap().vms.len();
    let progress = opts.progress.as_ref();
    let phase = |p: JobPhase| {
        tracing::info!(vm = %line, generation, "rejuvenation phase: {}", p.as_str());
        if let Some(pr) = progress {
            pr.set_phase(p);
        }
    };
    // Checked wherever the handover can still roll back.
    let cancelled = || {
        crate::progress::check(progress)
            .err()
            .map(|e| e.to_string())
    };
    if let Some(p) = progress {
        p.set_guests_total(guests_now as u64);
        if opts.mode != Mode::ZeroCopy {
            let total: u64 = aged
                .nested
                .lock()
                .unwrap()
                .vms
                .values()
                .map(|v| v.lock().unwrap().mem_bytes())
                .sum();
            p.set_bytes_total(total);
        }
    }
    phase(JobPhase::Booting);
    let rollback = |session: &Arc<Session>, succ: Option<&Arc<HostVm>>, msg: String| {
        phase(JobPhase::RollingBack);
        // Order matters: the successor stops first, then every guest it was
        // adopting goes back and is unfrozen, and only then is the aged L1
        // told (it resumes its guests as soon as it sees ABORT).
        if let Some(s) = succ {
            s.stop_vcpus();
            handover::return_adopted(aged, s);
        }
        handover::unfreeze(aged);
        if opts.mode == Mode::Precopy {
            for v in aged.nested.lock().unwrap().vms.values() {
                let _ = v.lock().unwrap().set_dirty_logging(false);
            }
        }
        if !matches!(session.phase(), Phase::Aborted(_)) {
            session.set_phase(Phase::Aborted(msg.clone()));
        }
        aged.set_control(control::ABORT);
        if let Some(s) = succ {
            drop(s.drop_nested());
            drop(s.drop_memory());
            *s.session.lock().unwrap() = None;
            s.set_status(VmStatus::Stopped);
        }
        *aged.session.lock().unwrap() = None;
        *session.successor.lock().unwrap() = None;
        RejuvenateError::RolledBack {
            vm: line.clone(),
            msg,
            guests: guests_now,
            generation,
        }
    };

    // 1. Boot the successor.
    let mut spec = aged.spec.clone();
    spec.generation += 1;
    spec.role = ROLE_SUCCESSOR;
    spec.nested.clear();
    spec.flags = opts.fault;
    let succ = match HostVm::boot(
        shared.clone(),
        spec,
        opts.successor_image.as_deref().unwrap_or(hypervisor),
        modules,
        channel,
        Some(session.clone()),
    ) {
        Ok(s) => s,
        Err(e) => {
            *aged.session.lock().unwrap() = None;
            return Err(RejuvenateError::Boot {
                vm: line,
                msg: e.to_string(),
                generation,
            });
        }
    };
    *session.successor.lock().unwrap() = Some(succ.clone());
    let succ_dead = || match succ.status() {
        VmStatus::Failed(m) => Some(format!("the successor died: {m}")),
        VmStatus::Stopped | VmStatus::Retired => Some("the successor stopped".into()),
        _ => None,
    };
    let aged_dead = || match aged.status() {
        VmStatus::Failed(m) => Some(format!("the aged guest hypervisor died: {m}")),
        _ => None,
    };
    // (If the aged L1 dies meanwhile, its guests still need the successor.)
    let boot_wait = session.wait_phase(
        opts.timeout.min(Duration::from_secs(30)),
        |p| *p == Phase::Ready,
        || succ_dead().or_else(cancelled),
    );
    if let Err(m) = boot_wait {
        return Err(rollback(
            &session,
            Some(&succ),
            format!("the successor did not become ready: {m}"),
        ));
    }
    let t_ready = Instant::now();
    if let Some(m) = cancelled() {
        return Err(rollback(&session, Some(&succ), m));
    }

    // Pre-copy: copy while the guests keep running under the aged L1.
    let mut precopy = None;
    if opts.mode == Mode::Precopy {
        phase(JobPhase::Precopy);
        let vms: Vec<_> = aged.nested.lock().unwrap().vms.values().cloned().collect();
        match crate::migration::copy::precopy_live_with(&vms, opts.downtime_budget, progress) {
            Ok((copies, stats)) => {
                session.st.lock().unwrap().bytes_copied += stats.live_bytes;
                *session.precopied.lock().unwrap() = copies;
                precopy = Some(stats);
            }
            Err(e) => {
                for v in &vms {
                    let _ = v.lock().unwrap().set_dirty_logging(false);
                }
                return Err(rollback(&session, Some(&succ), e.to_string()));
            }
        }
    }

    // 2. Ask the aged guest hypervisor to hand over.
    if let Some(m) = cancelled() {
        return Err(rollback(&session, Some(&succ), m));
    }
    phase(JobPhase::HandingOver);
    session.set_phase(Phase::HandingOver);
    aged.set_control(if opts.fault & fault::AGED_CRASH_AFTER_FIRST != 0 {
        control::HANDOVER_THEN_CRASH
    } else {
        control::HANDOVER
    });
    let done = if aged_dead().is_some() {
        Err(String::new())
    } else {
        session.wait_phase(
            opts.timeout,
            |p| matches!(p, Phase::AgedDone | Phase::Aborted(_)),
            || succ_dead().or_else(aged_dead).or_else(cancelled),
        )
    };
    let mut rescued = None;
    match done {
        Ok(Phase::AgedDone) => {}
        // The aged L1 died: its guests cannot go back to it, so L0 finishes
        // the handover itself (the successor is alive and ready).
        Err(_) if aged_dead().is_some() && succ_dead().is_none() => {
            match crate::migration::rescue::rescue(&session, &succ) {
                Ok(n) => rescued = Some(n),
                Err(m) => {
                    return Err(RejuvenateError::Rescue {
                        vm: line.clone(),
                        msg: format!("{}; then {m}", aged_dead().unwrap_or_default()),
                    })
                }
            }
        }
        Ok(Phase::Aborted(m)) => return Err(rollback(&session, Some(&succ), m)),
        Ok(p) => {
            return Err(rollback(
                &session,
                Some(&succ),
                format!("unexpected phase {p:?}"),
            ))
        }
        Err(m) => return Err(rollback(&session, Some(&succ), m)),
    }

    // The successor must still be alive to take the guests; otherwise the
    // aged L1 (waiting inside HANDOVER_DONE) gets them back.
    if let Some(m) = succ_dead() {
        return Err(rollback(&session, Some(&succ), m));
    }
    // Verify before anything is revoked: a guest whose memory differs on
    // the successor's side is not committed (all guests go back).
    let mut after_sums: Vec<(String, u64)> = Vec::new();
    if opts.verify {
        phase(JobPhase::Verifying);
        let grants = session.st.lock().unwrap().grants.clone();
        let table: Vec<_> = succ.nested.lock().unwrap().vms.values().cloned().collect();
        for g in &grants {
            let t = Instant::now();
            let sum = table.iter().find_map(|n| {
                let n = n.lock().unwrap();
                n.record
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(r, &g.record))
                    .then(|| n.checksum_all())
            });
            session.st.lock().unwrap().verify_time += t.elapsed();
            match sum {
                Some(a) if Some(a) == g.checksum_before => after_sums.push((g.guest.clone(), a)),
                Some(a) => {
                    let m = format!(
                        "memory of {} differs after the move (checksum {:016x} before, {a:016x} after)",
                        g.guest,
                        g.checksum_before.unwrap_or(0)
                    );
                    return Err(rollback(&session, Some(&succ), m));
                }
                None => {
                    let m = format!("the successor did not adopt {}", g.guest);
                    return Err(rollback(&session, Some(&succ), m));
                }
            }
        }
    }
    // Last point where a cancel rolls back.
    if let Some(m) = cancelled() {
        return Err(rollback(&session, Some(&succ), m));
    }
    phase(JobPhase::Committing);
    session.set_phase(Phase::Committing);

    // 3. Revoke the aged VM: no vCPU, no nested VM, no slot survives.
    aged.stop_vcpus();
    aged.mark_retired();
    let allocated_before = aged.ram_file.allocated_bytes() + aged.pool_file.allocated_bytes();
    // Slots go now (the aged VM can no longer reach any page); the host
    // mappings and the nested KVM VMs are torn down after commit, off the
    // critical path, by the reaper below.
    let reap_nested = aged.drop_nested();
    let reap_regions = aged.drop_memory();
    let grants = session.st.lock().unwrap().grants.clone();
    let mut keep: Vec<(u64, u64)> = Vec::new();
    let succ_table: Vec<_> = succ.nested.lock().unwrap().vms.values().cloned().collect();
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

    // 4. Verify and commit.
    let mut guests = Vec::new();
    for g in &grants {
        let n = succ_table.iter().find(|n| {
            n.lock()
                .unwrap()
                .record
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &g.record))
        });
        let after = after_sums
            .iter()
            .find(|(name, _)| *name == g.guest)
            .map(|(_, a)| *a);
        if let Some(n) = n {
            let mut n = n.lock().unwrap();
            let mut info = g.record.info.lock().unwrap();
            info.bound_vm = succ.id;
            info.handle = n.handle;
            info.host_vm = succ.spec.line.clone();
            info.generation = succ.spec.generation;
            info.moves += 1;
            info.paused_at = Some(g.paused_at);
            info.resumed_at = None;
            n.adopted_from = None;
            n.frozen = false;
            if n.state == NestedState::Crashed {
                n.state = NestedState::Created;
            }
        }
        guests.push((g.clone(), after));
    }
    *succ.session.lock().unwrap() = None;
    succ.set_control(control::COMMIT);
    let t_commit = Instant::now();
    // Off the critical path: the successor's own view of the granted pages.
    if let Err(e) = succ.install_deferred_slots() {
        succ.console().write_line(
            format!(
                "vmbeam: cannot map granted memory into {}: {e}",
                succ.name()
            )
            .as_bytes(),
        );
    }

    let reaper = std::thread::Builder::new()
        .name("vmbeam-reaper".into())
        .spawn(move || {
            drop(reap_nested);
            drop(reap_regions);
        })
        .ok();

    // 5. Wait for every guest to run under the successor.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = shared.vm_events();
        let all = grants
            .iter()
            .all(|g| g.record.info.lock().unwrap().resumed_at.is_some());
        if all || Instant::now() >= deadline || succ_dead().is_some() {
            break;
        }
        shared.wait_vm_event(seen, Duration::from_millis(20));
    }
    if let Some(r) = reaper {
        let _ = r.join();
    }
    let st = session.st.lock().unwrap();
    let verify_time = st.verify_time;
    let report = Report {
        mode: opts.mode.as_str().into(),
        vm: line.clone(),
        from_generation: generation,
        to_generation: succ.spec.generation,
        boot_ms: ms(t_ready - t0),
        handover_ms: ms(t_commit - t_ready),
        total_ms: ms(t0.elapsed()),
        bytes_copied: st.bytes_copied,
        channel_bytes: st.channel_bytes,
        released_bytes: allocated_before.saturating_sub(allocated_after),
        host_rss_before: rss_before,
        host_rss_after: rss_bytes(),
        cpu_ms: cpu_ms() - cpu0,
        verify_ms: ms(verify_time),
        guests: guests
            .into_iter()
            .map(|(g, after)| {
                let info = g.record.info.lock().unwrap().clone();
                let downtime = info
                    .resumed_at
                    .map(|r| (r - g.paused_at).saturating_sub(verify_time));
                GuestReport {
                    name: g.guest.clone(),
                    mem_bytes: g.mem_bytes,
                    downtime_us: downtime.map(|d| d.as_micros() as u64).unwrap_or(0),
                    checksum_before: g.checksum_before.map(|c| format!("{c:016x}")),
                    checksum_after: after.map(|c| format!("{c:016x}")),
                    running_after: info.resumed_at.is_some() && info.bound_vm == succ.id,
                    moves: info.moves,
                }
            })
            .collect(),
        precopy,
        rescued,
    };
    drop(st);
    if let Some(p) = progress {
        p.set_guests_done(report.guests.iter().filter(|g| g.running_after).count() as u64);
        if opts.mode == Mode::Copy {
            p.add_bytes(report.bytes_copied);
        }
    }
    *session.successor.lock().unwrap() = None;
    Ok((report, succ))
}
