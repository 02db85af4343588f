//! The status tree the VMM shows (`vmbeam status`, `GET /api/v1/status`,
//! the metrics scrape): host VM lines, their generations and nested guests.
//! Plain data, filled in by the VMM a layer up.

use std::collections::BTreeMap;

/// A guest hypervisor generation that was replaced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RetiredGeneration {
    /// Its generation.
    pub generation: u32,
    /// How long it ran before it was retired, ms.
    pub uptime_ms: u64,
    /// `manual` or `policy`.
    pub reason: String,
    /// The policy's reason in words (policy only).
    #[serde(default)]
    pub detail: Option<String>,
    /// When it was retired, ms since the Unix epoch.
    pub retired_at_ms: u64,
    /// Its last health report (empty if it never reported).
    #[serde(default)]
    pub health: BTreeMap<String, u64>,
}

/// Status of a nested guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NestedStatus {
    /// Name.
    pub name: String,
    /// Handle in its guest hypervisor.
    pub handle: u32,
    /// RAM.
    pub mem_bytes: u64,
    /// created/running/halted/crashed.
    pub state: String,
    /// vCPUs.
    pub vcpus: usize,
    /// RUN calls.
    pub runs: u64,
    /// Exits returned to L1.
    pub exits: u64,
    /// Times moved.
    pub moves: u32,
    /// Console lines so far.
    pub console_lines: u64,
    /// Console bytes dropped by the console's rate limit.
    #[serde(default)]
    pub console_dropped_bytes: u64,
    /// Generation of the guest hypervisor running it.
    pub generation: u32,
    /// Host VM line whose guest hypervisor runs it now.
    #[serde(default)]
    pub host_vm: String,
    /// Its virtio devices with their counters.
    #[serde(default)]
    pub devices: Vec<crate::devices::DeviceStatus>,
}

/// Status of a host VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostVmStatus {
    /// Line name.
    pub name: String,
    /// Generation.
    pub generation: u32,
    /// Status.
    pub status: String,
    /// Uptime.
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM.
    pub ram_bytes: u64,
    /// Pool.
    pub pool_bytes: u64,
    /// Hypercalls served.
    pub hypercalls: u64,
    /// Last health report of L1 (named counters).
    pub health: BTreeMap<String, u64>,
    /// Health reports received from this generation.
    #[serde(default)]
    pub health_reports: u64,
    /// Aging injector: pool pages L1 leaks per nested RUN (0 = off).
    #[serde(default)]
    pub age_leak_pages: u32,
    /// Bytes of the guest hypervisor's own console dropped by its rate limit.
    #[serde(default)]
    pub console_dropped_bytes: u64,
    /// Bounds its guest hypervisor hit, with how often (absent if none).
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// Nested guests.
    pub nested: Vec<NestedStatus>,
    /// Earlier generations of this line, oldest first (at most `vmm::HISTORY_LEN`).
    #[serde(default)]
    pub retired: Vec<RetiredGeneration>,
}

/// The status tree.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// vmbeam version.
    pub version: String,
    /// Rejuvenation policy (`manual`, `free<10%`, `every 30s`, …).
    #[serde(default)]
    pub policy: String,
    /// Host VMs.
    pub host_vms: Vec<HostVmStatus>,
    /// Jobs running now (a rejuvenation or migration started through the API).
    #[serde(default)]
    pub jobs: Vec<crate::control::jobs::JobView>,
}
