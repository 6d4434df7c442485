//! Test fixture: run a shell script on a host whose KVM boots guest kernels: this machine when
//! its KVM runs them at hardware speed (`tandem doctor` says so), otherwise the nested testbed
//! (`cargo xtask testbed`). The script sees `$GUESTS` (the Debian guest images) and `tandem`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

/// What one `run_case` in the script produced.
#[derive(Debug, Clone)]
pub struct Case {
    /// The command's stdout and stderr (for `tandem run`: the guest console, then tandem's
    /// messages).
    pub output: String,
    /// Its exit status.
    pub rc: i32,
    /// Whole seconds it ran.
    pub secs: u64,
}

/// Shell helpers prepended to every script: `record NAME CMD...` runs CMD and prints its output
/// between markers the harness parses; `run_case NAME ARGS...` records `tandem run ARGS...` with
/// no input.
const PRELUDE: &str = r#"
G=${GUESTS:-/guests}
# A heartbeat with the test host's uptime: if it stops, the (emulated) test host hung.
( while sleep 10; do echo "@@@HEARTBEAT $(cut -d' ' -f1 /proc/uptime)"; done ) &
record() {
  name=$1; shift
  start=$(date +%s)
  "$@" >/tmp/case-$name.out 2>&1
  rc=$?
  end=$(date +%s)
  echo "@@@BEGIN $name"
  cat /tmp/case-$name.out
  echo "@@@END $name rc=$rc secs=$((end-start))"
}
run_case() {
  name=$1; shift
  record "$name" timeout 150 tandem run "$@" </dev/null
}
"#;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The xtask command: `$TANDEM_XTASK` (set by `cargo xtask test`), else `cargo xtask`.
fn xtask() -> Command {
    match std::env::var_os("TANDEM_XTASK") {
        Some(x) => Command::new(x),
        None => {
            let mut c = Command::new(env!("CARGO"));
            c.args(["run", "--quiet", "--package", "xtask", "--"])
                .current_dir(workspace_root());
            c
        }
    }
}

fn release_tandem() -> PathBuf {
    workspace_root().join("target/release/tandem")
}

/// Whether this machine's KVM runs guest kernels at hardware speed.
fn host_kvm_is_fast() -> bool {
    Command::new(release_tandem())
        .arg("doctor")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The architecture of the host a script runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// This machine's: its own KVM when that runs guest kernels at hardware speed, else the
    /// x86_64 testbed.
    X86_64,
    /// The aarch64 testbed (`cargo xtask testbed --arch aarch64`), with the cross-built tandem.
    Aarch64,
}

/// Runs `script` where guests can boot; returns the cases it ran, by name, plus the whole output.
pub fn run_script(script: &str) -> (HashMap<String, Case>, String) {
    run_script_with(script, &[])
}

/// [`run_script`], with host files (and the libraries they need) carried to the same paths in
/// the test host.
pub fn run_script_with(script: &str, with: &[&str]) -> (HashMap<String, Case>, String) {
    run_script_on(Arch::X86_64, script, with)
}

/// [`run_script_with`] on a host of architecture `arch`.
pub fn run_script_on(arch: Arch, script: &str, with: &[&str]) -> (HashMap<String, Case>, String) {
    // One test host at a time: two emulated hosts on two cores only slow each other down.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let full = format!("{PRELUDE}\n{script}\necho @@@DONE\nsleep 1\n");
    let output = if arch == Arch::X86_64 && host_kvm_is_fast() {
        run_on_host(&full)
    } else {
        let first = run_in_testbed(arch, &full, with);
        match first.status.code() {
            // The test host hung (its heartbeat stopped well before the timeout) or its kernel
            // died: that is the emulator, not the code under test. Retry the session once, and
            // say so.
            Some(TESTBED_TIMEOUT | TESTBED_FAILED) if test_host_failed(&first) => {
                eprintln!(
                    "test host failed (status {:?}, last heartbeat at {:?} s of {TIMEOUT_S} s); retrying the session once. Its output:\n{}",
                    first.status.code(),
                    last_heartbeat(&text_of(&first)),
                    text_of(&first)
                );
                run_in_testbed(arch, &full, with)
            }
            _ => first,
        }
    };
    let text = text_of(&output);
    assert!(
        output.status.success(),
        "the test host failed (status {:?}); its output:\n{text}",
        output.status.code()
    );
    (parse_cases(&text), text)
}

/// Seconds a testbed session may take (a normal one takes well under a minute).
const TIMEOUT_S: u64 = 300;
/// `cargo xtask testbed`'s status when its timeout ran out.
const TESTBED_TIMEOUT: i32 = 124;
/// `cargo xtask testbed`'s status when the test host itself failed.
const TESTBED_FAILED: i32 = 125;

