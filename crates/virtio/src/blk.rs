//! virtio-blk: a raw image file as the guest's disk (virtio 1.2, section 5.2).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, VolatileSlice};

use crate::device::{next_chain, Activation, DeviceError, SingleQueue, VirtioDevice};
use crate::Mem;

/// Bytes in a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest piece of a request moved between guest memory and the file at once.
const CHUNK: usize = 128 << 10;
/// Size of `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
const HEADER_LEN: usize = 16;

/// What a flush request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Writes go through the host page cache; a guest flush waits for `fdatasync`.
    #[default]
    Writeback,
    /// Flushes are ignored: fast, and data is lost if the host crashes.
    Unsafe,
}

/// How to attach one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read.
    pub readonly: bool,
    /// Flush behaviour.
    pub cache: CacheMode,
    /// The serial number the guest reads with GET_ID (at most 20 bytes).
    pub serial: String,
}

/// Errors attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("disk {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The image may not be written by this user; `readonly=on` would work.
    #[error("disk {0}: the file is read-only; add readonly=on to attach it read-only")]
    ReadOnlyFile(PathBuf),
    /// Another process holds the image's lock.
    #[error("disk {0}: locked by another process (another tandem using it?)")]
    Locked(PathBuf),
    /// The image is not a regular file or block device.
    #[error("disk {0}: not a regular file")]
    NotAFile(PathBuf),
}

