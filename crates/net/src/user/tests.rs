use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Ipv4Packet, TcpPacket,
};

use super::testutil::{arp_request, syn};
use super::*;
use crate::forward::{Forward, Protocol};

fn arp_for_gateway() -> Vec<u8> {
    arp_request(GATEWAY)
}

fn drain(net: &mut UserNet) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| net.recv()).collect()
}

/// Runs the network for up to 5 s until a TCP segment to the guest satisfies `seen`.
fn wait_for_tcp(
    net: &mut UserNet,
    mut seen: impl FnMut(&Ipv4Packet<&[u8]>, &TcpPacket<&[u8]>) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        net.process();
        for f in drain(net) {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                if seen(&ip, &tcp) {
                    return true;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

#[test]
fn answers_arp_for_the_gateway_and_relays_a_syn_to_a_host_listener() {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let mut net = UserNet::new(&UserNetConfig::default()).unwrap();
    // The guest resolves the gateway.
    net.send(&arp_for_gateway());
    net.flush();
    let out = drain(&mut net);
    let reply = out
        .iter()
        .filter_map(|f| EthernetFrame::new_checked(&f[..]).ok())
        .find(|f| f.ethertype() == EthernetProtocol::Arp)
        .expect("an ARP reply");
    match ArpRepr::parse(&ArpPacket::new_checked(reply.payload()).unwrap()).unwrap() {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            ..
        } => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_hardware_addr, GATEWAY_MAC);
            assert_eq!(source_protocol_addr, GATEWAY);
        }
        _ => panic!("not an Ethernet/IPv4 ARP reply"),
    }
    // A SYN to the gateway's port reaches the host's loopback listener and is answered.
    net.send(&syn(SocketAddrV4::new(GATEWAY, port)));
    net.flush();
    host.set_nonblocking(false).unwrap();
    let (_conn, peer) = host.accept().expect("the host side sees a connection");
    assert!(peer.ip().is_loopback());
    let synack = wait_for_tcp(&mut net, |ip, tcp| {
        ip.src_addr() == GATEWAY && tcp.syn() && tcp.ack() && tcp.dst_port() == 40000
    });
    assert!(synack, "the guest's SYN should be answered with SYN-ACK");
}

#[test]
fn a_syn_to_a_closed_host_port_is_reset() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut net = UserNet::new(&UserNetConfig::default()).unwrap();
    net.send(&arp_for_gateway());
    net.flush();
    drain(&mut net);
    net.send(&syn(SocketAddrV4::new(GATEWAY, port)));
    net.flush();
    let rst = wait_for_tcp(&mut net, |_, tcp| tcp.rst());
    assert!(rst, "a refused connection should be reset");
}

#[test]
fn resolv_conf_gives_the_first_ipv4_nameserver() {
    let text = "# x\nnameserver ::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
    assert_eq!(
        parse_resolv_conf(text),
        Some(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53))
    );
    assert_eq!(parse_resolv_conf("search example\n"), None);
}

#[test]
fn a_guest_that_floods_without_reading_cannot_grow_the_queues() {
    let mut net = UserNet::new(&UserNetConfig::default()).unwrap();
    // Each ARP request makes a reply for the guest; the guest never takes them.
    for _ in 0..5000 {
        net.send(&arp_for_gateway());
        net.flush();
    }
    let (to_stack, to_guest) = net.dev.queued();
    assert!(
        to_guest <= phy::MAX_TO_GUEST,
        "{to_guest} frames queued for the guest"
    );
    assert!(
        to_stack <= phy::MAX_TO_STACK,
        "{to_stack} frames queued for the stack"
    );
    assert!(to_guest > 0, "replies are queued up to the bound");
}

/// A network with `policy` and one TCP forward from a free host port to guest port 80; the
/// guest has resolved the gateway.
fn restricted(policy: Policy) -> (UserNet, u16) {
    let fwd = Forward {
        proto: Protocol::Tcp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port: 80,
    };
    let mut net = UserNet::new(&UserNetConfig {
        forwards: vec![fwd],
        policy,
        ..UserNetConfig::default()
    })
    .unwrap();
    let port = net.listeners[0].0.local_addr().unwrap().port();
    net.send(&arp_for_gateway());
    net.flush();
    drain(&mut net);
    (net, port)
}

/// The guest's SYN to `dst` is reset by the stack and no host connection is attempted.
fn refused(net: &mut UserNet, dst: SocketAddrV4) -> bool {
    net.send(&syn(dst));
    net.flush();
    net.flows.len() == 0
        && wait_for_tcp(net, |ip, tcp| {
            ip.src_addr() == *dst.ip() && tcp.src_port() == dst.port() && tcp.rst()
        })
}

