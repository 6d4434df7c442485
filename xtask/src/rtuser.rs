//! The realtime guest's userland: Debian's `rt-tests` (cyclictest and friends) with the shared
//! libraries they load, appended to the usual guest initramfs as a second variant,
//! `initramfs-rt.cpio.gz`, so that the default initramfs (and every other test's boot) stays
//! as small as it was.

use crate::cpio::{Gzip, Writer};
use std::fs;
use std::path::Path;

/// Debian packages unpacked for the realtime userland: the programs' package first, then the
/// packages of the libraries they need (`readelf -d`: librt, libpthread, libc from libc6,
/// libnuma from libnuma1; the dynamic loader from libc6).
pub const PACKAGES: &[&str] = &["rt-tests", "libnuma1", "libc6"];
/// Programs of `rt-tests` carried, under `/usr/bin`.
pub const PROGRAMS: &[&str] = &["cyclictest", "oslat", "hackbench"];

/// Whether a file of a library package is a runtime shared library (or the dynamic loader):
/// versioned sonames such as `libc.so.6` and `ld-linux-x86-64.so.2`. Plugins without a version
/// (glibc's gconv and audit modules, `libmemusage.so`) are left out.
fn is_runtime_lib(name: &str) -> bool {
    name.contains(".so.")
}

/// Writes `dest`: the guest initramfs `base` followed by a second gzip'd cpio archive (the
/// kernel unpacks both) holding [`PROGRAMS`] and every runtime library of the other
/// [`PACKAGES`], at their paths in the packages. `unpacked` holds each package unpacked under
/// its name.
pub fn initramfs(base: &Path, dest: &Path, unpacked: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("writing {}: {e}", dest.display());
    fs::copy(base, dest).map_err(|e| format!("copy {}: {e}", base.display()))?;
    let gz = Gzip::create(dest, 9, true).map_err(err)?;
    let mut w = Writer::new(gz);
    let (programs, libs) = PACKAGES.split_first().expect("packages");
    for p in PROGRAMS {
        let src = unpacked.join(programs).join("usr/bin").join(p);
        w.file_from(&format!("usr/bin/{p}"), &src)
            .map_err(|e| format!("{}: {e}", src.display()))?;
    }
    for pkg in libs {
        let root = unpacked.join(pkg);
        let mut found = 0;
        add_libs(&mut w, &root, &root, &mut found).map_err(err)?;
        if found == 0 {
            return Err(format!("{pkg} holds no shared library"));
        }
    }
    w.finish().and_then(Gzip::finish).map_err(err)
}

/// Adds the runtime libraries (files and symbolic links) under `dir`, a directory of the
/// unpacked package at `root`, counting them in `found`.
pub fn add_libs<W: std::io::Write>(
    w: &mut Writer<W>,
    root: &Path,
    dir: &Path,
    found: &mut usize,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            add_libs(w, root, &path, found)?;
            continue;
        }
        let name = e.file_name();
        if !name.to_str().is_some_and(is_runtime_lib) {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .map_err(std::io::Error::other)?
            .to_str()
            .ok_or_else(|| std::io::Error::other("path is not UTF-8"))?
            .to_string();
        if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            let target = target
                .to_str()
                .ok_or_else(|| std::io::Error::other("link target is not UTF-8"))?;
            w.symlink(&rel, target)?;
        } else if ft.is_file() {
            w.file_from(&rel, &path)?;
        } else {
            continue;
        }
        *found += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_libraries_are_versioned_sonames() {
        for lib in [
            "libc.so.6",
            "ld-linux-x86-64.so.2",
            "libnuma.so.1",
            "libnuma.so.1.0.0",
        ] {
            assert!(is_runtime_lib(lib), "{lib}");
        }
        for other in ["UTF-16.so", "libmemusage.so", "sotruss-lib.so", "README"] {
            assert!(!is_runtime_lib(other), "{other}");
        }
    }

    #[test]
    fn the_library_walk_keeps_sonames_and_links_and_skips_plugins() {
        let root = std::env::temp_dir().join(format!("rtuser-{}", std::process::id()));
        let lib = root.join("lib/x86_64-linux-gnu");
        fs::create_dir_all(lib.join("gconv")).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        fs::write(lib.join("libc.so.6"), b"elf").unwrap();
        fs::write(lib.join("gconv/UTF-16.so"), b"elf").unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            root.join("lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        let mut w = Writer::new(Vec::new());
        let mut found = 0;
        add_libs(&mut w, &root, &root, &mut found).unwrap();
        let text = String::from_utf8_lossy(&w.finish().unwrap()).into_owned();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, 2);
        assert!(
            text.contains("lib/x86_64-linux-gnu/libc.so.6\0"),
            "{text:?}"
        );
        assert!(text.contains("lib64/ld-linux-x86-64.so.2\0"), "{text:?}");
        assert!(!text.contains("UTF-16"), "{text:?}");
    }
}
