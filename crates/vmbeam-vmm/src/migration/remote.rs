//! Migration of a whole host VM — guest hypervisor and every nested guest —
//! to another vmbeam process (another host) over TCP, by pre-copy.
//!
//! The sender turns on KVM dirty logging for the host VM's memory and for
//! every nested VM (nested guests write the pool through their own KVM VMs),
//! sends all pages while everything keeps running, then the dirty ones in
//! rounds until the rest fits the downtime budget, pauses the vCPUs, sends
//! the rest and the state, and waits for the receiver's verdict (it checks
//! every nested guest's checksum). Only after the receiver accepted does the
//! sender commit and destroy its copy; on any error before that the source
//! resumes and keeps running. The receiver validates every frame and never
//! runs anything until commit.

pub mod postcopy;

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::layout;
use vmbeam_abi::state::VcpuState;

use crate::base::progress::{Phase, Progress};
use crate::host::arch;
use crate::host::memory::{GuestRam, MemFile, Region, RegionKind};
use crate::l1::hostvm::Shared;
use crate::l1::hostvm::{HostVm, HostVmSpec, VmStatus};
use crate::migration::copy::{dirty_page_numbers, dirty_pages, PrecopyStats, PAGE};
use crate::migration::link::{self, Link, Transport};
use crate::migration::report::{cpu_ms, rss_bytes, GuestReport, Report};
use crate::migration::reuse::{self, ReuseCache};
use crate::migration::tls::{self, TlsDir};
use crate::migration::wire::{self, Kind, WireError};
use crate::nesting::nested::{NestedSlot, NestedState, NestedVm};

/// Errors of host-to-host migration.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The destination could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The destination address is not `tcp://HOST:PORT` or `HOST:PORT`.
    #[error("bad destination '{0}': use tcp://HOST:PORT")]
    Address(String),
    /// The destination's host name does not resolve.
    #[error("cannot resolve the destination host '{host}': {msg}")]
    Resolve {
        /// Host name.
        host: String,
        /// Resolver's answer.
        msg: String,
    },
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer refused.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The incoming description is not acceptable.
    #[error("incoming migration rejected: {0}")]
    Invalid(String),
    /// KVM or memory set-up failed on this side.
    #[error("migration failed locally: {0}")]
    Local(String),
    /// Mutual TLS failed: no certificate, an untrusted one, or no TLS.
    #[error("TLS: {0}")]
    Tls(String),
    /// The user cancelled before the switch.
    #[error("the migration was cancelled; the source keeps running")]
    Cancelled,
    /// COMMIT went out but the destination never said it runs the VM.
    #[error("the destination did not confirm that it runs the VM after COMMIT ({0}); the source copy is kept stopped, not released")]
    Unconfirmed(String),
    /// Post-copy failed after the switch (link or peer lost, a page not
    /// delivered): the destination's guests cannot go on.
    #[error("post-copy failed after the switch: {0}; the destination stops the VM (its guests cannot run without the missing pages) and the source copy is kept stopped with all its memory")]
    PostcopyBroken(String),
}

pub use crate::migration::region_desc::{region_desc, RegionDesc};

/// First frame: the host VM being sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    /// Line name.
    pub line: String,
    /// Generation.
    pub generation: u32,
    /// RAM.
    pub ram: u64,
    /// Pool.
    pub pool: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Slice.
    pub slice_us: u32,
    /// Aging injector setting of the guest hypervisor (kept on arrival).
    #[serde(default)]
    pub age_leak_pages: u32,
    /// Memory regions, in index order.
    pub regions: Vec<RegionDesc>,
    /// Epoch of an image of this VM the receiver may have kept when the VM
    /// left it (hex); the receiver answers with page hashes or says no.
    #[serde(default)]
    pub reuse_epoch: Option<String>,
    /// Epoch under which the sender keeps this image after the move (hex),
    /// for the receiver to cite if the VM comes back.
    #[serde(default)]
    pub keep_epoch: Option<String>,
    /// Post-copy: the destination resumes the VM before its memory
    /// arrived (migration/postcopy.rs).
    #[serde(default)]
    pub postcopy: bool,
}

/// The receiver's answer to `reuse_epoch`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReuseAnswer {
    /// Hashes were sent and SAME markers are accepted.
    pub reused: bool,
    /// Why not.
    pub why: Option<String>,
    /// Seed of the page hashes.
    pub seed: u64,
}

/// A nested VM's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NestedDesc {
    /// Handle in L1.
    pub handle: u32,
    /// Name.
    pub name: String,
    /// Crashed guests stay crashed.
    pub crashed: bool,
    /// Times moved before.
    pub moves: u32,
    /// (L1 GPA, L2 GPA, length) of each slot.
    pub slots: Vec<(u64, u64, u64)>,
    /// vCPU states, raw ABI bytes.
    pub vcpus: Vec<Vec<u8>>,
}

/// State frame.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StateMsg {
    /// L1 vCPU states, raw ABI bytes.
    pub l1_vcpus: Vec<Vec<u8>>,
    /// Nested VMs.
    pub nested: Vec<NestedDesc>,
}

/// Receiver's verdict.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Accepted.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Checksum of each nested guest's memory as received.
    pub checksums: Vec<(String, u64)>,
    /// Time the destination took to build the VM (KVM VM, vCPUs, nested VMs), ms.
    #[serde(default)]
    pub build_ms: f64,
    /// Time the destination spent hashing the nested guests, ms.
    #[serde(default)]
    pub verify_ms: f64,
}

/// A guest as the destination runs it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StartedGuest {
    /// Name.
    pub name: String,
    /// Moves so far, this one included.
    pub moves: u32,
    /// Runs (not crashed).
    pub running: bool,
}

/// The destination's word after COMMIT: its vCPUs run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Started {
    /// The host VM's vCPU threads run.
    pub running: bool,
    /// Its nested guests.
    pub guests: Vec<StartedGuest>,
    /// The destination's own time from the last state frame to its vCPUs
    /// running, ms (post-copy).
    #[serde(default)]
    pub resume_ms: Option<f64>,
}

pub use crate::migration::report::Transfer;

const MAX_REGIONS: usize = 64;

/// What the stop-and-copy phase yields: what was sent, (name, bytes,
/// checksum) of each nested guest at pause, the receiver's verdict and the
/// time spent hashing here.
type FinalPhase = (Sent, Vec<(String, u64, u64)>, Verdict, Duration);

