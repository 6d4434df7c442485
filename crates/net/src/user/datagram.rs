//! Datagram relays: UDP from the guest (DNS included), UDP forwards, and ICMP echo through
//! host ping sockets.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::phy::Queues;
use super::policy::Policy;
use super::wire::{echo_reply_frame, udp_frame};
use super::{DNS, GATEWAY, GUEST, KIND_DATAGRAM, TOKEN_KIND_SHIFT};

/// Most UDP relays (guest source ports) and ping identifiers at once; the least recently used
/// one is closed to make room.
const MAX_FLOWS: usize = 256;
/// A relay unused this long is closed.
const IDLE: Duration = Duration::from_secs(120);
/// Client addresses remembered per UDP forward (fewer when there are more than
/// [`PEER_PORTS`] / 64 UDP forwards).
const MAX_PEERS: usize = 64;
/// A UDP forward's client quiet (no datagram either way) this long may give its gateway port
/// up to a new client when the forward remembers [`MAX_PEERS`]; until then new clients'
/// datagrams are dropped, so that the guest's replies to a client in use never reach another
/// one. Linux's conntrack forgets an unreplied UDP flow after as long.
pub(super) const PEER_MIN_IDLE: Duration = Duration::from_secs(30);
/// Gateway ports that stand for UDP-forward clients: from here to 65535, shared by the forwards.
const PEER_PORT_BASE: u16 = 40000;
/// How many such ports there are; also the most UDP forwards (one client each).
pub const PEER_PORTS: usize = 65536 - PEER_PORT_BASE as usize;

enum Slot {
    /// The guest's datagrams from one source port, relayed from one host socket.
    Nat {
        guest: SocketAddrV4,
        sock: UdpSocket,
        last: Instant,
    },
    /// Echo requests with one identifier, through one host ping socket.
    Ping {
        ident: u16,
        sock: UdpSocket,
        last: Instant,
    },
    /// A host UDP port forwarded to a guest port.
    Forward {
        sock: UdpSocket,
        guest_port: u16,
        /// Each client and when a datagram last went to or came from it.
        peers: Vec<(SocketAddr, Instant)>,
        /// The gateway port of `peers[0]`.
        base: u16,
        /// Most clients remembered.
        cap: usize,
    },
}

impl Slot {
    fn sock(&self) -> &UdpSocket {
        match self {
            Slot::Nat { sock, .. } | Slot::Ping { sock, .. } | Slot::Forward { sock, .. } => sock,
        }
    }
}

/// Every datagram relay.
pub struct Datagrams {
    upstream: Option<SocketAddrV4>,
    slots: Vec<Option<Slot>>,
    ping_denied: bool,
    forwards: usize,
    /// Clients per forward: [`MAX_PEERS`], or fewer so that every forward's ports fit.
    peers_per_forward: usize,
    policy: Policy,
    /// Receive buffer for host sockets.
    buf: Vec<u8>,
    /// Datagrams of new UDP-forward clients dropped because every client was in use.
    dropped: u64,
    /// What idleness is judged by.
    clock: super::clock::Clock,
}

fn token(index: usize) -> u64 {
    KIND_DATAGRAM << TOKEN_KIND_SHIFT | index as u64
}

impl Datagrams {
    /// Relays DNS to `upstream` and what `policy` allows; with `restrict`, nothing leaves but
    /// replies to forwards. `udp_forwards` is how many UDP forwards will be added.
    pub fn new(upstream: Option<SocketAddrV4>, policy: Policy, udp_forwards: usize) -> Self {
        Datagrams {
            upstream,
            slots: Vec::new(),
            ping_denied: false,
            forwards: 0,
            peers_per_forward: (PEER_PORTS / udp_forwards.max(1)).clamp(1, MAX_PEERS),
            policy,
            buf: vec![0; 65536],
            dropped: 0,
            clock: super::clock::Clock::default(),
        }
    }

