//! TCP relays: a smoltcp socket facing the guest joined to a host socket.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Instant;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpListenEndpoint;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::policy::Policy;
use super::{Timeouts, GATEWAY, KIND_FLOW, MAX_TCP_FLOWS, TOKEN_KIND_SHIFT};

/// Connections beyond [`MAX_TCP_FLOWS`] that have ended (closed to make room, finished) but not
/// yet been reaped (the guest's reset goes out first); a burst of new ones past this is refused.
pub(super) const MAX_EVICTED_PENDING: usize = 64;

/// Buffer size of each direction of a relayed connection.
const BUFFER: usize = 256 << 10;
/// First local port of connections tandem opens to the guest.
const EPHEMERAL_FIRST: u16 = 49152;

struct Flow {
    handle: SocketHandle,
    host: TcpStream,
    /// The host connect() has not finished yet.
    connecting: bool,
    /// The host sent FIN (we closed the guest-facing side).
    host_eof: bool,
    /// We passed the guest's FIN on (shutdown of the host socket's write side).
    host_write_shut: bool,
    /// A host write would block.
    want_out: bool,
    /// The host socket hung up: relayed on every pump instead of on its events.
    hung_up: bool,
    /// The host socket is in the epoll set (with `interest`; hang-ups and errors are reported
    /// even with none, so a socket that hung up must leave it).
    in_epoll: bool,
    interest: EventSet,
    established: bool,
    key: Option<(SocketAddrV4, SocketAddrV4)>,
    /// Reaped after this many more pumps (set when the flow is finished or aborted).
    dying: Option<u8>,
    /// When it was opened.
    since: Instant,
    /// When data last moved.
    last: Instant,
}

impl Flow {
    fn new(
        handle: SocketHandle,
        host: TcpStream,
        connecting: bool,
        key: Option<(SocketAddrV4, SocketAddrV4)>,
        now: Instant,
    ) -> Flow {
        Flow {
            handle,
            host,
            connecting,
            host_eof: false,
            host_write_shut: false,
            want_out: false,
            hung_up: false,
            in_epoll: false,
            interest: if connecting {
                EventSet::OUT
            } else {
                EventSet::empty()
            },
            established: false,
            key,
            dying: None,
            since: now,
            last: now,
        }
    }

    /// Stops watching the host socket (a socket that hung up would wake epoll forever).
    fn unwatch(&mut self, epoll: &Epoll) {
        if self.in_epoll {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                self.host.as_raw_fd(),
                EpollEvent::default(),
            );
            self.in_epoll = false;
            self.interest = EventSet::empty();
        }
    }
}

/// All relayed connections.
#[derive(Default)]
pub struct Flows {
    slots: Vec<Option<Flow>>,
    by_key: HashMap<(SocketAddrV4, SocketAddrV4), usize>,
    next_port: u16,
    count: usize,
    policy: Policy,
    timeouts: Timeouts,
    /// Host socket events handled (the tests count them).
    events: u64,
    /// New connections refused because the table was full.
    refused: u64,
    /// Connections closed to make room for new ones.
    evicted: u64,
    /// What idleness is judged by.
    clock: super::clock::Clock,
}

fn token(index: usize) -> u64 {
    KIND_FLOW << TOKEN_KIND_SHIFT | index as u64
}

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; BUFFER]),
        tcp::SocketBuffer::new(vec![0; BUFFER]),
    );
    s.set_nagle_enabled(false);
    s
}

