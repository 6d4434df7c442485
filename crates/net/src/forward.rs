//! Port forwards: `[tcp|udp]:[HOSTADDR:]HOSTPORT:GUESTPORT`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A host port mapped to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// TCP or UDP.
    pub proto: Protocol,
    /// Where the host listens (default 127.0.0.1).
    pub host: SocketAddr,
    /// The guest's port.
    pub guest_port: u16,
}

/// Why a forward spec was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// Wrong number of fields.
    #[error("'{0}' is not [tcp|udp:][HOSTADDR:]HOSTPORT:GUESTPORT")]
    Shape(String),
    /// A port that is not 1-65535.
    #[error("'{0}' is not a port (1-65535)")]
    Port(String),
    /// A host address that is not an IP address.
    #[error("'{0}' is not an IP address")]
    Addr(String),
}

fn port(s: &str) -> Result<u16, ForwardError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ForwardError::Port(s.into())),
    }
}

impl std::str::FromStr for Forward {
    type Err = ForwardError;

    fn from_str(spec: &str) -> Result<Forward, ForwardError> {
        let (proto, rest) = match spec.split_once(':') {
            Some(("tcp", r)) => (Protocol::Tcp, r),
            Some(("udp", r)) => (Protocol::Udp, r),
            _ => (Protocol::Tcp, spec),
        };
        // The host address may be IPv6 in brackets: [::1]:2222:22.
        let (addr, ports) = if let Some(r) = rest.strip_prefix('[') {
            let (a, p) = r
                .split_once("]:")
                .ok_or_else(|| ForwardError::Shape(spec.into()))?;
            (Some(a), p)
        } else {
            match rest.matches(':').count() {
                1 => (None, rest),
                2 => {
                    let (a, p) = rest.split_once(':').unwrap_or_default();
                    (Some(a), p)
                }
                _ => return Err(ForwardError::Shape(spec.into())),
            }
        };
        let (hp, gp) = ports
            .split_once(':')
            .ok_or_else(|| ForwardError::Shape(spec.into()))?;
        let ip = match addr {
            None | Some("") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(a) => a.parse().map_err(|_| ForwardError::Addr(a.into()))?,
        };
        Ok(Forward {
            proto,
            host: SocketAddr::new(ip, port(hp)?),
            guest_port: port(gp)?,
        })
    }
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{p}:{}:{}", self.host, self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Result<Forward, ForwardError> {
        s.parse()
    }

    #[test]
    fn forms() {
        let a = f("tcp:2222:22").unwrap();
        assert_eq!(a.proto, Protocol::Tcp);
        assert_eq!(a.host, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(a.guest_port, 22);
        assert_eq!(f("2222:22").unwrap(), a, "tcp is the default");
        let b = f("udp:0.0.0.0:5353:53").unwrap();
        assert_eq!(b.proto, Protocol::Udp);
        assert_eq!(b.host, "0.0.0.0:5353".parse().unwrap());
        assert_eq!(
            f("tcp:[::1]:8080:80").unwrap().host,
            "[::1]:8080".parse().unwrap()
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(f("tcp:22"), Err(ForwardError::Shape(_))));
        assert!(matches!(f("sctp:1:2:3:4"), Err(ForwardError::Shape(_))));
        assert_eq!(f("tcp:0:22"), Err(ForwardError::Port("0".into())));
        assert_eq!(f("tcp:70000:22"), Err(ForwardError::Port("70000".into())));
        assert_eq!(f("tcp:1:x"), Err(ForwardError::Port("x".into())));
        assert_eq!(
            f("tcp:localhost:1:2"),
            Err(ForwardError::Addr("localhost".into()))
        );
    }
}