    /// Moves the relays' clock on by `by` (so that a test need not wait).
    #[cfg(test)]
    pub fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    fn insert(&mut self, epoll: &Epoll, slot: Slot) -> io::Result<usize> {
        let fd = slot.sock().as_raw_fd();
        let index = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token(index)),
        )?;
        self.slots[index] = Some(slot);
        Ok(index)
    }

    /// Adds a UDP forward whose host socket is `sock`; `false` when there are more than
    /// [`PEER_PORTS`] (each needs a gateway port for its clients).
    pub fn add_forward(
        &mut self,
        epoll: &Epoll,
        sock: UdpSocket,
        guest_port: u16,
    ) -> io::Result<bool> {
        let first = PEER_PORT_BASE as usize + self.forwards * self.peers_per_forward;
        let cap = self.peers_per_forward;
        let Ok(base) = u16::try_from(first) else {
            return Ok(false);
        };
        if first + cap - 1 > usize::from(u16::MAX) {
            return Ok(false);
        }
        self.forwards += 1;
        self.insert(
            epoll,
            Slot::Forward {
                sock,
                guest_port,
                peers: Vec::new(),
                base,
                cap,
            },
        )
        .map(|_| true)
    }

    /// The host port and first gateway port of each UDP forward.
    pub fn forward_ports(&self) -> Vec<(u16, u16)> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Slot::Forward { sock, base, .. } => Some((sock.local_addr().ok()?.port(), *base)),
                _ => None,
            })
            .collect()
    }

    /// Closes idle relays, and the least recently used one when `need_room` and all are taken.
    fn expire(&mut self, epoll: &Epoll, need_room: bool) {
        let now = self.now();
        let mut relays = 0;
        let mut oldest: Option<(usize, Instant)> = None;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let (last, fd) = match slot {
                Some(Slot::Nat { last, sock, .. }) | Some(Slot::Ping { last, sock, .. }) => {
                    (*last, sock.as_raw_fd())
                }
                _ => continue,
            };
            if now.duration_since(last) > IDLE {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                *slot = None;
                continue;
            }
            relays += 1;
            if oldest.is_none_or(|(_, t)| last < t) {
                oldest = Some((i, last));
            }
        }
        if need_room && relays >= MAX_FLOWS {
            if let Some((i, _)) = oldest {
                if let Some(Slot::Nat { sock, .. } | Slot::Ping { sock, .. }) = &self.slots[i] {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        sock.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
                self.slots[i] = None;
            }
        }
    }

    /// Where a guest datagram to `dst` goes on the host.
    fn host_target(&self, dst: SocketAddrV4) -> Option<SocketAddrV4> {
        if *dst.ip() == DNS && !self.policy.restrict {
            return (dst.port() == 53).then_some(self.upstream).flatten();
        }
        self.policy.host_target(dst)
    }
}

/// How the guest sees a datagram's host source.
fn guest_view(upstream: Option<SocketAddrV4>, from: SocketAddr) -> Option<SocketAddrV4> {
    {
        let SocketAddr::V4(from) = from else {
            return None;
        };
        if Some(from) == upstream {
            return Some(SocketAddrV4::new(DNS, 53));
        }
        if from.ip().is_loopback() {
            return Some(SocketAddrV4::new(GATEWAY, from.port()));
        }
        Some(from)
    }
}

