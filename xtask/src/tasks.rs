//! The tasks besides `testbed`: `build`, `test`, `shell`, `guests-dir`, and the host packages
//! they need.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{assets, testbed, Arch};

/// Debian packages the host needs, with a command that proves each is there.
/// QEMU itself is not listed: [`ensure_qemu_version`] installs it, from backports on Debian 12.
const HOST_PACKAGES: &[(&str, &str)] = &[
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

/// Oldest QEMU whose TCG is a faithful enough nested-SVM host for the testbed. Before 8.2, TCG
/// did not honour the XSETBV intercept (QEMU commit "target/i386: check intercept for XSETBV"):
/// an L2 guest's XSETBV then bypassed the test host's KVM, whose idea of the guest's XCR0 went
/// stale, and L2 kernels saw "XSAVE consistency problem" and, in a few boots out of a hundred,
/// triple faults. Debian 12 ships 7.2; bookworm-backports has a current QEMU.
const MIN_QEMU: (u32, u32) = (8, 2);

/// Where a Debian 12 host gets a QEMU of at least [`MIN_QEMU`].
const BACKPORTS: &str = "bookworm-backports";

/// The QEMU that emulates an aarch64 test host, and its Debian package.
const QEMU_AARCH64: (&str, &str) = ("qemu-system-aarch64", "qemu-system-arm");
/// The QEMU that emulates an x86_64 test host, and its Debian package.
const QEMU_X86_64: (&str, &str) = ("qemu-system-x86_64", "qemu-system-x86");

/// `(major, minor)` from `qemu-system-x86_64 --version` ("QEMU emulator version 10.0.2 ...").
fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn qemu_version(qemu: &str) -> Option<(u32, u32)> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

/// Whether this process runs as root (and so may install packages).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

/// `apt-get update`, then installs `packages` (from `release` if given), without recommends.
pub fn apt_install(packages: &[&str], release: Option<&str>) -> Result<(), String> {
    eprintln!("xtask: installing {}", packages.join(" "));
    assets::run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-qq", "--no-install-recommends"]);
    if let Some(r) = release {
        cmd.args(["-t", r]);
    }
    assets::run(
        cmd.args(packages).env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

/// Installs missing host packages with apt-get when running as root; otherwise says what to do.
/// A QEMU older than [`MIN_QEMU`] is replaced from Debian's backports on Debian 12.
pub fn ensure_host_packages() -> Result<(), String> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            return Err(format!(
                "missing host packages; install them with: sudo apt-get install {}",
                missing.join(" ")
            ));
        }
        apt_install(&missing, None)?;
    }
    ensure_qemu_version(QEMU_X86_64)
}

/// What the testbed of `arch` needs on this machine: for x86_64, [`ensure_host_packages`]; for
/// aarch64, the cross toolchain and qemu-user (the cross build of tandem; the test host's busybox
/// and tandem's libraries are read under qemu-user) and `qemu-system-aarch64`.
pub fn ensure_testbed_packages(arch: Arch) -> Result<(), String> {
    match arch {
        Arch::X86_64 => ensure_host_packages(),
        Arch::Aarch64 => {
            crate::aarch64::ensure_packages()?;
            ensure_qemu_version(QEMU_AARCH64)
        }
    }
}

/// How to get a QEMU of at least [`MIN_QEMU`], from what is installed (`None`: missing) and
/// whether this is Debian 12.
#[derive(Debug, PartialEq)]
enum QemuPlan {
    /// It is there and recent enough.
    Keep,
    /// Install the package from [`BACKPORTS`], along with the QEMU packages already installed
    /// from there: Debian 12's own QEMU is too old, and its packages cannot mix with the
    /// backports' (qemu-system-common is one version for every qemu-system-*).
    Backports,
    /// Install the package from the release's own archive (a later Debian).
    Release,
}

fn qemu_plan(installed: Option<(u32, u32)>, bookworm: bool) -> QemuPlan {
    match installed {
        Some(v) if v >= MIN_QEMU => QemuPlan::Keep,
        _ if bookworm => QemuPlan::Backports,
        _ => QemuPlan::Release,
    }
}

