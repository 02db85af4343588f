//! `netecho`: a nested workload that serves the network through its virtio
//! network card, with the `virtio-drivers` crate's driver and the `smoltcp`
//! TCP/IP stack (no heap).
//!
//! It takes a static IPv4 address, answers ARP and ICMP echo (smoltcp does
//! both), and runs an echo service (port 7) over UDP and over TCP. The
//! address comes from `param0`: bits 0–31 are the address (a.b.c.d as
//! `a << 24 | b << 16 | c << 8 | d`), bits 32–39 the prefix length (0 means
//! 24); `param0` = 0 gives 10.0.2.15/24. Each netecho has its own TAP, so
//! two of them on one line may share an address. It polls the used rings
//! (no interrupts) and prints a line when it is up and for each TCP
//! connection it accepts and ends.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::ptr::NonNull;
use guest_rt::Serial;
use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal};
use vmbeam_abi::l2::{
    L2BootParams, BOOT_PARAMS, CONSOLE_PORT, L2_MAGIC, MAX_DEVICES, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};

use guest_rt::virtio_hal as hal;

/// Ring size the driver asks for.
const QUEUE: usize = 16;
/// Receive buffers kept posted.
const NRX: usize = 8;
/// Bytes of each frame buffer (a virtio-net header and a full frame).
const BUF: usize = 2048;
/// The echo service's port (UDP and TCP).
const ECHO_PORT: u16 = 7;
/// TCP sockets: connections served at once.
const NTCP: usize = 2;
/// Bytes of each TCP socket's receive and send buffers.
const TCP_BUF: usize = 2048;

type Net = VirtIONetRaw<hal::BumpHal, MmioTransport<'static>, QUEUE>;

/// A page-aligned buffer from the DMA area, for the device.
fn dma_buffer() -> &'static mut [u8] {
    let (_, p) = hal::BumpHal::dma_alloc(
        BUF.div_ceil(virtio_drivers::PAGE_SIZE),
        BufferDirection::Both,
    );
    // SAFETY: `dma_alloc` handed out these bytes once, zeroed; nothing else
    // refers to them.
    unsafe { core::slice::from_raw_parts_mut(p.as_ptr(), BUF) }
}

/// The virtio-net card as a smoltcp device. Receive buffers stay posted;
/// the one a frame was taken from is posted again at the next call, after
/// smoltcp has read the frame in place.
struct Phy {
    net: Net,
    rx: [&'static mut [u8]; NRX],
    tokens: [Option<u16>; NRX],
    tx: &'static mut [u8],
    /// The buffer smoltcp read last, to post again.
    repost: Option<usize>,
    /// Frames the driver refused (no header, bad length).
    bad_frames: u64,
}

impl Phy {
    fn post(&mut self, i: usize) {
        // SAFETY: `rx[i]` is not touched again until the device gives it
        // back (its token appears in the used ring) and `receive_complete`
        // has been called with the same buffer.
        self.tokens[i] = unsafe { self.net.receive_begin(self.rx[i]) }.ok();
    }

    fn post_returned(&mut self) {
        if let Some(i) = self.repost.take() {
            self.post(i);
        }
    }
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a> {
    net: &'a mut Net,
    buf: &'a mut [u8],
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.buf.len());
        let r = f(&mut self.buf[..len]);
        // Waits for the device (L0 serves the transmit queue at once); a
        // frame the device drops is lost as on a wire.
        let _ = self.net.send(&self.buf[..len]);
        r
    }
}

