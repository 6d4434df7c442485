//! The jail, in the test host: a VM run with `--jail DIR --uid 65534 --gid 65534` boots and
//! serves its forward while its process sees only DIR (read-only), holds no capability, runs
//! as nobody in namespaces of its own (an empty network namespace: restricted user networking
//! needs no new host socket) with every thread filtered and its realtime vCPU under SCHED_FIFO
//! all the same; and `tandem up` as root jails its VMs
//! by default, user networking that goes out included, with its own threads filtered.

mod common;

use common::{case, exec_cmdline, run_script};

/// Every line of `/proc/PID/status` the test checks, for the jailed process `$vm`, and what
/// it sees through `/proc/$vm/root`.
const INSPECT: &str = r#"inspect() {
  vm=$1
  echo "root: $(ls -A /proc/$vm/root/ | tr '\n' ' ')"
  grep -E '^(Uid|Gid|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|NSpid):' /proc/$vm/status
  echo "threads: $(cat /proc/$vm/task/*/status | grep -c '^Seccomp:')"
  echo "filtered: $(cat /proc/$vm/task/*/status | grep -c '^Seccomp:.2')"
  echo "mounts: $(wc -l < /proc/$vm/mountinfo)"
  # Field 41 of stat, the scheduling policy: 1 is SCHED_FIFO.
  echo "fifo: $(for t in /proc/$vm/task/*; do [ "$(cut -d' ' -f41 $t/stat)" = 1 ] && cat $t/comm; done | tr '\n' ' ')"
  for ns in mnt net pid ipc uts; do
    [ -z "$(readlink /proc/$vm/ns/$ns)" ] && echo "unreadable-ns: $ns"
    [ "$(readlink /proc/$vm/ns/$ns)" = "$(readlink /proc/self/ns/$ns)" ] && echo "shared-ns: $ns"
  done
  echo inspected
}"#;

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or("", str::trim)
}

/// The checks common to both VMs; `fifo`: the threads that run under SCHED_FIFO.
fn assert_jailed(out: &str, shared_net: bool, fifo: &str) {
    assert_eq!(field(out, "fifo:"), fifo, "{out}");
    assert!(out.contains("inspected"), "{out}");
    assert_eq!(field(out, "root:"), "marker", "{out}");
    for id in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = field(out, id).split_whitespace().collect();
        assert_eq!(ids, ["65534"; 4], "{id} {out}");
    }
    for cap in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(out, cap), "0000000000000000", "{cap} {out}");
    }
    assert_eq!(field(out, "NoNewPrivs:"), "1", "{out}");
    // PID 1 of its own namespace.
    let nspid: Vec<&str> = field(out, "NSpid:").split_whitespace().collect();
    assert_eq!(nspid.len(), 2, "{out}");
    assert_eq!(nspid[1], "1", "{out}");
    let threads: u32 = field(out, "threads:").parse().unwrap();
    assert!(threads >= 3, "{out}");
    assert_eq!(field(out, "filtered:"), threads.to_string(), "{out}");
    assert_eq!(
        field(out, "mounts:"),
        "1",
        "only the jail is mounted: {out}"
    );
    let shared: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("shared-ns: "))
        .collect();
    assert!(!out.contains("unreadable-ns"), "{out}");
    let want: &[&str] = if shared_net { &["net"] } else { &[] };
    assert_eq!(shared, want, "{out}");
}

