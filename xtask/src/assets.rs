//! Testbed assets: Debian's kernels, busybox and rt-tests, fetched with `apt-get download`, unpacked with
//! `dpkg-deb -x` and turned into initramfs archives, all cached under one versioned directory.

use crate::cpio::{Gzip, Writer};
use crate::modules::Modules;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Bump when the recipe changes in a way the hash of its inputs does not catch.
const RECIPE: u32 = 4;
/// `/init` of the L2 guest initramfs.
pub const GUEST_INIT: &str = include_str!("guest_init.sh");
/// busybox udhcpc's script in the L2 guest.
pub const UDHCPC_SCRIPT: &str = include_str!("udhcpc.script");
/// Modules the test host loads, with their dependencies (in load order): KVM; `dummy`, `tun`
/// and `veth` for network tests and benchmarks that need a routable interface, a TAP device or
/// a second network namespace; nftables with NAT for port forwarding over TAP; and virtio-net
/// for the network card `--forward` gives the test host.
const KVM_MODULES: &[&str] = &[
    "kvm_amd",
    "virtio_pci",
    "virtio_net",
    "dummy",
    "tun",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_fib_ipv4",
];
/// Modules carried in the guest initramfs, with their dependencies; the guest's init loads them
/// by device alias, as udev would.
const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    // Not loaded by alias: a guest binds it to a channel's ivshmem device (new_id) to take
    // doorbell interrupts.
    "uio_pci_generic",
];
/// [`KVM_MODULES`] for arm64, whose KVM is built in; libcrc32c (for nftables) wants the crc32c
/// algorithm, which x86_64's kernel has built in and arm64's has as a module (a `softdep`, which
/// the dependencies in `.modinfo` do not name).
const AARCH64_L1_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "dummy",
    "tun",
    "veth",
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_fib_ipv4",
];
const BUSYBOX: &str = "busybox-static";
/// nft for the aarch64 test host (tandem runs it for port forwards over TAP; the x86_64 tests
/// carry this machine's own): its package and path there, then the packages of the libraries it
/// loads (`nftables` needs `libnftables1` and `libedit2`, which need the rest).
const AARCH64_NFT: &[(&str, &str)] = &[("nftables", "usr/sbin/nft")];
const AARCH64_NFT_LIBS: &[&str] = &[
    "libnftables1",
    "libedit2",
    "libgmp10",
    "libjansson4",
    "libmnl0",
    "libnftnl11",
    "libxtables12",
    "libbsd0",
    "libmd0",
    "libtinfo6",
    "libc6",
];

/// What one architecture's assets are made of.
pub struct Recipe {
    /// Prefix of the cache directory's name.
    prefix: &'static str,
    /// apt's architecture qualifier for the packages (`:arm64`), empty for this machine's.
    apt_arch: &'static str,
    /// How to run the architecture's programs here (qemu-user), if this machine cannot.
    runner: Option<&'static str>,
    /// The kernel flavours, by metapackage, and the name each `vmlinuz` gets under `/guests`;
    /// the first is the test host's and gives the modules.
    kernels: &'static [(&'static str, &'static str)],
    /// Modules the test host loads (those the kernel has built in are skipped).
    l1_modules: &'static [&'static str],
    /// Whether the x86_64 extras are built: `vmlinux` and the rt-tests initramfs.
    x86_extras: bool,
    /// Programs of the test host beyond busybox: (package, path in it), kept at that path.
    l1_programs: &'static [(&'static str, &'static str)],
    /// Packages whose runtime shared libraries the test host gets, for [`Recipe::l1_programs`].
    l1_libs: &'static [&'static str],
}

/// The x86_64 testbed's assets.
pub const X86_64: Recipe = Recipe {
    prefix: "",
    apt_arch: "",
    runner: None,
    kernels: &[
        ("linux-image-cloud-amd64", "vmlinuz"),
        ("linux-image-rt-amd64", "vmlinuz-rt"),
        ("linux-image-amd64", "vmlinuz-generic"),
    ],
    l1_modules: KVM_MODULES,
    x86_extras: true,
    l1_programs: &[],
    l1_libs: &[],
};

