//! Virtio devices of nested guests, served by L0 at host speed.
//!
//! A nested guest's devices live with its nested VM ([`DeviceSet`] is part
//! of `NestedVm`), not with the guest hypervisor that placed them: a
//! zero-copy rejuvenation hands the same nested VM, with its devices, open
//! files and TAPs, to the successor. Register accesses are MMIO exits of
//! the nested vCPU that L0 answers inside the RUN hypercall (L1 never sees
//! them); queue notifications are ioeventfds served by one worker thread
//! per device; interrupts are irqfds into the nested VM's in-kernel
//! irqchip. See docs/devices.md.

pub mod binding;
pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod tap;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::base::sync::{Rank, RankedMutex};
use crate::devices::binding::Backend;
use crate::devices::mmio::{DeviceCounters, MmioDevice, QUEUE_NOTIFY};
use crate::devices::queue::DeviceMemory;

/// Size of a device window.
pub const WINDOW: u64 = vmbeam_abi::hypercall::DEVICE_WINDOW;
/// Nested addresses the in-kernel irqchip owns (IOAPIC, local APIC).
pub const IRQCHIP_RANGES: [(u64, u64); 2] = [(0xfec0_0000, 0x1000), (0xfee0_0000, 0x10_0000)];
/// Interrupt lines a device may use: the in-kernel PIC and IOAPIC pins,
/// except 0 (timer) and 2 (PIC cascade).
pub const GSI_RANGE: (u32, u32) = (1, 23);
/// How long a device worker sleeps between checks of its stop flag.
const WORKER_TICK: Duration = Duration::from_millis(200);

/// Why a placement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The window is not page aligned.
    #[error("device window {0:#x} is not aligned to {WINDOW:#x}")]
    Misaligned(u64),
    /// The window lies beyond the nested address space.
    #[error("device window {0:#x} lies outside the nested address space")]
    OutOfRange(u64),
    /// The window overlaps RAM, another device or the irqchip.
    #[error("device window {0:#x} overlaps {1}")]
    Overlap(u64, &'static str),
    /// A bad interrupt line.
    #[error("interrupt line {0} is not usable (1, 3-23)")]
    BadIrq(u32),
    /// Placed already.
    #[error("device {0} is already placed")]
    AlreadyPlaced(u32),
    /// The VM has vCPUs but no irqchip yet: devices must come first.
    #[error("devices must be placed before the first vCPU is created")]
    TooLate,
    /// KVM refused an irqchip, ioeventfd or irqfd.
    #[error("KVM refused {0}")]
    Kvm(&'static str),
}

/// A device as `vmbeam status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceStatus {
    /// Binding index.
    pub index: u32,
    /// `virtio-blk` or `virtio-net`.
    pub kind: String,
    /// Backend.
    pub backend: String,
    /// Window.
    pub mmio_base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// Driver status register.
    pub driver_status: u32,
    /// Counters.
    pub counters: DeviceCounters,
    /// Last driver error that needed a reset.
    pub last_error: Option<String>,
}

