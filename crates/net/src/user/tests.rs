use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket,
};

use super::*;

fn frame(proto: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: GATEWAY_MAC,
        ethertype: proto,
    };
    let mut buf = vec![0u8; repr.buffer_len() + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut f);
    f.payload_mut().copy_from_slice(payload);
    buf
}

fn syn_to(dst: SocketAddrV4) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + tcp.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &ChecksumCapabilities::default());
    p.payload_mut().copy_from_slice(&tcp);
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    t.fill_checksum(&GUEST.into(), &(*dst.ip()).into());
    frame(EthernetProtocol::Ipv4, &buf)
}

fn arp_for_gateway() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY,
    };
    let mut buf = vec![0u8; arp.buffer_len()];
    arp.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
    frame(EthernetProtocol::Arp, &buf)
}

fn drain(net: &mut UserNet) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| net.recv()).collect()
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
    net.send(&syn_to(SocketAddrV4::new(GATEWAY, port)));
    net.flush();
    host.set_nonblocking(false).unwrap();
    let (_conn, peer) = host.accept().expect("the host side sees a connection");
    assert!(peer.ip().is_loopback());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut synack = false;
    while !synack && std::time::Instant::now() < deadline {
        net.process();
        for f in drain(&mut net) {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                synack |= tcp.syn() && tcp.ack() && tcp.dst_port() == 40000;
                assert_eq!(ip.src_addr(), GATEWAY);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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
    net.send(&syn_to(SocketAddrV4::new(GATEWAY, port)));
    net.flush();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut rst = false;
    while !rst && std::time::Instant::now() < deadline {
        net.process();
        for f in drain(&mut net) {
            let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                continue;
            };
            if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                rst |= tcp.rst();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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
