//! The stats socket: a Unix stream socket, bound during the VM's privileged setup, served from
//! the VMM thread's event loop. A client connects and reads one JSON [`Snapshot`] line, then
//! EOF; it sends nothing (so `socat - UNIX-CONNECT:PATH` is a client too).
//!
//! What a local client can make the VMM do is bounded: every socket is non-blocking, at most
//! [`MAX_ACCEPT`] connections are taken per wake-up, a snapshot that does not fit the socket's
//! buffer at once waits for the client in a queue of at most [`MAX_PENDING`] (the oldest is
//! dropped to make room), and nothing is ever read from a client.
//!
//! [`Snapshot`]: super::Snapshot

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Collector;

/// Connections accepted per wake-up of the event loop.
pub const MAX_ACCEPT: usize = 16;
/// Clients whose snapshot is partly sent, waiting for them to read.
pub const MAX_PENDING: usize = 8;
const TOK_LISTENER: u64 = u64::MAX;

/// Why the stats socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another live process answers on the path.
    #[error("stats socket {}: another process is serving it", .0.display())]
    InUse(PathBuf),
    /// The path is something other than a socket.
    #[error("stats socket {}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Binding, or the event set, failed.
    #[error("stats socket {}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl ServeError {
    /// Whether the user can fix it by choosing another path.
    pub fn is_user_error(&self) -> bool {
        match self {
            ServeError::InUse(_) | ServeError::NotASocket(_) => true,
            ServeError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOENT | libc::EACCES | libc::ENOTDIR | libc::EROFS | libc::EINVAL)
            ),
        }
    }
}

/// Checks that `path` can be bound: its directory exists, and it is free or a socket nobody
/// serves (left by a VM that ended), which [`StatsServer::bind`] replaces.
pub fn check(path: &Path) -> Result<(), ServeError> {
    let io_err = |source| ServeError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.as_os_str().len() >= 108 {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "longer than a Unix socket path may be (107 bytes)",
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io_err(io::Error::from_raw_os_error(libc::ENOENT)));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ServeError::NotASocket(path.to_path_buf())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ServeError::InUse(path.to_path_buf())),
            Err(_) => Ok(()),
        },
    }
}

/// A client whose snapshot is not all sent yet.
struct Pending {
    stream: OwnedFd,
    data: Vec<u8>,
    sent: usize,
}

/// The listening socket and the clients it still writes to, in an epoll set of their own whose
/// descriptor the event loop watches.
pub struct StatsServer {
    listener: UnixListener,
    path: PathBuf,
    epoll: Epoll,
    pending: VecDeque<Pending>,
}

impl StatsServer {
    /// Binds `path` (owner-only; a stale socket there is replaced) and listens. Done before the
    /// jail and the seccomp filters: serving needs only accept4, sendto and epoll.
    pub fn bind(path: &Path) -> Result<Self, ServeError> {
        check(path)?;
        let io_err = |source| ServeError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let epoll = Epoll::new().map_err(io_err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOK_LISTENER),
            )
            .map_err(io_err)?;
        tracing::info!("stats socket {}", path.display());
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            epoll,
            pending: VecDeque::new(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves what is ready (never blocks): new clients get a snapshot from `collector`, waiting
    /// ones the rest of theirs.
    pub fn serve(&mut self, collector: &Collector) {
        let mut events = [EpollEvent::default(); MAX_PENDING + 1];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("stats socket: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == TOK_LISTENER {
                self.accept(collector);
            } else {
                self.resume(ev.data() as RawFd);
            }
        }
    }