struct Placed {
    index: u32,
    base: u64,
    gsi: u32,
    /// A second handle on the notify eventfd (to kick the worker).
    kick: EventFd,
    dev: Arc<RankedMutex<MmioDevice>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

/// The devices of one nested VM.
pub struct DeviceSet {
    placed: Vec<Placed>,
    mem: Arc<RankedMutex<Option<Arc<DeviceMemory>>>>,
    irqchip: bool,
    /// While set, no queue is served (the guest is paused for a move).
    paused: Arc<AtomicBool>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSet")
            .field("devices", &self.placed.len())
            .finish()
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Default for DeviceSet {
    fn default() -> Self {
        DeviceSet {
            placed: Vec::new(),
            mem: Arc::new(RankedMutex::new(Rank::DeviceMemory, None)),
            irqchip: false,
            paused: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl DeviceSet {
    /// No devices.
    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }

    /// Number of devices placed.
    pub fn len(&self) -> usize {
        self.placed.len()
    }

    /// Whether the VM got an in-kernel irqchip.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Whether `[addr, addr + len)` overlaps a device window.
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        self.placed
            .iter()
            .any(|p| overlaps(addr, len, p.base, WINDOW))
    }

    fn find(&self, addr: u64) -> Option<&Placed> {
        self.placed
            .iter()
            .find(|p| addr >= p.base && addr - p.base < WINDOW)
    }

    /// Whether `addr` is inside a device window.
    pub fn owns(&self, addr: u64) -> bool {
        !self.placed.is_empty() && self.find(addr).is_some()
    }

    /// Where device `index` is placed: (window, interrupt line).
    pub fn placement(&self, index: u32) -> Option<(u64, u32)> {
        self.placed
            .iter()
            .find(|p| p.index == index)
            .map(|p| (p.base, p.gsi))
    }

    /// Serves an MMIO read if `addr` is in a window; false otherwise.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some(p) = self.find(addr) else {
            return false;
        };
        let mut d = p.dev.lock().unwrap();
        let off = addr - d.base;
        d.read(off, data);
        true
    }

