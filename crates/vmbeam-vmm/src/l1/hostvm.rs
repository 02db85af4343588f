//! A host VM: one KVM VM running one guest hypervisor (L1).
//!
//! It owns the VM's memory (RAM, nested pool, and — during a handover — the
//! channel and granted pages), its vCPU threads, the table of nested VMs its
//! guest hypervisor created, the doorbell L1 sleeps on, and the console.
//! Its lifecycle is `Booting → Running → (Retired | Failed | Stopped)`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_superio::Serial;
use vmbeam_abi::boot::{BootInfo, Module, NestedSpec, CONTROL_OFFSET};
use vmbeam_abi::layout;

use crate::base::sync::{Rank, RankedCondvar, RankedMutex};
use crate::host::arch;
use crate::host::bounds::{Bound, Refusals};
use crate::host::console::{Console, LineWriter};
use crate::host::kick::{self, SliceTimer};
use crate::host::loader::{self, FlatImage};
use crate::host::memory::{GuestRam, MemFile, Region, RegionKind};
use crate::l1::dispatch::{HcOutcome, Hypercalls};
use crate::l1::shared::Services;
use crate::nesting::nested::NestedRef;
use crate::nesting::table::NestedTable;

/// How long stopping a VM waits for each vCPU thread before leaving it.
/// A vCPU thread blocks at most in a nested RUN (≤ 1 s slice) or a bounded
/// handover wait, both of which end early when the VM stops.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Errors of building or running a host VM.
#[derive(Debug, thiserror::Error)]
pub enum HostVmError {
    /// A KVM call failed.
    #[error("host VM {vm}: cannot {what}: {source}")]
    Kvm {
        /// VM name.
        vm: String,
        /// What failed.
        what: &'static str,
        /// KVM error.
        source: kvm_ioctls::Error,
    },
    /// Memory set-up failed.
    #[error("host VM {vm}: {source}")]
    Memory {
        /// VM name.
        vm: String,
        /// Cause.
        source: crate::host::memory::MemoryError,
    },
    /// The guest hypervisor image could not be loaded.
    #[error("host VM {vm}: {source}")]
    Load {
        /// VM name.
        vm: String,
        /// Cause.
        source: loader::LoaderError,
    },
    /// Boot structures could not be written.
    #[error("host VM {vm}: {source}")]
    Arch {
        /// VM name.
        vm: String,
        /// Cause.
        source: arch::ArchError,
    },
    /// A configuration value is out of bounds.
    #[error("host VM {vm}: {msg}")]
    Config {
        /// VM name.
        vm: String,
        /// Explanation.
        msg: String,
    },
    /// The guest stopped with an error.
    #[error("host VM {vm} (generation {generation}) stopped: {reason} on vCPU {vcpu}; {regs}")]
    GuestFault {
        /// VM name.
        vm: String,
        /// Generation.
        generation: u32,
        /// vCPU.
        vcpu: u32,
        /// Exit reason in words.
        reason: String,
        /// Register dump.
        regs: String,
    },
}

/// What a host VM should be.
#[derive(Debug, Clone)]
pub struct HostVmSpec {
    /// Line name (stays the same across rejuvenations).
    pub line: String,
    /// Generation (1 for the first guest hypervisor of the line).
    pub generation: u32,
    /// Role ([`vmbeam_abi::boot::ROLE_PRIMARY`] or `ROLE_SUCCESSOR`).
    pub role: u32,
    /// RAM bytes.
    pub ram: u64,
    /// Pool bytes.
    pub pool: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Nested guests to start (primary only).
    pub nested: Vec<NestedSpec>,
    /// Fault-injection flags.
    pub flags: u64,
    /// Time slice L1 should use, µs.
    pub slice_us: u32,
    /// Aging injector: pool pages L1 leaks per nested RUN (0 = off).
    /// Copied to the successor with the rest of the spec.
    pub age_leak_pages: u32,
}

/// Lifecycle of a host VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// vCPUs started, L1 booting.
    Booting,
    /// Serving.
    Running,
    /// Handed everything over and was revoked.
    Retired,
    /// Stopped by the operator.
    Stopped,
    /// The guest failed; the message says how.
    Failed(String),
}