/// A non-blocking connect to `addr`; `Ok` while it is in progress.
fn connect_nonblocking(addr: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); the descriptor is owned by the TcpStream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sa is a valid sockaddr_in for the length given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl Flows {
    /// No connections yet; the guest may open those `policy` allows; connections end after
    /// `timeouts`.
    pub fn new(policy: Policy, timeouts: Timeouts) -> Self {
        Flows {
            policy,
            timeouts,
            ..Flows::default()
        }
    }

    /// Connections open now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Changes the timeouts (so that a test need not wait for them).
    #[cfg(test)]
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// Host socket events handled so far.
    #[cfg(test)]
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Moves the connections' clock on by `by` (so that a test need not wait).
    #[cfg(test)]
    pub fn advance(&mut self, by: std::time::Duration) {
        self.clock.advance(by);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Connections closed to make room for new ones so far.
    #[cfg(test)]
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Whether a new connection may open: there is room, or a connection was closed to make
    /// some, as Linux's conntrack does when its table is full (`early_drop`): the oldest one
    /// in its handshake for at least [`Timeouts::evict_handshake`], else the one idle longest
    /// if idle at least [`Timeouts::evict_idle`]. A connection moving data is never closed.
    /// When none qualifies the new one is refused, with a log line at the 1st, 2nd, 4th, ...
    /// time.
    fn make_room(&mut self, sockets: &mut SocketSet<'static>, epoll: &Epoll) -> bool {
        if self.count < MAX_TCP_FLOWS {
            return true;
        }
        let victim = if self.count >= MAX_TCP_FLOWS + MAX_EVICTED_PENDING {
            None
        } else {
            let live = || {
                let slots = self.slots.iter().enumerate();
                slots.filter_map(|(i, s)| s.as_ref().filter(|f| f.dying.is_none()).map(|f| (i, f)))
            };
            if live().count() < MAX_TCP_FLOWS {
                // Finished or closed connections take room until they are reaped.
                return true;
            }
            let now = self.now();
            let (min_handshake, min_idle) =
                (self.timeouts.evict_handshake, self.timeouts.evict_idle);
            live()
                .filter(|(_, f)| {
                    !f.established && now.saturating_duration_since(f.since) >= min_handshake
                })
                .min_by_key(|(_, f)| f.since)
                .or_else(|| {
                    live()
                        .filter(|(_, f)| now.saturating_duration_since(f.last) >= min_idle)
                        .min_by_key(|(_, f)| f.last)
                })
                .map(|(i, _)| i)
        };
        let Some(f) = victim.and_then(|i| self.slots[i].as_mut()) else {
            self.refused += 1;
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    "user network: connection limit ({MAX_TCP_FLOWS}) reached, refusing new connections ({} so far)",
                    self.refused
                );
            }
            return false;
        };
        // The guest gets a reset; the host socket closes when the flow is reaped.
        sockets.get_mut::<tcp::Socket>(f.handle).abort();
        f.dying = Some(1);
        f.unwatch(epoll);
        self.evicted += 1;
        if self.evicted.is_power_of_two() {
            tracing::info!(
                "user network: connection limit ({MAX_TCP_FLOWS}) reached, closed an idle or half-open connection to make room ({} so far)",
                self.evicted
            );
        }
        true
    }

    fn insert(&mut self, epoll: &Epoll, mut flow: Flow) -> Option<usize> {
        let index = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let ev = EpollEvent::new(flow.interest, token(index));
        if let Err(e) = epoll.ctl(ControlOperation::Add, flow.host.as_raw_fd(), ev) {
            tracing::warn!("user network: cannot watch a connection: {e}");
            return None;
        }
        flow.in_epoll = true;
        if let Some(k) = flow.key {
            self.by_key.insert(k, index);
        }
        self.slots[index] = Some(flow);
        self.count += 1;
        Some(index)
    }

    /// The guest sent a SYN from `src` to `dst`: connect on the host and have a socket listen
    /// for it. Without a listener the stack answers with a reset (refused, unreachable, full).
    pub fn open_outbound(
        &mut self,
        sockets: &mut SocketSet<'static>,
        epoll: &Epoll,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    ) {
        if self.by_key.contains_key(&(src, dst)) {
            return; // A retransmitted SYN.
        }
        let Some(target) = self.policy.host_target(dst) else {
            tracing::debug!("user network: connection to {dst} refused by the network's policy");
            return;
        };
        if !self.make_room(sockets, epoll) {
            return;
        }
        let host = match connect_nonblocking(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("user network: connect to {target} failed: {e}");
                return;
            }
        };
        let mut sock = new_socket();
        let ep = IpListenEndpoint {
            addr: Some((*dst.ip()).into()),
            port: dst.port(),
        };
        if sock.listen(ep).is_err() {
            return;
        }
        let handle = sockets.add(sock);
        let flow = Flow::new(handle, host, true, Some((src, dst)), self.now());
        if self.insert(epoll, flow).is_none() {
            sockets.remove(handle);
        }
    }

    /// A host connection accepted on a forward: open a connection to `guest` from the gateway.
    pub fn open_inbound(
        &mut self,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        epoll: &Epoll,
        host: TcpStream,
        guest: SocketAddrV4,
    ) {
        if !self.make_room(sockets, epoll) {
            return;
        }
        if host.set_nonblocking(true).is_err() {
            return;
        }
        let _ = host.set_nodelay(true);
        let mut sock = new_socket();
        let port = self.ephemeral_port(sockets);
        let remote = (smoltcp::wire::IpAddress::from(*guest.ip()), guest.port());
        let local = (smoltcp::wire::IpAddress::from(GATEWAY), port);
        if let Err(e) = sock.connect(iface.context(), remote, local) {
            tracing::warn!("user network: cannot connect to the guest: {e}");
            return;
        }
        let handle = sockets.add(sock);
        let flow = Flow::new(handle, host, false, None, self.now());
        if self.insert(epoll, flow).is_none() {
            sockets.remove(handle);
        }
    }

    fn ephemeral_port(&mut self, sockets: &SocketSet<'static>) -> u16 {
        for _ in 0..(u16::MAX - EPHEMERAL_FIRST) {
            if self.next_port < EPHEMERAL_FIRST {
                self.next_port = EPHEMERAL_FIRST;
            }
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            let used = self.slots.iter().flatten().any(|f| {
                sockets
                    .get::<tcp::Socket>(f.handle)
                    .local_endpoint()
                    .is_some_and(|e| e.port == p)
            });
            if !used {
                return p;
            }
        }
        EPHEMERAL_FIRST
    }

    /// An epoll event on connection `index`'s host socket.
    pub fn host_event(
        &mut self,
        sockets: &mut SocketSet<'static>,
        epoll: &Epoll,
        index: usize,
        ev: u32,
    ) {
        self.events += 1;
        let Some(Some(f)) = self.slots.get_mut(index) else {
            return;
        };
        if f.dying.is_some() {
            f.unwatch(epoll);
            return;
        }
        let hup = ev & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if f.connecting {
            match f.host.take_error() {
                Ok(None) if !hup => {
                    f.connecting = false;
                }
                other => {
                    let why = match other {
                        Ok(Some(e)) | Err(e) => e.to_string(),
                        Ok(None) => "hung up".into(),
                    };
                    tracing::debug!("user network: host connect failed: {why}");
                    sockets.get_mut::<tcp::Socket>(f.handle).abort();
                    f.dying = Some(1);
                    f.unwatch(epoll);
                }
            }
        } else if hup {
            // Level-triggered hang-ups would fire until the flow ends: relay without epoll.
            f.hung_up = true;
            f.unwatch(epoll);
        }
    }

    /// Moves data both ways on every connection; true when anything moved.
    pub fn relay(&mut self, sockets: &mut SocketSet<'static>, epoll: &Epoll) -> bool {
        let mut moved = false;
        let now = self.now();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(f) = slot else { continue };
            if f.dying.is_some() {
                f.unwatch(epoll);
                continue;
            }
            let sock = sockets.get_mut::<tcp::Socket>(f.handle);
            if relay_one(f, sock) {
                moved = true;
                f.last = now;
            }
            if f.dying.is_some() || f.hung_up {
                f.unwatch(epoll);
                continue;
            }
            let want = if f.connecting {
                EventSet::OUT
            } else {
                let mut w = EventSet::empty();
                if !f.host_eof && sock.can_send() {
                    w |= EventSet::IN;
                }
                if f.want_out {
                    w |= EventSet::OUT;
                }
                w
            };
            if want != f.interest {
                let ev = EpollEvent::new(want, token(index));
                let _ = epoll.ctl(ControlOperation::Modify, f.host.as_raw_fd(), ev);
                f.interest = want;
            }
        }
        moved
    }

    /// Whether any connection is open (then the timeouts need a periodic look).
    pub fn any(&self) -> bool {
        self.count > 0
    }

    /// Drops finished connections, and ends those whose handshake or idle time ran out.
    pub fn reap(&mut self, sockets: &mut SocketSet<'static>, epoll: &Epoll) {
        let now = self.now();
        for slot in self.slots.iter_mut() {
            let Some(f) = slot else { continue };
            let sock = sockets.get_mut::<tcp::Socket>(f.handle);
            let state = sock.state();
            let finished =
                f.host_eof && f.host_write_shut && matches!(state, State::Closed | State::TimeWait);
            if f.dying.is_none() {
                if finished || (state == State::Closed && !f.connecting) {
                    if state == State::Closed && !finished {
                        // Reset or never answered by the guest.
                        tracing::trace!("user network: connection closed by a reset");
                    }
                    f.dying = Some(0);
                } else if !f.established && now.duration_since(f.since) > self.timeouts.handshake {
                    tracing::debug!("user network: a handshake timed out");
                    sock.abort();
                    f.dying = Some(1);
                } else if f.established && now.duration_since(f.last) > self.timeouts.idle {
                    tracing::debug!("user network: an idle connection timed out");
                    sock.abort();
                    f.dying = Some(1);
                }
            }
            if f.dying.is_some() {
                f.unwatch(epoll);
            }
            match f.dying {
                Some(0) => {
                    sockets.remove(f.handle);
                    if let Some(k) = f.key {
                        self.by_key.remove(&k);
                    }
                    *slot = None;
                    self.count -= 1;
                }
                Some(n) => f.dying = Some(n - 1),
                None => {}
            }
        }
    }
}

