//! The host VM that runs one guest hypervisor (L1): its memory, its vCPU
//! threads and their loop, and the host-wide services every host VM uses.
//! The vCPU loop does not serve hypercalls itself: it is handed a
//! [`dispatch::Hypercalls`] when the host-wide services are built, so this
//! layer imports neither the hypercall handlers nor migration.

pub mod dispatch;
pub mod hostvm;
pub mod shared;