fn set_l1_logging(vm: &HostVm, on: bool) {
    let flags = if on {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for r in vm.mem.read().unwrap().regions.iter() {
        // Same slot and live mapping as installed; only the flags change.
        let _ = crate::l1::hostvm::set_slot_flags(&vm.vm, r, flags);
    }
}

/// Pages to send: per region, a bitmap of 4 KiB pages.
struct Dirty {
    maps: Vec<Vec<u64>>,
}

impl Dirty {
    fn new(regions: &[Region]) -> Dirty {
        Dirty {
            maps: regions
                .iter()
                .map(|r| vec![0u64; (r.size / PAGE).div_ceil(64) as usize])
                .collect(),
        }
    }
    fn set(&mut self, region: usize, page: u64) {
        if let Some(w) = self.maps[region].get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }
    fn count(&self) -> u64 {
        self.maps.iter().map(|m| dirty_pages(m)).sum()
    }
}

/// Collects (and clears) the dirty logs of the host VM and its nested VMs.
fn collect_dirty(
    vm: &HostVm,
    regions: &[Region],
    nested: &[crate::nesting::nested::NestedRef],
) -> Dirty {
    let mut d = Dirty::new(regions);
    for (i, r) in regions.iter().enumerate() {
        if let Ok(bm) = vm.vm.get_dirty_log(r.slot, r.size as usize) {
            for page in dirty_page_numbers(&bm) {
                d.set(i, page);
            }
        }
    }
    for n in nested {
        let n = n.lock().unwrap();
        for (si, s) in n.slots.iter().enumerate() {
            let Some(ri) = regions.iter().position(|r| r.contains(s.l1_gpa, s.len)) else {
                continue;
            };
            let base = (s.l1_gpa - regions[ri].gpa) / PAGE;
            if let Ok(bm) = n.take_dirty(si) {
                for page in dirty_page_numbers(&bm) {
                    d.set(ri, base + page);
                }
            }
        }
    }
    d
}

/// Checks that a page (or any run of bytes) is all zero.
fn is_zero(p: &[u8]) -> bool {
    p.iter().fold(0u8, |a, &b| a | b) == 0
}

/// What the sender has put on the wire, for the report.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    /// Guest memory sent as page data.
    pages: u64,
    /// Guest memory sent as zero markers.
    zero: u64,
    /// Guest memory the destination already had (SAME markers, reuse).
    same: u64,
}

impl Sent {
    fn add(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero += o.zero;
        self.same += o.same;
    }
}

/// What a page becomes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Data,
    Zero,
    Same,
}

/// Gathers consecutive pages of one kind into one frame.
struct Runs<'o, 'a> {
    out: &'o Out<'a>,
    idx: usize,
    r: &'o Region,
    cur: Option<(RunKind, u64)>,
    s: Sent,
}

impl Runs<'_, '_> {
    fn push(&mut self, kind: RunKind, at: u64) -> Result<(), RemoteError> {
        if let Some((k, st)) = self.cur {
            if k == kind && !(k == RunKind::Data && at - st >= wire::CHUNK as u64) {
                return Ok(());
            }
            self.flush(at)?;
        }
        self.cur = Some((kind, at));
        Ok(())
    }

    fn flush(&mut self, upto: u64) -> Result<(), RemoteError> {
        let Some((k, st)) = self.cur.take() else {
            return Ok(());
        };
        let len = upto - st;
        let idx = self.idx as u32;
        match k {
            RunKind::Zero => {
                self.out
                    .send(Kind::Zero, &wire::range_payload(idx, st, len))?;
                self.s.zero += len;
            }
            RunKind::Same => {
                self.out
                    .send(Kind::Same, &wire::range_payload(idx, st, len))?;
                self.s.same += len;
            }
            RunKind::Data => {
                // SAFETY: `[st, upto)` is inside the region's live mapping.
                let data = unsafe {
                    std::slice::from_raw_parts(self.r.map.as_ptr().add(st as usize), len as usize)
                };
                self.out.frame(wire::encode_pages(idx, st, data))?;
                self.s.pages += len;
            }
        }
        if let Some(p) = self.out.progress {
            p.add_bytes(len);
        }
        Ok(())
    }

    fn finish(mut self, end: u64) -> Result<Sent, RemoteError> {
        self.flush(end)?;
        Ok(self.s)
    }
}

/// The sender's side of a connection: frames out through the link, and a
/// look at what the destination said after every frame, so a refusal stops
/// the stream at once.
struct Out<'a> {
    link: &'a Link,
    progress: Option<&'a Progress>,
}

impl<'a> Out<'a> {
    /// Fails if the destination refused, went away, or the user cancelled.
    fn check(&self) -> Result<(), RemoteError> {
        if self.progress.is_some_and(|p| p.is_cancelled()) {
            return Err(RemoteError::Cancelled);
        }
        match self.link.try_recv() {
            None => Ok(()),
            Some(r) => Err(peer_said(r)),
        }
    }

    fn frame(&self, f: Vec<u8>) -> Result<(), RemoteError> {
        self.check()?;
        self.link
            .send_encoded(f)
            .map_err(|e| refusal_or(self.link, e))
    }

    fn send(&self, k: Kind, payload: &[u8]) -> Result<(), RemoteError> {
        self.frame(wire::encode(k, payload)?)
    }

    fn runs<'o>(&'o self, idx: usize, r: &'o Region) -> Runs<'o, 'a> {
        Runs {
            out: self,
            idx,
            r,
            cur: None,
            s: Sent::default(),
        }
    }

    /// Sends `[off, off+len)` of region `idx`: zero pages as ZERO markers,
    /// the others as PAGES frames of at most [`wire::CHUNK`] bytes.
    fn range(&self, idx: usize, r: &Region, off: u64, len: u64) -> Result<Sent, RemoteError> {
        let mut runs = self.runs(idx, r);
        let end = off + len;
        let mut at = off;
        while at < end {
            let n = (end - at).min(PAGE);
            // SAFETY: `[at, at+n)` is inside the region's live mapping.
            let page =
                unsafe { std::slice::from_raw_parts(r.map.as_ptr().add(at as usize), n as usize) };
            let kind = if is_zero(page) {
                RunKind::Zero
            } else {
                RunKind::Data
            };
            runs.push(kind, at)?;
            at += n;
        }
        runs.finish(end)
    }

    /// Round 1 against an image the destination kept: every page of every
    /// region, as SAME where the destination's hash equals ours.
    fn against(
        &self,
        regions: &[Region],
        theirs: &[Vec<u128>],
        seed: u64,
    ) -> Result<Sent, RemoteError> {
        let zero = reuse::page_hash(&[0u8; PAGE as usize], seed);
        let mut s = Sent::default();
        for (i, (r, th)) in regions.iter().zip(theirs).enumerate() {
            let mut runs = self.runs(i, r);
            for (off, len, data) in r.file.extents(r.offset, r.size) {
                let start = off - r.offset;
                let mut at = start;
                while at < start + len {
                    let n = (start + len - at).min(PAGE);
                    let want = th.get((at / PAGE) as usize).copied();
                    let kind = if !data {
                        if want == Some(zero) {
                            RunKind::Same
                        } else {
                            RunKind::Zero
                        }
                    } else {
                        // SAFETY: `[at, at+n)` is inside the region's live mapping.
                        let page = unsafe {
                            std::slice::from_raw_parts(r.map.as_ptr().add(at as usize), n as usize)
                        };
                        if n == PAGE && want == Some(reuse::page_hash(page, seed)) {
                            RunKind::Same
                        } else if is_zero(page) {
                            RunKind::Zero
                        } else {
                            RunKind::Data
                        }
                    };
                    runs.push(kind, at)?;
                    at += n;
                }
            }
            s.add(runs.finish(r.size)?);
        }
        Ok(s)
    }

    /// Round 1: every data extent of every region (holes read as zero on
    /// the destination's fresh memory and are not sent).
    fn all(&self, regions: &[Region]) -> Result<Sent, RemoteError> {
        let mut s = Sent::default();
        for (i, r) in regions.iter().enumerate() {
            for (off, len, data) in r.file.extents(r.offset, r.size) {
                if data {
                    s.add(self.range(i, r, off - r.offset, len)?);
                }
            }
        }
        Ok(s)
    }

    fn dirty(&self, regions: &[Region], d: &Dirty) -> Result<Sent, RemoteError> {
        let mut s = Sent::default();
        for (i, (r, bm)) in regions.iter().zip(&d.maps).enumerate() {
            // Coalesce runs of dirty pages.
            let mut run: Option<(u64, u64)> = None;
            for p in 0..r.size / PAGE {
                let dirty = bm[(p / 64) as usize] & (1 << (p % 64)) != 0;
                match (dirty, run) {
                    (true, None) => run = Some((p, 1)),
                    (true, Some((st, c))) => run = Some((st, c + 1)),
                    (false, Some((st, c))) => {
                        s.add(self.range(i, r, st * PAGE, c * PAGE)?);
                        run = None;
                    }
                    (false, None) => {}
                }
            }
            if let Some((st, c)) = run {
                s.add(self.range(i, r, st * PAGE, c * PAGE)?);
            }
        }
        Ok(s)
    }
}