fn relay_one(f: &mut Flow, sock: &mut tcp::Socket<'static>) -> bool {
    let mut moved = false;
    if f.connecting {
        return false;
    }
    if sock.state() == State::Established {
        f.established = true;
    }
    // Host to guest.
    while !f.host_eof && sock.can_send() {
        let host = &mut f.host;
        let r = sock.send(|buf| match host.read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => {
                f.host_eof = true;
                sock.close();
                moved = true;
            }
            Ok(Ok(_)) => moved = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) | Err(_) => {
                sock.abort();
                f.dying = Some(1);
                return true;
            }
        }
    }
    // Guest to host.
    f.want_out = false;
    while sock.can_recv() {
        let host = &mut f.host;
        let r = sock.recv(|buf| match host.write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(_)) => moved = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                f.want_out = true;
                break;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) | Err(_) => {
                sock.abort();
                f.dying = Some(1);
                return true;
            }
        }
    }
    // The guest's FIN, once its data is all written.
    let guest_done = matches!(
        sock.state(),
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait | State::Closed
    );
    if f.established && guest_done && !f.host_write_shut && sock.recv_queue() == 0 {
        let _ = f.host.shutdown(Shutdown::Write);
        f.host_write_shut = true;
        moved = true;
    }
    moved
}
