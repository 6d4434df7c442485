//! `--net tap=NAME`: tandem creates the TAP interface (as root in the test host), the test host
//! addresses its end, and the guest reaches a server there and is answered to pings.

mod common;

use common::{case, exec_cmdline, run_script, run_script_with, shared_libs};

#[test]
fn a_guest_on_a_tap_interface_talks_to_the_host() {
    let guest = exec_cmdline(
        "ip link set eth0 up; ip addr add 192.168.100.2/24 dev eth0; i=0; \
         while ! wget -q -O- http://192.168.100.1:8000/hello; do sleep 1; i=$((i+1)); [ $i -gt 40 ] && break; done; \
         ping -c 2 192.168.100.1 | grep received; sleep 2",
    );
    let script = format!(
        r#"
mkdir -p /tmp/www && echo tap-ok > /tmp/www/hello
httpd -p 0.0.0.0:8000 -h /tmp/www
# Jailed: the TAP, opened before, serves the VM from an empty network namespace.
mkdir -p /tmp/jail && chmod 755 /tmp/jail
timeout 150 tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --net tap=tap0 --jail /tmp/jail --uid 65534 --gid 65534 --serial file:/tmp/tap.log --cmdline '{guest}' </dev/null 2>/tmp/tap.err &
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
record tap cat /tmp/tap.log /tmp/tap.err
record gone sh -c 'ip link show tap0 2>&1; true'
"#
    );
    let (cases, all) = run_script(&script);
    let c = case(&cases, &all, "tap");
    assert!(c.output.contains("tap-ok"), "guest:\n{}", c.output);
    assert!(c.output.contains("vm-netns: own"), "guest:\n{}", c.output);
    assert!(
        c.output
            .contains("2 packets transmitted, 2 packets received"),
        "guest:\n{}",
        c.output
    );
    assert!(
        c.output.contains("tandem-guest: exit=0"),
        "guest:\n{}",
        c.output
    );
    let gone = case(&cases, &all, "gone");
    assert!(
        !gone.output.contains("tap0:"),
        "the interface tandem created goes away with it:\n{}",
        gone.output
    );
}

/// The guest on tap0 at 192.168.100.2, serving a page on port 80 until it is stopped.
/// nft and ip, with their libraries, for the test host (the tests read the rules and set up
/// interfaces there).
fn nft_and_ip() -> Vec<String> {
    let (nft, ip) = ("/usr/sbin/nft", "/usr/sbin/ip");
    let mut files = vec![nft.to_string(), ip.to_string()];
    files.extend(shared_libs(nft));
    files.extend(shared_libs(ip));
    files.sort();
    files.dedup();
    files
}

fn web_guest() -> String {
    exec_cmdline(
        "ip link set eth0 up; ip addr add 192.168.100.2/24 dev eth0; ip route add default via 192.168.100.1; \
         mkdir -p /www; echo guest-web-ok > /www/hello; httpd -p 80 -h /www; echo serving; sleep 600",
    )
}