impl Device for Phy {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        self.post_returned();
        let token = self.net.poll_receive()?;
        let i = self.tokens.iter().position(|t| *t == Some(token))?;
        self.tokens[i] = None;
        // SAFETY: `rx[i]` is the buffer posted with this token.
        let got = unsafe { self.net.receive_complete(token, self.rx[i]) };
        self.repost = Some(i);
        let Ok((hdr, len)) = got else {
            self.bad_frames += 1;
            return None;
        };
        let Phy { net, rx, tx, .. } = self;
        Some((
            Rx(&rx[i][hdr..hdr + len]),
            Tx {
                net,
                buf: &mut tx[..],
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        self.post_returned();
        if !self.net.can_send() {
            return None;
        }
        Some(Tx {
            net: &mut self.net,
            buf: &mut self.tx[..],
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c.max_burst_size = Some(1);
        c
    }
}

/// Milliseconds since boot, from the TSC.
fn now(tsc_khz: u64) -> Instant {
    Instant::from_millis((guest_rt::rdtsc() / tsc_khz.max(1)) as i64)
}

/// Finds the first virtio network card among the windows the guest
/// hypervisor may have placed.
fn find_card() -> Option<MmioTransport<'static>> {
    for i in 0..MAX_DEVICES as u64 {
        let base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE;
        // SAFETY: the window is mapped by L1's page tables; an unplaced
        // window reads as all ones (no magic), and MmioTransport::new only
        // reads registers.
        let t = unsafe {
            MmioTransport::new(
                NonNull::new(base as *mut VirtIOHeader).unwrap(),
                VIRTIO_MMIO_SIZE as usize,
            )
        };
        if let Ok(t) = t {
            if t.device_type() == DeviceType::Network {
                return Some(t);
            }
        }
    }
    None
}

/// The address and prefix length `param0` names.
fn address(param0: u64) -> (Ipv4Address, u8) {
    if param0 == 0 {
        return (Ipv4Address::new(10, 0, 2, 15), 24);
    }
    let a = (param0 as u32).to_be_bytes();
    let prefix = match ((param0 >> 32) & 0xff) as u8 {
        0 => 24,
        p => p.min(32),
    };
    (Ipv4Address::new(a[0], a[1], a[2], a[3]), prefix)
}

#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    // SAFETY: L1 wrote the boot parameters at this fixed address before start.
    let p: L2BootParams = unsafe { core::ptr::read_volatile(BOOT_PARAMS as *const L2BootParams) };
    let mut out = Serial(CONSOLE_PORT);
    if p.magic != L2_MAGIC {
        let _ = writeln!(out, "netecho: bad boot params");
        guest_rt::halt_forever();
    }
    let name = vmbeam_abi::name_from_bytes(&p.name).unwrap_or("?");
    let Some(t) = find_card() else {
        let _ = writeln!(out, "netecho {name} no network card");
        guest_rt::halt_forever();
    };
    let net = match Net::new(t) {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(out, "netecho {name} driver init failed: {e:?}");
            guest_rt::halt_forever();
        }
    };
    let mac = net.mac_address();
    let mut phy = Phy {
        net,
        rx: core::array::from_fn(|_| dma_buffer()),
        tokens: [None; NRX],
        tx: dma_buffer(),
        repost: None,
        bad_frames: 0,
    };
    for i in 0..NRX {
        phy.post(i);
    }
    let (ip, prefix) = address(p.param0);
    let khz = p.tsc_khz;
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(mac))),
        &mut phy,
        now(khz),
    );
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), prefix));
    });

    let mut storage = [SocketStorage::EMPTY; 1 + NTCP];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut udp_meta = [udp::PacketMetadata::EMPTY; 8];
    let mut udp_rx = [0u8; 4096];
    let mut udp_tx_meta = [udp::PacketMetadata::EMPTY; 8];
    let mut udp_tx = [0u8; 4096];
    let mut u = udp::Socket::new(
        udp::PacketBuffer::new(&mut udp_meta[..], &mut udp_rx[..]),
        udp::PacketBuffer::new(&mut udp_tx_meta[..], &mut udp_tx[..]),
    );
    let _ = u.bind(ECHO_PORT);
    let udp_h = sockets.add(u);
    let mut tcp_bufs = [[0u8; TCP_BUF]; 2 * NTCP];
    let mut tcp_h = [None; NTCP];
    {
        let mut bufs = tcp_bufs.iter_mut();
        for h in tcp_h.iter_mut() {
            let (rx, tx) = (bufs.next().unwrap(), bufs.next().unwrap());
            let s = tcp::Socket::new(
                tcp::SocketBuffer::new(&mut rx[..]),
                tcp::SocketBuffer::new(&mut tx[..]),
            );
            *h = Some(sockets.add(s));
        }
    }
    let m = mac;
    let _ = writeln!(
        out,
        "netecho {name} up mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={ip}/{prefix} echo port {ECHO_PORT} udp tcp",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );

    let mut chunk = [0u8; 1500];
    let mut connected = [false; NTCP];
    let (mut udp_echoes, mut tcp_bytes) = (0u64, 0u64);
    loop {
        iface.poll(now(khz), &mut phy, &mut sockets);
        let s = sockets.get_mut::<udp::Socket>(udp_h);
        while s.can_send() {
            let Ok((n, meta)) = s.recv_slice(&mut chunk) else {
                break;
            };
            if s.send_slice(&chunk[..n], meta.endpoint).is_ok() {
                udp_echoes += 1;
            }
        }
        for (k, h) in tcp_h.iter().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(h.unwrap());
            if !s.is_open() {
                if connected[k] {
                    connected[k] = false;
                    let _ = writeln!(
                        out,
                        "netecho {name} tcp closed echoed={tcp_bytes} udp={udp_echoes} bad={}",
                        phy.bad_frames
                    );
                }
                let _ = s.listen(ECHO_PORT);
                continue;
            }
            if s.is_active() && !connected[k] {
                connected[k] = true;
                if let Some(ep) = s.remote_endpoint() {
                    let _ = writeln!(out, "netecho {name} tcp connected from {ep}");
                }
            }
            while s.can_recv() {
                let room = (s.send_capacity() - s.send_queue()).min(chunk.len());
                if room == 0 {
                    break;
                }
                match s.recv_slice(&mut chunk[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = s.send_slice(&chunk[..n]);
                        tcp_bytes += n as u64;
                    }
                }
            }
            // The peer is done sending and everything was echoed: close
            // our side too.
            if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
                s.close();
            }
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Serial(CONSOLE_PORT), "netecho panic: {info}");
    guest_rt::halt_forever()
}
