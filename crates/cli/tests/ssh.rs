//! The README's example: a guest on the user-mode network runs an ssh server (dropbear), and
//! `ssh -p 2222` on the host side reaches it through `--forward tcp:2222:22` and runs a command.

mod common;

use common::{case, exec_cmdline, run_script_with, shared_libs};

const DROPBEAR: &str = "/usr/sbin/dropbear";
const DBCLIENT: &str = "/usr/bin/dbclient";
const DROPBEARKEY: &str = "/usr/bin/dropbearkey";

#[test]
fn ssh_through_a_forwarded_port_runs_a_command_in_the_guest() {
    // The guest fetches dropbear and its libraries from the test host over the network (its
    // initramfs has only busybox), then serves ssh on port 22 with a key it trusts.
    let mut files = vec![DROPBEAR.to_string()];
    files.extend(shared_libs(DROPBEAR));
    let fetch: Vec<String> = files
        .iter()
        .map(|f| {
            let dir = f.rsplit_once('/').map_or("/", |(d, _)| d);
            format!("mkdir -p {dir} && wget -q -O {f} http://10.0.2.2:8000{f} && chmod 755 {f}")
        })
        .collect();
    let guest_script = format!(
        "{}\n\
         echo root:x:0:0:root:/root:/bin/sh > /etc/passwd\n\
         mkdir -p /root/.ssh /etc/dropbear && chmod 700 /root/.ssh\n\
         wget -q -O /root/.ssh/authorized_keys http://10.0.2.2:8000/tmp/id.pub\n\
         dropbear -R -E -p 22 2>/tmp/dropbear.log && echo guest-sshd-ready\n\
         sleep 600\n",
        fetch.join("\n")
    );
    let cmdline = exec_cmdline(
        "ip link set eth0 up; udhcpc -q -n -i eth0 >/dev/null 2>&1; \
         wget -q -O /s.sh http://10.0.2.2:8000/tmp/guest.sh && sh /s.sh",
    );
    let script = format!(
        r#"
cat > /tmp/guest.sh <<'GUEST'
{guest_script}
GUEST
mkdir -p /root/.ssh
dropbearkey -t ed25519 -f /tmp/id 2>/dev/null | grep '^ssh-' > /tmp/id.pub
httpd -p 127.0.0.1:8000 -h /
timeout 200 tandem run --kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M --net user --forward tcp:2222:22 --serial file:/tmp/guest.log --cmdline '{cmdline}' </dev/null &
pid=$!
i=0
while [ $i -lt 120 ] && ! grep -q guest-sshd-ready /tmp/guest.log 2>/dev/null; do sleep 1; i=$((i+1)); done
record ssh timeout 60 dbclient -y -i /tmp/id -p 2222 root@127.0.0.1 'echo ssh-says-$((6*7)); cat /proc/cmdline'
kill $pid
wait $pid
record guest cat /tmp/guest.log
"#
    );
    let mut with = vec![DROPBEAR, DBCLIENT, DROPBEARKEY];
    let libs = shared_libs(DROPBEAR);
    with.extend(libs.iter().map(String::as_str));
    let (cases, all) = run_script_with(&script, &with);
    let c = case(&cases, &all, "ssh");
    let g = case(&cases, &all, "guest");
    assert_eq!(c.rc, 0, "ssh:\n{}\nguest:\n{}", c.output, g.output);
    assert!(c.output.contains("ssh-says-42"), "ssh:\n{}", c.output);
    assert!(
        c.output.contains("tandem.exec="),
        "the command ran in the guest (its /proc/cmdline); ssh:\n{}",
        c.output
    );
}
