//! vmbeam's host VMM (L0): host VMs on /dev/kvm running guest hypervisors,
//! the paravirtual nested engine that runs their nested guests, and
//! zero-copy rejuvenation that moves those guests to a fresh guest
//! hypervisor without copying their memory.
//!
//! Data path, top-down: [`vmm::Vmm`] (lines of host VMs, control) →
//! [`host::hostvm::HostVm`] (a KVM VM, its vCPU loop) → [`nesting::hypercall`] (the ops L1
//! asks for) → [`nesting::nested`] (KVM VMs backing nested guests) and
//! [`migration::handover`]/[`migration::rejuvenate`] (moving guests between guest hypervisors).
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod control;
pub mod devices;
pub mod host;
pub mod migration;
pub mod nesting;
pub mod progress;
pub mod shared;
pub mod sync;
pub mod vmm;
