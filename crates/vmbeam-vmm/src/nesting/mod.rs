//! Paravirtual nesting: the KVM VMs that L0 creates to back a guest
//! hypervisor's nested guests, and the table of them each host VM keeps.
//! The hypercalls that drive them are served a layer up, in `hypercall`.

pub mod nested;
pub mod table;
