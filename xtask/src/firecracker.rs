//! Firecracker as a peer in `cargo xtask bench boot`: built from its source repository into
//! `~/.cache/tandem/firecracker/`, cached by commit, and configured by a `--config-file` JSON.
//!
//! The source is a git repository (a clone or a bare mirror) named by `TANDEM_FIRECRACKER_SRC`,
//! or the clone this module left in the cache on an earlier run; its git dependency micro-http
//! comes from `TANDEM_MICRO_HTTP_SRC` (or the cache's clone) and is patched in by path, so the
//! build needs no access to GitHub. `TANDEM_FIRECRACKER_REV` picks a commit or tag (default: the
//! source's `HEAD`). The build uses the toolchain at hand (Firecracker's `rust-toolchain.toml` is
//! removed from the cache's checkout), Firecracker's own release profile, and the
//! `x86_64-unknown-linux-gnu` target (for which Firecracker compiles in no seccomp filter); for
//! aarch64, Debian's cross toolchain and `aarch64-unknown-linux-gnu`.

use std::path::{Path, PathBuf};
use std::process::Command;

const MICRO_HTTP_URL: &str = "https://github.com/firecracker-microvm/micro-http";
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The cache directory: `$XDG_CACHE_HOME/tandem/firecracker` or `~/.cache/tandem/firecracker`.
fn cache_dir() -> Result<PathBuf, String> {
    Ok(crate::assets::cache_root()?
        .parent()
        .map(|p| p.join("firecracker"))
        .ok_or("no cache directory")?)
}

fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git -C {} {}: {}",
            dir.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Checks `rev` of repository `src` out in the cache's clone `dir` (cloning it first) and returns
/// the commit. A source whose snapshot lacks some large blobs (test resources) still yields a
/// usable tree: a failed checkout is accepted once `HEAD` is the commit and `Cargo.toml` is there.
fn checkout(src: Option<&Path>, dir: &Path, rev: &str) -> Result<String, String> {
    if !dir.join(".git").exists() {
        let src = src.ok_or("no source to clone")?;
        let parent = dir.parent().ok_or("bad cache path")?;
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        git(
            parent,
            &[
                "clone",
                "-q",
                "--no-checkout",
                &src.to_string_lossy(),
                &dir.to_string_lossy(),
            ],
        )?;
    } else if let Some(src) = src {
        git(
            dir,
            &[
                "fetch",
                "-q",
                "--tags",
                &src.to_string_lossy(),
                "+HEAD:refs/remotes/source/HEAD",
            ],
        )?;
    }
    let rev = if rev == "HEAD" && src.is_some() {
        "refs/remotes/source/HEAD"
    } else {
        rev
    };
    let commit = git(
        dir,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .or_else(|_| git(dir, &["rev-parse", "--verify", "HEAD^{commit}"]))?;
    if let Err(e) = git(dir, &["checkout", "-q", "-f", "--detach", &commit]) {
        let head = git(dir, &["rev-parse", "HEAD"]).unwrap_or_default();
        if head != commit || !dir.join("Cargo.toml").exists() {
            return Err(e);
        }
        eprintln!(
            "bench: note: {} checkout incomplete ({e}); building anyway",
            dir.display()
        );
    }
    Ok(commit)
}

/// The micro-http commit Firecracker's `Cargo.lock` pins.
pub fn locked_micro_http(lock: &str) -> Option<String> {
    lock.lines()
        .filter_map(|l| l.trim().strip_prefix("source = \"git+"))
        .filter(|s| s.starts_with(MICRO_HTTP_URL))
        .find_map(|s| Some(s.split_once('#')?.1.trim_end_matches('"').to_string()))
}

/// A Firecracker binary for this machine, built from source, or the reason there is none; the
/// next run reuses a binary built from the same commit.
pub fn binary() -> Result<PathBuf, String> {
    binary_for(false)
}

/// A Firecracker binary for this machine, or for aarch64 when `aarch64` (cross-built with
/// Debian's toolchain, as tandem's aarch64 build is, see [`crate::aarch64`]).
pub fn binary_for(aarch64: bool) -> Result<PathBuf, String> {
    let cache = cache_dir()?;
    let fc_src = std::env::var_os("TANDEM_FIRECRACKER_SRC").map(PathBuf::from);
    let mh_src = std::env::var_os("TANDEM_MICRO_HTTP_SRC").map(PathBuf::from);
    let src_dir = cache.join("src");
    if fc_src.is_none() && !src_dir.join(".git").exists() {
        return Err("Firecracker's source is not at hand (set TANDEM_FIRECRACKER_SRC to a clone of \
                    github.com/firecracker-microvm/firecracker and TANDEM_MICRO_HTTP_SRC to one of its micro-http)"
            .into());
    }
    let rev = std::env::var("TANDEM_FIRECRACKER_REV").unwrap_or_else(|_| "HEAD".into());
    let commit = checkout(fc_src.as_deref(), &src_dir, &rev)?;
    let (target, bin_dir) = if aarch64 {
        (crate::aarch64::TARGET, format!("{commit}-aarch64"))
    } else {
        (TARGET, commit.clone())
    };
    let bin = cache.join("bin").join(bin_dir).join("firecracker");
    if bin.exists() {
        return Ok(bin);
    }
    let lock = std::fs::read_to_string(src_dir.join("Cargo.lock")).map_err(|e| e.to_string())?;
    let mh_rev = locked_micro_http(&lock).ok_or("Firecracker's Cargo.lock names no micro-http")?;
    let mh_dir = cache.join("micro-http");
    if mh_src.is_none() && !mh_dir.join(".git").exists() {
        return Err("micro-http's source is not at hand (set TANDEM_MICRO_HTTP_SRC)".into());
    }
    checkout(mh_src.as_deref(), &mh_dir, &mh_rev)?;
    for f in ["rust-toolchain.toml", "rust-toolchain"] {
        let _ = std::fs::remove_file(src_dir.join(f));
    }
    ensure_build_packages()?;
    eprintln!("bench: building Firecracker {commit} for {target} (once; minutes)");
    let jobs = std::env::var("CARGO_BUILD_JOBS").unwrap_or_else(|_| "2".into());
    let mut cmd = if aarch64 {
        crate::aarch64::ensure_packages()?;
        crate::aarch64::cross_cargo(&src_dir, "build", &cache.join("target"))
    } else {
        let mut c = Command::new("cargo");
        c.args(["build", "--target", TARGET])
            .current_dir(&src_dir)
            .env("CARGO_TARGET_DIR", cache.join("target"));
        c
    };
    cmd.args([
        "--release",
        "-p",
        "firecracker",
        "--bin",
        "firecracker",
        "--config",
    ])
    .arg(format!(
        "patch.'{MICRO_HTTP_URL}'.micro_http.path='{}'",
        mh_dir.display()
    ))
    .env("CARGO_BUILD_JOBS", jobs);
    // Below the benchmarks and tests that may run beside it.
    let status = niced(&cmd)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "Firecracker {commit} does not build here ({status}); try TANDEM_FIRECRACKER_REV=<a release tag>"
        ));
    }
    let built = cache
        .join("target")
        .join(target)
        .join("release/firecracker");
    std::fs::create_dir_all(bin.parent().ok_or("bad path")?).map_err(|e| e.to_string())?;
    std::fs::copy(&built, &bin).map_err(|e| format!("{}: {e}", built.display()))?;
    Ok(bin)
}

