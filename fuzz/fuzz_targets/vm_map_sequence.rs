//! Fuzz target `vm_map_sequence`: sequences of VM_MAP / FILL_PATTERN calls against a model guest hypervisor; the isolation rules must hold after each.
//! The harness is `vmbeam_fuzz::vm_map_sequence` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::vm_map_sequence(data));