/// The aarch64 testbed's assets: Debian's arm64 kernel (KVM built in) and busybox.
pub const AARCH64: Recipe = Recipe {
    prefix: "aarch64-",
    apt_arch: ":arm64",
    runner: Some("qemu-aarch64"),
    kernels: &[("linux-image-arm64", "vmlinuz")],
    l1_modules: AARCH64_L1_MODULES,
    x86_extras: false,
    l1_programs: AARCH64_NFT,
    l1_libs: AARCH64_NFT_LIBS,
};

impl Recipe {
    /// The recipe of `arch`.
    pub fn of(arch: crate::Arch) -> &'static Recipe {
        match arch {
            crate::Arch::X86_64 => &X86_64,
            crate::Arch::Aarch64 => &AARCH64,
        }
    }
}

/// A ready set of assets in the cache.
pub struct Assets {
    /// Versioned directory holding `guests/`, `l1-base.cpio` and `manifest.txt`.
    pub dir: PathBuf,
}

impl Assets {
    /// The test host's kernel (Debian's cloud kernel).
    pub fn l1_kernel(&self) -> PathBuf {
        self.dir.join("guests/vmlinuz")
    }

    /// The static part of the test host's initramfs (busybox, KVM modules, `/guests`), an
    /// uncompressed cpio archive.
    pub fn l1_base(&self) -> PathBuf {
        self.dir.join("l1-base.cpio")
    }
}

/// The cache root: `$TANDEM_CACHE`, else `$HOME/.cache/tandem/testbed`.
pub fn cache_root() -> Result<PathBuf, String> {
    match std::env::var_os("TANDEM_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".cache/tandem/testbed")),
            None => {
                Err("neither TANDEM_CACHE nor HOME is set: no place for the asset cache".into())
            }
        },
    }
}

/// Returns the cached x86_64 assets under `root`, building them first if this recipe has none yet.
pub fn ensure(root: &Path) -> Result<Assets, String> {
    ensure_recipe(root, &X86_64)
}

/// Returns the cached assets of recipe `r` under `root`, building them first if needed.
pub fn ensure_recipe(root: &Path, r: &Recipe) -> Result<Assets, String> {
    let dir = root.join(format!("{}v{RECIPE}-{:016x}", r.prefix, recipe_hash(r)));
    if dir.join("manifest.txt").is_file() {
        return Ok(Assets { dir });
    }
    let start = Instant::now();
    eprintln!(
        "testbed: building assets in {} (once per recipe)",
        dir.display()
    );
    remove_stale(root, ".build-");
    let work = root.join(format!(".build-{}", std::process::id()));
    let built = build(root, &work, r);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&work);
        return Err(e);
    }
    let _ = fs::remove_dir_all(work.join("x"));
    if let Err(e) = fs::rename(&work, &dir) {
        // Another run may have finished the same recipe first; its result is as good as ours.
        let _ = fs::remove_dir_all(&work);
        if !dir.join("manifest.txt").is_file() {
            return Err(format!("cannot move assets into {}: {e}", dir.display()));
        }
    }
    eprintln!(
        "testbed: assets ready after {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(Assets { dir })
}

/// FNV-1a over everything that shapes the cached files, so that a recipe change rebuilds them.
fn recipe_hash(r: &Recipe) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |s: &str| {
        for b in s.bytes().chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    };
    let kernels = r
        .kernels
        .iter()
        .flat_map(|&(package, name)| [package, name]);
    let modules = r.l1_modules.iter().chain(GUEST_MODULES).copied();
    let rt = crate::rtuser::PACKAGES
        .iter()
        .chain(crate::rtuser::PROGRAMS)
        .filter(|_| r.x86_extras);
    let extras = r
        .l1_programs
        .iter()
        .flat_map(|&(package, path)| [package, path])
        .chain(r.l1_libs.iter().copied());
    [GUEST_INIT, UDHCPC_SCRIPT, BUSYBOX]
        .into_iter()
        .chain(kernels)
        .chain(modules)
        .chain(rt.copied())
        .chain(extras)
        .chain(Some(r.apt_arch).filter(|a| !a.is_empty()))
        .for_each(&mut feed);
    h
}