    fn accept(&mut self, collector: &Collector) {
        for _ in 0..MAX_ACCEPT {
            // SAFETY: accept4 on our listener with no address buffer; returns a new descriptor.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!("stats socket: accept: {e}");
                }
                return;
            }
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let stream = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut data = match serde_json::to_vec(&collector.snapshot()) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("stats socket: {e}");
                    continue;
                }
            };
            data.push(b'\n');
            let mut client = Pending {
                stream,
                data,
                sent: 0,
            };
            if send_some(&mut client) == Progress::Blocked {
                self.wait_for(client);
            }
        }
    }

    /// Queues a client to finish later, dropping the oldest when the queue is full.
    fn wait_for(&mut self, client: Pending) {
        if self.pending.len() >= MAX_PENDING {
            // Closing its descriptor takes it out of the epoll set.
            self.pending.pop_front();
        }
        let fd = client.stream.as_raw_fd();
        match self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::OUT, fd as u64),
        ) {
            Ok(()) => self.pending.push_back(client),
            Err(e) => tracing::warn!("stats socket: {e}"),
        }
    }

    fn resume(&mut self, fd: RawFd) {
        let Some(at) = self.pending.iter().position(|p| p.stream.as_raw_fd() == fd) else {
            return;
        };
        if send_some(&mut self.pending[at]) != Progress::Blocked {
            self.pending.remove(at);
        }
    }
}

impl AsRawFd for StatsServer {
    /// The epoll set to watch for input.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Done,
    Blocked,
    Failed,
}

/// Sends what the socket takes without blocking.
fn send_some(c: &mut Pending) -> Progress {
    while c.sent < c.data.len() {
        let rest = &c.data[c.sent..];
        // SAFETY: sends from a buffer we own on a socket we own; MSG_NOSIGNAL: a client gone
        // is EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                c.stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Progress::Blocked,
                io::ErrorKind::Interrupted => continue,
                _ => Progress::Failed,
            };
        }
        c.sent += n as usize;
    }
    Progress::Done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Snapshot;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn collector() -> Collector {
        let not_kvm = std::fs::File::open("/dev/null").unwrap();
        Collector::new(&not_kvm, BTreeMap::from([("k".into(), "v".into())]))
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-stats-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn each_client_reads_one_snapshot_then_eof() {
        let dir = temp("one");
        let path = dir.join("s.sock");
        let mut server = StatsServer::bind(&path).unwrap();
        let c = collector();
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        server.serve(&c);
        for s in [&mut a, &mut b] {
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            assert!(text.ends_with('\n'));
            let snap: Snapshot = serde_json::from_str(&text).unwrap();
            assert_eq!(snap.settings["k"], "v");
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server may not take a live path; a stale one is replaced.
        assert!(matches!(
            StatsServer::bind(&path),
            Err(ServeError::InUse(_))
        ));
        drop(server);
        let _again = StatsServer::bind(&path).unwrap();
        std::fs::write(dir.join("file"), "x").unwrap();
        assert!(matches!(
            StatsServer::bind(&dir.join("file")),
            Err(ServeError::NotASocket(_))
        ));
        assert!(check(&dir.join("no/such/dir/s.sock"))
            .unwrap_err()
            .is_user_error());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clients_that_do_not_read_never_block_the_server_and_are_bounded() {
        let dir = temp("slow");
        let path = dir.join("s.sock");
        let mut server = StatsServer::bind(&path).unwrap();
        // A collector with a big snapshot (many settings), larger than a socket buffer.
        let mut c = collector();
        for i in 0..20_000 {
            c.set(&format!("setting-{i:05}"), "x".repeat(40));
        }
        let clients: Vec<UnixStream> = (0..MAX_PENDING + 4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        for _ in 0..3 {
            server.serve(&c);
        }
        assert!(server.pending.len() <= MAX_PENDING);
        assert!(!server.pending.is_empty());
        // The last client (still queued) reads its snapshot whole while the server is served.
        let mut last = clients.into_iter().last().unwrap();
        last.set_nonblocking(true).unwrap();
        let mut text = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match last.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => server.serve(&c),
                Err(e) => panic!("{e}"),
            }
        }
        let snap: Snapshot = serde_json::from_slice(&text).unwrap();
        assert_eq!(snap.settings.len(), 20_001);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
