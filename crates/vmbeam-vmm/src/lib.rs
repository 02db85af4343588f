//! vmbeam's host VMM (L0): host VMs on /dev/kvm running guest hypervisors,
//! the paravirtual nested engine that runs their nested guests, and
//! zero-copy rejuvenation that moves those guests to a fresh guest
//! hypervisor without copying their memory.
//!
//! Data path, top-down: [`vmm::Vmm`] (lines of host VMs, control) →
//! [`hostvm::HostVm`] (a KVM VM, its vCPU loop) → [`hypercall`] (the ops L1
//! asks for) → [`nested`] (KVM VMs backing nested guests) and
//! [`handover`]/[`rejuvenate`] (moving guests between guest hypervisors).
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod arch;
pub mod config;
pub mod console;
pub mod copy;
pub mod events;
pub mod handover;
pub mod hostvm;
pub mod hypercall;
pub mod images;
pub mod inspect;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod nested;
pub mod policy;
pub mod rejuvenate;
pub mod remote;
pub mod rescue;
pub mod shared;
pub mod vmm;
pub mod wire;
