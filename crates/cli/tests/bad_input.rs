//! Bad input gets one clear line on stderr and exit status 2, never a panic or a backtrace.

use std::io::Write;
use std::process::Command;

/// The tandem binary, run as an unprivileged user when `unprivileged` (setpriv, from
/// util-linux, drops root's rights).
fn tandem_cmd(unprivileged: bool) -> Command {
    if unprivileged {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_tandem"),
        ]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_tandem"))
    }
}

fn tandem(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("cannot start tandem (or setpriv, from util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fake_kernel() -> std::path::PathBuf {
    // A file with a bzImage header: enough to pass the format check. One file per call: tests
    // run in parallel and must not rewrite a file another one is reading.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("tandem-fake-bzimage-{}-{n}", std::process::id()));
    let mut bytes = vec![0u8; 0x400];
    bytes[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    path
}

fn assert_one_clear_line(args: &[&str], env: &[(&str, &str)], expect: &str) {
    assert_one_clear_line_from(tandem_cmd(false), args, env, expect);
}

fn assert_one_clear_line_from(cmd: Command, args: &[&str], env: &[(&str, &str)], expect: &str) {
    let (rc, err) = tandem(cmd, args, env);
    assert_eq!(rc, 2, "{args:?}: status; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: exactly one line, got:\n{err}");
    assert!(lines[0].starts_with("tandem: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(expect),
        "{args:?}: expected {expect:?} in {err:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
}

#[test]
fn missing_unreadable_and_non_kernel_files() {
    assert_one_clear_line(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        &[],
        "cannot read kernel /nonexistent/vmlinuz",
    );
    assert_one_clear_line(
        &["run", "--kernel", "/etc/hostname"],
        &[],
        "is not a Linux kernel",
    );
    assert_one_clear_line(&["run", "--kernel", "/etc"], &[], "is not a Linux kernel");
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
        &[],
        "cannot read initramfs",
    );
}

// The x86_64 build given an arm64 kernel (issue 12): one line naming what it is, not "not a
// Linux kernel" (an Image) or a loader error (an aarch64 ELF).
#[test]
fn an_arm64_kernel_is_refused_naming_its_architecture() {
    let mut image = vec![0u8; 0x400];
    image[56..60].copy_from_slice(b"ARM\x64");
    let img = std::env::temp_dir().join(format!("tandem-arm64-image-{}", std::process::id()));
    std::fs::write(&img, &image).unwrap();
    let mut elf = vec![0u8; 0x400];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let vmlinux = std::env::temp_dir().join(format!("tandem-arm64-elf-{}", std::process::id()));
    std::fs::write(&vmlinux, &elf).unwrap();
    for (path, what) in [(&img, "an Image"), (&vmlinux, "an ELF vmlinux")] {
        assert_one_clear_line(
            &["run", "--kernel", path.to_str().unwrap()],
            &[],
            &format!("is an arm64 kernel ({what}); this tandem runs on x86_64"),
        );
    }
    let _ = std::fs::remove_file(img);
    let _ = std::fs::remove_file(vmlinux);
}

#[test]
fn cpu_counts_out_of_range() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--cpus", "0"],
        &[],
        "must be at least 1",
    );
    assert_one_clear_line(
        &["run", "--kernel", k, "--cpus", "255"],
        &[],
        "limit of 254",
    );
    assert_one_clear_line(
        &["run", "--kernel", k, "--cpus", "two"],
        &[],
        "not a number",
    );
}

#[test]
fn memory_sizes_malformed_too_small_or_too_large() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--memory", "12Q"],
        &[],
        "unknown unit",
    );
    assert_one_clear_line(
        &["run", "--kernel", k, "--memory", "lots"],
        &[],
        "not a size",
    );
    assert_one_clear_line(&["run", "--kernel", k, "--memory", "1M"], &[], "too small");
    assert_one_clear_line(
        &["run", "--kernel", k, "--memory", "64T"],
        &[],
        "more than this host has",
    );
}

#[test]
fn missing_or_forbidden_kvm_device() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k],
        &[("TANDEM_KVM_DEVICE", "/nonexistent/kvm")],
        "does not exist",
    );
    assert_one_clear_line(
        &["run", "--kernel", k],
        &[("TANDEM_KVM_DEVICE", "/")],
        "cannot open /",
    );
}

