//! What the vCPU loop hands a hypercall to.
//!
//! A guest hypervisor's hypercall is one port-I/O exit; the vCPU loop of a
//! host VM does not decode it. It calls the [`Hypercalls`] it was handed
//! with the host-wide services: the handlers live in a layer above (they
//! reach into nesting and migration), so the layer that runs vCPUs needs no
//! import of them. The trait is generic over the host VM type so that this
//! file, the host VM and the host-wide services form no cycle.

use crate::host::kick::SliceTimer;

/// What the vCPU loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum HcOutcome {
    /// Resume L1.
    Continue,
    /// L1 handed everything over; end this vCPU thread.
    Retire,
}

/// Result of one op: how to go on, or the status L1 gets back.
pub type HcResult = Result<HcOutcome, vmbeam_abi::hypercall::Status>;

/// Serves the hypercalls of host VMs of type `V`.
pub trait Hypercalls<V: ?Sized>: Send + Sync {
    /// Serves hypercall `op` that vCPU `vcpu` of `vm` just made (its
    /// arguments and answer are on that vCPU's hypercall page). `timer`
    /// bounds a nested RUN made on this thread.
    fn dispatch(&self, vm: &V, vcpu: u32, op: u32, timer: &SliceTimer) -> HcOutcome;
}
