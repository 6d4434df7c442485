//! A full TCP table makes room: handshakes first, then the connection idle longest; never one
//! that moves data. A UDP forward full of clients in use keeps their gateway ports.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket, UdpPacket};

use super::testutil::{arp_request, segment, ACK, SYN};
use super::*;
use crate::forward::{Forward, Protocol};

/// A TCP segment for the guest.
#[derive(Debug, Clone, Copy)]
struct Seg {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    syn: bool,
    ack: bool,
    rst: bool,
}

/// A network with a forward to the guest's port 80 and a host service the guest connects to;
/// every segment the guest was sent.
struct Rig {
    net: UserNet,
    port: u16,
    service: TcpListener,
    seen: Vec<Seg>,
}

const WEB: u16 = 80;

fn guest_web() -> SocketAddrV4 {
    SocketAddrV4::new(GUEST, WEB)
}

impl Rig {
    fn new() -> Rig {
        let fwd = Forward {
            proto: Protocol::Tcp,
            host: "127.0.0.1:0".parse().unwrap(),
            guest_port: WEB,
        };
        let mut net = UserNet::new(&UserNetConfig {
            forwards: vec![fwd],
            ..UserNetConfig::default()
        })
        .unwrap();
        net.send(&arp_request(GATEWAY));
        net.flush();
        while net.recv().is_some() {}
        let port = net.listeners[0].0.local_addr().unwrap().port();
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        service.set_nonblocking(true).unwrap();
        Rig {
            net,
            port,
            service,
            seen: Vec::new(),
        }
    }

    /// Takes the frames queued for the guest; the TCP segments among them.
    fn take(&mut self) -> Vec<Seg> {
        let mut out = Vec::new();
        while let Some(f) = self.net.recv() {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                out.push(Seg {
                    src: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
                    dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
                    seq: tcp.seq_number().0 as u32,
                    syn: tcp.syn(),
                    ack: tcp.ack(),
                    rst: tcp.rst(),
                });
            }
        }
        self.seen.extend(&out);
        out
    }

    /// Runs the network a few rounds (ended flows are reaped, their host sockets closed).
    fn settle(&mut self) {
        for _ in 0..4 {
            self.net.process();
            self.take();
        }
    }

    /// A new client of the forward; the gateway's end of its connection to the guest, if it
    /// reached the guest. With `answer` the guest completes the handshake.
    fn try_client(&mut self, answer: bool) -> (TcpStream, Option<SocketAddrV4>) {
        let client = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        self.net.process();
        let syn = self
            .take()
            .into_iter()
            .find(|s| s.dst == guest_web() && s.syn && !s.ack);
        if let (Some(s), true) = (syn, answer) {
            let ack = s.seq.wrapping_add(1);
            self.net
                .send(&segment(guest_web(), s.src, 7000, ack, SYN | ACK));
            self.net.flush();
            self.take();
        }
        (client, syn.map(|s| s.src))
    }

    /// A client of the forward that reached the guest.
    fn client(&mut self, answer: bool) -> (TcpStream, SocketAddrV4) {
        let (client, end) = self.try_client(answer);
        (client, end.expect("the connection reaches the guest"))
    }

    /// Fills the table with idle connections through the forward.
    fn fill(&mut self) -> Vec<(TcpStream, SocketAddrV4)> {
        let mut clients = Vec::new();
        while self.net.flows.len() < MAX_TCP_FLOWS {
            clients.push(self.client(true));
        }
        clients
    }

    /// The guest connects from port `from` to the host service; its host end, if the
    /// connection reached the host. With `complete` the guest acknowledges the SYN-ACK.
    fn guest_connects(&mut self, from: u16, complete: bool) -> Option<TcpStream> {
        let src = SocketAddrV4::new(GUEST, from);
        let dst = SocketAddrV4::new(GATEWAY, self.service.local_addr().unwrap().port());
        self.net.send(&segment(src, dst, 1000, 0, SYN));
        self.net.flush();
        let mut conn = None;
        for _ in 0..8 {
            self.net.process();
            let answer = self
                .take()
                .into_iter()
                .find(|s| s.src == dst && s.dst == src);
            if let Some(s) = answer.filter(|s| s.syn && s.ack && complete) {
                let ack = s.seq.wrapping_add(1);
                self.net.send(&segment(src, dst, 1001, ack, ACK));
                self.net.flush();
            }
            if let Ok((c, _)) = self.service.accept() {
                conn = Some(c);
            }
        }
        conn
    }

    /// Whether the guest was sent a reset from `from`.
    fn reset_from(&self, from: SocketAddrV4) -> bool {
        self.seen.iter().any(|s| s.src == from && s.rst)
    }
}

