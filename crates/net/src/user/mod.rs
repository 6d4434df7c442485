//! User-mode networking: a private network 10.0.2.0/24 whose gateway is tandem itself.
//!
//! | address | what |
//! | --- | --- |
//! | 10.0.2.2 | gateway (tandem); connections to it reach the host's 127.0.0.1 ([`Policy`]) |
//! | 10.0.2.3 | DNS: queries are relayed to the host's resolver (/etc/resolv.conf) |
//! | 10.0.2.15 | the guest (by DHCP, or configured statically) |
//!
//! TCP from the guest ends in smoltcp's TCP stack and is relayed over a host socket; UDP is
//! relayed datagram by datagram; ICMP echo goes through a host ping socket where the host allows
//! unprivileged ones (`net.ipv4.ping_group_range`). Forwards accept on a host port and open a
//! connection to the guest's port from the gateway's address.
//!
//! Memory is bounded: at most [`MAX_TCP_FLOWS`] connections with fixed buffers (a full table
//! closes a stale connection to make room for a new one, or refuses it), and fixed-size frame
//! queues in both directions (a guest that floods loses frames, as on a wire).

mod clock;
mod datagram;
mod phy;
pub mod policy;
mod tcp;
#[cfg(test)]
mod testutil;
pub mod wire;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::forward::{Forward, Protocol};
use crate::NetBackend;
pub use policy::{HostLoopback, Policy};

/// The gateway: tandem's end of the private network.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS relay's address.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The network's mask (/24).
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The gateway's MAC address.
pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
/// The guest's default MAC address.
pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// The MTU of the private network. The link to the guest is memory, not a wire: large frames
/// mean fewer frames, exits and interrupts for the same bytes (passt does the same).
pub const MTU: u16 = 65520;
/// Most TCP connections at once. A new one beyond it closes the oldest still in its handshake
/// after [`EVICT_MIN_HANDSHAKE`], else the one idle longest if idle at least
/// [`EVICT_MIN_IDLE`]; when none qualifies it is refused (a guest SYN with a reset, a
/// forwarded connection closed).
pub const MAX_TCP_FLOWS: usize = 512;
/// A TCP connection whose handshake (guest and host side) has not completed after this long is
/// ended: a SYN never answered, a SYN then RST, a host that never answers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// An established TCP connection that moved no data this long is ended (passt's is the same).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// A TCP connection still in its handshake this long may be closed to make room when
/// [`MAX_TCP_FLOWS`] are open: a handshake takes a round trip, a few seconds when a SYN is lost
/// (Linux resends after 1 s and 3 s), so an older one is most likely a SYN never answered.
/// Younger ones are kept, or a burst of new connections would close its own handshakes.
pub const EVICT_MIN_HANDSHAKE: Duration = Duration::from_secs(5);
/// An established TCP connection that moved no data this long may be closed to make room when
/// [`MAX_TCP_FLOWS`] are open: far longer than the pauses of a connection in use (one that
/// moves data does so every round trip), short enough that connections left open and silent
/// cannot hold the table against new ones for long.
pub const EVICT_MIN_IDLE: Duration = Duration::from_secs(60);

/// How long TCP connections may wait; [`HANDSHAKE_TIMEOUT`], [`IDLE_TIMEOUT`],
/// [`EVICT_MIN_HANDSHAKE`] and [`EVICT_MIN_IDLE`] by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the handshake.
    pub handshake: Duration,
    /// Without data.
    pub idle: Duration,
    /// In the handshake, before the connection may be closed to make room for a new one.
    pub evict_handshake: Duration,
    /// Without data, before the connection may be closed to make room for a new one.
    pub evict_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: HANDSHAKE_TIMEOUT,
            idle: IDLE_TIMEOUT,
            evict_handshake: EVICT_MIN_HANDSHAKE,
            evict_idle: EVICT_MIN_IDLE,
        }
    }
}

const TOKEN_TIMER: u64 = 1;
const TOKEN_KIND_SHIFT: u32 = 32;
const KIND_FLOW: u64 = 2;
const KIND_LISTENER: u64 = 3;
const KIND_DATAGRAM: u64 = 4;