fn text_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).replace('\r', "") + &String::from_utf8_lossy(&o.stderr)
}

/// The directory of the cached Debian guest images (kernels, initramfs).
pub fn guests_dir() -> PathBuf {
    let guests = xtask()
        .arg("guests-dir")
        .output()
        .expect("xtask guests-dir");
    assert!(
        guests.status.success(),
        "xtask guests-dir failed: {}",
        String::from_utf8_lossy(&guests.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&guests.stdout).trim())
}

fn run_on_host(script: &str) -> Output {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(workspace_root().join("target/release"))
            .chain(std::env::split_paths(&path)),
    )
    .unwrap();
    Command::new("sh")
        .args(["-c", script])
        .env("GUESTS", guests_dir())
        .env("PATH", path)
        .output()
        .expect("cannot run sh")
}

/// The testbed of `arch`. The x86_64 one uses the release build as it is (`cargo xtask test`
/// builds it first); the aarch64 one brings the cross build up to date itself.
fn run_in_testbed(arch: Arch, script: &str, with: &[&str]) -> Output {
    let mut cmd = xtask();
    cmd.args(["testbed", "--timeout", &TIMEOUT_S.to_string()]);
    match arch {
        Arch::X86_64 => cmd.arg("--no-build"),
        Arch::Aarch64 => cmd.args(["--arch", "aarch64"]),
    };
    for w in with {
        cmd.args(["--with", w]);
    }
    cmd.args(["--", "sh", "-c", script])
        .output()
        .expect("cannot start the test host")
}

/// The shared libraries `exe` needs, as `ldd` lists them (absolute paths).
pub fn shared_libs(exe: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(exe).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let p = l.split_once("=>").map_or(l, |(_, p)| p).trim();
            p.split(" (")
                .next()
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        })
        .collect()
}

/// The test host's uptime at its last heartbeat.
fn last_heartbeat(text: &str) -> Option<f64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("@@@HEARTBEAT ")?.trim().parse().ok())
}

/// Whether a failed session is the test host's fault: its kernel died (125), or it timed out with
/// its heartbeat silent for the last minute (every case inside is itself bounded to 150 s, so a
/// live test host would have ended it).
fn test_host_failed(o: &Output) -> bool {
    match o.status.code() {
        Some(TESTBED_FAILED) => true,
        Some(TESTBED_TIMEOUT) => {
            let text = text_of(o);
            // The test host's kernel reporting one of its CPUs stuck: under the emulator its
            // KVM sometimes spins inside KVM_RUN, which no guest or VMM behaviour causes on a
            // working host (KVM reschedules).
            text.contains("watchdog: BUG: soft lockup")
                || last_heartbeat(&text).is_none_or(|t| t + 60.0 < TIMEOUT_S as f64)
        }
        _ => false,
    }
}

fn parse_cases(text: &str) -> HashMap<String, Case> {
    let mut cases = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("@@@BEGIN ") {
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("@@@END ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let field = |p: &str| -> Option<i64> {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix(p))
                    .and_then(|v| v.parse().ok())
            };
            if let Some((n, output)) = current.take() {
                if n == name {
                    cases.insert(
                        name,
                        Case {
                            output,
                            rc: field("rc=").unwrap_or(-1) as i32,
                            secs: field("secs=").unwrap_or(0) as u64,
                        },
                    );
                }
            }
        } else if line.trim_start().starts_with("@@@HEARTBEAT") {
            continue;
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    cases
}

/// The case `name`, or a failure that shows the whole session.
pub fn case<'a>(cases: &'a HashMap<String, Case>, all: &str, name: &str) -> &'a Case {
    cases
        .get(name)
        .unwrap_or_else(|| panic!("case {name} did not run; session output:\n{all}"))
}

/// Kernel command line for a guest that runs `cmd` (single quotes only) and powers off.
pub fn exec_cmdline(cmd: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 quiet tandem.exec=\"{cmd}\"")
}

/// Shell lines that write a `tandem up` config to `path`: VM "a" on CPU 0 booting with command
/// line `ringer`, VM "b" on CPU 1 with `waiter` (the stock guests, 256 MiB each), and a 64 KiB
/// channel "bell" between them.
pub fn channel_pair_config(path: &str, ringer: &str, waiter: &str) -> String {
    // The config holds the command lines as TOML basic strings.
    let toml_basic = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let vm = |name: &str, cmdline: &str, cpu: u32| {
        format!(
            "[[vm]]\nname = \"{name}\"\nkernel = \"/guests/vmlinuz\"\ninitrd = \"/guests/initramfs.cpio.gz\"\n\
             cmdline = \"{}\"\nmemory = \"256M\"\ncpus = [{cpu}]\n\n",
            toml_basic(cmdline)
        )
    };
    format!(
        "cat >{path} <<'TOML'\n{}{}[[channel]]\nname = \"bell\"\nsize = \"64K\"\nmembers = [\"a\", \"b\"]\nTOML\n",
        vm("a", ringer, 0),
        vm("b", waiter, 1)
    )
}

