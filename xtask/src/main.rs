//! tandem's development tasks, run as `cargo xtask TASK`.

mod aarch64;
mod assets;
mod bench;
mod bench_chan;
mod bench_dev;
mod bench_rt;
mod bench_trace;
mod cpio;
mod demo;
mod firecracker;
mod modules;
mod qemu_aarch64;
mod rtuser;
mod tasks;
mod testbed;
mod vmlinux;

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::exit;

const USAGE: &str = "\
usage: cargo xtask demo [--port N] [--check] the end-to-end demo: a realtime and a general partition
                                            in the testbed; the RT guest's live figures at
                                            http://127.0.0.1:8080/ until Ctrl-C
       cargo xtask build                    release build of tandem, test programs, RT guest
       cargo xtask build --arch aarch64     tandem cross-built for aarch64 (Debian's toolchain,
                                            installed when missing; target/aarch64)
       cargo xtask test [CARGO TEST ARGS]   run the whole test suite (installs what it needs)
       cargo xtask test --arch aarch64 [CARGO TEST ARGS]
                                            the unit tests built for aarch64, under qemu-user
       cargo xtask shell                    boot Debian's kernel in tandem (in the testbed) to a shell
                                            with a scratch disk and the guest's port 80 at
                                            127.0.0.1:8080; poweroff leaves
       cargo xtask guests-dir               print the cached guest images' directory
       cargo xtask bench boot [--trace]     boot time and memory: tandem vs Firecracker and QEMU, in the
                                            testbed; --trace: where boot time goes (initcalls, exits)
       cargo xtask bench boot --arch aarch64
                                            the same in the aarch64 testbed: tandem vs Firecracker
                                            and QEMU (Debian's arm64 build)
       cargo xtask bench rt                 the reference RT guest's exits and latency: tandem vs QEMU
       cargo xtask testbed [OPTIONS] [--] [CMD [ARG]...]

Runs CMD (default: an interactive shell) as root in a nested testbed: QEMU TCG `-cpu max`
booting Debian's cloud kernel with kvm-amd loaded, so /dev/kvm works inside. Present there:
/usr/bin/tandem (release build; also /tandem) and /guests/{vmlinuz,vmlinuz-rt,vmlinuz-generic,
vmlinux,initramfs.cpio.gz,rtref} (rtref: the reference real-time guest, when built). Exits with
CMD's status; 124 on timeout; 125 when the testbed failed.

With --arch aarch64: QEMU TCG `-M virt,virtualization=on,gic-version=3 -cpu max` booting
Debian's arm64 kernel at EL2 (KVM built in), the cross-built tandem (cargo xtask build --arch
aarch64) and /guests/{vmlinuz,initramfs.cpio.gz} for arm64.

options:
  --arch ARCH               x86_64 (default) or aarch64
  --mem SIZE                memory of the test host, as for qemu -m (default 2G)
  --cpus N                  CPUs of the test host (default 2, at most this machine's)
  --with HOSTPATH[:GUESTPATH]
                            carry a file or directory in (default GUESTPATH: HOSTPATH made
                            absolute); may be repeated
  --timeout SECS            stop the test host after SECS seconds (default 900)
  --forward HOSTPORT:PORT   forward 127.0.0.1:HOSTPORT on this machine to PORT of the test host
                            (which then has eth0, 10.0.2.15/24, gateway 10.0.2.2); repeatable
  --no-build                use target/release/tandem and the RT guest as they are
  -h, --help                this text

Assets are cached in $TANDEM_CACHE, else $HOME/.cache/tandem/testbed.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let result = match args.first().map(String::as_str) {
        Some("testbed" | "shell") => {
            let mut opts = match parse_testbed(&args[1..]) {
                Ok(Some(opts)) => opts,
                Ok(None) => return help(),
                Err(e) => usage_error(&e),
            };
            if args[0] == "shell" {
                tasks::shell(&mut opts)
            } else {
                tasks::ensure_testbed_packages(opts.arch).and_then(|()| testbed::run(&opts))
            }
        }
        Some(task @ ("build" | "test")) => match parse_arch(&args[1..]) {
            Ok((Arch::X86_64, rest)) if task == "build" && rest.is_empty() => tasks::build(&root),
            Ok((Arch::X86_64, rest)) if task == "test" => tasks::test(&root, rest),
            Ok((Arch::Aarch64, rest)) if task == "build" && rest.is_empty() => {
                aarch64::build(&root)
            }
            Ok((Arch::Aarch64, rest)) if task == "test" => aarch64::test(&root, rest),
            Ok((_, rest)) => usage_error(&format!("build: unexpected arguments {rest:?}")),
            Err(e) => usage_error(&e),
        },
        Some("guests-dir") => tasks::guests_dir(),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("boot") if args.get(2).map(String::as_str) == Some("--trace") => {
                bench_trace::trace(&root)
            }
            Some("boot") => match parse_arch(&args[2..]) {
                Ok((arch, [])) => bench::boot(&root, arch),
                Ok((_, rest)) => usage_error(&format!("bench boot: unexpected arguments {rest:?}")),
                Err(e) => usage_error(&e),
            },
            Some("net") => bench_dev::net(&root),
            Some("blk") => bench_dev::blk(&root),
            Some("channel") => bench_chan::channel(&root),
            Some("rt") => bench_rt::rt(&root),
            _ => usage_error("bench: which? (boot, net, blk, channel, rt)"),
        },
        Some("bench-run") => bench::run_one(&args[1..]),
        Some("demo") => demo::demo(&root, &args[1..]),
        Some("-h" | "--help") => return help(),
        Some(other) => usage_error(&format!("unknown task {other:?}")),
        None => usage_error("no task given"),
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e}");
        testbed::EXIT_TESTBED
    });
    exit(code);
}

