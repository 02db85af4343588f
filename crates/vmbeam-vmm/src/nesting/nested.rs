//! The nested engine: L0's side of paravirtual nesting.
//!
//! Each nested VM that a guest hypervisor creates is backed by a real KVM VM
//! whose memory slots point at the host pages that already back the named
//! ranges of L1's memory, so nothing is duplicated. Its vCPUs run on the
//! calling L1 vCPU's thread, synchronously, like VMRESUME: RUN returns when
//! the nested guest needs L1 (I/O, MMIO, HLT, shutdown) or the slice ends.
//! A [`GuestRecord`] is the nested guest's identity on this host; it follows
//! the guest across moves between guest hypervisors.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, LockResult, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::MmapRegion;
use vmbeam_abi::checksum;
use vmbeam_abi::hypercall::{exit, NestedExit, Status};
use vmbeam_abi::state::VcpuState;

use crate::base::sync::{Rank, RankedGuard, RankedMutex};
use crate::devices::binding::Backend;
use crate::devices::queue::DeviceMemory;
use crate::devices::{DeviceError, DeviceSet};
use crate::host::arch;
use crate::host::console::Console;
use crate::host::kick::SliceTimer;
use crate::host::memory::MemFile;

/// Most memory slots per nested VM.
pub const MAX_SLOTS: usize = vmbeam_abi::handover::MAX_GUEST_RANGES;
/// Most vCPUs per nested VM.
pub const MAX_VCPUS: usize = vmbeam_abi::handover::MAX_NESTED_VCPUS;
/// Highest nested guest-physical address.
pub const MAX_L2_GPA: u64 = vmbeam_abi::l2::MAX_GIB << 30;
/// Shortest and longest time slice L1 may ask for.
pub const SLICE_BOUNDS: (Duration, Duration) = (Duration::from_micros(100), Duration::from_secs(1));

/// Identity of a nested guest on this host, independent of which guest
/// hypervisor runs it now.
#[derive(Debug)]
pub struct GuestRecord {
    /// Name, unique on the host.
    pub name: String,
    /// Its console.
    pub console: Arc<Console>,
    /// Mutable facts.
    pub info: RankedMutex<RecordInfo>,
}

/// Mutable facts about a nested guest.
#[derive(Debug, Default, Clone)]
pub struct RecordInfo {
    /// Host VM line it runs under now.
    pub host_vm: String,
    /// Generation of that guest hypervisor.
    pub generation: u32,
    /// Handle in that guest hypervisor.
    pub handle: u32,
    /// Id of the host VM object it is bound to (0 = unbound).
    pub bound_vm: u64,
    /// RAM bytes.
    pub mem_bytes: u64,
    /// Completed moves.
    pub moves: u32,
    /// When it last stopped running before a move.
    pub paused_at: Option<Instant>,
    /// When it first ran after the last move.
    pub resumed_at: Option<Instant>,
}

/// One memory slot of a nested VM.
#[derive(Debug, Clone)]
pub struct NestedSlot {
    /// Nested guest-physical address.
    pub l2_gpa: u64,
    /// L1 guest-physical address it comes from.
    pub l1_gpa: u64,
    /// Length.
    pub len: u64,
    /// Host address.
    pub hva: usize,
    /// Backing file and offset (what a grant hands on).
    pub file: Arc<MemFile>,
    /// Offset in `file`.
    pub file_offset: u64,
    /// Keeps the host mapping alive while the slot exists.
    pub map: Arc<MmapRegion>,
}

/// Words L0 reads or writes through one volatile copy.
const CHUNK_WORDS: usize = 8192;

impl NestedSlot {
    /// `[off, off + len)` of this slot as a vm-memory volatile slice of
    /// its host mapping.
    fn volatile(
        &self,
        off: u64,
        len: u64,
    ) -> Result<vm_memory::VolatileSlice<'_, vm_memory::bitmap::BS<'_, ()>>, Status> {
        use vm_memory::VolatileMemory;
        let base = self.hva - self.map.as_ptr() as usize;
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Status::OutOfRange);
        }
        self.map
            .get_slice(base + off as usize, len as usize)
            .map_err(|_| Status::OutOfRange)
    }

    /// Folds the 64-bit words of `[off, off + len)` into `sum`.
    fn fold_words(&self, off: u64, len: u64, mut sum: u64) -> Result<u64, Status> {
        let mut buf = vec![0u64; CHUNK_WORDS];
        let mut at = 0;
        while at < len {
            let n = ((len - at) / 8).min(CHUNK_WORDS as u64) as usize;
            self.volatile(off + at, n as u64 * 8)?
                .copy_to(&mut buf[..n]);
            sum = buf[..n].iter().fold(sum, |a, &x| checksum::fold(a, x));
            at += n as u64 * 8;
        }
        Ok(sum)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// A port or MMIO read owes data at this kvm_run address.
    Read {
        ptr: usize,
        len: usize,
    },
}

