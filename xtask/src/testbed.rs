//! `cargo xtask testbed`: runs a command inside a QEMU TCG test host (L1) whose emulated AMD CPU
//! has SVM (or, with `--arch aarch64`, whose emulated Armv8 CPU has EL2), so that the host gets a
//! working `/dev/kvm` for tandem to boot L2 guests on.

use crate::assets::{self, Assets, Recipe};
use crate::cpio::{Gzip, Writer};
use crate::Arch;
use std::collections::BTreeSet;
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Exit status when the testbed itself failed (assets, build, emulator), not the command.
pub const EXIT_TESTBED: i32 = 125;
/// Exit status when `--timeout` ran out.
pub const EXIT_TIMEOUT: i32 = 124;

const L1_INIT: &str = include_str!("l1_init.sh");

/// How one architecture's test host is emulated.
struct Platform {
    /// The emulator.
    qemu: &'static str,
    /// Its Debian package.
    package: &'static str,
    /// The machine and CPU.
    machine: &'static [&'static str],
    /// The test host's kernel command line. `panic=-1` with QEMU's `-no-reboot` ends the
    /// emulator when the test host's kernel dies; `mitigations=off` because every speculation
    /// mitigation costs emulated instructions, and the emulated CPU needs none.
    cmdline: &'static str,
    /// The first serial port (the console) and the second (where `/init` reports the command's
    /// exit status), as the test host names them.
    ttys: (&'static str, &'static str),
    /// Why `/dev/kvm` could be missing, for `/init`'s error.
    kvm_hint: &'static str,
}

const X86_64: Platform = Platform {
    qemu: "qemu-system-x86_64",
    package: "qemu-system-x86",
    machine: &["-accel", "tcg", "-cpu", "max"],
    cmdline: "console=ttyS0 panic=-1 quiet loglevel=1 mitigations=off",
    ttys: ("ttyS0", "ttyS1"),
    kvm_hint: "kvm-amd did not load: no SVM in the emulated CPU?",
};

/// QEMU's `virt` board with EL2 (`virtualization=on`), so that the kernel starts KVM (VHE), and
/// the GICv3 whose system registers KVM's vGIC needs; `pauth-impdef=on` makes pointer
/// authentication cheap to emulate. Its two PL011 UARTs are ttyAMA0 and ttyAMA1.
const AARCH64: Platform = Platform {
    qemu: "qemu-system-aarch64",
    package: "qemu-system-arm",
    machine: &[
        "-accel",
        "tcg",
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
    ],
    cmdline: "console=ttyAMA0 panic=-1 quiet loglevel=1 mitigations=off",
    ttys: ("ttyAMA0", "ttyAMA1"),
    kvm_hint: "KVM did not start: is the emulated CPU without EL2?",
};

impl Platform {
    fn of(arch: Arch) -> &'static Platform {
        match arch {
            Arch::X86_64 => &X86_64,
            Arch::Aarch64 => &AARCH64,
        }
    }
}
/// How much of the console output to keep for the report when the test host dies.
const TAIL_BYTES: usize = 8192;

/// What to run in the testbed, and how.
pub struct Options {
    /// The test host's architecture.
    pub arch: Arch,
    /// Memory of the test host, as QEMU's `-m` takes it (e.g. `2G`).
    pub mem: String,
    /// CPUs of the test host.
    pub cpus: usize,
    /// Host paths to carry in, with their paths in the test host.
    pub with: Vec<(PathBuf, String)>,
    /// Seconds before the test host is stopped.
    pub timeout: u64,
    /// Skip `cargo build --release -p tandem` (aarch64: its cross build) and the reference RT
    /// guest's build.
    pub no_build: bool,
    /// TCP ports of this machine's loopback forwarded to ports of the test host (which then
    /// has a network card, eth0 at 10.0.2.15).
    pub forwards: Vec<(u16, u16)>,
    /// The command and its arguments.
    pub cmd: Vec<String>,
}