/// The error a frame (or failure) from the destination stands for.
pub(crate) fn peer_said(r: Result<link::Frame, WireError>) -> RemoteError {
    match r {
        Ok((Kind::Refuse, p)) => RemoteError::Refused(wire::parse_reason(&p)),
        Ok((k, _)) => RemoteError::Refused(format!("unexpected {k:?} frame from the destination")),
        Err(e) => RemoteError::Wire(e),
    }
}

/// A failed send: the destination's own reason if it sent one before the
/// connection broke, else the transport error.
fn refusal_or(link: &Link, e: WireError) -> RemoteError {
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok((k, p)) = link.recv(deadline.saturating_duration_since(Instant::now())) {
        if k == Kind::Refuse {
            return RemoteError::Refused(wire::parse_reason(&p));
        }
    }
    RemoteError::Wire(e)
}

/// Reads the destination's answer to `reuse_epoch`: the hashes of every
/// page of its kept image, checked against this side's own layout before
/// anything is allocated, or `None` if it kept nothing usable.
#[allow(clippy::type_complexity)]
fn kept_hashes(
    link: &Link,
    regions: &[Region],
) -> Result<Option<(Vec<Vec<u128>>, u64)>, RemoteError> {
    let mut h: Vec<Vec<u128>> = regions.iter().map(|_| Vec::new()).collect();
    loop {
        match link.recv(ANSWER) {
            Ok((Kind::Hashes, p)) => {
                let (ri, first, hs) = reuse::parse_hashes(&p)
                    .ok_or_else(|| RemoteError::Refused("malformed HASHES frame".into()))?;
                let r = regions
                    .get(ri as usize)
                    .ok_or_else(|| RemoteError::Refused(format!("HASHES for region {ri}")))?;
                let v = &mut h[ri as usize];
                if first != v.len() as u64 || v.len() as u64 + hs.len() as u64 > r.size / PAGE {
                    return Err(RemoteError::Refused(format!(
                        "HASHES out of order or beyond region {ri}"
                    )));
                }
                v.extend(hs);
            }
            Ok((Kind::HashesEnd, p)) => {
                let a: ReuseAnswer = serde_json::from_slice(&p)
                    .map_err(|e| RemoteError::Refused(format!("unreadable reuse answer: {e}")))?;
                if !a.reused {
                    return Ok(None);
                }
                if regions
                    .iter()
                    .zip(&h)
                    .any(|(r, v)| v.len() as u64 != r.size / PAGE)
                {
                    return Err(RemoteError::Refused(
                        "HASHES do not cover every page".into(),
                    ));
                }
                return Ok(Some((h, a.seed)));
            }
            other => return Err(peer_said(other)),
        }
    }
}

/// Parses `tcp://HOST:PORT` or `HOST:PORT`.
pub fn parse_addr(to: &str) -> Result<String, RemoteError> {
    let a = to.strip_prefix("tcp://").unwrap_or(to);
    let bad = || RemoteError::Address(to.escape_debug().to_string());
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && (host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    port.parse::<u16>().map_err(|_| bad())?;
    // A well-formed address whose name does not resolve is a DNS failure,
    // and says so.
    match a.to_socket_addrs().map(|mut i| i.next()) {
        Ok(Some(_)) => Ok(a.to_string()),
        Ok(None) => Err(RemoteError::Resolve {
            host: host.to_string(),
            msg: "no address found".into(),
        }),
        Err(e) => Err(RemoteError::Resolve {
            host: host.to_string(),
            msg: e.to_string(),
        }),
    }
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let h = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    h.trim_start_matches('[').trim_end_matches(']')
}

/// How to migrate out.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Downtime budget of the pre-copy.
    pub downtime: Duration,
    /// Mutual TLS material; `None` sends in clear.
    pub tls: Option<TlsDir>,
    /// Progress to publish (phase, bytes), and the cancel flag to obey.
    pub progress: Option<Arc<Progress>>,
    /// Keep the image after the move (for the VM's return) and use images
    /// the destination kept; `None` releases memory at once.
    pub reuse: Option<Arc<ReuseCache>>,
    /// Post-copy instead of pre-copy (no reuse: pages cross on demand).
    pub postcopy: bool,
}

/// Sends host VM `vm` to `to`. On success the source VM is stopped and its
/// memory released; on error it keeps running.
pub fn migrate_out(vm: &Arc<HostVm>, to: &str, budget: Duration) -> Result<Report, RemoteError> {
    migrate_out_with(
        vm,
        to,
        &MigrateOptions {
            downtime: budget,
            ..Default::default()
        },
    )
}

/// How long the sender waits for each answer of the destination.
pub(crate) const ANSWER: Duration = Duration::from_secs(120);