fn build(root: &Path, work: &Path, r: &Recipe) -> Result<(), String> {
    let x = work.join("x");
    let guests = work.join("guests");
    mkdir(&x)?;
    mkdir(&guests)?;
    let debs = root.join("debs");
    mkdir(&debs)?;

    let mut apt = Apt { updated: false };
    let mut pkgs = Vec::new(); // (package, version)
    for (meta, _) in r.kernels {
        let real = apt.kernel_of(&format!("{meta}{}", r.apt_arch))?;
        let version = apt.candidate(&real)?;
        pkgs.push((real, version));
    }
    let busybox_pkg = format!("{BUSYBOX}{}", r.apt_arch);
    let version = apt.candidate(&busybox_pkg)?;
    pkgs.push((busybox_pkg.clone(), version));
    for p in crate::rtuser::PACKAGES.iter().filter(|_| r.x86_extras) {
        pkgs.push((p.to_string(), apt.candidate(p)?));
    }
    let extras: Vec<String> = r
        .l1_programs
        .iter()
        .map(|&(package, _)| package)
        .chain(r.l1_libs.iter().copied())
        .map(|p| format!("{p}{}", r.apt_arch))
        .collect();
    for p in &extras {
        pkgs.push((p.clone(), apt.candidate(p)?));
    }
    let files = fetch(&debs, &pkgs)?;
    std::thread::scope(|scope| {
        let jobs: Vec<_> = pkgs
            .iter()
            .zip(&files)
            .map(|((name, version), deb)| {
                eprintln!("testbed: unpacking {name} {version}");
                let dest = x.join(name);
                scope.spawn(move || {
                    run(
                        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
                        "dpkg-deb -x",
                    )
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .unwrap_or_else(|_| Err("dpkg-deb -x: thread died".into()))
        })
    })?;

    for ((name, _), (_, dest)) in pkgs.iter().zip(r.kernels) {
        let vmlinuz = single(&x.join(name).join("boot"), "vmlinuz-")?;
        fs::copy(&vmlinuz, guests.join(dest))
            .map_err(|e| format!("copy {}: {e}", vmlinuz.display()))?;
    }
    if r.x86_extras {
        eprintln!("testbed: extracting vmlinux from the cloud kernel");
        crate::vmlinux::extract(&guests.join("vmlinuz"), &guests.join("vmlinux"))?;
    }

    let busybox = x.join(&busybox_pkg).join("bin/busybox");
    let mut list = match r.runner {
        Some(runner) => {
            let mut c = Command::new(runner);
            c.arg(&busybox);
            c
        }
        None => Command::new(&busybox),
    };
    let applets = output(list.arg("--list-full"), "busybox --list-full")?;
    let applets: Vec<&str> = applets
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let userland = Userland {
        busybox: &busybox,
        applets: &applets,
    };
    let mods = Modules::open(&x.join(&pkgs[0].0))?;
    eprintln!("testbed: building the guest initramfs");
    guest_initramfs(&guests.join("initramfs.cpio.gz"), &userland, &mods)?;
    if r.x86_extras {
        eprintln!("testbed: building the realtime guest initramfs (rt-tests)");
        crate::rtuser::initramfs(
            &guests.join("initramfs.cpio.gz"),
            &guests.join("initramfs-rt.cpio.gz"),
            &x,
        )?;
    }
    eprintln!("testbed: building the test host's initramfs");
    let extras = L1Extras {
        recipe: r,
        unpacked: &x,
    };
    l1_base(
        &work.join("l1-base.cpio"),
        &userland,
        &mods,
        r.l1_modules,
        &guests,
        &extras,
    )?;

    let mut manifest = format!(
        "recipe v{RECIPE}-{:016x}\nkernel release {}\n",
        recipe_hash(r),
        mods.release
    );
    for (name, version) in &pkgs {
        manifest.push_str(&format!("package {name} {version}\n"));
    }
    fs::write(work.join("manifest.txt"), manifest).map_err(|e| format!("write manifest: {e}"))
}

/// Busybox and the names of its applets.
struct Userland<'a> {
    busybox: &'a Path,
    applets: &'a [&'a str],
}

