//! What a guest on the user-mode network may reach: with the defaults, the host's loopback
//! through 10.0.2.2 (another VM's forward included) but not link-local addresses such as a
//! cloud metadata service at 169.254.169.254; with `host-loopback=off`, neither, while its own
//! forward still works.

mod common;

use common::{case, exec_cmdline, run_script_with, shared_libs};

#[test]
fn restrictive_options_close_the_paths_to_the_host_another_vm_and_metadata() {
    let web = |name: &str| {
        format!(
            "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2; \
             mkdir -p /www; echo {name}-web-ok > /www/hello; httpd -p 80 -h /www; "
        )
    };
    let b = exec_cmdline(&(web("b") + "echo serving; sleep 600"));
    let a = exec_cmdline(
        &(web("a")
            + "for u in 10.0.2.2:8000/secret 10.0.2.2:8081/hello 169.254.169.254/meta; do \
               if timeout 10 wget -q -O /tmp/o http://$u; then echo GOT $u $(cat /tmp/o); else echo REFUSED $u; fi; done; \
               echo probes-done; sleep 600"),
    );
    let script = format!(
        r#"
IP=/usr/sbin/ip
mkdir -p /tmp/sec /tmp/meta
echo host-secret > /tmp/sec/secret
httpd -p 127.0.0.1:8000 -h /tmp/sec
# A stand-in for a cloud metadata service.
$IP addr add 169.254.169.254/32 dev lo
echo metadata > /tmp/meta/meta
httpd -p 169.254.169.254:80 -h /tmp/meta
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M"
ready() {{
  i=0
  while [ $i -lt 150 ] && ! grep -q $2 $1 2>/dev/null; do sleep 1; i=$((i+1)); done
}}
# The second VM, its forward on the host's 127.0.0.1:8081.
tandem run $BOOT --forward tcp:8081:80 --serial file:/tmp/b.log --cmdline '{b}' </dev/null &
b=$!
ready /tmp/b.log serving
record b-forward timeout 30 wget -q -O- http://127.0.0.1:8081/hello
probe() {{
  pn=$1; shift
  tandem run $BOOT "$@" --serial file:/tmp/$pn.log --cmdline '{a}' </dev/null &
  pid=$!
  ready /tmp/$pn.log probes-done
  record $pn-own timeout 30 wget -q -O- http://127.0.0.1:8082/hello
  record $pn cat /tmp/$pn.log
  kill $pid
  wait $pid
}}
probe open --net user --forward tcp:8082:80
probe closed --net user,host-loopback=off --forward tcp:8082:80
kill $b
wait $b
"#
    );
    let ip = "/usr/sbin/ip";
    let libs = shared_libs(ip);
    let mut with = vec![ip];
    with.extend(libs.iter().map(String::as_str));
    let (cases, all) = run_script_with(&script, &with);

    let bf = case(&cases, &all, "b-forward");
    assert_eq!(bf.output.trim(), "b-web-ok", "the second VM serves");
    let open = case(&cases, &all, "open");
    assert!(open.output.contains("probes-done"), "{}", open.output);
    // The path the defaults leave open (as QEMU's and passt's do).
    assert!(
        open.output.contains("GOT 10.0.2.2:8000/secret host-secret"),
        "{}",
        open.output
    );
    assert!(
        open.output.contains("GOT 10.0.2.2:8081/hello b-web-ok"),
        "{}",
        open.output
    );
    assert!(
        open.output.contains("REFUSED 169.254.169.254/meta"),
        "link-local addresses are off by default:\n{}",
        open.output
    );
    let closed = case(&cases, &all, "closed");
    assert!(closed.output.contains("probes-done"), "{}", closed.output);
    for u in [
        "10.0.2.2:8000/secret",
        "10.0.2.2:8081/hello",
        "169.254.169.254/meta",
    ] {
        assert!(
            closed.output.contains(&format!("REFUSED {u}")),
            "host-loopback=off: {u}\n{}",
            closed.output
        );
    }
    for own in ["open-own", "closed-own"] {
        let c = case(&cases, &all, own);
        assert_eq!(
            c.output.trim(),
            "a-web-ok",
            "{own}: the VM's own forward works"
        );
    }
}
