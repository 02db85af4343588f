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

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_abi::layout;
use vmbeam_abi::state::VcpuState;

use crate::host::arch;
use crate::host::hostvm::{HostVm, HostVmSpec, VmStatus};
use crate::host::memory::{GuestRam, MemFile, Region, RegionKind};
use crate::migration::copy::{dirty_page_numbers, dirty_pages, PrecopyStats, PAGE};
use crate::migration::rejuvenate::{cpu_ms, rss_bytes, GuestReport, Report};
use crate::migration::wire::{self, Kind, WireError};
use crate::nesting::nested::{NestedSlot, NestedState, NestedVm};
use crate::shared::Shared;

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
}

/// One region of the host VM's memory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RegionDesc {
    /// ram, pool, channel or grant.
    pub kind: String,
    /// Guest name for grant regions.
    pub guest: Option<String>,
    /// Guest-physical start.
    pub gpa: u64,
    /// Size.
    pub size: u64,
}

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
}

const MAX_REGIONS: usize = 64;

/// What the stop-and-copy phase yields: bytes sent, (name, bytes, checksum)
/// of each nested guest at pause, and the receiver's verdict.
type FinalPhase = (u64, Vec<(String, u64, u64)>, Verdict);

fn kind_name(k: &RegionKind) -> (&'static str, Option<String>) {
    match k {
        RegionKind::Ram => ("ram", None),
        RegionKind::Pool => ("pool", None),
        RegionKind::Channel => ("channel", None),
        RegionKind::Grant { guest } => ("grant", Some(guest.clone())),
    }
}

