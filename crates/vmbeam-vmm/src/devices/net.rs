//! virtio-net over a TAP interface: one receive and one transmit queue, the
//! guest's MAC and link status in the configuration space.
//!
//! The TAP is opened without `IFF_VNET_HDR`, so the device strips the
//! `virtio_net_hdr_v1` the driver puts before each transmitted frame and
//! writes a zeroed one (no offloads, one buffer) before each received frame.
//! Frames are read from the TAP only when the driver has a receive buffer
//! for them: while the receive queue is empty, or the guest is paused for a
//! move, frames wait in the TAP's own queue in the kernel and are delivered
//! afterwards. At most one frame waits inside the device (read from the TAP
//! before the device found the receive queue empty); it is part of the
//! device, which stays with the nested VM across a zero-copy rejuvenation.
//! Every frame is handled completely under the device lock, so a frame is
//! delivered or transmitted exactly once.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::devices::mmio::{Backend, DeviceCounters};
use crate::devices::queue::{complete, next_chain, QueueError};

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Length of `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HDR: usize = 12;
/// Largest frame the device moves (a TAP never gives more than 64 KiB).
pub const MAX_FRAME: usize = 65535;
/// Queue sizes offered (receive, transmit).
const QUEUE_SIZES: &[u16] = &[256, 256];
/// Frames served per queue per notification before the others get a turn.
const BUDGET: usize = 256;

/// A network device over a TAP.
pub struct Net {
    tap: Arc<File>,
    name: String,
    mac: [u8; 6],
    /// A frame read from the TAP that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    /// Set when a frame waits for a receive buffer: the worker stops
    /// reading the TAP until the driver adds buffers.
    rx_blocked: bool,
    buf: Vec<u8>,
}

impl Net {
    /// A network card with `mac` on TAP `tap` (named `name` for status).
    pub fn new(tap: Arc<File>, name: &str, mac: [u8; 6]) -> Net {
        Net {
            tap,
            name: name.to_string(),
            mac,
            pending: None,
            rx_blocked: false,
            buf: vec![0u8; MAX_FRAME + HDR],
        }
    }

    /// Reads the next frame from the TAP, if one is there.
    fn read_tap(&mut self, c: &mut DeviceCounters) -> Option<Vec<u8>> {
        loop {
            match (&*self.tap).read(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) => return Some(self.buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(_) => {
                    c.errors += 1;
                    return None;
                }
            }
        }
    }

    fn receive(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut DeviceCounters,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        self.rx_blocked = false;
        for _ in 0..BUDGET {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.read_tap(c) {
                    Some(f) => f,
                    None => break,
                },
            };
            let Some(ch) = next_chain(q, mem, (MAX_FRAME + HDR) as u64)? else {
                // No buffer: keep the frame and leave the rest in the TAP.
                self.pending = Some(frame);
                self.rx_blocked = true;
                break;
            };
            let mut hdr = [0u8; HDR];
            // num_buffers = 1 (no mergeable receive buffers).
            hdr[10] = 1;
            let fits = ch.writable_len() >= (HDR + frame.len()) as u64;
            let len = if fits && ch.write_at(mem, 0, &hdr) && ch.write_at(mem, HDR as u64, &frame) {
                c.requests += 1;
                c.rx_frames += 1;
                c.bytes_in += frame.len() as u64;
                (HDR + frame.len()) as u32
            } else {
                // A buffer too small (or read-only): the frame is dropped
                // and the buffer given back empty.
                c.drops += 1;
                c.errors += 1;
                0
            };
            complete(q, mem, ch.head, len)?;
            used = true;
        }
        Ok(used)
    }

    fn transmit(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut DeviceCounters,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        for _ in 0..BUDGET {
            let Some(ch) = next_chain(q, mem, (MAX_FRAME + HDR) as u64)? else {
                break;
            };
            let len = ch.readable_len() as usize;
            if len <= HDR || ch.writable_len() != 0 {
                c.errors += 1;
            } else {
                let frame = &mut self.buf[..len - HDR];
                if !ch.read_at(mem, HDR as u64, frame) {
                    c.errors += 1;
                } else {
                    // A TAP takes a frame whole or not at all.
                    match (&*self.tap).write(frame) {
                        Ok(n) if n == frame.len() => {
                            c.requests += 1;
                            c.tx_frames += 1;
                            c.bytes_out += frame.len() as u64;
                        }
                        // The TAP is down, its queue full or its peer gone:
                        // the frame is lost, as on a wire.
                        _ => c.drops += 1,
                    }
                }
            }
            complete(q, mem, ch.head, 0)?;
            used = true;
        }
        Ok(used)
    }
}

impl Backend for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status (le16); the fields after
        // it belong to features the device does not offer.
        let mut c = vec![0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn process(
        &mut self,
        qi: usize,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut DeviceCounters,
    ) -> Result<bool, QueueError> {
        match qi {
            RX => self.receive(q, mem, c),
            TX => self.transmit(q, mem, c),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        // A frame held for the old driver session is gone with it.
        self.pending = None;
        self.rx_blocked = false;
    }

    fn input_fd(&self) -> Option<RawFd> {
        (!self.rx_blocked).then(|| self.tap.as_raw_fd())
    }

    fn lends_buffers(&self, qi: usize) -> bool {
        qi == RX
    }

    fn held(&self) -> u64 {
        self.pending.is_some() as u64
    }

    fn describe(&self) -> String {
        let m = self.mac;
        format!(
            "virtio-net tap:{} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.name, m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
