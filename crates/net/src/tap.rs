//! The TAP backend: the guest's frames on a host TAP interface (`--net tap=NAME`), for hosts
//! where the administrator bridges or routes it. Creating the interface needs CAP_NET_ADMIN
//! unless it already exists and belongs to the user (`ip tuntap add NAME mode tap user USER`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::NetBackend;

/// Frames read from the TAP device that wait for the guest (beyond this they are dropped, as a
/// full NIC ring drops them).
const MAX_QUEUED: usize = 256;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Errors opening a TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty or longer than an interface name may be.
    #[error("--net tap={0:?}: not a valid interface name (1 to 15 of A-Z a-z 0-9 - _ .)")]
    Name(String),
    /// /dev/net/tun is missing.
    #[error("--net tap: /dev/net/tun is missing (load the tun module)")]
    NoTun,
    /// Not allowed to create or attach the interface.
    #[error("--net tap={0}: permission denied; run as root, or create it for your user first: ip tuntap add {0} mode tap user $USER")]
    Permission(String),
    /// Anything else.
    #[error("--net tap={name}: {source}")]
    Other {
        /// The interface.
        name: String,
        /// Why.
        source: io::Error,
    },
}

/// A TAP interface attached to the guest's network card.
pub struct Tap {
    file: File,
    name: String,
    queued: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Checks that `name` can name an interface: 1 to 15 of `A-Z a-z 0-9 - _ .`, not `.` or
    /// `..`. Linux allows more, but the name goes into nftables rules and /proc paths, where
    /// quotes, separators or braces would change their meaning.
    pub fn check_name(name: &str) -> Result<(), TapError> {
        let ok = (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(TapError::Name(name.into()));
        }
        Ok(())
    }

    /// Opens (creating it if needed) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Tap::check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTun,
                io::ErrorKind::PermissionDenied => TapError::Permission(name.into()),
                _ => TapError::Other {
                    name: name.into(),
                    source: e,
                },
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
                _ => TapError::Other {
                    name: name.into(),
                    source: e,
                },
            });
        }
        tracing::info!("attached to TAP interface {name}");
        Ok(Tap {
            file,
            name: name.into(),
            queued: VecDeque::new(),
            buf: vec![0; 65536],
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) {
        if let Err(e) = self.file.write(frame) {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::debug!("{}: frame not sent: {e}", self.name);
            }
        }
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        self.queued.pop_front()
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn process(&mut self) {
        // Drain the device so its readiness clears; keep what the guest can take.
        loop {
            match self.file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    if self.queued.len() < MAX_QUEUED {
                        self.queued.push_back(self.buf[..n].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_the_kernels_size_and_names_are_checked() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert!(matches!(Tap::open(""), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::Name(_))
        ));
    }

    #[test]
    fn names_nft_or_proc_would_read_specially_are_refused() {
        for bad in [
            "a\"b", "t;x", "t{", "t}", "a b", "a/b", "a:b", ".", "..", "tap\n0", "t$x", "t\\",
            "t#", "t*",
        ] {
            assert!(
                matches!(Tap::check_name(bad), Err(TapError::Name(_))),
                "{bad:?}"
            );
        }
        for good in ["tap0", "tap-guest_1", "vm.0", "a", "x23456789012345"] {
            assert!(Tap::check_name(good).is_ok(), "{good:?}");
        }
    }
}
