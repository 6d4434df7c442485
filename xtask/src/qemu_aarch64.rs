//! QEMU for aarch64 as a peer in `cargo xtask bench boot --arch aarch64`: Debian's arm64
//! `qemu-system-arm` package and the shared libraries its `qemu-system-aarch64` loads, fetched
//! with `apt-get download`, unpacked with `dpkg-deb -x` (never installed) and cached in
//! `~/.cache/tandem/qemu-aarch64/vR-HASH/`, keyed by the packages and their versions. The
//! benchmark carries that directory into the aarch64 test host at [`IN_HOST`]; the testbed's
//! assets do not hold it, so no other aarch64 test pays for it.
//!
//! The libraries: every `Section: libs` package in the dependency closure of `qemu-system-arm`
//! (apt's candidate versions) is unpacked, and the arm64 dynamic loader, under qemu-user, lists
//! which of their files the binary loads; those are kept. libc6 is not carried: the loader and
//! libc must be one build, and the test host has this machine's `libc6:arm64` (see
//! [`crate::aarch64`]).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's package holding `qemu-system-aarch64`.
const PACKAGE: &str = "qemu-system-arm";
/// apt's architecture qualifier.
const ARCH: &str = ":arm64";
/// Packages the test host provides: the dynamic loader and libc (one build, this machine's).
const FROM_TEST_HOST: &[&str] = &["libc6"];
/// Bump when the bundle's layout changes in a way its packages' versions do not show.
const RECIPE: u32 = 1;
/// Where the bundle lies in the test host: `qemu-system-aarch64` and `lib/`.
pub const IN_HOST: &str = "/opt/qemu-aarch64";

/// One package's record in `apt-cache show`.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    name: String,
    version: String,
    section: String,
    depends: Vec<String>,
}

/// The records of `apt-cache show` output (stanzas separated by blank lines).
fn parse_records(text: &str) -> Vec<Record> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let (Some(name), Some(version)) = (field("Package"), field("Version")) else {
            continue;
        };
        let mut depends = Vec::new();
        for k in ["Pre-Depends", "Depends"] {
            depends.extend(field(k).map(|d| dep_names(&d)).unwrap_or_default());
        }
        out.push(Record {
            name,
            version,
            section: field("Section").unwrap_or_default(),
            depends,
        });
    }
    out
}

/// Package names of a `Depends:` field: versions and `:any` dropped, the first of alternatives.
fn dep_names(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|d| {
            let first = d.split('|').next()?.trim();
            let name = first.split([' ', '(']).next()?.split(':').next()?;
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// `apt-cache show` of the candidates of `names` (arm64); unknown names are left out.
fn show(names: &[String]) -> Result<Vec<Record>, String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(names.iter().map(|n| format!("{n}{ARCH}")))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-cache: {e}"))?;
    Ok(parse_records(&String::from_utf8_lossy(&out.stdout)))
}

/// [`PACKAGE`] and the library packages of its dependency closure, by `show` (apt-cache, or a
/// stand-in in tests), as (name, version); [`FROM_TEST_HOST`] and packages that are not
/// libraries (data, tools) are left out, with their dependencies.
fn closure(
    mut show: impl FnMut(&[String]) -> Result<Vec<Record>, String>,
) -> Result<Vec<(String, String)>, String> {
    let mut seen: BTreeSet<String> = FROM_TEST_HOST.iter().map(|s| s.to_string()).collect();
    seen.insert(PACKAGE.into());
    let mut next = vec![PACKAGE.to_string()];
    let mut found = Vec::new();
    while !next.is_empty() {
        let mut deps = Vec::new();
        for r in show(&next)? {
            let root = r.name == PACKAGE;
            if !root && r.section != "libs" {
                continue;
            }
            deps.extend(
                r.depends
                    .iter()
                    .filter(|d| seen.insert(d.to_string()))
                    .cloned(),
            );
            found.push((r.name, r.version));
        }
        if found.is_empty() {
            return Err(format!("apt knows no {PACKAGE}{ARCH}"));
        }
        next = deps;
    }
    found.sort();
    Ok(found)
}

/// The cache key of a set of (package, version): FNV-1a over [`RECIPE`] and the sorted pairs.
fn key(pkgs: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = pkgs.iter().collect();
    sorted.sort();
    let mut h: u64 = 0xcbf29ce484222325;
    let recipe = RECIPE.to_string();
    let fields = sorted.iter().flat_map(|(n, v)| [n.as_str(), v.as_str()]);
    for s in std::iter::once(recipe.as_str()).chain(fields) {
        for b in s.bytes().chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    format!("v{RECIPE}-{h:016x}")
}

/// The libraries in the loader's `--list` output, as (soname, path; `None` when not found).
fn parse_listing(text: &str) -> Vec<(String, Option<PathBuf>)> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once("=>")?;
            let rest = rest.trim();
            let path = (!rest.starts_with("not found"))
                .then(|| rest.split(" (").next().map(PathBuf::from))
                .flatten()
                .filter(|p| p.is_absolute());
            Some((name.trim().to_string(), path))
        })
        .collect()
}

