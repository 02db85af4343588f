//! Fuzz target `hypercall_page`: one hypercall page as a guest hypervisor leaves it, through the pure argument checks of L0's hypercalls.
//! The harness is `vmbeam_fuzz::hypercall_page` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::hypercall_page(data));
