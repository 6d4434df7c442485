//! Guest port accesses to the legacy platform devices, through exit handling.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz_harness::platform_pio(data));