/// Health counters last reported by L1.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    /// Counters in the order of [`vmbeam_abi::hypercall::HEALTH_ARGS`].
    pub counters: [u64; 8],
    /// Reports received.
    pub reports: u64,
}

impl Health {
    /// The counters by name (empty before the first report).
    pub fn named(&self) -> BTreeMap<String, u64> {
        if self.reports == 0 {
            return BTreeMap::new();
        }
        vmbeam_abi::hypercall::HEALTH_ARGS
            .iter()
            .zip(self.counters.iter())
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }
}

/// Sleep/wake for L1's OP_WAIT.
#[derive(Debug)]
pub struct Doorbell {
    rings: RankedMutex<u64>,
    cv: RankedCondvar,
}

impl Default for Doorbell {
    fn default() -> Self {
        Doorbell {
            rings: RankedMutex::new(Rank::Signal, 0),
            cv: RankedCondvar::new(),
        }
    }
}

impl Doorbell {
    /// Rings.
    pub fn ring(&self) {
        *self.rings.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for a ring after `seen`; returns the new count.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.rings.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |r| *r == seen)
            .unwrap();
        *g
    }

    /// Current count.
    pub fn count(&self) -> u64 {
        *self.rings.lock().unwrap()
    }
}

struct VcpuThread {
    idx: u32,
    thread: libc::pthread_t,
    immediate_exit: usize,
    join: Option<std::thread::JoinHandle<VcpuFd>>,
}

type HostSerial = Serial<NoIrq, vm_superio::serial::NoEvents, LineWriter>;

/// The host VM's UART has no interrupt line: L1 polls.
pub struct NoIrq;
impl vm_superio::Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The host-wide services of host VMs.
pub type Shared = Services<HostVm>;

/// What a handover a host VM takes part in attaches to it. Its type is
/// migration's (a layer up); this layer only keeps it, and migration
/// downcasts it back.
pub type Attachment = Arc<dyn std::any::Any + Send + Sync>;

/// A host VM.
pub struct HostVm {
    /// Unique id in this process.
    pub id: u64,
    /// What it was built from.
    pub spec: HostVmSpec,
    /// Host-wide services.
    pub shared: Arc<Shared>,
    /// The KVM VM.
    pub vm: VmFd,
    /// Its memory.
    pub mem: RwLock<GuestRam>,
    next_slot: RankedMutex<u32>,
    /// Its nested VMs.
    pub nested: RankedMutex<NestedTable>,
    /// L1's doorbell.
    pub doorbell: Doorbell,
    /// Handover in progress, if any (see [`Attachment`]).
    pub session: RankedMutex<Option<Attachment>>,
    /// Serves the hypercalls of this VM's vCPUs (handed over with the
    /// host-wide services when the VM was built).
    dispatcher: Arc<dyn Hypercalls<HostVm>>,
    /// Health reported by L1.
    pub health: RankedMutex<Health>,
    status: RankedMutex<VmStatus>,
    status_cv: RankedCondvar,
    vcpus: RankedMutex<Vec<VcpuThread>>,
    /// Set to stop the vCPU threads.
    pub stop: AtomicBool,
    /// When it was created.
    pub started: Instant,
    /// RAM file.
    pub ram_file: Arc<MemFile>,
    /// Pool file.
    pub pool_file: Arc<MemFile>,
    channel_file: Arc<MemFile>,
    deferred_slots: RankedMutex<Vec<u32>>,
    l0_writes: RankedMutex<Option<Vec<(u64, u64)>>>,
    serial: RankedMutex<HostSerial>,
    /// Hypercalls served.
    pub hypercalls: AtomicU64,
    /// Bounds its guest hypervisor hit.
    pub refusals: Refusals,
    /// Clean KVM VMs of destroyed nested guests, for reuse.
    spare_vms: RankedMutex<Vec<VmFd>>,
}

/// Most clean KVM VMs a host VM keeps for reuse.
pub const MAX_SPARE_VMS: usize = 8;

impl HostVm {
    /// Display name: `line/gN`.
    pub fn name(&self) -> String {
        format!("{}/g{}", self.spec.line, self.spec.generation)
    }

