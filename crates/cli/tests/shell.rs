//! The shell a user meets in the guest (the initramfs's `/init` without `tandem.exec`, as `cargo
//! xtask shell` boots it): typed on the console, plain `poweroff`, `halt` and `reboot` end tandem
//! with its statuses for a guest power-off (0) and reboot (4), after unmounting the guest's file
//! systems; the shell's first line names its disk, address and forward, and both work.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{case, exec_cmdline, run_script, Case};

type Session = (HashMap<String, Case>, String);

/// The guest's command line for the interactive shell: no `tandem.exec`.
const SHELL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let read_back =
            exec_cmdline("mkdir -p /mnt && mount -o ro /dev/vda /mnt && cat /mnt/kept");
        let script = format!(
            r#"
BOOT="--kernel $G/vmlinuz --initrd $G/initramfs.cpio.gz --memory 256M"
# shell_up NAME ARGS...: starts tandem ARGS with its console on a pipe and waits until the
# guest's shell has printed its prompt.
shell_up() {{
  name=$1; shift
  rm -f /tmp/in-$name; mkfifo /tmp/in-$name
  timeout 150 tandem run "$@" </tmp/in-$name >/tmp/out-$name 2>&1 &
  pid=$!
  exec 4>/tmp/in-$name
  i=0
  while [ $i -lt 120 ] && kill -0 $pid 2>/dev/null && ! grep -q '# ' /tmp/out-$name; do
    sleep 1; i=$((i+1))
  done
}}
# seen NAME TEXT: waits until tandem's output has TEXT.
seen() {{
  i=0
  while [ $i -lt 60 ] && kill -0 $pid 2>/dev/null && ! grep -q "$2" /tmp/out-$1; do
    sleep 1; i=$((i+1))
  done
}}
# leave NAME WORDS: types WORDS on the guest's console and records how tandem ended; a tandem
# still running 45 s later is stopped (status 143).
leave() {{
  start=$(date +%s)
  echo "$2" >&4
  i=0
  while [ $i -lt 45 ] && kill -0 $pid 2>/dev/null; do sleep 1; i=$((i+1)); done
  note=""
  if kill -0 $pid 2>/dev/null; then
    note="test: tandem still ran 45 s after '$2'; stopped it"
    kill -TERM $pid
  fi
  wait $pid
  rc=$?
  end=$(date +%s)
  exec 4>&-
  echo "@@@BEGIN $1"
  cat /tmp/out-$1
  echo "$note"
  echo "@@@END $1 rc=$rc secs=$((end-start))"
}}
shell_up poweroff $BOOT --cmdline '{SHELL_CMDLINE}'
leave poweroff poweroff
shell_up reboot $BOOT --cmdline '{SHELL_CMDLINE}'
leave reboot reboot
shell_up halt $BOOT --cmdline '{SHELL_CMDLINE}'
leave halt halt
run_case exec-reboot $BOOT --cmdline '{exec_reboot}'
truncate -s 64M /tmp/disk.img
mke2fs -q -F /tmp/disk.img
shell_up devices $BOOT --disk path=/tmp/disk.img --forward tcp:8080:80 --cmdline '{SHELL_CMDLINE} tandem.forward=127.0.0.1:8080:80'
echo 'mkdir -p /mnt /www && mount /dev/vda /mnt && cd /mnt && echo kept-$((6*7)) >kept && echo served-$((6*7)) >/www/index.html && httpd -p 80 -h /www && echo web-$((6*7))-up' >&4
seen devices web-42-up
record fetch wget -q -O- http://127.0.0.1:8080/
leave devices poweroff
record disk-state sh -c 'dd if=/tmp/disk.img bs=1 skip=1082 count=2 2>/dev/null | od -An -tx1'
run_case read-back $BOOT --disk path=/tmp/disk.img,readonly=on --cmdline '{read_back}'
"#,
            exec_reboot = exec_cmdline("reboot"),
        );
        run_script(&script)
    })
}

/// The case `name`, which must have ended with status `rc`.
fn ended_with<'a>(name: &str, rc: i32) -> &'a Case {
    let (cases, all) = session();
    let c = case(cases, all, name);
    assert_eq!(c.rc, rc, "{name}: tandem's status; output:\n{}", c.output);
    c
}

#[test]
fn poweroff_typed_in_the_shell_ends_tandem_with_status_0() {
    let c = ended_with("poweroff", 0);
    assert!(
        c.output.contains("type poweroff to leave"),
        "the shell's first line; output:\n{}",
        c.output
    );
}

#[test]
fn halt_typed_in_the_shell_powers_off_too() {
    ended_with("halt", 0);
}

#[test]
fn reboot_typed_in_the_shell_ends_tandem_with_the_reboot_status() {
    let c = ended_with("reboot", 4);
    assert!(
        c.output.contains("tandem: the guest rebooted"),
        "output:\n{}",
        c.output
    );
}

#[test]
fn reboot_in_a_tandem_exec_command_reboots() {
    let c = ended_with("exec-reboot", 4);
    assert!(
        c.output.contains("tandem: the guest rebooted"),
        "output:\n{}",
        c.output
    );
}

#[test]
fn the_shell_names_its_disk_address_and_forward_and_they_work() {
    let c = ended_with("devices", 0);
    let line = c
        .output
        .lines()
        .find(|l| l.contains("type poweroff to leave"))
        .unwrap_or_else(|| panic!("no first line; output:\n{}", c.output));
    assert_eq!(
        line.trim(),
        "tandem-guest: disk /dev/vda (64 MiB), eth0 10.0.2.15, forward 127.0.0.1:8080 -> port 80; \
         type poweroff to leave"
    );
    let (cases, all) = session();
    let fetch = case(cases, all, "fetch");
    assert_eq!(
        fetch.output.trim(),
        "served-42",
        "the guest's web server through the forward"
    );
}

#[test]
fn poweroff_unmounts_the_disk_cleanly_and_keeps_what_was_written() {
    ended_with("devices", 0);
    let (cases, all) = session();
    // ext2's s_state: 1 (clean) once unmounted, 0 while mounted read-write or after a crash.
    let state = case(cases, all, "disk-state");
    assert_eq!(
        state.output.trim(),
        "01 00",
        "the file system's state after poweroff (01 00: cleanly unmounted)"
    );
    let c = ended_with("read-back", 0);
    assert!(c.output.contains("kept-42"), "output:\n{}", c.output);
}
