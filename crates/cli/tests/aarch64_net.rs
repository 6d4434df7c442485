//! Networking of arm64 guests in the aarch64 nested testbed (issue 12): a file the guest serves
//! is fetched intact through `--forward`, with 50 connections at once; a guest on a TAP interface
//! that tandem creates (jailed, in its own network namespace) talks to the test host; a forward
//! over TAP is an nftables rule that reaches the guest and is removed on SIGTERM. DHCP and a
//! guest-to-host TCP connection are in `aarch64_boot.rs`.
//!
//! One test host session for the file; run it under the testbed lock like the other boot tests.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, run_script_on, sha_after, Arch, Case};

type Session = (HashMap<String, Case>, String);

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        // The guest makes the files and prints their checksums: the host's copies must match.
        let web = exec_cmdline(
            "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; mkdir -p /www; \
             head -c 16777216 /dev/urandom >/www/big; head -c 262144 /dev/urandom >/www/small; \
             echo guest-big: $(sha256sum /www/big); echo guest-small: $(sha256sum /www/small); \
             httpd -p 80 -h /www; echo guest-ready; sleep 600",
        );
        let tap = exec_cmdline(
            "ip link set eth0 up; ip addr add 192.168.100.2/24 dev eth0; i=0; \
             while ! wget -q -O- http://192.168.100.1:8000/hello; do sleep 1; i=$((i+1)); [ $i -gt 40 ] && break; done; \
             ping -c 2 192.168.100.1 | grep received; sleep 2",
        );
        let tap_web = exec_cmdline(
            "ip link set eth0 up; ip addr add 192.168.101.2/24 dev eth0; ip route add default via 192.168.101.1; \
             mkdir -p /www; echo guest-web-ok > /www/hello; httpd -p 80 -h /www; echo serving; sleep 600",
        );
        let script = format!(
            r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 512M"
timeout 280 tandem run $BOOT --forward tcp:8080:80 --serial file:/tmp/guest.log --cmdline '{web}' </dev/null &
pid=$!
i=0
while [ $i -lt 150 ] && ! grep -q guest-ready /tmp/guest.log 2>/dev/null; do sleep 1; i=$((i+1)); done
record down sh -c 'wget -q -O /tmp/down http://127.0.0.1:8080/big && sha256sum /tmp/down'
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

mkdir -p /tmp/www && echo tap-ok > /tmp/www/hello
httpd -p 0.0.0.0:8000 -h /tmp/www
# Jailed: the TAP, opened before, serves the VM from an empty network namespace.
mkdir -p /tmp/jail && chmod 755 /tmp/jail
timeout 150 tandem run $BOOT --net tap=tap0 --jail /tmp/jail --uid 65534 --gid 65534 --serial file:/tmp/tap.log --cmdline '{tap}' </dev/null 2>/tmp/tap.err &
pid=$!
i=0
while [ $i -lt 100 ] && ! ip link show tap0 >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
ip addr add 192.168.100.1/24 dev tap0
ip link set tap0 up
# Once the guest got its page, the VM (the child of tandem's waiting process) is jailed.
i=0
while [ $i -lt 600 ] && ! grep -q tap-ok /tmp/tap.log 2>/dev/null; do sleep 0.2; i=$((i+1)); done
vm=$(tr -d ' ' </proc/$pid/task/$pid/children)
[ -n "$vm" ] && [ -n "$(readlink /proc/$vm/ns/net)" ] && [ "$(readlink /proc/$vm/ns/net)" != "$(readlink /proc/self/ns/net)" ] && echo "vm-netns: own" >>/tmp/tap.err
wait $pid
echo "status=$?" >>/tmp/tap.err
record tap cat /tmp/tap.log /tmp/tap.err
record gone sh -c 'ip link show tap0 2>&1; true'

# --forward over TAP: nftables DNAT rules in a table of tandem's own, gone after SIGTERM.
tandem run $BOOT --net tap=tap1,guest-ip=192.168.101.2 --forward tcp:8022:80 --serial file:/tmp/fwd.log --cmdline '{tap_web}' </dev/null 2>/tmp/fwd.err &
pid=$!
i=0
while [ $i -lt 100 ] && ! ip link show tap1 >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
ip addr add 192.168.101.1/24 dev tap1
ip link set tap1 up
i=0
while ! wget -q -O /tmp/local http://127.0.0.1:8022/hello 2>/dev/null; do sleep 1; i=$((i+1)); [ $i -gt 120 ] && break; done
record rules nft list table ip tandem_fwd_$pid
record local cat /tmp/local
kill -TERM $pid
wait $pid
echo "status=$?" >>/tmp/fwd.err
record term sh -c 'cat /tmp/fwd.err; nft list tables; echo tables-listed; cat /tmp/fwd.log'
"#
        );
        run_script_on(Arch::Aarch64, &script, &[])
    })
}

