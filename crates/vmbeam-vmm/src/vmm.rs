//! The VMM as a whole: the lines of host VMs it runs (a line keeps its name
//! while its guest hypervisor is replaced generation after generation), the
//! control operations the CLI and API call, and the status tree.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbeam_abi::boot::{NestedSpec, ROLE_PRIMARY};

use crate::config::{ConfigError, VmmConfig};
use crate::console::ConsoleTarget;
use crate::hostvm::{HostVm, HostVmError, HostVmSpec, VmStatus};
use crate::images::Images;
use crate::memory::MemFile;
use crate::rejuvenate::{self, RejuvenateError, RejuvenateOptions, Report};
use crate::shared::{KvmError, Shared};

/// Errors of VMM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM unavailable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A host VM could not be built.
    #[error(transparent)]
    Boot(#[from] HostVmError),
    /// Unknown host VM.
    #[error("no host VM named '{0}'")]
    NoSuchVm(String),
    /// Unknown nested guest.
    #[error("no nested guest named '{0}'")]
    NoSuchGuest(String),
    /// Another rejuvenation is running.
    #[error("a rejuvenation is already running; try again when it ends")]
    Busy,
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
}

/// A host VM line: a name whose guest hypervisor is replaced over time.
pub struct Line {
    /// Name.
    pub name: String,
    /// The host VM serving it now.
    pub current: Mutex<Arc<HostVm>>,
}

/// Status of a nested guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NestedStatus {
    /// Name.
    pub name: String,
    /// Handle in its guest hypervisor.
    pub handle: u32,
    /// RAM.
    pub mem_bytes: u64,
    /// created/running/halted/crashed.
    pub state: String,
    /// vCPUs.
    pub vcpus: usize,
    /// RUN calls.
    pub runs: u64,
    /// Exits returned to L1.
    pub exits: u64,
    /// Times moved.
    pub moves: u32,
    /// Console lines so far.
    pub console_lines: u64,
    /// Generation of the guest hypervisor running it.
    pub generation: u32,
}

/// Status of a host VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostVmStatus {
    /// Line name.
    pub name: String,
    /// Generation.
    pub generation: u32,
    /// Status.
    pub status: String,
    /// Uptime.
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM.
    pub ram_bytes: u64,
    /// Pool.
    pub pool_bytes: u64,
    /// Hypercalls served.
    pub hypercalls: u64,
    /// Last health report of L1 (named counters).
    pub health: std::collections::BTreeMap<String, u64>,
    /// Nested guests.
    pub nested: Vec<NestedStatus>,
}

/// The status tree.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// vmbeam version.
    pub version: String,
    /// Host VMs.
    pub host_vms: Vec<HostVmStatus>,
}

/// The VMM.
pub struct Vmm {
    /// Host-wide services.
    pub shared: Arc<Shared>,
    /// Guest images.
    pub images: Images,
    /// Configuration.
    pub config: VmmConfig,
    lines: Mutex<Vec<Arc<Line>>>,
    busy: Mutex<()>,
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
        let shared = Shared::new(target)?;
        Ok(Vmm {
            shared,
            images,
            config,
            lines: Mutex::new(Vec::new()),
            busy: Mutex::new(()),
        })
    }

    /// Boots host VM `name` with the configured nested guests.
    pub fn start(&self, name: &str) -> Result<Arc<HostVm>, VmmError> {
        let c = &self.config;
        let mut nested = Vec::new();
        for i in 0..c.nested {
            let w = c.workloads[i as usize % c.workloads.len()];
            let module = self.images.module_index(w.kind()).unwrap_or(0);
            nested.push(NestedSpec {
                name: vmbeam_abi::name_to_bytes(&format!("l2-{i}")),
                mem_bytes: c.nested_mem,
                module,
                _pad: 0,
                seed: 0x5eed_0000 + i as u64,
                param0: c.workload_param,
                param1: 0,
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
            flags: 0,
            slice_us: c.slice_us,
        };
        let channel = MemFile::new(&format!("{name}-channel"), vmbeam_abi::layout::CHANNEL_SIZE)
            .map_err(|source| HostVmError::Memory {
                vm: name.to_string(),
                source,
            })?;
        let vm = HostVm::boot(
            self.shared.clone(),
            spec,
            &self.images.hypervisor,
            &self.images.modules,
            channel,
            None,
        )?;
        self.lines.lock().unwrap().push(Arc::new(Line {
            name: name.to_string(),
            current: Mutex::new(vm.clone()),
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

    /// Rejuvenates line `name`.
    pub fn rejuvenate(
        &self,
        name: Option<&str>,
        opts: &RejuvenateOptions,
    ) -> Result<Report, VmmError> {
        let _guard = self.busy.try_lock().map_err(|_| VmmError::Busy)?;
        let line = self.line(name)?;
        let aged = line.current.lock().unwrap().clone();
        let (report, succ) = rejuvenate::rejuvenate(
            &self.shared,
            &self.images.hypervisor,
            &self.images.modules,
            &aged,
            opts,
        )?;
        *line.current.lock().unwrap() = succ;
        Ok(report)
    }

    /// The first failure of a current host VM, if any.
    pub fn failure(&self) -> Option<String> {
        for l in self.lines.lock().unwrap().iter() {
            if let VmStatus::Failed(m) = l.current.lock().unwrap().status() {
                return Some(m);
            }
        }
        None
    }

    /// The status tree.
    pub fn status(&self) -> Status {
        let mut host_vms = Vec::new();
        for l in self.lines.lock().unwrap().iter() {
            let vm = l.current.lock().unwrap().clone();
            let h = vm.health.lock().unwrap().clone();
            let health = if h.reports > 0 {
                vmbeam_abi::hypercall::HEALTH_ARGS
                    .iter()
                    .zip(h.counters.iter())
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            } else {
                Default::default()
            };
            let mut nested = Vec::new();
            let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
            for n in vms {
                let n = n.lock().unwrap();
                let (moves, lines) = n
                    .record
                    .as_ref()
                    .map(|r| (r.info.lock().unwrap().moves, r.console.lines()))
                    .unwrap_or((0, 0));
                nested.push(NestedStatus {
                    name: n.name.clone(),
                    handle: n.handle,
                    mem_bytes: n.mem_bytes(),
                    state: n.state.as_str().to_string(),
                    vcpus: n.vcpu_count(),
                    runs: n.runs,
                    exits: n.exits,
                    moves,
                    console_lines: lines,
                    generation: vm.spec.generation,
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
                nested,
            });
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            host_vms,
        }
    }

    /// L0 checksum of `[gpa, gpa+len)` of nested guest `guest` (read-only,
    /// from the pages that back it).
    pub fn checksum(&self, guest: &str, gpa: u64, len: u64) -> Result<u64, VmmError> {
        let err = |msg: String| VmmError::Inspect {
            guest: guest.to_string(),
            msg,
        };
        for l in self.lines.lock().unwrap().iter() {
            let vm = l.current.lock().unwrap().clone();
            let vms: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
            for n in vms {
                let n = n.lock().unwrap();
                if n.name == guest {
                    return n
                        .checksum_range(gpa, len)
                        .map_err(|s| err(format!("range not readable ({s:?})")));
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