struct NestedVcpu {
    fd: VcpuFd,
    pending: Pending,
    exits_since_state: bool,
    /// An interrupt L1 injected that the guest has not been able to take
    /// yet (see [`NestedVm::inject`]).
    irq: Option<u8>,
}

/// While an interrupt waits for the guest to enable interrupts, RUN looks
/// again this often (this KVM gives no interrupt-window exits; see
/// docs/kvm-notes.md).
const IRQ_POLL: Duration = Duration::from_millis(1);

/// If an interrupt waits and the guest can take it now (RFLAGS.IF set, no
/// STI/MOV SS shadow), hands it to KVM; true while it still waits.
fn offer_irq(v: &mut NestedVcpu) -> bool {
    let Some(vector) = v.irq else {
        return false;
    };
    let open = v.fd.get_regs().is_ok_and(|r| r.rflags & (1 << 9) != 0)
        && v.fd
            .get_vcpu_events()
            .is_ok_and(|e| e.interrupt.shadow == 0);
    if open && kvm_interrupt(&v.fd, vector).is_ok() {
        v.irq = None;
        return false;
    }
    true
}

/// `KVM_INTERRUPT`: queues an external interrupt on a vCPU without an
/// in-kernel irqchip (kvm-ioctls has no wrapper for it).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;

fn kvm_interrupt(fd: &VcpuFd, vector: u8) -> Result<(), Status> {
    use std::os::fd::AsRawFd;
    let irq = kvm_bindings::kvm_interrupt { irq: vector as u32 };
    // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from a valid pointer
    // on a vCPU fd we own.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_INTERRUPT as _, &irq) };
    if r == 0 {
        Ok(())
    } else {
        Err(Status::BadState)
    }
}

/// Lifecycle of a nested VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NestedState {
    /// Created, not run yet.
    #[default]
    Created,
    /// Has run.
    Running,
    /// Halted (HLT exit last).
    Halted,
    /// Triple-faulted or failed to run; may only be destroyed.
    Crashed,
}

impl NestedState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            NestedState::Created => "created",
            NestedState::Running => "running",
            NestedState::Halted => "halted",
            NestedState::Crashed => "crashed",
        }
    }
}

/// A nested VM backed by a KVM VM.
pub struct NestedVm {
    /// Handle L1 uses.
    pub handle: u32,
    /// Name L1 gave it.
    pub name: String,
    vm: VmFd,
    /// Memory slots.
    pub slots: Vec<NestedSlot>,
    vcpus: Vec<NestedVcpu>,
    /// Identity, once bound.
    pub record: Option<Arc<GuestRecord>>,
    /// The run gate of a handover: a frozen VM (granted away, or adopted
    /// but not committed) may not run, be filled, be injected into or have
    /// its state read or written by a guest hypervisor. Only the handover
    /// (`migration::handover`, `rejuvenate`, `rescue`) sets or clears it;
    /// everything else about a move lives in `migration::handover_state`.
    pub frozen: bool,
    /// Lifecycle state.
    pub state: NestedState,
    /// RUN calls served.
    pub runs: u64,
    /// Exits returned to L1 (not counting slice ends).
    pub exits: u64,
    /// When KVM_RUN last returned.
    pub last_exit: Option<Instant>,
    /// Virtio devices (they stay with the VM through an adoption).
    pub devices: DeviceSet,
}

