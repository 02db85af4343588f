//! `vmbeam run`: boot the host VM, then serve the API, signals and the
//! duration timer from one event loop (event-manager) until asked to stop.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmbeam_vmm::api::ApiServer;
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
    /// The guest hypervisor image could not be read or checked.
    #[error("{0}")]
    Image(String),
    /// The event loop failed.
    #[error("event loop failed: {0}")]
    Events(String),
    /// A host VM failed while running.
    #[error("{0}")]
    GuestFailed(String),
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
        self.server.accept_all(&self.vmm);
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.server.listener(), EventSet::IN));
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

/// Runs until Ctrl-C, SIGTERM, `PUT /shutdown`, `--duration`, or a guest failure.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    let vmm = Arc::new(build_vmm(&args.vm, false)?);
    let sock = args
        .api_sock
        .clone()
        .unwrap_or_else(crate::cli::default_socket);
    let server = Arc::new(ApiServer::bind(&sock)?);
    let vm = vmm.start(&args.name)?;
    eprintln!(
        "vmbeam: host VM {} booted ({} MiB RAM, {} MiB nested pool, {} vCPU), {} nested guest(s); API on {}",
        vm.name(),
        vm.spec.ram >> 20,
        vm.spec.pool >> 20,
        vm.spec.vcpus,
        vm.spec.nested.len(),
        sock.display()
    );

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
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let result = loop {
        if let Err(e) = em.run_with_timeout(50) {
            break Err(RunError::Events(format!("{e:?}")));
        }
        if fired.load(Ordering::SeqCst) {
            eprintln!("vmbeam: signal received, shutting down");
            break Ok(());
        }
        if server.shutdown.load(Ordering::SeqCst) {
            eprintln!("vmbeam: shutdown requested through the API");
            break Ok(());
        }
        if let Some(m) = vmm.failure() {
            break Err(RunError::GuestFailed(m));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("vmbeam: --duration reached, shutting down");
            break Ok(());
        }
    };
    vmm.shutdown();
    SIGNAL_FD.store(-1, Ordering::SeqCst);
    result
}