/// Makes sure `qemu` (from Debian's `package`) is at least [`MIN_QEMU`], installing it when it
/// is missing or older (see [`QemuPlan`]).
fn ensure_qemu_version((qemu, package): (&str, &str)) -> Result<(), String> {
    let need = format!("QEMU {}.{} or later", MIN_QEMU.0, MIN_QEMU.1);
    let installed = qemu_version(qemu);
    if installed.is_none() && have(qemu) {
        return Err(format!("cannot read the version of {qemu}"));
    }
    let bookworm = std::fs::read_to_string("/etc/os-release")
        .is_ok_and(|s| s.lines().any(|l| l == "VERSION_CODENAME=bookworm"));
    let plan = qemu_plan(installed, bookworm);
    match installed {
        _ if plan == QemuPlan::Keep => return Ok(()),
        Some((a, b)) => eprintln!("xtask: the testbed needs {need}; this host has {a}.{b}"),
        None => eprintln!("xtask: the testbed needs {qemu}, {need}"),
    }
    if !is_root() {
        let from = if bookworm {
            format!("on Debian 12: add {BACKPORTS} to APT's sources and apt-get install -t {BACKPORTS} {package}")
        } else {
            format!("apt-get install {package}")
        };
        return Err(format!(
            "the testbed needs {need} (older TCG lets nested guests' XSETBV bypass KVM; see \
             docs/testbed.md); as root, {from}"
        ));
    }
    if plan == QemuPlan::Release {
        apt_install(&[package], None)?;
    } else {
        let list = Path::new("/etc/apt/sources.list.d/tandem-backports.list");
        std::fs::write(
            list,
            format!("deb http://deb.debian.org/debian {BACKPORTS} main\n"),
        )
        .map_err(|e| format!("cannot write {}: {e}", list.display()))?;
        // With `-t`, apt also upgrades an installed qemu-user (the aarch64 unit tests' emulator)
        // to the backport along with qemu-system-*: keep the version installed.
        let keep = installed_version("qemu-user").map(|v| format!("qemu-user={v}"));
        let packages: Vec<&str> = std::iter::once(package).chain(keep.as_deref()).collect();
        apt_install(&packages, Some(BACKPORTS))?;
    }
    match qemu_version(qemu) {
        Some(v) if v >= MIN_QEMU => Ok(()),
        _ => Err(format!("installed {package}, but it is not {need}")),
    }
}

/// The installed version of the Debian package `package`, if it is installed.
pub fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status} ${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.strip_prefix("installed ")
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
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

/// The reference real-time guest's own target directory (it is its own workspace).
const RTREF_TARGET_DIR: &str = "target/guests";

/// Where [`build_rtref`] puts the reference real-time guest.
pub fn rtref_path(root: &Path) -> PathBuf {
    root.join(RTREF_TARGET_DIR).join("release/rtref")
}

/// Builds the reference real-time guest (`guests/rtref`, a freestanding kernel in its own
/// workspace, linked by its build script) into [`rtref_path`].
pub fn build_rtref(root: &Path) -> Result<PathBuf, String> {
    let target_dir = root.join(RTREF_TARGET_DIR);
    let target_dir = target_dir
        .to_str()
        .ok_or("the workspace path is not UTF-8")?;
    cargo(
        &root.join("guests/rtref"),
        &["build", "--release", "--target-dir", target_dir],
    )?;
    Ok(rtref_path(root))
}

/// Formatting and clippy checks of the reference real-time guest, which the workspace's own
/// checks do not reach (it is its own workspace).
fn lint_rtref(root: &Path) -> Result<(), String> {
    let dir = root.join("guests/rtref");
    let target_dir = root.join(RTREF_TARGET_DIR);
    let target_dir = target_dir
        .to_str()
        .ok_or("the workspace path is not UTF-8")?;
    cargo(&dir, &["fmt", "--check"])?;
    cargo(
        &dir,
        &[
            "clippy",
            "--release",
            "--quiet",
            "--target-dir",
            target_dir,
            "--",
            "-D",
            "warnings",
        ],
    )
}

/// `cargo xtask build`: the release build of tandem and the test programs, and the reference
/// real-time guest.
pub fn build(root: &Path) -> Result<i32, String> {
    cargo(
        root,
        &["build", "--release", "-p", "tandem", "-p", "tandem-testkit"],
    )?;
    let rtref = build_rtref(root)?;
    eprintln!("xtask: built target/release/tandem and {}", rtref.display());
    Ok(0)
}

/// `cargo xtask test [ARGS]`: host packages, formatting and clippy checks (the workspace's and
/// the reference RT guest's), the release build, the reference RT guest and the guest images
/// first, then `cargo test --workspace ARGS` with the integration tests pointed at this xtask.
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
    lint_rtref(root)?;
    cargo(
        root,
        &["build", "--release", "-p", "tandem", "-p", "tandem-testkit"],
    )?;
    build_rtref(root)?;
    assets::ensure(&assets::cache_root()?)?;
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)?;
    Ok(0)
}

