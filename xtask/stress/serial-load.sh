#!/bin/sh
# In the nested testbed's test host (docs/testbed.md, "A residual fault rate"): ROUNDS rounds
# of two tandem VMs at once, each guest writing 170 KB to its serial console after a verbose
# boot; counts clean power-offs, failures and hangs. VARs go into tandem's environment;
# CPUS=N (default 1) gives each guest N vCPUs.
# usage: serial-load.sh LABEL ROUNDS [VAR=VALUE...]
label=$1; rounds=$2; shift 2
cpus=${CPUS:-1}
CMDLINE='console=ttyS0 reboot=k panic=-1 tandem.exec="yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c 170000; echo; echo stress-done"'
r=0; ok=0; fail=0; hang=0
start=$(cut -d' ' -f1 /proc/uptime)
while [ $r -lt $rounds ]; do
  for j in 1 2; do
    env "$@" timeout 240 tandem run --kernel /guests/vmlinuz --initrd /guests/initramfs.cpio.gz --memory 256M --cpus $cpus --seccomp off --serial file:/tmp/s$j.log --cmdline "$CMDLINE" </dev/null >/tmp/o$j.log 2>&1 &
    eval p$j=$!
  done
  for j in 1 2; do
    eval wait \$p$j; rc=$?
    if [ $rc = 0 ] && grep -q stress-done /tmp/s$j.log; then ok=$((ok+1))
    elif [ $rc = 124 ]; then hang=$((hang+1)); echo "$label round $r vm $j: hang; serial tail: $(tail -c 120 /tmp/s$j.log | tr -d '\r' | tr '\n' '|')"
    else fail=$((fail+1)); echo "$label round $r vm $j: rc=$rc $(grep -v EXPERIMENT /tmp/o$j.log | tail -n 2 | tr '\n' '|')"; fi
  done
  r=$((r+1))
  echo "$label after round $r: ok=$ok fail=$fail hang=$hang (t=$(cut -d' ' -f1 /proc/uptime))"
done
echo "RESULT $label ok=$ok fail=$fail hang=$hang secs=$(echo "$(cut -d' ' -f1 /proc/uptime) - $start" | bc 2>/dev/null)"
