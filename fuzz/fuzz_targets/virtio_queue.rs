//! Fuzz target `virtio_queue`: a virtio-blk device programmed and fed by a hostile driver (queue setup, descriptor chains, requests).
//! The harness is `vmbeam_fuzz::virtio_queue` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::virtio_queue(data));