    /// Builds the VM, loads L1 and starts its vCPUs.
    pub fn boot(
        shared: Arc<Shared>,
        spec: HostVmSpec,
        hypervisor: &[u8],
        modules: &[(u32, FlatImage)],
        channel: Arc<MemFile>,
        session: Option<Attachment>,
    ) -> Result<Arc<HostVm>, HostVmError> {
        let name = format!("{}/g{}", spec.line, spec.generation);
        let cfg = |msg: String| HostVmError::Config {
            vm: name.clone(),
            msg,
        };
        if spec.ram < layout::MIN_RAM
            || spec.ram > layout::MAX_RAM
            || !spec.ram.is_multiple_of(layout::EXTENT_SIZE)
        {
            return Err(cfg(format!(
                "RAM must be a multiple of 2 MiB between {} MiB and {} MiB, got {} bytes",
                layout::MIN_RAM >> 20,
                layout::MAX_RAM >> 20,
                spec.ram
            )));
        }
        if spec.pool > layout::MAX_POOL || !spec.pool.is_multiple_of(layout::EXTENT_SIZE) {
            return Err(cfg(format!(
                "nested pool must be a multiple of 2 MiB up to {} GiB, got {} bytes",
                layout::MAX_POOL >> 30,
                spec.pool
            )));
        }
        if spec.vcpus == 0 || spec.vcpus > layout::MAX_VCPUS {
            return Err(cfg(format!(
                "vCPUs must be between 1 and {}, got {}",
                layout::MAX_VCPUS,
                spec.vcpus
            )));
        }
        let kvm_e = |what: &'static str| {
            let vm = name.clone();
            move |source| HostVmError::Kvm { vm, what, source }
        };
        let mem_e = |source| HostVmError::Memory {
            vm: name.clone(),
            source,
        };
        let vm = shared.kvm.create_vm().map_err(kvm_e("create the VM"))?;
        let _ = vm.set_tss_address(0xfffb_d000);

        let ram_file = MemFile::new(&format!("{name}-ram"), spec.ram).map_err(mem_e)?;
        let pool_file =
            MemFile::new(&format!("{name}-pool"), spec.pool.max(4096)).map_err(mem_e)?;
        let mut ram = GuestRam::default();
        ram.regions
            .push(Region::map(&ram_file, 0, spec.ram, 0, RegionKind::Ram, 0).map_err(mem_e)?);
        if spec.pool > 0 {
            ram.regions.push(
                Region::map(
                    &pool_file,
                    0,
                    spec.pool,
                    layout::POOL_BASE,
                    RegionKind::Pool,
                    1,
                )
                .map_err(mem_e)?,
            );
        }
        ram.regions.push(
            Region::map(
                &channel,
                0,
                layout::CHANNEL_SIZE,
                layout::CHANNEL_BASE,
                RegionKind::Channel,
                2,
            )
            .map_err(mem_e)?,
        );
        for r in &ram.regions {
            set_slot(&vm, r).map_err(kvm_e("map guest memory"))?;
        }

        // Guest hypervisor image, boot tables, modules, boot info.
        let view = ram.ram_view().map_err(mem_e)?;
        let img_hi = layout::STACK_TOP - layout::MAX_VCPUS as u64 * layout::STACK_SIZE;
        let loaded = loader::load_elf(
            "guest hypervisor image",
            hypervisor,
            &view,
            layout::KERNEL_BASE,
            img_hi,
        )
        .map_err(|source| HostVmError::Load {
            vm: name.clone(),
            source,
        })?;
        arch::write_boot_tables(&ram).map_err(|source| HostVmError::Arch {
            vm: name.clone(),
            source,
        })?;
        let mut bi = BootInfo::new();
        bi.role = spec.role;
        bi.generation = spec.generation;
        bi.vcpus = spec.vcpus;
        bi.name = vmbeam_abi::name_to_bytes(&spec.line);
        bi.ram_size = spec.ram;
        bi.pool_base = layout::POOL_BASE;
        bi.pool_size = spec.pool;
        bi.grant_base = layout::GRANT_BASE;
        bi.grant_size = layout::GRANT_SIZE;
        bi.channel_base = layout::CHANNEL_BASE;
        bi.channel_size = layout::CHANNEL_SIZE;
        bi.hypercall_page_base = layout::HYPERCALL_PAGE_BASE;
        bi.flags = spec.flags;
        bi.slice_us = spec.slice_us;
        bi.age_leak_pages = spec.age_leak_pages;
        let mut at = layout::MODULE_BASE;
        for (i, (kind, img)) in modules
            .iter()
            .enumerate()
            .take(vmbeam_abi::boot::MAX_MODULES)
        {
            let size = img.bytes.len() as u64;
            if at + size > layout::MODULE_BASE + layout::MODULE_AREA_SIZE
                || !ram.write(at, &img.bytes)
            {
                return Err(cfg("workload images do not fit the module area".into()));
            }
            bi.modules[i] = Module {
                kind: *kind,
                _pad: 0,
                gpa: at,
                size,
                load_addr: img.load_addr,
                entry: img.entry,
            };
            bi.module_count = i as u32 + 1;
            at = (at + size + 0xfff) & !0xfff;
        }
        if spec.nested.len() > vmbeam_abi::boot::MAX_NESTED {
            return Err(cfg(format!(
                "at most {} nested guests per guest hypervisor, asked for {}",
                vmbeam_abi::boot::MAX_NESTED,
                spec.nested.len()
            )));
        }
        for (i, n) in spec.nested.iter().enumerate() {
            bi.nested[i] = *n;
        }
        bi.nested_count = spec.nested.len() as u32;