#[test]
fn a_jailed_vm_sees_only_its_jail_and_still_serves_its_forward() {
    let serve = exec_cmdline(
        "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2; \
         mkdir -p /www; echo jailed-guest-serves > /www/hello; httpd -p 80 -h /www; \
         wget -q -O- http://10.0.2.2:8000/hello; echo guest-running; sleep 30; poweroff -f",
    );
    let script = format!(
        r#"
{INSPECT}
mkdir -p /tmp/www && echo host-answers > /tmp/www/hello
httpd -p 127.0.0.1:8000 -h /tmp/www
mkdir -p /tmp/jail && chmod 755 /tmp/jail && echo inside > /tmp/jail/marker
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M"
TANDEM_LOG=info timeout 150 tandem run $BOOT --cpus 1 --pin-cpus 1 --realtime --net user,restrict=on --forward tcp:8080:80 --jail /tmp/jail --uid 65534 --gid 65534 --serial file:/tmp/j.log --cmdline '{serve}' </dev/null 2>/tmp/j.err &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q guest-running /tmp/j.log 2>/dev/null; do sleep 0.2; i=$((i+1)); done
record run-view inspect $(cat /proc/$pid/task/$pid/children)
record run-forward wget -q -O- http://127.0.0.1:8080/hello
record run-marker cat /tmp/jail/marker
wait $pid
echo "status=$?" >>/tmp/j.err
record run-end cat /tmp/j.log /tmp/j.err
cat >/tmp/p.toml <<'TOML'
[[vm]]
name = "web"
kernel = "/guests/vmlinuz"
initrd = "/guests/initramfs.cpio.gz"
cmdline = '{serve}'
memory = "256M"
cpus = [0, 1]
net = "user,host-loopback=8000"
forwards = ["tcp:8081:80"]
TOML
tandem up /tmp/p.toml --state-dir /tmp/st >/tmp/up.out 2>&1 &
sup=$!
i=0
while [ $i -lt 600 ] && ! grep -q guest-running /tmp/up.out 2>/dev/null; do sleep 0.2; i=$((i+1)); done
vmpid=$(tandem ps --state-dir /tmp/st | awk '$1=="web" {{print $4}}')
echo inside > /tmp/st/jail/web/marker
record up-view inspect $(cat /proc/$vmpid/task/$vmpid/children)
record up-forward wget -q -O- http://127.0.0.1:8081/hello
record sup-threads sh -c "echo main $sup; for t in /proc/$sup/task/*; do echo thread \$(basename \$t) \$(grep '^Seccomp:' \$t/status | tr -d '\t '); done"

record down tandem down --state-dir /tmp/st
wait $sup
record up-out cat /tmp/up.out
"#
    );
    let (cases, all) = run_script(&script);
    // Shown when an assertion fails.
    eprintln!("{all}");

    let view = case(&cases, &all, "run-view");
    assert_jailed(&view.output, false, "vcpu0");
    let fwd = case(&cases, &all, "run-forward");
    assert_eq!(fwd.output.trim(), "jailed-guest-serves", "{}", fwd.output);
    let end = case(&cases, &all, "run-end");
    // restrict=on: the guest reached nothing on the host; it powered off, tandem exited 0.
    assert!(!end.output.contains("host-answers"), "{}", end.output);
    assert!(end.output.contains("status=0"), "{}", end.output);
    assert!(
        end.output.contains("jailed in /tmp/jail as 65534:65534"),
        "{}",
        end.output
    );

    let view = case(&cases, &all, "up-view");
    assert_jailed(&view.output, true, "");
    let fwd = case(&cases, &all, "up-forward");
    assert_eq!(fwd.output.trim(), "jailed-guest-serves", "{}", fwd.output);
    let up = case(&cases, &all, "up-out");
    // Jailed as nobody, the VM still opens host sockets: the host's loopback port it may use.
    assert!(up.output.contains("host-answers"), "{}", up.output);
    assert_eq!(case(&cases, &all, "down").rc, 0, "{}", up.output);
    // The supervisor: every thread but the main one (which starts VMs: a filter would pass to
    // them) filtered, the control socket's and the relays' included.
    let sup = case(&cases, &all, "sup-threads");
    let threads: Vec<&str> = sup
        .output
        .lines()
        .filter(|l| l.starts_with("thread "))
        .collect();
    assert!(threads.len() >= 5, "{}", sup.output);
    let unfiltered: Vec<&&str> = threads
        .iter()
        .filter(|t| !t.ends_with("Seccomp:2"))
        .collect();
    assert_eq!(unfiltered.len(), 1, "{}", sup.output);
    let main = field(&sup.output, "main ");
    assert!(
        unfiltered[0].starts_with(&format!("thread {main} ")),
        "{}",
        sup.output
    );
}
