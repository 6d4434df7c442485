#!/bin/sh
# /init of the L2 guest initramfs built by `cargo xtask testbed`.
# With `tandem.exec=VALUE` on the kernel command line (VALUE double-quoted, or up to the next
# space) it runs `sh -c VALUE`, prints `tandem-guest: exit=N` and powers off; otherwise it starts
# an interactive shell on the console and powers off when that shell exits.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ip link set lo up
# Load drivers for the devices present, by their modalias, as udev's coldplug does: drivers
# that bind make new devices appear (virtio-mmio, then virtio-blk), so repeat until none do.
coldplug() {
	n=0
	while [ $n -lt 4 ]; do
		before=$(cat /proc/modules | wc -l)
		find /sys/devices -name modalias -exec cat {} + 2>/dev/null | sort -u | xargs modprobe -a -q 2>/dev/null
		[ "$(cat /proc/modules | wc -l)" = "$before" ] && break
		n=$((n + 1))
	done
}
coldplug
cmdline=" $(cat /proc/cmdline)"
case "$cmdline" in
*" tandem.exec="*)
	v=${cmdline#* tandem.exec=}
	case "$v" in
	\"*) v=${v#\"}; v=${v%%\"*} ;;
	*) v=${v%% *} ;;
	esac
	sh -c "$v"
	echo "tandem-guest: exit=$?"
	;;
*)
	setsid cttyhack sh
	;;
esac
# Changing a terminal setting waits until the console has sent everything (TCSADRAIN).
stty -F /dev/console -tostop 2>/dev/null
poweroff -f
