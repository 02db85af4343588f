//! A host VM and the machine under it: guest memory (memfds), boot (page
//! tables, ELF loading, workload images), the L1 console, the vCPU threads
//! and the kick that bounds a nested RUN. Nothing here knows about nesting
//! policy or rejuvenation.

pub mod arch;
pub mod bounds;
pub mod console;
pub mod hostvm;
pub mod images;
pub mod kick;
pub mod loader;
pub mod memory;
