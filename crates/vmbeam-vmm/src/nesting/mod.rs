//! Paravirtual nesting: the hypercalls a guest hypervisor makes and the KVM
//! VMs that L0 creates to back its nested guests.

pub mod hypercall;
pub mod nested;
pub mod table;
