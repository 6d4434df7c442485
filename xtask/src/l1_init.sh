#!/bin/sh
# /init of the testbed's test host (L1), added per run by `cargo xtask testbed`.
# Loads KVM, runs /testbed/cmd.sh on the console ($TESTBED_CONSOLE), reports its exit status on
# the second serial port ($TESTBED_EXIT), powers off. /testbed/env sets both.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ip link set lo up
if [ -n "$(ls -A /tmp)" ]; then
	# --with put files under /tmp: keep them on the tmpfs that is mounted there.
	mv /tmp /.tmp-carried && mkdir /tmp
	mount -t tmpfs -o mode=1777 tmpfs /tmp
	cp -a /.tmp-carried/. /tmp/ && rm -rf /.tmp-carried
	chmod 1777 /tmp
else
	mount -t tmpfs -o mode=1777 tmpfs /tmp
fi
. /testbed/env
for m in $(cat /etc/testbed/modules); do
	insmod "/$m" || echo "testbed: insmod /$m failed" >&2
done
if [ -e /sys/class/net/eth0 ]; then
	# --forward: QEMU's user-mode network, reached from this machine's loopback.
	ip link set eth0 up
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
fi
if [ ! -c /dev/kvm ]; then
	echo "testbed: error: /dev/kvm is missing in the test host ($TESTBED_KVM_HINT)" >&2
fi
# shellcheck disable=SC2086
stty -F "$TESTBED_CONSOLE" $TESTBED_STTY
cd /
setsid cttyhack sh /testbed/cmd.sh
rc=$?
# Changing a terminal setting waits until the console has sent everything (TCSADRAIN).
stty -F "$TESTBED_CONSOLE" -tostop
echo "TESTBED-EXIT=$rc" >"$TESTBED_EXIT"
# Keep the kernel's "reboot: Power down" off the command's output.
echo 0 >/proc/sys/kernel/printk
poweroff -f