/// Debian packages Firecracker's build needs: libclang for bindgen (userfaultfd-sys, the KVM
/// bindings) with clang's own headers, and libseccomp's headers.
const BUILD_PACKAGES: &[&str] = &["libclang1-14", "libclang-common-14-dev", "libseccomp-dev"];

/// Installs the missing [`BUILD_PACKAGES`] as root; otherwise says what to install.
fn ensure_build_packages() -> Result<(), String> {
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|p| crate::tasks::installed_version(p).is_none())
        .collect();
    match missing.is_empty() {
        true => Ok(()),
        false if crate::tasks::is_root() => crate::tasks::apt_install(&missing, None),
        false => Err(format!(
            "building Firecracker needs: sudo apt-get install {}",
            missing.join(" ")
        )),
    }
}

/// `cmd` run under `nice -n 10`, with its arguments, environment and directory.
fn niced(cmd: &Command) -> Command {
    let mut n = Command::new("nice");
    n.args(["-n", "10"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => n.env(k, v),
            None => n.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        n.current_dir(d);
    }
    n
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Firecracker's `--config-file` for a boot with no drives and no network.
pub fn config(
    kernel: &str,
    initrd: &str,
    cmdline: &str,
    vcpus: u32,
    mem_mib: u64,
    entropy: bool,
) -> String {
    // Firecracker's virtio-rng (`entropy`), on virtio-mmio as all its devices without PCI.
    let entropy = if entropy { "\"entropy\": {},\n  " } else { "" };
    format!(
        "{{\n  \"boot-source\": {{\"kernel_image_path\": {}, \"initrd_path\": {}, \"boot_args\": {}}},\n  \
         \"drives\": [],\n  {entropy}\"machine-config\": {{\"vcpu_count\": {vcpus}, \"mem_size_mib\": {mem_mib}, \"smt\": false}}\n}}\n",
        json_str(kernel),
        json_str(initrd),
        json_str(cmdline)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locked_micro_http_commit_is_found() {
        let lock = "[[package]]\nname = \"libc\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n\
                    [[package]]\nname = \"micro_http\"\nversion = \"0.1.0\"\n\
                    source = \"git+https://github.com/firecracker-microvm/micro-http#7975fe0e59000e8c41cb1d58fbd39ffa102e5b27\"\n";
        assert_eq!(
            locked_micro_http(lock).as_deref(),
            Some("7975fe0e59000e8c41cb1d58fbd39ffa102e5b27")
        );
        assert_eq!(locked_micro_http("[[package]]\nname = \"x\"\n"), None);
    }

    #[test]
    fn the_config_escapes_the_command_line() {
        let c = config(
            "/guests/vmlinux",
            "/guests/i.cpio.gz",
            "console=ttyS0 tandem.exec=\"echo $((40+2))\"",
            1,
            256,
            false,
        );
        assert!(c.contains(r#""boot_args": "console=ttyS0 tandem.exec=\"echo $((40+2))\"""#));
        assert!(c.contains(r#""kernel_image_path": "/guests/vmlinux""#));
        assert!(c.contains(r#""vcpu_count": 1, "mem_size_mib": 256"#));
        assert!(c.contains(r#""drives": []"#));
        assert_eq!(json_str("a\\b\n"), r#""a\\b\u000a""#);
        assert!(!c.contains("entropy"));
        let e = config("/k", "/i", "", 1, 256, true);
        assert!(e.contains("\"drives\": [],\n  \"entropy\": {},\n  \"machine-config\""));
    }
}