/// The cache directory: next to the testbed's (`~/.cache/tandem/qemu-aarch64`).
fn cache_dir() -> Result<PathBuf, String> {
    crate::assets::cache_root()?
        .parent()
        .map(|p| p.join("qemu-aarch64"))
        .ok_or_else(|| "no cache directory".into())
}

/// The ready bundle for the benchmark (a directory holding `qemu-system-aarch64`, `lib/` and
/// `manifest.txt`), built first if the packages' versions have none yet, with the QEMU
/// version; or why there is none.
pub fn bundle() -> Result<(PathBuf, String), String> {
    crate::aarch64::ensure_packages()?;
    let pkgs = closure(show)?;
    let version = pkgs
        .iter()
        .find(|(n, _)| n == PACKAGE)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let cache = cache_dir()?;
    let dir = cache.join(key(&pkgs));
    if dir.join("manifest.txt").is_file() {
        return Ok((dir, version));
    }
    eprintln!(
        "bench: unpacking {PACKAGE}{ARCH} {version} and {} library packages into {} (once)",
        pkgs.len() - 1,
        dir.display()
    );
    fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    crate::assets::remove_stale(&cache, ".build-");
    let work = cache.join(format!(".build-{}", std::process::id()));
    let built = build(&work, &pkgs);
    let _ = fs::remove_dir_all(work.join("x"));
    if let Err(e) = built.and_then(|()| {
        fs::rename(&work, &dir).or_else(|e| {
            // Another run may have built the same key first.
            if dir.join("manifest.txt").is_file() {
                Ok(())
            } else {
                Err(format!("cannot move {} into place: {e}", work.display()))
            }
        })
    }) {
        let _ = fs::remove_dir_all(&work);
        return Err(e);
    }
    let _ = fs::remove_dir_all(&work);
    Ok((dir, version))
}

/// Downloads and unpacks `pkgs` under `work/x` and lays the bundle out in `work`.
fn build(work: &Path, pkgs: &[(String, String)]) -> Result<(), String> {
    let x = work.join("x");
    fs::create_dir_all(&x).map_err(|e| format!("{}: {e}", x.display()))?;
    let debs = crate::assets::cache_root()?.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    let qualified: Vec<(String, String)> = pkgs
        .iter()
        .map(|(n, v)| (format!("{n}{ARCH}"), v.clone()))
        .collect();
    let files = crate::assets::fetch(&debs, &qualified)?;
    for ((name, _), deb) in pkgs.iter().zip(&files) {
        crate::assets::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(x.join(name)),
            "dpkg-deb -x",
        )?;
    }
    let exe = x.join(PACKAGE).join("usr/bin/qemu-system-aarch64");
    let mut search = Vec::new();
    for (name, _) in pkgs {
        for d in ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"] {
            let p = x.join(name).join(d);
            if p.is_dir() {
                search.push(p.display().to_string());
            }
        }
    }
    let out = Command::new("qemu-aarch64")
        .args(["/lib/ld-linux-aarch64.so.1", "--library-path"])
        .arg(search.join(":"))
        .arg("--list")
        .arg(&exe)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run qemu-aarch64: {e}"))?;
    let listing = parse_listing(&String::from_utf8_lossy(&out.stdout));
    if listing.is_empty() {
        return Err(format!(
            "the arm64 loader lists no library of {} ({})",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let missing: Vec<&str> = listing
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "qemu-system-aarch64 needs {}, in no library package it depends on",
            missing.join(", ")
        ));
    }
    let lib = work.join("lib");
    fs::create_dir_all(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    let mut manifest = String::new();
    for (name, path) in &listing {
        // Outside the unpacked packages: this machine's libc6:arm64, which the test host has.
        let Some(path) = path.as_ref().filter(|p| p.starts_with(&x)) else {
            continue;
        };
        fs::copy(path, lib.join(name)).map_err(|e| format!("{}: {e}", path.display()))?;
        manifest.push_str(&format!("lib {name}\n"));
    }
    fs::copy(&exe, work.join("qemu-system-aarch64"))
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    for (name, version) in pkgs {
        manifest.push_str(&format!("package {name}{ARCH} {version}\n"));
    }
    fs::write(work.join("manifest.txt"), manifest).map_err(|e| format!("manifest: {e}"))
}