/// [`migrate_out`] with options.
pub fn migrate_out_with(
    vm: &Arc<HostVm>,
    to: &str,
    opts: &MigrateOptions,
) -> Result<Report, RemoteError> {
    let budget = opts.downtime;
    let progress = opts.progress.as_deref();
    let phase = |p: Phase| {
        if let Some(x) = progress {
            x.set_phase(p)
        }
    };
    let addr = parse_addr(to)?;
    let t0 = Instant::now();
    let rss_before = rss_bytes();
    let cpu0 = cpu_ms();
    let sock = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut i| i.next())
        .ok_or_else(|| RemoteError::Address(to.to_string()))?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|source| {
        RemoteError::Connect {
            addr: addr.clone(),
            source,
        }
    })?;
    let _ = stream.set_nodelay(true);
    let transport = match &opts.tls {
        Some(t) => {
            tls::connect(t, stream, host_of(&addr)).map_err(|e| RemoteError::Tls(e.to_string()))?
        }
        None => Transport::Plain(stream),
    };
    let link = Link::spawn(transport, "vmbeam-migrate-io")?;
    let out = Out {
        link: &link,
        progress,
    };

    let regions: Vec<Region> = vm.mem.read().unwrap().regions.clone();
    let nested: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    let reuse_cache = opts.reuse.as_ref().filter(|_| !opts.postcopy);
    let keep_epoch = reuse_cache.map(|_| reuse::random_u128());
    let reuse_epoch = reuse_cache.and_then(|c| c.take_origin(&vm.spec.line));
    if let Some(p) = progress {
        p.set_bytes_total(regions.iter().map(|r| r.size).sum::<u64>());
        p.set_guests_total(nested.len() as u64);
    }
    let hello = Hello {
        line: vm.spec.line.clone(),
        generation: vm.spec.generation,
        ram: vm.spec.ram,
        pool: vm.spec.pool,
        vcpus: vm.spec.vcpus,
        slice_us: vm.spec.slice_us,
        age_leak_pages: vm.spec.age_leak_pages,
        regions: regions.iter().map(region_desc).collect(),
        reuse_epoch: reuse_epoch.map(|e| format!("{e:032x}")),
        keep_epoch: keep_epoch.map(|e| format!("{e:032x}")),
        postcopy: opts.postcopy,
    };
    let json = |v: &dyn erased::Ser| v.to_json();
    out.send(Kind::Hello, json(&hello).as_bytes())?;
    if opts.postcopy {
        return postcopy_out(vm, &link, &addr, opts, t0, rss_before, cpu0);
    }

    // Live phase: everything keeps running.
    phase(Phase::Precopy);
    vm.start_l0_write_log();
    set_l1_logging(vm, true);
    for n in &nested {
        let _ = n.lock().unwrap().set_dirty_logging(true);
    }
    let result = (|| -> Result<(Report, Vec<kvm_ioctls::VcpuFd>), RemoteError> {
        let mut stats = PrecopyStats::default();
        let mut sent = Sent::default();
        let t = Instant::now();
        let theirs = match reuse_epoch {
            Some(_) => kept_hashes(&link, &regions)?,
            None => None,
        };
        let first = match &theirs {
            Some((h, seed)) => out.against(&regions, h, *seed)?,
            None => out.all(&regions)?,
        };
        sent.add(first);
        link.flush(ANSWER).map_err(|e| refusal_or(&link, e))?;
        stats.rounds = 1;
        let mut bps =
            (first.pages + first.zero + first.same) as f64 / t.elapsed().as_secs_f64().max(1e-6);
        loop {
            let d = collect_dirty(vm, &regions, &nested);
            let pending = d.count();
            let est = Duration::from_secs_f64(pending as f64 * PAGE as f64 / bps.max(1.0));
            stats.rounds += 1;
            if let Some(p) = progress {
                p.add_round();
            }
            if est <= budget || stats.rounds >= crate::migration::copy::MAX_ROUNDS {
                sent.add(out.dirty(&regions, &d)?);
                stats.remaining_pages = pending;
                stats.converged = est <= budget;
                break;
            }
            let t = Instant::now();
            let n = out.dirty(&regions, &d)?;
            link.flush(ANSWER).map_err(|e| refusal_or(&link, e))?;
            sent.add(n);
            if n.pages + n.zero > 0 {
                bps = (n.pages + n.zero) as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
        }
        stats.live_bytes = sent.pages;
        // Stop-and-copy.
        phase(Phase::HandingOver);
        let t_pause = Instant::now();
        let fds = vm.pause_vcpus();
        // Everything from here to the verdict resumes the source on failure.
        let res = (|| -> Result<FinalPhase, RemoteError> {
            let d = collect_dirty(vm, &regions, &nested);
            sent.add(out.dirty(&regions, &d)?);
            // What L0 itself wrote is not in any dirty log: the boot-info and
            // hypercall pages (answers, control word) and pattern fills.
            let mut l0 = vec![(0u64, layout::PML4_ADDR)];
            l0.extend(vm.take_l0_writes());
            for (gpa, len) in l0 {
                if let Some(i) = regions.iter().position(|r| r.contains(gpa, len)) {
                    sent.add(out.range(i, &regions[i], gpa - regions[i].gpa, len)?);
                }
            }
            let (state, guests) = save_state(&fds, &nested)?;
            out.send(Kind::State, json(&state).as_bytes())?;
            out.send(Kind::Done, &[])?;
            // Hash the guests here while the I/O thread sends the state and
            // the destination builds and hashes its copy: the memory does
            // not change while paused, so the sums are those of the pause.
            let th = Instant::now();
            let before: Vec<(String, u64, u64)> = guests
                .into_iter()
                .zip(&nested)
                .map(|((name, mem), n)| (name, mem, n.lock().unwrap().checksum_all()))
                .collect();
            let hash = th.elapsed();
            link.flush(ANSWER).map_err(|e| refusal_or(&link, e))?;
            phase(Phase::Verifying);
            let verdict = match link.recv(ANSWER) {
                Ok((Kind::Result, p)) => serde_json::from_slice::<Verdict>(&p)
                    .map_err(|e| RemoteError::Refused(format!("unreadable verdict: {e}")))?,
                other => return Err(peer_said(other)),
            };
            Ok((sent, before, verdict, hash))
        })();
        let (sent, before, verdict, source_hash) = match res {
            Ok(v) => v,
            Err(e) => return Err(resume_err(vm, fds, e)),
        };
        if !verdict.ok {
            let e = RemoteError::Refused(verdict.error.unwrap_or_else(|| "no reason given".into()));
            return Err(resume_err(vm, fds, e));
        }
        for (name, _, sum) in &before {
            let theirs = verdict
                .checksums
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| *c);
            if theirs != Some(*sum) {
                let _ = out.send(Kind::Abort, b"checksum mismatch");
                let _ = link.flush(Duration::from_secs(5));
                let e =
                    RemoteError::Refused(format!("memory of {name} differs on the destination"));
                return Err(resume_err(vm, fds, e));
            }
        }
        // Only a COMMIT that was never queued lets this side resume: once it
        // is queued it may reach the destination, which then runs the VM (so
        // no flush here: the destination may answer STARTED and close before
        // the I/O thread reports the flush).
        if let Err(e) = out.send(Kind::Commit, &[]) {
            return Err(resume_err(vm, fds, e));
        }
        phase(Phase::Committing);
        let commit_sent = t_pause.elapsed();
        // From COMMIT on the destination owns the VM: this side must not run
        // it again, whatever happens to the connection.
        let started = match link.recv(ANSWER) {
            Ok((Kind::Started, p)) => serde_json::from_slice::<Started>(&p)
                .map_err(|e| RemoteError::Refused(format!("unreadable STARTED: {e}"))),
            other => Err(peer_said(other)),
        };
        let downtime = t_pause.elapsed();
        let resumed_at = t0.elapsed();
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                drop(fds);
                vm.set_status(VmStatus::Failed(format!(
                    "migrated to {addr}: COMMIT was sent but the destination did not confirm \
                     that it runs the VM ({e}); this copy is kept stopped, not released"
                )));
                return Err(RemoteError::Unconfirmed(e.to_string()));
            }
        };
        phase(Phase::Done);
        // The destination runs the guests now: release this copy.
        let allocated = vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes();
        vm.set_status(VmStatus::Retired);
        drop(vm.drop_nested());
        let image = vm.drop_memory();
        let kept = match (&opts.reuse, keep_epoch) {
            (Some(c), Some(e)) => {
                let bytes: u64 = image.iter().map(|r| r.file.allocated_bytes()).sum();
                c.keep(&vm.spec.line, e, image).then_some(bytes)
            }
            _ => {
                drop(image);
                None
            }
        };
        if kept.is_none() {
            let _ = vm.ram_file.punch_hole(0, vm.ram_file.size);
            let _ = vm.pool_file.punch_hole(0, vm.pool_file.size);
        }
        let released = allocated
            .saturating_sub(vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes());
        let total = t0.elapsed();
        let transfer = Transfer {
            mode: "precopy".into(),
            time_to_resume_ms: resumed_at.as_secs_f64() * 1000.0,
            postcopy: None,
            tls: opts.tls.is_some(),
            page_bytes: sent.pages,
            zero_bytes: sent.zero,
            reused_bytes: sent.same,
            reuse: theirs.is_some(),
            kept_bytes: kept.unwrap_or(0),
            wire_bytes_sent: link.bytes_sent(),
            wire_bytes_received: link.bytes_received(),
            source_verify_ms: source_hash.as_secs_f64() * 1000.0,
            destination_verify_ms: verdict.verify_ms,
            destination_build_ms: verdict.build_ms,
            pause_to_commit_ms: commit_sent.as_secs_f64() * 1000.0,
            memory_gbps: (sent.pages + sent.zero + sent.same) as f64
                / total.as_secs_f64().max(1e-9)
                / 1e9,
        };
        let report = Report {
            mode: "tcp".into(),
            vm: vm.spec.line.clone(),
            from_generation: vm.spec.generation,
            to_generation: vm.spec.generation,
            boot_ms: verdict.build_ms,
            handover_ms: downtime.as_secs_f64() * 1000.0,
            total_ms: total.as_secs_f64() * 1000.0,
            bytes_copied: sent.pages,
            channel_bytes: link.bytes_sent() + link.bytes_received(),
            released_bytes: released,
            host_rss_before: rss_before,
            host_rss_after: rss_bytes(),
            cpu_ms: cpu_ms() - cpu0,
            verify_ms: transfer.source_verify_ms + transfer.destination_verify_ms,
            guests: before
                .iter()
                .map(|(name, mem, sum)| {
                    let there = started.guests.iter().find(|g| &g.name == name);
                    GuestReport {
                        name: name.clone(),
                        mem_bytes: *mem,
                        downtime_us: downtime.as_micros() as u64,
                        checksum_before: Some(format!("{sum:016x}")),
                        checksum_after: verdict
                            .checksums
                            .iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, c)| format!("{c:016x}")),
                        running_after: there.is_some_and(|g| g.running) && started.running,
                        moves: there.map(|g| g.moves).unwrap_or(0),
                        // Guests with devices are refused by this move.
                        devices: 0,
                        device_in_flight: 0,
                    }
                })
                .collect(),
            precopy: Some(stats),
            rescued: None,
            transfer: Some(transfer),
        };
        Ok((report, fds))
    })();
    match result {
        Ok((report, fds)) => {
            drop(fds);
            Ok(report)
        }
        Err(e) => {
            phase(if matches!(e, RemoteError::Cancelled) {
                Phase::Cancelled
            } else {
                Phase::Failed
            });
            vm.take_l0_writes();
            set_l1_logging(vm, false);
            for n in &nested {
                let _ = n.lock().unwrap().set_dirty_logging(false);
            }
            if !matches!(e, RemoteError::Unconfirmed(_))
                && vm.status() != VmStatus::Running
                && !vm.vcpus_alive()
            {
                // Paused by an early error path that could not resume.
                vm.set_status(VmStatus::Running);
            }
            Err(e)
        }
    }
}

