//! vmbeam's host VMM (L0): host VMs on /dev/kvm running guest hypervisors,
//! the paravirtual nested engine that runs their nested guests, and
//! zero-copy rejuvenation that moves those guests to a fresh guest
//! hypervisor without copying their memory.
//!
//! The modules are layers, bottom up; a layer uses only itself and the
//! layers below it (`tests/layers.rs` enforces it, docs/architecture.md
//! draws it): [`base`] → [`host`] → [`devices`] → [`nesting`] → [`l1`]
//! (a host VM and its vCPU loop) → [`migration`] → [`hypercall`] (the ops
//! L1 asks for, handed to the vCPU loop as a dispatcher) → [`control`] →
//! [`vmm`] and [`config`] → [`api`].
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod base;
pub mod config;
pub mod control;
pub mod devices;
pub mod host;
pub mod hypercall;
pub mod l1;
pub mod migration;
pub mod nesting;
pub mod vmm;
