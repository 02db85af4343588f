//! Fuzz target `wire_frame`: a host-to-host migration stream as `vmbeam run --listen` reads it from the network, through the frame decoder.
//! The harness is `vmbeam_fuzz::wire_frame` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::wire_frame(data));