/// The post-copy path of [`migrate_out_with`] after HELLO: the switch and
/// the page service (migration/postcopy.rs), then the release of this copy
/// once the destination confirmed the last page, and the report.
#[allow(clippy::too_many_arguments)]
fn postcopy_out(
    vm: &Arc<HostVm>,
    link: &Link,
    addr: &str,
    opts: &MigrateOptions,
    t0: Instant,
    rss_before: u64,
    cpu0: f64,
) -> Result<Report, RemoteError> {
    let progress = opts.progress.as_deref();
    let phase = |p: Phase| {
        if let Some(x) = progress {
            x.set_phase(p)
        }
    };
    phase(Phase::HandingOver);
    let guests: Vec<(String, u64)> = vm
        .nested
        .lock()
        .unwrap()
        .vms
        .values()
        .map(|n| {
            let n = n.lock().unwrap();
            (n.name.clone(), n.mem_bytes())
        })
        .collect();
    let sw = match crate::migration::remote::postcopy::send(vm, link, addr, progress) {
        Ok(s) => s,
        Err(e) => {
            phase(if matches!(e, RemoteError::Cancelled) {
                Phase::Cancelled
            } else {
                Phase::Failed
            });
            return Err(e);
        }
    };
    phase(Phase::Done);
    let allocated = vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes();
    vm.set_status(VmStatus::Retired);
    drop(vm.drop_nested());
    drop(vm.drop_memory());
    let _ = vm.ram_file.punch_hole(0, vm.ram_file.size);
    let _ = vm.pool_file.punch_hole(0, vm.pool_file.size);
    let released =
        allocated.saturating_sub(vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes());
    let total = t0.elapsed();
    let pc = sw.report;
    let page_bytes = (pc.fetched_pages + pc.pushed_pages) * PAGE;
    let zero_bytes = pc.zero_pages * PAGE;
    let transfer = Transfer {
        mode: "postcopy".into(),
        tls: opts.tls.is_some(),
        page_bytes,
        zero_bytes,
        reuse: false,
        reused_bytes: 0,
        kept_bytes: 0,
        wire_bytes_sent: link.bytes_sent(),
        wire_bytes_received: link.bytes_received(),
        source_verify_ms: 0.0,
        destination_verify_ms: 0.0,
        destination_build_ms: sw.verdict.build_ms,
        pause_to_commit_ms: sw.commit_sent.as_secs_f64() * 1000.0,
        memory_gbps: (page_bytes + zero_bytes) as f64 / total.as_secs_f64().max(1e-9) / 1e9,
        time_to_resume_ms: sw.resumed.duration_since(t0).as_secs_f64() * 1000.0,
        postcopy: Some(pc),
    };
    Ok(Report {
        mode: "tcp".into(),
        vm: vm.spec.line.clone(),
        from_generation: vm.spec.generation,
        to_generation: vm.spec.generation,
        boot_ms: sw.verdict.build_ms,
        handover_ms: sw.downtime.as_secs_f64() * 1000.0,
        total_ms: total.as_secs_f64() * 1000.0,
        bytes_copied: page_bytes,
        channel_bytes: link.bytes_sent() + link.bytes_received(),
        released_bytes: released,
        host_rss_before: rss_before,
        host_rss_after: rss_bytes(),
        cpu_ms: cpu_ms() - cpu0,
        verify_ms: 0.0,
        guests: guests
            .into_iter()
            .map(|(name, mem)| {
                let there = sw.started.guests.iter().find(|g| g.name == name);
                GuestReport {
                    name,
                    mem_bytes: mem,
                    downtime_us: sw.downtime.as_micros() as u64,
                    checksum_before: None,
                    checksum_after: None,
                    running_after: there.is_some_and(|g| g.running) && sw.started.running,
                    moves: there.map(|g| g.moves).unwrap_or(0),
                    // Guests with devices are refused by this move.
                    devices: 0,
                    device_in_flight: 0,
                }
            })
            .collect(),
        precopy: None,
        rescued: None,
        transfer: Some(transfer),
    })
}

