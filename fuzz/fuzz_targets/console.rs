//! Guest console output into the panic-detecting console writer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz_harness::console(data));
