//! A hostile driver against an inter-VM channel's ivshmem function: configuration space, BAR0's
//! registers and BAR1's MSI-X table and PBA, with the doorbell interrupt moving between INTx,
//! MSI-X and nothing.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz_harness::ivshmem(data);
});