pub(crate) fn resume_err(
    vm: &Arc<HostVm>,
    fds: Vec<kvm_ioctls::VcpuFd>,
    e: RemoteError,
) -> RemoteError {
    vm.take_l0_writes();
    set_l1_logging(vm, false);
    for n in vm.nested.lock().unwrap().vms.values() {
        let _ = n.lock().unwrap().set_dirty_logging(false);
    }
    if !fds.is_empty() {
        vm.start_vcpus(fds);
    }
    e
}

mod erased {
    /// Serializes any serde value to JSON (a tiny object-safe shim).
    pub trait Ser {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

fn check_hello(h: &Hello) -> Result<(), RemoteError> {
    let bad = |m: String| Err(RemoteError::Invalid(m));
    if let Err(e) = crate::host::names::check_line_name(&h.line) {
        return bad(e.to_string());
    }
    if h.ram < layout::MIN_RAM || h.ram > layout::MAX_RAM || h.pool > layout::MAX_POOL {
        return bad("memory sizes out of range".into());
    }
    if h.vcpus == 0 || h.vcpus > layout::MAX_VCPUS {
        return bad(format!("{} vCPUs", h.vcpus));
    }
    if h.regions.is_empty() || h.regions.len() > MAX_REGIONS {
        return bad(format!("{} memory regions", h.regions.len()));
    }
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in &h.regions {
        let end = r
            .gpa
            .checked_add(r.size)
            .ok_or_else(|| RemoteError::Invalid("region wraps".into()))?;
        let ok = r.size > 0
            && r.gpa % PAGE == 0
            && r.size % PAGE == 0
            && match r.kind.as_str() {
                "ram" => r.gpa == 0 && r.size == h.ram,
                "pool" => r.gpa == layout::POOL_BASE && r.size == h.pool,
                "channel" => r.gpa == layout::CHANNEL_BASE && r.size == layout::CHANNEL_SIZE,
                "grant" => {
                    r.guest.is_some()
                        && r.gpa >= layout::GRANT_BASE
                        && end <= layout::GRANT_BASE + layout::GRANT_SIZE
                }
                _ => false,
            };
        if !ok || spans.iter().any(|(a, b)| r.gpa < *b && *a < end) {
            return bad(format!(
                "region {} at {:#x}+{:#x} is not acceptable",
                r.kind, r.gpa, r.size
            ));
        }
        spans.push((r.gpa, end));
    }
    for k in ["ram", "pool", "channel"] {
        if h.regions.iter().filter(|r| r.kind == k).count() != 1 {
            return bad(format!("expected exactly one {k} region"));
        }
    }
    Ok(())
}

/// The nested guests of a VM that runs here now, for STARTED.
pub(crate) fn started_guests(vm: &HostVm) -> Vec<StartedGuest> {
    vm.nested
        .lock()
        .unwrap()
        .vms
        .values()
        .map(|n| {
            let n = n.lock().unwrap();
            StartedGuest {
                name: n.name.clone(),
                moves: n
                    .record
                    .as_ref()
                    .map(|r| r.info.lock().unwrap().moves)
                    .unwrap_or(0),
                running: n.state != NestedState::Crashed,
            }
        })
        .collect()
}

/// Saves the L1 vCPUs (`fds`, paused) and every nested VM's state. Returns
/// the state and (name, memory bytes) of each guest, in `nested` order.
#[allow(clippy::type_complexity)]
pub(crate) fn save_state(
    fds: &[kvm_ioctls::VcpuFd],
    nested: &[crate::nesting::nested::NestedRef],
) -> Result<(StateMsg, Vec<(String, u64)>), RemoteError> {
    let mut l1_vcpus = Vec::new();
    for fd in fds {
        let st = arch::get_state(fd).map_err(|e| RemoteError::Local(e.to_string()))?;
        l1_vcpus.push(vmbeam_abi::as_bytes(&st).to_vec());
    }
    let mut descs = Vec::new();
    let mut before = Vec::new();
    for n in nested {
        let mut n = n.lock().unwrap();
        let states = n
            .save_vcpus()
            .map_err(|s| RemoteError::Local(format!("{}: {s:?}", n.name)))?;
        before.push((n.name.clone(), n.mem_bytes()));
        descs.push(NestedDesc {
            handle: n.handle,
            name: n.name.clone(),
            crashed: n.state == NestedState::Crashed,
            moves: n
                .record
                .as_ref()
                .map(|r| r.info.lock().unwrap().moves)
                .unwrap_or(0),
            slots: n
                .slots
                .iter()
                .map(|s| (s.l1_gpa, s.l2_gpa, s.len))
                .collect(),
            vcpus: states
                .iter()
                .map(|s| vmbeam_abi::as_bytes(s).to_vec())
                .collect(),
        });
    }
    let state = StateMsg {
        l1_vcpus,
        nested: descs,
    };
    Ok((state, before))
}

/// Sends REFUSE with the reason of `e`, then keeps reading for a while so
/// the sender sees the reason rather than a reset; returns `e`.
pub(crate) fn refuse_on(link: &Link, e: RemoteError) -> RemoteError {
    let reason = e.to_string();
    if link
        .send(Kind::Refuse, wire::refuse_payload(&reason))
        .and_then(|_| link.flush(LINGER))
        .is_ok()
    {
        let until = Instant::now() + LINGER;
        while link
            .recv(until.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
    }
    e
}

fn state_from(bytes: &[u8]) -> Result<VcpuState, RemoteError> {
    if bytes.len() != std::mem::size_of::<VcpuState>() {
        return Err(RemoteError::Invalid("vCPU state of the wrong size".into()));
    }
    vmbeam_abi::from_bytes(bytes).ok_or_else(|| RemoteError::Invalid("vCPU state".into()))
}

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Mutual TLS material; `None` accepts plain TCP.
    pub tls: Option<TlsDir>,
    /// Images kept here of VMs that left (used when they come back), and
    /// where arriving VMs' epochs are noted.
    pub reuse: Option<Arc<ReuseCache>>,
    /// Where the outcome of each post-copy (after the switch) is sent.
    pub postcopy_outcome:
        Option<std::sync::mpsc::Sender<crate::migration::remote::postcopy::PostcopyOutcome>>,
}

/// How long the receiver waits for each frame of the sender.
pub(crate) const FRAME_WAIT: Duration = Duration::from_secs(60);
/// How long a refusing receiver keeps reading (and discarding) so the
/// sender can read the refusal instead of a reset connection.
const LINGER: Duration = Duration::from_secs(5);

/// Host memory available for new allocations, from /proc/meminfo.
fn mem_available() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Receives one host VM from `stream`, validates everything, answers with a
/// verdict, and on commit starts it. Returns the running host VM.
pub fn receive(
    shared: &Arc<Shared>,
    stream: TcpStream,
    taken: &dyn Fn(&str) -> bool,
) -> Result<Arc<HostVm>, RemoteError> {
    receive_with(shared, stream, taken, &ReceiveOptions::default())
}

/// [`receive`] with options. With TLS, the handshake (a client certificate
/// signed by the CA is required) completes before a single frame is read.
pub fn receive_with(
    shared: &Arc<Shared>,
    stream: TcpStream,
    taken: &dyn Fn(&str) -> bool,
    opts: &ReceiveOptions,
) -> Result<Arc<HostVm>, RemoteError> {
    let _ = stream.set_nodelay(true);
    let transport = match &opts.tls {
        Some(t) => tls::accept(t, stream).map_err(|e| RemoteError::Tls(e.to_string()))?,
        None => Transport::Plain(stream),
    };
    let link = Link::spawn(transport, "vmbeam-receive-io")?;
    // Says why, then keeps reading for a while so the sender sees the reason.
    let refuse = |e: RemoteError| -> RemoteError { refuse_on(&link, e) };
    let (k, p) = link.recv(FRAME_WAIT)?;
    if k != Kind::Hello {
        return Err(refuse(RemoteError::Invalid(format!(
            "expected HELLO, got {k:?}"
        ))));
    }
    let hello: Hello = serde_json::from_slice(&p)
        .map_err(|e| refuse(RemoteError::Invalid(format!("HELLO: {e}"))))?;
    check_hello(&hello).map_err(&refuse)?;
    if taken(&hello.line) {
        return Err(refuse(RemoteError::Invalid(format!(
            "a host VM named {} already runs here",
            hello.line
        ))));
    }
    let need: u64 = hello.regions.iter().map(|r| r.size).sum();
    if let Some(avail) = mem_available() {
        if need > avail {
            return Err(refuse(RemoteError::Local(format!(
                "not enough memory here: the host VM needs {} MiB, {} MiB are available",
                need >> 20,
                avail >> 20
            ))));
        }
    }
    let local = |e: String| RemoteError::Local(e);
    let parse_epoch =
        |s: &Option<String>| s.as_deref().and_then(|e| u128::from_str_radix(e, 16).ok());
    let mut kept: Option<Vec<Region>> = None;
    if let Some(epoch) = parse_epoch(&hello.reuse_epoch) {
        let taken = match &opts.reuse {
            Some(c) => c.take(&hello.line, epoch, &hello.regions),
            None => Err("this host keeps no images of departed VMs".into()),
        };
        let seed = reuse::random_u128() as u64;
        let answer = match taken {
            Ok(rs) => {
                for (i, r) in rs.iter().enumerate() {
                    let h = reuse::region_hashes(r, seed);
                    for (c, chunk) in h.chunks(reuse::HASHES_PER_FRAME).enumerate() {
                        let first = (c * reuse::HASHES_PER_FRAME) as u64;
                        link.send(Kind::Hashes, &reuse::hashes_payload(i as u32, first, chunk))?;
                    }
                }
                kept = Some(rs);
                ReuseAnswer {
                    reused: true,
                    why: None,
                    seed,
                }
            }
            Err(why) => ReuseAnswer {
                reused: false,
                why: Some(why),
                seed,
            },
        };
        link.send(
            Kind::HashesEnd,
            serde_json::to_string(&answer)
                .unwrap_or_default()
                .as_bytes(),
        )?;
    }
    let reusing = kept.is_some();
    let mut regions = Vec::new();
    for (i, d) in hello.regions.iter().enumerate() {
        let kind = match d.kind.as_str() {
            "ram" => RegionKind::Ram,
            "pool" => RegionKind::Pool,
            "channel" => RegionKind::Channel,
            _ => RegionKind::Grant {
                guest: d.guest.clone().unwrap_or_default(),
            },
        };
        let f = match &kept {
            Some(k) => k[i].file.clone(),
            None => MemFile::new(&format!("{}-in-{}", hello.line, d.kind), d.size)
                .map_err(|e| refuse(local(e.to_string())))?,
        };
        regions.push(
            Region::map(
                &f,
                kept.as_ref().map(|k| k[i].offset).unwrap_or(0),
                d.size,
                d.gpa,
                kind,
                i as u32,
            )
            .map_err(|e| refuse(local(e.to_string())))?,
        );
    }
    if hello.postcopy {
        if reusing {
            return Err(refuse(RemoteError::Invalid(
                "post-copy does not use a kept image".into(),
            )));
        }
        return crate::migration::remote::postcopy::receive(
            shared,
            link,
            &hello,
            regions,
            opts.postcopy_outcome.clone(),
        );
    }
    let in_region = |ri: u32, off: u64, len: u64| -> Result<&Region, RemoteError> {
        let reg = regions
            .get(ri as usize)
            .ok_or_else(|| RemoteError::Invalid(format!("memory for region {ri}")))?;
        if off.checked_add(len).is_none_or(|e| e > reg.size) {
            return Err(RemoteError::Invalid(format!("memory beyond region {ri}")));
        }
        Ok(reg)
    };
    let state: StateMsg = loop {
        let (k, p) = link.recv(FRAME_WAIT)?;
        match k {
            Kind::Pages => {
                let (ri, off, data) = wire::parse_pages(&p)?;
                let reg = in_region(ri, off, data.len() as u64).map_err(&refuse)?;
                // SAFETY: the range was checked to lie inside the fresh mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        reg.map.as_ptr().add(off as usize),
                        data.len(),
                    )
                };
            }
            Kind::Zero => {
                let (ri, off, len) = wire::parse_range(&p)?;
                let reg = in_region(ri, off, len).map_err(&refuse)?;
                if off % PAGE != 0 || len % PAGE != 0 {
                    return Err(refuse(RemoteError::Invalid(
                        "ZERO marker not page-aligned".into(),
                    )));
                }
                reg.file
                    .punch_hole(reg.offset + off, len)
                    .map_err(|e| refuse(local(e.to_string())))?;
            }
            Kind::Same => {
                let (ri, off, len) = wire::parse_range(&p)?;
                in_region(ri, off, len).map_err(&refuse)?;
                if !reusing {
                    return Err(refuse(RemoteError::Invalid(
                        "SAME marker without a kept image".into(),
                    )));
                }
            }
            Kind::State => {
                break serde_json::from_slice(&p)
                    .map_err(|e| refuse(RemoteError::Invalid(format!("STATE: {e}"))))?;
            }
            Kind::Abort => return Err(RemoteError::Refused(wire::parse_reason(&p))),
            other => {
                return Err(refuse(RemoteError::Invalid(format!(
                    "unexpected {other:?} frame"
                ))))
            }
        }
    };
    let (k, _) = link.recv(FRAME_WAIT)?;
    if k != Kind::Done {
        return Err(refuse(RemoteError::Invalid(format!(
            "expected DONE, got {k:?}"
        ))));
    }
    let tb = Instant::now();
    let (vm, fds) = build(shared, &hello, regions, &state).map_err(&refuse)?;
    let build_ms = tb.elapsed().as_secs_f64() * 1000.0;
    let th = Instant::now();
    let mut sums = Vec::new();
    for n in vm.nested.lock().unwrap().vms.values() {
        let n = n.lock().unwrap();
        sums.push((n.name.clone(), n.checksum_all()));
    }
    let v = Verdict {
        ok: true,
        error: None,
        checksums: sums,
        build_ms,
        verify_ms: th.elapsed().as_secs_f64() * 1000.0,
    };
    let answered = link
        .send(
            Kind::Result,
            serde_json::to_string(&v).unwrap_or_default().as_bytes(),
        )
        .and_then(|_| link.flush(FRAME_WAIT))
        .and_then(|_| link.recv(FRAME_WAIT));
    match answered {
        Ok((Kind::Commit, _)) => {}
        other => {
            drop(vm.drop_nested());
            drop(vm.drop_memory());
            return Err(RemoteError::Refused(match other {
                Ok((k, p)) => format!("sender did not commit ({k:?}: {})", wire::parse_reason(&p)),
                Err(e) => format!("sender did not commit ({e})"),
            }));
        }
    }
    vm.start_vcpus(fds);
    if let (Some(c), Some(e)) = (&opts.reuse, parse_epoch(&hello.keep_epoch)) {
        c.note_origin(&hello.line, e);
    }
    let started = Started {
        running: vm.status() == VmStatus::Running && vm.vcpus_alive(),
        guests: started_guests(&vm),
        resume_ms: None,
    };
    // The VM runs here whatever becomes of this last frame.
    let _ = link
        .send(
            Kind::Started,
            serde_json::to_string(&started)
                .unwrap_or_default()
                .as_bytes(),
        )
        .and_then(|_| link.flush(Duration::from_secs(5)));
    Ok(vm)
}

