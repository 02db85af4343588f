//! How a host VM's memory regions are described in a migration stream
//! (HELLO) and in the image kept for a VM's return: kind, guest, range.

use crate::host::memory::{Region, RegionKind};

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

/// The description of a region as HELLO carries it.
pub fn region_desc(r: &Region) -> RegionDesc {
    let (k, g) = kind_name(&r.kind);
    RegionDesc {
        kind: k.into(),
        guest: g,
        gpa: r.gpa,
        size: r.size,
    }
}

fn kind_name(k: &RegionKind) -> (&'static str, Option<String>) {
    match k {
        RegionKind::Ram => ("ram", None),
        RegionKind::Pool => ("pool", None),
        RegionKind::Channel => ("channel", None),
        RegionKind::Grant { guest } => ("grant", Some(guest.clone())),
    }
}
