//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! A device is a page of registers in the nested guest's physical address
//! space. Register reads and writes reach L0 as MMIO exits of the nested
//! vCPU and are answered here without involving the guest hypervisor;
//! queue notifications arrive through an ioeventfd and used-buffer
//! interrupts leave through an irqfd. Whatever the driver writes, the
//! transport keeps a consistent state: a bad queue setup or a bad chain
//! sets DEVICE_NEEDS_RESET and stops the device until the driver resets it.

use std::os::fd::RawFd;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::queue::{check_queue, QueueError};

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// Vendor id reported to drivers ("VMBM").
pub const VENDOR: u32 = 0x4d42_4d56;
/// Offset of the notify register (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// Offset of the device-specific configuration.
pub const CONFIG: u64 = 0x100;
/// Interrupt status bit: a used buffer.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: configuration changed (also: needs reset).
pub const INT_CONFIG: u32 = 2;

/// Counters of one device, shown by `vmbeam status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceCounters {
    /// Requests (blk) or frames (net) completed.
    pub requests: u64,
    /// Bytes read from the backend into the guest.
    pub bytes_in: u64,
    /// Bytes written from the guest to the backend.
    pub bytes_out: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Driver errors that put the device into DEVICE_NEEDS_RESET.
    pub resets_needed: u64,
    /// Resets by the driver.
    pub resets: u64,
    /// Queue notifications taken.
    pub notifications: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Register accesses served.
    pub mmio: u64,
    /// Frames delivered to the guest (net).
    #[serde(default)]
    pub rx_frames: u64,
    /// Frames the guest sent out (net).
    #[serde(default)]
    pub tx_frames: u64,
    /// Frames lost: the backend refused a transmitted frame, or a received
    /// frame did not fit the driver's buffer (net).
    #[serde(default)]
    pub drops: u64,
}

/// What a concrete device (blk, net) provides to the transport.
pub trait Backend: Send {
    /// Virtio device id (2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// Device feature bits (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Device configuration space.
    fn config(&self) -> Vec<u8>;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Serves queue `qi`; returns whether the used ring changed.
    fn process(
        &mut self,
        qi: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut DeviceCounters,
    ) -> Result<bool, QueueError>;
    /// Forgets per-session state (driver reset).
    fn reset(&mut self) {}
    /// A file descriptor the worker waits on for input from the backend
    /// (a TAP), while the device can take it.
    fn input_fd(&self) -> Option<RawFd> {
        None
    }
    /// Items the device holds on behalf of the guest outside its rings
    /// (a received frame waiting for a buffer).
    fn held(&self) -> u64 {
        0
    }
    /// Whether queue `qi` holds empty buffers the driver lends the device
    /// (net receive) rather than requests.
    fn lends_buffers(&self, _qi: usize) -> bool {
        false
    }
    /// One-line description for status.
    fn describe(&self) -> String;
}

/// What the driver wrote for one queue before enabling it.
#[derive(Debug, Clone, Copy, Default)]
struct QueueProg {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_half(v: &mut u64, high: bool, x: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | ((x as u64) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | x as u64;
    }
}

/// One placed virtio-mmio device.
pub struct MmioDevice {
    /// Nested address of the window.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    backend: Box<dyn Backend>,
    queues: Vec<Queue>,
    prog: Vec<QueueProg>,
    queue_sel: u32,
    dev_features_sel: u32,
    drv_features_sel: u32,
    driver_features: u64,
    status: u32,
    isr: u32,
    config_generation: u32,
    irq: EventFd,
    /// Counters.
    pub counters: DeviceCounters,
    /// Why the device last needed a reset.
    pub last_error: Option<QueueError>,
}

impl std::fmt::Debug for MmioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioDevice")
            .field("base", &self.base)
            .field("gsi", &self.gsi)
            .field("status", &self.status)
            .finish()
    }
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        .map(|&s| Queue::new(s).expect("device queue sizes are powers of two"))
        .collect()
}

impl MmioDevice {
    /// A device in reset state.
    pub fn new(base: u64, gsi: u32, backend: Box<dyn Backend>, irq: EventFd) -> MmioDevice {
        MmioDevice {
            base,
            gsi,
            queues: new_queues(backend.queue_max_sizes()),
            prog: vec![QueueProg::default(); backend.queue_max_sizes().len()],
            backend,
            queue_sel: 0,
            dev_features_sel: 0,
            drv_features_sel: 0,
            driver_features: 0,
            status: 0,
            isr: 0,
            config_generation: 0,
            irq,
            counters: DeviceCounters::default(),
            last_error: None,
        }
    }

    /// Virtio device id.
    pub fn device_type(&self) -> u32 {
        self.backend.device_type()
    }

    /// Backend description.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Driver status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The backend's input descriptor, while the driver runs the device
    /// with every queue ready (otherwise input waits in the backend).
    pub fn input_fd(&self) -> Option<RawFd> {
        (self.live() && self.queues.iter().all(|q| q.ready()))
            .then(|| self.backend.input_fd())
            .flatten()
    }

    /// Requests the driver made available that the device has not taken
    /// yet (not counting empty receive buffers), plus what the device
    /// holds outside the rings: the in-flight state a move carries.
    pub fn in_flight(&self, mem: &GuestMemoryMmap) -> u64 {
        let queued: u64 = self
            .queues
            .iter()
            .enumerate()
            .filter(|(i, q)| q.ready() && !self.backend.lends_buffers(*i))
            .map(|(_, q)| {
                q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map(|a| a.0.wrapping_sub(q.next_avail()) as u64)
                    .unwrap_or(0)
            })
            .sum();
        queued + self.backend.held()
    }

