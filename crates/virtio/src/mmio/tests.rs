use vm_memory::{Bytes, GuestAddress};

use crate::blk::{Block, BlockConfig, CacheMode, MemDisk};
use crate::testing::{Driver, DATA_BASE};

const VERSION_1: u64 = 1 << 32;
const ACK_DRIVER_FEATURES: u32 = 1 | 2 | 8;
const NEEDS_RESET: u32 = 64;
const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x1000;
const STATUS: u64 = DATA_BASE + 0x100;

fn disk(readonly: bool) -> Driver {
    let mut img = vec![0u8; 64 * 512];
    for (i, b) in img.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    let cfg = BlockConfig {
        path: "mem".into(),
        readonly,
        cache: CacheMode::Writeback,
        serial: "tandem-test".into(),
    };
    Driver::new(Box::new(Block::with_backend(Box::new(MemDisk(img)), &cfg)))
}

fn running(readonly: bool) -> Driver {
    let mut d = disk(readonly);
    assert_eq!(d.negotiate(VERSION_1), ACK_DRIVER_FEATURES);
    d.setup_queue(0, 16);
    assert_eq!(d.driver_ok(), ACK_DRIVER_FEATURES | 4);
    d
}

fn header(d: &mut Driver, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(d: &Driver) -> u8 {
    d.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn identifies_as_a_modern_virtio_mmio_block_device() {
    let mut d = disk(false);
    assert_eq!(d.read(0x0), 0x7472_6976, "magic");
    assert_eq!(d.read(0x4), 2, "version");
    assert_eq!(d.read(0x8), 2, "device id: block");
    assert_eq!(d.read(0x34), 256);
    d.write(0x30, 1);
    assert_eq!(
        d.read(0x34),
        0,
        "a queue that does not exist has max size 0"
    );
    let f = d.device_features();
    assert_ne!(f & VERSION_1, 0);
    assert_ne!(f & (1 << 9), 0, "flush offered");
    // Capacity in sectors at config offset 0.
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
}

#[test]
fn features_never_offered_are_refused() {
    let mut d = disk(false);
    let s = d.negotiate(VERSION_1 | 1 << 50);
    assert_eq!(s & 8, 0, "FEATURES_OK must stay clear");
    let s = d.negotiate(0);
    assert_eq!(s & 8, 0, "a legacy driver without VERSION_1 is refused");
}

#[test]
fn reads_writes_flushes_and_gets_the_id() {
    let mut d = running(false);
    // Read sector 3.
    header(&mut d, 0, 3);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(d.take_used(0), vec![(0, 513)]);
    assert_eq!(status(&d), 0);
    let mut buf = [0u8; 512];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
    // Write sector 5 with 0xab, read it back.
    d.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    header(&mut d, 1, 5);
    d.submit(
        0,
        &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
    );
    assert_eq!(d.take_used(0), vec![(0, 1)]);
    assert_eq!(status(&d), 0);
    d.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&mut d, 0, 6);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    d.take_used(0);
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|b| *b == 0xab), "sector 6 was written");
    // Flush.
    header(&mut d, 4, 0);
    d.submit(0, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(d.take_used(0), vec![(0, 1)]);
    assert_eq!(status(&d), 0);
    // Get ID.
    header(&mut d, 8, 0);
    d.submit(0, &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(d.take_used(0), vec![(0, 21)]);
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"tandem-test");
    // Unknown request type.
    header(&mut d, 99, 0);
    d.submit(0, &[(HDR, 16, false), (STATUS, 1, true)]);
    d.take_used(0);
    assert_eq!(status(&d), 2, "UNSUPP");
}

