#!/bin/sh
# /init of the L2 guest initramfs built by `cargo xtask testbed`.
# With `tandem.exec=VALUE` on the kernel command line (VALUE double-quoted, or up to the next
# space) it runs `sh -c VALUE`, prints `tandem-guest: exit=N` and powers off; otherwise it
# configures eth0 by DHCP (when there is one), prints one line saying what the guest has, starts
# an interactive shell on the console and powers off when that shell exits.
# As busybox's init does, it takes `poweroff` (SIGUSR2), `reboot` (SIGTERM) and `halt` (SIGUSR1):
# it stops every process, unmounts the file systems and powers off or resets the machine. A halted
# VM would sit with nobody to press its power button, so `halt` powers off too.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root

# Whether a user-space process other than this one is alive (kernel threads and zombies have no
# executable). A function of builtins: a subshell would count itself.
others() {
	for p in /proc/[0-9]*; do
		[ "$p" != /proc/1 ] && [ -e "$p/exe" ] && return 0
	done
	return 1
}

# leave poweroff|reboot: ends everything cleanly, then powers off or resets.
leave() {
	trap '' USR1 USR2 TERM
	# SIGHUP ends interactive shells, which ignore SIGTERM.
	kill -TERM -1 2>/dev/null
	kill -HUP -1 2>/dev/null
	i=0
	while others && [ $i -lt 20 ]; do
		sleep 0.05
		i=$((i + 1))
	done
	kill -KILL -1 2>/dev/null
	sync
	umount -a -r 2>/dev/null
	sync
	# Changing a terminal setting waits until the console has sent everything (TCSADRAIN).
	stty -F /dev/console -tostop 2>/dev/null
	"$1" -f
}
trap 'leave poweroff' USR2
trap 'leave reboot' TERM
trap 'leave poweroff' USR1

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
	# What the shell has: disks, the network (DHCP from tandem's user-mode network), and the
	# forward that `tandem.forward=HOSTADDR:HOSTPORT:GUESTPORT` on the command line announces.
	hello=""
	for b in /sys/block/vd*; do
		[ -e "$b/size" ] || continue
		read -r sectors <"$b/size"
		hello="$hello, disk /dev/${b##*/} ($((sectors / 2048)) MiB)"
	done
	if [ -e /sys/class/net/eth0 ]; then
		ip link set eth0 up
		udhcpc -q -n -t 3 -T 2 -i eth0 >/dev/null 2>&1
		addr=""
		# shellcheck disable=SC2046
		set -- $(ip -4 addr show dev eth0 2>/dev/null)
		while [ $# -gt 1 ]; do
			[ "$1" = inet ] && addr=${2%/*}
			shift
		done
		hello="$hello, eth0 ${addr:-without an address (no DHCP answer)}"
	fi
	case "$cmdline" in
	*" tandem.forward="*)
		f=${cmdline#* tandem.forward=}
		f=${f%% *}
		hello="$hello, forward ${f%:*} -> port ${f##*:}"
		;;
	esac
	echo "tandem-guest: ${hello#, }${hello:+; }type poweroff to leave"
	# In the background, so that this shell runs its traps while it waits.
	setsid cttyhack sh </dev/console >/dev/console 2>&1 &
	wait $!
	leave poweroff
	;;
esac
# Changing a terminal setting waits until the console has sent everything (TCSADRAIN).
stty -F /dev/console -tostop 2>/dev/null
poweroff -f
