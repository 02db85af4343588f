//! The vmbeam command: the guest images embedded at build time and the
//! command-line interface (kept in the library so tests can parse it).

pub mod cli;
pub mod demo;
pub mod follow;
pub mod logging;
pub mod run;

use vmbeam_abi::boot::workload;
use vmbeam_vmm::host::images::Images;
use vmbeam_vmm::host::loader::LoaderError;

/// The bundled guest hypervisor (L1) ELF.
pub const HYPERVISOR_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hypervisor.elf"));
/// The bundled memtouch workload ELF.
pub const MEMTOUCH_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtouch.elf"));
/// The bundled ticker workload ELF.
pub const TICKER_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ticker.elf"));

/// The bundled blkcheck workload ELF (virtio-blk).
pub const BLKCHECK_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkcheck.elf"));

/// The bundled netecho workload ELF (virtio-net).
pub const NETECHO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/netecho.elf"));

/// The `error` sentence of an API error body (or the body itself).
pub fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

/// The embedded images, optionally with another guest hypervisor ELF.
pub fn images(hypervisor: Option<Vec<u8>>) -> Result<Images, LoaderError> {
    let mut i = Images::new(
        hypervisor.unwrap_or_else(|| HYPERVISOR_ELF.to_vec()),
        MEMTOUCH_ELF,
        TICKER_ELF,
    )?;
    i.add_module(workload::BLKCHECK, "blkcheck workload", BLKCHECK_ELF)?;
    i.add_module(workload::NETECHO, "netecho workload", NETECHO_ELF)?;
    Ok(i)
}

/// A deliberately hostile guest hypervisor used by tests: it sends invalid
/// hypercalls and checks that L0 refuses each one.
pub const HOSTILE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.elf"));

/// A test-only guest hypervisor that drives L0 to its bounds from every
/// vCPU (modes in `vmbeam_abi::boot::stress`): name churn, VM_MAP and
/// VM_CREATE races, console floods, never-exiting nested guests, interrupt
/// injection.
pub const STRESS_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stress.elf"));
