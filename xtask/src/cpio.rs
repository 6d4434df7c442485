//! A small writer for "newc" cpio archives, the format the Linux kernel unpacks as an initramfs,
//! plus a helper that gzips an archive through the system's `gzip`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc cpio archive. Paths are archive paths with or without a leading `/`; missing parent
/// directories are added (mode 0755) before each entry, once per archive.
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Writer<W> {
    /// Starts an empty archive on `out`.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its parents) with permission bits `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = self.prepare(path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, S_IFDIR | (perm & 0o7777), (0, 0, 2), (0, 0))?;
        }
        Ok(())
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.prepare(path)?;
        self.entry(
            &path,
            S_IFREG | (perm & 0o7777),
            (data.len() as u64, 0, 1),
            (0, 0),
        )?;
        self.write(data)?;
        self.pad()
    }

    /// Adds a regular file with the contents and permission bits of the host file `src`.
    pub fn file_from(&mut self, path: &str, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let meta = f.metadata()?;
        let path = self.prepare(path)?;
        self.entry(
            &path,
            S_IFREG | (meta.mode() & 0o7777),
            (meta.len(), meta.mtime().max(0) as u64, 1),
            (0, 0),
        )?;
        let copied = io::copy(&mut (&mut f).take(meta.len()), &mut CountingWriter(self))?;
        if copied != meta.len() {
            return Err(io::Error::other(format!(
                "{} shrank while it was read",
                src.display()
            )));
        }
        self.pad()
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.prepare(path)?;
        self.entry(&path, S_IFLNK | 0o777, (target.len() as u64, 0, 1), (0, 0))?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = self.prepare(path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), (0, 0, 1), (major, minor))
    }

    /// Adds the host file or directory tree `src` at `path`: files keep their permission bits,
    /// symbolic links inside a directory stay links, special files are skipped with a note.
    pub fn tree_from(&mut self, path: &str, src: &Path) -> io::Result<()> {
        let meta = fs::metadata(src)?;
        if meta.is_file() {
            return self.file_from(path, src);
        }
        if !meta.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a file or directory",
                src.display()
            )));
        }
        self.dir(path, meta.permissions().mode())?;
        let mut entries: Vec<_> = fs::read_dir(src)?.collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                eprintln!(
                    "testbed: skipping {} (name is not UTF-8)",
                    e.path().display()
                );
                continue;
            };
            let child = format!("{}/{}", path.trim_end_matches('/'), name);
            let ft = e.file_type()?;
            if ft.is_symlink() {
                let target = fs::read_link(e.path())?;
                let Some(target) = target.to_str() else {
                    eprintln!(
                        "testbed: skipping {} (link target is not UTF-8)",
                        e.path().display()
                    );
                    continue;
                };
                self.symlink(&child, target)?;
            } else if ft.is_dir() || ft.is_file() {
                self.tree_from(&child, &e.path())?;
            } else {
                eprintln!(
                    "testbed: skipping {} (not a file, directory or link)",
                    e.path().display()
                );
            }
        }
        Ok(())
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0, 1), (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Normalises `path` and adds its missing parent directories.
    fn prepare(&mut self, path: &str) -> io::Result<String> {
        let path = path.trim_matches('/').to_string();
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(io::Error::other(format!("bad archive path {path:?}")));
        }
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            let parent = path[..end].to_string();
            if self.dirs.insert(parent.clone()) {
                self.entry(&parent, S_IFDIR | 0o755, (0, 0, 2), (0, 0))?;
            }
            end += 1;
        }
        Ok(path)
    }

    /// Writes one header; `meta` is (size, mtime, nlink), `rdev` is (major, minor).
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        meta: (u64, u64, u32),
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let (size, mtime, nlink) = meta;
        let size = u32::try_from(size).map_err(|_| {
            io::Error::other(format!(
                "{name}: files over 4 GiB do not fit in a cpio archive"
            ))
        })?;
        let mtime = u32::try_from(mtime).unwrap_or(0);
        let (major, minor) = rdev;
        let ino = self.next_ino;
        self.next_ino += 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{mtime:08X}{size:08X}{:08X}{:08X}{major:08X}{minor:08X}{:08X}{:08X}",
            0, 0, 0, 0, name.len() + 1, 0
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

/// Lets `io::copy` stream file data into the archive while the offset stays right.
struct CountingWriter<'a, W: Write>(&'a mut Writer<W>);

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.out.flush()
    }
}

/// A gzip stream written by the system's `gzip` into a file.
pub struct Gzip {
    child: Child,
    stdin: BufWriter<ChildStdin>,
}

impl Gzip {
    /// Starts `gzip -LEVEL`, which writes into `dest` (appending when `append` is set).
    pub fn create(dest: &Path, level: u32, append: bool) -> io::Result<Gzip> {
        let file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(dest)?;
        let mut child = Command::new("gzip")
            .arg(format!("-{level}"))
            .args(["-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot run gzip: {e}")))?;
        let stdin = BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped stdin"));
        Ok(Gzip { child, stdin })
    }

    /// Closes the input and waits for `gzip` to finish.
    pub fn finish(self) -> io::Result<()> {
        let Gzip { mut child, stdin } = self;
        drop(stdin.into_inner().map_err(|e| e.into_error())?);
        let status = child.wait()?;
        if !status.success() {
            return Err(io::Error::other(format!("gzip failed ({status})")));
        }
        Ok(())
    }
}

impl Write for Gzip {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stdin.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stdin.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_added() {
        let mut w = Writer::new(Vec::new());
        w.file("/a/b/c.txt", 0o644, b"hello").unwrap();
        w.symlink("a/link", "b/c.txt").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let names: Vec<&str> = [
            "a\0",
            "a/b\0",
            "a/b/c.txt\0",
            "a/link\0",
            "dev\0",
            "dev/console\0",
            "TRAILER!!!\0",
        ]
        .into_iter()
        .filter(|n| text.contains(n))
        .collect();
        assert_eq!(names.len(), 7, "{text:?}");
        assert_eq!(text.matches("070701").count(), 7);
        // Each header starts 4-aligned.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    #[test]
    fn bad_paths_are_errors() {
        let mut w = Writer::new(Vec::new());
        for bad in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
    }
}