fn help() {
    let _ = writeln!(std::io::stdout(), "{USAGE}");
}

fn usage_error(msg: &str) -> ! {
    let _ = writeln!(
        std::io::stderr(),
        "xtask: {msg} (see cargo xtask testbed --help)"
    );
    exit(2)
}

/// The architectures `build`, `test` and `testbed` build for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// This machine's.
    X86_64,
    /// 64-bit Arm, cross-built (`aarch64.rs`) and emulated.
    Aarch64,
}

impl Arch {
    /// Parses `--arch`'s value.
    fn parse(value: &str) -> Result<Arch, String> {
        match value {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!("--arch {other:?}: expected x86_64 or aarch64")),
        }
    }
}

/// Takes a leading `--arch ARCH` (or `--arch=ARCH`) off `args`; x86_64 when there is none.
fn parse_arch(args: &[String]) -> Result<(Arch, &[String]), String> {
    let (value, rest) = match args.first().map(String::as_str) {
        Some("--arch") => match args.get(1) {
            Some(v) => (v.as_str(), &args[2..]),
            None => return Err("--arch needs a value (x86_64 or aarch64)".into()),
        },
        Some(a) if a.starts_with("--arch=") => (&a["--arch=".len()..], &args[1..]),
        _ => return Ok((Arch::X86_64, args)),
    };
    Ok((Arch::parse(value)?, rest))
}

/// Parses the arguments after `testbed`; `None` when help was asked for.
fn parse_testbed(args: &[String]) -> Result<Option<testbed::Options>, String> {
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut opts = testbed::Options {
        arch: Arch::X86_64,
        mem: "2G".into(),
        cpus: host_cpus.min(2),
        with: Vec::new(),
        timeout: 900,
        no_build: false,
        forwards: Vec::new(),
        cmd: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().filter(|v| !v.starts_with("--")).cloned())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag {
            "--" => {
                opts.cmd.extend(it.by_ref().cloned());
                break;
            }
            "-h" | "--help" => return Ok(None),
            "--no-build" => opts.no_build = true,
            "--arch" => opts.arch = Arch::parse(&value()?)?,
            "--mem" => opts.mem = parse_mem(&value()?)?,
            "--cpus" => {
                let v = value()?;
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--cpus {v:?}: not a CPU count"))?;
                if n > host_cpus {
                    eprintln!(
                        "testbed: --cpus {n}: this machine has {host_cpus}; using {host_cpus}"
                    );
                }
                opts.cpus = n.min(host_cpus);
            }
            "--timeout" => {
                let v = value()?;
                opts.timeout = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--timeout {v:?}: not a number of seconds"))?;
            }
            "--with" => opts.with.push(parse_with(&value()?)?),
            "--forward" => opts.forwards.push(parse_port_pair(&value()?)?),
            f if f.starts_with('-') && opts.cmd.is_empty() => {
                return Err(format!("unknown option {f}"))
            }
            _ => {
                opts.cmd.push(arg.clone());
                opts.cmd.extend(it.by_ref().cloned());
                break;
            }
        }
    }
    if opts.cmd.is_empty() {
        opts.cmd.push("sh".into());
    }
    Ok(Some(opts))
}

/// Checks a QEMU memory size: digits with an optional K/M/G/T suffix.
fn parse_mem(v: &str) -> Result<String, String> {
    let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T']);
    let ok = !digits.is_empty()
        && digits.len() + 1 >= v.len()
        && digits.chars().all(|c| c.is_ascii_digit());
    if ok && digits.parse::<u64>().is_ok_and(|n| n > 0) {
        Ok(v.to_string())
    } else {
        Err(format!("--mem {v:?}: expected a size like 2G or 2048M"))
    }
}

