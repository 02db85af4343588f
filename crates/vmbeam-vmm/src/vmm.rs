//! The VMM as a whole: the lines of host VMs it runs (a line keeps its name
//! while its guest hypervisor is replaced generation after generation), the
//! control operations the CLI and API call (rejuvenate, inspect, checksum),
//! the status tree with each line's history of retired generations, and the
//! events file those operations report to.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmbeam_abi::boot::{NestedSpec, ROLE_PRIMARY};

use crate::base::sync::{Rank, RankedMutex};
use crate::config::{ConfigError, VmmConfig};
use crate::control::events::{unix_ms, EventLog};
use crate::control::inspect::{self, InspectError, Inspection, Registers};
use crate::control::policy::Trigger;
pub use crate::control::status::{HostVmStatus, NestedStatus, RetiredGeneration, Status};
use crate::devices::binding::{BindError, Bindings};
use crate::host::console::ConsoleTarget;
use crate::host::images::Images;
use crate::host::memory::MemFile;
use crate::l1::hostvm::Shared;
use crate::l1::hostvm::{HostVm, HostVmError, HostVmSpec, VmStatus};
use crate::l1::shared::KvmError;
use crate::migration::rejuvenate::{self, Mode, RejuvenateError, RejuvenateOptions, Report};
use crate::nesting::nested::NestedRef;