/// `--forward` over TAP: tandem installs nftables DNAT rules in a table of its own, a client on
/// the host (127.0.0.1, the default) and one in another network namespace (through an explicit
/// host address) reach the guest's server, and the rules are gone after SIGTERM; a table left
/// by a tandem killed with SIGKILL is removed by the next tandem that maps ports.
#[test]
fn forwards_over_tap_are_nftables_rules_removed_on_exit() {
    let guest = web_guest();
    let quick = exec_cmdline("true");
    let script = format!(
        r#"
IP=/usr/sbin/ip
# The "outside": another network namespace, joined to this one by a veth pair.
mkdir -p /run/netns
$IP netns add out
$IP link add vout type veth peer name vin
$IP link set vin netns out
$IP addr add 192.168.50.1/24 dev vout
$IP link set vout up
$IP netns exec out sh -c 'ip link set lo up; ip addr add 192.168.50.2/24 dev vin; ip link set vin up'
echo 1 >/proc/sys/net/ipv4/ip_forward
tap_up() {{
  i=0
  while [ $i -lt 100 ] && ! ip link show tap0 >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
  ip addr add 192.168.100.1/24 dev tap0
  ip link set tap0 up
}}
FWD="--net tap=tap0,guest-ip=192.168.100.2 --forward tcp:8022:80 --forward tcp:192.168.50.1:8080:80"
tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M $FWD --serial file:/tmp/g1.log --cmdline '{guest}' </dev/null 2>/tmp/t1.err &
pid=$!
tap_up
i=0
while ! wget -q -O /tmp/local http://127.0.0.1:8022/hello 2>/dev/null; do sleep 1; i=$((i+1)); [ $i -gt 120 ] && break; done
record rules nft list table ip tandem_fwd_$pid
record local cat /tmp/local
record outside $IP netns exec out timeout 20 wget -q -O- http://192.168.50.1:8080/hello
record not-outside $IP netns exec out timeout 20 wget -q -O- http://192.168.50.1:8022/hello
kill -TERM $pid
wait $pid
echo "status=$?" >>/tmp/t1.err
record term sh -c 'cat /tmp/t1.err; nft list tables; cat /tmp/g1.log'

tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M $FWD --serial file:/tmp/g2.log --cmdline '{guest}' </dev/null 2>/tmp/t2.err &
pid=$!
i=0
while [ $i -lt 300 ] && ! nft list table ip tandem_fwd_$pid >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
kill -KILL $pid
wait $pid
record killed sh -c "echo pid=$pid; nft list tables"
record next timeout 150 tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M $FWD --serial none --cmdline '{quick}' </dev/null
record after sh -c 'nft list tables; echo tables-listed'
"#
    );
    let with = nft_and_ip();
    let with: Vec<&str> = with.iter().map(String::as_str).collect();
    let (cases, all) = run_script_with(&script, &with);

    let rules = case(&cases, &all, "rules");
    assert!(
        rules.output.contains("dnat to 192.168.100.2:80"),
        "tandem's table holds the DNAT rules:\n{}",
        rules.output
    );
    let local = case(&cases, &all, "local");
    assert_eq!(local.output.trim(), "guest-web-ok", "from the host itself");
    let outside = case(&cases, &all, "outside");
    assert_eq!(
        outside.output.trim(),
        "guest-web-ok",
        "from another network namespace, through 192.168.50.1:8080 (rc {})",
        outside.rc
    );
    let not_outside = case(&cases, &all, "not-outside");
    assert_ne!(
        not_outside.rc, 0,
        "the default 127.0.0.1 forward must not be reachable from outside:\n{}",
        not_outside.output
    );
    let term = case(&cases, &all, "term");
    assert!(
        term.output.contains("stopped by SIGTERM"),
        "{}",
        term.output
    );
    assert!(term.output.contains("status=143"), "{}", term.output);
    assert!(
        !term.output.contains("tandem_fwd_"),
        "the rules are removed on SIGTERM:\n{}",
        term.output
    );
    let killed = case(&cases, &all, "killed");
    let pid = killed
        .output
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .expect("pid")
        .trim()
        .to_string();
    assert!(
        killed
            .output
            .contains(&format!("table ip tandem_fwd_{pid}")),
        "SIGKILL cannot be caught: the table stays:\n{}",
        killed.output
    );
    let next = case(&cases, &all, "next");
    assert_eq!(next.rc, 0, "{}", next.output);
    let after = case(&cases, &all, "after");
    assert!(after.output.contains("tables-listed"), "{}", after.output);
    assert!(
        !after.output.contains("tandem_fwd_"),
        "the next tandem removed the stale table, and its own on exit:\n{}",
        after.output
    );
}