#[test]
fn a_file_served_by_an_arm64_guest_arrives_intact_through_a_forward() {
    let (cases, all) = session();
    let guest = case(cases, all, "guest");
    let served = sha_after(&guest.output, "guest-big: ")
        .unwrap_or_else(|| panic!("the guest's checksum; guest:\n{}", guest.output));
    let down = case(cases, all, "down");
    assert_eq!(down.rc, 0, "16 MiB from the guest:\n{}", down.output);
    assert_eq!(
        sha_after(&down.output, ""),
        Some(served),
        "the file fetched through 127.0.0.1:8080 differs from the guest's:\n{}\nguest:\n{}",
        down.output,
        guest.output
    );
}

#[test]
fn fifty_concurrent_connections_through_a_forward_to_an_arm64_guest_all_complete() {
    let (cases, all) = session();
    let guest = case(cases, all, "guest");
    let small = sha_after(&guest.output, "guest-small: ")
        .unwrap_or_else(|| panic!("the guest's checksum; guest:\n{}", guest.output));
    let c = case(cases, all, "many");
    assert_eq!(
        c.output.trim(),
        format!("50 {small}"),
        "every download should be complete and identical; guest:\n{}",
        guest.output
    );
}

#[test]
fn a_jailed_arm64_guest_on_a_tap_interface_talks_to_the_host() {
    let (cases, all) = session();
    let c = case(cases, all, "tap");
    assert!(c.output.contains("tap-ok"), "guest:\n{}", c.output);
    assert!(c.output.contains("vm-netns: own"), "guest:\n{}", c.output);
    assert!(
        c.output
            .contains("2 packets transmitted, 2 packets received"),
        "guest:\n{}",
        c.output
    );
    assert!(
        c.output.contains("tandem-guest: exit=0") && c.output.contains("status=0"),
        "guest:\n{}",
        c.output
    );
    let gone = case(cases, all, "gone");
    assert!(
        !gone.output.contains("tap0:"),
        "the interface tandem created goes away with it:\n{}",
        gone.output
    );
}

#[test]
fn a_forward_over_tap_reaches_the_arm64_guest_and_its_rules_go_on_sigterm() {
    let (cases, all) = session();
    let term = case(cases, all, "term");
    let rules = case(cases, all, "rules");
    assert!(
        rules.output.contains("dnat to 192.168.101.2:80"),
        "tandem's table holds the DNAT rule:\n{}\n{}",
        rules.output,
        term.output
    );
    let local = case(cases, all, "local");
    assert_eq!(
        local.output.trim(),
        "guest-web-ok",
        "from the test host through 127.0.0.1:8022:\n{}",
        term.output
    );
    assert!(
        term.output.contains("stopped by SIGTERM") && term.output.contains("status=143"),
        "{}",
        term.output
    );
    assert!(term.output.contains("tables-listed"), "{}", term.output);
    assert!(
        !term.output.contains("tandem_fwd_"),
        "the rules are removed on SIGTERM:\n{}",
        term.output
    );
}