/// A host connection to the forward reaches the guest as a SYN to its port 80.
fn forward_works(net: &mut UserNet, port: u16) -> bool {
    let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_for_tcp(net, |ip, tcp| {
        ip.dst_addr() == GUEST && tcp.dst_port() == 80 && tcp.syn() && !tcp.ack()
    })
}

#[test]
fn each_restriction_refuses_the_guests_syn_while_forwards_still_work() {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let gw = SocketAddrV4::new(GATEWAY, port);
    let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    let outside = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let cases = [
        (
            "restrict=on",
            Policy {
                restrict: true,
                link_local: true,
                ..Policy::default()
            },
            vec![gw, metadata, outside, loopback],
        ),
        (
            "host-loopback=off",
            Policy {
                host_loopback: HostLoopback::None,
                ..Policy::default()
            },
            vec![gw, metadata, loopback],
        ),
        (
            "host-loopback=<another port>",
            Policy {
                host_loopback: HostLoopback::Ports(vec![port.wrapping_add(1).max(1)]),
                ..Policy::default()
            },
            vec![gw],
        ),
        ("the defaults", Policy::default(), vec![metadata, loopback]),
    ];
    for (what, policy, refuse) in cases {
        let (mut net, fwd) = restricted(policy);
        for dst in refuse {
            assert!(refused(&mut net, dst), "{what}: a SYN to {dst} is refused");
        }
        assert!(forward_works(&mut net, fwd), "{what}: the forward works");
    }
    // Allowed where the option says so: the host's listener sees the connection.
    for policy in [
        Policy::default(),
        Policy {
            host_loopback: HostLoopback::Ports(vec![port]),
            ..Policy::default()
        },
    ] {
        let (mut net, _) = restricted(policy);
        net.send(&syn(gw));
        net.flush();
        assert_eq!(net.flows.len(), 1, "a flow to the host's listener");
        host.set_nonblocking(false).unwrap();
        let (_conn, peer) = host.accept().unwrap();
        assert!(peer.ip().is_loopback());
    }
}

#[test]
fn five_hundred_udp_forwards_each_get_their_own_gateway_ports() {
    let fwd = |guest_port| Forward {
        proto: Protocol::Udp,
        host: "127.0.0.1:0".parse().unwrap(),
        guest_port,
    };
    // 400 forwards of 64 clients each would need gateway ports past 65535.
    let forwards: Vec<Forward> = (1..=500).map(fwd).collect();
    let mut net = UserNet::new(&UserNetConfig {
        forwards,
        ..UserNetConfig::default()
    })
    .unwrap();
    let ports: Vec<u16> = net
        .datagrams
        .forward_ports()
        .into_iter()
        .map(|(host, _)| host)
        .collect();
    assert_eq!(ports.len(), 500);
    let mut seen = std::collections::HashSet::new();
    for (i, host_port) in [(0usize, ports[0]), (499, ports[499])] {
        let guest_port = i as u16 + 1;
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"ping", ("127.0.0.1", host_port)).unwrap();
        // The datagram reaches the guest from a gateway port that stands for this client.
        let mut from = None;
        for _ in 0..100 {
            net.process();
            for f in drain(&mut net) {
                let eth = EthernetFrame::new_checked(&f[..]).unwrap();
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    continue;
                };
                let Ok(udp) = smoltcp::wire::UdpPacket::new_checked(ip.payload()) else {
                    continue;
                };
                if udp.dst_port() == guest_port && udp.payload() == b"ping" {
                    from = Some(udp.src_port());
                }
            }
            if from.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let gw_port = from.expect("the datagram reaches the guest");
        assert!(gw_port >= 40000, "{gw_port}");
        assert!(seen.insert(gw_port), "gateway port {gw_port} used twice");
        // The guest's answer goes back to that client.
        let mut reply = wire::udp_frame(
            GATEWAY_MAC,
            SocketAddrV4::new(GUEST, guest_port),
            SocketAddrV4::new(GATEWAY, gw_port),
            b"pong",
        )
        .unwrap();
        reply[6..12].copy_from_slice(GUEST_MAC.as_bytes());
        net.send(&reply);
        net.flush();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
    }
}

#[test]
fn more_udp_forwards_than_gateway_ports_are_refused() {
    let forwards = vec![
        Forward {
            proto: Protocol::Udp,
            host: "127.0.0.1:1".parse().unwrap(),
            guest_port: 1,
        };
        datagram::PEER_PORTS + 1
    ];
    assert!(matches!(
        UserNet::new(&UserNetConfig {
            forwards,
            ..UserNetConfig::default()
        }),
        Err(NetError::TooManyUdpForwards(_))
    ));
}