#[test]
fn kvm_device_not_permitted() {
    // As root, drop to an unprivileged user (setpriv, from util-linux) for whom a root-only
    // device node is off limits.
    let dev = std::env::temp_dir().join(format!("tandem-kvm-node-{}", std::process::id()));
    let _ = std::fs::remove_file(&dev);
    std::fs::File::create(&dev).unwrap();
    std::fs::set_permissions(&dev, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let k = fake_kernel();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc_geteuid() } == 0;
    let dev_env = dev.to_str().unwrap();
    assert_one_clear_line_from(
        tandem_cmd(root),
        &["run", "--kernel", k.to_str().unwrap()],
        &[("TANDEM_KVM_DEVICE", dev_env)],
        &format!("permission denied opening {dev_env}"),
    );
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn malformed_flags() {
    assert_one_clear_line(
        &["run", "--kernel", "/x", "--serial", "tcp:1"],
        &[],
        "not stdio, none or file:PATH",
    );
    assert_one_clear_line(&["run"], &[], "--kernel");
    assert_one_clear_line(&["frobnicate"], &[], "unrecognized subcommand");
    assert_one_clear_line(
        &["run", "--kernel", "/x", "--seccomp", "strict"],
        &[],
        "not enforce, log or off",
    );
}

fn scratch_file(name: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = std::env::temp_dir().join(format!("tandem-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn malformed_disk_specs() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    for (spec, expect) in [
        ("/some/file.img", "is not key=value"),
        ("readonly=on", "'path=' is required"),
        ("path=a.img,ro=on", "unknown key 'ro'"),
        (
            "path=a.img,cache=none",
            "cache=none: expected writeback or unsafe",
        ),
        ("path=a.img,readonly=perhaps", "expected on or off"),
        ("path=a.img,path=b.img", "'path' given twice"),
    ] {
        assert_one_clear_line(&["run", "--kernel", k, "--disk", spec], &[], expect);
    }
    assert_one_clear_line(
        &["run", "--kernel", k, "--rng", "maybe"],
        &[],
        "not on or off",
    );
}

#[test]
fn missing_read_only_and_locked_disks() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--disk", "path=/nonexistent/disk.img"],
        &[],
        "disk /nonexistent/disk.img: No such file or directory",
    );
    // A file the user may read but not write, attached read-write.
    let ro = scratch_file("ro-disk", 0o444);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc_geteuid() } == 0;
    let spec = format!("path={}", ro.display());
    assert_one_clear_line_from(
        tandem_cmd(root),
        &["run", "--kernel", k, "--disk", &spec],
        &[],
        "the file is read-only; add readonly=on",
    );
    // A disk another process holds (as another tandem would).
    let busy = scratch_file("busy-disk", 0o644);
    let held = std::fs::File::open(&busy).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc_flock(std::os::fd::AsRawFd::as_raw_fd(&held), 2 | 4) },
        0
    );
    let spec = format!("path={}", busy.display());
    assert_one_clear_line(
        &["run", "--kernel", k, "--disk", &spec],
        &[],
        "locked by another process",
    );
    // Read-only attachments share the lock with each other but not with a writer.
    let spec_ro = format!("path={},readonly=on", busy.display());
    assert_one_clear_line(
        &["run", "--kernel", k, "--disk", &spec_ro],
        &[],
        "locked by another process",
    );
    drop(held);
}

extern "C" {
    #[link_name = "flock"]
    fn libc_flock(fd: i32, op: i32) -> i32;
}

