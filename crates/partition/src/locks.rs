//! The host CPU locks of `tandem up`: one file per CPU in a lock directory, `flock`ed exclusive by
//! a realtime VM and shared by any other, so two supervisors cannot put a realtime VM on a CPU the
//! other uses.
//!
//! The directory must belong to the user running tandem and be writable by nobody else, and it
//! is used only through a descriptor opened without following symbolic links: another local user
//! can neither plant a link that tandem would follow (`cpu0 -> /etc/shadow`) nor hold a lock file
//! open. Root's directory is the host-wide one; an unprivileged user's is their own, so their
//! locks keep only their own supervisors apart (they cannot pin realtime VMs anyway).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Role;
use crate::plan::VmPlan;

/// Why the CPU locks could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The directory could not be created or opened (a symbolic link is refused).
    #[error("lock directory {}: {source}", .path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory belongs to another user.
    #[error("lock directory {} belongs to uid {owner}, not to uid {euid} running tandem; remove it", .path.display())]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who runs tandem.
        euid: u32,
    },
    /// Others may write in the directory.
    #[error("lock directory {} is writable by group or others (mode {mode:04o}); remove it or make it 0755", .path.display())]
    Mode {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A lock file could not be opened, or is not a plain file of this user's.
    #[error("lock file {}: {why}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another supervisor holds the CPU.
    #[error("vm '{vm}': CPU {cpu} {}; it is held by {holder}", if *.realtime { "is in use by a VM of another tandem up, and a realtime VM needs it to itself" } else { "belongs to a realtime VM of another tandem up" })]
    Busy {
        /// The VM that asked.
        vm: String,
        /// The CPU.
        cpu: u32,
        /// Whether the VM is realtime (it wanted the CPU to itself).
        realtime: bool,
        /// Who holds the lock, as far as /proc/locks tells.
        holder: String,
    },
}

/// The locks of one `tandem up`, per VM in plan order. They last as long as this value, and as
/// long as any process that inherited their descriptors (each VM's process does).
#[derive(Debug, Default)]
pub struct CpuLocks {
    per_vm: Vec<Vec<File>>,
}

impl CpuLocks {
    /// The descriptors of VM `vm`'s locks, for its process to inherit.
    pub fn fds(&self, vm: usize) -> Vec<RawFd> {
        self.per_vm
            .get(vm)
            .map(|v| v.iter().map(AsRawFd::as_raw_fd).collect())
            .unwrap_or_default()
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Where `tandem up` keeps its CPU locks: `/run/tandem/locks` for root (the host-wide one), else
/// `$XDG_RUNTIME_DIR/tandem-locks` (or `/tmp/tandem-locks-UID`).
pub fn default_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 {
        return "/run/tandem/locks".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("tandem-locks"),
        None => std::env::temp_dir().join(format!("tandem-locks-{uid}")),
    }
}

/// Opens `path` as a directory without following a symbolic link, creating it (mode 0755)
/// when missing, and checks that it is this user's and that nobody else may write in it.
pub fn open_dir(path: &Path) -> Result<File, LockError> {
    let dir_err = |source| LockError::Dir {
        path: path.to_path_buf(),
        source,
    };
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
    };
    let dir = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .map_err(dir_err)?;
            open()
        }
        other => other,
    }
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
            dir_err(std::io::Error::other(
                "not a directory (a symbolic link is refused)",
            ))
        } else {
            dir_err(e)
        }
    })?;
    let meta = dir.metadata().map_err(dir_err)?;
    if meta.uid() != euid() {
        return Err(LockError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(LockError::Mode {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(dir)
}

/// Opens (creating, mode 0600) `name` in `dir` without following a symbolic link, and checks
/// that it is a plain file of this user's.
fn open_lock_file(dir: &File, dir_path: &Path, name: &str) -> Result<File, LockError> {
    let path = dir_path.join(name);
    let bad = |why: String| LockError::File {
        path: path.clone(),
        why,
    };
    let c = CString::new(name).map_err(|e| bad(e.to_string()))?;
    // SAFETY: openat with a live directory descriptor and a NUL-terminated name; the new
    // descriptor is owned by the File made from it below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY
                | libc::O_CREAT
                | libc::O_NOFOLLOW
                | libc::O_CLOEXEC
                | libc::O_NONBLOCK
                | libc::O_NOCTTY,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(bad(if e.raw_os_error() == Some(libc::ELOOP) {
            "it is a symbolic link; remove it".into()
        } else {
            e.to_string()
        }));
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(bad("not a plain file; remove it".into()));
    }
    if meta.uid() != euid() {
        return Err(bad(format!(
            "it belongs to uid {}, not to uid {}; remove it",
            meta.uid(),
            euid()
        )));
    }
    Ok(file)
}

/// Who holds a lock on `file`, from /proc/locks: "pid N (COMM, uid U)".
fn holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pid = locks.lines().filter(|l| !l.contains("->")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse::<i32>().ok())
            .flatten()
    });
    let Some(pid) = pid.filter(|&p| p > 0) else {
        return "another process".into();
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .next()
                .map(String::from)
        });
    match uid {
        Some(uid) => format!("pid {pid} ({}, uid {uid})", comm.trim()),
        None => format!("pid {pid}"),
    }
}

