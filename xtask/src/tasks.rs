//! The tasks besides `testbed`: `test`, `shell`, `guests-dir`, and the host packages they need.

use std::path::Path;
use std::process::Command;

use crate::{assets, testbed};

/// Debian packages the host needs, with a command that proves each is there.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("seabios", "/usr/share/seabios/bios-256k.bin"),
    // dropbear (server, in guests) and dbclient (ssh client, in the test host) for the ssh test.
    ("dropbear-bin", "/usr/sbin/dropbear"),
    // nft (tandem's port forwards over TAP) and ip with network namespaces, for the TAP tests.
    ("nftables", "/usr/sbin/nft"),
    ("iproute2", "/usr/sbin/ip"),
];

fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).exists();
    }
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs missing host packages with apt-get when running as root; otherwise says what to do.
pub fn ensure_host_packages() -> Result<(), String> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        return Err(format!(
            "missing host packages; install them with: sudo apt-get install {}",
            missing.join(" ")
        ));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    assets::run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    assets::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

extern "C" {
    fn geteuid() -> u32;
}

pub fn cargo(root: &Path, args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let xtask =
        std::env::current_exe().map_err(|e| format!("cannot find the xtask binary: {e}"))?;
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .env("TANDEM_XTASK", xtask)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

/// `cargo xtask test [ARGS]`: host packages, formatting and clippy checks, the release build and
/// the guest images first, then
/// `cargo test --workspace ARGS` with the integration tests pointed at this xtask.
pub fn test(root: &Path, extra: &[String]) -> Result<i32, String> {
    ensure_host_packages()?;
    cargo(root, &["fmt", "--all", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cargo(
        root,
        &["build", "--release", "-p", "tandem", "-p", "tandem-testkit"],
    )?;
    assets::ensure(&assets::cache_root()?)?;
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)?;
    Ok(0)
}

/// `cargo xtask shell`: boots Debian's cloud kernel in tandem, in the testbed, to a shell.
pub fn shell(opts: &mut testbed::Options) -> Result<i32, String> {
    ensure_host_packages()?;
    opts.cmd = [
        "tandem",
        "run",
        "--kernel",
        "/guests/vmlinuz",
        "--initrd",
        "/guests/initramfs.cpio.gz",
        "--cpus",
        "2",
        "--memory",
        "1G",
    ]
    .map(String::from)
    .to_vec();
    testbed::run(opts)
}

/// `cargo xtask guests-dir`: prints the directory holding the guest images (building it first).
pub fn guests_dir() -> Result<i32, String> {
    let a = assets::ensure(&assets::cache_root()?)?;
    println!("{}", a.dir.join("guests").display());
    Ok(0)
}
