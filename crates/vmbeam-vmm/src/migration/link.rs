//! One migration connection driven by its own I/O thread, in both
//! directions at once.
//!
//! The side that produces frames (reading guest memory, checking for zero
//! pages, computing CRCs) must not wait for the socket, and the socket must
//! not wait for it: frames go through a bounded channel to the I/O thread,
//! which writes them while the producer prepares the next ones. The same
//! thread reads the peer's frames at any time, so a refusal the peer sends in
//! the middle of a stream is seen at once instead of as "connection reset".
//! Plain TCP and TLS (rustls, one connection object that cannot be split
//! between threads) share the loop: the socket is non-blocking and the thread
//! sleeps in `poll` on the socket and an eventfd that producers ring.
//!
//! Inbound frames are checked (magic, version, kind, length) before their
//! payload buffer is allocated, so a peer can make this side allocate at
//! most one [`wire::MAX_PAYLOAD`] frame at a time, and the inbox is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::migration::wire::{self, Kind, WireError, HEADER};

pub use crate::migration::transport::Transport;

enum Out {
    Frame(Vec<u8>),
    Sync(mpsc::Sender<()>),
}

/// A received frame.
pub type Frame = (Kind, Vec<u8>);

/// Frames queued for the I/O thread at most (each at most one
/// [`wire::MAX_PAYLOAD`] frame).
const OUT_DEPTH: usize = 8;
/// Received frames waiting for the consumer at most.
const IN_DEPTH: usize = 16;
/// Small frames are gathered into one write up to this size.
const GATHER: usize = 256 << 10;

/// The two ends of a connection's I/O thread.
pub struct Link {
    out: Option<SyncSender<Out>>,
    inbox: Option<Receiver<Result<Frame, WireError>>>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    err: Arc<Mutex<Option<String>>>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    join: Option<JoinHandle<()>>,
    sock: TcpStream,
}