/// The CVE-2020-8558 pattern: forwards from 127.0.0.1 set `route_localnet=1` on the TAP
/// interface, so a root guest that routes 127.0.0.0/8 to the host reaches services bound to
/// the host's 127.0.0.1 only. tandem's table drops such packets while the forward still works.
/// After a SIGKILL, the next tandem puts the interface's `route_localnet` back as it was.
#[test]
fn a_guest_cannot_reach_host_loopback_services_and_route_localnet_is_restored_after_a_kill() {
    // The attack: no loopback of its own, 127.0.0.0/8 routed to the host, martians accepted.
    let guest = exec_cmdline(
        "ip link set eth0 up; ip addr add 192.168.100.2/24 dev eth0; ip route add default via 192.168.100.1; \
         mkdir -p /www; echo guest-web-ok > /www/hello; httpd -p 80 -h /www; \
         echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet; echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet; \
         ip addr flush dev lo; ip route del 127.0.0.0/8 dev lo table local; \
         ip route add 127.0.0.0/8 via 192.168.100.1 dev eth0; ip route show table all | grep 127; \
         i=0; while [ $i -lt 8 ]; do timeout 5 wget -q -O /tmp/s http://127.0.0.1:8001/secret && echo LEAKED-$(cat /tmp/s) && break; sleep 1; i=$((i+1)); done; \
         echo probe-done; sleep 600",
    );
    let quick = exec_cmdline("true");
    let script = format!(
        r#"
IP=/usr/sbin/ip
mkdir -p /tmp/sec && echo host-secret > /tmp/sec/secret
httpd -p 127.0.0.1:8001 -h /tmp/sec
tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --net tap=tap0,guest-ip=192.168.100.2 --forward tcp:8022:80 --serial file:/tmp/g1.log --cmdline '{guest}' </dev/null 2>/tmp/t1.err &
pid=$!
i=0
while [ $i -lt 100 ] && ! $IP link show tap0 >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
$IP addr add 192.168.100.1/24 dev tap0
$IP link set tap0 up
i=0
while [ $i -lt 150 ] && ! grep -q probe-done /tmp/g1.log 2>/dev/null; do sleep 1; i=$((i+1)); done
record probe cat /tmp/g1.log
record forward timeout 30 wget -q -O- http://127.0.0.1:8022/hello
kill -TERM $pid
wait $pid

# A TAP interface that outlives tandem, its route_localnet 0.
$IP tuntap add tap1 mode tap
echo 0 >/proc/sys/net/ipv4/conf/tap1/route_localnet
FWD="--net tap=tap1,guest-ip=192.168.101.2 --forward tcp:8023:80"
tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M $FWD --serial none --cmdline '{guest}' </dev/null 2>/tmp/t2.err &
pid=$!
i=0
while [ $i -lt 300 ] && ! nft list table ip tandem_fwd_$pid >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
sleep 1
kill -KILL $pid
wait $pid
record killed cat /proc/sys/net/ipv4/conf/tap1/route_localnet
record next timeout 150 tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M $FWD --serial none --cmdline '{quick}' </dev/null
record restored sh -c 'cat /proc/sys/net/ipv4/conf/tap1/route_localnet; nft list tables; echo tables-listed'
"#
    );
    let with = nft_and_ip();
    let with: Vec<&str> = with.iter().map(String::as_str).collect();
    let (cases, all) = run_script_with(&script, &with);

    let probe = case(&cases, &all, "probe");
    eprintln!("the guest's probe:\n{}", probe.output);
    assert!(
        probe.output.contains("probe-done"),
        "the guest ran its probe:\n{}",
        probe.output
    );
    assert!(
        !probe.output.contains("Segmentation fault") && !probe.output.contains("not found"),
        "the probe itself failed:\n{}",
        probe.output
    );
    assert!(
        !probe.output.contains("LEAKED-"),
        "the guest reached a service bound to the host's 127.0.0.1:\n{}",
        probe.output
    );
    let forward = case(&cases, &all, "forward");
    assert_eq!(
        forward.output.trim(),
        "guest-web-ok",
        "the forward still works"
    );
    let killed = case(&cases, &all, "killed");
    assert_eq!(
        killed.output.trim(),
        "1",
        "tandem set route_localnet and SIGKILL left it"
    );
    let next = case(&cases, &all, "next");
    assert_eq!(next.rc, 0, "{}", next.output);
    let restored = case(&cases, &all, "restored");
    assert_eq!(
        restored.output.lines().next().map(str::trim),
        Some("0"),
        "the next tandem put route_localnet back:\n{}",
        restored.output
    );
    assert!(
        !restored.output.contains("tandem_fwd_"),
        "{}",
        restored.output
    );
}