    /// Serves an MMIO write if `addr` is in a window; false otherwise. A
    /// notification that arrives as an exit (not through the ioeventfd) is
    /// served right here.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(p) = self.find(addr) else {
            return false;
        };
        let mem = self.mem.lock().unwrap().clone();
        let mut d = p.dev.lock().unwrap();
        let off = addr - d.base;
        if d.write(off, data, mem.as_ref().map(|m| &m.mem)) && !self.is_paused() {
            if let Some(m) = &mem {
                d.process(&m.mem);
            }
        }
        true
    }

    /// Stops serving queues until [`DeviceSet::resume`], after any
    /// request being served now has completed: from here on the devices do
    /// not write guest memory, so the guest's memory is what it was at its
    /// pause (a move may hash or copy it). Notifications that arrive while
    /// paused are served on resume; none is lost.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        for p in &self.placed {
            // The worker serves queues with the device lock held.
            drop(p.dev.lock().unwrap());
        }
    }

    /// Serves queues again (the guest runs again); pending notifications
    /// are taken at once.
    pub fn resume(&self) {
        if self.paused.swap(false, Ordering::SeqCst) {
            for p in &self.placed {
                let _ = p.kick.write(1);
            }
        }
    }

    /// Requests in flight and items held by every device (see
    /// [`MmioDevice::in_flight`]); zero without a memory view.
    pub fn in_flight(&self) -> u64 {
        let Some(m) = self.mem.lock().unwrap().clone() else {
            return 0;
        };
        self.placed
            .iter()
            .map(|p| p.dev.lock().unwrap().in_flight(&m.mem))
            .sum()
    }

    /// Whether the devices are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Replaces the memory view (after the VM's slots changed).
    pub fn set_memory(&self, mem: Option<DeviceMemory>) {
        *self.mem.lock().unwrap() = mem.map(Arc::new);
    }

    /// Places `backend` as device `index` at `base` with line `gsi`.
    /// `ram` lists the VM's memory (nested address, length); `vcpus` is its
    /// vCPU count.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        vm: &VmFd,
        index: u32,
        base: u64,
        gsi: u32,
        backend: &Backend,
        guest: &str,
        ram: &[(u64, u64)],
        vcpus: usize,
    ) -> Result<u32, DeviceError> {
        if self.placed.iter().any(|p| p.index == index) {
            return Err(DeviceError::AlreadyPlaced(index));
        }
        if !base.is_multiple_of(WINDOW) {
            return Err(DeviceError::Misaligned(base));
        }
        if base
            .checked_add(WINDOW)
            .is_none_or(|e| e > vmbeam_abi::l2::MAX_GIB << 30)
        {
            return Err(DeviceError::OutOfRange(base));
        }
        if ram.iter().any(|&(a, l)| overlaps(base, WINDOW, a, l)) {
            return Err(DeviceError::Overlap(base, "guest RAM"));
        }
        if self.overlaps(base, WINDOW) {
            return Err(DeviceError::Overlap(base, "another device"));
        }
        if IRQCHIP_RANGES
            .iter()
            .any(|&(a, l)| overlaps(base, WINDOW, a, l))
        {
            return Err(DeviceError::Overlap(base, "the interrupt controller"));
        }
        if gsi < GSI_RANGE.0 || gsi > GSI_RANGE.1 || gsi == 2 {
            return Err(DeviceError::BadIrq(gsi));
        }
        if self.placed.iter().any(|p| p.gsi == gsi) {
            return Err(DeviceError::BadIrq(gsi));
        }
        if !self.irqchip {
            if vcpus > 0 {
                return Err(DeviceError::TooLate);
            }
            vm.create_irq_chip()
                .map_err(|_| DeviceError::Kvm("an in-kernel irqchip"))?;
            self.irqchip = true;
        }
        let notify = EventFd::new(EFD_NONBLOCK).map_err(|_| DeviceError::Kvm("an eventfd"))?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|_| DeviceError::Kvm("an eventfd"))?;
        vm.register_ioevent(
            &notify,
            &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
            NoDatamatch,
        )
        .map_err(|_| DeviceError::Kvm("the queue-notify ioeventfd"))?;
        if vm.register_irqfd(&irq, gsi).is_err() {
            let _ = vm.unregister_ioevent(
                &notify,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
                NoDatamatch,
            );
            return Err(DeviceError::Kvm("the irqfd"));
        }
        let be: Box<dyn mmio::Backend> = match backend {
            Backend::Disk {
                file,
                path,
                ro,
                size,
            } => Box::new(blk::Blk::new(file.clone(), path, *ro, *size, guest)),
            Backend::Net { tap, name, mac } => Box::new(net::Net::new(tap.clone(), name, *mac)),
        };
        let kick = notify
            .try_clone()
            .map_err(|_| DeviceError::Kvm("an eventfd"))?;
        let dev = Arc::new(RankedMutex::new(
            Rank::Device,
            MmioDevice::new(base, gsi, be, irq),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (dev, stop, mem) = (dev.clone(), stop.clone(), self.mem.clone());
            let paused = self.paused.clone();
            std::thread::Builder::new()
                .name(format!("vmbeam-dev-{guest}"))
                .spawn(move || worker(notify, dev, stop, paused, mem))
                .map_err(|_| DeviceError::Kvm("a device thread"))?
        };
        let kind = backend.device_type();
        self.placed.push(Placed {
            index,
            base,
            gsi,
            kick,
            dev,
            stop,
            worker: Some(worker),
        });
        Ok(kind)
    }

    /// Status of every device.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.placed
            .iter()
            .map(|p| {
                let d = p.dev.lock().unwrap();
                DeviceStatus {
                    index: p.index,
                    kind: match d.device_type() {
                        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => "virtio-blk".into(),
                        virtio_bindings::virtio_ids::VIRTIO_ID_NET => "virtio-net".into(),
                        t => format!("virtio-{t}"),
                    },
                    backend: d.describe(),
                    mmio_base: d.base,
                    irq: d.gsi,
                    driver_status: d.status(),
                    counters: d.counters,
                    last_error: d.last_error.as_ref().map(|e| e.to_string()),
                }
            })
            .collect()
    }
}

impl Drop for DeviceSet {
    fn drop(&mut self) {
        for p in &self.placed {
            p.stop.store(true, Ordering::SeqCst);
        }
        for p in &mut self.placed {
            if let Some(w) = p.worker.take() {
                let _ = w.join();
            }
        }
    }
}

