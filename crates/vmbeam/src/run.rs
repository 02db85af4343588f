//! `vmbeam run`: boot the host VM, then serve the API, signals and the
//! duration timer from one event loop (event-manager) until asked to stop.
//! Between events (at least every 50 ms) the loop also polls the
//! rejuvenation policy ([`PolicyDriver`]); a rejuvenation it starts runs on
//! a worker thread, so the API keeps answering meanwhile.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmbeam_vmm::api::ApiServer;
use vmbeam_vmm::control::events::{EventLog, EventsError};
use vmbeam_vmm::control::policy::{Backoff, Observation, Policy, PolicyError, PoolHealth, Trigger};
use vmbeam_vmm::l1::hostvm::{HostVm, VmStatus};
use vmbeam_vmm::migration::rejuvenate::RejuvenateOptions;
use vmbeam_vmm::vmm::Vmm;
use vmm_sys_util::eventfd::EventFd;

use crate::cli::RunArgs;

/// Errors of `vmbeam run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// VMM set-up or operation failed.
    #[error(transparent)]
    Vmm(#[from] vmbeam_vmm::vmm::VmmError),
    /// The API socket failed.
    #[error(transparent)]
    Api(#[from] vmbeam_vmm::api::ApiError),
    /// Listening for migrations is not possible or not allowed.
    #[error("{0}")]
    Listen(String),
    /// The guest hypervisor image could not be read or checked.
    #[error("{0}")]
    Image(String),
    /// The event loop failed.
    #[error("event loop failed: {0}")]
    Events(String),
    /// A host VM failed while running.
    #[error("{0}")]
    GuestFailed(String),
    /// The rejuvenation policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The events file cannot be used.
    #[error(transparent)]
    EventsFile(#[from] EventsError),
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd that
        // lives for the whole run and `one` is a valid 8-byte buffer.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

struct ExitSubscriber {
    fd: EventFd,
    fired: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.fired.store(true, Ordering::SeqCst);
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.fd, EventSet::IN));
    }
}

struct ApiSubscriber {
    server: Arc<ApiServer>,
    vmm: Arc<Vmm>,
}

impl MutEventSubscriber for ApiSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.server.accept_all_threaded(&self.vmm);
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.server.listener(), EventSet::IN));
    }
}

/// Polls the rejuvenation policy for `vmbeam run` and runs what it decides.
///
/// Each poll: collect a finished worker (success resets the back-off, a
/// failure starts it), log the first health report of every new generation
/// (`health_first`), and, if no rejuvenation is running and the back-off
/// allows, ask [`Policy::decide`] about each line. A positive decision is
/// logged (`policy_fired`) and a worker thread runs
/// [`Vmm::rejuvenate_because`], which logs the report (`rejuvenated`) or
/// the error (`rejuvenate_failed`).
pub struct PolicyDriver {
    policy: Policy,
    backoff: Backoff,
    worker: Option<JoinHandle<bool>>,
    reported: HashSet<u64>,
}

/// What the policy sees of a host VM now.
pub fn observe(vm: &HostVm) -> Observation {
    let h = vm.health.lock().unwrap();
    Observation {
        running: vm.status() == VmStatus::Running,
        uptime: vm.started.elapsed(),
        health: (h.reports > 0).then(|| PoolHealth {
            free_bytes: h.counters[0],
            used_bytes: h.counters[1],
        }),
    }
}

impl PolicyDriver {
    /// A driver for `policy`.
    pub fn new(policy: Policy) -> PolicyDriver {
        PolicyDriver {
            policy,
            backoff: Backoff::new(),
            worker: None,
            reported: HashSet::new(),
        }
    }