#[test]
fn malformed_net_and_forward_specs_and_a_port_in_use() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--net", "bridge"],
            "'bridge' is not user[,OPTIONS], tap=NAME[,guest-ip=ADDR] or none",
        ),
        (
            vec!["--net", "user,restrict=maybe"],
            "restrict=maybe: expected on or off",
        ),
        (
            vec!["--net", "user,host-loopback=22/x"],
            "host-loopback=22/x: expected on, off or host ports: PORT/PORT/...",
        ),
        (
            vec!["--net", "user,link-local=1"],
            "link-local=1: expected on or off",
        ),
        (vec!["--net", "user,mtu=9000"], "unknown key 'mtu'"),
        (vec!["--net", "tap="], "'tap=' is required"),
        (vec!["--net", "tap=tap0,mac=x"], "unknown key 'mac'"),
        (
            vec!["--net", "tap=tap0,guest-ip=10.0.0"],
            "guest-ip=10.0.0: expected an IPv4 address",
        ),
        (
            vec!["--net", "tap=a-name-that-is-too-long"],
            "not a valid interface name",
        ),
        // Names that would change the meaning of tandem's nft script or of a /proc path.
        (
            vec!["--net", "tap=t\";x,guest-ip=10.0.0.2"],
            "tap=\"t\\\";x\": not a valid interface name",
        ),
        (vec!["--net", "tap=t{"], "not a valid interface name"),
        (vec!["--net", "tap=a b"], "not a valid interface name"),
        (vec!["--net", "tap=.."], "not a valid interface name"),
        (
            vec!["--net", "tap=tap0", "--forward", "2222:22"],
            "--forward with --net tap needs the guest's address: --net tap=NAME,guest-ip=ADDR",
        ),
        (
            vec![
                "--net",
                "tap=tap0,guest-ip=10.0.0.2",
                "--forward",
                "[::1]:2222:22",
            ],
            "only IPv4 host addresses can be mapped over --net tap",
        ),
        (
            vec!["--forward", "tcp:22"],
            "is not [tcp|udp:][HOSTADDR:]HOSTPORT:GUESTPORT",
        ),
        (vec!["--forward", "tcp:0:22"], "'0' is not a port"),
        (vec!["--forward", "tcp:2222:99999"], "'99999' is not a port"),
        (
            vec!["--forward", "tcp:nowhere:2222:22"],
            "'nowhere' is not an IP address",
        ),
        (vec!["--forward", "sctp:1:2:3:4"], "is not [tcp|udp:]"),
        (
            vec!["--net", "none", "--forward", "2222:22"],
            "--forward needs a network",
        ),
        (
            vec!["--console", "stdio"],
            "--serial and --console cannot both be stdio",
        ),
    ] {
        let mut a = vec!["run", "--kernel", k];
        a.extend(args);
        assert_one_clear_line(&a, &[], expect);
    }
    // Checked before anything is created on the host.
    assert_one_clear_line(
        &[
            "run",
            "--kernel",
            k,
            "--net",
            "tap=tap0,guest-ip=10.0.0.2",
            "--forward",
            "2222:22",
        ],
        &[("TANDEM_NFT", "/nonexistent/nft")],
        "--forward with --net tap needs the nft command (Debian package nftables)",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = format!("tcp:{port}:22");
    assert_one_clear_line(
        &["run", "--kernel", k, "--forward", &spec],
        &[],
        &format!("--forward tcp:127.0.0.1:{port}:22: cannot listen on 127.0.0.1:{port}: the port is already in use"),
    );
}

