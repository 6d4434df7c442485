//! Frames from the guest, classified; frames to the guest, built. Pure functions over bytes
//! (fuzz target `net_frames`): nothing here trusts a length the guest wrote.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};

use super::{DNS, GATEWAY, GATEWAY_MAC, GUEST, NETMASK};

/// DHCP server port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCP client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// Largest UDP payload that fits one IP packet of the network's MTU.
pub const MAX_UDP_PAYLOAD: usize = super::MTU as usize - 20 - 8;

/// What a guest frame is, as far as the user-mode network cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// For the TCP/IP stack (ARP for the gateway or DNS address, TCP, ICMP to the gateway).
    Stack,
    /// A TCP SYN opening a connection from `src` to `dst`.
    TcpSyn {
        /// The guest's end.
        src: SocketAddrV4,
        /// Where it connects.
        dst: SocketAddrV4,
    },
    /// A UDP datagram.
    Udp {
        /// The guest's end.
        src: SocketAddrV4,
        /// Where it goes.
        dst: SocketAddrV4,
        /// The payload.
        payload: &'a [u8],
    },
    /// A DHCP request (discover or request) from `mac`.
    Dhcp {
        /// The client's transaction.
        xid: u32,
        /// Discover or request.
        kind: DhcpMessageType,
        /// The client's hardware address.
        mac: EthernetAddress,
    },
    /// An ICMP echo request to a host outside the virtual network.
    Echo {
        /// Destination.
        dst: Ipv4Addr,
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// Nothing to do (and why, for the log).
    Drop(&'static str),
}

/// Classifies one Ethernet frame from the guest.
pub fn classify(frame: &[u8]) -> Inbound<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Inbound::Drop("short ethernet frame");
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                return Inbound::Drop("bad ARP");
            };
            match ArpRepr::parse(&arp) {
                Ok(ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    target_protocol_addr,
                    ..
                }) if target_protocol_addr == GATEWAY || target_protocol_addr == DNS => {
                    Inbound::Stack
                }
                Ok(ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    ..
                }) => Inbound::Stack,
                _ => Inbound::Drop("ARP not for the gateway"),
            }
        }
        EthernetProtocol::Ipv4 => classify_ipv4(eth.payload()),
        _ => Inbound::Drop("not IPv4 or ARP"),
    }
}

fn classify_ipv4(bytes: &[u8]) -> Inbound<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        return Inbound::Drop("bad IPv4 header");
    };
    if !ip.verify_checksum() {
        return Inbound::Drop("IPv4 checksum");
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Inbound::Drop("IPv4 fragment");
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    // new_checked guarantees total_len fits the buffer and covers the header.
    let hl = usize::from(ip.header_len());
    let payload = &bytes[hl..usize::from(ip.total_len())];
    match ip.next_header() {
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(payload) else {
                return Inbound::Drop("bad UDP");
            };
            let data_len = usize::from(udp.len()).saturating_sub(8);
            let Some(data) = payload.get(8..8 + data_len) else {
                return Inbound::Drop("UDP length");
            };
            if udp.dst_port() == DHCP_SERVER_PORT {
                return classify_dhcp(data);
            }
            Inbound::Udp {
                src: SocketAddrV4::new(src, udp.src_port()),
                dst: SocketAddrV4::new(dst, udp.dst_port()),
                payload: data,
            }
        }
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(payload) else {
                return Inbound::Drop("bad TCP");
            };
            if tcp.syn() && !tcp.ack() {
                Inbound::TcpSyn {
                    src: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                }
            } else {
                Inbound::Stack
            }
        }
        IpProtocol::Icmp => {
            if dst == GATEWAY || dst == DNS {
                return Inbound::Stack;
            }
            let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
                return Inbound::Drop("bad ICMP");
            };
            match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()) {
                Ok(Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) => Inbound::Echo {
                    dst,
                    ident,
                    seq: seq_no,
                    data,
                },
                _ => Inbound::Drop("ICMP other than echo"),
            }
        }
        _ => Inbound::Drop("IP protocol"),
    }
}

fn classify_dhcp(data: &[u8]) -> Inbound<'_> {
    let Ok(pkt) = DhcpPacket::new_checked(data) else {
        return Inbound::Drop("bad DHCP");
    };
    match DhcpRepr::parse(&pkt) {
        Ok(r)
            if matches!(
                r.message_type,
                DhcpMessageType::Discover | DhcpMessageType::Request
            ) =>
        {
            Inbound::Dhcp {
                xid: r.transaction_id,
                kind: r.message_type,
                mac: r.client_hardware_address,
            }
        }
        _ => Inbound::Drop("DHCP message a server ignores"),
    }
}

/// An Ethernet + IPv4 frame around `l4_len` bytes of `proto`, with `fill` writing the L4 part.
fn ipv4_frame(
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    l4_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: GATEWAY_MAC,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + l4_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut pkt = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    fill(pkt.payload_mut());
    buf
}

/// A UDP datagram to the guest; `None` when the payload does not fit one frame.
pub fn udp_frame(
    dst_mac: EthernetAddress,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let len = udp.header_len() + payload.len();
    Some(ipv4_frame(
        dst_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        len,
        |b| {
            udp.emit(
                &mut UdpPacket::new_unchecked(b),
                &(*src.ip()).into(),
                &(*dst.ip()).into(),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        },
    ))
}

/// An ICMP echo reply to the guest.
pub fn echo_reply_frame(
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoReply {
        ident,
        seq_no: seq,
        data,
    };
    ipv4_frame(
        dst_mac,
        src,
        GUEST,
        IpProtocol::Icmp,
        icmp.buffer_len(),
        |b| {
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(b),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// The DHCP server's answer to a discover (offer) or request (ack): always the one guest
/// address, the gateway as router and the DNS address as resolver.
pub fn dhcp_reply(xid: u32, kind: DhcpMessageType, mac: EthernetAddress) -> Option<Vec<u8>> {
    let message_type = match kind {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => DhcpMessageType::Ack,
        _ => return None,
    };
    let dns = heapless::Vec::from_slice(&[DNS]).ok()?;
    let repr = DhcpRepr {
        message_type,
        transaction_id: xid,
        secs: 0,
        client_hardware_address: mac,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: GUEST,
        server_ip: GATEWAY,
        router: Some(GATEWAY),
        subnet_mask: Some(NETMASK),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(GATEWAY),
        parameter_request_list: None,
        dns_servers: Some(dns),
        max_size: None,
        lease_duration: Some(86_400),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut payload = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .ok()?;
    udp_frame(
        EthernetAddress::BROADCAST,
        SocketAddrV4::new(GATEWAY, DHCP_SERVER_PORT),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT),
        &payload,
    )
}

#[cfg(test)]
mod tests;
