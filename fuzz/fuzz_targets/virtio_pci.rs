//! A hostile driver against the virtio-pci transport: configuration space through the PCI
//! root's ports, BAR0 (MSI-X table included) and the rings, against virtio-blk and virtio-rng.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz_harness::virtio_pci(data));