    /// One poll (cheap; never blocks on a rejuvenation).
    pub fn poll(&mut self, vmm: &Arc<Vmm>) {
        let now = Instant::now();
        if self.worker.as_ref().is_some_and(|w| w.is_finished()) {
            let ok = self
                .worker
                .take()
                .map(|w| w.join().unwrap_or(false))
                .unwrap_or(false);
            if ok {
                self.backoff.succeeded();
            } else {
                let wait = self.backoff.failed(now);
                tracing::warn!(
                    "policy: the rejuvenation failed; the policy waits {} s before trying again",
                    wait.as_secs()
                );
                vmm.event(
                    "policy_backoff",
                    serde_json::json!({ "retry_in_ms": wait.as_millis() as u64 }),
                );
            }
        }
        let vms = vmm.current_vms();
        for (line, vm) in &vms {
            let (health, reports) = {
                let h = vm.health.lock().unwrap();
                (h.named(), h.reports)
            };
            if !health.is_empty() && self.reported.insert(vm.id) {
                vmm.event(
                    "health_first",
                    serde_json::json!({
                        "vm": line,
                        "generation": vm.spec.generation,
                        "uptime_ms": vm.started.elapsed().as_millis() as u64,
                        "reports": reports,
                        "health": health,
                    }),
                );
            }
        }
        if self.policy.is_manual() || self.worker.is_some() || !self.backoff.ready(now) {
            return;
        }
        for (line, vm) in vms {
            let Some(d) = self.policy.decide(&observe(&vm)) else {
                tracing::trace!(vm = %line, "policy: no rejuvenation needed");
                continue;
            };
            tracing::info!(
                "policy: rejuvenating {line} (generation {}): {}",
                vm.spec.generation,
                d.reason
            );
            vmm.event(
                "policy_fired",
                serde_json::json!({
                    "vm": line,
                    "generation": vm.spec.generation,
                    "rule": d.rule,
                    "reason": d.reason,
                    "policy": self.policy.describe(),
                    "uptime_ms": vm.started.elapsed().as_millis() as u64,
                    "health": vm.health.lock().unwrap().named(),
                }),
            );
            let v = vmm.clone();
            let trigger = Trigger::Policy { reason: d.reason };
            let spawned = std::thread::Builder::new()
                .name("vmbeam-policy".into())
                .spawn(move || {
                    match v.rejuvenate_because(
                        Some(&line),
                        &RejuvenateOptions::default(),
                        &trigger,
                    ) {
                        Ok(r) => {
                            tracing::info!(
                                "policy: {} rejuvenated, generation {} -> {} in {:.1} ms, {} bytes copied",
                                r.vm,
                                r.from_generation,
                                r.to_generation,
                                r.total_ms,
                                r.bytes_copied
                            );
                            true
                        }
                        Err(e) => {
                            tracing::error!("policy: {e}");
                            false
                        }
                    }
                });
            match spawned {
                Ok(h) => self.worker = Some(h),
                Err(e) => {
                    let wait = self.backoff.failed(now);
                    tracing::error!("policy: cannot start a rejuvenation thread: {e}");
                    vmm.event(
                        "rejuvenate_failed",
                        serde_json::json!({
                            "trigger": "policy",
                            "error": format!("cannot start a rejuvenation thread: {e}"),
                            "retry_in_ms": wait.as_millis() as u64,
                        }),
                    );
                }
            }
            break;
        }
    }

    /// Waits for a running rejuvenation to end (before shutdown).
    pub fn finish(&mut self) {
        if let Some(w) = self.worker.take() {
            tracing::info!("waiting for the policy's running rejuvenation to end");
            let _ = w.join();
        }
    }
}

/// Loads `--hypervisor` or the embedded image and builds the VMM.
pub fn build_vmm(vm: &crate::cli::VmArgs, quiet: bool) -> Result<Vmm, RunError> {
    let hv = match &vm.hypervisor {
        Some(p) => Some(std::fs::read(p).map_err(|e| {
            RunError::Image(format!(
                "cannot read guest hypervisor image {}: {e}",
                p.display()
            ))
        })?),
        None => None,
    };
    let images = crate::images(hv).map_err(|e| RunError::Image(e.to_string()))?;
    Ok(Vmm::new(vm.config(quiet), images)?)
}

/// Physical memory of this host.
fn host_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

