use smoltcp::wire::{DhcpPacket, DhcpRepr, EthernetFrame, Ipv4Packet, UdpPacket};

use super::super::testutil::{arp_request, syn};
use super::super::GUEST_MAC;
use super::*;

fn tcp_syn(dst: SocketAddrV4) -> Vec<u8> {
    syn(dst)
}

#[test]
fn arp_is_answered_only_for_the_gateway_and_dns() {
    assert_eq!(classify(&arp_request(GATEWAY)), Inbound::Stack);
    assert_eq!(classify(&arp_request(DNS)), Inbound::Stack);
    // The guest probing its own address (or anyone else's) must not be answered.
    assert!(matches!(classify(&arp_request(GUEST)), Inbound::Drop(_)));
    assert!(matches!(
        classify(&arp_request(Ipv4Addr::new(10, 0, 2, 99))),
        Inbound::Drop(_)
    ));
}

#[test]
fn udp_and_syn_are_classified_with_their_endpoints() {
    let src = SocketAddrV4::new(GUEST, 3333);
    let dst = SocketAddrV4::new(DNS, 53);
    let frame = udp_frame(GATEWAY_MAC, src, dst, b"query").unwrap();
    assert_eq!(
        classify(&frame),
        Inbound::Udp {
            src,
            dst,
            payload: b"query"
        }
    );
    let remote = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
    assert_eq!(
        classify(&tcp_syn(remote)),
        Inbound::TcpSyn {
            src: SocketAddrV4::new(GUEST, 40000),
            dst: remote
        }
    );
}

#[test]
fn dhcp_discover_gets_an_offer_of_the_guest_address() {
    let discover = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: None,
        server_identifier: None,
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut payload = vec![0u8; discover.buffer_len()];
    discover
        .emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .unwrap();
    let frame = udp_frame(
        GATEWAY_MAC,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_SERVER_PORT),
        &payload,
    )
    .unwrap();
    let Inbound::Dhcp { xid, kind, mac } = classify(&frame) else {
        panic!("not DHCP: {:?}", classify(&frame));
    };
    assert_eq!(
        (xid, kind, mac),
        (0x1234_5678, DhcpMessageType::Discover, GUEST_MAC)
    );
    let reply = dhcp_reply(xid, kind, mac).unwrap();
    let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!(udp.dst_port(), DHCP_CLIENT_PORT);
    let pkt = DhcpPacket::new_checked(udp.payload()).unwrap();
    let offer = DhcpRepr::parse(&pkt).unwrap();
    assert_eq!(offer.message_type, DhcpMessageType::Offer);
    assert_eq!(offer.transaction_id, 0x1234_5678);
    assert_eq!(offer.your_ip, GUEST);
    assert_eq!(offer.router, Some(GATEWAY));
    assert_eq!(offer.subnet_mask, Some(NETMASK));
    assert_eq!(offer.dns_servers.as_deref(), Some(&[DNS][..]));
}

#[test]
fn truncated_and_lying_frames_are_dropped() {
    let frame = tcp_syn(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80));
    for len in 0..frame.len() {
        // Any prefix either classifies or drops; none may panic.
        let _ = classify(&frame[..len]);
    }
    // An IPv4 total length larger than the frame.
    let mut bad = frame.clone();
    bad[14 + 2..14 + 4].copy_from_slice(&60000u16.to_be_bytes());
    assert!(matches!(classify(&bad), Inbound::Drop(_)));
    // A corrupted header checksum.
    let mut bad = frame;
    bad[14 + 10] ^= 0xff;
    assert!(matches!(classify(&bad), Inbound::Drop(_)));
    // An oversized UDP payload cannot be sent to the guest.
    let big = vec![0u8; MAX_UDP_PAYLOAD + 1];
    let ep = SocketAddrV4::new(GATEWAY, 1);
    assert!(udp_frame(GUEST_MAC, ep, ep, &big).is_none());
}
