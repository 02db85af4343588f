//! Post-copy host-to-host migration: the host VM runs on the destination
//! right after its vCPU and nested state arrived, and its memory follows.
//!
//! Pre-copy pauses a VM for as long as its last dirty pages take and sends
//! every page before the switch, so its time-to-resume grows with memory
//! size. Post-copy pauses the source, sends only the vCPU and nested
//! state (no page is read or scanned), and the destination resumes at once on empty memory registered with userfaultfd
//! (migration/uffd.rs). A page a vCPU, a nested VM (whose KVM slots map
//! the same memory) or L0 touches before it arrived faults; the fault
//! thread asks the source for it (FETCH), and the source answers that page
//! ahead of the background stream, which then continues from there (the
//! neighbours are likely next) until every page was sent once.
//!
//! Failure semantics (docs/migration.md): the source keeps its stopped copy
//! with all its memory until the destination confirms the last page
//! (RECEIVED), and never runs it again once COMMIT went out. Every wait has
//! a deadline: a requested page that does not come within [`FETCH_WAIT`], a
//! stream silent for [`SILENCE`], or data unacknowledged for
//! [`USER_TIMEOUT`] ends the migration with an error on both sides; the
//! destination then stops the VM (its guests cannot run without the missing
//! pages) and says why in its status and log.
//!
//! Both sides compute, independently, a digest of the whole memory image
//! as of the pause: the source over its frozen pages as it sends them, the
//! destination over the bytes it placed; they must agree.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::base::progress::Progress;
use crate::host::memory::Region;
use crate::l1::hostvm::{HostVm, VmStatus};
use crate::migration::copy::PAGE;
use crate::migration::link::{Link, LinkSender};
use crate::migration::remote::{self, RemoteError, Started, StateMsg, Verdict};
use crate::migration::uffd::{self, Uffd};
use crate::migration::wire::{self, Kind, WireError};

/// A page the destination asked for must arrive within this.
pub const FETCH_WAIT: Duration = Duration::from_secs(20);
/// The destination gives up on a stream silent for this long.
pub const SILENCE: Duration = Duration::from_secs(20);
/// Either side's kernel aborts a connection whose sent data stays
/// unacknowledged this long.
pub const USER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the source waits for RECEIVED after PUSHDONE.
const CONFIRM_WAIT: Duration = Duration::from_secs(60);
/// Bytes of one background-stream frame at most: small, so that a demand
/// answer waits behind little.
const PUSH_CHUNK: u64 = 64 << 10;

/// What the source says when it sent every page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PushDone {
    /// Digest of the whole image (hex), see [`mix`].
    pub digest: String,
}

pub use crate::migration::report::{PostcopyReport, Received};

/// The destination's outcome of a post-copy, once the last page arrived
/// or the migration failed after the switch.
#[derive(Debug, Clone)]
pub struct PostcopyOutcome {
    /// Host VM line.
    pub vm: String,
    /// What arrived, or why the VM was stopped.
    pub result: Result<Received, String>,
}

/// Contribution of page `page` of region `region` with content hash `h`
/// to an image digest (the digest is the wrapping sum over all pages, so
/// order does not matter).
pub fn mix(region: u32, page: u64, h: u64) -> u64 {
    let mut z = h ^ ((region as u64) << 44) ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of one page's bytes.
pub fn page_hash(p: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(p)
}

fn zero_hash() -> u64 {
    static Z: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *Z.get_or_init(|| page_hash(&[0u8; PAGE as usize]))
}

/// A bitmap of the pages of one region.
#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(pages: u64) -> Bits {
        Bits(vec![0; pages.div_ceil(64) as usize])
    }
    fn get(&self, p: u64) -> bool {
        self.0[(p / 64) as usize] & (1 << (p % 64)) != 0
    }
    fn set(&mut self, p: u64) {
        self.0[(p / 64) as usize] |= 1 << (p % 64);
    }
    /// First clear bit at or after `from`, below `end`.
    fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        let mut p = from;
        while p < end {
            let w = self.0[(p / 64) as usize] | ((1u64 << (p % 64)) - 1);
            if w != u64::MAX {
                let q = (p / 64) * 64 + (!w).trailing_zeros() as u64;
                return (q < end).then_some(q);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }
}

fn is_zero(p: &[u8]) -> bool {
    p.iter().fold(0u8, |a, &b| a | b) == 0
}