/// Runs the testbed and returns the exit status for xtask: the command's, or
/// [`EXIT_TIMEOUT`]/[`EXIT_TESTBED`].
pub fn run(opts: &Options) -> Result<i32, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask has no parent directory")?;
    if opts.arch == Arch::Aarch64 {
        return run_aarch64(opts, root);
    }
    if !opts.no_build {
        eprintln!("testbed: cargo build --release -p tandem");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "tandem"])
            .current_dir(root)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building tandem failed ({status})"));
        }
        eprintln!("testbed: building the reference real-time guest (guests/rtref)");
        crate::tasks::build_rtref(root)?;
    }
    let rtref = Some(crate::tasks::rtref_path(root)).filter(|p| p.is_file());
    start(opts, &root.join("target/release/tandem"), rtref.as_deref())
}

/// [`run`] for the aarch64 test host: the cross build of tandem, and no reference RT guest (an
/// x86_64 kernel).
fn run_aarch64(opts: &Options, root: &Path) -> Result<i32, String> {
    if !opts.no_build {
        eprintln!("testbed: cargo xtask build --arch aarch64");
        crate::aarch64::build(root)?;
    }
    start(opts, &crate::aarch64::tandem_path(root), None)
}

/// Gets the assets ready and boots the test host with `tandem` (if it was built) and `rtref`.
fn start(opts: &Options, tandem: &Path, rtref: Option<&Path>) -> Result<i32, String> {
    let tandem = if tandem.is_file() {
        Some(tandem)
    } else {
        eprintln!(
            "testbed: warning: {} does not exist; the test host gets no tandem",
            tandem.display()
        );
        None
    };
    let assets = assets::ensure_recipe(&assets::cache_root()?, Recipe::of(opts.arch))?;
    assets::remove_stale(&std::env::temp_dir(), "tandem-testbed-");
    let run_dir = std::env::temp_dir().join(format!("tandem-testbed-{}", std::process::id()));
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let result = boot(opts, &assets, tandem, rtref, &run_dir);
    let _ = fs::remove_dir_all(&run_dir);
    result
}

