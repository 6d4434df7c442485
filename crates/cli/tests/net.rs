//! The user-mode network seen from a real guest and from the test host: DHCP, outbound TCP
//! through host sockets, port forwards carrying 64 MiB both ways intact and 50 connections at
//! once, a static address, and a forward whose port is taken.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, run_script_with, sha_after, Case};

type Session = (HashMap<String, Case>, String);

/// What the guest runs once its network is up (fetched from the test host over the network).
const GUEST_SCRIPT: &str = r#"
echo lease: $(ip -4 addr show eth0 | grep -o 'inet [0-9./]*')
echo route: $(ip route | grep default)
echo dns: $(cat /etc/resolv.conf)
echo dns-answer: $(nslookup tandem.test 2>&1 | tr '\n' ' ')
mkdir -p /www/cgi-bin
wget -q -O /www/big http://10.0.2.2:8000/big && echo guest-got-big: $(sha256sum /www/big)
wget -q -O /www/small http://10.0.2.2:8000/small
cat > /www/cgi-bin/up <<'X'
#!/bin/sh
echo Content-Type: text/plain
echo
head -c $CONTENT_LENGTH | sha256sum
X
chmod +x /www/cgi-bin/up
httpd -p 80 -h /www
echo guest-ready
sleep 600
"#;

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let dhcp = exec_cmdline(
            "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; \
             wget -q -O /s.sh http://10.0.2.2:8000/guest.sh && sh /s.sh",
        );
        let fixed = exec_cmdline(
            "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; \
             ip route add default via 10.0.2.2; wget -q -O- http://10.0.2.2:8000/hello",
        );
        let script = format!(
            r#"
mkdir -p /tmp/www
cat > /tmp/www/guest.sh <<'GUEST'
{GUEST_SCRIPT}
GUEST
# No NUL bytes: busybox wget --post-file sends its file as a C string.
head -c 67108864 /dev/urandom | tr '\000' '\001' > /tmp/www/big
head -c 262144 /dev/urandom > /tmp/www/small
echo static-ok > /tmp/www/hello
echo "host-big: $(sha256sum /tmp/www/big)"
echo "host-small: $(sha256sum /tmp/www/small)"
httpd -p 127.0.0.1:8000 -h /tmp/www
# The host's resolver, as tandem finds it: a stub that answers every A query with 192.0.2.77.
echo 'nameserver 127.0.0.2' > /tmp/resolv.conf
export TANDEM_RESOLV_CONF=/tmp/resolv.conf
dns-stub 127.0.0.2:53 192.0.2.77 &
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 512M"
timeout 280 tandem run $BOOT --forward tcp:8080:80 --serial file:/tmp/guest.log --cmdline '{dhcp}' </dev/null &
pid=$!
i=0
while [ $i -lt 150 ] && ! grep -q guest-ready /tmp/guest.log 2>/dev/null; do sleep 1; i=$((i+1)); done
record down sh -c 'wget -q -O /tmp/down http://127.0.0.1:8080/big && sha256sum /tmp/down'
record up wget -q -O- --post-file=/tmp/www/big http://127.0.0.1:8080/cgi-bin/up
many() {{
  mkdir -p /tmp/many; n=0
  pids=
  while [ $n -lt 50 ]; do n=$((n+1)); wget -q -O /tmp/many/$n http://127.0.0.1:8080/small & pids="$pids $!"; done
  for p in $pids; do wait $p; done
  sha256sum /tmp/many/* | cut -d' ' -f1 | sort | uniq -c
}}
record many many
kill $pid
wait $pid
record guest cat /tmp/guest.log
run_case static $BOOT --net user --cmdline '{fixed}'
run_case busy $BOOT --forward tcp:8000:80
"#
        );
        let stub = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/dns-stub");
        run_script_with(&script, &[&format!("{stub}:/usr/bin/dns-stub")])
    })
}

#[test]
fn dhcp_gives_the_guest_its_address_route_and_resolver() {
    let (cases, all) = session();
    let g = case(cases, all, "guest");
    assert!(
        g.output.contains("lease: inet 10.0.2.15/24"),
        "guest:\n{}",
        g.output
    );
    assert!(
        g.output.contains("route: default via 10.0.2.2"),
        "guest:\n{}",
        g.output
    );
    assert!(
        g.output.contains("dns: nameserver 10.0.2.3"),
        "guest:\n{}",
        g.output
    );
}

#[test]
fn the_guests_dns_queries_reach_the_hosts_resolver() {
    let (cases, all) = session();
    let g = case(cases, all, "guest");
    let line = g
        .output
        .lines()
        .find(|l| l.starts_with("dns-answer:"))
        .unwrap_or_default();
    assert!(line.contains("192.0.2.77"), "guest:\n{}", g.output);
}

#[test]
fn the_guest_reaches_the_host_through_the_gateway_and_gets_64_mib_intact() {
    let (cases, all) = session();
    let host = sha_after(all, "host-big: ").expect("host checksum");
    let g = case(cases, all, "guest");
    assert_eq!(
        sha_after(&g.output, "guest-got-big: "),
        Some(host),
        "guest:\n{}",
        g.output
    );
}

#[test]
fn a_forwarded_port_carries_64_mib_both_ways_intact() {
    let (cases, all) = session();
    let host = sha_after(all, "host-big: ").expect("host checksum");
    let down = case(cases, all, "down");
    assert_eq!(down.rc, 0, "guest to host:\n{}", down.output);
    assert!(
        down.output.starts_with(host),
        "guest to host:\n{}",
        down.output
    );
    let up = case(cases, all, "up");
    assert_eq!(up.rc, 0, "host to guest:\n{}", up.output);
    assert!(
        up.output.trim().starts_with(host),
        "host to guest:\n{}",
        up.output
    );
}

#[test]
fn fifty_concurrent_connections_through_a_forward_all_complete() {
    let (cases, all) = session();
    let small = sha_after(all, "host-small: ").expect("host checksum");
    let c = case(cases, all, "many");
    assert_eq!(
        c.output.trim(),
        format!("50 {small}"),
        "every download should be complete and identical"
    );
}

#[test]
fn a_static_address_works_without_dhcp() {
    let (cases, all) = session();
    let c = case(cases, all, "static");
    assert_eq!(c.rc, 0, "output:\n{}", c.output);
    assert!(c.output.contains("static-ok"), "output:\n{}", c.output);
}

#[test]
fn a_forward_whose_host_port_is_taken_fails_at_start() {
    let (cases, all) = session();
    let c = case(cases, all, "busy");
    assert_eq!(c.rc, 2, "output:\n{}", c.output);
    assert!(
        c.output
            .contains("cannot listen on 127.0.0.1:8000: the port is already in use"),
        "output:\n{}",
        c.output
    );
}