/// Runs until Ctrl-C, SIGTERM, `PUT /shutdown`, `--duration`, or a guest failure.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    // Policy and events file first: a bad value fails before any VM exists.
    let policy = Policy::new(args.rejuvenate_when, args.rejuvenate_every)?;
    policy.check_pool(args.vm.config(false).pool_size())?;
    let events = args.events.as_deref().map(EventLog::open).transpose()?;
    let vmm = Arc::new(build_vmm(&args.vm, false)?);
    if let Some(log) = events {
        vmm.set_event_log(log);
    }
    vmm.set_policy(&policy.describe());
    let sock = args
        .api_sock
        .clone()
        .unwrap_or_else(crate::cli::default_socket);
    let server = Arc::new(ApiServer::bind(&sock)?);
    if let Some(d) = args.keep_for {
        vmm.set_reuse(vmbeam_vmm::migration::reuse::ReuseCache::new(
            d,
            host_memory() / 2,
        ));
    }
    if let Some(addr) = &args.listen {
        let tls = args
            .tls_dir
            .as_deref()
            .map(vmbeam_vmm::migration::tls::TlsDir::load)
            .transpose()
            .map_err(|e| RunError::Listen(e.to_string()))?;
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            RunError::Listen(format!("cannot listen for migrations on {addr}: {e}"))
        })?;
        let bound = listener.local_addr().map_err(|e| {
            RunError::Listen(format!("cannot listen for migrations on {addr}: {e}"))
        })?;
        if tls.is_none() && !bound.ip().is_loopback() && !args.insecure_listen {
            return Err(RunError::Listen(format!(
                "refusing to listen for migrations on {addr} without --tls-dir: anyone who can \
                 reach it could make this host run a VM of their choosing (give --tls-dir DIR, \
                 listen on a loopback address, or accept the risk with --insecure-listen)"
            )));
        }
        let opts = vmbeam_vmm::migration::remote::ReceiveOptions {
            tls,
            reuse: vmm.reuse(),
            postcopy_outcome: None,
        };
        tracing::info!(
            "waiting for host VMs to migrate in on {addr}; API on {}",
            sock.display()
        );
        let v = vmm.clone();
        std::thread::Builder::new()
            .name("vmbeam-listen".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    match vmbeam_vmm::migration::remote::receive_with(
                        &v.shared,
                        stream,
                        &|n| v.has_line(n),
                        &opts,
                    ) {
                        Ok(vm) => {
                            tracing::info!(
                                "host VM {} arrived from {peer} and runs here now",
                                vm.name()
                            );
                            v.add_line(vm);
                        }
                        Err(e) => tracing::error!("incoming migration from {peer} refused: {e}"),
                    }
                }
            })
            .map_err(|e| RunError::Events(e.to_string()))?;
    } else {
        let vm = vmm.start(&args.name)?;
        tracing::info!(
            "host VM {} booted ({} MiB RAM, {} MiB nested pool, {} vCPU), {} nested guest(s); API on {}",
            vm.name(),
            vm.spec.ram >> 20,
            vm.spec.pool >> 20,
            vm.spec.vcpus,
            vm.spec.nested.len(),
            sock.display()
        );
        if !policy.is_manual() {
            tracing::info!("rejuvenation policy: {}", policy.describe());
        }
        vmm.event(
            "started",
            serde_json::json!({
                "vm": args.name,
                "generation": vm.spec.generation,
                "policy": policy.describe(),
                "pool_bytes": vm.spec.pool,
                "age_leak_pages": vm.spec.age_leak_pages,
            }),
        );
    }
    let mut driver = PolicyDriver::new(policy);

    let exit_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| RunError::Events(e.to_string()))?;
    SIGNAL_FD.store(exit_fd.as_raw_fd(), Ordering::SeqCst);
    // SAFETY: installing a handler that only calls write(2) on an eventfd.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let fired = Arc::new(AtomicBool::new(false));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::Events(format!("{e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(ExitSubscriber {
        fd: exit_fd
            .try_clone()
            .map_err(|e| RunError::Events(e.to_string()))?,
        fired: fired.clone(),
    })));
    em.add_subscriber(Arc::new(Mutex::new(ApiSubscriber {
        server: server.clone(),
        vmm: vmm.clone(),
    })));

    let deadline = args
        .duration
        .and_then(|d| d.limit())
        .and_then(|d| Instant::now().checked_add(d));
    let result = loop {
        if let Err(e) = em.run_with_timeout(50) {
            break Err(RunError::Events(format!("{e:?}")));
        }
        if fired.load(Ordering::SeqCst) {
            tracing::info!("signal received, shutting down");
            break Ok(());
        }
        if server.shutdown.load(Ordering::SeqCst) {
            tracing::info!("shutdown requested through the API");
            break Ok(());
        }
        if let Some(m) = vmm.failure() {
            tracing::error!("a host VM failed: {m}");
            break Err(RunError::GuestFailed(m));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("--duration reached, shutting down");
            break Ok(());
        }
        driver.poll(&vmm);
    };
    // A running job (rejuvenation, migration) is cancelled: it rolls back,
    // or finishes if it is past its point of no return. Then the policy's
    // own rejuvenation ends, the VMs stop, and the socket goes last, so a
    // client that waits for it to vanish knows everything has stopped.
    finish_jobs(&vmm);
    driver.finish();
    vmm.shutdown();
    SIGNAL_FD.store(-1, Ordering::SeqCst);
    server.remove_socket();
    tracing::info!("stopped");
    result
}

/// Longest shutdown waits for running jobs to roll back or finish (their
/// own deadlines are shorter: a rollback takes well under a second).
const JOBS_DRAIN: Duration = Duration::from_secs(120);

/// Cancels every running job and waits (bounded) for each to end.
fn finish_jobs(vmm: &Vmm) {
    let n = vmm.jobs.cancel_all();
    if n == 0 {
        return;
    }
    tracing::info!("cancelling {n} running job(s): waiting for the rollback");
    let deadline = Instant::now() + JOBS_DRAIN;
    while !vmm.jobs.running().is_empty() {
        if Instant::now() >= deadline {
            tracing::error!("a job did not end within {JOBS_DRAIN:?}; stopping anyway");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