/// The shell command line that boots `kernel` with `initrd` and `append` in the bundle's QEMU
/// in the test host: the `virt` board with KVM's GICv3 and the host's CPU, no default devices
/// and no user configuration (so no firmware or data files are wanted: `-kernel` boots the
/// `Image` directly), the console (the board's PL011) on standard output, and PSCI's power-off
/// or reset ending QEMU.
pub fn command(kernel: &str, initrd: &str, append: &str, cpus: u32, mem_mib: u64) -> String {
    format!(
        "LD_LIBRARY_PATH={IN_HOST}/lib {IN_HOST}/qemu-system-aarch64 -M virt,gic-version=3 \
         -accel kvm -cpu host -m {mem_mib}M -smp {cpus} -nodefaults -no-user-config \
         -display none -serial stdio -no-reboot -kernel {kernel} -initrd {initrd} \
         -append \"{append}\""
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, version: &str, section: &str, depends: &[&str]) -> Record {
        Record {
            name: name.into(),
            version: version.into(),
            section: section.into(),
            depends: depends.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn apt_records_parse_with_their_dependencies() {
        let text = "Package: qemu-system-arm\nVersion: 1:7.2+dfsg-7\nArchitecture: arm64\n\
                    Depends: libaio1 (>= 0.3.93), libc6 (>= 2.34), libfoo1 | libbar1, zlib1g:any (>= 1:1.2.0)\n\
                    Section: otherosfs\n\nPackage: zlib1g\nVersion: 1:1.2.13\nPre-Depends: libc6 (>= 2.14)\nSection: libs\n\n";
        assert_eq!(
            parse_records(text),
            [
                rec(
                    "qemu-system-arm",
                    "1:7.2+dfsg-7",
                    "otherosfs",
                    &["libaio1", "libc6", "libfoo1", "zlib1g"]
                ),
                rec("zlib1g", "1:1.2.13", "libs", &["libc6"]),
            ]
        );
    }

    #[test]
    fn the_closure_follows_libraries_only_and_leaves_libc_to_the_test_host() {
        let db = [
            rec(
                PACKAGE,
                "7.2",
                "otherosfs",
                &["libglib2.0-0", "qemu-system-data", "libc6", "zlib1g"],
            ),
            rec("libglib2.0-0", "2.74", "libs", &["libffi8", "libc6"]),
            rec("libffi8", "3.4", "libs", &["libc6"]),
            rec("zlib1g", "1.2.13", "libs", &["libc6"]),
            rec("qemu-system-data", "7.2", "misc", &["libnotwanted1"]),
            rec("libc6", "2.36", "libs", &["libgcc-s1"]),
        ];
        let mut asked = Vec::new();
        let got = closure(|names| {
            asked.extend(names.to_vec());
            Ok(db
                .iter()
                .filter(|r| names.contains(&r.name))
                .cloned()
                .collect())
        })
        .unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["libffi8", "libglib2.0-0", PACKAGE, "zlib1g"]);
        assert!(!asked.contains(&"libc6".to_string()), "{asked:?}");
        assert!(!asked.contains(&"libnotwanted1".to_string()), "{asked:?}");
        // Each package is asked for once.
        let unique: BTreeSet<&String> = asked.iter().collect();
        assert_eq!(unique.len(), asked.len(), "{asked:?}");
        assert!(closure(|_| Ok(Vec::new())).is_err());
    }

    #[test]
    fn the_cache_key_changes_with_any_version_and_not_with_order() {
        let a = vec![
            ("qemu-system-arm".to_string(), "1:7.2+dfsg-7".to_string()),
            ("zlib1g".to_string(), "1:1.2.13".to_string()),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(key(&a), key(&b));
        assert!(key(&a).starts_with(&format!("v{RECIPE}-")));
        let mut c = a.clone();
        c[1].1 = "1:1.2.13+deb12u1".into();
        assert_ne!(key(&a), key(&c));
        let mut d = a.clone();
        d.push(("libffi8".into(), "3.4".into()));
        assert_ne!(key(&a), key(&d));
    }

    #[test]
    fn the_loader_listing_gives_paths_and_missing_libraries() {
        let text = "\tlinux-vdso.so.1 (0x0000005502a8e000)\n\
                    \tlibz.so.1 => /c/x/zlib1g/lib/aarch64-linux-gnu/libz.so.1 (0x0000005502b00000)\n\
                    \tlibslirp.so.0 => not found\n\
                    \tlibc.so.6 => /lib/aarch64-linux-gnu/libc.so.6 (0x0000005502c00000)\n\
                    \t/lib/ld-linux-aarch64.so.1 (0x0000005500000000)\n";
        assert_eq!(
            parse_listing(text),
            [
                (
                    "libz.so.1".to_string(),
                    Some(PathBuf::from("/c/x/zlib1g/lib/aarch64-linux-gnu/libz.so.1"))
                ),
                ("libslirp.so.0".to_string(), None),
                (
                    "libc.so.6".to_string(),
                    Some(PathBuf::from("/lib/aarch64-linux-gnu/libc.so.6"))
                ),
            ]
        );
    }

    #[test]
    fn the_command_line_is_qemu_virt_with_kvm_and_nothing_else() {
        let c = command(
            "/guests/vmlinuz",
            "/guests/i.gz",
            "console=ttyAMA0 quiet",
            1,
            256,
        );
        for want in [
            "LD_LIBRARY_PATH=/opt/qemu-aarch64/lib /opt/qemu-aarch64/qemu-system-aarch64 ",
            " -M virt,gic-version=3 -accel kvm -cpu host ",
            " -m 256M -smp 1 ",
            " -nodefaults -no-user-config ",
            " -serial stdio -no-reboot ",
            " -kernel /guests/vmlinuz -initrd /guests/i.gz -append \"console=ttyAMA0 quiet\"",
        ] {
            assert!(c.contains(want), "{want:?} not in {c}");
        }
        assert!(!c.contains("-bios"), "{c}");
    }
}