/// Serves a device's queues whenever the driver notifies it, and, for a
/// device with a backend that produces input (a TAP), whenever input
/// arrives and the device can take it. Nothing is read or served while the
/// devices are paused: input waits in the backend.
fn worker(
    notify: EventFd,
    dev: Arc<RankedMutex<MmioDevice>>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    mem: Arc<RankedMutex<Option<Arc<DeviceMemory>>>>,
) {
    let mut pending = false;
    // After the input descriptor reported an error or hang-up, it is left
    // alone until then (no busy loop on a broken TAP).
    let mut input_quiet_until: Option<std::time::Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let now = std::time::Instant::now();
        let input = if paused.load(Ordering::SeqCst) || input_quiet_until.is_some_and(|t| now < t) {
            None
        } else {
            dev.lock().unwrap().input_fd()
        };
        let mut pfds = [
            libc::pollfd {
                fd: notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: input.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let nfds = if input.is_some() { 2 } else { 1 };
        // SAFETY: `nfds` valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, WORKER_TICK.as_millis() as i32) };
        if n > 0 && pfds[0].revents & libc::POLLIN != 0 && notify.read().is_ok() {
            pending = true;
        }
        if n > 0 && nfds == 2 {
            let r = pfds[1].revents;
            if r & libc::POLLIN != 0 {
                pending = true;
            } else if r & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                input_quiet_until = Some(now + WORKER_TICK);
            }
        }
        if !pending {
            continue;
        }
        let Some(m) = mem.lock().unwrap().clone() else {
            continue;
        };
        let mut d = dev.lock().unwrap();
        // Checked under the device lock: `pause` takes it after setting
        // the flag, so no queue is served once `pause` has returned.
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        pending = false;
        d.counters.notifications += 1;
        d.process(&m.mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch disk of its own for each caller (tests run in parallel).
    fn disk() -> Backend {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vmbeam-place-{}-{n}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        Backend::Disk {
            file: Arc::new(file),
            path: "test".into(),
            ro: false,
            size: 4096,
        }
    }

    /// A guest hypervisor placing devices over RAM, over each other, over
    /// the irqchip, misaligned, on a bad line or too late gets one error
    /// each, and the devices already placed keep working.
    #[test]
    fn bad_placements_are_refused() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIP bad_placements_are_refused: /dev/kvm not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let ram = [(0u64, 16u64 << 20)];
        let b = disk();
        let mut set = DeviceSet::default();
        let place = |set: &mut DeviceSet, i, base, gsi, vcpus| {
            set.place(&vm, i, base, gsi, &b, "l2-0", &ram, vcpus)
        };
        assert_eq!(
            place(&mut set, 0, 0x10_0000, 5, 0),
            Err(DeviceError::Overlap(0x10_0000, "guest RAM"))
        );
        assert_eq!(
            place(&mut set, 0, 0xd000_0800, 5, 0),
            Err(DeviceError::Misaligned(0xd000_0800))
        );
        assert_eq!(
            place(&mut set, 0, !0xfffu64, 5, 0),
            Err(DeviceError::OutOfRange(!0xfffu64))
        );
        assert_eq!(
            place(&mut set, 0, 0xfec0_0000, 5, 0),
            Err(DeviceError::Overlap(
                0xfec0_0000,
                "the interrupt controller"
            ))
        );
        for bad in [0, 2, 24, u32::MAX] {
            assert_eq!(
                place(&mut set, 0, 0xd000_0000, bad, 0),
                Err(DeviceError::BadIrq(bad))
            );
        }
        assert_eq!(
            place(&mut set, 0, 0xd000_0000, 5, 1),
            Err(DeviceError::TooLate),
            "no irqchip can be added once vCPUs exist"
        );
        assert_eq!(place(&mut set, 0, 0xd000_0000, 5, 0), Ok(2));
        assert!(set.has_irqchip());
        assert_eq!(
            place(&mut set, 0, 0xd000_1000, 6, 0),
            Err(DeviceError::AlreadyPlaced(0))
        );
        assert_eq!(
            place(&mut set, 1, 0xd000_0000, 6, 0),
            Err(DeviceError::Overlap(0xd000_0000, "another device"))
        );
        assert_eq!(
            place(&mut set, 1, 0xd000_1000, 5, 0),
            Err(DeviceError::BadIrq(5))
        );
        // With the irqchip in place, later devices may come after vCPUs.
        assert_eq!(place(&mut set, 1, 0xd000_1000, 6, 1), Ok(2));
        assert_eq!(set.len(), 2);
        assert!(set.overlaps(0xd000_0fff, 2));
        // The first device still answers its registers.
        let mut m = [0u8; 4];
        assert!(set.mmio_read(0xd000_0000, &mut m));
        assert_eq!(u32::from_le_bytes(m), mmio::MAGIC);
        assert!(!set.mmio_read(0xd000_2000, &mut m));
    }

    /// A request the driver makes available while the device is paused
    /// (the guest is being moved) is not served until resume, and then
    /// exactly once: guest memory does not change under a move.
    #[test]
    fn paused_devices_do_not_touch_guest_memory() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIP paused_devices_do_not_touch_guest_memory: /dev/kvm not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let ram = [(0x1000u64, 0x4000u64)];
        let mut set = DeviceSet::default();
        set.place(&vm, 0, 0xd000_0000, 5, &disk(), "l2-0", &ram, 0)
            .unwrap();
        let mem = DeviceMemory::anonymous(&[(0x1000, 0x4000)]).unwrap();
        // One GET_ID request: descriptor table at 0x1000, avail ring at
        // 0x1100, used ring at 0x1200, header 0x1400, id 0x1600, status 0x1800.
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            assert!(mem.write(0x1000 + i * 16, &d));
        };
        desc(0, 0x1400, 16, 1, 1);
        desc(1, 0x1600, 20, 1 | 2, 2);
        desc(2, 0x1800, 1, 2, 0);
        assert!(mem.write(0x1400, &8u32.to_le_bytes()));
        let used_idx = |m: &DeviceMemory| {
            let mut b = [0u8; 2];
            assert!(m.read(0x1202, &mut b));
            u16::from_le_bytes(b)
        };
        let reg = |set: &DeviceSet, off: u64, v: u32| {
            assert!(set.mmio_write(0xd000_0000 + off, &v.to_le_bytes()));
        };
        // Share `mem` with the device through the same mapping.
        set.set_memory(Some(mem));
        let mem = set.mem.lock().unwrap().clone().unwrap();
        reg(&set, 0x70, 3);
        reg(&set, 0x14, 1);
        let mut f = [0u8; 4];
        assert!(set.mmio_read(0xd000_0010, &mut f));
        reg(&set, 0x24, 1);
        reg(&set, 0x20, u32::from_le_bytes(f));
        reg(&set, 0x70, 0xb);
        reg(&set, 0x38, 16);
        for (off, a) in [(0x80, 0x1000u32), (0x90, 0x1100), (0xa0, 0x1200)] {
            reg(&set, off, a);
        }
        reg(&set, 0x44, 1);
        reg(&set, 0x70, 0xf);
        set.pause();
        assert!(mem.write(0x1102, &1u16.to_le_bytes()));
        // The guest's notification: its ioeventfd, and a trapped write.
        set.placed[0].kick.write(1).unwrap();
        reg(&set, 0x50, 0);
        std::thread::sleep(WORKER_TICK * 2);
        assert_eq!(used_idx(&mem), 0, "served while paused");
        set.resume();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while used_idx(&mem) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "not served after resume"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(WORKER_TICK);
        assert_eq!(used_idx(&mem), 1);
        let mut id = [0u8; 4];
        assert!(mem.read(0x1600, &mut id));
        assert_eq!(&id, b"l2-0");
        assert_eq!(set.status()[0].counters.requests, 1, "served exactly once");
    }

    /// A paused network card reads nothing from its TAP: frames that
    /// arrive meanwhile wait there and are delivered after resume, each
    /// once, in order. A datagram socket pair stands in for the TAP.
    #[test]
    fn a_paused_net_card_leaves_frames_in_its_tap() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIP a_paused_net_card_leaves_frames_in_its_tap: /dev/kvm not available");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let (tap, wire) = std::os::unix::net::UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        let be = Backend::Net {
            tap: Arc::new(std::fs::File::from(std::os::fd::OwnedFd::from(tap))),
            name: "test".into(),
            mac: [0x52, 0x54, 0, 0, 0, 9],
        };
        let ram = [(0x1000u64, 0x8000u64)];
        let mut set = DeviceSet::default();
        assert_eq!(
            set.place(&vm, 0, 0xd000_0000, 5, &be, "l2-0", &ram, 0),
            Ok(1)
        );
        set.set_memory(Some(DeviceMemory::anonymous(&[(0x1000, 0x8000)]).unwrap()));
        let mem = set.mem.lock().unwrap().clone().unwrap();
        // Receive queue: table 0x1000, avail 0x1100, used 0x1200; four
        // 2 KiB buffers from 0x2000.
        for i in 0..4u64 {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&(0x2000 + i * 0x800).to_le_bytes());
            d[8..12].copy_from_slice(&0x800u32.to_le_bytes());
            d[12..14].copy_from_slice(&2u16.to_le_bytes());
            assert!(mem.write(0x1000 + i * 16, &d));
            assert!(mem.write(0x1104 + i * 2, &(i as u16).to_le_bytes()));
        }
        let reg = |set: &DeviceSet, off: u64, v: u32| {
            assert!(set.mmio_write(0xd000_0000 + off, &v.to_le_bytes()));
        };
        reg(&set, 0x70, 3);
        for sel in 0..2 {
            reg(&set, 0x14, sel);
            let mut f = [0u8; 4];
            assert!(set.mmio_read(0xd000_0010, &mut f));
            reg(&set, 0x24, sel);
            reg(&set, 0x20, u32::from_le_bytes(f));
        }
        reg(&set, 0x70, 0xb);
        for q in 0..2u32 {
            reg(&set, 0x30, q);
            reg(&set, 0x38, 16);
            let base = 0x1000 + q * 0x400;
            for (off, a) in [(0x80, base), (0x90, base + 0x100), (0xa0, base + 0x200)] {
                reg(&set, off, a);
            }
            reg(&set, 0x44, 1);
        }
        reg(&set, 0x70, 0xf);
        let used_idx = || {
            let mut b = [0u8; 2];
            assert!(mem.read(0x1202, &mut b));
            u16::from_le_bytes(b)
        };
        let wait_used = |n: u16| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while used_idx() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} of {n} frames",
                    used_idx()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        assert!(mem.write(0x1102, &4u16.to_le_bytes()));
        reg(&set, 0x50, 0);
        wire.send(&[1u8; 60]).unwrap();
        wait_used(1);
        set.pause();
        for k in 2..=3u8 {
            wire.send(&[k; 60]).unwrap();
        }
        std::thread::sleep(WORKER_TICK * 2);
        assert_eq!(used_idx(), 1, "a frame was delivered while paused");
        assert_eq!(set.in_flight(), 0, "receive buffers are not requests");
        set.resume();
        wait_used(3);
        std::thread::sleep(WORKER_TICK);
        assert_eq!(used_idx(), 3, "delivered more than once");
        for (i, k) in [1u8, 2, 3].into_iter().enumerate() {
            let mut f = [0u8; 72];
            assert!(mem.read(0x2000 + i as u64 * 0x800, &mut f));
            assert_eq!(f[10], 1, "num_buffers");
            assert!(f[12..].iter().all(|&b| b == k), "frame {i} out of order");
        }
        let c = set.status()[0].counters;
        assert_eq!((c.rx_frames, c.drops, c.errors), (3, 0, 0), "{c:?}");
    }
}
