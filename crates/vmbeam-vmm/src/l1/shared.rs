//! Host-wide services every host VM uses: the KVM handle, the CPUID given
//! to every vCPU, the consoles, the registry of nested guest identities and
//! of live host VMs, the dispatcher that serves their hypercalls, the event
//! that wakes whoever waits for a VM to stop, and the sink that control
//! events (a bound hit by a guest hypervisor) go to.
//!
//! [`Services`] is generic over the host VM type `V` (the host VM layer
//! names it `Shared`), so this file needs no import of the host VM.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::base::sync::{Rank, RankedCondvar, RankedMutex};
use crate::devices::binding::Bindings;
use crate::host::console::{ConsoleError, ConsoleHub, ConsoleTarget};
use crate::l1::dispatch::Hypercalls;
use crate::nesting::nested::{GuestRecord, RecordInfo};

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

/// Where L0's core reports events (the control layer gives it the events
/// file); implemented above this layer, so the core needs no import of it.
pub trait EventSink: Send + Sync {
    /// Records one event with its fields (a JSON object).
    fn event(&self, event: &str, fields: serde_json::Value);
}

/// Why a record cannot be claimed for a new nested guest.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A live guest of that name exists on this host (run by some guest
    /// hypervisor, or being moved between two).
    #[error("a nested guest named '{}' already exists on this host", .0.escape_debug())]
    Taken(String),
    /// Its console cannot be opened.
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// Shortest time between two events about the same bound of the same host
/// VM; hits in between are counted and reported with the next event.
pub const LIMIT_EVENT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct LimitLog {
    last: Instant,
    suppressed: u64,
}

/// Host-wide services for host VMs of type `V`.
pub struct Services<V: 'static> {
    /// KVM.
    pub kvm: Kvm,
    /// CPUID for every vCPU.
    pub cpuid: CpuId,
    /// Consoles.
    pub consoles: ConsoleHub,
    /// Nested guest identities by name. Weak: a record lives exactly as
    /// long as something holds the guest (a nested VM in some generation,
    /// or a grant in flight), so a destroyed guest's record and console go
    /// with it.
    records: RankedMutex<HashMap<String, Weak<GuestRecord>>>,
    /// Every live host VM by id (weak: lines and handovers own them), so a
    /// record's `bound_vm` leads to the VM that runs the guest now.
    host_vms: RankedMutex<HashMap<u64, Weak<V>>>,
    hypercalls: Arc<dyn Hypercalls<V>>,
    bindings: RankedMutex<Arc<Bindings>>,
    events: RankedMutex<u64>,
    events_cv: RankedCondvar,
    sink: OnceLock<Arc<dyn EventSink>>,
    limit_log: RankedMutex<HashMap<(String, &'static str), LimitLog>>,
}