#[test]
fn malformed_and_impossible_channels() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let odd = std::env::temp_dir().join(format!("tandem-chan-odd-{}", std::process::id()));
    std::fs::write(&odd, vec![0u8; 8192]).unwrap();
    let odd_spec = format!("path={},size=4K", odd.display());
    let big = std::env::temp_dir().join(format!("tandem-chan-big-{}", std::process::id()));
    let big_spec = format!("path={},size=512M", big.display());
    for (spec, expect) in [
        ("path=/tmp/c", "'size=' is required"),
        ("size=1M", "'path=' is required"),
        ("path=/tmp/c,size=1M,peer=2", "unknown key 'peer'"),
        ("path=/tmp/c,size=lots", "size=lots: expected a size"),
        (
            "path=/tmp/tandem-chan-3k,size=3K",
            "size 3072 is not a power of two of at least 4 KiB",
        ),
        (
            "path=/nonexistent/dir/c,size=1M",
            "channel /nonexistent/dir/c: No such file or directory",
        ),
        (odd_spec.as_str(), "the file holds 8192 bytes, not 4096"),
        (
            big_spec.as_str(),
            "the PCI devices need more than the 492 MiB of PCI address space",
        ),
    ] {
        assert_one_clear_line(&["run", "--kernel", k, "--channel", spec], &[], expect);
    }
    let _ = std::fs::remove_file(odd);
    let _ = std::fs::remove_file(big);
}

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("tandem-cfg-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_accepts_a_good_config_and_names_the_line_of_every_error() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let vm = |name: &str, role: &str, cpus: &str| {
        format!("[[vm]]\nname = \"{name}\"\nrole = \"{role}\"\nkernel = \"{k}\"\nmemory = \"64M\"\ncpus = {cpus}\n")
    };
    let good = config_file(
        "good",
        &(vm("rt", "realtime", "[1]")
            + &vm("gp", "general", "[0]")
            + "[[channel]]\nname = \"c\"\nsize = \"64K\"\nmembers = [\"rt\", \"gp\"]\n"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["check", good.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok, 2 VM(s), 1 channel(s)"), "{stdout}");
    assert!(stdout.contains("vm rt"), "{stdout}");
    for (name, text, expect) in [
        (
            "unknown",
            vm("a", "general", "[0]") + "colour = \"red\"\n",
            ":7: unknown field `colour`",
        ),
        (
            "rt-shared",
            vm("a", "realtime", "[0]") + &vm("b", "general", "[0]"),
            ":12: CPU 0 belongs to realtime VM 'a' (line 6); 'b' cannot share it",
        ),
        (
            "rt-rt",
            vm("a", "realtime", "[0]") + &vm("b", "realtime", "[0]"),
            ":12: realtime VMs 'a' (line 6) and 'b' both claim CPU 0",
        ),
        (
            "no-cpu",
            vm("a", "general", "[4096]"),
            ":6: CPU 4096 does not exist on this host",
        ),
        (
            "member",
            vm("a", "general", "[0]")
                + &vm("b", "general", "[0]")
                + "[[channel]]\nname = \"c\"\nsize = \"4K\"\nmembers = [\"a\", \"x\"]\n",
            ":16: channel 'c': no VM named 'x'",
        ),
        (
            "memory",
            vm("a", "general", "[0]").replace("64M", "64T"),
            ":5: the VMs up to 'a' need 67108864 MiB of memory; this host has",
        ),
        (
            "kernel",
            vm("a", "general", "[0]").replace(k, "/nonexistent/vmlinuz"),
            ":4: cannot read /nonexistent/vmlinuz",
        ),
        (
            "forward",
            vm("a", "general", "[0]") + "forwards = [\"tcp:99999:22\"]\n",
            ":7: '99999' is not a port",
        ),
        (
            "net-option",
            vm("a", "general", "[0]") + "net = \"user,host-loopback=8000/0\"\n",
            ":7: host-loopback=8000/0: expected on, off or host ports",
        ),
        (
            "tap-name",
            vm("a", "general", "[0]") + "net = \"tap=t{\"\n",
            ":7: tap=\"t{\": not a valid interface name",
        ),
        (
            "disk",
            vm("a", "general", "[0]") + "disks = [\"path=/x,ro=on\"]\n",
            ":7: disk 'path=/x,ro=on': unknown key 'ro'",
        ),
    ] {
        let f = config_file(name, &text);
        let path = f.to_str().unwrap();
        assert_one_clear_line(&["check", path], &[], &format!("{path}{expect}"));
        let _ = std::fs::remove_file(f);
    }
    assert_one_clear_line(
        &["check", "/nonexistent/p.toml"],
        &[],
        "/nonexistent/p.toml: cannot read the config",
    );
    let _ = std::fs::remove_file(good);
}

#[test]
fn placements_that_cannot_be_applied() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--pin-cpus", "0,1", "--cpus", "1"],
            "--pin-cpus lists 2 CPUs for 1 vCPUs",
        ),
        (
            vec!["--pin-cpus", "9999"],
            "CPU 9999 is not available to tandem",
        ),
        (vec!["--pin-cpus", "1-0"], "'1-0' is not a CPU list"),
        (
            vec!["--housekeeping-cpus", "9999"],
            "CPU 9999 is not available to tandem",
        ),
    ] {
        let mut a = vec!["run", "--kernel", k];
        a.extend(args);
        assert_one_clear_line(&a, &[], expect);
    }
    // Without the privilege for SCHED_FIFO.
    assert_one_clear_line_from(
        tandem_cmd(true),
        &["run", "--kernel", k, "--realtime"],
        &[],
        "--realtime: real-time scheduling is not permitted",
    );
    // Without CAP_IPC_LOCK and with a 1 MiB locked-memory limit (setpriv and prlimit are
    // util-linux's).
    let mut locked = Command::new("setpriv");
    locked.args([
        "--bounding-set",
        "-ipc_lock",
        "prlimit",
        "--memlock=1048576",
        "--",
        env!("CARGO_BIN_EXE_tandem"),
    ]);
    assert_one_clear_line_from(
        locked,
        &["run", "--kernel", k, "--lock-memory", "--memory", "64M"],
        &[],
        "--lock-memory: cannot lock 64 MiB of guest memory",
    );
    // No huge pages reserved (where the host has none free).
    let free = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    if free < 32 {
        assert_one_clear_line(
            &["run", "--kernel", k, "--hugepages", "--memory", "64M"],
            &[],
            "--hugepages: 32 huge pages of 2048 KiB are needed",
        );
    }
}