/// QEMU's `-nic` for the test host: none, or user-mode networking carrying `forwards` from this
/// machine's loopback in.
fn nic(forwards: &[(u16, u16)]) -> String {
    if forwards.is_empty() {
        return "none".into();
    }
    let mut nic = String::from("user,model=virtio-net-pci");
    for (host, guest) in forwards {
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    nic
}

/// Builds this run's initramfs, boots the test host and reports how the command ended.
fn boot(
    opts: &Options,
    assets: &Assets,
    tandem: Option<&Path>,
    rtref: Option<&Path>,
    run_dir: &Path,
) -> Result<i32, String> {
    let platform = Platform::of(opts.arch);
    let initrd = run_dir.join("initrd");
    let base = assets.l1_base();
    fs::copy(&base, &initrd).map_err(|e| format!("copy {}: {e}", base.display()))?;
    write_run_archive(opts, platform, tandem, rtref, &initrd)?;
    let exit_file = run_dir.join("exit");

    let mut qemu = Command::new(platform.qemu);
    qemu.args(platform.machine)
        .args("-nodefaults -display none -no-reboot -monitor none".split(' '))
        .args(["-nic", &nic(&opts.forwards)])
        .args(["-smp", &opts.cpus.to_string(), "-m", &opts.mem])
        .arg("-kernel")
        .arg(assets.l1_kernel())
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", platform.cmdline]);
    if std::io::stdin().is_terminal() {
        // Ctrl-C goes to the test host's console instead of stopping QEMU.
        qemu.args([
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ]);
    } else {
        qemu.args(["-serial", "stdio"]);
    }
    qemu.arg("-serial")
        .arg(format!("file:{}", exit_file.display()));
    qemu.stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());

    let start = Instant::now();
    let (name, package) = (platform.qemu, platform.package);
    let mut child = qemu.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{name} not found (apt-get install {package})"),
        _ => format!("cannot start {name}: {e}"),
    })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let pump = thread::spawn(move || pump(stdout));
    let timed_out = wait(&mut child, start + Duration::from_secs(opts.timeout))?;
    let status = child.wait().map_err(|e| format!("waiting for qemu: {e}"))?;
    let tail = pump.join().unwrap_or_default();
    let _ = std::io::stdout().flush();

    let reported = fs::read_to_string(&exit_file).ok().and_then(|s| {
        let at = s.rfind("TESTBED-EXIT=")? + "TESTBED-EXIT=".len();
        s[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<i32>()
            .ok()
    });
    match reported {
        Some(rc) => Ok(rc),
        None if timed_out => {
            eprintln!("testbed: timed out after {} s", opts.timeout);
            Ok(EXIT_TIMEOUT)
        }
        None if tail.is_empty() && !status.success() => {
            Err(format!("{name} failed to start the test host ({status})"))
        }
        None => {
            eprintln!(
                "testbed: the test host's kernel died before the command finished (emulator failure, not the command)"
            );
            let secs = start.elapsed().as_secs_f64();
            eprintln!("testbed: {name} ended after {secs:.0} s ({status}); last console output:");
            // From the kernel's last alarm, if one is in sight; else the last lines.
            let tail = String::from_utf8_lossy(&tail);
            let lines: Vec<&str> = tail.lines().collect();
            let alarm = lines.iter().rposition(|l| {
                ["Kernel panic", "BUG:", "Oops"]
                    .iter()
                    .any(|a| l.contains(a))
            });
            let from = alarm
                .filter(|&i| lines.len() - i <= 60)
                .unwrap_or(lines.len().saturating_sub(20));
            for line in &lines[from..] {
                eprintln!("  | {}", line.trim_end_matches('\r'));
            }
            Ok(EXIT_TESTBED)
        }
    }
}

/// Waits for QEMU to end, stopping it at `deadline`; true when it had to be stopped.
fn wait(child: &mut Child, deadline: Instant) -> Result<bool, String> {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(false),
            Ok(None) if Instant::now() >= deadline => {
                stop(child);
                return Ok(true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                stop(child);
                return Err(format!("waiting for qemu: {e}"));
            }
        }
    }
}

