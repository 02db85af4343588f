//! The hypercalls a guest hypervisor makes, served: nested VM ops on the
//! nesting layer, device placement, and the handover ops on migration's
//! session. [`handlers::Handlers`] is the dispatcher the vCPU loop of the
//! `l1` layer is handed.

pub mod handlers;
