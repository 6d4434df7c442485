//! What the guest may reach on the host and beyond: `restrict`, the host-loopback mapping of
//! the gateway (10.0.2.2) and link-local addresses.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::{DNS, GATEWAY, NETMASK};

/// Which of the host's loopback ports the guest reaches through the gateway, 10.0.2.2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostLoopback {
    /// Every port (QEMU's and passt's default for `tandem run`).
    #[default]
    All,
    /// None (passt's `--no-map-gw`; the default in partition configs).
    None,
    /// Only these ports (TCP and UDP).
    Ports(Vec<u16>),
}

impl HostLoopback {
    fn allows(&self, port: u16) -> bool {
        match self {
            HostLoopback::All => true,
            HostLoopback::None => false,
            HostLoopback::Ports(p) => p.contains(&port),
        }
    }
}

/// The rules a guest's outbound connection or datagram is judged by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Nothing goes out; only forwards come in (QEMU's `restrict=on`).
    pub restrict: bool,
    /// What 10.0.2.2 reaches on the host's loopback.
    pub host_loopback: HostLoopback,
    /// Whether 169.254.0.0/16 (cloud metadata services at 169.254.169.254) is reachable.
    pub link_local: bool,
}

impl Policy {
    /// Where a guest connection or datagram to `dst` goes on the host; `None`: refused.
    /// (DNS to 10.0.2.3 is the datagram relay's own business.)
    pub fn host_target(&self, dst: SocketAddrV4) -> Option<SocketAddrV4> {
        if self.restrict {
            return None;
        }
        let ip = *dst.ip();
        let net = u32::from(GATEWAY) & u32::from(NETMASK);
        if ip == GATEWAY {
            return self
                .host_loopback
                .allows(dst.port())
                .then_some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()));
        }
        if ip == DNS
            || u32::from(ip) & u32::from(NETMASK) == net
            // 127.0.0.0/8 sent by the guest itself: the gateway is the only way to the host's
            // loopback.
            || ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || (ip.is_link_local() && !self.link_local)
        {
            return None;
        }
        // The host's own addresses are its loopback by another name: where 10.0.2.2 is
        // limited, so are they (another VM's forward listening on 0.0.0.0 stays out of reach).
        if self.host_loopback != HostLoopback::All && is_host_address(ip) {
            return None;
        }
        Some(dst)
    }
}

/// Whether `ip` is one of the host's own addresses: the kernel lets a socket bind to an address
/// only when it is local. (The I/O thread's seccomp filter allows this, where getifaddrs would
/// need a netlink socket; with `net.ipv4.ip_nonlocal_bind=1` every address looks local, so the
/// check refuses too much rather than too little.) A check that cannot be made refuses.
fn is_host_address(ip: Ipv4Addr) -> bool {
    match std::net::UdpSocket::bind(SocketAddrV4::new(ip, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EADDRNOTAVAIL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's IPv4 addresses (getifaddrs), what `is_host_address` must agree with.
    fn host_addresses() -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a list we free below.
        if unsafe { libc::getifaddrs(&mut list) } != 0 {
            // Cannot tell: treat every address as the host's (refuse) rather than let one through.
            return vec![Ipv4Addr::UNSPECIFIED];
        }
        let mut p = list;
        while !p.is_null() {
            // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
            let ifa = unsafe { &*p };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
                let family = unsafe { (*ifa.ifa_addr).sa_family };
                if i32::from(family) == libc::AF_INET {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                }
            }
            p = ifa.ifa_next;
        }
        // SAFETY: list came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(list) };
        out
    }

    fn to(a: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(a), port)
    }

    #[test]
    fn each_option_refuses_what_it_names() {
        let open = Policy::default();
        assert_eq!(
            open.host_target(to([10, 0, 2, 2], 80)),
            Some(to([127, 0, 0, 1], 80))
        );
        assert_eq!(
            open.host_target(to([192, 0, 2, 1], 80)),
            Some(to([192, 0, 2, 1], 80))
        );
        assert_eq!(open.host_target(to([169, 254, 169, 254], 80)), None);
        assert_eq!(open.host_target(to([127, 0, 0, 1], 80)), None);
        let ll = Policy {
            link_local: true,
            ..Policy::default()
        };
        assert!(ll.host_target(to([169, 254, 169, 254], 80)).is_some());
        let restrict = Policy {
            restrict: true,
            link_local: true,
            ..Policy::default()
        };
        for a in [[10, 0, 2, 2], [192, 0, 2, 1], [169, 254, 169, 254]] {
            assert_eq!(restrict.host_target(to(a, 80)), None, "{a:?}");
        }
        let none = Policy {
            host_loopback: HostLoopback::None,
            ..Policy::default()
        };
        assert_eq!(none.host_target(to([10, 0, 2, 2], 80)), None);
        assert!(none.host_target(to([192, 0, 2, 1], 80)).is_some());
        let some = Policy {
            host_loopback: HostLoopback::Ports(vec![8000]),
            ..Policy::default()
        };
        assert!(some.host_target(to([10, 0, 2, 2], 8000)).is_some());
        assert_eq!(some.host_target(to([10, 0, 2, 2], 8001)), None);
    }

    #[test]
    fn the_hosts_own_addresses_count_as_its_loopback() {
        let none = Policy {
            host_loopback: HostLoopback::None,
            ..Policy::default()
        };
        for ip in host_addresses().into_iter().filter(|ip| !ip.is_loopback()) {
            assert_eq!(none.host_target(SocketAddrV4::new(ip, 80)), None, "{ip}");
            assert!(Policy::default()
                .host_target(SocketAddrV4::new(ip, 80))
                .is_some());
        }
        assert!(host_addresses().contains(&Ipv4Addr::LOCALHOST));
        for ip in host_addresses() {
            assert!(is_host_address(ip), "{ip}");
        }
        // TEST-NET-1 (RFC 5737) is no host's.
        assert!(!is_host_address(Ipv4Addr::new(192, 0, 2, 1)));
    }
}
