//! Fuzz target `api_request`: bytes a client sends on the API socket, through the server's HTTP request parser.
//! The harness is `vmbeam_fuzz::api_request` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::api_request(data));