fn set_l1_logging(vm: &HostVm, on: bool) {
    let flags = if on {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for r in vm.mem.read().unwrap().regions.iter() {
        // Same slot and live mapping as installed; only the flags change.
        let _ = crate::host::hostvm::set_slot_flags(&vm.vm, r, flags);
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

fn send_range(
    w: &mut impl Write,
    idx: usize,
    r: &Region,
    off: u64,
    len: u64,
) -> Result<u64, WireError> {
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(wire::CHUNK as u64);
        // SAFETY: `[at, at+n)` is inside the region's live mapping.
        let data =
            unsafe { std::slice::from_raw_parts(r.map.as_ptr().add(at as usize), n as usize) };
        wire::write_frame(w, Kind::Pages, &wire::pages_payload(idx as u32, at, data))?;
        at += n;
    }
    Ok(len)
}

fn send_all(w: &mut impl Write, regions: &[Region]) -> Result<u64, WireError> {
    let mut n = 0;
    for (i, r) in regions.iter().enumerate() {
        for (off, len, data) in r.file.extents(r.offset, r.size) {
            if data {
                n += send_range(w, i, r, off - r.offset, len)?;
            }
        }
    }
    Ok(n)
}

fn send_dirty(w: &mut impl Write, regions: &[Region], d: &Dirty) -> Result<u64, WireError> {
    let mut n = 0;
    for (i, (r, bm)) in regions.iter().zip(&d.maps).enumerate() {
        // Coalesce runs of dirty pages.
        let mut run: Option<(u64, u64)> = None;
        let pages = r.size / PAGE;
        for p in 0..pages {
            let dirty = bm[(p / 64) as usize] & (1 << (p % 64)) != 0;
            match (dirty, run) {
                (true, None) => run = Some((p, 1)),
                (true, Some((s, c))) if c * PAGE < wire::CHUNK as u64 => run = Some((s, c + 1)),
                (true, Some((s, c))) => {
                    n += send_range(w, i, r, s * PAGE, c * PAGE)?;
                    run = Some((p, 1));
                }
                (false, Some((s, c))) => {
                    n += send_range(w, i, r, s * PAGE, c * PAGE)?;
                    run = None;
                }
                (false, None) => {}
            }
        }
        if let Some((s, c)) = run {
            n += send_range(w, i, r, s * PAGE, c * PAGE)?;
        }
    }
    Ok(n)
}

/// Parses `tcp://HOST:PORT` or `HOST:PORT`.
pub fn parse_addr(to: &str) -> Result<String, RemoteError> {
    let a = to.strip_prefix("tcp://").unwrap_or(to);
    if a.to_socket_addrs()
        .map(|mut i| i.next().is_some())
        .unwrap_or(false)
    {
        Ok(a.to_string())
    } else {
        Err(RemoteError::Address(to.to_string()))
    }
}

/// Sends host VM `vm` to `to`. On success the source VM is stopped and its
/// memory released; on error it keeps running.
pub fn migrate_out(vm: &Arc<HostVm>, to: &str, budget: Duration) -> Result<Report, RemoteError> {
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
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(WireError::Io)?;
    let mut w =
        BufWriter::with_capacity(wire::CHUNK + 64, stream.try_clone().map_err(WireError::Io)?);
    let mut r = BufReader::new(stream);

    let regions: Vec<Region> = vm.mem.read().unwrap().regions.clone();
    let nested: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    let hello = Hello {
        line: vm.spec.line.clone(),
        generation: vm.spec.generation,
        ram: vm.spec.ram,
        pool: vm.spec.pool,
        vcpus: vm.spec.vcpus,
        slice_us: vm.spec.slice_us,
        age_leak_pages: vm.spec.age_leak_pages,
        regions: regions
            .iter()
            .map(|r| {
                let (k, g) = kind_name(&r.kind);
                RegionDesc {
                    kind: k.into(),
                    guest: g,
                    gpa: r.gpa,
                    size: r.size,
                }
            })
            .collect(),
    };
    let json = |v: &dyn erased::Ser| v.to_json();
    wire::write_frame(&mut w, Kind::Hello, json(&hello).as_bytes())?;

    // Live phase: everything keeps running.
    vm.start_l0_write_log();
    set_l1_logging(vm, true);
    for n in &nested {
        let _ = n.lock().unwrap().set_dirty_logging(true);
    }
    let result = (|| -> Result<(Report, Vec<kvm_ioctls::VcpuFd>), RemoteError> {
        let mut stats = PrecopyStats::default();
        let t = Instant::now();
        stats.live_bytes += send_all(&mut w, &regions)?;
        w.flush().map_err(WireError::Io)?;
        stats.rounds = 1;
        let mut bps = stats.live_bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
        loop {
            let d = collect_dirty(vm, &regions, &nested);
            let pending = d.count();
            let est = Duration::from_secs_f64(pending as f64 * PAGE as f64 / bps.max(1.0));
            stats.rounds += 1;
            if est <= budget || stats.rounds >= crate::migration::copy::MAX_ROUNDS {
                stats.live_bytes += send_dirty(&mut w, &regions, &d)?;
                stats.remaining_pages = pending;
                stats.converged = est <= budget;
                break;
            }
            let t = Instant::now();
            let n = send_dirty(&mut w, &regions, &d)?;
            w.flush().map_err(WireError::Io)?;
            stats.live_bytes += n;
            if n > 0 {
                bps = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
        }
        // Stop-and-copy.
        let t_pause = Instant::now();
        let fds = vm.pause_vcpus();
        // Everything from here to the verdict resumes the source on failure.
        let res = (|| -> Result<FinalPhase, RemoteError> {
            let mut sent = stats.live_bytes;
            let d = collect_dirty(vm, &regions, &nested);
            sent += send_dirty(&mut w, &regions, &d)?;
            // What L0 itself wrote is not in any dirty log: the boot-info and
            // hypercall pages (answers, control word) and pattern fills.
            let mut l0 = vec![(0u64, layout::PML4_ADDR)];
            l0.extend(vm.take_l0_writes());
            for (gpa, len) in l0 {
                if let Some(i) = regions.iter().position(|r| r.contains(gpa, len)) {
                    sent += send_range(&mut w, i, &regions[i], gpa - regions[i].gpa, len)?;
                }
            }
            let mut l1_vcpus = Vec::new();
            for fd in &fds {
                let st = arch::get_state(fd).map_err(|e| RemoteError::Local(e.to_string()))?;
                l1_vcpus.push(vmbeam_abi::as_bytes(&st).to_vec());
            }
            let mut descs = Vec::new();
            let mut before = Vec::new();
            for n in &nested {
                let mut n = n.lock().unwrap();
                let states = n
                    .save_vcpus()
                    .map_err(|s| RemoteError::Local(format!("{}: {s:?}", n.name)))?;
                before.push((n.name.clone(), n.mem_bytes(), n.checksum_all()));
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
            wire::write_frame(&mut w, Kind::State, json(&state).as_bytes())?;
            wire::write_frame(&mut w, Kind::Done, &[])?;
            w.flush().map_err(WireError::Io)?;
            let (k, p) = wire::read_frame(&mut r)?;
            let verdict = match k {
                Kind::Result => serde_json::from_slice::<Verdict>(&p)
                    .map_err(|e| RemoteError::Refused(format!("unreadable verdict: {e}")))?,
                Kind::Abort => {
                    return Err(RemoteError::Refused(
                        String::from_utf8_lossy(&p).into_owned(),
                    ))
                }
                other => return Err(RemoteError::Refused(format!("unexpected {other:?} frame"))),
            };
            Ok((sent, before, verdict))
        })();
        let (sent, before, verdict) = match res {
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
                let _ = wire::write_frame(&mut w, Kind::Abort, b"checksum mismatch");
                let _ = w.flush();
                let e =
                    RemoteError::Refused(format!("memory of {name} differs on the destination"));
                return Err(resume_err(vm, fds, e));
            }
        }
        let committed = wire::write_frame(&mut w, Kind::Commit, &[])
            .and_then(|_| w.flush().map_err(WireError::Io));
        if let Err(e) = committed {
            return Err(resume_err(vm, fds, e.into()));
        }
        let downtime = t_pause.elapsed();
        // The destination runs the guests now: release this copy.
        let allocated = vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes();
        vm.set_status(VmStatus::Retired);
        drop(vm.drop_nested());
        drop(vm.drop_memory());
        let _ = vm.ram_file.punch_hole(0, vm.ram_file.size);
        let _ = vm.pool_file.punch_hole(0, vm.pool_file.size);
        let released = allocated
            .saturating_sub(vm.ram_file.allocated_bytes() + vm.pool_file.allocated_bytes());
        let report = Report {
            mode: "tcp".into(),
            vm: vm.spec.line.clone(),
            from_generation: vm.spec.generation,
            to_generation: vm.spec.generation,
            boot_ms: 0.0,
            handover_ms: downtime.as_secs_f64() * 1000.0,
            total_ms: t0.elapsed().as_secs_f64() * 1000.0,
            bytes_copied: sent,
            channel_bytes: 0,
            released_bytes: released,
            host_rss_before: rss_before,
            host_rss_after: rss_bytes(),
            cpu_ms: cpu_ms() - cpu0,
            verify_ms: 0.0,
            guests: before
                .iter()
                .map(|(name, mem, sum)| GuestReport {
                    name: name.clone(),
                    mem_bytes: *mem,
                    downtime_us: downtime.as_micros() as u64,
                    checksum_before: Some(format!("{sum:016x}")),
                    checksum_after: verdict
                        .checksums
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, c)| format!("{c:016x}")),
                    running_after: true,
                    moves: 0,
                })
                .collect(),
            precopy: Some(stats),
            rescued: None,
        };
        Ok((report, fds))
    })();
    match result {
        Ok((report, fds)) => {
            drop(fds);
            Ok(report)
        }
        Err(e) => {
            vm.take_l0_writes();
            set_l1_logging(vm, false);
            for n in &nested {
                let _ = n.lock().unwrap().set_dirty_logging(false);
            }
            if vm.status() != VmStatus::Running && !vm.vcpus_alive() {
                // Paused by an early error path that could not resume.
                vm.set_status(VmStatus::Running);
            }
            Err(e)
        }
    }
}

fn resume_err(vm: &Arc<HostVm>, fds: Vec<kvm_ioctls::VcpuFd>, e: RemoteError) -> RemoteError {
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
    if h.line.is_empty()
        || h.line.len() > 32
        || !h
            .line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad(format!("bad host VM name '{}'", h.line));
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

fn state_from(bytes: &[u8]) -> Result<VcpuState, RemoteError> {
    if bytes.len() != std::mem::size_of::<VcpuState>() {
        return Err(RemoteError::Invalid("vCPU state of the wrong size".into()));
    }
    vmbeam_abi::from_bytes(bytes).ok_or_else(|| RemoteError::Invalid("vCPU state".into()))
}

/// Receives one host VM from `stream`, validates everything, answers with a
/// verdict, and on commit starts it. Returns the running host VM.
pub fn receive(
    shared: &Arc<Shared>,
    stream: TcpStream,
    taken: &dyn Fn(&str) -> bool,
) -> Result<Arc<HostVm>, RemoteError> {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(WireError::Io)?;
    let mut w = BufWriter::new(stream.try_clone().map_err(WireError::Io)?);
    let mut r = BufReader::with_capacity(wire::CHUNK + 64, stream);
    let refuse = |w: &mut BufWriter<TcpStream>, e: RemoteError| {
        let v = Verdict {
            ok: false,
            error: Some(e.to_string()),
            checksums: Vec::new(),
        };
        let _ = wire::write_frame(
            w,
            Kind::Result,
            serde_json::to_string(&v).unwrap_or_default().as_bytes(),
        );
        let _ = w.flush();
        e
    };
    let (k, p) = wire::read_frame(&mut r)?;
    if k != Kind::Hello {
        return Err(refuse(
            &mut w,
            RemoteError::Invalid(format!("expected HELLO, got {k:?}")),
        ));
    }
    let hello: Hello = serde_json::from_slice(&p)
        .map_err(|e| refuse(&mut w, RemoteError::Invalid(format!("HELLO: {e}"))))?;
    check_hello(&hello).map_err(|e| refuse(&mut w, e))?;
    if taken(&hello.line) {
        return Err(refuse(
            &mut w,
            RemoteError::Invalid(format!("a host VM named {} already runs here", hello.line)),
        ));
    }
    let local = |e: String| RemoteError::Local(e);
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
        let f = MemFile::new(&format!("{}-in-{}", hello.line, d.kind), d.size)
            .map_err(|e| refuse(&mut w, local(e.to_string())))?;
        regions.push(
            Region::map(&f, 0, d.size, d.gpa, kind, i as u32)
                .map_err(|e| refuse(&mut w, local(e.to_string())))?,
        );
    }
    let state: StateMsg = loop {
        let (k, p) = wire::read_frame(&mut r)?;
        match k {
            Kind::Pages => {
                let (ri, off, data) = wire::parse_pages(&p)?;
                let reg = regions.get(ri as usize).ok_or_else(|| {
                    refuse(
                        &mut w,
                        RemoteError::Invalid(format!("PAGES for region {ri}")),
                    )
                })?;
                let end = off.checked_add(data.len() as u64);
                if end.is_none_or(|e| e > reg.size) {
                    return Err(refuse(
                        &mut w,
                        RemoteError::Invalid(format!("PAGES beyond region {ri}")),
                    ));
                }
                // SAFETY: the range was checked to lie inside the fresh mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        reg.map.as_ptr().add(off as usize),
                        data.len(),
                    )
                };
            }
            Kind::State => {
                break serde_json::from_slice(&p)
                    .map_err(|e| refuse(&mut w, RemoteError::Invalid(format!("STATE: {e}"))))?;
            }
            Kind::Abort => {
                return Err(RemoteError::Refused(
                    String::from_utf8_lossy(&p).into_owned(),
                ))
            }
            other => {
                return Err(refuse(
                    &mut w,
                    RemoteError::Invalid(format!("unexpected {other:?} frame")),
                ))
            }
        }
    };
    let (k, _) = wire::read_frame(&mut r)?;
    if k != Kind::Done {
        return Err(refuse(
            &mut w,
            RemoteError::Invalid(format!("expected DONE, got {k:?}")),
        ));
    }
    let built = build(shared, &hello, regions, &state);
    let (vm, fds) = match built {
        Ok(x) => x,
        Err(e) => return Err(refuse(&mut w, e)),
    };
    let mut sums = Vec::new();
    for n in vm.nested.lock().unwrap().vms.values() {
        let n = n.lock().unwrap();
        sums.push((n.name.clone(), n.checksum_all()));
    }
    let v = Verdict {
        ok: true,
        error: None,
        checksums: sums,
    };
    wire::write_frame(
        &mut w,
        Kind::Result,
        serde_json::to_string(&v).unwrap_or_default().as_bytes(),
    )?;
    w.flush().map_err(WireError::Io)?;
    let (k, p) = wire::read_frame(&mut r)?;
    if k != Kind::Commit {
        drop(vm.drop_nested());
        drop(vm.drop_memory());
        return Err(RemoteError::Refused(format!(
            "sender did not commit ({k:?}: {})",
            String::from_utf8_lossy(&p)
        )));
    }
    vm.start_vcpus(fds);
    Ok(vm)
}

fn build(
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
        crate::host::hostvm::set_slot_flags(&vm, r, 0)
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
            || crate::nesting::hypercall::check_name(&vmbeam_abi::name_to_bytes(&d.name))
                != Ok(d.name.as_str())
        {
            return Err(RemoteError::Invalid(format!(
                "bad nested guest name {:?}",
                d.name
            )));
        }
        let rec = shared.claim_record(&d.name).map_err(|e| match e {
            crate::shared::ClaimError::Taken(_) => {
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