impl Userland<'_> {
    /// Adds busybox with its applet links, `/dev/console` and the usual top-level directories.
    fn add<W: Write>(&self, w: &mut Writer<W>) -> std::io::Result<()> {
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "guests",
        ] {
            w.dir(d, 0o755)?;
        }
        w.dir("tmp", 0o1777)?;
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.file_from("bin/busybox", self.busybox)?;
        for a in self
            .applets
            .iter()
            .filter(|a| a.trim_matches('/') != "bin/busybox")
        {
            w.symlink(a, "/bin/busybox")?;
        }
        Ok(())
    }
}

/// The L2 guest initramfs (gzip'd): busybox, [`GUEST_INIT`] and the virtio modules (not loaded).
fn guest_initramfs(dest: &Path, userland: &Userland, mods: &Modules) -> Result<(), String> {
    let err = |e: std::io::Error| format!("writing {}: {e}", dest.display());
    let gz = Gzip::create(dest, 9, false).map_err(err)?;
    let mut w = Writer::new(gz);
    userland.add(&mut w).map_err(err)?;
    w.file("init", 0o755, GUEST_INIT.as_bytes()).map_err(err)?;
    w.dir("etc/udhcpc", 0o755).map_err(err)?;
    w.file("etc/udhcpc/default.script", 0o755, UDHCPC_SCRIPT.as_bytes())
        .map_err(err)?;
    let mut dep = String::new();
    let mut alias = String::new();
    for name in mods.resolve(GUEST_MODULES)? {
        let out = mods.out_name(&name);
        let ko = mods.load(&name)?;
        for a in crate::modules::aliases(&ko) {
            alias.push_str(&format!("alias {a} {name}\n"));
        }
        w.file(&format!("lib/modules/{}/{out}", mods.release), 0o644, &ko)
            .map_err(err)?;
        // modules.dep lists each module's dependencies, the one to load first last.
        let mut deps = mods.resolve(&[&name])?;
        deps.pop();
        let deps: Vec<String> = deps
            .iter()
            .rev()
            .map(|d| format!(" {}", mods.out_name(d)))
            .collect();
        dep.push_str(&format!("{out}:{}\n", deps.concat()));
    }
    w.file(
        &format!("lib/modules/{}/modules.dep", mods.release),
        0o644,
        dep.as_bytes(),
    )
    .map_err(err)?;
    w.file(
        &format!("lib/modules/{}/modules.alias", mods.release),
        0o644,
        alias.as_bytes(),
    )
    .map_err(err)?;
    w.finish().and_then(Gzip::finish).map_err(err)
}

/// The test host's programs beyond busybox and their libraries, unpacked under `unpacked`.
struct L1Extras<'a> {
    recipe: &'a Recipe,
    unpacked: &'a Path,
}

impl L1Extras<'_> {
    /// Adds [`Recipe::l1_programs`] at their paths and the runtime libraries of
    /// [`Recipe::l1_libs`] at theirs.
    fn add<W: Write>(&self, w: &mut Writer<W>) -> Result<(), String> {
        let r = self.recipe;
        for &(package, path) in r.l1_programs {
            let src = self
                .unpacked
                .join(format!("{package}{}", r.apt_arch))
                .join(path);
            w.file_from(path, &src)
                .map_err(|e| format!("{}: {e}", src.display()))?;
        }
        for package in r.l1_libs {
            let root = self.unpacked.join(format!("{package}{}", r.apt_arch));
            let mut found = 0;
            crate::rtuser::add_libs(w, &root, &root, &mut found)
                .map_err(|e| format!("{}: {e}", root.display()))?;
            if found == 0 {
                return Err(format!("{package} holds no shared library"));
            }
        }
        Ok(())
    }
}

/// The static part of the test host's initramfs: busybox, the modules `l1_modules` (their load
/// order in `/etc/testbed/modules`), the `extras` and everything in `guests` under `/guests`.
fn l1_base(
    dest: &Path,
    userland: &Userland,
    mods: &Modules,
    l1_modules: &[&str],
    guests: &Path,
    extras: &L1Extras,
) -> Result<(), String> {
    let err = |e: std::io::Error| format!("writing {}: {e}", dest.display());
    // Uncompressed: the test host unpacks it in 0.4 s instead of 1.1 s for gzip -1 (measured).
    let file = fs::File::create(dest).map_err(err)?;
    let mut w = Writer::new(std::io::BufWriter::with_capacity(1 << 20, file));
    userland.add(&mut w).map_err(err)?;
    extras.add(&mut w)?;
    let mut list = String::new();
    for name in mods.resolve(l1_modules)? {
        let path = format!("lib/modules/{}/{}", mods.release, mods.out_name(&name));
        w.file(&path, 0o644, &mods.load(&name)?).map_err(err)?;
        list.push_str(&path);
        list.push('\n');
    }
    w.file("etc/testbed/modules", 0o644, list.as_bytes())
        .map_err(err)?;
    let mut names: Vec<_> = fs::read_dir(guests)
        .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(err)?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy();
        w.file_from(&format!("guests/{name}"), &guests.join(&*name))
            .map_err(err)?;
    }
    w.finish().map(drop).map_err(err)
}