/// Parses `HOSTPORT:GUESTPORT` of `--forward`.
fn parse_port_pair(v: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
    match v.split_once(':').map(|(h, g)| (port(h), port(g))) {
        Some((Some(h), Some(g))) => Ok((h, g)),
        _ => Err(format!("--forward {v:?}: expected HOSTPORT:GUESTPORT")),
    }
}

/// Parses `HOSTPATH[:GUESTPATH]`.
fn parse_with(v: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = match v.split_once(':') {
        Some((h, g)) => (h, Some(g)),
        None => (v, None),
    };
    let host = Path::new(host);
    let abs = std::path::absolute(host).map_err(|e| format!("--with {v}: {e}"))?;
    // Lexically, like the shell would see `a/../b`; symbolic links stay as they are.
    let abs: PathBuf = abs.components().fold(PathBuf::new(), |mut p, c| {
        match c {
            Component::ParentDir => _ = p.pop(),
            Component::CurDir => {}
            c => p.push(c),
        }
        p
    });
    if !host.exists() {
        return Err(format!("--with {v}: {} does not exist", host.display()));
    }
    let guest = match guest {
        Some(g) => g.to_string(),
        None => abs
            .to_str()
            .ok_or(format!("--with {v}: path is not UTF-8"))?
            .to_string(),
    };
    let normal = guest
        .split('/')
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>();
    if !guest.starts_with('/')
        || normal.is_empty()
        || normal.iter().any(|c| *c == "." || *c == "..")
    {
        return Err(format!(
            "--with {v}: the guest path must be absolute, without . or .., and not /"
        ));
    }
    if matches!(normal[0], "proc" | "sys" | "dev" | "testbed") || normal == ["init"] {
        return Err(format!(
            "--with {v}: {guest} would be hidden or overwritten in the test host"
        ));
    }
    Ok((abs, format!("/{}", normal.join("/"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_and_command() {
        let o = parse_testbed(&args(&[
            "--mem=1G",
            "--timeout",
            "5",
            "--no-build",
            "--",
            "ls",
            "-l",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((o.mem.as_str(), o.timeout, o.no_build), ("1G", 5, true));
        assert_eq!(o.cmd, ["ls", "-l"]);
        let o = parse_testbed(&args(&["uname", "--all"])).unwrap().unwrap();
        assert_eq!(o.cmd, ["uname", "--all"]);
        assert_eq!(parse_testbed(&[]).unwrap().unwrap().cmd, ["sh"]);
        assert!(parse_testbed(&args(&["--help"])).unwrap().is_none());
    }

    #[test]
    fn bad_options() {
        for bad in [
            &["--mem"][..],
            &["--mem", "2X"],
            &["--cpus", "0"],
            &["--timeout", "x"],
            &["--bogus"],
        ] {
            assert!(parse_testbed(&args(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_mem("2048M").is_ok() && parse_mem("2").is_ok() && parse_mem("G").is_err());
    }

    #[test]
    fn arch_option() {
        let o = parse_testbed(&args(&["--arch", "aarch64", "--cpus", "1", "ls"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.arch, o.cmd.as_slice()),
            (Arch::Aarch64, &["ls".to_string()][..])
        );
        assert!(parse_testbed(&args(&["--arch", "mips"])).is_err());
        let a = args(&["--arch", "aarch64", "--", "-q"]);
        assert_eq!(parse_arch(&a).unwrap(), (Arch::Aarch64, &a[2..]));
        let a = args(&["--arch=x86_64"]);
        assert_eq!(parse_arch(&a).unwrap(), (Arch::X86_64, &a[1..]));
        let a = args(&["-p", "tandem"]);
        assert_eq!(parse_arch(&a).unwrap(), (Arch::X86_64, &a[..]));
        assert!(parse_arch(&args(&["--arch"])).is_err());
        assert!(parse_arch(&args(&["--arch", "riscv64"])).is_err());
    }

    #[test]
    fn with_paths() {
        let (host, guest) = parse_with("/tmp").unwrap();
        assert_eq!(
            (host.as_path(), guest.as_str()),
            (Path::new("/tmp"), "/tmp")
        );
        assert_eq!(parse_with("/tmp:/opt//x/").unwrap().1, "/opt/x");
        assert_eq!(parse_with("/tmp/../tmp/.").unwrap().1, "/tmp");
        for bad in [
            "/nonexistent-testbed-path",
            "/tmp:rel",
            "/tmp:/",
            "/tmp:/proc/x",
            "/tmp:/a/../b",
        ] {
            assert!(parse_with(bad).is_err(), "{bad}");
        }
    }
}
