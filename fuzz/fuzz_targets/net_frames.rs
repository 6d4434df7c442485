//! Ethernet frames from a hostile guest into the user-mode network (classifier, DHCP, TCP/IP
//! stack, relays).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz_harness::net_frames(data));
