//! The TAP loopback guard on a real kernel, without a VM: two network namespaces joined by a
//! veth pair stand for the host (its end `hv` in place of the TAP interface) and a root guest.
//! Needs root, `ip` and `nft` (skipped otherwise).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use tandem_net::portmap::{PortMap, PortMapSpec};

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `f` on a thread inside network namespace `ns` (from `ip netns add`).
fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns(2) on a namespace descriptor; it moves this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .expect("thread")
}

fn fetch(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Serves `text` to every connection on `addr` (in the calling thread's namespace).
fn serve(addr: &str, text: &'static str) -> u16 {
    let l = TcpListener::bind(addr).expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(text.as_bytes());
        }
    });
    port
}

#[test]
fn a_guest_routing_127_to_the_host_gets_no_answer_while_forwards_work() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (h, g) = (
        format!("tandem-h{}", std::process::id()),
        format!("tandem-g{}", std::process::id()),
    );
    if !root || !ip(&["netns", "add", &h]) {
        eprintln!("skipped: needs root and ip");
        return;
    }
    if !ip(&["netns", "add", &g])
        || !ip(&[
            "-n", &h, "link", "add", "hv", "type", "veth", "peer", "name", "gv", "netns", &g,
        ])
    {
        ip(&["netns", "del", &h]);
        ip(&["netns", "del", &g]);
        eprintln!("skipped: no veth");
        return;
    }
    for cmd in [
        vec!["-n", &h, "link", "set", "lo", "up"],
        vec!["-n", &h, "addr", "add", "192.168.100.1/24", "dev", "hv"],
        vec!["-n", &h, "link", "set", "hv", "up"],
        vec!["-n", &g, "link", "set", "lo", "up"],
        vec!["-n", &g, "addr", "add", "192.168.100.2/24", "dev", "gv"],
        vec!["-n", &g, "link", "set", "gv", "up"],
        // The attack: no loopback of its own, 127.0.0.0/8 routed to the host.
        vec!["-n", &g, "addr", "flush", "dev", "lo"],
        vec![
            "-n",
            &g,
            "route",
            "add",
            "127.0.0.0/8",
            "via",
            "192.168.100.1",
            "dev",
            "gv",
        ],
    ] {
        assert!(ip(&cmd), "ip {cmd:?}");
    }
    inside(&g, || {
        for f in ["all", "gv"] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{f}/route_localnet"), "1").unwrap();
        }
    });
    // A host service bound to 127.0.0.1 only, and the guest's web server.
    let secret = inside(&h, || serve("127.0.0.1:0", "host-secret"));
    inside(&g, || serve("0.0.0.0:80", "guest-web"));
    let target: SocketAddr = (Ipv4Addr::LOCALHOST, secret).into();

    // route_localnet alone (what forwards need) opens the host's loopback to the guest...
    let hv = "/proc/sys/net/ipv4/conf/hv/route_localnet";
    inside(&h, move || std::fs::write(hv, "1").unwrap());
    let open = inside(&g, move || fetch(target));
    inside(&h, move || std::fs::write(hv, "0").unwrap());

    // ...tandem's table closes it, and its forward works.
    let fwd = secret.wrapping_add(1).max(1024);
    let spec = PortMapSpec {
        interface: "hv".into(),
        guest: Ipv4Addr::new(192, 168, 100, 2),
        forwards: vec![format!("tcp:{fwd}:80").parse().unwrap()],
    };
    let g2 = g.clone();
    let (guarded, forward, localnet) = inside(&h, move || {
        let map = PortMap::install(&spec).expect("install");
        let localnet = std::fs::read_to_string(hv).unwrap();
        let guarded = inside(&g2, move || fetch(target));
        let forward = fetch((Ipv4Addr::LOCALHOST, fwd).into());
        drop(map);
        (guarded, forward, localnet)
    });
    ip(&["netns", "del", &h]);
    ip(&["netns", "del", &g]);
    assert_eq!(
        open.as_deref(),
        Some("host-secret"),
        "the attack works here"
    );
    assert_eq!(localnet.trim(), "1", "tandem set route_localnet");
    assert_eq!(forward.as_deref(), Some("guest-web"), "the forward works");
    assert_eq!(
        guarded, None,
        "the guest got an answer from the host's 127.0.0.1"
    );
}