#[test]
fn out_of_range_and_readonly_requests_fail_with_ioerr() {
    let mut d = running(true);
    header(&mut d, 0, 63);
    d.submit(
        0,
        &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
    );
    d.take_used(0);
    assert_eq!(status(&d), 1, "read past the end");
    header(&mut d, 0, u64::MAX / 256);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    d.take_used(0);
    assert_eq!(status(&d), 1, "sector overflow");
    header(&mut d, 1, 0);
    d.submit(
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    d.take_used(0);
    assert_eq!(status(&d), 1, "write to a read-only disk");
    assert_eq!(d.read(0x70) & NEEDS_RESET, 0, "the device still works");
}

#[test]
fn a_buffer_outside_guest_memory_fails_the_device_until_reset() {
    let mut d = running(false);
    header(&mut d, 0, 0);
    d.submit(
        0,
        &[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)],
    );
    assert!(d.take_used(0).is_empty());
    assert_ne!(d.read(0x70) & NEEDS_RESET, 0);
    assert_ne!(d.read(0x60) & 2, 0, "config-change interrupt raised");
    // Further notifications are ignored, not served.
    header(&mut d, 0, 1);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert!(d.take_used(0).is_empty());
    // A reset and a new handshake bring it back.
    d.write(0x70, 0);
    assert_eq!(d.read(0x70), 0);
    assert_eq!(d.negotiate(VERSION_1), ACK_DRIVER_FEATURES);
    d.setup_queue(0, 16);
    assert_eq!(d.driver_ok() & NEEDS_RESET, 0);
    header(&mut d, 0, 2);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(d.take_used(0), vec![(0, 513)]);
    assert_eq!(status(&d), 0);
}

#[test]
fn a_descriptor_loop_ends_without_hanging() {
    let mut d = running(false);
    header(&mut d, 0, 0);
    // 0 -> 1 -> 0 -> ...
    d.put_desc(0, 0, HDR, 16, 1, 1);
    d.put_desc(0, 1, DATA, 512, 1 | 2, 0);
    d.offer(0, 0);
    d.notify(0);
    // Either served with an error status or the device failed; it must return.
    let used = d.take_used(0);
    assert!(used.len() <= 1);
}

#[test]
fn an_avail_index_jump_fails_the_device() {
    let mut d = running(false);
    d.set_avail_idx(0, 1000);
    d.notify(0);
    assert!(d.take_used(0).is_empty());
}

#[test]
fn queue_size_changes_after_activation_are_ignored() {
    let mut d = running(false);
    d.write(0x30, 0);
    d.write(0x38, 256);
    header(&mut d, 0, 4);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(d.take_used(0), vec![(0, 513)]);
    assert_eq!(status(&d), 0);
}

#[test]
fn requests_queued_before_driver_ok_are_served_at_activation() {
    let mut d = disk(false);
    d.negotiate(VERSION_1);
    d.setup_queue(0, 16);
    header(&mut d, 0, 7);
    d.submit(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert!(d.take_used(0).is_empty());
    d.driver_ok();
    assert_eq!(d.take_used(0), vec![(0, 513)]);
}

/// A block device on a real file (the zero-copy path), over a 64-sector image.
fn file_disk() -> (Driver, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "tandem-blk-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let img: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, img).unwrap();
    let cfg = BlockConfig {
        path: path.clone(),
        readonly: false,
        cache: CacheMode::Writeback,
        serial: String::new(),
    };
    let disk = crate::blk::FileDisk::open(&path, false).unwrap();
    let mut d = Driver::new(Box::new(Block::with_backend(Box::new(disk), &cfg)));
    assert_eq!(d.negotiate(VERSION_1), ACK_DRIVER_FEATURES);
    d.setup_queue(0, 16);
    d.driver_ok();
    (d, path)
}

#[test]
fn zero_length_descriptors_in_a_chain_do_not_fail_the_request() {
    let (mut d, path) = file_disk();
    const EMPTY: u64 = DATA + 0x800;
    // A read of sector 3 with an empty buffer after the data, on the file-backed path.
    header(&mut d, 0, 3);
    d.submit(
        0,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (EMPTY, 0, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(d.take_used(0), vec![(0, 513)]);
    assert_eq!(status(&d), 0, "read with a trailing empty buffer");
    let mut buf = [0u8; 512];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
    // A write of sector 7 with empty buffers around the data.
    d.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    header(&mut d, 1, 7);
    d.submit(
        0,
        &[
            (HDR, 16, false),
            (EMPTY, 0, false),
            (DATA, 512, false),
            (EMPTY, 0, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(d.take_used(0), vec![(0, 1)]);
    assert_eq!(status(&d), 0, "write with empty buffers");
    let img = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(img[7 * 512..8 * 512].iter().all(|b| *b == 0xcd));
}
