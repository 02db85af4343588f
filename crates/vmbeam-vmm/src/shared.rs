//! Host-wide services every host VM uses: the KVM handle, the CPUID given
//! to every vCPU, the consoles, the registry of nested guest identities, and
//! the event that wakes whoever waits for a VM to stop.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::devices::binding::Bindings;
use crate::host::console::{ConsoleError, ConsoleHub, ConsoleTarget};
use crate::host::hostvm::HostVm;
use crate::nesting::nested::{GuestRecord, RecordInfo};
use crate::sync::{Rank, RankedCondvar, RankedMutex};

/// Why L0 cannot use KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualization or load the kvm module)")]
    Missing,
    /// /dev/kvm exists but cannot be opened.
    #[error("cannot open /dev/kvm: {0} (add this user to the 'kvm' group or run as root)")]
    Open(std::io::Error),
    /// KVM refused a basic query.
    #[error("KVM does not answer the CPUID query: {0}")]
    Cpuid(kvm_ioctls::Error),
    /// Consoles could not be set up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// Opens /dev/kvm with a clear error.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err(KvmError::Missing);
    }
    Kvm::new().map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))
}

/// Host-wide services.
pub struct Shared {
    /// KVM.
    pub kvm: Kvm,
    /// CPUID for every vCPU.
    pub cpuid: CpuId,
    /// Consoles.
    pub consoles: ConsoleHub,
    /// Nested guest identities by name.
    pub records: RankedMutex<HashMap<String, Arc<GuestRecord>>>,
    /// Every live host VM by id (weak: lines and handovers own them), so a
    /// record's `bound_vm` leads to the VM that runs the guest now.
    host_vms: RankedMutex<HashMap<u64, Weak<HostVm>>>,
    bindings: RankedMutex<Arc<Bindings>>,
    events: RankedMutex<u64>,
    events_cv: RankedCondvar,
}

impl Shared {
    /// Opens KVM and sets up consoles.
    pub fn new(consoles: ConsoleTarget) -> Result<Arc<Shared>, KvmError> {
        let kvm = open_kvm()?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)?;
        Ok(Arc::new(Shared {
            kvm,
            cpuid,
            consoles: ConsoleHub::new(consoles)?,
            records: RankedMutex::new(Rank::Records, HashMap::new()),
            host_vms: RankedMutex::new(Rank::HostVms, HashMap::new()),
            bindings: RankedMutex::new(Rank::Bindings, Arc::new(Bindings::default())),
            events: RankedMutex::new(Rank::Signal, 0),
            events_cv: RankedCondvar::new(),
        }))
    }

    /// The record called `name`, created if new.
    pub fn record(&self, name: &str) -> Result<Arc<GuestRecord>, ConsoleError> {
        let mut recs = self.records.lock().unwrap();
        if let Some(r) = recs.get(name) {
            return Ok(r.clone());
        }
        let r = Arc::new(GuestRecord {
            name: name.to_string(),
            console: self.consoles.get(name)?,
            info: RankedMutex::new(Rank::RecordInfo, RecordInfo::default()),
        });
        recs.insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Sets the device backends the operator bound to guest names.
    pub fn set_bindings(&self, b: Bindings) {
        *self.bindings.lock().unwrap() = Arc::new(b);
    }

    /// The device backends bound to guest names.
    pub fn bindings(&self) -> Arc<Bindings> {
        self.bindings.lock().unwrap().clone()
    }

    /// Remembers a newly built host VM (and forgets dropped ones).
    pub fn register_host_vm(&self, vm: &Arc<HostVm>) {
        let mut vms = self.host_vms.lock().unwrap();
        vms.retain(|_, w| w.strong_count() > 0);
        vms.insert(vm.id, Arc::downgrade(vm));
    }

    /// The host VM with id `id`, if it still exists.
    pub fn host_vm(&self, id: u64) -> Option<Arc<HostVm>> {
        self.host_vms
            .lock()
            .unwrap()
            .get(&id)
            .and_then(Weak::upgrade)
    }

    /// The record called `name`, if a guest of that name ever existed.
    pub fn find_record(&self, name: &str) -> Option<Arc<GuestRecord>> {
        self.records.lock().unwrap().get(name).cloned()
    }

    /// Wakes waiters: a VM stopped or changed state.
    pub fn notify_vm_event(&self) {
        *self.events.lock().unwrap() += 1;
        self.events_cv.notify_all();
    }

    /// Waits up to `timeout` for a VM event after `seen`.
    pub fn wait_vm_event(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.events.lock().unwrap();
        *self
            .events_cv
            .wait_timeout_while(g, timeout, |e| *e == seen)
            .unwrap()
            .0
    }

    /// Current event count.
    pub fn vm_events(&self) -> u64 {
        *self.events.lock().unwrap()
    }
}