        // vCPUs.
        let mut fds = Vec::new();
        for i in 0..spec.vcpus {
            let fd = vm.create_vcpu(i as u64).map_err(kvm_e("create a vCPU"))?;
            arch::set_cpuid(&fd, &shared.cpuid).map_err(|source| HostVmError::Arch {
                vm: name.clone(),
                source,
            })?;
            if i == 0 {
                bi.tsc_khz = fd.get_tsc_khz().unwrap_or(0) as u64;
            }
            let base = fd.get_sregs().map_err(kvm_e("read special registers"))?;
            let sregs = vmbeam_abi::state::long_mode_sregs(layout::GDT_ADDR, layout::PML4_ADDR);
            fd.set_sregs(&arch::sregs_to_kvm(&sregs, &base))
                .map_err(kvm_e("set special registers"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: loaded.entry,
                rsp: layout::STACK_TOP - i as u64 * layout::STACK_SIZE,
                rdi: layout::BOOT_INFO_ADDR,
                rsi: i as u64,
                rflags: 2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_e("set registers"))?;
            fds.push(fd);
        }
        if !ram.write(layout::BOOT_INFO_ADDR, vmbeam_abi::as_bytes(&bi)) {
            return Err(cfg("RAM too small for the boot info".into()));
        }

        let hv = HostVm::assemble(shared, spec, vm, ram, ram_file, pool_file, channel)?;
        *hv.session.lock().unwrap() = session;
        hv.start_vcpus(fds);
        Ok(hv)
    }

    /// Builds the host VM object around a KVM VM whose memory is in place
    /// (fresh boot or restore from a migration stream); vCPUs not started.
    pub fn assemble(
        shared: Arc<Shared>,
        spec: HostVmSpec,
        vm: VmFd,
        ram: GuestRam,
        ram_file: Arc<MemFile>,
        pool_file: Arc<MemFile>,
        channel: Arc<MemFile>,
    ) -> Result<Arc<HostVm>, HostVmError> {
        let name = format!("{}/g{}", spec.line, spec.generation);
        let console = shared
            .consoles
            .get_l1(&spec.line, spec.generation)
            .map_err(|e| HostVmError::Config {
                vm: name.clone(),
                msg: e.to_string(),
            })?;
        let next_slot = ram.regions.iter().map(|r| r.slot + 1).max().unwrap_or(0);
        let dispatcher = shared.hypercalls();
        Ok(Arc::new(HostVm {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            spec,
            shared,
            vm,
            mem: RwLock::new(ram),
            next_slot: RankedMutex::new(Rank::VmLeaf, next_slot.max(3)),
            nested: RankedMutex::new(Rank::NestedTable, NestedTable::default()),
            doorbell: Doorbell::default(),
            session: RankedMutex::new(Rank::VmSession, None),
            dispatcher,
            health: RankedMutex::new(Rank::Health, Health::default()),
            status: RankedMutex::new(Rank::VmLeaf, VmStatus::Booting),
            status_cv: RankedCondvar::new(),
            vcpus: RankedMutex::new(Rank::VmLeaf, Vec::new()),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            ram_file,
            pool_file,
            channel_file: channel,
            deferred_slots: RankedMutex::new(Rank::VmLeaf, Vec::new()),
            l0_writes: RankedMutex::new(Rank::VmLeaf, None),
            serial: RankedMutex::new(Rank::VmLeaf, Serial::new(NoIrq, LineWriter::new(console))),
            hypercalls: AtomicU64::new(0),
            refusals: Refusals::default(),
            spare_vms: RankedMutex::new(Rank::VmLeaf, Vec::new()),
        }))
    }