#[test]
fn up_fails_before_starting_anything_and_ps_needs_a_supervisor() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = std::env::temp_dir().join(format!("tandem-up-{}", std::process::id()));
    let cfg = config_file(
        "up",
        &format!(
            "[[vm]]\nname = \"a\"\nkernel = \"{k}\"\nmemory = \"64M\"\ncpus = [0]\n\n\
             [[vm]]\nname = \"b\"\nkernel = \"{k}\"\nmemory = \"64M\"\ncpus = [0]\nforwards = [\"tcp:{port}:22\"]\n"
        ),
    );
    let st = state.to_str().unwrap();
    assert_one_clear_line(
        &["up", cfg.to_str().unwrap(), "--state-dir", st],
        &[],
        &format!("vm 'b': --forward tcp:127.0.0.1:{port}:22: cannot listen on 127.0.0.1:{port}: the port is already in use; nothing was started"),
    );
    assert!(
        !state.join("a.log").exists(),
        "VM a must not have been started"
    );
    let (rc, err) = tandem(tandem_cmd(false), &["ps", "--state-dir", st], &[]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.starts_with("tandem: no tandem up answers at "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_file(cfg);
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn up_refuses_memory_it_could_not_lock() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let cfg = config_file(
        "memlock",
        &format!(
            "[[vm]]\nname = \"rt\"\nkernel = \"{k}\"\nmemory = \"64M\"\ncpus = [0]\nlock_memory = true\n"
        ),
    );
    let _ = std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    // An unprivileged user with a 1 MiB locked-memory limit. The limit is set before setpriv
    // runs, so that setpriv starts tandem itself, as for the other unprivileged cases (a
    // checkout in a directory only root may enter, as mktemp makes, is still reachable then).
    let mut cmd = tandem_cmd(true);
    // SAFETY: setrlimit is async-signal-safe and only lowers this child's own limit.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
            Ok(())
        });
    }
    let path = cfg.to_str().unwrap();
    assert_one_clear_line_from(
        cmd,
        &["up", path, "--state-dir", "/tmp/tandem-memlock-test"],
        &[],
        &format!("{path}:2: vm 'rt': lock_memory needs 64 MiB locked, but the locked-memory limit is 1024 KiB"),
    );
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn up_refuses_a_lock_directory_with_a_planted_link_or_that_others_may_write() {
    use std::os::unix::fs::PermissionsExt;
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let cfg = config_file(
        "locks",
        &format!("[[vm]]\nname = \"rt\"\nrole = \"realtime\"\nkernel = \"{k}\"\nmemory = \"64M\"\ncpus = [0]\n"),
    );
    let base = std::env::temp_dir().join(format!("tandem-lockdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let locks = base.join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o755)).unwrap();
    // What a local user would plant: the lock file as a link to a file only root may write.
    let target = base.join("shadow");
    std::fs::write(&target, "root:x:\n").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&target, locks.join("cpu0")).unwrap();
    let state = base.join("state");
    let args = [
        "up",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let env = [("TANDEM_LOCK_DIR", locks.to_str().unwrap())];
    assert_one_clear_line(&args, &env, "cpu0: it is a symbolic link; remove it");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the link's target keeps its mode");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "root:x:\n");
    // A directory anyone may write in (as /run/lock/tandem was) is refused, not used.
    std::fs::remove_file(locks.join("cpu0")).unwrap();
    std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_one_clear_line(&args, &env, "is writable by group or others (mode 1777)");
    assert!(!locks.join("cpu0").exists());
    // A CPU held elsewhere: refused at once, naming the holder.
    std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o755)).unwrap();
    let held = std::fs::File::create(locks.join("cpu0")).unwrap();
    std::fs::set_permissions(locks.join("cpu0"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc_flock(std::os::fd::AsRawFd::as_raw_fd(&held), 1) },
        0
    );
    assert_one_clear_line(
        &args,
        &env,
        &format!("vm 'rt': CPU 0 is in use by a VM of another tandem up, and a realtime VM needs it to itself; it is held by pid {} (", std::process::id()),
    );
    drop(held);
    let _ = std::fs::remove_file(cfg);
    let _ = std::fs::remove_dir_all(base);
}