    fn device_features(&self) -> u64 {
        self.backend.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn reset(&mut self) {
        self.queues = new_queues(self.backend.queue_max_sizes());
        self.prog = vec![QueueProg::default(); self.queues.len()];
        self.queue_sel = 0;
        self.dev_features_sel = 0;
        self.drv_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.isr = 0;
        self.backend.reset();
        self.counters.resets += 1;
    }

    /// Stops the device after a driver error until the driver resets it.
    fn needs_reset(&mut self, e: QueueError) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.counters.resets_needed += 1;
        self.last_error = Some(e);
        self.interrupt(INT_CONFIG);
    }

    fn interrupt(&mut self, bit: u32) {
        self.isr |= bit;
        self.counters.interrupts += 1;
        let _ = self.irq.write(1);
    }

    fn prog(&mut self) -> Option<&mut QueueProg> {
        self.prog.get_mut(self.queue_sel as usize)
    }

    /// Applies what the driver programmed for queue `sel` and checks it.
    fn enable_queue(&mut self, sel: usize, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let (Some(q), Some(p)) = (self.queues.get_mut(sel), self.prog.get(sel)) else {
            return Ok(());
        };
        let max = q.max_size();
        let size = u16::try_from(p.size).map_err(|_| QueueError::BadSize(u16::MAX, max))?;
        q.try_set_size(size)
            .map_err(|_| QueueError::BadSize(size, max))?;
        q.try_set_desc_table_address(GuestAddress(p.desc))
            .map_err(|_| QueueError::BadRings)?;
        q.try_set_avail_ring_address(GuestAddress(p.avail))
            .map_err(|_| QueueError::BadRings)?;
        q.try_set_used_ring_address(GuestAddress(p.used))
            .map_err(|_| QueueError::BadRings)?;
        q.set_ready(true);
        if let Err(e) = check_queue(q, mem) {
            q.set_ready(false);
            return Err(e);
        }
        Ok(())
    }

    /// Serves a register read at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.counters.mmio += 1;
        data.fill(0);
        if offset >= CONFIG {
            let cfg = self.backend.config();
            let off = (offset - CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(off + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let qmax = |d: &MmioDevice| {
            d.queues
                .get(d.queue_sel as usize)
                .map(|q| q.max_size() as u32)
                .unwrap_or(0)
        };
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.backend.device_type(),
            0x00c => VENDOR,
            0x010 => match self.dev_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => qmax(self),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.ready() as u32)
                .unwrap_or(0),
            0x060 => self.isr,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Serves a register write; returns true for a queue notification.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: Option<&GuestMemoryMmap>) -> bool {
        self.counters.mmio += 1;
        if offset >= CONFIG || data.len() != 4 || !offset.is_multiple_of(4) {
            // Config space of blk and net is read-only for the driver.
            return false;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let setting_up = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            0x014 => self.dev_features_sel = v,
            0x020 if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.drv_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    _ => {}
                }
            }
            0x024 => self.drv_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if setting_up => {
                if let Some(p) = self.prog() {
                    p.size = v;
                }
            }
            0x044 if setting_up => {
                let Some(mem) = mem else {
                    self.needs_reset(QueueError::BadRings);
                    return false;
                };
                let sel = self.queue_sel as usize;
                if v == 1 {
                    if let Err(e) = self.enable_queue(sel, mem) {
                        self.needs_reset(e);
                    }
                } else if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(false);
                }
            }
            QUEUE_NOTIFY => {
                self.counters.notifications += 1;
                return true;
            }
            0x064 => self.isr &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.set_status(v);
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setting_up => {
                let high = !offset.is_multiple_of(8);
                if let Some(p) = self.prog() {
                    match offset & !7 {
                        0x080 => set_half(&mut p.desc, high, v),
                        0x090 => set_half(&mut p.avail, high, v),
                        _ => set_half(&mut p.used, high, v),
                    }
                }
            }
            _ => {}
        }
        false
    }

    fn set_status(&mut self, v: u32) {
        if v & self.status != self.status {
            // Drivers may only add bits (clearing needs a reset).
            return;
        }
        let added = v & !self.status;
        let mut v = v;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Refused: the driver reads FEATURES_OK back as clear.
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v = (v & !VIRTIO_CONFIG_S_DRIVER_OK) | VIRTIO_CONFIG_S_FAILED;
        }
        self.status = v;
    }

    /// Serves every ready queue; raises the interrupt if a used ring
    /// changed and the driver wants to hear about it.
    pub fn process(&mut self, mem: &GuestMemoryMmap) {
        if !self.live() {
            return;
        }
        let mut notify = false;
        for qi in 0..self.queues.len() {
            let q = &mut self.queues[qi];
            if !q.ready() {
                continue;
            }
            match self.backend.process(qi, q, mem, &mut self.counters) {
                Ok(true) => match q.needs_notification(mem) {
                    Ok(n) => notify |= n,
                    Err(_) => {
                        self.needs_reset(QueueError::BadRings);
                        return;
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    self.needs_reset(e);
                    return;
                }
            }
        }
        if notify {
            self.interrupt(INT_VRING);
        }
    }
}