fn slice(r: &Region, off: u64, len: u64) -> &[u8] {
    // SAFETY: callers pass ranges inside the region's live mapping.
    unsafe { std::slice::from_raw_parts(r.map.as_ptr().add(off as usize), len as usize) }
}

// ---------------------------------------------------------------- source

/// The source's view: which pages went out, and the digest so far.
struct Source<'r> {
    regions: &'r [Region],
    sent: Vec<Bits>,
    holes: Vec<Bits>,
    unsent: u64,
    digest: u64,
    rep: PostcopyReport,
}

impl<'r> Source<'r> {
    /// Nothing is read or scanned here: the pause must not grow with
    /// memory size. Holes are found by the stream as it goes.
    fn new(regions: &'r [Region]) -> Source<'r> {
        Source {
            regions,
            sent: regions.iter().map(|r| Bits::new(r.size / PAGE)).collect(),
            holes: regions.iter().map(|r| Bits::new(r.size / PAGE)).collect(),
            unsent: regions.iter().map(|r| r.size / PAGE).sum(),
            digest: 0,
            rep: PostcopyReport::default(),
        }
    }

    /// If page `p` of region `ri` is a hole of its memfd (never written:
    /// zero, and reading it would allocate it), the page where data
    /// starts again (or the region's end). One SEEK_DATA: constant time on
    /// data, and a hole costs its own length once.
    fn hole_end(&self, ri: usize, p: u64) -> Option<u64> {
        let r = &self.regions[ri];
        let end = r.size / PAGE;
        // SAFETY: lseek on the memfd only reports an offset.
        let d = unsafe {
            libc::lseek(
                r.file.file.as_raw_fd(),
                (r.offset + p * PAGE) as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if d < 0 {
            // ENXIO: no data after this offset; any other error: treat the
            // page as data (it is read, which is always correct).
            let e = std::io::Error::last_os_error().raw_os_error();
            return (e == Some(libc::ENXIO)).then_some(end);
        }
        let d = (d as u64).saturating_sub(r.offset) / PAGE;
        (d > p).then_some(d.min(end))
    }

    /// Sends the hole `[p, end)` of region `ri` as one ZERO marker and
    /// marks its pages not sent yet.
    fn send_hole(&mut self, link: &Link, ri: usize, p: u64, end: u64) -> Result<(), RemoteError> {
        for q in p..end {
            if !self.sent[ri].get(q) {
                self.sent[ri].set(q);
                self.holes[ri].set(q);
                self.unsent -= 1;
                self.rep.zero_pages += 1;
            }
        }
        link.send(
            Kind::Zero,
            &wire::range_payload(ri as u32, p * PAGE, (end - p) * PAGE),
        )?;
        Ok(())
    }

    /// Sends pages `[first, first+n)` of region `ri` (all unsent): zero
    /// pages as ZERO, the rest as `kind` frames; marks and digests them.
    fn send_run(
        &mut self,
        link: &Link,
        ri: usize,
        first: u64,
        n: u64,
        kind: Kind,
    ) -> Result<(), RemoteError> {
        let r = &self.regions[ri];
        let mut run: Option<(bool, u64)> = None;
        let flush = |run: (bool, u64), upto: u64| -> Result<(), RemoteError> {
            let (zero, st) = run;
            if zero {
                link.send(
                    Kind::Zero,
                    &wire::range_payload(ri as u32, st * PAGE, (upto - st) * PAGE),
                )?;
            } else {
                let data = slice(r, st * PAGE, (upto - st) * PAGE);
                let mut f = wire::encode_pages(ri as u32, st * PAGE, data);
                if kind != Kind::Pages {
                    // Same payload as PAGES, another kind: rewrite the
                    // header's kind field (the CRC covers the payload only).
                    f[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
                }
                link.send_encoded(f)?;
            }
            Ok(())
        };
        for p in first..first + n {
            let bytes = slice(r, p * PAGE, PAGE);
            let zero = is_zero(bytes);
            let h = if zero { zero_hash() } else { page_hash(bytes) };
            self.digest = self.digest.wrapping_add(mix(ri as u32, p, h));
            self.sent[ri].set(p);
            self.unsent -= 1;
            if zero {
                self.rep.zero_pages += 1;
            } else if kind == Kind::Fetched {
                self.rep.fetched_pages += 1;
            } else {
                self.rep.pushed_pages += 1;
            }
            match run {
                Some((z, _)) if z == zero => {}
                Some(r0) => {
                    flush(r0, p)?;
                    run = Some((zero, p));
                }
                None => run = Some((zero, p)),
            }
        }
        if let Some(r0) = run {
            flush(r0, first + n)?;
        }
        Ok(())
    }

    /// Answers one FETCH; returns where the stream should go on.
    fn answer(&mut self, link: &Link, p: &[u8]) -> Result<(usize, u64), RemoteError> {
        let (ri, off, len) = wire::parse_range(p)?;
        let bad =
            || RemoteError::Refused(format!("FETCH of {len} bytes at {off:#x} of region {ri}"));
        let r = self.regions.get(ri as usize).ok_or_else(bad)?;
        if !off.is_multiple_of(PAGE) || len != PAGE || off >= r.size {
            return Err(bad());
        }
        let (ri, page) = (ri as usize, off / PAGE);
        self.rep.fetch_requests += 1;
        if self.sent[ri].get(page) {
            // Already on its way (or a hole): send it again; the
            // destination places a page once.
            if self.holes[ri].get(page) || is_zero(slice(r, off, PAGE)) {
                link.send(Kind::Zero, &wire::range_payload(ri as u32, off, PAGE))?;
            } else {
                let mut f = wire::encode_pages(ri as u32, off, slice(r, off, PAGE));
                f[6..8].copy_from_slice(&(Kind::Fetched as u16).to_le_bytes());
                link.send_encoded(f)?;
            }
        } else if self.hole_end(ri, page).is_some() {
            self.send_hole(link, ri, page, page + 1)?;
        } else {
            self.send_run(link, ri, page, 1, Kind::Fetched)?;
        }
        Ok((ri, page + 1))
    }

    /// The background stream, with FETCH answered first, until every page
    /// was sent and the destination confirmed the last one.
    fn serve(&mut self, link: &Link, progress: Option<&Progress>) -> Result<Received, RemoteError> {
        let mut cur = (0usize, 0u64);
        let handle = |me: &mut Self,
                      f: Result<crate::migration::link::Frame, WireError>,
                      cur: &mut (usize, u64)|
         -> Result<Option<Received>, RemoteError> {
            match f {
                Ok((Kind::Fetch, p)) => {
                    *cur = me.answer(link, &p)?;
                    Ok(None)
                }
                Ok((Kind::Received, p)) => {
                    let r: Received = serde_json::from_slice(&p)
                        .map_err(|e| RemoteError::Refused(format!("unreadable RECEIVED: {e}")))?;
                    Ok(Some(r))
                }
                Ok((Kind::Refuse, p)) => Err(RemoteError::Refused(wire::parse_reason(&p))),
                Ok((k, _)) => Err(RemoteError::Refused(format!(
                    "unexpected {k:?} frame from the destination"
                ))),
                Err(e) => Err(RemoteError::Wire(e)),
            }
        };
        while self.unsent > 0 {
            while let Some(f) = link.try_recv() {
                if let Some(r) = handle(self, f, &mut cur)? {
                    return Err(RemoteError::Refused(format!(
                        "the destination ended the post-copy early: {}",
                        r.error.unwrap_or_else(|| "no reason given".into())
                    )));
                }
            }
            if progress.is_some_and(|p| p.is_cancelled()) {
                // After the switch there is nothing to cancel back to.
                tracing::warn!("cancel ignored: the VM already runs on the destination");
            }
            // Next unsent page from the cursor, wrapping around.
            let mut found = None;
            for k in 0..=self.regions.len() {
                let ri = (cur.0 + k) % self.regions.len();
                let from = if k == 0 { cur.1 } else { 0 };
                let end = self.regions[ri].size / PAGE;
                if let Some(p) = self.sent[ri].next_clear(from, end) {
                    found = Some((ri, p));
                    break;
                }
            }
            let Some((ri, p)) = found else { break };
            if let Some(he) = self.hole_end(ri, p) {
                self.send_hole(link, ri, p, he)?;
                if let Some(pr) = progress {
                    pr.add_bytes((he - p) * PAGE);
                }
                cur = (ri, he);
                continue;
            }
            let end = self.regions[ri].size / PAGE;
            let mut n = 1;
            while n < PUSH_CHUNK / PAGE
                && p + n < end
                && !self.sent[ri].get(p + n)
                && self.hole_end(ri, p + n).is_none()
            {
                n += 1;
            }
            self.send_run(link, ri, p, n, Kind::Pages)?;
            if let Some(pr) = progress {
                pr.add_bytes(n * PAGE);
            }
            cur = (ri, p + n);
        }
        for (i, h) in self.holes.iter().enumerate() {
            for p in 0..self.regions[i].size / PAGE {
                if h.get(p) {
                    self.digest = self.digest.wrapping_add(mix(i as u32, p, zero_hash()));
                }
            }
        }
        self.rep.source_digest = format!("{:016x}", self.digest);
        let done = PushDone {
            digest: self.rep.source_digest.clone(),
        };
        link.send(
            Kind::PushDone,
            serde_json::to_string(&done).unwrap_or_default().as_bytes(),
        )?;
        let deadline = Instant::now() + CONFIRM_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = link.recv(left);
            if let Some(r) = handle(self, f, &mut cur)? {
                return Ok(r);
            }
        }
    }
}

/// What the source side of a post-copy yields after the switch.
pub(crate) struct Switched {
    /// Pause → the destination's STARTED arrived.
    pub downtime: Duration,
    /// When STARTED arrived.
    pub resumed: Instant,
    /// Pause → COMMIT queued.
    pub commit_sent: Duration,
    /// The destination's STARTED.
    pub started: Started,
    /// The destination's verdict before COMMIT (build time).
    pub verdict: Verdict,
    /// What crossed, and what the destination said at the end.
    pub report: PostcopyReport,
}

/// The source side after HELLO: pause, send the state and the holes, COMMIT
/// once the destination has built the VM, then serve every page. Before
/// COMMIT is queued any error resumes the source; after it, the source copy
/// is kept stopped (never resumed, never released) unless the destination
/// confirms the last page.
pub(crate) fn send(
    vm: &Arc<HostVm>,
    link: &Link,
    addr: &str,
    progress: Option<&Progress>,
) -> Result<Switched, RemoteError> {
    let regions: Vec<Region> = vm.mem.read().unwrap().regions.clone();
    let nested: Vec<_> = vm.nested.lock().unwrap().vms.values().cloned().collect();
    link.set_user_timeout(USER_TIMEOUT)?;
    let t_pause = Instant::now();
    let fds = vm.pause_vcpus();
    let before = (|| -> Result<(Source<'_>, Verdict), RemoteError> {
        let src = Source::new(&regions);
        let (state, _) = remote::save_state(&fds, &nested)?;
        link.send(
            Kind::State,
            serde_json::to_string(&state).unwrap_or_default().as_bytes(),
        )?;
        link.send(Kind::Done, &[])?;
        link.flush(remote::ANSWER)?;
        let verdict = match link.recv(remote::ANSWER) {
            Ok((Kind::Result, p)) => serde_json::from_slice::<Verdict>(&p)
                .map_err(|e| RemoteError::Refused(format!("unreadable verdict: {e}")))?,
            other => return Err(remote::peer_said(other)),
        };
        if !verdict.ok {
            return Err(RemoteError::Refused(
                verdict.error.unwrap_or_else(|| "no reason given".into()),
            ));
        }
        Ok((src, verdict))
    })();
    let (mut src, verdict) = match before {
        Ok(v) => v,
        Err(e) => return Err(remote::resume_err(vm, fds, e)),
    };
    if let Err(e) = link.send(Kind::Commit, &[]) {
        return Err(remote::resume_err(vm, fds, e.into()));
    }
    drop(fds);
    let commit_sent = t_pause.elapsed();
    let keep_stopped = |why: String| {
        vm.set_status(VmStatus::Failed(format!(
            "post-copy to {addr}: {why}; this copy is kept stopped with all its memory"
        )));
    };
    // The destination's vCPUs run (and may fault) before its STARTED is
    // sent, so FETCH can come first: each is answered at once, and the
    // wait for STARTED goes on (within the same deadline).
    let started_by = Instant::now() + remote::ANSWER;
    let started = loop {
        match link.recv(started_by.saturating_duration_since(Instant::now())) {
            Ok((Kind::Started, p)) => {
                break serde_json::from_slice::<Started>(&p)
                    .map_err(|e| RemoteError::Refused(format!("unreadable STARTED: {e}")))
            }
            Ok((Kind::Fetch, p)) => {
                if let Err(e) = src.answer(link, &p) {
                    break Err(e);
                }
            }
            other => break Err(remote::peer_said(other)),
        }
    };
    let downtime = t_pause.elapsed();
    let resumed = Instant::now();
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            keep_stopped(format!(
                "COMMIT was sent but the destination did not confirm ({e})"
            ));
            return Err(RemoteError::Unconfirmed(e.to_string()));
        }
    };
    if let Some(p) = progress {
        p.set_phase(crate::base::progress::Phase::Committing);
    }
    let t_push = Instant::now();
    let received = match src.serve(link, progress) {
        Ok(r) => r,
        Err(e) => {
            keep_stopped(format!("the link broke after the switch ({e})"));
            return Err(RemoteError::PostcopyBroken(e.to_string()));
        }
    };
    let mut report = src.rep;
    report.push_ms = t_push.elapsed().as_secs_f64() * 1000.0;
    if !received.ok || received.digest != report.source_digest {
        let why = received.error.clone().unwrap_or_else(|| {
            format!(
                "memory differs: the destination placed digest {}, this side sent {}",
                received.digest, report.source_digest
            )
        });
        keep_stopped(format!("the destination did not take every page ({why})"));
        return Err(RemoteError::PostcopyBroken(why));
    }
    report.destination = received;
    Ok(Switched {
        downtime,
        resumed,
        commit_sent,
        started,
        verdict,
        report,
    })
}

// ----------------------------------------------------------- destination

/// Per-region page states on the destination.
struct Dest {
    /// Host address and size of each region's registered mapping.
    spans: Vec<(u64, u64)>,
    /// Placed (by UFFDIO_COPY).
    present: Vec<Bits>,
    /// The source said zero (a hole or a zero page); not placed until
    /// touched.
    zero: Vec<Bits>,
    /// Requested from the source: when the first fault came.
    waiting: HashMap<(usize, u64), Instant>,
    digest: u64,
    stats: Received,
    wait_sum_us: f64,
    /// Set by the fault thread when a fetch missed its deadline.
    error: Option<String>,
}

impl Dest {
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|&(a, l)| addr >= a && addr < a + l)
            .map(|i| (i, (addr - self.spans[i].0) / PAGE))
    }

    fn waited(&mut self, ri: usize, p: u64) {
        if let Some(t) = self.waiting.remove(&(ri, p)) {
            let us = t.elapsed().as_secs_f64() * 1e6;
            self.wait_sum_us += us;
            self.stats.fault_wait_max_us = self.stats.fault_wait_max_us.max(us);
        }
    }

    fn place_zero(&mut self, u: &Uffd, ri: usize, p: u64) -> Result<(), String> {
        static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
        u.copy(self.spans[ri].0 + p * PAGE, &ZERO)
            .map_err(|e| e.to_string())?;
        self.present[ri].set(p);
        self.digest = self.digest.wrapping_add(mix(ri as u32, p, zero_hash()));
        self.stats.zero_placed_pages += 1;
        self.waited(ri, p);
        Ok(())
    }

    /// Places the pages of a PAGES/FETCHED payload that are not here yet.
    fn place(&mut self, u: &Uffd, p: &[u8], fetched: bool) -> Result<(), String> {
        let (ri, off, data) = wire::parse_pages(p).map_err(|e| e.to_string())?;
        let ri = ri as usize;
        let (base, size) = *self
            .spans
            .get(ri)
            .ok_or_else(|| format!("pages for region {ri}"))?;
        let len = data.len() as u64;
        if !off.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || off.checked_add(len).is_none_or(|e| e > size)
        {
            return Err(format!("pages at {off:#x}+{len:#x} of region {ri}"));
        }
        let first = off / PAGE;
        let n = len / PAGE;
        let mut i = 0;
        while i < n {
            if self.present[ri].get(first + i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < n && !self.present[ri].get(first + j) {
                if self.zero[ri].get(first + j) {
                    return Err(format!(
                        "page {:#x} of region {ri} was sent as zero and as data",
                        (first + j) * PAGE
                    ));
                }
                j += 1;
            }
            let bytes = &data[(i * PAGE) as usize..(j * PAGE) as usize];
            u.copy(base + (first + i) * PAGE, bytes)
                .map_err(|e| e.to_string())?;
            for k in i..j {
                let pg = first + k;
                let b = &data[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
                self.digest = self.digest.wrapping_add(mix(ri as u32, pg, page_hash(b)));
                self.present[ri].set(pg);
                if fetched {
                    self.stats.fetched_pages += 1;
                } else {
                    self.stats.pushed_pages += 1;
                }
                self.waited(ri, pg);
            }
            i = j;
        }
        Ok(())
    }

    /// A ZERO marker: pages somebody waits for are placed now, the others
    /// only noted (placing them would allocate memory for nothing).
    fn zero_range(&mut self, u: &Uffd, p: &[u8]) -> Result<(), String> {
        let (ri, off, len) = wire::parse_range(p).map_err(|e| e.to_string())?;
        let ri = ri as usize;
        let (_, size) = *self
            .spans
            .get(ri)
            .ok_or_else(|| format!("zero pages for region {ri}"))?;
        if !off.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || off.checked_add(len).is_none_or(|e| e > size)
        {
            return Err(format!("zero pages at {off:#x}+{len:#x} of region {ri}"));
        }
        for pg in off / PAGE..(off + len) / PAGE {
            if self.present[ri].get(pg) {
                continue;
            }
            self.zero[ri].set(pg);
            if self.waiting.contains_key(&(ri, pg)) {
                self.place_zero(u, ri, pg)?;
            }
        }
        Ok(())
    }

    /// After PUSHDONE: every page must be here or known zero.
    fn finish(&mut self) -> Result<(), String> {
        let mut missing = 0u64;
        for ri in 0..self.spans.len() {
            for pg in 0..self.spans[ri].1 / PAGE {
                if self.present[ri].get(pg) {
                    continue;
                }
                if self.zero[ri].get(pg) {
                    self.digest = self.digest.wrapping_add(mix(ri as u32, pg, zero_hash()));
                } else {
                    missing += 1;
                }
            }
        }
        if missing > 0 {
            return Err(format!(
                "the source said it sent everything but {missing} pages never came"
            ));
        }
        Ok(())
    }
}

/// The destination side, post-copy: registers the fresh memory with
/// userfaultfd, reads the holes and the state, builds the VM, and on COMMIT
/// starts it at once; a pager thread then places arriving pages while a
/// fault thread asks for the ones guests wait on. Returns the running VM;
/// the rest is reported through `outcome` and the log.
pub(crate) fn receive(
    shared: &Arc<crate::l1::hostvm::Shared>,
    link: Link,
    hello: &remote::Hello,
    regions: Vec<Region>,
    outcome: Option<mpsc::Sender<PostcopyOutcome>>,
) -> Result<Arc<HostVm>, RemoteError> {
    let refuse = remote::refuse_on;
    let local = |e: String| RemoteError::Local(format!("post-copy needs userfaultfd: {e}"));
    let u = Arc::new(Uffd::open().map_err(|e| refuse(&link, local(e.to_string())))?);
    for r in &regions {
        u.register(r.map.as_ptr() as u64, r.size, uffd::MODE_MISSING)
            .map_err(|e| refuse(&link, local(e.to_string())))?;
    }
    link.set_user_timeout(USER_TIMEOUT)?;
    let mut dest = Dest {
        spans: regions
            .iter()
            .map(|r| (r.map.as_ptr() as u64, r.size))
            .collect(),
        present: regions.iter().map(|r| Bits::new(r.size / PAGE)).collect(),
        zero: regions.iter().map(|r| Bits::new(r.size / PAGE)).collect(),
        waiting: HashMap::new(),
        digest: 0,
        stats: Received::default(),
        wait_sum_us: 0.0,
        error: None,
    };
    let state: StateMsg = loop {
        let (k, p) = link.recv(remote::FRAME_WAIT)?;
        match k {
            Kind::Zero => dest
                .zero_range(&u, &p)
                .map_err(|e| refuse(&link, RemoteError::Invalid(e)))?,
            Kind::State => {
                break serde_json::from_slice(&p)
                    .map_err(|e| refuse(&link, RemoteError::Invalid(format!("STATE: {e}"))))?
            }
            Kind::Abort => return Err(RemoteError::Refused(wire::parse_reason(&p))),
            other => {
                return Err(refuse(
                    &link,
                    RemoteError::Invalid(format!("unexpected {other:?} frame before the switch")),
                ))
            }
        }
    };
    let (k, _) = link.recv(remote::FRAME_WAIT)?;
    if k != Kind::Done {
        return Err(refuse(
            &link,
            RemoteError::Invalid(format!("expected DONE, got {k:?}")),
        ));
    }
    let t_done = Instant::now();
    let (vm, fds) = remote::build(shared, hello, regions, &state).map_err(|e| refuse(&link, e))?;
    let v = Verdict {
        ok: true,
        error: None,
        checksums: Vec::new(),
        build_ms: t_done.elapsed().as_secs_f64() * 1000.0,
        verify_ms: 0.0,
    };
    let answered = link
        .send(
            Kind::Result,
            serde_json::to_string(&v).unwrap_or_default().as_bytes(),
        )
        .and_then(|_| link.flush(remote::FRAME_WAIT))
        .and_then(|_| link.recv(remote::FRAME_WAIT));
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
    let dest = Arc::new(Mutex::new(dest));
    let done = Arc::new(AtomicBool::new(false));
    let sender = link.sender()?;
    vm.start_vcpus(fds);
    let t_start = Instant::now();
    let started = Started {
        running: vm.status() == VmStatus::Running && vm.vcpus_alive(),
        guests: remote::started_guests(&vm),
        resume_ms: Some(t_done.elapsed().as_secs_f64() * 1000.0),
    };
    let _ = link.send(
        Kind::Started,
        serde_json::to_string(&started)
            .unwrap_or_default()
            .as_bytes(),
    );
    // Only now may FETCH frames follow (the source reads STARTED first);
    // faults taken meanwhile wait in the userfaultfd queue.
    let faults = {
        let (u, dest, done) = (u.clone(), dest.clone(), done.clone());
        std::thread::Builder::new()
            .name(format!("vmbeam-{}-faults", hello.line))
            .spawn(move || fault_loop(&u, &dest, &done, &sender))
            .map_err(|e| RemoteError::Local(e.to_string()))?
    };
    let vm2 = vm.clone();
    let line = hello.line.clone();
    std::thread::Builder::new()
        .name(format!("vmbeam-{}-pager", hello.line))
        .spawn(move || {
            let res = pager(&link, &u, &dest, t_start);
            done.store(true, Ordering::SeqCst);
            let _ = faults.join();
            let res = match res {
                Ok(r) => {
                    tracing::info!(
                        "post-copy of {line} complete: {} pages pushed, {} fetched on demand, \
                         {} faults",
                        r.pushed_pages,
                        r.fetched_pages,
                        r.faults
                    );
                    Ok(r)
                }
                Err(e) => {
                    fail(&vm2, &u, &dest, &line, &e);
                    let _ = link.send(Kind::Refuse, wire::refuse_payload(&e));
                    let _ = link.flush(Duration::from_secs(2));
                    Err(e)
                }
            };
            if let Some(tx) = outcome {
                let _ = tx.send(PostcopyOutcome {
                    vm: line,
                    result: res,
                });
            }
        })
        .map_err(|e| RemoteError::Local(e.to_string()))?;
    Ok(vm)
}

/// Answers faults: a page known zero is placed at once, any other is asked
/// for (once); a request older than [`FETCH_WAIT`] ends the migration.
fn fault_loop(u: &Uffd, dest: &Mutex<Dest>, done: &AtomicBool, tx: &LinkSender) {
    while !done.load(Ordering::SeqCst) {
        let f = match u.next_fault(Duration::from_millis(50)) {
            Ok(f) => f,
            Err(e) => {
                dest.lock().unwrap().error = Some(format!("reading page faults: {e}"));
                tx.shutdown();
                return;
            }
        };
        let mut d = dest.lock().unwrap();
        if d.error.is_some() {
            continue;
        }
        if let Some(f) = f {
            let Some((ri, pg)) = d.locate(f.addr) else {
                continue;
            };
            if d.present[ri].get(pg) {
                let _ = u.wake(d.spans[ri].0 + pg * PAGE, PAGE);
            } else if d.zero[ri].get(pg) {
                if let Err(e) = d.place_zero(u, ri, pg) {
                    d.error = Some(e);
                    tx.shutdown();
                }
            } else if let std::collections::hash_map::Entry::Vacant(v) = d.waiting.entry((ri, pg)) {
                v.insert(Instant::now());
                d.stats.faults += 1;
                drop(d);
                if let Err(e) = tx.send(
                    Kind::Fetch,
                    &wire::range_payload(ri as u32, pg * PAGE, PAGE),
                ) {
                    dest.lock().unwrap().error = Some(format!("asking for a page: {e}"));
                    tx.shutdown();
                }
            }
            continue;
        }
        let late = d
            .waiting
            .iter()
            .find(|(_, t)| t.elapsed() > FETCH_WAIT)
            .map(|(&(ri, pg), _)| (ri, pg));
        if let Some((ri, pg)) = late {
            d.error = Some(format!(
                "page {:#x} of region {ri} was asked for and did not come within {FETCH_WAIT:?}",
                pg * PAGE
            ));
            tx.shutdown();
        }
    }
}

/// Places arriving pages until PUSHDONE, then checks, compares digests,
/// unregisters the memory and confirms.
fn pager(link: &Link, u: &Uffd, dest: &Mutex<Dest>, t_start: Instant) -> Result<Received, String> {
    let why = |e: String| match dest.lock().unwrap().error.clone() {
        Some(x) => x,
        None => e,
    };
    let done: PushDone = loop {
        let (k, p) = link
            .recv(SILENCE)
            .map_err(|e| why(format!("the stream from the source broke: {e}")))?;
        let mut d = dest.lock().unwrap();
        if let Some(e) = d.error.clone() {
            return Err(e);
        }
        match k {
            Kind::Pages => d.place(u, &p, false)?,
            Kind::Fetched => d.place(u, &p, true)?,
            Kind::Zero => d.zero_range(u, &p)?,
            Kind::PushDone => {
                break serde_json::from_slice(&p)
                    .map_err(|e| format!("unreadable PUSHDONE: {e}"))?
            }
            Kind::Refuse | Kind::Abort => {
                return Err(format!("the source gave up: {}", wire::parse_reason(&p)))
            }
            other => return Err(format!("unexpected {other:?} frame during post-copy")),
        }
    };
    let mut d = dest.lock().unwrap();
    d.finish()?;
    let digest = format!("{:016x}", d.digest);
    if digest != done.digest {
        return Err(format!(
            "memory differs: placed digest {digest}, the source sent {}",
            done.digest
        ));
    }
    for &(a, l) in &d.spans {
        u.unregister(a, l).map_err(|e| e.to_string())?;
    }
    let mut r = d.stats.clone();
    r.ok = true;
    r.digest = digest;
    let placed = (r.fetched_pages + r.zero_placed_pages).max(1);
    r.fault_wait_mean_us = if r.faults > 0 {
        d.wait_sum_us / placed.min(r.faults) as f64
    } else {
        0.0
    };
    r.complete_ms = t_start.elapsed().as_secs_f64() * 1000.0;
    drop(d);
    link.send(
        Kind::Received,
        serde_json::to_string(&r).unwrap_or_default().as_bytes(),
    )
    .and_then(|_| link.flush(Duration::from_secs(5)))
    .map_err(|e| format!("confirming the last page: {e}"))?;
    Ok(r)
}

/// The migration failed after the switch: the VM cannot run without the
/// pages that did not come. Its vCPUs are stopped (a signal ends a vCPU's
/// wait for a page inside KVM_RUN), then the memory is unregistered so
/// that nothing else stays blocked on a page, and the VM is marked failed.
fn fail(vm: &Arc<HostVm>, u: &Uffd, dest: &Mutex<Dest>, line: &str, why: &str) {
    dest.lock()
        .unwrap()
        .error
        .get_or_insert_with(|| why.to_string());
    let msg = format!(
        "post-copy of {line} failed after the switch: {why}; the VM was stopped (its guests \
         cannot run without the pages that did not arrive; the source keeps its stopped copy)"
    );
    tracing::error!("{msg}");
    vm.set_status(VmStatus::Failed(msg.clone()));
    // Threads blocked on a page in L0 code (not in KVM_RUN) are released
    // by unregistering, which lets them read zeros: the VM never runs a
    // guest instruction again, so nothing acts on them.
    let stopper = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.stop_vcpus())
    };
    let t = Instant::now();
    while !stopper.is_finished() && t.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(5));
    }
    for &(a, l) in &dest.lock().unwrap().spans {
        let _ = u.unregister(a, l);
    }
    let _ = stopper.join();
    vm.set_status(VmStatus::Failed(msg));
    drop(vm.drop_nested());
    drop(vm.drop_memory());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_find_the_next_clear_page() {
        let mut b = Bits::new(200);
        for p in 0..130 {
            b.set(p);
        }
        assert_eq!(b.next_clear(0, 200), Some(130));
        b.set(130);
        assert_eq!(b.next_clear(5, 200), Some(131));
        for p in 131..200 {
            b.set(p);
        }
        assert_eq!(b.next_clear(0, 200), None);
        assert_eq!(Bits::new(10).next_clear(9, 10), Some(9));
    }

    #[test]
    fn the_digest_does_not_depend_on_order_but_on_place_and_content() {
        let a = mix(0, 1, 5).wrapping_add(mix(0, 2, 6));
        let b = mix(0, 2, 6).wrapping_add(mix(0, 1, 5));
        assert_eq!(a, b);
        assert_ne!(a, mix(0, 1, 6).wrapping_add(mix(0, 2, 5)));
        assert_ne!(mix(0, 1, 5), mix(1, 1, 5));
    }
}
