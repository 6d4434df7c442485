//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst 4.133): a pure
//! parser of the layout and a reader over a VM's or vCPU's stats descriptor.
//!
//! The descriptor holds a header, an id string, one descriptor per statistic (flags, exponent,
//! number of u64 values, offset into the data block, bucket size, then a NUL-padded name of
//! `name_size` bytes) and the data block. Header and descriptors never change for a given fd:
//! they are parsed once, and each sample reads the data block alone with one `pread`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`, on a VM or a vCPU descriptor.
pub const KVM_GET_STATS_FD: u64 = (0xAE << 8) | 0xce;

/// Size of `struct kvm_stats_header`.
pub const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` before its name.
pub const DESC_SIZE: usize = 16;
/// Bounds on what a stats descriptor may ask tandem to read (KVM's real figures: names of 48
/// bytes, about 50 statistics and a data block of a few hundred bytes).
const MAX_NAME_SIZE: usize = 1024;
const MAX_DESCRIPTORS: usize = 4096;
const MAX_DATA: usize = 1 << 20;

/// What a statistic counts (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Only grows (exits, wakeups).
    Cumulative,
    /// A current value (pages mapped).
    Instant,
    /// A maximum seen so far.
    Peak,
    /// A histogram with linear buckets.
    LinearHist,
    /// A histogram with power-of-two buckets.
    LogHist,
    /// A type this parser does not know (newer kernels).
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & 0xf {
            0 => Self::Cumulative,
            1 => Self::Instant,
            2 => Self::Peak,
            3 => Self::LinearHist,
            4 => Self::LogHist,
            other => Self::Unknown(other),
        }
    }

    /// Whether the values are histogram buckets rather than one number.
    pub fn is_histogram(self) -> bool {
        matches!(self, Self::LinearHist | Self::LogHist)
    }
}

/// One statistic's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Its name (e.g. `exits`, `halt_wakeup`).
    pub name: String,
    /// What it counts.
    pub kind: StatKind,
    /// Number of u64 values (1, or the histogram's buckets).
    pub size: u16,
    /// Byte offset of its values in the data block.
    pub offset: u32,
}

/// Why a stats layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The buffer ends before what the header or a descriptor says is there.
    #[error("KVM stats: {0} truncated")]
    Truncated(&'static str),
    /// A size or offset past tandem's bounds.
    #[error("KVM stats: {0} out of bounds")]
    OutOfBounds(&'static str),
}

/// The header fields tandem uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes of each descriptor's name field.
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// Where the descriptors start.
    pub desc_offset: u32,
    /// Where the data block starts.
    pub data_offset: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl Header {
    /// Parses `struct kvm_stats_header` from the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let field = |at| u32_at(buf, at).ok_or(ParseError::Truncated("header"));
        let h = Header {
            name_size: field(4)?,
            num_desc: field(8)?,
            desc_offset: field(16)?,
            data_offset: field(20)?,
        };
        if h.name_size as usize > MAX_NAME_SIZE {
            return Err(ParseError::OutOfBounds("name size"));
        }
        if h.num_desc as usize > MAX_DESCRIPTORS {
            return Err(ParseError::OutOfBounds("descriptor count"));
        }
        Ok(h)
    }

    /// Bytes of the descriptor block.
    pub fn desc_block_len(&self) -> usize {
        self.num_desc as usize * (DESC_SIZE + self.name_size as usize)
    }
}

/// The parsed layout of one stats descriptor: what to read and how to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Where the data block starts in the file.
    pub data_offset: u64,
    /// Bytes of the data block that the descriptors cover.
    pub data_len: usize,
    /// The statistics.
    pub descriptors: Vec<Descriptor>,
}

impl Layout {
    /// Parses the descriptor block `descs` (read at `header.desc_offset`). Descriptors whose
    /// values lie past tandem's bound are refused; ones with no values are skipped.
    pub fn parse(header: &Header, descs: &[u8]) -> Result<Self, ParseError> {
        let stride = DESC_SIZE + header.name_size as usize;
        if descs.len() < header.desc_block_len() {
            return Err(ParseError::Truncated("descriptor block"));
        }
        let mut descriptors = Vec::with_capacity(header.num_desc as usize);
        let mut data_len = 0usize;
        for i in 0..header.num_desc as usize {
            let d = &descs[i * stride..(i + 1) * stride];
            let (Some(flags), Some(size), Some(offset)) =
                (u32_at(d, 0), u16_at(d, 6), u32_at(d, 8))
            else {
                return Err(ParseError::Truncated("descriptor"));
            };
            if size == 0 {
                continue;
            }
            let end = (offset as usize)
                .checked_add(usize::from(size) * 8)
                .filter(|&e| e <= MAX_DATA)
                .ok_or(ParseError::OutOfBounds("statistic offset"))?;
            data_len = data_len.max(end);
            let raw = &d[DESC_SIZE..];
            let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            descriptors.push(Descriptor {
                name: String::from_utf8_lossy(name).into_owned(),
                kind: StatKind::from_flags(flags),
                size,
                offset,
            });
        }
        Ok(Layout {
            data_offset: header.data_offset.into(),
            data_len,
            descriptors,
        })
    }

    /// The values in `data` (the data block): single-valued statistics as numbers, histograms as
    /// their buckets. A statistic past the end of a short `data` is left out.
    pub fn values(&self, data: &[u8]) -> KvmValues {
        let mut out = KvmValues::default();
        for d in &self.descriptors {
            let start = d.offset as usize;
            let Some(bytes) = data.get(start..start + usize::from(d.size) * 8) else {
                continue;
            };
            let mut vals = bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()));
            if d.kind.is_histogram() || d.size > 1 {
                out.histograms.insert(d.name.clone(), vals.collect());
            } else if let Some(v) = vals.next() {
                out.counters.insert(d.name.clone(), v);
            }
        }
        out
    }
}

/// One sample of a VM's or vCPU's KVM statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmValues {
    /// Single-valued statistics by name.
    pub counters: BTreeMap<String, u64>,
    /// Histograms by name (bucket values).
    pub histograms: BTreeMap<String, Vec<u64>>,
}

/// Why KVM's statistics cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `KVM_GET_STATS_FD` failed (kernels before 5.14 lack it).
    #[error("KVM_GET_STATS_FD failed: {0} (KVM's binary statistics need Linux 5.14 or later)")]
    Unavailable(std::io::Error),
    /// Reading the descriptor failed.
    #[error("reading KVM's statistics: {0}")]
    Io(#[from] std::io::Error),
    /// The layout made no sense.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// A VM's or vCPU's stats descriptor with its parsed layout.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    layout: Layout,
}

/// Reads exactly `len` bytes at `offset` (short only at the end of the file).
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

impl KvmStats {
    /// Opens the statistics of the VM or vCPU behind `fd` (a KVM VM or vCPU descriptor).
    pub fn open(fd: &impl AsRawFd) -> Result<Self, ReadError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if raw < 0 {
            return Err(ReadError::Unavailable(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let header = Header::parse(&read_at(&file, 0, HEADER_SIZE)?)?;
        let descs = read_at(&file, header.desc_offset.into(), header.desc_block_len())?;
        let layout = Layout::parse(&header, &descs)?;
        Ok(Self { file, layout })
    }

    /// Reads the current values (one `pread` of the data block).
    pub fn read(&self) -> Result<KvmValues, ReadError> {
        let data = read_at(&self.file, self.layout.data_offset, self.layout.data_len)?;
        Ok(self.layout.values(&data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as KVM lays it out: header, id, descriptors, data.
    fn synthetic(stats: &[(&str, u32, &[u64])], name_size: usize) -> Vec<u8> {
        let id = b"kvm-1234/vcpu0\0";
        let desc_offset = HEADER_SIZE + id.len();
        let data_offset = desc_offset + stats.len() * (DESC_SIZE + name_size);
        let mut out = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            HEADER_SIZE as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            out.extend(v.to_ne_bytes());
        }
        out.extend(id);
        let mut offset = 0u32;
        for (name, flags, vals) in stats {
            out.extend(flags.to_ne_bytes());
            out.extend(0i16.to_ne_bytes());
            out.extend((vals.len() as u16).to_ne_bytes());
            out.extend(offset.to_ne_bytes());
            out.extend(0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            out.extend(n);
            offset += vals.len() as u32 * 8;
        }
        for (_, _, vals) in stats {
            for v in *vals {
                out.extend(v.to_ne_bytes());
            }
        }
        out
    }

    fn parse_file(f: &[u8]) -> Result<KvmValues, ParseError> {
        let h = Header::parse(f)?;
        let descs = f
            .get(h.desc_offset as usize..)
            .ok_or(ParseError::Truncated("descriptor block"))?;
        let layout = Layout::parse(&h, descs)?;
        let data = f.get(layout.data_offset as usize..).unwrap_or_default();
        Ok(layout.values(data))
    }

    #[test]
    fn counters_and_histograms_are_read_by_name() {
        let f = synthetic(
            &[
                ("exits", 0, &[1234]),
                ("halt_wakeup", 0, &[7]),
                ("guest_mode", 1, &[1]),
                ("halt_wait_hist", 4, &[1, 2, 3, 4]),
            ],
            48,
        );
        let v = parse_file(&f).unwrap();
        assert_eq!(v.counters["exits"], 1234);
        assert_eq!(v.counters["halt_wakeup"], 7);
        assert_eq!(v.counters["guest_mode"], 1);
        assert_eq!(v.histograms["halt_wait_hist"], [1, 2, 3, 4]);
        assert_eq!(v.counters.len(), 3);
    }

    #[test]
    fn a_name_filling_its_field_without_a_nul_is_kept_whole() {
        let f = synthetic(&[("abcdefgh", 0, &[5])], 8);
        assert_eq!(parse_file(&f).unwrap().counters["abcdefgh"], 5);
    }

    #[test]
    fn truncated_headers_and_descriptor_blocks_are_refused() {
        let f = synthetic(&[("exits", 0, &[1]), ("io_exits", 0, &[2])], 48);
        assert_eq!(
            Header::parse(&f[..10]),
            Err(ParseError::Truncated("header"))
        );
        let h = Header::parse(&f).unwrap();
        let descs = &f[h.desc_offset as usize..h.data_offset as usize - 5];
        assert_eq!(
            Layout::parse(&h, descs),
            Err(ParseError::Truncated("descriptor block"))
        );
    }

    #[test]
    fn a_short_data_block_leaves_out_what_it_lacks() {
        let f = synthetic(&[("exits", 0, &[1]), ("io_exits", 0, &[2])], 48);
        let v = parse_file(&f[..f.len() - 3]).unwrap();
        assert_eq!(v.counters.get("exits"), Some(&1));
        assert_eq!(v.counters.get("io_exits"), None);
    }

    #[test]
    fn sizes_past_the_bounds_are_refused() {
        let mut f = synthetic(&[("exits", 0, &[1])], 48);
        f[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(Header::parse(&f), Err(ParseError::OutOfBounds("name size")));
        let mut f = synthetic(&[("exits", 0, &[1])], 48);
        f[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(Header::parse(&f).is_err());
        // A descriptor whose values lie far past the data block.
        let mut f = synthetic(&[("exits", 0, &[1])], 48);
        let at = u32_at(&f, 16).unwrap() as usize + 8;
        f[at..at + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(
            parse_file(&f),
            Err(ParseError::OutOfBounds("statistic offset"))
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random buffers, and every prefix of a valid file.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = parse_file(&buf);
            // Plausible headers with random descriptors.
            let mut f = synthetic(&[("exits", 0, &[1]), ("h", 3, &[1, 2])], 16);
            let n = f.len();
            for (i, b) in buf.iter().enumerate().take(n.saturating_sub(24)) {
                f[24 + (i * 7) % (n - 24)] ^= b;
            }
            let _ = parse_file(&f);
        }
        let f = synthetic(&[("exits", 0, &[1]), ("halt_wait_hist", 4, &[1, 2])], 48);
        for end in 0..f.len() {
            let _ = parse_file(&f[..end]);
        }
    }

    #[test]
    fn the_kvm_of_this_host_answers_when_it_offers_binary_stats() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm here: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        match (KvmStats::open(&vm), KvmStats::open(&vcpu)) {
            (Ok(vm_stats), Ok(vcpu_stats)) => {
                let v = vcpu_stats.read().unwrap();
                assert!(v.counters.contains_key("exits"), "{v:?}");
                assert!(v.counters.contains_key("halt_wakeup"), "{v:?}");
                vm_stats.read().unwrap();
            }
            (Err(ReadError::Unavailable(e)), _) => eprintln!("no binary stats here: {e}"),
            (Err(e), _) | (_, Err(e)) => panic!("{e}"),
        }
    }
}
