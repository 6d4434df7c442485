//! Extracts the uncompressed ELF `vmlinux` from a `bzImage`, like the kernel's
//! `scripts/extract-vmlinux`, but locating the payload through the boot header.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Compression magics and the system tool (and its package) that decompresses each; LZ4's legacy
/// format (Debian's 6.1 kernels) is decompressed here, so the `lz4` tool is not needed.
const FORMATS: &[(&[u8], &[&str], &str)] = &[
    (b"\x1f\x8b\x08", &["gzip", "-dc"], "gzip"),
    (
        b"\xfd7zXZ\x00",
        &["xz", "-dc", "--single-stream"],
        "xz-utils",
    ),
    (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"], "zstd"),
    (LZ4_LEGACY, &[], ""),
    (b"BZh", &["bzip2", "-dc"], "bzip2"),
    (b"\x5d\x00\x00", &["xz", "--format=lzma", "-dc"], "xz-utils"),
];

const LZ4_LEGACY: &[u8] = b"\x02\x21\x4c\x18";

/// Writes the ELF kernel inside the bzImage `vmlinuz` to `dest`.
///
/// The compressed payload is found with the boot header's `payload_offset`/`payload_length`
/// (boot protocol 2.08+); where that fails, the first offset holding a known compression magic
/// whose decompression yields an ELF file is used, as `extract-vmlinux` does.
pub fn extract(vmlinuz: &Path, dest: &Path) -> Result<(), String> {
    let image = fs::read(vmlinuz).map_err(|e| format!("read {}: {e}", vmlinuz.display()))?;
    if let Some((payload, size)) = payload(&image) {
        if decompress(payload, dest)? && fs::metadata(dest).map(|m| m.len()).ok() == Some(size) {
            return Ok(());
        }
    }
    for at in 0..image.len() {
        if FORMATS
            .iter()
            .any(|(magic, _, _)| image[at..].starts_with(magic))
            && decompress(&image[at..], dest)?
        {
            return Ok(());
        }
    }
    let _ = fs::remove_file(dest);
    Err(format!(
        "found no compressed ELF kernel in {}",
        vmlinuz.display()
    ))
}

/// The compressed payload (without its trailing 4-byte size) and the uncompressed size.
fn payload(image: &[u8]) -> Option<(&[u8], u64)> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    if image.get(0x202..0x206) != Some(b"HdrS") || u32_at(0x206)? & 0xffff < 0x208 {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let data = image.get(start..start.checked_add(len)?)?;
    let size = u32::from_le_bytes(data.get(len.checked_sub(4)?..)?.try_into().ok()?);
    Some((&data[..len - 4], size as u64))
}

/// Feeds `data` to the tool matching its magic; true when `dest` then holds an ELF file.
fn decompress(data: &[u8], dest: &Path) -> Result<bool, String> {
    let Some((_, argv, package)) = FORMATS.iter().find(|(magic, _, _)| data.starts_with(magic))
    else {
        return Ok(false);
    };
    if argv.is_empty() {
        let Some(elf) = unlz4_legacy(data) else {
            return Ok(false);
        };
        fs::write(dest, &elf).map_err(|e| format!("write {}: {e}", dest.display()))?;
        return Ok(elf.starts_with(b"\x7fELF"));
    }
    let out = File::create(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    let mut child = match Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "the kernel needs `{}` to decompress (apt-get install {package})",
                argv[0]
            ))
        }
        Err(e) => return Err(format!("cannot run {}: {e}", argv[0])),
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    // The tool may stop reading at the end of its stream; trailing bytes are not an error.
    let _ = stdin.write_all(data);
    drop(stdin);
    let _ = child.wait();
    let mut magic = [0u8; 4];
    let is_elf = File::open(dest)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"\x7fELF";
    Ok(is_elf)
}

/// Decodes an LZ4 legacy frame (magic, then blocks of independently compressed data, each after
/// its 4-byte size) up to its end or the first thing that is not a block; `None` if malformed.
fn unlz4_legacy(data: &[u8]) -> Option<Vec<u8>> {
    const MAX_BLOCK: usize = 8 << 20;
    let mut rest = data.strip_prefix(LZ4_LEGACY)?;
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let size = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        if size == 0 || size > MAX_BLOCK + MAX_BLOCK / 255 + 16 || size > rest.len() - 4 {
            break; // the trailing uncompressed size, or a new frame
        }
        unlz4_block(&rest[4..4 + size], &mut out)?;
        rest = &rest[4 + size..];
    }
    Some(out)
}

/// Appends the decoded LZ4 block `src` to `out`.
fn unlz4_block(src: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    let mut i = 0;
    let length = |i: &mut usize, mut n: usize| -> Option<usize> {
        if n == 15 {
            loop {
                let b = *src.get(*i)?;
                *i += 1;
                n += b as usize;
                if b != 255 {
                    break;
                }
            }
        }
        Some(n)
    };
    loop {
        let token = *src.get(i)?;
        i += 1;
        let literals = length(&mut i, (token >> 4) as usize)?;
        out.extend_from_slice(src.get(i..i.checked_add(literals)?)?);
        i += literals;
        if i == src.len() {
            return Some(());
        }
        let offset = u16::from_le_bytes([*src.get(i)?, *src.get(i + 1)?]) as usize;
        i += 2;
        let len = length(&mut i, (token & 15) as usize)? + 4;
        if offset == 0 || offset > out.len() - start {
            return None;
        }
        for _ in 0..len {
            out.push(out[out.len() - offset]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_frame() {
        // "abc", then a 9-byte match at offset 3, then "!"; then the kernel's trailing size.
        let mut frame = LZ4_LEGACY.to_vec();
        frame.extend([
            8, 0, 0, 0, 0x35, b'a', b'b', b'c', 3, 0, 0x10, b'!', 13, 0, 0, 0,
        ]);
        assert_eq!(unlz4_legacy(&frame).unwrap(), b"abcabcabcabc!");
        frame[12] = 9; // offset 9 reaches before the block
        assert!(unlz4_legacy(&frame).is_none());
        assert!(unlz4_legacy(&frame[..10]).unwrap().is_empty());
    }
}