/// Errors setting the network up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A forward's host port cannot be bound.
    #[error("--forward {forward}: cannot listen on {addr}: {}", bind_reason(.source))]
    Bind {
        /// The forward.
        forward: String,
        /// The host address.
        addr: SocketAddr,
        /// Why (in use, not permitted, no such address).
        source: io::Error,
    },
    /// More UDP forwards than there are gateway ports for their clients.
    #[error("--forward: {0} UDP forwards; at most {max} are possible", max = datagram::PEER_PORTS)]
    TooManyUdpForwards(usize),
    /// epoll or timerfd failed.
    #[error("network setup: {0}")]
    Setup(#[from] io::Error),
}

fn bind_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "the port is already in use".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need privilege)".into()
        }
        io::ErrorKind::AddrNotAvailable => "no such address on this host".into(),
        _ => e.to_string(),
    }
}

/// Options of the user-mode network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNetConfig {
    /// Host ports mapped to guest ports.
    pub forwards: Vec<Forward>,
    /// Where DNS queries go; `None`: the first IPv4 nameserver of /etc/resolv.conf (or of the
    /// file `$TANDEM_RESOLV_CONF` names).
    pub dns_upstream: Option<SocketAddrV4>,
    /// What the guest may reach: `restrict` (only forwards in, QEMU's `restrict=on`), the
    /// host's loopback through 10.0.2.2, link-local addresses.
    pub policy: Policy,
    /// TCP timeouts.
    pub timeouts: Timeouts,
}

/// The first IPv4 `nameserver` in resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Option<SocketAddrV4> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == "nameserver")
            .then(|| w.next()?.parse::<Ipv4Addr>().ok())
            .flatten()
            .map(|ip| SocketAddrV4::new(ip, 53))
    })
}

/// The user-mode network backend.
pub struct UserNet {
    iface: Interface,
    dev: phy::Queues,
    sockets: SocketSet<'static>,
    epoll: Epoll,
    timer: TimerFd,
    flows: tcp::Flows,
    listeners: Vec<(TcpListener, u16)>,
    datagrams: datagram::Datagrams,
    guest_mac: EthernetAddress,
    start: StdInstant,
}

impl UserNet {
    /// Sets the network up and binds every forward's host port (so a port in use fails now).
    pub fn new(cfg: &UserNetConfig) -> Result<UserNet, NetError> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        let mut dev = phy::Queues::default();
        let start = StdInstant::now();
        let mut config = Config::new(HardwareAddress::Ethernet(GATEWAY_MAC));
        config.random_seed = start.elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
        let mut iface = Interface::new(config, &mut dev, Instant::ZERO);
        iface.update_ip_addrs(|a| {
            for ip in [GATEWAY, DNS] {
                let _ = a.push(IpCidr::Ipv4(Ipv4Cidr::new(ip, 24)));
            }
        });
        // Accept packets for any destination: the gateway stands in for every remote host.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        let resolv =
            std::env::var_os("TANDEM_RESOLV_CONF").unwrap_or_else(|| "/etc/resolv.conf".into());
        let upstream = cfg
            .dns_upstream
            .or_else(|| parse_resolv_conf(&std::fs::read_to_string(&resolv).unwrap_or_default()));
        let udp = cfg
            .forwards
            .iter()
            .filter(|f| f.proto == Protocol::Udp)
            .count();
        if udp > datagram::PEER_PORTS {
            return Err(NetError::TooManyUdpForwards(udp));
        }
        let mut datagrams = datagram::Datagrams::new(upstream, cfg.policy.clone(), udp);
        let mut listeners = Vec::new();
        for f in &cfg.forwards {
            let bind_err = |source| NetError::Bind {
                forward: f.to_string(),
                addr: f.host,
                source,
            };
            match f.proto {
                Protocol::Tcp => {
                    let l = TcpListener::bind(f.host).map_err(bind_err)?;
                    l.set_nonblocking(true).map_err(bind_err)?;
                    let token = KIND_LISTENER << TOKEN_KIND_SHIFT | listeners.len() as u64;
                    epoll.ctl(
                        ControlOperation::Add,
                        l.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    )?;
                    listeners.push((l, f.guest_port));
                }
                Protocol::Udp => {
                    let s = UdpSocket::bind(f.host).map_err(bind_err)?;
                    s.set_nonblocking(true).map_err(bind_err)?;
                    if !datagrams.add_forward(&epoll, s, f.guest_port)? {
                        return Err(NetError::TooManyUdpForwards(udp));
                    }
                }
            }
            tracing::debug!("listening for {f}");
        }
        if upstream.is_none() {
            tracing::info!(
                "no IPv4 nameserver in /etc/resolv.conf: the guest's DNS will not answer"
            );
        }
        Ok(UserNet {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            epoll,
            timer,
            flows: tcp::Flows::new(cfg.policy.clone(), cfg.timeouts),
            listeners,
            datagrams,
            guest_mac: GUEST_MAC,
            start,
        })
    }

    /// The host ports the forwards listen on, TCP then UDP, in the order given (useful when a
    /// forward asked for port 0).
    pub fn forward_ports(&self) -> Vec<(Protocol, u16)> {
        let tcp = self
            .listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok().map(|a| (Protocol::Tcp, a.port())));
        let udp = self
            .datagrams
            .forward_ports()
            .into_iter()
            .map(|(p, _)| (Protocol::Udp, p));
        tcp.chain(udp).collect()
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Runs the stack until it has nothing more to do now, relays data, and re-arms the timer.
    fn pump(&mut self) {
        for _ in 0..64 {
            let now = self.now();
            let changed = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let moved = self.flows.relay(&mut self.sockets, &self.epoll);
            if changed == smoltcp::iface::PollResult::None && !moved {
                break;
            }
        }
        self.flows.reap(&mut self.sockets, &self.epoll);
        let now = self.now();
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_micros(200));
        // Open connections' timeouts are checked at least once a second.
        let delay = if self.flows.any() {
            delay.min(Duration::from_secs(1))
        } else {
            delay
        };
        if let Err(e) = self.timer.reset(delay, None) {
            tracing::warn!("network timer: {e}");
        }
    }

    fn accept(&mut self, index: usize) {
        let Some((listener, guest_port)) = self.listeners.get(index) else {
            return;
        };
        let guest_port = *guest_port;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    tracing::debug!("forward: connection from {peer} to guest port {guest_port}");
                    self.flows.open_inbound(
                        &mut self.iface,
                        &mut self.sockets,
                        &self.epoll,
                        stream,
                        SocketAddrV4::new(GUEST, guest_port),
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("forward: accept failed: {e}");
                    break;
                }
            }
        }
    }
}