impl<V: 'static> Services<V> {
    /// Opens KVM and sets up consoles; every host VM's hypercalls will be
    /// served by `hypercalls`.
    pub fn new(
        consoles: ConsoleTarget,
        hypercalls: Arc<dyn Hypercalls<V>>,
    ) -> Result<Arc<Self>, KvmError> {
        let kvm = open_kvm()?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)?;
        Ok(Arc::new(Services {
            kvm,
            cpuid,
            consoles: ConsoleHub::new(consoles)?,
            records: RankedMutex::new(Rank::Records, HashMap::new()),
            host_vms: RankedMutex::new(Rank::HostVms, HashMap::new()),
            hypercalls,
            bindings: RankedMutex::new(Rank::Bindings, Arc::new(Bindings::default())),
            events: RankedMutex::new(Rank::Signal, 0),
            events_cv: RankedCondvar::new(),
            sink: OnceLock::new(),
            limit_log: RankedMutex::new(Rank::VmLeaf, HashMap::new()),
        }))
    }

    /// A new record for a new nested guest called `name`: refused while a
    /// live guest of that name exists anywhere on this host (run by another
    /// host VM, or between two guest hypervisors during a move). The one
    /// rule for every path that creates a guest (VM_CREATE, an incoming
    /// migration).
    pub fn claim_record(&self, name: &str) -> Result<Arc<GuestRecord>, ClaimError> {
        let mut recs = self.records.lock().unwrap();
        if recs.get(name).is_some_and(|w| w.strong_count() > 0) {
            return Err(ClaimError::Taken(name.to_string()));
        }
        recs.retain(|_, w| w.strong_count() > 0);
        let r = Arc::new(GuestRecord {
            name: name.to_string(),
            console: self.consoles.get(name)?,
            info: RankedMutex::new(Rank::RecordInfo, RecordInfo::default()),
        });
        recs.insert(name.to_string(), Arc::downgrade(&r));
        Ok(r)
    }

    /// Records that are alive now (each held by a guest).
    pub fn live_records(&self) -> usize {
        self.records
            .lock()
            .unwrap()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Sends events to `sink` from now on (only the first call has an effect).
    pub fn set_event_sink(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    /// Reports an event, if a sink is set.
    pub fn emit(&self, event: &str, fields: serde_json::Value) {
        if let Some(s) = self.sink.get() {
            s.event(event, fields);
        }
    }

    /// Reports that host VM `vm` hit bound `bound` (an event `limit`), at
    /// most once per [`LIMIT_EVENT_INTERVAL`] for each VM and bound; hits
    /// in between are counted in the next event's `suppressed`.
    pub fn limit_hit(&self, vm: &str, bound: &'static str, detail: &str) {
        let now = Instant::now();
        let suppressed = {
            let mut log = self.limit_log.lock().unwrap();
            if log.len() > 4096 {
                log.retain(|_, l| now.duration_since(l.last) < LIMIT_EVENT_INTERVAL);
            }
            match log.get_mut(&(vm.to_string(), bound)) {
                Some(l) if now.duration_since(l.last) < LIMIT_EVENT_INTERVAL => {
                    l.suppressed += 1;
                    return;
                }
                Some(l) => {
                    let s = l.suppressed;
                    l.last = now;
                    l.suppressed = 0;
                    s
                }
                None => {
                    log.insert(
                        (vm.to_string(), bound),
                        LimitLog {
                            last: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        self.emit(
            "limit",
            serde_json::json!({
                "vm": vm,
                "bound": bound,
                "detail": detail,
                "suppressed": suppressed,
            }),
        );
    }

    /// Sets the device backends the operator bound to guest names.
    pub fn set_bindings(&self, b: Bindings) {
        *self.bindings.lock().unwrap() = Arc::new(b);
    }

    /// The device backends bound to guest names.
    pub fn bindings(&self) -> Arc<Bindings> {
        self.bindings.lock().unwrap().clone()
    }

    /// The dispatcher that serves every host VM's hypercalls.
    pub fn hypercalls(&self) -> Arc<dyn Hypercalls<V>> {
        self.hypercalls.clone()
    }

    /// Remembers a newly built host VM `vm` with id `id` (and forgets
    /// dropped ones).
    pub fn register_host_vm(&self, id: u64, vm: &Arc<V>) {
        let mut vms = self.host_vms.lock().unwrap();
        vms.retain(|_, w| w.strong_count() > 0);
        vms.insert(id, Arc::downgrade(vm));
    }

    /// The host VM with id `id`, if it still exists.
    pub fn host_vm(&self, id: u64) -> Option<Arc<V>> {
        self.host_vms
            .lock()
            .unwrap()
            .get(&id)
            .and_then(Weak::upgrade)
    }

    /// The record called `name`, if a guest of that name exists now.
    pub fn find_record(&self, name: &str) -> Option<Arc<GuestRecord>> {
        self.records
            .lock()
            .unwrap()
            .get(name)
            .and_then(Weak::upgrade)
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
