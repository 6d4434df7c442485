//! `cargo xtask build --arch aarch64` and `cargo xtask test --arch aarch64`: tandem
//! cross-built for 64-bit Arm with Debian's Rust toolchain, and its unit tests run under
//! qemu-user.
//!
//! rustup's toolchain here has only the x86_64 standard library; Debian 12 ships a current Rust
//! (`rustc-web`, `cargo-web`) with an arm64 one (`libstd-rust-web-dev:arm64`). The x86_64 build
//! keeps rustup's toolchain and `target/`; this one uses `/usr/bin/cargo` and `/usr/bin/rustc`
//! with a target directory of its own, so that neither rebuilds the other.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tasks::{apt_install, is_root};

/// The Rust target triple.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The aarch64 build's target directory, under the workspace root.
pub const TARGET_DIR: &str = "target/aarch64";

/// Debian's toolchain.
const CARGO: &str = "/usr/bin/cargo";
const RUSTC: &str = "/usr/bin/rustc";
const RUSTDOC: &str = "/usr/bin/rustdoc";
const LINKER: &str = "aarch64-linux-gnu-gcc";

/// How qemu-user runs the aarch64 test binaries. Without `-L`: the dynamic loader and the libc
/// are `libc6:arm64`'s (multiarch, in /lib), a matching pair. `-L /usr/aarch64-linux-gnu` would
/// take the cross package's loader, which then finds the multiarch libc.so.6 first; a loader
/// and libc of different builds hang in the first `pthread_create` (seen with Debian 12's
/// 2.36-8cross1 loader and 2.36-9+deb12u14 libc).
const RUNNER: &str = "qemu-aarch64";

/// Debian packages of the cross build, with a file that proves each is there.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", RUSTC),
    ("cargo-web", CARGO),
    (
        "libstd-rust-web-dev:arm64",
        "/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib",
    ),
    ("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"),
    (
        "libc6-dev-arm64-cross",
        "/usr/aarch64-linux-gnu/lib/libc.so",
    ),
    ("libc6:arm64", "/lib/ld-linux-aarch64.so.1"),
    ("qemu-user", "/usr/bin/qemu-aarch64"),
];

/// The packages of [`PACKAGES`] missing on this host.
fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, proof)| !Path::new(proof).exists())
        .map(|(p, _)| *p)
        .collect()
}

/// Whether dpkg already accepts arm64 packages.
fn has_arm64_architecture() -> Result<bool, String> {
    let out = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .map_err(|e| format!("cannot run dpkg: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "arm64"))
}

/// Installs the cross toolchain's Debian packages when missing (as root; otherwise says what to
/// run). Only file checks when everything is there.
pub fn ensure_packages() -> Result<(), String> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "the aarch64 build needs Debian packages; as root: dpkg --add-architecture arm64 && \
             apt-get update && apt-get install {}",
            missing.join(" ")
        ));
    }
    if !has_arm64_architecture()? {
        crate::assets::run(
            Command::new("dpkg").args(["--add-architecture", "arm64"]),
            "dpkg --add-architecture arm64",
        )?;
    }
    apt_install(&missing, None)?;
    match missing_packages().as_slice() {
        [] => Ok(()),
        still => Err(format!(
            "installed, but still missing: {} (see docs/aarch64.md)",
            still.join(" ")
        )),
    }
}

/// Debian's cargo, set up to cross-build for [`TARGET`] in [`TARGET_DIR`].
fn cargo(root: &Path, subcommand: &str) -> Command {
    cross_cargo(root, subcommand, Path::new(TARGET_DIR))
}