/// The host end of an ended flow is closed: EOF or reset, not a read that would wait.
fn closed(s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match (&*s).read(&mut [0; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// The host end of a flow is still open (nothing to read, no EOF).
fn open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let r = (&*s).read(&mut [0; 16]);
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_table_full_of_idle_connections_closes_the_longest_idle_for_a_new_one() {
    let mut rig = Rig::new();
    let (first, first_end) = rig.client(true);
    rig.net.flows.advance(Duration::from_secs(1));
    let (second, second_end) = rig.client(true);
    rig.net.flows.advance(Duration::from_secs(1));
    let rest = rig.fill();
    rig.net.flows.advance(EVICT_MIN_IDLE);
    rig.settle();
    assert_eq!(
        rig.net.flows.len(),
        MAX_TCP_FLOWS,
        "idle, not yet timed out"
    );

    // A new client of the forward (from the host side).
    let (new_client, end) = rig.try_client(true);
    assert!(
        end.is_some(),
        "a new forwarded connection reaches the guest"
    );
    rig.settle();
    assert!(
        rig.reset_from(first_end),
        "the guest is reset on the longest idle"
    );
    assert!(closed(&first), "the longest idle host connection is closed");

    // A new connection from the guest.
    let conn = rig.guest_connects(41000, true);
    assert!(conn.is_some(), "a new guest connection reaches the host");
    rig.settle();
    assert!(rig.reset_from(second_end), "the next longest idle is reset");
    assert!(closed(&second), "and its host connection closed");

    assert!(open(&new_client), "the new forwarded connection stays");
    assert!(
        rest.iter().all(|(c, _)| open(c)),
        "no other connection closed"
    );
    assert_eq!(rig.net.flows.evicted(), 2);
    assert_eq!(rig.net.flows.len(), MAX_TCP_FLOWS);
}

#[test]
fn a_table_full_of_connections_moving_data_refuses_a_new_one() {
    let mut rig = Rig::new();
    let mut clients = rig.fill();
    rig.net
        .flows
        .advance(EVICT_MIN_IDLE + Duration::from_secs(1));
    // Every connection moves data now.
    for (c, _) in &mut clients {
        c.write_all(b"x").unwrap();
    }
    rig.settle();
    assert_eq!(rig.net.flows.len(), MAX_TCP_FLOWS);

    let (refused, end) = rig.try_client(true);
    assert!(
        end.is_none(),
        "a new forwarded connection does not reach the guest"
    );
    rig.settle();
    assert!(closed(&refused), "it is closed");
    assert!(
        rig.guest_connects(41000, true).is_none(),
        "a new guest connection does not reach the host"
    );
    let reset = SocketAddrV4::new(GATEWAY, rig.service.local_addr().unwrap().port());
    assert!(
        rig.reset_from(reset),
        "the guest's SYN is answered by a reset"
    );

    rig.settle();
    assert_eq!(rig.net.flows.evicted(), 0);
    assert_eq!(rig.net.flows.len(), MAX_TCP_FLOWS);
    let active_reset = clients.iter().any(|(_, end)| rig.reset_from(*end));
    assert!(!active_reset, "no active connection was reset");
    assert!(clients.iter().all(|(c, _)| open(c)), "none was closed");
}

#[test]
fn handshakes_are_closed_before_idle_connections_oldest_first() {
    let mut rig = Rig::new();
    let mut clients = Vec::new();
    while rig.net.flows.len() < MAX_TCP_FLOWS - 2 {
        clients.push(rig.client(true));
    }
    rig.net
        .flows
        .advance(EVICT_MIN_IDLE + Duration::from_secs(1));
    // Two handshakes the guest never completes, newer than every idle connection: its own to
    // the host, then one from the forward.
    let outbound = rig.guest_connects(41000, false).expect("reaches the host");
    rig.net.flows.advance(Duration::from_secs(1));
    let (inbound, inbound_end) = rig.client(false);
    rig.net.flows.advance(EVICT_MIN_HANDSHAKE);
    rig.settle();
    assert_eq!(rig.net.flows.len(), MAX_TCP_FLOWS);

    rig.client(true);
    rig.settle();
    let service = SocketAddrV4::new(GATEWAY, rig.service.local_addr().unwrap().port());
    assert!(
        rig.reset_from(service),
        "the older handshake is reset first"
    );
    assert!(closed(&outbound), "and its host connection closed");
    assert!(open(&inbound), "the newer handshake stays");

    rig.client(true);
    rig.settle();
    assert!(
        rig.reset_from(inbound_end),
        "then the newer handshake is reset"
    );
    assert!(closed(&inbound), "and its host connection closed");
    let idle_reset = clients.iter().any(|(_, end)| rig.reset_from(*end));
    assert!(
        !idle_reset,
        "no idle connection was closed while handshakes were open"
    );

    rig.client(true);
    rig.settle();
    assert!(rig.reset_from(clients[0].1), "then the longest idle");
    assert!(closed(&clients[0].0));
    assert!(clients[1..].iter().all(|(c, _)| open(c)));
    assert_eq!(rig.net.flows.evicted(), 3);
}

#[test]
fn a_burst_of_new_connections_closes_a_bounded_number_at_once() {
    let mut rig = Rig::new();
    let clients = rig.fill();
    rig.net
        .flows
        .advance(EVICT_MIN_IDLE + Duration::from_secs(1));
    let burst = tcp::MAX_EVICTED_PENDING + 36;
    let new: Vec<TcpStream> = (0..burst)
        .map(|_| TcpStream::connect(("127.0.0.1", rig.port)).unwrap())
        .collect();
    // One turn of the loop accepts them all.
    rig.net.process();
    assert!(rig.net.flows.len() <= MAX_TCP_FLOWS + tcp::MAX_EVICTED_PENDING);
    rig.settle();
    assert_eq!(
        rig.net.flows.len(),
        MAX_TCP_FLOWS,
        "the closed ones are reaped"
    );
    assert_eq!(rig.net.flows.evicted(), tcp::MAX_EVICTED_PENDING as u64);
    let evicted = clients.iter().filter(|(c, _)| !open(c)).count();
    assert_eq!(
        evicted,
        tcp::MAX_EVICTED_PENDING,
        "the oldest idle made room"
    );
    let accepted = new.iter().filter(|c| open(c)).count();
    assert_eq!(accepted, tcp::MAX_EVICTED_PENDING, "the rest are refused");
}

/// A network with one UDP forward to the guest's port 53; its host port.
fn udp_forward() -> (UserNet, u16) {
    let fwd = Forward {
        proto: Protocol::Udp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port: 53,
    };
    let net = UserNet::new(&UserNetConfig {
        forwards: vec![fwd],
        ..UserNetConfig::default()
    })
    .unwrap();
    let port = net.datagrams.forward_ports()[0].0;
    (net, port)
}

/// `client` sends to the forward; the gateway port the guest sees it from, if it gets it.
fn udp_via_forward(net: &mut UserNet, port: u16, client: &UdpSocket) -> Option<u16> {
    client.send_to(b"ask", ("127.0.0.1", port)).unwrap();
    let mut from = None;
    for _ in 0..4 {
        net.process();
        while let Some(f) = net.recv() {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if let Ok(udp) = UdpPacket::new_checked(ip.payload()) {
                if udp.dst_port() == 53 && udp.payload() == b"ask" {
                    from = Some(udp.src_port());
                }
            }
        }
    }
    from
}

/// The guest answers the forward's client behind gateway port `to`.
fn udp_answer(net: &mut UserNet, to: u16) {
    let src = SocketAddrV4::new(GUEST, 53);
    let mut frame =
        wire::udp_frame(GATEWAY_MAC, src, SocketAddrV4::new(GATEWAY, to), b"answer").unwrap();
    frame[6..12].copy_from_slice(GUEST_MAC.as_bytes());
    net.send(&frame);
    net.flush();
}

/// What `client` received within a second.
fn udp_received(client: &UdpSocket) -> Option<Vec<u8>> {
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0; 64];
    let (n, _) = client.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

#[test]
fn a_udp_forward_full_of_clients_in_use_keeps_their_replies_theirs() {
    let (mut net, port) = udp_forward();
    let mut clients = Vec::new();
    for i in 0..64 {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = udp_via_forward(&mut net, port, &c).expect("reaches the guest");
        clients.push((c, from));
        if i < 2 {
            net.datagrams.advance(Duration::from_secs(1));
        }
    }
    // Every client was heard from just now: a new one gets no gateway port.
    let newcomer = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(udp_via_forward(&mut net, port, &newcomer), None);
    // The guest's answer to the first client reaches it, not the newcomer.
    udp_answer(&mut net, clients[0].1);
    assert_eq!(udp_received(&clients[0].0).as_deref(), Some(&b"answer"[..]));
    assert_eq!(udp_received(&newcomer), None);

    // Once quiet long enough, the client quiet longest (not the one just answered) gives its
    // gateway port up.
    net.datagrams.advance(datagram::PEER_MIN_IDLE);
    let from = udp_via_forward(&mut net, port, &newcomer);
    assert_eq!(from, Some(clients[1].1));
}