#[test]
fn doorbells_that_are_not_distinct_eventfds_and_channel_files_behind_links() {
    use std::os::fd::AsRawFd;
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-bells-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a");
    let b = dir.join("b");
    // Descriptors 10 and 13 are eventfds, 11 a plain file, 12 not open, in tandem's process.
    // SAFETY: eventfd makes new descriptors, closed when this test ends.
    let (e1, e2) = unsafe {
        (
            libc::eventfd(0, libc::EFD_CLOEXEC),
            libc::eventfd(0, libc::EFD_CLOEXEC),
        )
    };
    let file = std::fs::File::open(k).unwrap();
    // Sources far above the targets: dup2 onto itself (a source that happens to be 10-13 in
    // this process) would keep its close-on-exec flag, and one source could overwrite another.
    // SAFETY: F_DUPFD_CLOEXEC makes new descriptors, closed when this test ends.
    let high = |fd: i32| unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    let (e1, e2, f) = (high(e1), high(e2), high(file.as_raw_fd()));
    let cmd = || {
        let mut c = tandem_cmd(false);
        // SAFETY: dup2 and close are async-signal-safe and act on the child's table only.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                libc::dup2(e1, 10);
                libc::dup2(f, 11);
                libc::close(12);
                libc::dup2(e2, 13);
                Ok(())
            });
        }
        c
    };
    let ch = |p: &std::path::Path, bells: &str| {
        format!("path={},size=4K,doorbells={bells}", p.display())
    };
    let run = |specs: &[String], expect: &str| {
        let mut args = vec!["run", "--kernel", k, "--dry-run"];
        for s in specs {
            args.extend(["--channel", s.as_str()]);
        }
        assert_one_clear_line_from(cmd(), &args, &[], expect);
    };
    let expected = "expected eventfd descriptors, one per peer, each above 2 and none twice";
    run(&[ch(&a, "0/10")], &format!("doorbells=0/10: {expected}"));
    run(&[ch(&a, "10/10")], &format!("doorbells=10/10: {expected}"));
    run(
        &[ch(&a, "10/11")],
        &format!("doorbells: descriptor 11 is not an eventfd ({k})"),
    );
    run(&[ch(&a, "10/12")], "doorbells: descriptor 12 is not open");
    run(
        &[ch(&a, "10/13"), ch(&b, "13/10")],
        &format!(
            "channel {}: doorbells: descriptor 13 is given to another channel too",
            b.display()
        ),
    );
    // A link where the channel's file goes is refused, not followed.
    let target = dir.join("target");
    std::fs::write(&target, "").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let spec = format!("path={},size=4K", link.display());
    assert_one_clear_line(
        &["run", "--kernel", k, "--dry-run", "--channel", &spec],
        &[],
        &format!("channel {}: it is a symbolic link", link.display()),
    );
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
    // SAFETY: closing the descriptors made above.
    unsafe {
        libc::close(e1);
        libc::close(e2);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn jail_options_that_cannot_work() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--uid", "1000"],
        &[],
        "--uid and --gid need --jail DIR",
    );
    assert_one_clear_line(
        &["run", "--kernel", k, "--jail", "/nonexistent-jail"],
        &[],
        "--jail /nonexistent-jail: No such file or directory",
    );
    let open = std::env::temp_dir().join(format!("tandem-open-jail-{}", std::process::id()));
    std::fs::create_dir_all(&open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--jail", open.to_str().unwrap()],
        &[],
        "group or others may write it",
    );
    let link = open.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/", &link).unwrap();
    assert_one_clear_line(
        &["run", "--kernel", k, "--jail", link.to_str().unwrap()],
        &[],
        "not a directory (links are refused)",
    );
    assert_one_clear_line_from(
        tandem_cmd(true),
        &["run", "--kernel", k, "--jail", "/"],
        &[],
        "--jail needs root",
    );
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_dir(&open);
}