/// Debian's cargo running `subcommand` in `dir`, set up to cross-build for [`TARGET`] into
/// `target_dir` (also for other projects: the Firecracker peer of the benchmarks).
pub fn cross_cargo(dir: &Path, subcommand: &str, target_dir: &Path) -> Command {
    let mut cmd = Command::new(CARGO);
    cmd.arg(subcommand)
        .args(["--target", TARGET, "--target-dir"])
        .arg(target_dir)
        .current_dir(dir)
        // rustup's proxies come first on PATH and would pick its x86_64-only toolchain.
        .env("RUSTC", RUSTC)
        .env("RUSTDOC", RUSTDOC)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WRAPPER")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
        .env("CC_aarch64_unknown_linux_gnu", LINKER)
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", RUNNER);
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {CARGO}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// Where [`build`] puts the aarch64 tandem binary.
pub fn tandem_path(root: &Path) -> PathBuf {
    root.join(TARGET_DIR).join(TARGET).join("release/tandem")
}

/// The xtask binary itself for aarch64, for the benchmarks' in-host measurements
/// (`xtask bench-run`) in the aarch64 test host; returns its path.
pub fn build_xtask(root: &Path) -> Result<PathBuf, String> {
    ensure_packages()?;
    let mut cmd = cargo(root, "build");
    cmd.args(["--release", "-p", "xtask"]);
    run(cmd, "the aarch64 build of xtask")?;
    Ok(root.join(TARGET_DIR).join(TARGET).join("release/xtask"))
}

/// `cargo xtask build --arch aarch64`: the release build of tandem for aarch64.
pub fn build(root: &Path) -> Result<i32, String> {
    ensure_packages()?;
    let mut cmd = cargo(root, "build");
    cmd.args(["--release", "-p", "tandem"]);
    run(cmd, "the aarch64 build")?;
    eprintln!("xtask: built {} (aarch64)", tandem_path(root).display());
    Ok(0)
}

/// Workspace members left out of the aarch64 unit tests: `xtask` drives the build and the
/// x86_64 testbed on this machine, and is no part of what runs on an Arm host.
const EXCLUDED: &[&str] = &["xtask"];

/// Unit tests that cannot run under qemu-user, by name (`--skip` matches substrings), and why.
/// They are not architecture-specific: each runs in the x86_64 suite, and would on an aarch64
/// host.
const SKIPPED_UNDER_QEMU_USER: &[(&str, &str)] = &[
    // qemu-user refuses seccomp filters (EINVAL): they would filter the emulator's own calls.
    ("tests::a_filtered_thread_keeps_working", "seccomp"),
    ("tests::log_mode_lets_a_forbidden_call_through", "seccomp"),
    ("tests::probes_answer", "seccomp"),
    (
        "tests::supervisor_threads_start_threads_but_no_process",
        "seccomp",
    ),
    (
        "tests::the_test_hook_fires_right_after_the_filter",
        "seccomp",
    ),
    (
        "control::tests::silent_clients_neither_block_others",
        "seccomp",
    ),
    (
        "control::tests::an_endless_request_line_is_cut_off",
        "seccomp",
    ),
    // The supervisor's tests start VM processes under seccomp, some of them by running the
    // test binary again (an aarch64 program, which this host cannot exec without binfmt_misc).
    ("supervisor::tests::", "seccomp and child processes"),
    // Asks this host's /dev/kvm (an x86_64 KVM) for its statistics.
    (
        "stats::kvm::tests::the_kvm_of_this_host_answers",
        "this host's KVM",
    ),
];

/// `--skip` arguments for [`SKIPPED_UNDER_QEMU_USER`], after the harness's `--` (added when
/// `extra` has none).
fn harness_args(extra: &[String]) -> Vec<String> {
    let mut args = extra.to_vec();
    if !args.iter().any(|a| a == "--") {
        args.push("--".into());
    }
    for (name, _) in SKIPPED_UNDER_QEMU_USER {
        args.push("--skip".into());
        args.push(name.to_string());
    }
    args
}

/// `cargo xtask test --arch aarch64 [ARGS]`: the workspace's unit tests (libraries and
/// binaries; not the integration tests, which boot guests in the x86_64 testbed) built for
/// aarch64 and run under qemu-user, less [`SKIPPED_UNDER_QEMU_USER`]. `ARGS` go to
/// `cargo test` as they are.
///
/// Built with the release profile: the tests then share their dependencies with [`build`]'s
/// (one cross build of the dependency tree instead of two) and run several times faster under
/// the emulator. Debug assertions and overflow checks are off there; the same tests run with
/// them in the x86_64 suite.
pub fn test(root: &Path, extra: &[String]) -> Result<i32, String> {
    ensure_packages()?;
    let mut cmd = cargo(root, "test");
    cmd.args(["--release", "--workspace", "--lib", "--bins"]);
    for e in EXCLUDED {
        cmd.args(["--exclude", e]);
    }
    cmd.args(harness_args(extra));
    run(cmd, "the aarch64 unit tests")?;
    eprintln!(
        "xtask: aarch64 unit tests passed under qemu-user ({} skipped by name: seccomp, child \
         processes and this host's KVM do not work there)",
        SKIPPED_UNDER_QEMU_USER.len()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_go_to_the_test_harness() {
        let a = harness_args(&["-p".into(), "tandem-net".into()]);
        assert_eq!(a[..3], ["-p", "tandem-net", "--"]);
        assert_eq!(
            a.iter().filter(|a| *a == "--skip").count(),
            SKIPPED_UNDER_QEMU_USER.len()
        );
        let a = harness_args(&["--".into(), "--nocapture".into()]);
        assert_eq!(a[..3], ["--", "--nocapture", "--skip"]);
        assert_eq!(a.iter().filter(|a| *a == "--").count(), 1);
    }

    #[test]
    fn the_cross_build_never_uses_the_default_target_dir() {
        let cmd = cargo(Path::new("/w"), "build");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            ["build", "--target", TARGET, "--target-dir", TARGET_DIR]
        );
        assert_ne!(TARGET_DIR, "target");
        let env: Vec<_> = cmd.get_envs().collect();
        assert!(env.contains(&("RUSTC".as_ref(), Some(RUSTC.as_ref()))));
        assert!(env.contains(&("RUSTUP_TOOLCHAIN".as_ref(), None)));
    }
}