/// The sha256 printed after `label` in `text` (the first line starting with it).
pub fn sha_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|h| h.len() == 64)
}

/// Sum of the "System RAM" ranges in a /proc/iomem dump.
pub fn system_ram_bytes(iomem: &str) -> u64 {
    iomem
        .lines()
        .filter(|l| l.trim_end().ends_with(": System RAM"))
        .filter_map(|l| {
            let range = l.trim().split(' ').next()?;
            let (a, b) = range.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()? + 1)
        })
        .sum()
}

/// Guest shell that finds the channel's ivshmem device (1af4:1110) in sysfs and sets `$dev`,
/// `$regs` (BAR0) and `$shm` (BAR2); `$1` and `$2` are left as BAR2's first and last address.
pub const FIND_IVSHMEM: &str = "for d in /sys/bus/pci/devices/*; do \
     [ $(cat $d/vendor):$(cat $d/device) = 0x1af4:0x1110 ] && dev=$d; done; \
     set -- $(sed -n 1p $dev/resource); regs=$1; set -- $(sed -n 3p $dev/resource); shm=$1; ";

/// A testkit program built by `cargo xtask test` (target/release/NAME), as an absolute path.
pub fn testkit_program(name: &str) -> String {
    std::fs::canonicalize(workspace_root().join("target/release").join(name))
        .unwrap_or_else(|e| panic!("{name} is built by cargo xtask test: {e}"))
        .display()
        .to_string()
}

/// Guest programs for a test: the shell that builds `/tmp/{name}.gz` in the test host (the usual
/// guest initramfs with `programs` and their libraries appended, at the same paths), and the
/// files to carry into the test host for it.
pub fn guest_overlay(name: &str, programs: &[&str]) -> (String, Vec<String>) {
    let mut files: Vec<String> = Vec::new();
    for p in programs {
        files.push(p.to_string());
        files.extend(shared_libs(p));
    }
    let mut entries = std::collections::BTreeSet::new();
    for f in &files {
        let mut p = std::path::Path::new(f);
        entries.insert(p.to_path_buf());
        while let Some(parent) = p.parent().filter(|d| *d != std::path::Path::new("/")) {
            entries.insert(parent.to_path_buf());
            p = parent;
        }
    }
    let list: Vec<String> = entries
        .iter()
        .map(|p| p.display().to_string().trim_start_matches('/').to_string())
        .collect();
    let script = format!(
        "(cd / && printf '%s\\n' {} | cpio -o -H newc 2>/dev/null | gzip -1 >/tmp/{name}-overlay.gz)\n\
         cat /guests/initramfs.cpio.gz /tmp/{name}-overlay.gz >/tmp/{name}.gz\n",
        list.join(" ")
    );
    (script, files)
}

/// The reference real-time guest built by `cargo xtask build` or `cargo xtask test`
/// (target/guests/release/rtref), as an absolute path.
pub fn rtref_guest() -> String {
    std::fs::canonicalize(workspace_root().join("target/guests/release/rtref"))
        .unwrap_or_else(|e| panic!("the reference RT guest is built by cargo xtask build: {e}"))
        .display()
        .to_string()
}

/// The `tandem stats --json` snapshot recorded as case `name` (which must have succeeded).
pub fn stats_snapshot(
    cases: &HashMap<String, Case>,
    all: &str,
    name: &str,
) -> tandem_vmm::stats::Snapshot {
    let c = case(cases, all, name);
    assert_eq!(c.rc, 0, "{name}:\n{}\nsession:\n{all}", c.output);
    serde_json::from_str(c.output.trim()).unwrap_or_else(|e| panic!("{name}: {e}:\n{}", c.output))
}

/// The exits to tandem's user space in tandem's info log line `vcpu0: N exits (pio in A, pio out
/// B, mmio C, interrupted D, other E)`, without the `interrupted` ones (signals to the vCPU
/// thread, not the guest's doing).
pub fn user_space_exits_of(line: &str) -> i64 {
    let after = |key: &str| -> i64 {
        let at = line
            .find(key)
            .unwrap_or_else(|| panic!("{key:?} in {line:?}"))
            + key.len();
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key:?} in {line:?}"))
    };
    after("pio in ") + after("pio out ") + after("mmio ") + after("other ")
}