/// The port of the test host that `cargo xtask shell` forwards to the guest's [`SHELL_GUEST_PORT`].
const SHELL_HOST_PORT: u16 = 8080;
/// The guest port that `cargo xtask shell` makes reachable from this machine.
const SHELL_GUEST_PORT: u16 = 80;

/// `cargo xtask shell`'s command in the test host: a 256 MiB ext2 scratch disk, then tandem with
/// that disk and user-mode networking with a forward, booted again after each guest reboot
/// (tandem's status 4). `{PORT}` is this machine's port, for the guest's welcome line.
const SHELL_SCRIPT: &str = r#"truncate -s 256M /tmp/scratch.img && mke2fs -q -F -L scratch /tmp/scratch.img >/dev/null || exit 1
while :; do
	tandem run --kernel /guests/vmlinuz --initrd /guests/initramfs.cpio.gz --cpus 2 --memory 1G \
		--disk path=/tmp/scratch.img,serial=scratch --forward tcp:0.0.0.0:{HOST_PORT}:{GUEST_PORT} \
		--cmdline "console=ttyS0 reboot=k panic=-1 quiet tandem.forward=127.0.0.1:{PORT}:{GUEST_PORT}"
	rc=$?
	[ $rc = 4 ] || exit $rc
	echo "xtask shell: the guest rebooted (tandem exited with status 4); booting it again"
done
"#;

/// `port` on this machine's loopback if it is free, else one the system picks.
fn free_port(port: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return port;
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_or(port, |a| a.port())
}

/// `cargo xtask shell`: boots Debian's cloud kernel in tandem, in the testbed, to a shell with a
/// scratch disk and user-mode networking, the guest's port 80 reached at 127.0.0.1:8080 here
/// (another port when 8080 is taken; the guest's welcome line says which).
pub fn shell(opts: &mut testbed::Options) -> Result<i32, String> {
    if opts.arch != Arch::X86_64 {
        return Err(
            "cargo xtask shell boots guests, which tandem cannot on aarch64 yet (issue 12); \
                    cargo xtask testbed --arch aarch64 gives a shell in the test host"
                .into(),
        );
    }
    ensure_host_packages()?;
    let port = free_port(SHELL_HOST_PORT);
    opts.forwards.push((port, SHELL_HOST_PORT));
    let script = SHELL_SCRIPT
        .replace("{HOST_PORT}", &SHELL_HOST_PORT.to_string())
        .replace("{GUEST_PORT}", &SHELL_GUEST_PORT.to_string())
        .replace("{PORT}", &port.to_string());
    opts.cmd = vec!["sh".into(), "-c".into(), script];
    testbed::run(opts)
}

/// `cargo xtask guests-dir`: prints the directory holding the guest images (building it first).
pub fn guests_dir() -> Result<i32, String> {
    let a = assets::ensure(&assets::cache_root()?)?;
    println!("{}", a.dir.join("guests").display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_forward_takes_another_port_when_its_own_is_in_use() {
        let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let other = free_port(port);
        assert_ne!(other, port);
        assert!(std::net::TcpListener::bind(("127.0.0.1", other)).is_ok());
    }

    #[test]
    fn installed_versions_come_from_dpkg() {
        // xtask runs on Debian, where dpkg is always installed.
        assert!(installed_version("dpkg").is_some_and(|v| v.starts_with(char::is_numeric)));
        assert_eq!(installed_version("tandem-no-such-package"), None);
    }

    #[test]
    fn qemu_versions_are_read_from_the_banner() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some((10, 0))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            Some((7, 2))
        );
        assert!(parse_qemu_version("QEMU emulator version 7.2.22") < Some(MIN_QEMU));
        assert_eq!(parse_qemu_version("no banner"), None);
    }

    #[test]
    fn a_missing_qemu_comes_from_backports_on_debian_12_like_an_old_one() {
        // The aarch64 testbed installs qemu-system-arm from backports, which brings the
        // backports' qemu-system-common; Debian 12's own qemu-system-x86 cannot join it
        // ("held broken packages"), so a missing x86 QEMU must come from backports too.
        assert_eq!(qemu_plan(None, true), QemuPlan::Backports);
        assert_eq!(qemu_plan(Some((7, 2)), true), QemuPlan::Backports);
        assert_eq!(qemu_plan(Some((8, 2)), true), QemuPlan::Keep);
        assert_eq!(qemu_plan(Some((10, 0)), false), QemuPlan::Keep);
        assert_eq!(qemu_plan(None, false), QemuPlan::Release);
        assert!(!HOST_PACKAGES.iter().any(|(p, _)| p.starts_with("qemu")));
    }
}