/// apt queries, running `apt-get update` once if a package is unknown.
struct Apt {
    updated: bool,
}

impl Apt {
    /// The candidate version of `pkg`.
    fn candidate(&mut self, pkg: &str) -> Result<String, String> {
        loop {
            let policy = output(
                Command::new("apt-cache").args(["policy", pkg]),
                "apt-cache policy",
            )?;
            let cand = policy
                .lines()
                .find_map(|l| l.trim().strip_prefix("Candidate:"))
                .map(str::trim);
            match cand {
                Some(v) if !v.is_empty() && v != "(none)" => return Ok(v.to_string()),
                _ if self.updated => {
                    return Err(format!(
                        "apt knows no installable {pkg}, even after apt-get update"
                    ))
                }
                _ => {
                    eprintln!("testbed: apt does not know {pkg}; running apt-get update");
                    run(
                        Command::new("apt-get").args(["-q", "update"]),
                        "apt-get update (needs root)",
                    )?;
                    self.updated = true;
                }
            }
        }
    }

    /// The versioned `linux-image-*` package the metapackage `meta` depends on.
    fn kernel_of(&mut self, meta: &str) -> Result<String, String> {
        self.candidate(meta)?;
        let deps = output(
            Command::new("apt-cache").args(["depends", meta]),
            "apt-cache depends",
        )?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|d| {
                d.starts_with("linux-image-")
                    && d.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
            })
            .map(str::to_string)
            .ok_or_else(|| format!("cannot find the kernel package {meta} depends on"))
    }
}

/// Downloads the packages missing from `debs` (one `apt-get download`), returning every `.deb`.
pub(crate) fn fetch(debs: &Path, pkgs: &[(String, String)]) -> Result<Vec<PathBuf>, String> {
    let files: Vec<PathBuf> = pkgs
        .iter()
        .map(|(n, v)| {
            debs.join(format!(
                "{}_{}.deb",
                n.replace(':', "_"),
                v.replace(':', "%3a")
            ))
        })
        .collect();
    let missing: Vec<usize> = (0..pkgs.len()).filter(|&i| !files[i].is_file()).collect();
    if missing.is_empty() {
        return Ok(files);
    }
    remove_stale(debs, ".download-");
    let tmp = debs.join(format!(".download-{}", std::process::id()));
    mkdir(&tmp)?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["-q", "download"]).current_dir(&tmp);
    for &i in &missing {
        let (name, version) = &pkgs[i];
        eprintln!("testbed: downloading {name} {version}");
        cmd.arg(format!("{name}={version}"));
    }
    let result = run(&mut cmd, "apt-get download").and_then(|()| {
        for &i in &missing {
            // apt-get names the file without the `:ARCH` qualifier.
            let name = pkgs[i].0.split(':').next().unwrap_or_default();
            let got = single(&tmp, &format!("{name}_"))?;
            fs::rename(&got, &files[i]).map_err(|e| format!("move {}: {e}", got.display()))?;
        }
        Ok(())
    });
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| files)
}

/// The one entry of `dir` whose name starts with `prefix`.
pub fn single(dir: &Path, prefix: &str) -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "expected one {prefix}* in {}, found {n}",
            dir.display()
        )),
    }
}

/// Removes the entries `PREFIX<pid>` of `dir` that processes no longer running left behind.
pub fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Runs `cmd`, passing its output through only when it fails.
pub fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!("{what} failed ({}): {last}", out.status))
}

/// Runs `cmd` and returns its standard output.
fn output(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