    /// Starts (or resumes) the vCPU threads, in vCPU index order.
    pub fn start_vcpus(self: &Arc<Self>, fds: Vec<VcpuFd>) {
        // Let a nested guest's record lead to this VM (inspect follows moves).
        self.shared.register_host_vm(self.id, self);
        kick::install_handler();
        self.stop.store(false, Ordering::SeqCst);
        for (i, fd) in fds.into_iter().enumerate() {
            if let Err(e) = self.spawn_vcpu(i as u32, fd) {
                // The host is out of threads: the VM fails with the reason
                // (its waiters see `Failed`), the vCPUs started so far stop.
                self.stop.store(true, Ordering::SeqCst);
                self.set_status(VmStatus::Failed(format!(
                    "cannot start the thread of vCPU {i}: {e}"
                )));
                return;
            }
        }
        self.set_status(VmStatus::Running);
    }

    fn spawn_vcpu(self: &Arc<Self>, idx: u32, mut fd: VcpuFd) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let ie = &mut fd.get_kvm_run().immediate_exit as *mut u8 as usize;
        let join = std::thread::Builder::new()
            .name(format!("vmbeam-{}-vcpu{idx}", self.spec.line))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tx.send(unsafe { libc::pthread_self() });
                let timer = SliceTimer::new(
                    // SAFETY: as above.
                    unsafe { libc::pthread_self() },
                );
                let res = me.vcpu_loop(idx, &mut fd, &timer);
                match res {
                    Ok(()) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        me.set_status(VmStatus::Failed(msg));
                    }
                }
                me.shared.notify_vm_event();
                // Hand the vCPU back so its kvm_run mapping outlives any kick
                // until the thread is joined.
                fd
            })?;
        // The thread's first act is to send its id; it cannot end before.
        let Ok(thread) = rx.recv() else {
            return Err(std::io::Error::other("the vCPU thread ended at once"));
        };
        self.vcpus.lock().unwrap().push(VcpuThread {
            idx,
            thread,
            immediate_exit: ie,
            join: Some(join),
        });
        Ok(())
    }

    fn vcpu_loop(&self, idx: u32, fd: &mut VcpuFd, timer: &SliceTimer) -> Result<(), HostVmError> {
        let fault = |fd: &VcpuFd, reason: String| HostVmError::GuestFault {
            vm: self.spec.line.clone(),
            generation: self.spec.generation,
            vcpu: idx,
            reason,
            regs: arch::describe_regs(fd),
        };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                // Complete the exit just handled (e.g. the hypercall's port
                // write) so the saved state is at an instruction boundary.
                fd.set_kvm_immediate_exit(1);
                let _ = fd.run();
                fd.set_kvm_immediate_exit(0);
                return Ok(());
            }
            match fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == layout::HYPERCALL_PORT && data.len() == 4 {
                        let op = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                        match self.dispatcher.dispatch(self, idx, op, timer) {
                            HcOutcome::Continue => {}
                            HcOutcome::Retire => return Ok(()),
                        }
                    } else if (layout::CONSOLE_PORT..layout::CONSOLE_PORT + 8).contains(&port) {
                        let off = (port - layout::CONSOLE_PORT) as u8;
                        let _ = self.serial.lock().unwrap().write(off, data[0]);
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if (layout::CONSOLE_PORT..layout::CONSOLE_PORT + 8).contains(&port) {
                        data[0] = self
                            .serial
                            .lock()
                            .unwrap()
                            .read((port - layout::CONSOLE_PORT) as u8);
                    } else {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(VcpuExit::Hlt) => {
                    let seen = self.doorbell.count();
                    self.doorbell.wait(seen, Duration::from_millis(50));
                }
                Ok(VcpuExit::Shutdown) => {
                    return Err(fault(fd, "triple fault (KVM_EXIT_SHUTDOWN)".into()));
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(fault(
                        fd,
                        format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x})"),
                    ));
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member.
                    let sub = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let what = if sub == 1 {
                        "emulation failure".to_string()
                    } else {
                        format!("suberror {sub}")
                    };
                    let bytes = fd
                        .get_regs()
                        .ok()
                        .map(|r| self.code_bytes(r.rip))
                        .unwrap_or_default();
                    return Err(fault(
                        fd,
                        format!("KVM internal error ({what}); instruction bytes at rip: {bytes}"),
                    ));
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    return Err(fault(fd, what));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(fault(fd, format!("KVM_RUN failed: {e}"))),
            }
        }
    }

    fn code_bytes(&self, rip: u64) -> String {
        let mut b = [0u8; 15];
        if self.mem.read().unwrap().read(rip, &mut b) {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            format!("(rip {rip:#x} is outside guest RAM)")
        }
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.status.lock().unwrap().clone()
    }

    /// Sets the status unless it is already final (failed/retired/stopped).
    pub fn set_status(&self, s: VmStatus) {
        let mut g = self.status.lock().unwrap();
        let final_ = matches!(
            *g,
            VmStatus::Failed(_) | VmStatus::Retired | VmStatus::Stopped
        );
        if (!final_
            || matches!(s, VmStatus::Retired | VmStatus::Stopped) && *g != VmStatus::Retired)
            && (!matches!(*g, VmStatus::Failed(_)) || matches!(s, VmStatus::Failed(_)))
        {
            *g = s;
        }
        self.status_cv.notify_all();
    }

    /// Marks the VM retired (its guests moved on), even if its guest
    /// hypervisor had failed during the handover.
    pub fn mark_retired(&self) {
        *self.status.lock().unwrap() = VmStatus::Retired;
        self.status_cv.notify_all();
    }

    /// Waits until `pred` holds on the status or `timeout` passes.
    pub fn wait_status(&self, timeout: Duration, pred: impl Fn(&VmStatus) -> bool) -> VmStatus {
        let g = self.status.lock().unwrap();
        let (g, _) = self
            .status_cv
            .wait_timeout_while(g, timeout, |s| !pred(s))
            .unwrap();
        g.clone()
    }

    /// Writes L1's control word and wakes it.
    pub fn set_control(&self, value: u32) {
        let gpa = layout::BOOT_INFO_ADDR + CONTROL_OFFSET as u64;
        if let Some(p) = self.mem.read().unwrap().host_ptr(gpa, 4) {
            // SAFETY: 4-byte aligned (checked at compile time in the ABI)
            // word in guest RAM; L1 reads it with volatile loads.
            unsafe { std::ptr::write_volatile(p as *mut u32, value) };
        }
        self.doorbell.ring();
    }

    /// Reads L1's control word.
    pub fn control(&self) -> u32 {
        let mut b = [0u8; 4];
        self.mem
            .read()
            .unwrap()
            .read(layout::BOOT_INFO_ADDR + CONTROL_OFFSET as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// Allocates a KVM memory slot number.
    pub fn alloc_slot(&self) -> u32 {
        let mut s = self.next_slot.lock().unwrap();
        *s += 1;
        *s - 1
    }

    /// Starts recording the guest memory L0 itself writes (KVM's dirty log
    /// does not see it), for a migration in progress.
    pub fn start_l0_write_log(&self) {
        *self.l0_writes.lock().unwrap() = Some(Vec::new());
    }

    /// Records that L0 wrote `[gpa, gpa+len)` of this VM's memory.
    pub fn note_l0_write(&self, gpa: u64, len: u64) {
        if let Some(v) = self.l0_writes.lock().unwrap().as_mut() {
            v.push((gpa, len));
        }
    }

    /// Stops recording and returns what was written.
    pub fn take_l0_writes(&self) -> Vec<(u64, u64)> {
        self.l0_writes.lock().unwrap().take().unwrap_or_default()
    }

    /// Adds a region to the VM's bookkeeping now and its KVM memory slot
    /// later, with [`HostVm::install_deferred_slots`].
    pub fn add_region_deferred(&self, region: Region) {
        self.deferred_slots.lock().unwrap().push(region.slot);
        self.mem.write().unwrap().regions.push(region);
    }

    /// Installs the KVM slots of regions added with `add_region_deferred`.
    pub fn install_deferred_slots(&self) -> Result<(), kvm_ioctls::Error> {
        let slots: Vec<u32> = std::mem::take(&mut *self.deferred_slots.lock().unwrap());
        let mem = self.mem.read().unwrap();
        for r in mem.regions.iter().filter(|r| slots.contains(&r.slot)) {
            set_slot(&self.vm, r)?;
        }
        Ok(())
    }

    /// Adds a region to the VM (memory slot and bookkeeping).
    pub fn add_region(&self, region: Region) -> Result<(), kvm_ioctls::Error> {
        set_slot(&self.vm, &region)?;
        self.mem.write().unwrap().regions.push(region);
        Ok(())
    }

    /// Stops the vCPU threads and waits for them.
    pub fn stop_vcpus(&self) {
        drop(self.pause_vcpus());
    }

    /// Stops the vCPU threads and hands back their vCPUs (index order), so
    /// they can be resumed with [`HostVm::start_vcpus`] or saved.
    pub fn pause_vcpus(&self) -> Vec<VcpuFd> {
        self.stop.store(true, Ordering::SeqCst);
        self.doorbell.ring();
        // Joined threads are removed from the list, so every entry here still
        // owns its VcpuFd (returned by the thread), keeping kvm_run mapped.
        let mut threads: Vec<VcpuThread> = std::mem::take(&mut *self.vcpus.lock().unwrap());
        threads.sort_by_key(|t| t.idx);
        let mut fds = Vec::new();
        let deadline = Instant::now() + STOP_DEADLINE;
        for mut t in threads {
            let Some(j) = t.join.take() else { continue };
            while !j.is_finished() && Instant::now() < deadline {
                // SAFETY: `immediate_exit` points into the vCPU's kvm_run
                // mapping; the VcpuFd lives until `join` below returns it.
                unsafe { kick::set_immediate_exit(t.immediate_exit as *const AtomicU8) };
                kick::signal_thread(t.thread);
                self.doorbell.ring();
                std::thread::sleep(Duration::from_millis(1));
            }
            if !j.is_finished() {
                // Never spin forever: a thread that does not stop (a bug of
                // L0's) is left behind, still owning its vCPU, and said so.
                eprintln!(
                    "vmbeam: vCPU {} of {} did not stop within {STOP_DEADLINE:?}; leaving it",
                    t.idx,
                    self.name()
                );
                continue;
            }
            if let Ok(fd) = j.join() {
                fds.push(fd);
            }
        }
        fds
    }

    /// True while a vCPU thread is alive.
    pub fn vcpus_alive(&self) -> bool {
        self.vcpus
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.join.as_ref().map(|j| !j.is_finished()).unwrap_or(false))
    }

    /// Destroys every nested VM (dropping their KVM VMs) and unbinds records.
    pub fn drop_nested(&self) -> Vec<NestedRef> {
        let vms: Vec<_> = self.nested.lock().unwrap().take_all();
        for v in &vms {
            let v = v.lock().unwrap();
            if let Some(r) = &v.record {
                let mut info = r.info.lock().unwrap();
                if info.bound_vm == self.id {
                    info.bound_vm = 0;
                }
            }
        }
        vms
    }

    /// Removes every memory slot of the VM and returns its regions, still
    /// mapped in L0; dropping them unmaps the memory.
    pub fn drop_memory(&self) -> Vec<Region> {
        let regions = std::mem::take(&mut self.mem.write().unwrap().regions);
        let deferred = std::mem::take(&mut *self.deferred_slots.lock().unwrap());
        for r in regions.iter().filter(|r| !deferred.contains(&r.slot)) {
            let region = kvm_userspace_memory_region {
                slot: r.slot,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: size 0 deletes the slot; no memory is handed to KVM.
            let _ = unsafe { self.vm.set_user_memory_region(region) };
        }
        regions
    }

    /// Finds a nested VM.
    pub fn nested_vm(&self, handle: u64) -> Option<NestedRef> {
        let h = u32::try_from(handle).ok()?;
        self.nested.lock().unwrap().vms.get(&h).cloned()
    }

    /// Introspection: the host mappings of the pages granted to this VM by
    /// its predecessor, one per granted range, in grant order. Nothing in
    /// L0 uses it; tests check the host addresses against
    /// `/proc/self/maps` to see which file pages back a moved guest.
    pub fn grant_mappings(&self) -> Vec<HostMapping> {
        self.mem
            .read()
            .unwrap()
            .regions
            .iter()
            .filter_map(|r| match &r.kind {
                RegionKind::Grant { guest } => Some(HostMapping::of(r, guest)),
                _ => None,
            })
            .collect()
    }

    /// Introspection: the host mapping of this VM's guest-physical range
    /// `[gpa, gpa + len)` if one region holds all of it (see
    /// [`HostVm::grant_mappings`]).
    pub fn host_mapping(&self, gpa: u64, len: u64) -> Option<HostMapping> {
        let mem = self.mem.read().unwrap();
        let r = mem.find(gpa, len)?;
        let mut m = HostMapping::of(r, "");
        m.guest = None;
        m.host_addr += (gpa - r.gpa) as usize;
        m.file_offset += gpa - r.gpa;
        m.gpa = gpa;
        m.len = len;
        Some(m)
    }

    /// The channel memfd mapped at `CHANNEL_BASE`.
    pub fn channel_file(&self) -> Arc<MemFile> {
        self.channel_file.clone()
    }

    /// A clean KVM VM for a new nested guest, if one was kept.
    pub fn take_spare_vm(&self) -> Option<VmFd> {
        self.spare_vms.lock().unwrap().pop()
    }

    /// Keeps a clean KVM VM for reuse (up to [`MAX_SPARE_VMS`]); returns it
    /// if there is no room, for the caller to drop.
    pub fn keep_spare_vm(&self, vm: VmFd) -> Option<VmFd> {
        let mut s = self.spare_vms.lock().unwrap();
        if s.len() >= MAX_SPARE_VMS {
            return Some(vm);
        }
        s.push(vm);
        None
    }

    /// Counts a hit of bound `b` by this VM's guest hypervisor, reports it
    /// (a rate-limited `limit` event) and returns the status to answer.
    pub fn refuse(&self, b: Bound, detail: &str) -> vmbeam_abi::hypercall::Status {
        self.refusals.count(b);
        self.shared.limit_hit(&self.name(), b.as_str(), detail);
        b.status()
    }

    /// Console of the host VM line.
    pub fn console(&self) -> Arc<Console> {
        self.serial.lock().unwrap().writer().console()
    }
}

impl Drop for HostVm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

/// Introspection: one host mapping of a host VM's memory and the file
/// range behind it ([`HostVm::grant_mappings`], [`HostVm::host_mapping`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMapping {
    /// Nested guest the pages were granted for (grant mappings only).
    pub guest: Option<String>,
    /// Guest-physical start in the host VM.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of `gpa` in this process.
    pub host_addr: usize,
    /// Descriptor of the backing memfd in this process (valid while the
    /// host VM or a nested VM still maps the file).
    pub fd: i32,
    /// Offset of `gpa` in the backing file.
    pub file_offset: u64,
}

impl HostMapping {
    fn of(r: &Region, guest: &str) -> HostMapping {
        HostMapping {
            guest: Some(guest.to_string()),
            gpa: r.gpa,
            len: r.size,
            host_addr: r.map.as_ptr() as usize,
            fd: std::os::fd::AsRawFd::as_raw_fd(&*r.file.file),
            file_offset: r.offset,
        }
    }
}

/// Installs (or, with other `flags`, updates) the KVM memory slot of `r`.
pub(crate) fn set_slot_flags(vm: &VmFd, r: &Region, flags: u32) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot: r.slot,
        flags,
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.map.as_ptr() as u64,
    };
    // SAFETY: the mapping is live for as long as the region is in the VM's
    // memory list; slots are deleted (drop_memory) before regions are dropped.
    unsafe { vm.set_user_memory_region(region) }
}

fn set_slot(vm: &VmFd, r: &Region) -> Result<(), kvm_ioctls::Error> {
    set_slot_flags(vm, r, 0)
}
