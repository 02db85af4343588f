//! What a rejuvenation or a host-to-host migration reports: per guest and
//! in total, every field measured on the run it describes. Shared by the
//! orchestration of a local handover and by migration over TCP.

/// Per-guest part of the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuestReport {
    /// Name.
    pub name: String,
    /// RAM bytes.
    pub mem_bytes: u64,
    /// The guest-visible pause: last exit under the aged L1 → first entry
    /// under the successor, nothing subtracted.
    pub downtime_us: u64,
    /// L0 hash of the whole guest memory when paused (hex).
    pub checksum_before: Option<String>,
    /// L0 hash of the whole guest memory before resuming (hex).
    pub checksum_after: Option<String>,
    /// Ran under the successor.
    pub running_after: bool,
    /// Moves so far.
    pub moves: u32,
    /// Virtio devices that moved with the guest.
    #[serde(default)]
    pub devices: u32,
    /// Device requests in flight at the pause (made available by the
    /// driver, not yet served) and frames the devices held: each is served
    /// after the move, exactly once.
    #[serde(default)]
    pub device_in_flight: u64,
}

/// Result of a rejuvenation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Mode.
    pub mode: String,
    /// Host VM line.
    pub vm: String,
    /// Generation retired.
    pub from_generation: u32,
    /// Generation now running.
    pub to_generation: u32,
    /// Successor boot, ms.
    pub boot_ms: f64,
    /// Handover (ask → commit), ms.
    pub handover_ms: f64,
    /// Whole operation, ms.
    pub total_ms: f64,
    /// Bytes of nested memory copied.
    pub bytes_copied: u64,
    /// Bytes the guest hypervisors exchanged on the channel.
    pub channel_bytes: u64,
    /// Host memory returned when the aged VM was released.
    pub released_bytes: u64,
    /// Resident set of L0 before.
    pub host_rss_before: u64,
    /// Resident set of L0 after.
    pub host_rss_after: u64,
    /// CPU time of L0 (all threads, including guest time) during the operation, ms.
    pub cpu_ms: f64,
    /// Time spent hashing for verification, ms (inside the pause in the
    /// channel protocol, outside every pause in a batch).
    pub verify_ms: f64,
    /// Per guest.
    pub guests: Vec<GuestReport>,
    /// Pre-copy rounds (precopy mode only).
    pub precopy: Option<crate::migration::copy::PrecopyStats>,
    /// Guests L0 offered itself because the aged guest hypervisor died
    /// mid-handover (absent when it did not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescued: Option<usize>,
    /// How memory crossed the network (host-to-host migration only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// CPU time of this process (user + system), in ms.
pub fn cpu_ms() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// How the memory crossed (TCP migration reports only). Every field is
/// measured on this run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    /// "precopy" or "postcopy".
    pub mode: String,
    /// The stream was mutual TLS.
    pub tls: bool,
    /// Guest memory sent as page data.
    pub page_bytes: u64,
    /// Guest memory sent as zero-page markers (no data).
    pub zero_bytes: u64,
    /// The destination had kept an image of this VM and it was used.
    pub reuse: bool,
    /// Guest memory not sent because the destination's kept image held
    /// the same page (what reuse saved).
    pub reused_bytes: u64,
    /// Host memory this side keeps after the move for the VM's return.
    pub kept_bytes: u64,
    /// Frame bytes written to the connection (headers, markers, state).
    pub wire_bytes_sent: u64,
    /// Frame bytes the destination sent back.
    pub wire_bytes_received: u64,
    /// Hashing of the nested guests on the source, at pause, ms.
    pub source_verify_ms: f64,
    /// Hashing of the nested guests on the destination, ms.
    pub destination_verify_ms: f64,
    /// Building the VM on the destination, ms.
    pub destination_build_ms: f64,
    /// Pause → COMMIT queued for sending, ms (the downtime ends later,
    /// when the destination's STARTED arrives).
    pub pause_to_commit_ms: f64,
    /// Start of the migration → the destination's STARTED arrived (the VM
    /// runs there), ms. Pre-copy: grows with memory; post-copy: does not.
    pub time_to_resume_ms: f64,
    /// Post-copy: how the pages crossed after the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
    /// Guest memory covered (pages and zero markers) per second of the
    /// whole migration, GB/s.
    pub memory_gbps: f64,
}

/// What the destination says when every page arrived (or why not).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Received {
    /// Every page arrived and the digests agree.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Digest of the image as placed here (hex).
    pub digest: String,
    /// Pages placed from the background stream.
    pub pushed_pages: u64,
    /// Pages placed because a guest (or L0) waited for them.
    pub fetched_pages: u64,
    /// Zero pages placed because something touched them.
    pub zero_placed_pages: u64,
    /// Faults taken on pages that had not arrived.
    pub faults: u64,
    /// Mean time from a fault to its page placed, µs.
    pub fault_wait_mean_us: f64,
    /// Longest such time, µs.
    pub fault_wait_max_us: f64,
    /// From the vCPUs' start here to the last page placed, ms.
    pub complete_ms: f64,
}

/// How the memory of a post-copy migration crossed (in the report's
/// `transfer.postcopy`); every field is measured on this run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PostcopyReport {
    /// Pages first sent because the destination asked (FETCH).
    pub fetched_pages: u64,
    /// FETCH requests answered (a page requested while already on its way
    /// is answered again).
    pub fetch_requests: u64,
    /// Pages first sent by the background stream as data.
    pub pushed_pages: u64,
    /// Pages sent as zero markers (zero pages and holes).
    pub zero_pages: u64,
    /// Destination's vCPUs running → its confirmation of the last page, ms.
    pub push_ms: f64,
    /// Digest of the image the source sent (hex).
    pub source_digest: String,
    /// What the destination measured.
    pub destination: Received,
}
