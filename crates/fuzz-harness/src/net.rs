//! The user-mode network under a hostile guest (and busy host-side clients).

use std::cell::RefCell;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};

use tandem_net::user::{wire, HostLoopback, Policy, UserNet, UserNetConfig, GATEWAY};
use tandem_net::{Forward, NetBackend, Protocol};

/// Host-side streams a run keeps open at most (each kind).
const MAX_STREAMS: usize = 8;

/// One user-mode network and the host sockets around it.
struct Rig {
    net: UserNet,
    /// Whether the guest may open connections (then every destination is made the gateway,
    /// so that nothing leaves this host).
    open: bool,
    tcp_forward: u16,
    udp_forward: u16,
    /// A port nothing listens on (most likely).
    closed: u16,
    /// What guest connections to 10.0.2.2:7 reach.
    listener: TcpListener,
    /// What guest datagrams to 10.0.2.2:7 (and DNS) reach.
    udp: UdpSocket,
    /// Host clients of the TCP forward, and connections accepted on `listener`.
    streams: Vec<TcpStream>,
    client: UdpSocket,
}

impl Rig {
    fn new(open: bool) -> Rig {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        udp.set_nonblocking(true).expect("nonblocking");
        let client = UdpSocket::bind("127.0.0.1:0").expect("udp");
        client.set_nonblocking(true).expect("nonblocking");
        let fwd = |proto| Forward {
            proto,
            host: "127.0.0.1:0".parse().expect("address"),
            guest_port: 80,
        };
        let cfg = UserNetConfig {
            forwards: vec![fwd(Protocol::Tcp), fwd(Protocol::Udp)],
            // DNS goes to the harness, never to the host's resolver.
            dns_upstream: Some(SocketAddrV4::new(
                Ipv4Addr::LOCALHOST,
                udp.local_addr().expect("addr").port(),
            )),
            policy: Policy {
                restrict: !open,
                host_loopback: HostLoopback::All,
                link_local: false,
            },
            ..UserNetConfig::default()
        };
        let net = UserNet::new(&cfg).expect("user network");
        let port = |proto| {
            net.forward_ports()
                .into_iter()
                .find(|(p, _)| *p == proto)
                .map_or(0, |(_, port)| port)
        };
        let closed = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(1, |a| a.port());
        Rig {
            tcp_forward: port(Protocol::Tcp),
            udp_forward: port(Protocol::Udp),
            closed,
            net,
            open,
            listener,
            udp,
            streams: Vec::new(),
            client,
        }
    }

    /// A host-side action: `op[0]` says which, the rest is data.
    fn host(&mut self, op: &[u8]) {
        let Some((&what, data)) = op.split_first() else {
            return;
        };
        let pick = usize::from(data.first().copied().unwrap_or(0));
        match what % 6 {
            0 if self.streams.len() < MAX_STREAMS => {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", self.tcp_forward)) {
                    let _ = s.set_nonblocking(true);
                    self.streams.push(s);
                }
            }
            1 if !self.streams.is_empty() => {
                let n = pick % self.streams.len();
                let _ = self.streams[n].write(data);
            }
            2 if !self.streams.is_empty() => {
                let n = pick % self.streams.len();
                let s = self.streams.swap_remove(n);
                if data.len() > 1 && data[1] & 1 != 0 {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    self.streams.push(s);
                }
            }
            3 => {
                let _ = self.client.send_to(data, ("127.0.0.1", self.udp_forward));
            }
            4 => {
                // Accept what the guest opened to 10.0.2.2:7, and answer datagrams it sent.
                while self.streams.len() < MAX_STREAMS {
                    match self.listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(true);
                            let _ = (&s).write(data);
                            self.streams.push(s);
                        }
                        Err(_) => break,
                    }
                }
                let mut buf = [0u8; 2048];
                while let Ok((_, from)) = self.udp.recv_from(&mut buf) {
                    let _ = self.udp.send_to(data, from);
                }
            }
            _ => {
                let mut buf = [0u8; 4096];
                for s in &mut self.streams {
                    let _ = std::io::Read::read(s, &mut buf);
                }
            }
        }
    }

    /// A guest frame; in the open network its destination becomes the gateway.
    fn frame(&mut self, mut frame: Vec<u8>, fix: bool) {
        if self.open {
            let listener = self.listener.local_addr().map_or(0, |a| a.port());
            let udp = self.udp.local_addr().map_or(0, |a| a.port());
            let (tcp_forward, udp_forward, closed) =
                (self.tcp_forward, self.udp_forward, self.closed);
            keep_local(&mut frame, |tcp, port| match (tcp, port) {
                (true, 7) => listener,
                (false, 7) => udp,
                (true, 8) => tcp_forward,
                (false, 8) => udp_forward,
                _ => closed,
            });
        }
        if fix || self.open {
            // Valid checksums let the fuzzer past the first checks (and a rewritten frame
            // needs them anyway).
            fix_checksums(&mut frame);
        }
        let _ = wire::classify(&frame);
        self.net.send(&frame);
        self.net.flush();
    }

    fn run(&mut self) {
        self.net.process();
        while self.net.recv().is_some() {}
    }
}

