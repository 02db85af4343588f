//! Fuzz target `virtio_net`: a virtio-net device over a stand-in TAP, programmed and fed by a hostile driver (queue setup, receive buffers, transmit chains).
//! The harness is `vmbeam_fuzz::virtio_net` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::virtio_net(data));