/// Takes every lock `vms` need on host CPUs in `lock_dir` (see [`open_dir`]): exclusive for
/// realtime VMs, shared for the others. Never waits: a CPU held elsewhere is an error that names
/// the holder.
pub fn lock_cpus(lock_dir: &Path, vms: &[VmPlan]) -> Result<CpuLocks, LockError> {
    let dir = open_dir(lock_dir)?;
    let mut locks = CpuLocks::default();
    for vm in vms {
        let mut held = Vec::new();
        for &cpu in &vm.cpus {
            let f = open_lock_file(&dir, lock_dir, &format!("cpu{cpu}"))?;
            let realtime = vm.role == Role::Realtime;
            let op = if realtime {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
                return Err(LockError::Busy {
                    vm: vm.name.clone(),
                    cpu,
                    realtime,
                    holder: holder(&f),
                });
            }
            held.push(f);
        }
        locks.per_vm.push(held);
    }
    Ok(locks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Restart;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn vm(name: &str, role: Role, cpus: &[u32]) -> VmPlan {
        VmPlan {
            name: name.into(),
            args: Vec::new(),
            role,
            cpus: cpus.to_vec(),
            restart: Restart::Never,
            lock_memory: false,
            hugepages: false,
            inherit: Vec::new(),
            jail: None,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-locks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn cpu_locks_keep_two_supervisors_apart() {
        let dir = scratch("apart");
        // Each call opens its own files, as another tandem up would.
        let first = lock_cpus(
            &dir,
            &[vm("rt", Role::Realtime, &[0]), vm("g", Role::General, &[1])],
        )
        .unwrap();
        let me = format!("pid {} (", std::process::id());
        let e = lock_cpus(&dir, &[vm("x", Role::General, &[0])])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "vm 'x': CPU 0 belongs to a realtime VM of another tandem up; it is held by "
            ) && e.contains(&me),
            "{e}"
        );
        let e = lock_cpus(&dir, &[vm("y", Role::Realtime, &[1])])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("vm 'y': CPU 1 is in use by a VM of another tandem up, and a realtime VM needs it to itself; it is held by ")
                && e.contains(&me),
            "{e}"
        );
        // General VMs may share a CPU across supervisors.
        let shared = lock_cpus(&dir, &[vm("z", Role::General, &[1])]).unwrap();
        drop((first, shared));
        // Once the first supervisor is gone, its CPUs are free.
        lock_cpus(&dir, &[vm("w", Role::Realtime, &[0])]).unwrap();
        // Created owner-only, in a directory only its owner may write.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir.join("cpu0")), 0o600);
        assert_eq!(mode(&dir) & 0o022, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_planted_symbolic_link_is_refused_and_its_target_untouched() {
        let dir = scratch("link");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let target = dir.with_extension("target");
        std::fs::write(&target, "secret").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("cpu0")).unwrap();
        let e = lock_cpus(&dir, &[vm("rt", Role::Realtime, &[0])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpu0: it is a symbolic link"), "{e}");
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret");
        // The directory itself as a link is refused too.
        let link = dir.with_extension("dirlink");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = lock_cpus(&link, &[vm("rt", Role::Realtime, &[1])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a symbolic link is refused"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&target);
        let _ = std::fs::remove_file(&link);
    }

    #[test]
    fn a_directory_others_may_write_or_own_is_refused() {
        let dir = scratch("mode");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = lock_cpus(&dir, &[vm("g", Role::General, &[0])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is writable by group or others (mode 1777)"),
            "{e}"
        );
        assert!(!dir.join("cpu0").exists());
        // Left as it was: tandem never changes the mode of a directory it did not create.
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
        if euid() == 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            let e = lock_cpus(&dir, &[vm("g", Role::General, &[0])])
                .unwrap_err()
                .to_string();
            assert!(e.contains("belongs to uid 65534, not to uid 0"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