impl Link {
    /// Starts the I/O thread on `t`.
    pub fn spawn(t: Transport, name: &str) -> Result<Link, WireError> {
        let sock = t.sock().try_clone()?;
        sock.set_nonblocking(true)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (otx, orx) = mpsc::sync_channel(OUT_DEPTH);
        let (itx, irx) = mpsc::sync_channel(IN_DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let err = Arc::new(Mutex::new(None));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let io = Io {
            t,
            rx: orx,
            inbox: itx,
            wake: wake.try_clone()?,
            stop: stop.clone(),
            sent: sent.clone(),
            received: received.clone(),
        };
        let e = err.clone();
        let join = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut io = io;
                if let Err(x) = io.run() {
                    let msg = x.to_string();
                    *e.lock().unwrap() = Some(msg.clone());
                    if is_protocol(&x) {
                        io.refuse_and_linger(&msg);
                    }
                    let _ = io.inbox.try_send(Err(x));
                }
            })?;
        Ok(Link {
            out: Some(otx),
            inbox: Some(irx),
            wake,
            stop,
            err,
            sent,
            received,
            join: Some(join),
            sock,
        })
    }

    fn dead(&self) -> WireError {
        let m = self
            .err
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        WireError::Io(std::io::Error::new(ErrorKind::BrokenPipe, m))
    }

    /// Queues an encoded frame (see [`wire::encode`]); blocks while the
    /// queue is full.
    pub fn send_encoded(&self, frame: Vec<u8>) -> Result<(), WireError> {
        let out = self.out.as_ref().ok_or_else(|| self.dead())?;
        out.send(Out::Frame(frame)).map_err(|_| self.dead())?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Queues one frame.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        self.send_encoded(wire::encode(kind, payload)?)
    }

    /// Waits until everything queued so far has been handed to the kernel.
    pub fn flush(&self, timeout: Duration) -> Result<(), WireError> {
        let (tx, rx) = mpsc::channel();
        let out = self.out.as_ref().ok_or_else(|| self.dead())?;
        out.send(Out::Sync(tx)).map_err(|_| self.dead())?;
        let _ = self.wake.write(1);
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(WireError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(self.dead()),
        }
    }

    /// The next frame from the peer, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Frame, WireError> {
        let inbox = self.inbox.as_ref().ok_or_else(|| self.dead())?;
        match inbox.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(WireError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(self.dead()),
        }
    }

    /// A frame from the peer if one has arrived.
    pub fn try_recv(&self) -> Option<Result<Frame, WireError>> {
        match self.inbox.as_ref()?.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(self.dead())),
        }
    }

    /// Frame bytes written to the connection so far (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Frame bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A handle through which another thread queues frames on this link.
    pub fn sender(&self) -> Result<LinkSender, WireError> {
        Ok(LinkSender {
            out: self.out.clone().ok_or_else(|| self.dead())?,
            wake: self.wake.try_clone()?,
            sock: self.sock.try_clone()?,
        })
    }

    /// Makes the kernel abort the connection when sent data stays
    /// unacknowledged for `d` (TCP_USER_TIMEOUT), so a peer that vanished
    /// without closing (a cut cable, a dropped route) fails a blocked send
    /// within `d` instead of after the kernel's retransmission limit.
    pub fn set_user_timeout(&self, d: Duration) -> Result<(), WireError> {
        let ms = d.as_millis().min(u32::MAX as u128) as libc::c_uint;
        // SAFETY: setsockopt on our own socket with a correctly sized value.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                &ms as *const libc::c_uint as *const libc::c_void,
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(WireError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Cuts the connection in both directions.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Queues frames on a [`Link`] from another thread (see [`Link::sender`]).
pub struct LinkSender {
    out: SyncSender<Out>,
    wake: EventFd,
    sock: TcpStream,
}

impl LinkSender {
    /// Queues one frame; blocks while the queue is full.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        self.out
            .send(Out::Frame(wire::encode(kind, payload)?))
            .map_err(|_| WireError::Io(ErrorKind::BrokenPipe.into()))?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Cuts the connection in both directions (the link's owner then sees
    /// an error at its next receive).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.out.take());
        drop(self.inbox.take());
        let _ = self.wake.write(1);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Io {
    t: Transport,
    rx: Receiver<Out>,
    inbox: SyncSender<Result<Frame, WireError>>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

/// Where an inbound frame stands.
enum In {
    Header([u8; HEADER], usize),
    Body(wire::Header, Vec<u8>, usize),
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// A stream that is not the migration protocol (as opposed to a broken
/// connection): the peer is told why before the connection closes.
fn is_protocol(e: &WireError) -> bool {
    matches!(
        e,
        WireError::Magic(_)
            | WireError::Version(_)
            | WireError::Kind(_)
            | WireError::TooLong(_)
            | WireError::Crc { .. }
            | WireError::TlsMismatch(_)
    )
}

impl Io {
    /// Sends REFUSE with `why`, then reads and drops what still comes for a
    /// short while, so the peer reads the reason rather than a reset.
    fn refuse_and_linger(&mut self, why: &str) {
        let Ok(frame) = wire::encode(Kind::Refuse, wire::refuse_payload(why)) else {
            return;
        };
        let sock = self.t.sock().try_clone();
        let Ok(mut sock) = sock else { return };
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
        let ok = match &mut self.t {
            Transport::Plain(_) => sock.write_all(&frame).is_ok(),
            Transport::Tls(_, c) => {
                c.writer().write_all(&frame).is_ok() && {
                    while c.wants_write() {
                        if c.write_tls(&mut sock).is_err() {
                            break;
                        }
                    }
                    !c.wants_write()
                }
            }
        };
        if ok {
            crate::migration::tls::linger(&sock);
        }
    }

    fn run(&mut self) -> Result<(), WireError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut off = 0usize;
        let mut acks: Vec<mpsc::Sender<()>> = Vec::new();
        let mut producer_gone = false;
        let mut state = In::Header([0; HEADER], 0);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut progress = false;
            // Take more to write once everything staged is out.
            if off == pending.len() && !self.tls_wants_write() {
                pending.clear();
                off = 0;
                for a in acks.drain(..) {
                    let _ = a.send(());
                }
                while !producer_gone && pending.len() < GATHER {
                    match self.rx.try_recv() {
                        Ok(Out::Frame(f)) => {
                            progress = true;
                            if pending.is_empty() {
                                pending = f;
                            } else {
                                pending.extend_from_slice(&f);
                            }
                        }
                        Ok(Out::Sync(a)) => {
                            progress = true;
                            if pending.is_empty() {
                                let _ = a.send(());
                            } else {
                                acks.push(a);
                                break;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => producer_gone = true,
                    }
                }
                if let Transport::Tls(_, c) = &mut self.t {
                    if !pending.is_empty() {
                        c.writer().write_all(&pending)?;
                        self.sent.fetch_add(pending.len() as u64, Ordering::Relaxed);
                        off = pending.len();
                    }
                }
            }
            if producer_gone && off == pending.len() && !self.tls_wants_write() {
                return Ok(());
            }
            match self.write_some(&pending, &mut off) {
                Ok(p) => progress |= p,
                Err(e) => {
                    // The peer may have said why before it went away.
                    let _ = self.read_some(&mut state);
                    return Err(e);
                }
            }
            let (p, closed) = self.read_some(&mut state)?;
            progress |= p;
            if closed {
                if off == pending.len() && !self.tls_wants_write() {
                    // Everything staged reached the kernel before the end.
                    for a in acks.drain(..) {
                        let _ = a.send(());
                    }
                }
                return Err(WireError::Io(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                )));
            }
            if !progress {
                let want_out = off < pending.len() || self.tls_wants_write();
                self.wait(want_out);
            }
        }
    }

    fn tls_wants_write(&self) -> bool {
        match &self.t {
            Transport::Tls(_, c) => c.wants_write(),
            Transport::Plain(_) => false,
        }
    }

    /// Writes what the socket takes now; true if anything moved.
    fn write_some(&mut self, pending: &[u8], off: &mut usize) -> Result<bool, WireError> {
        let mut moved = false;
        match &mut self.t {
            Transport::Plain(s) => {
                while *off < pending.len() {
                    match s.write(&pending[*off..]) {
                        Ok(0) => return Err(WireError::Io(ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            *off += n;
                            moved = true;
                            self.sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Transport::Tls(s, c) => {
                while c.wants_write() {
                    match c.write_tls(s) {
                        Ok(0) => return Err(WireError::Io(ErrorKind::WriteZero.into())),
                        Ok(_) => moved = true,
                        Err(e) if would_block(&e) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(moved)
    }

    /// Reads what has arrived, passing on whole frames; returns (progress,
    /// peer closed).
    fn read_some(&mut self, state: &mut In) -> Result<(bool, bool), WireError> {
        let mut moved = false;
        if let Transport::Tls(s, c) = &mut self.t {
            loop {
                if !c.wants_read() {
                    break;
                }
                match c.read_tls(s) {
                    Ok(0) => {
                        // Flush any alert, then report the end below.
                        if c.process_new_packets().is_err() {
                            let _ = c.write_tls(s);
                        }
                        break;
                    }
                    Ok(_) => {
                        moved = true;
                        if let Err(e) = c.process_new_packets() {
                            let _ = c.write_tls(s);
                            return Err(WireError::Tls(crate::migration::tls::explain(&e)));
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        loop {
            let (buf, at): (&mut [u8], usize) = match state {
                In::Header(h, got) => (&mut h[..], *got),
                In::Body(_, b, got) => (&mut b[..], *got),
            };
            let n = if at < buf.len() {
                let r = match &mut self.t {
                    Transport::Plain(s) => s.read(&mut buf[at..]),
                    Transport::Tls(_, c) => c.reader().read(&mut buf[at..]),
                };
                match r {
                    Ok(0) => return Ok((moved, true)),
                    Ok(n) => n,
                    Err(e) if would_block(&e) => return Ok((moved, false)),
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok((moved, true)),
                    Err(e) => return Err(e.into()),
                }
            } else {
                0
            };
            moved |= n > 0;
            self.received.fetch_add(n as u64, Ordering::Relaxed);
            match state {
                In::Header(h, got) => {
                    *got += n;
                    if *got == HEADER {
                        let hd = wire::read_header(&mut &h[..])?;
                        *state = In::Body(hd, vec![0u8; hd.len], 0);
                    }
                }
                In::Body(hd, b, got) => {
                    *got += n;
                    if *got == b.len() {
                        wire::check_crc(hd, b)?;
                        let frame = (hd.kind, std::mem::take(b));
                        *state = In::Header([0; HEADER], 0);
                        if self.inbox.send(Ok(frame)).is_err() {
                            // Nobody listens any more.
                            self.stop.store(true, Ordering::SeqCst);
                            return Ok((moved, false));
                        }
                    }
                }
            }
        }
    }

    fn wait(&self, want_out: bool) {
        let mut fds = [
            libc::pollfd {
                fd: self.t.sock().as_raw_fd(),
                events: libc::POLLIN | if want_out { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        let _ = self.wake.read();
    }
}
