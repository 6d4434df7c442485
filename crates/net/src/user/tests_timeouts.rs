//! TCP flows end: handshakes that never complete, idle connections, host sockets that hung up.

use std::io::Read;
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};

use super::testutil::{arp_request, segment, syn, ACK, RST, SYN};
use super::*;
use crate::forward::{Forward, Protocol};

fn net(forwards: Vec<Forward>) -> UserNet {
    let mut net = UserNet::new(&UserNetConfig {
        forwards,
        ..UserNetConfig::default()
    })
    .unwrap();
    net.send(&arp_request(GATEWAY));
    net.flush();
    while net.recv().is_some() {}
    net
}

/// Ends every flow's handshake and idle time now.
fn expire_all(net: &mut UserNet) {
    net.flows.set_timeouts(Timeouts {
        handshake: Duration::ZERO,
        idle: Duration::ZERO,
        evict_handshake: Duration::ZERO,
        evict_idle: Duration::ZERO,
    });
}

/// Runs the network a few rounds; the flows left.
fn settle(net: &mut UserNet) -> usize {
    for _ in 0..4 {
        net.process();
        while net.recv().is_some() {}
    }
    net.flows.len()
}

/// The TCP segments for the guest in the frames queued now.
fn segments(net: &mut UserNet) -> Vec<(SocketAddrV4, SocketAddrV4, u32, bool, bool)> {
    let mut out = Vec::new();
    while let Some(f) = net.recv() {
        let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
            continue;
        };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            continue;
        };
        if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
            out.push((
                SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
                SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
                tcp.seq_number().0 as u32,
                tcp.syn(),
                tcp.ack(),
            ));
        }
    }
    out
}

/// The host side of a flow that ended is closed: EOF or reset, not a read that would wait.
fn closed(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match s.read(&mut [0; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A network whose guest has sent a SYN to a host listener through the gateway; the listener
/// and the guest's destination.
fn guest_connects() -> (UserNet, TcpListener, SocketAddrV4) {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = SocketAddrV4::new(GATEWAY, host.local_addr().unwrap().port());
    let mut net = net(Vec::new());
    net.send(&syn(dst));
    net.flush();
    (net, host, dst)
}

#[test]
fn a_handshake_the_guest_never_completes_ends_after_the_timeout() {
    let (mut net, host, _) = guest_connects();
    let (conn, _) = host.accept().unwrap();
    // The guest never acknowledges the SYN-ACK.
    assert_eq!(settle(&mut net), 1, "waiting for the handshake");
    expire_all(&mut net);
    assert_eq!(settle(&mut net), 0, "no flow after the handshake timeout");
    assert!(closed(conn), "the host connection is closed");
}

#[test]
fn a_syn_then_rst_ends_after_the_handshake_timeout() {
    let (mut net, host, dst) = guest_connects();
    let (conn, _) = host.accept().unwrap();
    settle(&mut net);
    net.send(&segment(SocketAddrV4::new(GUEST, 40000), dst, 1001, 0, RST));
    net.flush();
    // The reset puts the stack's socket back to listening: the flow stays until the timeout.
    assert_eq!(settle(&mut net), 1);
    expire_all(&mut net);
    assert_eq!(settle(&mut net), 0, "no flow after the handshake timeout");
    assert!(closed(conn), "the host connection is closed");
}

/// Closes `s` with a reset (SO_LINGER 0) rather than a FIN.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

#[test]
fn a_host_socket_that_hung_up_does_not_keep_waking_the_network() {
    let (mut net, host, _) = guest_connects();
    assert_eq!(net.flows.len(), 1, "connecting");
    // The host side resets the connection before tandem saw its connect complete: the socket
    // reports EPOLLHUP|EPOLLERR, level-triggered, for as long as it stays in epoll.
    let (conn, _) = host.accept().unwrap();
    reset(conn);
    // The guest takes no frames (each taken frame would run the stack once more).
    for _ in 0..200 {
        net.process();
    }
    assert!(
        net.flows.events() <= 3,
        "{} host socket events in 200 rounds",
        net.flows.events()
    );
    assert_eq!(net.flows.len(), 0, "the failed flow is gone");
}

#[test]
fn a_forward_full_of_idle_connections_accepts_again_after_the_idle_timeout() {
    let fwd = Forward {
        proto: Protocol::Tcp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port: 80,
    };
    let mut net = net(vec![fwd]);
    let port = net.listeners[0].0.local_addr().unwrap().port();
    let guest = SocketAddrV4::new(GUEST, 80);
    // The guest completes every handshake the forward opens.
    let answer = |net: &mut UserNet| {
        for (src, dst, seq, syn, ack) in segments(net) {
            if syn && !ack && dst == guest {
                net.send(&segment(guest, src, 7000, seq.wrapping_add(1), SYN | ACK));
            }
        }
        net.flush();
    };
    let mut clients = Vec::new();
    while clients.len() < MAX_TCP_FLOWS {
        for _ in 0..32.min(MAX_TCP_FLOWS - clients.len()) {
            clients.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        net.process();
        answer(&mut net);
        net.process();
    }
    for _ in 0..4 {
        net.process();
        answer(&mut net);
    }
    assert_eq!(net.flows.len(), MAX_TCP_FLOWS);
    // Full: one more is accepted and closed at once.
    let extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    settle(&mut net);
    assert!(closed(extra), "a forward full of idle connections refuses");
    expire_all(&mut net);
    assert_eq!(
        settle(&mut net),
        0,
        "idle connections end after the timeout"
    );
    assert!(closed(clients.pop().unwrap()));
    net.flows.set_timeouts(Timeouts::default());
    let _next = TcpStream::connect(("127.0.0.1", port)).unwrap();
    net.process();
    let seen = segments(&mut net)
        .iter()
        .any(|&(_, dst, _, syn, ack)| dst == guest && syn && !ack);
    assert!(seen, "a new connection reaches the guest");
}