impl NetBackend for UserNet {
    fn send(&mut self, frame: &[u8]) {
        // Learn the guest's MAC from what it sends.
        if let Some(src) = frame.get(6..12) {
            let mac = EthernetAddress::from_bytes(src);
            if mac.is_unicast() {
                self.guest_mac = mac;
            }
        }
        match wire::classify(frame) {
            wire::Inbound::Stack => self.dev.push_to_stack(frame),
            wire::Inbound::TcpSyn { src, dst } => {
                self.flows
                    .open_outbound(&mut self.sockets, &self.epoll, src, dst);
                self.dev.push_to_stack(frame);
            }
            wire::Inbound::Udp { src, dst, payload } => self.datagrams.guest_datagram(
                &self.epoll,
                src,
                dst,
                payload,
                self.guest_mac,
                &mut self.dev,
            ),
            wire::Inbound::Dhcp { xid, kind, mac } => {
                if let Some(reply) = wire::dhcp_reply(xid, kind, mac) {
                    tracing::debug!("DHCP {kind:?} from {mac}: offering {GUEST}");
                    self.dev.push_to_guest(reply);
                }
            }
            wire::Inbound::Echo {
                dst,
                ident,
                seq,
                data,
            } => self.datagrams.echo(&self.epoll, dst, ident, seq, data),
            wire::Inbound::Drop(why) => tracing::trace!("guest frame dropped: {why}"),
        }
    }

    fn flush(&mut self) {
        self.pump();
    }

    fn mtu(&self) -> u16 {
        MTU
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        let f = self.dev.pop_to_guest();
        if f.is_some() && self.dev.to_guest_has_room() {
            // Room again for the stack's output.
            self.pump();
        }
        f
    }

    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("network epoll: {e}");
                0
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            let (kind, index) = (token >> TOKEN_KIND_SHIFT, (token & 0xffff_ffff) as usize);
            match (token, kind) {
                (TOKEN_TIMER, _) => {
                    let _ = self.timer.wait();
                }
                (_, KIND_LISTENER) => self.accept(index),
                (_, KIND_FLOW) => {
                    self.flows
                        .host_event(&mut self.sockets, &self.epoll, index, ev.events())
                }
                (_, KIND_DATAGRAM) => {
                    self.datagrams
                        .host_event(index, self.guest_mac, &mut self.dev)
                }
                _ => {}
            }
        }
        self.pump();
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_evict;
#[cfg(test)]
mod tests_timeouts;
