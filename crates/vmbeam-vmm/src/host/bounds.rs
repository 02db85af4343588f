//! The bounds every host VM lives within, and the count of times its guest
//! hypervisor hit each one.
//!
//! A guest hypervisor may be buggy or hostile, so everything it can make L0
//! allocate is bounded per host VM: nested VMs (and so names, records and
//! consoles, one each per nested VM), vCPUs and memory slots per nested VM,
//! and console bytes per second. Hitting a bound is answered with a
//! [`Status`] to that guest hypervisor alone, counted here (shown in
//! `status`) and reported as a `limit` event; it never fails anything else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use vmbeam_abi::hypercall::Status;

/// Most nested VMs one guest hypervisor may have at once.
pub const MAX_NESTED_VMS: usize = vmbeam_abi::boot::MAX_NESTED;
/// Most vCPUs per nested VM.
pub const MAX_NESTED_VCPUS: usize = vmbeam_abi::handover::MAX_NESTED_VCPUS;
/// Most memory slots per nested VM.
pub const MAX_NESTED_SLOTS: usize = vmbeam_abi::handover::MAX_GUEST_RANGES;

const _: () = assert!(MAX_NESTED_VMS >= 64);

/// A bound a guest hypervisor can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// [`MAX_NESTED_VMS`] nested VMs exist (or are being created).
    NestedVms,
    /// [`MAX_NESTED_VCPUS`] vCPUs in one nested VM.
    Vcpus,
    /// [`MAX_NESTED_SLOTS`] slots in one nested VM.
    Slots,
    /// A console line dropped: the console is over its byte rate.
    ConsoleRate,
    /// A console could not be opened (the host is out of file descriptors).
    Consoles,
    /// KVM refused a VM or vCPU (the host is out of memory or descriptors).
    KvmObjects,
}

const ALL: [Bound; 6] = [
    Bound::NestedVms,
    Bound::Vcpus,
    Bound::Slots,
    Bound::ConsoleRate,
    Bound::Consoles,
    Bound::KvmObjects,
];

impl Bound {
    /// Name in events and status.
    pub fn as_str(&self) -> &'static str {
        match self {
            Bound::NestedVms => "nested_vms",
            Bound::Vcpus => "vcpus",
            Bound::Slots => "slots",
            Bound::ConsoleRate => "console_rate",
            Bound::Consoles => "consoles",
            Bound::KvmObjects => "kvm_objects",
        }
    }

    /// What the guest hypervisor is told.
    pub fn status(&self) -> Status {
        match self {
            Bound::NestedVms | Bound::Vcpus | Bound::Slots | Bound::ConsoleRate => Status::TooMany,
            Bound::Consoles | Bound::KvmObjects => Status::NoResources,
        }
    }

    fn index(&self) -> usize {
        ALL.iter().position(|b| b == self).unwrap_or(0)
    }
}

/// How often one host VM hit each bound.
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; 6]);

impl Refusals {
    /// Counts one hit of `b`.
    pub fn count(&self, b: Bound) {
        self.0[b.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Hits of `b` so far.
    pub fn get(&self, b: Bound) -> u64 {
        self.0[b.index()].load(Ordering::Relaxed)
    }

    /// Every bound hit at least once, by name.
    pub fn named(&self) -> BTreeMap<String, u64> {
        ALL.iter()
            .map(|b| (b.as_str().to_string(), self.get(*b)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_name() {
        let r = Refusals::default();
        assert!(r.named().is_empty());
        r.count(Bound::NestedVms);
        r.count(Bound::NestedVms);
        r.count(Bound::ConsoleRate);
        let n = r.named();
        assert_eq!(n.get("nested_vms"), Some(&2));
        assert_eq!(n.get("console_rate"), Some(&1));
        assert_eq!(n.len(), 2);
        assert_eq!(Bound::KvmObjects.status(), Status::NoResources);
    }
}
