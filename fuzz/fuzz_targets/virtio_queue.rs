//! A hostile driver's descriptors, ring indexes and register writes against virtio-blk and
//! virtio-rng on the MMIO transport.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz_harness::virtio_queue(data));
