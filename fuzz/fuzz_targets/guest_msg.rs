//! Fuzz target `guest_msg`: a GUEST handover message as the successor reads it from the channel, through GuestMsg::validate.
//! The harness is `vmbeam_fuzz::guest_msg` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbeam_fuzz::guest_msg(data));
