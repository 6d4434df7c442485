#!/bin/sh
# In the test host: the control for serial-load.sh, with QEMU as the L2 VMM (as xtask bench runs it:
# -M pc -accel kvm -cpu host). ROUNDS rounds of two VMs at once, each guest writing 170 KB to
# its serial port after a verbose boot; counts clean power-offs, failures and hangs.
# QEMU must be carried in: --with /usr/bin/qemu-system-x86_64 --with /usr/share/qemu
# --with /usr/share/seabios. With -no-reboot a triple fault ends QEMU with status 0, so a run
# counts as ok only when the guest printed stress-done and "tandem-guest: exit=0".
# usage: serial-load-qemu.sh LABEL ROUNDS [EXTRA QEMU ARGS...]
label=$1; rounds=$2; shift 2
CMDLINE='console=ttyS0 reboot=k panic=-1 tandem.exec="yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c 170000; echo; echo stress-done"'
r=0; ok=0; fail=0; hang=0
start=$(cut -d' ' -f1 /proc/uptime)
while [ $r -lt $rounds ]; do
  for j in 1 2; do
    rm -f /tmp/q$j.log
    timeout 240 qemu-system-x86_64 -M pc -accel kvm -cpu host -m 256M -smp 1 -display none -nodefaults -no-user-config -no-reboot -serial file:/tmp/q$j.log -kernel /guests/vmlinuz -initrd /guests/initramfs.cpio.gz -append "$CMDLINE" "$@" </dev/null >/tmp/qo$j.log 2>&1 &
    eval p$j=$!
  done
  for j in 1 2; do
    eval wait \$p$j; rc=$?
    if [ $rc = 0 ] && grep -q stress-done /tmp/q$j.log && grep -q 'tandem-guest: exit=0' /tmp/q$j.log; then ok=$((ok+1))
    elif [ $rc = 124 ]; then hang=$((hang+1)); echo "$label round $r vm $j: hang; serial tail: $(tail -c 120 /tmp/q$j.log | tr -d '\r' | tr '\n' '|')"
    else fail=$((fail+1)); echo "$label round $r vm $j: rc=$rc serial tail: $(tail -c 160 /tmp/q$j.log | tr -d '\r' | tr '\n' '|') $(tail -n 2 /tmp/qo$j.log | tr '\n' '|')"; fi
  done
  r=$((r+1))
  echo "$label after round $r: ok=$ok fail=$fail hang=$hang (t=$(cut -d' ' -f1 /proc/uptime))"
done
echo "RESULT $label ok=$ok fail=$fail hang=$hang secs=$(echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc 2>/dev/null)"