/// What others read of a nested VM without taking its lock (which a RUN
/// holds for a whole slice): published every time the lock is released.
#[derive(Debug, Clone, Default)]
pub struct NestedSummary {
    /// Handle L1 uses.
    pub handle: u32,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: NestedState,
    /// vCPUs.
    pub vcpus: usize,
    /// Mapped bytes.
    pub mem_bytes: u64,
    /// RUN calls.
    pub runs: u64,
    /// Exits returned to L1.
    pub exits: u64,
    /// Frozen (granted away, or adopted but not committed).
    pub frozen: bool,
    /// Identity, once bound.
    pub record: Option<Arc<GuestRecord>>,
    /// Its virtio devices.
    pub devices: Vec<crate::devices::DeviceStatus>,
}

/// A nested VM shared between the L1 vCPUs that drive it, with its
/// published [`NestedSummary`].
pub struct NestedCell {
    vm: RankedMutex<NestedVm>,
    summary: RankedMutex<NestedSummary>,
}

/// How host VMs and handovers hold a nested VM.
pub type NestedRef = Arc<NestedCell>;

impl NestedCell {
    /// Shares `vm`.
    pub fn new(vm: NestedVm) -> NestedRef {
        let cell = Arc::new(NestedCell {
            summary: RankedMutex::new(Rank::NestedInfo, NestedSummary::default()),
            vm: RankedMutex::new(Rank::NestedVm, vm),
        });
        drop(cell.lock());
        cell
    }

    /// Takes the nested VM (blocks while another vCPU runs it, at most a
    /// slice).
    pub fn lock(&self) -> LockResult<NestedGuard<'_>> {
        match self.vm.lock() {
            Ok(g) => Ok(NestedGuard { g, cell: self }),
            Err(p) => Err(PoisonError::new(NestedGuard {
                g: p.into_inner(),
                cell: self,
            })),
        }
    }

    /// The nested VM itself, if `cell` is its only holder.
    pub fn into_vm(cell: NestedRef) -> Option<NestedVm> {
        Arc::try_unwrap(cell).ok()?.vm.into_inner().ok()
    }

    /// What was published when the lock was last released; never waits
    /// for a RUN.
    pub fn summary(&self) -> NestedSummary {
        self.summary
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, n: &NestedVm) {
        let devices = if n.devices.is_empty() {
            Vec::new()
        } else {
            n.devices.status()
        };
        let mut s = self.summary.lock().unwrap_or_else(PoisonError::into_inner);
        s.handle = n.handle;
        if s.name != n.name {
            s.name = n.name.clone();
        }
        s.state = n.state;
        s.vcpus = n.vcpus.len();
        s.mem_bytes = n.mem_bytes();
        s.runs = n.runs;
        s.exits = n.exits;
        s.frozen = n.frozen;
        let same = match (&s.record, &n.record) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            s.record = n.record.clone();
        }
        s.devices = devices;
    }
}

/// Holds a nested VM; publishes its summary when released.
pub struct NestedGuard<'a> {
    g: RankedGuard<'a, NestedVm>,
    cell: &'a NestedCell,
}

impl Deref for NestedGuard<'_> {
    type Target = NestedVm;
    fn deref(&self) -> &NestedVm {
        &self.g
    }
}

impl DerefMut for NestedGuard<'_> {
    fn deref_mut(&mut self) -> &mut NestedVm {
        &mut self.g
    }
}

impl Drop for NestedGuard<'_> {
    fn drop(&mut self) {
        self.cell.publish(&self.g);
    }
}

fn kvm_err(_: kvm_ioctls::Error) -> Status {
    Status::NoResources
}

impl NestedVm {
    /// Creates the KVM VM for a nested guest.
    pub fn new(kvm: &Kvm, handle: u32, name: &str) -> Result<NestedVm, Status> {
        let vm = kvm.create_vm().map_err(kvm_err)?;
        // Needed on Intel hosts without unrestricted guest; harmless elsewhere.
        let _ = vm.set_tss_address(0xfffb_d000);
        Ok(NestedVm::with_vm(vm, handle, name))
    }

    /// A nested guest on a clean KVM VM given back by
    /// [`NestedVm::into_clean_vm`] (no vCPU, no memory slot).
    pub fn with_vm(vm: VmFd, handle: u32, name: &str) -> NestedVm {
        NestedVm {
            handle,
            name: name.to_string(),
            vm,
            slots: Vec::new(),
            vcpus: Vec::new(),
            record: None,
            frozen: false,
            state: NestedState::Created,
            runs: 0,
            exits: 0,
            last_exit: None,
            devices: DeviceSet::default(),
        }
    }

