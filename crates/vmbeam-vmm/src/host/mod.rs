//! The machine under a host VM: guest memory (memfds), boot (page tables,
//! ELF loading, workload images), the console, the kick that bounds a
//! nested RUN, the per-VM bounds and the rules for names. Nothing here
//! knows about devices, nesting or rejuvenation.

pub mod arch;
pub mod bounds;
pub mod console;
pub mod images;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod names;