/// Errors of VMM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM unavailable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device binding cannot be used.
    #[error(transparent)]
    Devices(#[from] BindError),
    /// Only a zero-copy rejuvenation keeps a guest's devices with it.
    #[error("nested guest(s) {guests} have virtio devices; {what} does not move device state yet (use the zero-copy mode)")]
    DevicesStay {
        /// The guests.
        guests: String,
        /// The operation refused.
        what: String,
    },
    /// A host VM could not be built.
    #[error(transparent)]
    Boot(#[from] HostVmError),
    /// Unknown host VM (the name comes from a client: control characters
    /// are escaped so the message stays one line).
    #[error("no host VM named '{}'", .0.escape_debug())]
    NoSuchVm(String),
    /// Unknown nested guest (escaped like `NoSuchVm`).
    #[error("no nested guest named '{}'", .0.escape_debug())]
    NoSuchGuest(String),
    /// Another rejuvenation is running.
    #[error("a rejuvenation or migration is already running; try again when it ends")]
    Busy,
    /// Host-to-host migration failed; the source keeps running.
    #[error(transparent)]
    Remote(#[from] crate::migration::remote::RemoteError),
    /// Rejuvenation failed (rolled back).
    #[error(transparent)]
    Rejuvenate(#[from] RejuvenateError),
    /// Inspection failed.
    #[error("cannot inspect {guest}: {msg}")]
    Inspect {
        /// Guest.
        guest: String,
        /// Why.
        msg: String,
    },
    /// The range asked for is not (all) memory of the guest.
    #[error("cannot inspect {guest}: {msg}")]
    Unmapped {
        /// Guest.
        guest: String,
        /// Which range.
        msg: String,
    },
    /// An inspect request is malformed (length, numbers).
    #[error(transparent)]
    InspectRequest(#[from] InspectError),
}

/// Names of `vm`'s nested guests that have devices.
fn guests_with_devices(vm: &HostVm) -> Vec<String> {
    let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    let mut out: Vec<String> = vms
        .iter()
        .filter_map(|n| {
            let n = n.lock().unwrap();
            (!n.devices.is_empty()).then(|| n.name.clone())
        })
        .collect();
    out.sort();
    out
}

/// How long [`Vmm::inspect`] keeps trying for registers while the vCPU is
/// in the middle of an exit, before it answers "busy".
pub const BUSY_RETRY: Duration = Duration::from_millis(200);

/// Retired generations kept per line.
pub const HISTORY_LEN: usize = 16;

/// A host VM line: a name whose guest hypervisor is replaced over time.
pub struct Line {
    /// Name.
    pub name: String,
    /// The host VM serving it now.
    pub current: RankedMutex<Arc<HostVm>>,
    /// The last [`HISTORY_LEN`] retired generations, oldest first.
    pub retired: RankedMutex<VecDeque<RetiredGeneration>>,
}

/// What [`Vmm::start_with`] changes from the configuration.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Boot this guest hypervisor ELF instead of the VMM's (tests).
    pub hypervisor: Option<Vec<u8>>,
    /// `BootInfo.flags` (test fault injection and modes; 0 normally).
    pub flags: u64,
    /// Nested guests to start instead of the configured number.
    pub nested: Option<u32>,
}

/// The VMM.
pub struct Vmm {
    /// Host-wide services.
    pub shared: Arc<Shared>,
    /// Guest images.
    pub images: Images,
    /// Configuration.
    pub config: VmmConfig,
    lines: RankedMutex<Vec<Arc<Line>>>,
    busy: Arc<AtomicBool>,
    /// Jobs started through the API (long operations and their progress).
    pub jobs: crate::control::jobs::Jobs,
    /// Counters behind `GET /api/v1/metrics`.
    pub metrics: crate::control::metrics::Counters,
    rejuvenating: AtomicBool,
    events: OnceLock<Arc<EventLog>>,
    policy: RankedMutex<String>,
    reuse: OnceLock<Arc<crate::migration::reuse::ReuseCache>>,
}

/// The right to run the one rejuvenation or migration that may run at a
/// time ([`Vmm::exclusive`]); given back when dropped. It can move to the
/// thread that runs the operation.
#[derive(Debug)]
pub struct Exclusive(Arc<AtomicBool>);

impl Drop for Exclusive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Raises this process's soft limit on open files to its hard limit: every
/// nested VM costs a few descriptors (KVM VM, vCPUs, console), and the
/// per-host-VM bounds are sized against the hard limit, not a shell's
/// default of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Clears a flag when dropped.
struct FlagGuard<'a>(&'a AtomicBool);
impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Vmm {
    /// Checks the configuration and opens KVM.
    pub fn new(config: VmmConfig, images: Images) -> Result<Vmm, VmmError> {
        config.validate()?;
        let target = if config.quiet {
            ConsoleTarget::Off
        } else if let Some(d) = &config.console_dir {
            ConsoleTarget::Dir(d.clone())
        } else {
            ConsoleTarget::Terminal
        };
        raise_fd_limit();
        let shared = Shared::new(target, Arc::new(crate::hypercall::handlers::Handlers))?;
        let names: Vec<String> = (0..config.nested).map(|i| format!("l2-{i}")).collect();
        shared.set_bindings(Bindings::open(&config.devices, &names)?);
        Ok(Vmm {
            shared,
            images,
            config,
            lines: RankedMutex::new(Rank::Lines, Vec::new()),
            busy: Arc::new(AtomicBool::new(false)),
            jobs: Default::default(),
            metrics: Default::default(),
            rejuvenating: AtomicBool::new(false),
            events: OnceLock::new(),
            policy: RankedMutex::new(Rank::Signal, "manual".into()),
            reuse: OnceLock::new(),
        })
    }

    /// Boots host VM `name` with the configured nested guests.
    pub fn start(&self, name: &str) -> Result<Arc<HostVm>, VmmError> {
        self.start_with(name, &StartOptions::default())
    }

    /// Boots host VM `name`, with `opts` changing what the configuration
    /// says (tests run another guest hypervisor beside the real one).
    pub fn start_with(&self, name: &str, opts: &StartOptions) -> Result<Arc<HostVm>, VmmError> {
        crate::config::check_line_name(name)?;
        let c = &self.config;
        let mut nested = Vec::new();
        for i in 0..opts.nested.unwrap_or(c.nested) {
            let w = c.workloads[i as usize % c.workloads.len()];
            let module = self.images.module_index(w.kind()).unwrap_or(0);
            nested.push(NestedSpec {
                name: vmbeam_abi::name_to_bytes(&format!("l2-{i}")),
                mem_bytes: c.nested_mem,
                module,
                _pad: 0,
                seed: 0x5eed_0000 + i as u64,
                param0: c.workload_param,
                param1: c.workload_param1,
            });
        }
        let spec = HostVmSpec {
            line: name.to_string(),
            generation: 1,
            role: ROLE_PRIMARY,
            ram: c.ram,
            pool: c.pool_size(),
            vcpus: c.vcpus,
            nested,
            flags: opts.flags,
            slice_us: c.slice_us,
            age_leak_pages: c.age_leak_pages,
        };
        let channel = MemFile::new(&format!("{name}-channel"), vmbeam_abi::layout::CHANNEL_SIZE)
            .map_err(|source| HostVmError::Memory {
                vm: name.to_string(),
                source,
            })?;
        let vm = HostVm::boot(
            self.shared.clone(),
            spec,
            opts.hypervisor
                .as_deref()
                .unwrap_or(&self.images.hypervisor),
            &self.images.modules,
            channel,
            None,
        )?;
        self.lines.lock().unwrap().push(Arc::new(Line {
            name: name.to_string(),
            current: RankedMutex::new(Rank::Line, vm.clone()),
            retired: RankedMutex::new(Rank::Line, VecDeque::new()),
        }));
        Ok(vm)
    }

    /// The line called `name` (or the only/first one).
    pub fn line(&self, name: Option<&str>) -> Result<Arc<Line>, VmmError> {
        let lines = self.lines.lock().unwrap();
        match name {
            Some(n) => lines
                .iter()
                .find(|l| l.name == n)
                .cloned()
                .ok_or_else(|| VmmError::NoSuchVm(n.to_string())),
            None => lines
                .first()
                .cloned()
                .ok_or_else(|| VmmError::NoSuchVm("(none running)".into())),
        }
    }

    /// The host VM serving line `name` now.
    pub fn current(&self, name: Option<&str>) -> Result<Arc<HostVm>, VmmError> {
        Ok(self.line(name)?.current.lock().unwrap().clone())
    }

    /// Every line and the host VM serving it now.
    pub fn current_vms(&self) -> Vec<(String, Arc<HostVm>)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| (l.name.clone(), l.current.lock().unwrap().clone()))
            .collect()
    }

    /// Rejuvenates line `name` on request (the retired generation is
    /// recorded with reason `manual`).
    pub fn rejuvenate(
        &self,
        name: Option<&str>,
        opts: &RejuvenateOptions,
    ) -> Result<Report, VmmError> {
        self.rejuvenate_because(name, opts, &Trigger::Manual)
    }

    /// Rejuvenates line `name` for `trigger`: records the retired generation
    /// in the line's history and logs the report (or the failure) to the
    /// events file, if one is set.
    pub fn rejuvenate_because(
        &self,
        name: Option<&str>,
        opts: &RejuvenateOptions,
        trigger: &Trigger,
    ) -> Result<Report, VmmError> {
        let excl = self.exclusive()?;
        self.rejuvenate_exclusive(excl, name, opts, trigger)
    }

    /// Takes the right to run a rejuvenation or migration, or fails with
    /// [`VmmError::Busy`] if one runs.
    pub fn exclusive(&self) -> Result<Exclusive, VmmError> {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .map_err(|_| VmmError::Busy)?;
        Ok(Exclusive(self.busy.clone()))
    }

    /// [`Vmm::rejuvenate_because`] with the right to run already taken
    /// (a job takes it when it is accepted, so a second one gets 409).
    pub fn rejuvenate_exclusive(
        &self,
        excl: Exclusive,
        name: Option<&str>,
        opts: &RejuvenateOptions,
        trigger: &Trigger,
    ) -> Result<Report, VmmError> {
        let res = self.rejuvenate_inner(name, opts, trigger);
        drop(excl);
        self.metrics.rejuvenation(match &res {
            Ok(r) => Ok(r),
            Err(VmmError::Rejuvenate(e)) => Err(Some(e)),
            Err(_) => Err(None),
        });
        let mut fields = serde_json::json!({
            "vm": name,
            "trigger": trigger.as_str(),
            "reason": trigger.detail(),
        });
        match &res {
            Ok(r) => {
                tracing::info!(
                    trigger = trigger.as_str(),
                    "{} rejuvenated ({}): generation {} -> {} in {:.1} ms",
                    r.vm,
                    r.mode,
                    r.from_generation,
                    r.to_generation,
                    r.total_ms
                );
                fields["vm"] = r.vm.clone().into();
                fields["report"] = serde_json::to_value(r).unwrap_or_default();
                self.event("rejuvenated", fields);
            }
            Err(e) => {
                tracing::error!(trigger = trigger.as_str(), "{e}");
                fields["error"] = e.to_string().into();
                self.event("rejuvenate_failed", fields);
            }
        }
        res
    }

    fn rejuvenate_inner(
        &self,
        name: Option<&str>,
        opts: &RejuvenateOptions,
        trigger: &Trigger,
    ) -> Result<Report, VmmError> {
        self.rejuvenating.store(true, Ordering::SeqCst);
        let _flag = FlagGuard(&self.rejuvenating);
        let line = self.line(name)?;
        let aged = line.current.lock().unwrap().clone();
        if opts.mode != Mode::ZeroCopy {
            let with = guests_with_devices(&aged);
            if !with.is_empty() {
                return Err(VmmError::DevicesStay {
                    guests: with.join(", "),
                    what: format!("a {} rejuvenation", opts.mode.as_str()),
                });
            }
        }
        let events = |event: &str, fields: serde_json::Value| self.event(event, fields);
        let (report, succ) = rejuvenate::rejuvenate(
            &self.shared,
            &self.images.hypervisor,
            &self.images.modules,
            &aged,
            opts,
            &events,
        )?;
        let retired = RetiredGeneration {
            generation: aged.spec.generation,
            uptime_ms: aged.started.elapsed().as_millis() as u64,
            reason: trigger.as_str().into(),
            detail: trigger.detail().map(str::to_string),
            retired_at_ms: unix_ms(),
            health: aged.health.lock().unwrap().named(),
        };
        *line.current.lock().unwrap() = succ;
        let mut hist = line.retired.lock().unwrap();
        hist.push_back(retired);
        while hist.len() > HISTORY_LEN {
            hist.pop_front();
        }
        Ok(report)
    }

    /// True while a rejuvenation runs.
    pub fn is_rejuvenating(&self) -> bool {
        self.rejuvenating.load(Ordering::SeqCst)
    }

    /// Sends events (rejuvenation reports, failures, policy decisions) to
    /// `log` from now on; only the first call has an effect.
    pub fn set_event_log(&self, log: EventLog) {
        let log = Arc::new(log);
        if self.events.set(log.clone()).is_ok() {
            self.shared.set_event_sink(log);
        }
    }

    /// The events file, if any.
    pub fn event_log(&self) -> Option<&EventLog> {
        self.events.get().map(|l| &**l)
    }

    /// Appends one event line (see [`EventLog::log`]) if an events file is
    /// set; a write failure is reported on stderr and otherwise ignored.
    pub fn event(&self, event: &str, fields: serde_json::Value) {
        if let Some(log) = self.events.get() {
            if let Err(e) = log.log(event, fields) {
                tracing::error!("{e}");
            }
        }
    }

    /// Sets the policy description shown in the status.
    pub fn set_policy(&self, description: &str) {
        *self.policy.lock().unwrap() = description.to_string();
    }

    /// Sends host VM line `name` to another vmbeam at `to` (pre-copy over
    /// TCP); on success the line leaves this VMM.
    pub fn migrate(
        &self,
        name: Option<&str>,
        to: &str,
        budget: Duration,
    ) -> Result<Report, VmmError> {
        self.migrate_with(
            name,
            to,
            &crate::migration::remote::MigrateOptions {
                downtime: budget,
                ..Default::default()
            },
        )
    }

    /// [`Vmm::migrate`] with options (TLS, progress and cancel).
    pub fn migrate_with(
        &self,
        name: Option<&str>,
        to: &str,
        opts: &crate::migration::remote::MigrateOptions,
    ) -> Result<Report, VmmError> {
        let excl = self.exclusive()?;
        self.migrate_exclusive(excl, name, to, opts)
    }

    /// [`Vmm::migrate_with`] with the right to run already taken (a job
    /// takes it when it is accepted, so a second one gets 409).
    pub fn migrate_exclusive(
        &self,
        excl: Exclusive,
        name: Option<&str>,
        to: &str,
        opts: &crate::migration::remote::MigrateOptions,
    ) -> Result<Report, VmmError> {
        let _excl = excl;
        let line = self.line(name)?;
        let vm = line.current.lock().unwrap().clone();
        let with = guests_with_devices(&vm);
        if !with.is_empty() {
            // A disk is a file on this host and a TAP an interface here:
            // neither exists on the other side until storage relocation
            // and network continuity across hosts do.
            return Err(VmmError::DevicesStay {
                guests: with.join(", "),
                what: "host-to-host migration (their disks and TAPs are local to this host)".into(),
            });
        }
        let mut opts = opts.clone();
        if opts.reuse.is_none() {
            opts.reuse = self.reuse.get().cloned();
        }
        let res = crate::migration::remote::migrate_out_with(&vm, to, &opts);
        self.metrics.migration(&res);
        match &res {
            Ok(r) => tracing::info!(
                "{} migrated to {to}: {} bytes sent, paused {:.1} ms",
                r.vm,
                r.bytes_copied,
                r.handover_ms
            ),
            Err(e) => tracing::error!("migration of {} to {to} failed: {e}", line.name),
        }
        let report = res?;
        self.lines
            .lock()
            .unwrap()
            .retain(|l| !Arc::ptr_eq(l, &line));
        Ok(report)
    }

    /// Keeps the memory of host VMs that migrate away in `cache` (bounded
    /// in time and size) so that their return sends only changed pages.
    pub fn set_reuse(&self, cache: Arc<crate::migration::reuse::ReuseCache>) {
        let _ = self.reuse.set(cache);
    }

    /// The cache of departed VMs' memory, if reuse is on.
    pub fn reuse(&self) -> Option<Arc<crate::migration::reuse::ReuseCache>> {
        self.reuse.get().cloned()
    }

    /// Takes over a host VM that arrived by migration.
    pub fn add_line(&self, vm: Arc<HostVm>) {
        self.lines.lock().unwrap().push(Arc::new(Line {
            name: vm.spec.line.clone(),
            current: RankedMutex::new(Rank::Line, vm),
            retired: RankedMutex::new(Rank::Line, VecDeque::new()),
        }));
    }

    /// True if a line of that name runs here.
    pub fn has_line(&self, name: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.name == name)
    }

    /// The first failure of a current host VM, if any.
    pub fn failure(&self) -> Option<String> {
        for l in self.lines.lock().unwrap().iter() {
            let vm = l.current.lock().unwrap().clone();
            // A guest hypervisor that dies during a handover is the
            // handover's business: L0 finishes it and the line moves on.
            if vm.session.lock().unwrap().is_some() {
                continue;
            }
            if let VmStatus::Failed(m) = vm.status() {
                return Some(m);
            }
        }
        None
    }

    /// The status tree.
    ///
    /// It never waits for a guest: nested VMs are read from the summary
    /// each publishes when its lock is released (a RUN holds that lock for
    /// a whole slice), and no lock is held across another host VM's.
    pub fn status(&self) -> Status {
        let lines: Vec<Arc<Line>> = self.lines.lock().unwrap().clone();
        let mut host_vms = Vec::new();
        for l in lines {
            let vm = l.current.lock().unwrap().clone();
            let (health, health_reports) = {
                let h = vm.health.lock().unwrap();
                (h.named(), h.reports)
            };
            let mut nested = Vec::new();
            let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
            for n in vms {
                let n = n.summary();
                let (moves, lines, dropped, host_vm, generation) = n
                    .record
                    .as_ref()
                    .map(|r| {
                        let info = r.info.lock().unwrap();
                        let (line, g) = if info.bound_vm == vm.id {
                            (info.host_vm.clone(), info.generation)
                        } else {
                            (vm.spec.line.clone(), vm.spec.generation)
                        };
                        (
                            info.moves,
                            r.console.lines(),
                            r.console.dropped_bytes(),
                            line,
                            g,
                        )
                    })
                    .unwrap_or((0, 0, 0, vm.spec.line.clone(), vm.spec.generation));
                nested.push(NestedStatus {
                    name: n.name.clone(),
                    handle: n.handle,
                    mem_bytes: n.mem_bytes,
                    state: n.state.as_str().to_string(),
                    vcpus: n.vcpus,
                    runs: n.runs,
                    exits: n.exits,
                    moves,
                    console_lines: lines,
                    console_dropped_bytes: dropped,
                    generation,
                    host_vm,
                    devices: n.devices.clone(),
                });
            }
            host_vms.push(HostVmStatus {
                name: l.name.clone(),
                generation: vm.spec.generation,
                status: match vm.status() {
                    VmStatus::Failed(m) => format!("failed: {m}"),
                    s => format!("{s:?}").to_lowercase(),
                },
                uptime_ms: vm.started.elapsed().as_millis() as u64,
                vcpus: vm.spec.vcpus,
                ram_bytes: vm.spec.ram,
                pool_bytes: vm.spec.pool,
                hypercalls: vm.hypercalls.load(std::sync::atomic::Ordering::Relaxed),
                health,
                health_reports,
                age_leak_pages: vm.spec.age_leak_pages,
                console_dropped_bytes: vm.console().dropped_bytes(),
                limits: vm.refusals.named(),
                nested,
                retired: l.retired.lock().unwrap().iter().cloned().collect(),
            });
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            policy: self.policy.lock().unwrap().clone(),
            host_vms,
            jobs: self.jobs.running().iter().map(|j| j.view()).collect(),
        }
    }

    /// The host VM and nested VM that run guest `name` now, found through
    /// the guest's record (its identity on this host), so the answer follows
    /// the guest across moves. `None` while it is bound to no VM.
    fn locate(&self, name: &str) -> Option<(Arc<HostVm>, NestedRef)> {
        let record = self.shared.find_record(name)?;
        let (bound, handle) = {
            let info = record.info.lock().unwrap();
            (info.bound_vm, info.handle)
        };
        if bound == 0 {
            return None;
        }
        let vm = self.shared.host_vm(bound)?;
        let n = vm.nested_vm(handle as u64)?;
        Some((vm, n))
    }

    /// Reads `len` bytes at nested guest-physical `gpa` of guest `guest`
    /// and, if it is not in the middle of an exit, its vCPU 0 registers.
    ///
    /// Read-only and without pausing the guest: each look waits at most for
    /// the end of the current RUN time slice. While an exit is pending the
    /// registers cannot be read; it looks again at the guest's next stops
    /// for up to [`BUSY_RETRY`] before answering `busy`. During a
    /// rejuvenation, while the guest is between two guest hypervisors, it
    /// waits (up to 5 s) for the move to finish instead of failing.
    pub fn inspect(&self, guest: &str, gpa: u64, len: u64) -> Result<Inspection, VmmError> {
        inspect::check_range(gpa, len)?;
        let err = |msg: String| VmmError::Inspect {
            guest: guest.to_string(),
            msg,
        };
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        loop {
            if let Some((vm, n)) = self.locate(guest) {
                let mut n = n.lock().unwrap();
                let ours = n.name == guest
                    && n.record.as_ref().is_some_and(|r| {
                        let info = r.info.lock().unwrap();
                        info.bound_vm == vm.id
                    });
                if ours {
                    let (regs_status, regs) = if n.vcpu_count() == 0 {
                        ("no vcpu".to_string(), None)
                    } else {
                        match n.peek_regs(0) {
                            Ok(Some(st)) => ("ok".to_string(), Some(Registers::from(&st))),
                            Ok(None) => ("busy".to_string(), None),
                            Err(s) => (format!("error: {s:?}"), None),
                        }
                    };
                    if regs.is_none() && regs_status == "busy" && start.elapsed() < BUSY_RETRY {
                        // An exit is pending; let L1 run the guest on and
                        // look again at the next stop.
                        drop(n);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let bytes = n.read(gpa, len).map_err(|s| {
                        let msg = format!(
                            "[{gpa:#x}, {:#x}) is not all mapped guest memory ({s:?})",
                            gpa + len
                        );
                        if s == vmbeam_abi::hypercall::Status::OutOfRange {
                            VmmError::Unmapped {
                                guest: guest.to_string(),
                                msg,
                            }
                        } else {
                            err(msg)
                        }
                    })?;
                    let moves = n
                        .record
                        .as_ref()
                        .map(|r| r.info.lock().unwrap().moves)
                        .unwrap_or(0);
                    return Ok(Inspection {
                        guest: guest.to_string(),
                        host_vm: vm.spec.line.clone(),
                        generation: vm.spec.generation,
                        moves,
                        state: n.state.as_str().to_string(),
                        gpa,
                        len,
                        hex: inspect::to_hex(&bytes),
                        regs_status,
                        regs,
                    });
                }
            }
            if self.shared.find_record(guest).is_none()
                || !self.is_rejuvenating()
                || Instant::now() >= deadline
            {
                return Err(VmmError::NoSuchGuest(guest.to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// L0 checksum of `[gpa, gpa+len)` of nested guest `guest` (read-only,
    /// from the pages that back it).
    pub fn checksum(&self, guest: &str, gpa: u64, len: u64) -> Result<u64, VmmError> {
        let err = |msg: String| VmmError::Inspect {
            guest: guest.to_string(),
            msg,
        };
        for (_, vm) in self.current_vms() {
            let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
            for n in vms {
                if n.summary().name != guest {
                    continue;
                }
                let n = n.lock().unwrap();
                if n.name == guest {
                    return n.checksum_range(gpa, len).map_err(|s| {
                        let msg = format!("range not readable ({s:?})");
                        if s == vmbeam_abi::hypercall::Status::OutOfRange {
                            VmmError::Unmapped {
                                guest: guest.to_string(),
                                msg,
                            }
                        } else {
                            err(msg)
                        }
                    });
                }
            }
        }
        Err(VmmError::NoSuchGuest(guest.to_string()))
    }

    /// Waits until every current host VM's L1 has reported health once.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let ok = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .all(|l| l.current.lock().unwrap().health.lock().unwrap().reports > 0);
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops every host VM.
    pub fn shutdown(&self) {
        let lines: Vec<_> = self.lines.lock().unwrap().drain(..).collect();
        for l in lines {
            let vm = l.current.lock().unwrap().clone();
            vm.stop_vcpus();
            vm.set_status(VmStatus::Stopped);
            drop(vm.drop_nested());
            drop(vm.drop_memory());
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