/// Appends this run's gzip'd cpio (init, command, tandem, the reference RT guest as
/// `/guests/rtref`, `--with` files) to `initrd`.
fn write_run_archive(
    opts: &Options,
    platform: &Platform,
    tandem: Option<&Path>,
    rtref: Option<&Path>,
    initrd: &Path,
) -> Result<(), String> {
    let (console, exit) = platform.ttys;
    let env = format!(
        "TESTBED_CONSOLE=/dev/{console}\nTESTBED_EXIT=/dev/{exit}\nTESTBED_KVM_HINT='{}'\n{}",
        platform.kvm_hint,
        console_env()
    );
    let script = format!(
        "{}\n",
        opts.cmd
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let gz = Gzip::create(initrd, 1, true).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let mut w = Writer::new(gz);
    let io = |e: std::io::Error| format!("building the run's initramfs: {e}");
    w.file("init", 0o755, L1_INIT.as_bytes()).map_err(io)?;
    w.file("testbed/env", 0o644, env.as_bytes()).map_err(io)?;
    w.file("testbed/cmd.sh", 0o644, script.as_bytes())
        .map_err(io)?;
    // Executables built on this machine are usually linked against its libc: carry their libraries.
    let mut libs = BTreeSet::new();
    if let Some(tandem) = tandem {
        w.file_from("usr/bin/tandem", tandem).map_err(io)?;
        w.symlink("tandem", "/usr/bin/tandem").map_err(io)?;
        libs.extend(shared_libs(tandem));
    }
    if let Some(rtref) = rtref {
        w.file_from("guests/rtref", rtref).map_err(io)?;
    }
    for (host, guest) in &opts.with {
        w.tree_from(guest, host)
            .map_err(|e| format!("--with {}: {e}", host.display()))?;
        if host.is_file() {
            libs.extend(shared_libs(host));
        }
    }
    for lib in libs {
        let Some(path) = lib.to_str() else { continue };
        w.file_from(path, &lib)
            .map_err(|e| format!("carrying {path}: {e}"))?;
    }
    w.finish().and_then(Gzip::finish).map_err(io)
}

/// `/testbed/env` for the test host's `/init`: the console's terminal settings for the command
/// (plain "\n" line ends and `TERM=dumb` unless our stdout is a terminal, no echo unless our stdin
/// is one, the window size and `TERM` of an interactive terminal).
fn console_env() -> String {
    let (stdin_tty, stdout_tty) = (
        std::io::stdin().is_terminal(),
        std::io::stdout().is_terminal(),
    );
    let mut stty = String::from("sane");
    let mut env = String::new();
    if !stdout_tty {
        stty.push_str(" -onlcr");
        env.push_str("export TERM=dumb\n");
    }
    if !stdin_tty {
        stty.push_str(" -echo");
    } else {
        let size = Command::new("stty")
            .arg("size")
            .stdin(Stdio::inherit())
            .stderr(Stdio::null())
            .output();
        let size = size
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let size: Vec<u16> = size
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [rows, cols] = size[..] {
            stty.push_str(&format!(" rows {rows} cols {cols}"));
        }
        let term = std::env::var("TERM").unwrap_or_default();
        if !term.is_empty()
            && term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            env.push_str(&format!("export TERM={term}\n"));
        }
    }
    env.push_str(&format!("TESTBED_STTY='{stty}'\n"));
    env
}

/// ELF's `e_machine` for aarch64.
const EM_AARCH64: u16 = 183;

/// The shared libraries and dynamic loader the ELF executable `exe` needs, as `ldd` lists them;
/// none for static executables and other files. An aarch64 executable's are listed by Debian's
/// arm64 dynamic loader (`libc6:arm64`) under qemu-user, and are the multiarch ones under
/// `/lib/aarch64-linux-gnu`.
pub fn shared_libs(exe: &Path) -> Vec<PathBuf> {
    let mut header = [0u8; 20];
    if fs::File::open(exe)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_err()
        || &header[..4] != b"\x7fELF"
    {
        return Vec::new();
    }
    let mut ldd = if u16::from_le_bytes([header[18], header[19]]) == EM_AARCH64 {
        let mut c = Command::new("qemu-aarch64");
        c.args(["/lib/ld-linux-aarch64.so.1", "--list"]);
        c
    } else {
        Command::new("ldd")
    };
    let Ok(out) = ldd
        .arg(exe)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        eprintln!(
            "testbed: warning: cannot run ldd; {} may lack its libraries",
            exe.display()
        );
        return Vec::new();
    };
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
        if path.starts_with("not found") {
            eprintln!("testbed: warning: {} needs {line}", exe.display());
        } else if let Some(path) = path.split(" (").next().filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// Quotes `arg` for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Copies QEMU's console output to our stdout as it comes; returns the last [`TAIL_BYTES`].
fn pump(mut from: impl Read) -> Vec<u8> {
    let mut buf = [0u8; 8192];
    let mut tail = Vec::with_capacity(2 * TAIL_BYTES);
    let mut out = std::io::stdout();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // A closed stdout (e.g. `| head`) must not stop the test host; keep draining.
        let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
        }
    }
    tail
}

/// Stops QEMU: SIGTERM first (it then restores the terminal), SIGKILL after 5 s.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("/guests/vmlinuz"), "/guests/vmlinuz");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME;*"), "'$HOME;*'");
    }
}