/// Where a disk's sectors live: a file, or memory in tests and fuzzing.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Puts written data on stable storage.
    fn flush(&mut self) -> io::Result<()>;
    /// Reads at `offset` straight into `bufs` (guest memory), in order.
    fn read_into(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let mut tmp = Vec::new();
        let mut off = offset;
        for b in bufs {
            tmp.resize(b.len(), 0);
            self.read_at(&mut tmp, off)?;
            b.copy_from(&tmp);
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` (guest memory), in order, at `offset`.
    fn write_from(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let mut tmp = Vec::new();
        let mut off = offset;
        for b in bufs {
            tmp.resize(b.len(), 0);
            b.copy_to(&mut tmp[..]);
            self.write_at(&tmp, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
}

/// A raw image file, locked against other writers for as long as it is open.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    /// Opens and locks `path`: shared for read-only disks, exclusive otherwise.
    pub fn open(path: &Path, readonly: bool) -> Result<FileDisk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
                    if !readonly && File::open(path).is_ok() =>
                {
                    BlockError::ReadOnlyFile(path.into())
                }
                _ => BlockError::Open {
                    path: path.into(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile(path.into()));
        }
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        } | libc::LOCK_NB;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::Locked(path.into())
            } else {
                BlockError::Open {
                    path: path.into(),
                    source: err,
                }
            });
        }
        Ok(FileDisk {
            file,
            size: meta.len(),
        })
    }
}

impl DiskBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn read_into(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.vectored(bufs, offset, false)
    }
    fn write_from(&mut self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.vectored(bufs, offset, true)
    }
}

impl FileDisk {
    /// preadv/pwritev between the file and guest memory, without a bounce buffer.
    fn vectored(&self, bufs: &[VolatileSlice<'_>], offset: u64, write: bool) -> io::Result<()> {
        // Empty buffers (a guest may add them anywhere) carry nothing; left in, a trailing one
        // would make the last preadv/pwritev return 0 and look like the end of the file.
        let bufs: Vec<&VolatileSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).collect();
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&bufs)
            .map(|(g, b)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let (mut idx, mut off) = (0, offset);
        while idx < iov.len() {
            let rest = &iov[idx..];
            let cnt = rest.len().min(1024) as libc::c_int;
            let at = off as libc::off_t;
            // SAFETY: every iovec points into guest memory that `guards` keep mapped, for its
            // length; the file descriptor is ours.
            let n = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), rest.as_ptr(), cnt, at)
                } else {
                    libc::preadv(self.file.as_raw_fd(), rest.as_ptr(), cnt, at)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut n = n as usize;
            off += n as u64;
            while n > 0 && idx < iov.len() {
                if n >= iov[idx].iov_len {
                    n -= iov[idx].iov_len;
                    idx += 1;
                } else {
                    // SAFETY: advancing within the same iovec's buffer (n < its length).
                    iov[idx].iov_base = unsafe { iov[idx].iov_base.cast::<u8>().add(n).cast() };
                    iov[idx].iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// A disk in memory (tests, fuzzing).
#[derive(Debug, Clone, Default)]
pub struct MemDisk(pub Vec<u8>);

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let dst = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get_mut(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::WriteZero))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The outcome of one request: the status byte and how many bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written into the chain's writable buffers, status byte included.
    pub used_len: u32,
}

/// What a request asks, as parsed from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

impl Header {
    /// Parses the 16-byte `virtio_blk_outhdr`.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            kind: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }
}

/// The byte range a data request covers, if it is inside a disk of `size` bytes.
pub fn data_range(sector: u64, len: usize, size: u64) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len as u64)?;
    ((len as u64).is_multiple_of(SECTOR_SIZE) && end <= size).then_some(start)
}

/// Serves one request chain against `disk`. Errors mean the chain itself is malformed (the
/// device must fail); I/O errors and bad requests become a status byte.
pub fn handle_request<M>(
    mem: &Mem,
    chain: DescriptorChain<M>,
    disk: &mut dyn DiskBackend,
    readonly: bool,
    cache: CacheMode,
    serial: &[u8],
) -> Result<Completion, String>
where
    M: std::ops::Deref<Target = Mem> + Clone,
{
    if let Some(done) = fast_request(mem, &chain, disk, readonly) {
        return Ok(done);
    }
    let mut reader = chain.clone().reader(mem).map_err(|e| e.to_string())?;
    let mut writer = chain.writer(mem).map_err(|e| e.to_string())?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err("request without a status byte".into());
    }
    let mut status_w = writer.split_at(writable - 1).map_err(|e| e.to_string())?;
    let mut hdr = [0u8; HEADER_LEN];
    let (status, written) = if reader.read_exact(&mut hdr).is_err() {
        tracing::warn!("virtio-blk: request header shorter than 16 bytes");
        (VIRTIO_BLK_S_IOERR, 0)
    } else {
        let h = Header::parse(&hdr);
        serve(h, &mut reader, &mut writer, disk, readonly, cache, serial)
    };
    status_w
        .write_all(&[status as u8])
        .map_err(|e| e.to_string())?;
    Ok(Completion {
        status: status as u8,
        used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
    })
}

/// Reads and writes laid out as Linux lays them out (a 16-byte header descriptor, data
/// descriptors all in one direction, a 1-byte status descriptor) go straight between the file
/// and guest memory. Anything else returns `None` for the general path.
fn fast_request<M>(
    mem: &Mem,
    chain: &DescriptorChain<M>,
    disk: &mut dyn DiskBackend,
    readonly: bool,
) -> Option<Completion>
where
    M: std::ops::Deref<Target = Mem> + Clone,
{
    let descs: Vec<_> = chain.clone().collect();
    let [first, data @ .., last] = descs.as_slice() else {
        return None;
    };
    if first.is_write_only()
        || first.len() as usize != HEADER_LEN
        || !last.is_write_only()
        || last.len() != 1
        || data.is_empty()
    {
        return None;
    }
    let hdr: [u8; HEADER_LEN] = mem.read_obj(first.addr()).ok()?;
    let h = Header::parse(&hdr);
    let write = match h.kind {
        VIRTIO_BLK_T_IN => false,
        VIRTIO_BLK_T_OUT => true,
        _ => return None,
    };
    if data.iter().any(|d| d.is_write_only() == write) {
        return None;
    }
    let mut slices = Vec::with_capacity(data.len());
    let mut total: usize = 0;
    for d in data {
        slices.push(mem.get_slice(d.addr(), d.len() as usize).ok()?);
        total = total.checked_add(d.len() as usize)?;
    }
    let (status, written) = match data_range(h.sector, total, disk.size()) {
        _ if write && readonly => (VIRTIO_BLK_S_IOERR, 0),
        None => {
            tracing::warn!(
                sector = h.sector,
                len = total,
                "virtio-blk: request outside the disk"
            );
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Some(off) if write => match disk.write_from(&slices, off) {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => {
                tracing::warn!("virtio-blk: write failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
        Some(off) => match disk.read_into(&slices, off) {
            Ok(()) => (VIRTIO_BLK_S_OK, total),
            Err(e) => {
                tracing::warn!("virtio-blk: read failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
    };
    mem.write_obj(status as u8, last.addr()).ok()?;
    Some(Completion {
        status: status as u8,
        used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
    })
}

fn serve<B: vm_memory::bitmap::BitmapSlice>(
    h: Header,
    reader: &mut virtio_queue::Reader<'_, B>,
    writer: &mut virtio_queue::Writer<'_, B>,
    disk: &mut dyn DiskBackend,
    readonly: bool,
    cache: CacheMode,
    serial: &[u8],
) -> (u32, usize) {
    let mut buf = Vec::new();
    match h.kind {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            let Some(mut off) = data_range(h.sector, len, disk.size()) else {
                tracing::warn!(sector = h.sector, len, "virtio-blk: read outside the disk");
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                buf.resize(n, 0);
                if let Err(e) = disk.read_at(&mut buf, off) {
                    tracing::warn!("virtio-blk: read failed: {e}");
                    return (VIRTIO_BLK_S_IOERR, done);
                }
                if writer.write_all(&buf).is_err() {
                    return (VIRTIO_BLK_S_IOERR, done);
                }
                done += n;
                off += n as u64;
            }
            (VIRTIO_BLK_S_OK, len)
        }
        VIRTIO_BLK_T_OUT => {
            if readonly {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let len = reader.available_bytes();
            let Some(mut off) = data_range(h.sector, len, disk.size()) else {
                tracing::warn!(sector = h.sector, len, "virtio-blk: write outside the disk");
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                buf.resize(n, 0);
                if reader.read_exact(&mut buf).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                if let Err(e) = disk.write_at(&buf, off) {
                    tracing::warn!("virtio-blk: write failed: {e}");
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                done += n;
                off += n as u64;
            }
            (VIRTIO_BLK_S_OK, 0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if cache == CacheMode::Unsafe {
                return (VIRTIO_BLK_S_OK, 0);
            }
            match disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = serial.len().min(id.len());
            id[..n].copy_from_slice(&serial[..n]);
            let n = writer.available_bytes().min(id.len());
            match writer.write_all(&id[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        other => {
            tracing::debug!(kind = other, "virtio-blk: unsupported request");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    readonly: bool,
    cache: CacheMode,
    serial: Vec<u8>,
    active: Option<SingleQueue>,
}

impl Block {
    /// Opens the image described by `cfg`.
    pub fn open(cfg: &BlockConfig) -> Result<Block, BlockError> {
        let disk = FileDisk::open(&cfg.path, cfg.readonly)?;
        if disk.size() % SECTOR_SIZE != 0 {
            tracing::warn!(path = %cfg.path.display(), "disk size is not a multiple of 512; the tail is not visible");
        }
        Ok(Block::with_backend(Box::new(disk), cfg))
    }

    /// A device over any backend.
    pub fn with_backend(disk: Box<dyn DiskBackend>, cfg: &BlockConfig) -> Block {
        Block {
            disk,
            readonly: cfg.readonly,
            cache: cfg.cache,
            serial: cfg.serial.as_bytes().to_vec(),
            active: None,
        }
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&(self.disk.size() / SECTOR_SIZE).to_le_bytes());
        // size_max (unused: no VIRTIO_BLK_F_SIZE_MAX), then seg_max.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }

    fn process(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let bad = |e: virtio_queue::Error| DeviceError::bad_queue(0, e);
        loop {
            a.queue.disable_notification(&a.mem).map_err(bad)?;
            while let Some(chain) = next_chain(&mut a.queue, &a.mem, 0)? {
                let head = chain.head_index();
                let done = handle_request(
                    &a.mem,
                    chain,
                    self.disk.as_mut(),
                    self.readonly,
                    self.cache,
                    &self.serial,
                )
                .map_err(|why| DeviceError::bad_queue(0, why))?;
                a.queue.add_used(&a.mem, head, done.used_len).map_err(bad)?;
            }
            if !a.queue.enable_notification(&a.mem).map_err(bad)? {
                break;
            }
        }
        if a.queue.needs_notification(&a.mem).map_err(bad)? {
            a.interrupt.signal_used_queue(0);
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        self.active = Some(SingleQueue::take(a)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_notify(&mut self, _queue: usize) -> Result<(), DeviceError> {
        self.process()
    }
}

/// Copies `config[offset..]` into `data`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