impl Datagrams {
    /// The index of the relay `matches` picks, marked used now; else a new one from `create`
    /// (after making room). `None` when none could be made.
    fn relay(
        &mut self,
        epoll: &Epoll,
        matches: impl Fn(&Slot) -> bool,
        create: impl FnOnce(&mut Self) -> Option<Slot>,
    ) -> Option<usize> {
        let now = self.now();
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(&matches))
        {
            if let Some(Slot::Nat { last, .. } | Slot::Ping { last, .. }) = &mut self.slots[i] {
                *last = now;
            }
            return Some(i);
        }
        self.expire(epoll, true);
        let slot = create(self)?;
        self.insert(epoll, slot).ok()
    }

    /// A UDP datagram from the guest.
    pub fn guest_datagram(
        &mut self,
        epoll: &Epoll,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
        _mac: EthernetAddress,
        _dev: &mut Queues,
    ) {
        // A reply to a UDP forward's client?
        if *dst.ip() == GATEWAY {
            let now = self.now();
            for slot in self.slots.iter_mut().flatten() {
                if let Slot::Forward {
                    sock,
                    guest_port,
                    peers,
                    base,
                    ..
                } = slot
                {
                    let i = dst.port().wrapping_sub(*base) as usize;
                    if let Some((peer, last)) =
                        peers.get_mut(i).filter(|_| src.port() == *guest_port)
                    {
                        *last = now;
                        let _ = sock.send_to(payload, *peer);
                        return;
                    }
                }
            }
        }
        let Some(target) = self.host_target(dst) else {
            tracing::trace!("user network: UDP to {dst} dropped");
            return;
        };
        let now = self.now();
        let relay = self.relay(
            epoll,
            |s| matches!(s, Slot::Nat { guest, .. } if *guest == src),
            |_| {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .and_then(|s| s.set_nonblocking(true).map(|()| s));
                match sock {
                    Ok(sock) => Some(Slot::Nat {
                        guest: src,
                        sock,
                        last: now,
                    }),
                    Err(e) => {
                        tracing::warn!("user network: UDP socket: {e}");
                        None
                    }
                }
            },
        );
        let Some(sock) = relay.and_then(|i| self.slots[i].as_ref()).map(Slot::sock) else {
            return;
        };
        if let Err(e) = sock.send_to(payload, target) {
            tracing::debug!("user network: UDP to {target}: {e}");
        }
    }

    /// An ICMP echo request from the guest to `dst`.
    pub fn echo(&mut self, epoll: &Epoll, dst: Ipv4Addr, ident: u16, seq: u16, data: &[u8]) {
        if self.ping_denied {
            return;
        }
        let Some(target) = self.host_target(SocketAddrV4::new(dst, 0)) else {
            return;
        };
        let now = self.now();
        let relay = self.relay(
            epoll,
            |s| matches!(s, Slot::Ping { ident: i, .. } if *i == ident),
            |this| {
                // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket below.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_INET,
                        libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        libc::IPPROTO_ICMP,
                    )
                };
                if fd < 0 {
                    tracing::info!(
                        "user network: the host does not allow unprivileged ping sockets ({}); guest pings go unanswered",
                        io::Error::last_os_error()
                    );
                    this.ping_denied = true;
                    return None;
                }
                Some(Slot::Ping {
                    ident,
                    // SAFETY: fd is a fresh socket nobody else owns.
                    sock: unsafe { UdpSocket::from_raw_fd(fd) },
                    last: now,
                })
            },
        );
        let Some(sock) = relay.and_then(|i| self.slots[i].as_ref()).map(Slot::sock) else {
            return;
        };
        // The kernel sets the identifier and checksum of ping-socket requests.
        let mut pkt = vec![8u8, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(data);
        let _ = sock.send_to(&pkt, target);
    }

    /// Host socket `index` is readable.
    pub fn host_event(&mut self, index: usize, mac: EthernetAddress, dev: &mut Queues) {
        let now = self.now();
        let buf = &mut self.buf;
        let dropped = &mut self.dropped;
        let upstream = self.upstream;
        let view = |from: SocketAddr| guest_view(upstream, from);
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return;
        };
        for _ in 0..64 {
            match slot {
                Slot::Nat { guest, sock, .. } => {
                    let Ok((n, from)) = sock.recv_from(buf) else {
                        break;
                    };
                    if let Some(src) = view(from) {
                        if let Some(f) = udp_frame(mac, src, *guest, &buf[..n]) {
                            dev.push_to_guest(f);
                        }
                    }
                }
                Slot::Ping { ident, sock, .. } => {
                    let Ok((n, from)) = sock.recv_from(buf) else {
                        break;
                    };
                    let SocketAddr::V4(from) = from else { continue };
                    // An echo reply: type 0, then code, checksum, identifier, sequence.
                    if n >= 8 && buf[0] == 0 {
                        let seq = u16::from_be_bytes([buf[6], buf[7]]);
                        dev.push_to_guest(echo_reply_frame(
                            mac,
                            *from.ip(),
                            *ident,
                            seq,
                            &buf[8..n],
                        ));
                    }
                }
                Slot::Forward {
                    sock,
                    guest_port,
                    peers,
                    base,
                    cap,
                } => {
                    let Ok((n, from)) = sock.recv_from(buf) else {
                        break;
                    };
                    let quiet = |(_, (_, last)): &(usize, &(SocketAddr, Instant))| {
                        now.saturating_duration_since(*last) >= PEER_MIN_IDLE
                    };
                    let i = match peers.iter().position(|(p, _)| *p == from) {
                        Some(i) => i,
                        None if peers.len() < *cap => {
                            peers.push((from, now));
                            peers.len() - 1
                        }
                        // Full: the gateway port of the client quiet longest is reused.
                        None => match peers
                            .iter()
                            .enumerate()
                            .filter(quiet)
                            .min_by_key(|(_, p)| p.1)
                        {
                            Some((i, _)) => i,
                            None => {
                                *dropped += 1;
                                if dropped.is_power_of_two() {
                                    tracing::warn!(
                                        "user network: a UDP forward has {cap} clients in use, dropping new clients' datagrams ({dropped} so far)"
                                    );
                                }
                                continue;
                            }
                        },
                    };
                    peers[i] = (from, now);
                    let src = SocketAddrV4::new(GATEWAY, *base + i as u16);
                    let dst = SocketAddrV4::new(GUEST, *guest_port);
                    if let Some(f) = udp_frame(mac, src, dst, &buf[..n]) {
                        dev.push_to_guest(f);
                    }
                }
            }
        }
    }
}