/// Makes an IPv4 frame's destination the gateway unless it is on the private network, and its
/// port one of the harness's (`ports` maps it), so that the open network reaches only sockets
/// of this process: guest port 7 is the harness's listener (or UDP socket), 8 a forward (a
/// hairpin), any other a closed port.
fn keep_local(frame: &mut [u8], ports: impl Fn(bool, u16) -> u16) {
    use smoltcp::wire::{EthernetFrame, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
    let Ok(mut eth) = EthernetFrame::new_checked(&mut frame[..]) else {
        return;
    };
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    if ip.dst_addr().octets()[..3] != [10, 0, 2] {
        ip.set_dst_addr(GATEWAY);
    }
    if ip.dst_addr() != GATEWAY {
        return;
    }
    match ip.next_header() {
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_checked(ip.payload_mut()) {
                let p = t.dst_port();
                t.set_dst_port(ports(true, p));
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut u) = UdpPacket::new_checked(ip.payload_mut()) {
                let p = u.dst_port();
                u.set_dst_port(ports(false, p));
            }
        }
        _ => {}
    }
}

/// The user-mode network's frame and event paths: `data` is a sequence of records (2-byte
/// header, then the bytes). Header bit 0x4000 marks a host-side action (connect to a forward,
/// write, close, datagrams, accept what the guest opened), else the record is a frame the
/// guest sends (bit 0x8000: with checksums fixed). After each record the network handles its
/// host events (`process`). The first byte picks the network: restricted (odd), or open, where
/// every destination is rewritten to the gateway so that nothing leaves this host. No input
/// may panic it.
pub fn net_frames(data: &[u8]) {
    thread_local! {
        static RIGS: RefCell<[Option<Rig>; 2]> = const { RefCell::new([None, None]) };
    }
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let open = mode & 1 == 0;
    RIGS.with(|r| {
        let mut rigs = r.borrow_mut();
        let rig = rigs[usize::from(open)].get_or_insert_with(|| Rig::new(open));
        while let [hi, lo, tail @ ..] = rest {
            let len = (usize::from(*hi & 0x3f) << 8 | usize::from(*lo)).min(tail.len());
            let (record, next) = tail.split_at(len);
            if hi & 0x40 != 0 {
                rig.host(record);
            } else {
                rig.frame(record.to_vec(), hi & 0x80 != 0);
            }
            rig.run();
            rest = next;
        }
    });
}

/// Recomputes the IPv4 header and TCP/UDP checksums of an Ethernet frame, where it has them.
fn fix_checksums(frame: &mut [u8]) {
    use smoltcp::wire::{EthernetFrame, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};
    let Ok(mut eth) = EthernetFrame::new_checked(frame) else {
        return;
    };
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst, proto) = (ip.src_addr().into(), ip.dst_addr().into(), ip.next_header());
    match proto {
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_checked(ip.payload_mut()) {
                t.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut u) = UdpPacket::new_checked(ip.payload_mut()) {
                u.fill_checksum(&src, &dst);
            }
        }
        _ => {}
    }
}
