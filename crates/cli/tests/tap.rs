//! `--net tap=NAME`: tandem creates the TAP interface (as root in the test host), the test host
//! addresses its end, and the guest reaches a server there and is answered to pings.

mod common;

use common::{case, exec_cmdline, run_script};

#[test]
fn a_guest_on_a_tap_interface_talks_to_the_host() {
    let guest = exec_cmdline(
        "ip link set eth0 up; ip addr add 192.168.100.2/24 dev eth0; i=0; \
         while ! wget -q -O- http://192.168.100.1:8000/hello; do sleep 1; i=$((i+1)); [ $i -gt 40 ] && break; done; \
         ping -c 2 192.168.100.1 | grep received",
    );
    let script = format!(
        r#"
mkdir -p /tmp/www && echo tap-ok > /tmp/www/hello
httpd -p 0.0.0.0:8000 -h /tmp/www
timeout 150 tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --net tap=tap0 --serial file:/tmp/tap.log --cmdline '{guest}' </dev/null 2>/tmp/tap.err &
pid=$!
i=0
while [ $i -lt 100 ] && ! ip link show tap0 >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); done
ip addr add 192.168.100.1/24 dev tap0
ip link set tap0 up
wait $pid
record tap cat /tmp/tap.log /tmp/tap.err
record gone sh -c 'ip link show tap0 2>&1; true'
"#
    );
    let (cases, all) = run_script(&script);
    let c = case(&cases, &all, "tap");
    assert!(c.output.contains("tap-ok"), "guest:\n{}", c.output);
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