    /// The KVM VM of a destroyed nested guest, for reuse, if it never had
    /// a vCPU (KVM cannot remove one): its memory slots are deleted first,
    /// so it is as clean as a new one. Destroying a KVM VM costs
    /// milliseconds (KVM waits for readers of its memory map), creating one
    /// much less; a guest hypervisor that churns names is served from here.
    pub fn into_clean_vm(self) -> Option<VmFd> {
        if !self.vcpus.is_empty() {
            return None;
        }
        for (i, s) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: 0,
                guest_phys_addr: s.l2_gpa,
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: size 0 deletes the slot; no memory is handed to KVM.
            unsafe { self.vm.set_user_memory_region(region) }.ok()?;
        }
        Some(self.vm)
    }

    /// Total mapped bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.len).sum()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Turns KVM dirty-page logging on or off for every slot (pre-copy).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), Status> {
        for (i, slot) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: if on {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: slot.l2_gpa,
                memory_size: slot.len,
                userspace_addr: slot.hva as u64,
            };
            // SAFETY: same slot, same live mapping as when it was created;
            // only the flags change.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err)?;
        }
        Ok(())
    }

    /// Fetches and clears the dirty bitmap of slot `idx` (one bit per 4 KiB page).
    pub fn take_dirty(&self, idx: usize) -> Result<Vec<u64>, Status> {
        let slot = self.slots.get(idx).ok_or(Status::NoSuchHandle)?;
        self.vm
            .get_dirty_log(idx as u32, slot.len as usize)
            .map_err(|_| Status::Internal)
    }

    /// Adds a slot (caller validated ownership of the L1 range).
    pub fn map(&mut self, slot: NestedSlot) -> Result<(), Status> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(Status::TooMany);
        }
        let end = slot
            .l2_gpa
            .checked_add(slot.len)
            .ok_or(Status::OutOfRange)?;
        if end > MAX_L2_GPA {
            return Err(Status::OutOfRange);
        }
        if self
            .slots
            .iter()
            .any(|s| slot.l2_gpa < s.l2_gpa + s.len && s.l2_gpa < end)
        {
            return Err(Status::Overlap);
        }
        if self.devices.overlaps(slot.l2_gpa, slot.len) {
            return Err(Status::Overlap);
        }
        let region = kvm_userspace_memory_region {
            slot: self.slots.len() as u32,
            flags: 0,
            guest_phys_addr: slot.l2_gpa,
            memory_size: slot.len,
            userspace_addr: slot.hva as u64,
        };
        // SAFETY: `hva..hva+len` lies inside `slot.map`, a live shared
        // mapping that the slot keeps alive for as long as this VM exists.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err)?;
        self.slots.push(slot);
        if !self.devices.is_empty() {
            self.devices.set_memory(self.device_memory());
        }
        Ok(())
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let views: Vec<_> = self
            .slots
            .iter()
            .map(|s| (s.l2_gpa, s.hva, s.len as usize, s.map.clone()))
            .collect();
        DeviceMemory::new(&views)
    }

    /// Places a virtio device bound to this guest (`index` in binding
    /// order) at nested address `base` with interrupt line `gsi`; returns
    /// its virtio device id.
    pub fn place_device(
        &mut self,
        index: u32,
        base: u64,
        gsi: u32,
        backend: &Backend,
    ) -> Result<u32, DeviceError> {
        let ram: Vec<(u64, u64)> = self.slots.iter().map(|s| (s.l2_gpa, s.len)).collect();
        let kind = self.devices.place(
            &self.vm,
            index,
            base,
            gsi,
            backend,
            &self.name,
            &ram,
            self.vcpus.len(),
        )?;
        self.devices.set_memory(self.device_memory());
        Ok(kind)
    }

    /// The index of the slot that maps `len` bytes at `l2_gpa` from exactly
    /// `offset` of `file` (how a successor confirms an adopted slot).
    pub fn find_slot(
        &self,
        l2_gpa: u64,
        len: u64,
        file: &Arc<MemFile>,
        offset: u64,
    ) -> Result<usize, Status> {
        let i = self
            .slots
            .iter()
            .position(|s| s.l2_gpa == l2_gpa && s.len == len)
            .ok_or(Status::BadArg)?;
        let s = &self.slots[i];
        if !Arc::ptr_eq(&s.file, file) || s.file_offset != offset {
            return Err(Status::NotPermitted);
        }
        Ok(i)
    }

    /// Records that slot `i` is now reached at `l1_gpa` in the guest
    /// hypervisor that runs this VM (applied when an adoption commits).
    pub fn set_slot_l1(&mut self, i: usize, l1_gpa: u64) {
        if let Some(s) = self.slots.get_mut(i) {
            s.l1_gpa = l1_gpa;
        }
    }

    /// Completes a pending port or MMIO read of vCPU 0 with `answer` (the
    /// guest hypervisor that owed it is no longer there to give it).
    pub fn answer_pending(&mut self, answer: u64) {
        if let Some(v) = self.vcpus.first_mut() {
            complete_pending(v, answer);
        }
    }

    /// Adds a vCPU; returns its index.
    pub fn create_vcpu(&mut self, cpuid: &CpuId) -> Result<u32, Status> {
        if self.vcpus.len() >= MAX_VCPUS {
            return Err(Status::TooMany);
        }
        let idx = self.vcpus.len() as u32;
        let fd = self.vm.create_vcpu(idx as u64).map_err(kvm_err)?;
        arch::set_cpuid(&fd, cpuid).map_err(|_| Status::Internal)?;
        self.vcpus.push(NestedVcpu {
            fd,
            pending: Pending::None,
            exits_since_state: false,
            irq: None,
        });
        Ok(idx)
    }

    fn vcpu(&mut self, idx: u64) -> Result<&mut NestedVcpu, Status> {
        self.vcpus
            .get_mut(usize::try_from(idx).map_err(|_| Status::NoSuchHandle)?)
            .ok_or(Status::NoSuchHandle)
    }

    /// Reads a vCPU's state, first completing a pending exit with `answer`.
    pub fn get_state(&mut self, idx: u64, answer: u64) -> Result<VcpuState, Status> {
        let v = self.vcpu(idx)?;
        if v.exits_since_state {
            complete_pending(v, answer);
            v.fd.set_kvm_immediate_exit(1);
            let _ = v.fd.run();
            v.fd.set_kvm_immediate_exit(0);
            v.exits_since_state = false;
        }
        arch::get_state(&v.fd).map_err(|_| Status::Internal)
    }

    /// Reads a vCPU's state for an observer (`vmbeam inspect`) without
    /// touching the vCPU: unlike [`NestedVm::get_state`] it never completes
    /// a pending exit. `Ok(None)` ("busy") when the last exit was port or
    /// MMIO I/O that KVM finishes only on the next entry; this is
    /// conservative (it can say busy when the I/O was already completed).
    pub fn peek_regs(&mut self, idx: u64) -> Result<Option<VcpuState>, Status> {
        let v = self.vcpu(idx)?;
        let reason = v.fd.get_kvm_run().exit_reason;
        if v.pending != Pending::None
            || reason == kvm_bindings::KVM_EXIT_IO
            || reason == kvm_bindings::KVM_EXIT_MMIO
        {
            return Ok(None);
        }
        arch::get_state(&v.fd)
            .map(Some)
            .map_err(|_| Status::Internal)
    }

    /// Saves every vCPU's state for a migration: exits already handled are
    /// completed first; a pending port/MMIO read is left uncompleted, so the
    /// guest simply executes that read again on the other side.
    pub fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, Status> {
        let mut out = Vec::new();
        for v in self.vcpus.iter_mut() {
            if v.exits_since_state && v.pending == Pending::None {
                v.fd.set_kvm_immediate_exit(1);
                let _ = v.fd.run();
                v.fd.set_kvm_immediate_exit(0);
                v.exits_since_state = false;
            }
            out.push(arch::get_state(&v.fd).map_err(|_| Status::Internal)?);
        }
        Ok(out)
    }

    /// Writes a vCPU's state (refused while a read it owes is pending).
    pub fn set_state(&mut self, idx: u64, st: &VcpuState) -> Result<(), Status> {
        let v = self
            .vcpus
            .get(usize::try_from(idx).map_err(|_| Status::NoSuchHandle)?);
        let v = v.ok_or(Status::NoSuchHandle)?;
        if v.pending != Pending::None {
            return Err(Status::BadState);
        }
        arch::set_state(&v.fd, st).map_err(|_| Status::BadArg)
    }

    /// Queues external interrupt `vector` the way a local APIC would: it
    /// is delivered only when the guest can take it (RFLAGS.IF set, no
    /// interrupt shadow). At every entry of a RUN, L0 checks the guest's
    /// flag: if it is open the interrupt goes to KVM (`KVM_INTERRUPT`),
    /// otherwise L0 requests an interrupt window (`request_interrupt_window`,
    /// injecting at the `IrqWindowOpen` exit) and, because this host's KVM
    /// gives no such exit and delivers `KVM_INTERRUPT` regardless of IF,
    /// also looks again every [`IRQ_POLL`] within the slice. One interrupt
    /// can wait per vCPU; a second is `BadState`.
    ///
    /// A frozen VM (granted away, or adopted but not committed) refuses
    /// it: the interrupt would be delivered under whichever guest
    /// hypervisor ends up running the guest.
    pub fn inject(&mut self, idx: u64, vector: u64) -> Result<(), Status> {
        if !(32..=255).contains(&vector) {
            return Err(Status::BadArg);
        }
        if self.frozen {
            return Err(Status::NotPermitted);
        }
        let v = self.vcpu(idx)?;
        if v.irq.is_some() {
            return Err(Status::BadState);
        }
        v.irq = Some(vector as u8);
        Ok(())
    }

    /// Runs vCPU `idx` for at most `slice`.
    pub fn run(
        &mut self,
        idx: u64,
        slice: Duration,
        answer: u64,
        timer: &SliceTimer,
    ) -> Result<NestedExit, Status> {
        if self.frozen {
            return Err(Status::NotPermitted);
        }
        if self.state == NestedState::Crashed {
            return Err(Status::BadState);
        }
        let slice = slice.clamp(SLICE_BOUNDS.0, SLICE_BOUNDS.1);
        // The guest runs again (after a move or a rollback): so do its
        // devices.
        self.devices.resume();
        // Check the index before counting: a refused RUN must leave `runs`
        // alone (`runs == 0` marks the first entry after a move).
        self.vcpu(idx)?;
        self.runs += 1;
        let v = self
            .vcpus
            .get_mut(idx as usize)
            .ok_or(Status::NoSuchHandle)?;
        complete_pending(v, answer);
        let ie = &mut v.fd.get_kvm_run().immediate_exit as *mut u8 as *const AtomicU8;
        let t0 = Instant::now();
        let deadline = t0 + slice;
        let mut gen;
        let mut out = NestedExit::default();
        let mut internal = false;
        let devices = &self.devices;
        loop {
            let waiting = offer_irq(v);
            v.fd.get_kvm_run().request_interrupt_window = waiting as u8;
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = if waiting { left.min(IRQ_POLL) } else { left };
            // SAFETY: the kvm_run mapping of `v.fd` lives until `v` is
            // dropped, which cannot happen before `disarm` below (we hold
            // `&mut self`).
            gen = unsafe { timer.arm(chunk.max(Duration::from_micros(1)), ie) };
            match v.fd.run() {
                Ok(VcpuExit::IrqWindowOpen) => {
                    // The guest can take the waiting interrupt: next entry.
                    timer.disarm(gen);
                    v.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e)
                    if (e.errno() == libc::EINTR || e.errno() == libc::EAGAIN)
                        && waiting
                        && Instant::now() < deadline =>
                {
                    // A poll tick while an interrupt waits: look again.
                    timer.disarm(gen);
                    v.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                // Device registers are served here, at host speed, and the
                // guest continues: the guest hypervisor never sees them.
                Ok(VcpuExit::MmioRead(addr, data)) if devices.owns(addr) => {
                    devices.mmio_read(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) if devices.mmio_write(addr, data) => {
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) if data.len() <= 8 => {
                    out.reason = exit::IO_OUT;
                    out.port = port as u32;
                    out.size = data.len() as u32;
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    out.data = u64::from_le_bytes(b);
                }
                Ok(VcpuExit::IoIn(port, data)) if data.len() <= 8 => {
                    out.reason = exit::IO_IN;
                    out.port = port as u32;
                    out.size = data.len() as u32;
                    v.pending = Pending::Read {
                        ptr: data.as_mut_ptr() as usize,
                        len: data.len(),
                    };
                }
                Ok(VcpuExit::MmioRead(addr, data)) if data.len() <= 8 => {
                    out.reason = exit::MMIO_READ;
                    out.addr = addr;
                    out.size = data.len() as u32;
                    v.pending = Pending::Read {
                        ptr: data.as_mut_ptr() as usize,
                        len: data.len(),
                    };
                }
                Ok(VcpuExit::MmioWrite(addr, data)) if data.len() <= 8 => {
                    out.reason = exit::MMIO_WRITE;
                    out.addr = addr;
                    out.size = data.len() as u32;
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    out.data = u64::from_le_bytes(b);
                }
                Ok(VcpuExit::Hlt) => out.reason = exit::HLT,
                Ok(VcpuExit::Shutdown) => out.reason = exit::SHUTDOWN,
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    out.reason = exit::FAIL;
                    out.detail = reason;
                }
                Ok(VcpuExit::InternalError) => {
                    out.reason = exit::FAIL;
                    internal = true;
                }
                Ok(VcpuExit::Intr) => out.reason = exit::SLICE,
                Ok(_) => {
                    out.reason = exit::FAIL;
                    out.detail = 0xffff;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    out.reason = exit::SLICE
                }
                Err(e) => {
                    out.reason = exit::FAIL;
                    out.detail = e.errno() as u64;
                }
            }
            break;
        }
        v.fd.get_kvm_run().request_interrupt_window = 0;
        timer.disarm(gen);
        v.fd.set_kvm_immediate_exit(0);
        let mut rip_gpa = None;
        if internal {
            // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member.
            out.detail = unsafe { v.fd.get_kvm_run().__bindgen_anon_1.internal.suberror } as u64;
            if let Ok(r) = v.fd.get_regs() {
                rip_gpa =
                    v.fd.translate_gva(r.rip)
                        .ok()
                        .filter(|t| t.valid != 0)
                        .map(|t| (r.rip, t.physical_address));
            }
        }
        let now = Instant::now();
        out.run_ns = (now - t0).as_nanos() as u64;
        if out.reason != exit::SLICE {
            v.exits_since_state = true;
            self.exits += 1;
        }
        self.last_exit = Some(now);
        self.state = match out.reason {
            exit::SHUTDOWN | exit::FAIL => NestedState::Crashed,
            exit::HLT => NestedState::Halted,
            _ => NestedState::Running,
        };
        if internal {
            // Say why, with the instruction bytes, on the guest's own console
            // (L1 only learns "FAIL"): an unsupported instruction is then
            // obvious at a glance.
            let bytes = rip_gpa
                .and_then(|(_, gpa)| self.read(gpa, 15).ok())
                .map(|b| {
                    b.iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "unavailable".into());
            let what = if out.detail == 1 {
                "emulation failure".to_string()
            } else {
                format!("suberror {}", out.detail)
            };
            if let Some(r) = &self.record {
                r.console.write_line(
                    format!(
                        "[vmbeam] nested guest stopped: KVM internal error ({what}) at rip {:#x}; instruction bytes: {bytes}",
                        rip_gpa.map(|x| x.0).unwrap_or(0)
                    )
                    .as_bytes(),
                );
            }
        }
        Ok(out)
    }

    /// Validates that `[l2_gpa, l2_gpa+len)` is mapped; returns (slot, offset) pieces.
    fn pieces(&self, l2_gpa: u64, len: u64) -> Result<Vec<(usize, u64, u64)>, Status> {
        let end = l2_gpa.checked_add(len).ok_or(Status::OutOfRange)?;
        let mut out = Vec::new();
        let mut at = l2_gpa;
        while at < end {
            let (i, s) = self
                .slots
                .iter()
                .enumerate()
                .find(|(_, s)| at >= s.l2_gpa && at < s.l2_gpa + s.len)
                .ok_or(Status::OutOfRange)?;
            let take = (s.l2_gpa + s.len).min(end) - at;
            out.push((i, at - s.l2_gpa, take));
            at += take;
        }
        Ok(out)
    }

    /// The L1 ranges behind a mapped nested range.
    pub fn l1_ranges(&self, l2_gpa: u64, len: u64) -> Vec<(u64, u64)> {
        self.pieces(l2_gpa, len)
            .map(|v| {
                v.into_iter()
                    .map(|(i, off, take)| (self.slots[i].l1_gpa + off, take))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fills a mapped range with the seeded pattern (host speed).
    ///
    /// Guest memory changes under L0 while the guest runs: every access
    /// here goes through vm-memory's volatile slices (`for_slot_words`),
    /// never through Rust references to guest memory.
    pub fn fill_pattern(&self, l2_gpa: u64, len: u64, seed: u64) -> Result<u64, Status> {
        if !l2_gpa.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(Status::Misaligned);
        }
        if len == 0 {
            return Err(Status::BadArg);
        }
        for (i, off, take) in self.pieces(l2_gpa, len)? {
            let s = &self.slots[i];
            let base = s.l2_gpa + off;
            let mut at = 0;
            let mut buf = vec![0u64; CHUNK_WORDS];
            while at < take {
                let n = ((take - at) / 8).min(CHUNK_WORDS as u64) as usize;
                for (k, w) in buf[..n].iter_mut().enumerate() {
                    *w = checksum::pattern_word(seed, base + at + k as u64 * 8);
                }
                s.volatile(off + at, n as u64 * 8)?.copy_from(&buf[..n]);
                at += n as u64 * 8;
            }
        }
        Ok(len)
    }

    /// Checksum of a mapped range, read from the backing pages.
    pub fn checksum_range(&self, l2_gpa: u64, len: u64) -> Result<u64, Status> {
        if !l2_gpa.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(Status::Misaligned);
        }
        let mut sum = checksum::CHECKSUM_INIT;
        for (i, off, take) in self.pieces(l2_gpa, len)? {
            sum = self.slots[i].fold_words(off, take, sum)?;
        }
        Ok(sum)
    }

    /// Checksum of the whole guest memory, in nested address order.
    ///
    /// Holes in the backing file (pages never written) read as zeros; they
    /// are folded as zeros without being touched, so hashing a sparse guest
    /// allocates no host memory.
    pub fn checksum_all(&self) -> u64 {
        let mut order: Vec<&NestedSlot> = self.slots.iter().collect();
        order.sort_by_key(|s| s.l2_gpa);
        let mut sum = checksum::CHECKSUM_INIT;
        for s in order {
            for (off, len, data) in s.file.extents(s.file_offset, s.len) {
                let words = (len / 8) as usize;
                if data {
                    // Inside the slot by construction of `extents`.
                    sum = s.fold_words(off - s.file_offset, len, sum).unwrap_or(sum);
                } else {
                    for _ in 0..words {
                        sum = checksum::fold(sum, 0);
                    }
                }
            }
        }
        sum
    }

    /// Inverts the byte at nested address `l2_gpa` through the slot's
    /// mapping (fault injection: a corruption the move must detect).
    pub fn flip_byte(&self, l2_gpa: u64) -> Result<(), Status> {
        use vm_memory::Bytes;
        let (i, off, _) = self.pieces(l2_gpa, 1)?[0];
        let v = self.slots[i].volatile(off, 1)?;
        let b: u8 = v.read_obj(0).map_err(|_| Status::OutOfRange)?;
        v.write_obj(!b, 0).map_err(|_| Status::OutOfRange)
    }

    /// Reads bytes of a mapped range.
    pub fn read(&self, l2_gpa: u64, len: u64) -> Result<Vec<u8>, Status> {
        let mut out = Vec::with_capacity(len as usize);
        for (i, off, take) in self.pieces(l2_gpa, len)? {
            let start = out.len();
            out.resize(start + take as usize, 0);
            self.slots[i]
                .volatile(off, take)?
                .copy_to(&mut out[start..]);
        }
        Ok(out)
    }
}

fn complete_pending(v: &mut NestedVcpu, answer: u64) {
    if let Pending::Read { ptr, len } = v.pending {
        let b = answer.to_le_bytes();
        // SAFETY: `ptr` points into this vCPU's kvm_run mapping (the data
        // area KVM named at the read exit), valid while the vCPU exists.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), ptr as *mut u8, len.min(8)) };
        v.pending = Pending::None;
    }
}