pub(crate) fn build(
    shared: &Arc<Shared>,
    h: &Hello,
    regions: Vec<Region>,
    st: &StateMsg,
) -> Result<(Arc<HostVm>, Vec<kvm_ioctls::VcpuFd>), RemoteError> {
    let local = |e: String| RemoteError::Local(e);
    if st.l1_vcpus.len() != h.vcpus as usize {
        return Err(RemoteError::Invalid("vCPU count differs from HELLO".into()));
    }
    if st.nested.len() > vmbeam_abi::boot::MAX_NESTED {
        return Err(RemoteError::Invalid("too many nested guests".into()));
    }
    let vm = shared
        .kvm
        .create_vm()
        .map_err(|e| local(format!("create VM: {e}")))?;
    let _ = vm.set_tss_address(0xfffb_d000);
    for r in &regions {
        // The mappings live in `regions`, which the host VM keeps.
        crate::l1::hostvm::set_slot_flags(&vm, r, 0)
            .map_err(|e| local(format!("memory slot: {e}")))?;
    }
    let mut fds = Vec::new();
    for (i, b) in st.l1_vcpus.iter().enumerate() {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(|e| local(format!("vCPU: {e}")))?;
        arch::set_cpuid(&fd, &shared.cpuid).map_err(|e| local(e.to_string()))?;
        arch::set_state(&fd, &state_from(b)?).map_err(|e| RemoteError::Invalid(e.to_string()))?;
        fds.push(fd);
    }
    let file_of = |k: &RegionKind| {
        regions
            .iter()
            .find(|r| r.kind == *k)
            .map(|r| r.file.clone())
    };
    let (ram_file, pool_file, channel) = match (
        file_of(&RegionKind::Ram),
        file_of(&RegionKind::Pool),
        file_of(&RegionKind::Channel),
    ) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err(RemoteError::Invalid("missing ram, pool or channel".into())),
    };
    let spec = HostVmSpec {
        line: h.line.clone(),
        generation: h.generation,
        role: vmbeam_abi::boot::ROLE_PRIMARY,
        ram: h.ram,
        pool: h.pool,
        vcpus: h.vcpus,
        nested: Vec::new(),
        flags: 0,
        slice_us: h.slice_us,
        age_leak_pages: h.age_leak_pages,
    };
    let ram = GuestRam { regions };
    let hv = HostVm::assemble(shared.clone(), spec, vm, ram, ram_file, pool_file, channel)
        .map_err(|e| local(e.to_string()))?;
    let mut table = hv.nested.lock().unwrap();
    for d in &st.nested {
        if d.handle == 0 || table.vms.contains_key(&d.handle) {
            return Err(RemoteError::Invalid(format!(
                "nested handle {} repeated",
                d.handle
            )));
        }
        if d.name.len() > vmbeam_abi::NAME_LEN
            || crate::host::names::check_name(&vmbeam_abi::name_to_bytes(&d.name))
                != Ok(d.name.as_str())
        {
            return Err(RemoteError::Invalid(format!(
                "bad nested guest name {:?}",
                d.name
            )));
        }
        let rec = shared.claim_record(&d.name).map_err(|e| match e {
            crate::l1::shared::ClaimError::Taken(_) => {
                RemoteError::Invalid(format!("a nested guest named {} already runs here", d.name))
            }
            e => local(e.to_string()),
        })?;
        let mut n =
            NestedVm::new(&shared.kvm, d.handle, &d.name).map_err(|s| local(format!("{s:?}")))?;
        for &(l1, l2, len) in &d.slots {
            let mem = hv.mem.read().unwrap();
            let r = mem
                .find(l1, len)
                .filter(|r| matches!(r.kind, RegionKind::Pool | RegionKind::Grant { .. }))
                .ok_or_else(|| {
                    RemoteError::Invalid(format!("{}: slot outside nested memory", d.name))
                })?;
            n.map(NestedSlot {
                l2_gpa: l2,
                l1_gpa: l1,
                len,
                hva: r.host_addr(l1) as usize,
                file: r.file.clone(),
                file_offset: r.offset + (l1 - r.gpa),
                map: r.map.clone(),
            })
            .map_err(|s| RemoteError::Invalid(format!("{}: slot refused ({s:?})", d.name)))?;
        }
        for (i, b) in d.vcpus.iter().enumerate() {
            n.create_vcpu(&shared.cpuid)
                .map_err(|s| local(format!("{s:?}")))?;
            n.set_state(i as u64, &state_from(b)?)
                .map_err(|s| RemoteError::Invalid(format!("{}: state ({s:?})", d.name)))?;
        }
        if d.crashed {
            n.state = NestedState::Crashed;
        }
        {
            let mut info = rec.info.lock().unwrap();
            info.bound_vm = hv.id;
            info.handle = d.handle;
            info.host_vm = h.line.clone();
            info.generation = h.generation;
            info.mem_bytes = n.mem_bytes();
            info.moves = d.moves + 1;
        }
        n.record = Some(rec);
        table.next_handle = table.next_handle.max(d.handle);
        table.add(d.handle, n).map_err(|s| {
            RemoteError::Invalid(format!("{}: slots overlap another guest's ({s:?})", d.name))
        })?;
    }
    drop(table);
    Ok((hv, fds))
}