#[test]
fn exits_left_to_the_guest_need_dedicated_cpus_and_a_host_that_offers_them() {
    let k = fake_kernel();
    let k = k.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--disable-exits", "hlt"],
            "--disable-exits hlt: needs --realtime and --pin-cpus",
        ),
        (
            vec!["--realtime", "--disable-exits-optional", "mwait"],
            "--disable-exits mwait: needs --realtime and --pin-cpus",
        ),
        (
            vec!["--disable-exits", "hlt,nmi"],
            "unknown exit 'nmi': expected none or a list of hlt, pause, mwait, cstate",
        ),
    ] {
        let mut a = vec!["run", "--kernel", k, "--dry-run"];
        a.extend(args);
        assert_one_clear_line(&a, &[], expect);
    }
    // An exit this host's KVM keeps: refused with the reason, before anything starts.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let offered = kvm
        .check_extension_raw(kvm_bindings::KVM_CAP_X86_DISABLE_EXITS.into())
        .max(0) as u32;
    let names = [(2, "hlt"), (4, "pause"), (1, "mwait"), (8, "cstate")];
    match names.iter().find(|(bit, _)| offered & bit == 0) {
        Some((_, name)) => assert_one_clear_line(
            &[
                "run",
                "--kernel",
                k,
                "--dry-run",
                "--realtime",
                "--pin-cpus",
                "0",
                "--disable-exits",
                name,
            ],
            &[],
            &format!(
                "--disable-exits {name}: this host's KVM will not leave {name} to the guest: "
            ),
        ),
        None => eprintln!("this host's KVM offers every exit: the refusal cannot be shown here"),
    }
    // What it offers is accepted.
    let status = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "run",
            "--kernel",
            k,
            "--dry-run",
            "--realtime",
            "--pin-cpus",
            "0",
        ])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the realtime defaults take what the host offers"
    );
}

#[test]
fn stats_of_a_vm_that_is_not_there_or_a_socket_nobody_serves() {
    let dir = std::env::temp_dir().join(format!("tandem-stats-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.to_str().unwrap();
    assert_one_clear_line(
        &["stats", "no-such-vm", "--state-dir", st],
        &[],
        "no VM 'no-such-vm' in a tandem up with state directory",
    );
    assert_one_clear_line(
        &["stats", "../etc", "--state-dir", st],
        &[],
        "'../etc' is not a VM name",
    );
    // A socket left by a VM that ended: nobody answers.
    let stale = dir.join("stats-gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert_one_clear_line(
        &["stats", "gone", "--state-dir", st],
        &[],
        "no VM answers on stats socket",
    );
    assert_one_clear_line(
        &["stats", "--socket", stale.to_str().unwrap(), "--json"],
        &[],
        "Connection refused",
    );
    assert_one_clear_line(
        &["stats", "--socket", "/nonexistent/s.sock"],
        &[],
        "no VM answers on stats socket /nonexistent/s.sock",
    );
    assert_one_clear_line(&["stats"], &[], "NAME");
    assert_one_clear_line(
        &["stats", "a", "--socket", "/x"],
        &[],
        "cannot be used with",
    );
    // `tandem run` refuses a stats socket it cannot bind before booting.
    let k = fake_kernel();
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    for (path, expect) in [
        (file.to_str().unwrap(), "exists and is not a socket"),
        ("/nonexistent/s.sock", "No such file or directory"),
    ] {
        assert_one_clear_line(
            &[
                "run",
                "--kernel",
                k.to_str().unwrap(),
                "--stats-socket",
                path,
                "--dry-run",
            ],
            &[],
            expect,
        );
    }
    let _ = std::fs::remove_file(k);
    let _ = std::fs::remove_dir_all(dir);
}
