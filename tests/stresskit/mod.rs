//! Helpers for the tests that run the stress guest hypervisor
//! (`guests/stress`): a VMM for it, its console, a status call with a
//! deadline, this process's footprint, the events file.
#![allow(dead_code)]

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbeam_vmm::config::VmmConfig;
use vmbeam_vmm::vmm::{HostVmStatus, StartOptions, Status, Vmm};

use crate::common;

/// Console of the stress host VM line "stress", generation 1.
pub const STRESS: &str = "stress/g1";

/// What this process holds now: open descriptors, threads, resident bytes.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub fds: usize,
    pub threads: usize,
    pub rss: u64,
}

pub fn footprint() -> Footprint {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Footprint {
        fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
        threads: field("Threads:") as usize,
        rss: field("VmRSS:") * 1024,
    }
}

pub fn vmm(dir: &Path, vcpus: u32, nested: u32) -> Arc<Vmm> {
    let config = VmmConfig {
        vcpus,
        nested,
        pool: Some(256 << 20),
        ..Default::default()
    };
    let v = Arc::new(common::vmm(dir, config));
    v.set_event_log(
        vmbeam_vmm::control::events::EventLog::open(&dir.join("events.jsonl")).unwrap(),
    );
    v
}

pub fn start_stress(v: &Vmm, flags: u64) {
    v.start_with(
        "stress",
        &StartOptions {
            hypervisor: Some(vmbeam::STRESS_ELF.to_vec()),
            flags,
            nested: Some(0),
        },
    )
    .unwrap();
}

/// Waits for a line of the stress console containing `what`; fails with
/// the console if the host VM fails or a line says UNEXPECTED.
pub fn wait_stress(v: &Vmm, dir: &Path, what: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = common::console(dir, STRESS);
        if let Some(l) = text.lines().find(|l| l.contains("UNEXPECTED")) {
            panic!("L0 broke a rule: {l}\n{text}");
        }
        if let Some(l) = text.lines().find(|l| l.contains(what)) {
            return l.to_string();
        }
        if let Some(f) = v.failure() {
            panic!("a host VM failed: {f}\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no '{what}' in {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `Vmm::status` on another thread, with a deadline: `None` if it did not
/// answer in time.
pub fn status_within(v: &Arc<Vmm>, deadline: Duration) -> (Option<Status>, Duration) {
    let (tx, rx) = mpsc::channel();
    let v = v.clone();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(v.status());
    });
    let s = rx.recv_timeout(deadline).ok();
    (s, t0.elapsed())
}

pub fn events(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn limit_event(dir: &Path, bound: &str) -> bool {
    events(dir)
        .iter()
        .any(|e| e["event"] == "limit" && e["bound"] == bound && e["vm"] == "stress/g1")
}

/// Status of host VM line `name` in `st`.
pub fn line<'a>(st: &'a Status, name: &str) -> &'a HostVmStatus {
    st.host_vms.iter().find(|h| h.name == name).unwrap()
}
