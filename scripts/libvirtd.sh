#!/usr/bin/env bash
# A private libvirtd for cvd's tests, demo and benchmarks, on a machine without systemd.
#
#   scripts/libvirtd.sh start DIR    start it (if not running) and print its socket path
#   scripts/libvirtd.sh status DIR   print the socket path and PID; exit 1 when not running
#   scripts/libvirtd.sh stop DIR     destroy its running domains, stop it by its PID and
#                                    remove the cgroup directories libvirt left behind
#
# Connect with  qemu:///system?socket=DIR/run/libvirt/libvirt-sock  (virsh -c, or
# hypervisor.Connect). Must run as root.
#
# How: libvirtd runs in its own mount namespace
# (unshare -m --propagation private) where private directories under DIR are bound over
# /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt,
# so the host's /etc and /run stay untouched and several instances can run side by side.
# qemu.conf runs QEMU as root with no security driver, no dynamic ownership and no
# virtlogd. It runs under `tini -s` (a child subreaper: this machine's PID 1 reaps
# slowly, and every domain stop would otherwise wait ~1.6 s), in its own session.
#
# Files under DIR: libvirtd.pid (libvirtd's PID), tini.pid (the session leader),
# libvirtd.out (its stdout/stderr), log/libvirt/libvirtd.log, log/libvirt/qemu/NAME.log
# (QEMU's stderr per domain).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
sock=$dir/run/libvirt/libvirt-sock
uri="qemu:///system?socket=$sock"
binds=(etc/libvirt:/etc/libvirt run/libvirt:/run/libvirt lib/libvirt:/var/lib/libvirt
	log/libvirt:/var/log/libvirt cache/libvirt:/var/cache/libvirt)

log() { echo "libvirtd.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid_of FILE: the PID in FILE when that process is alive.
pid_of() {
	local p
	p=$(cat "$1" 2>/dev/null || true)
	[ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"
	return 0
}

running() {
	local p
	p=$(pid_of "$dir/libvirtd.pid")
	[ -n "$p" ] && [ -S "$sock" ] && grep -q libvirtd "/proc/$p/comm" 2>/dev/null
}

start() {
	[ "$(id -u)" = 0 ] || die "must run as root"
	if running; then
		echo "$sock"
		return 0
	fi
	for t in libvirtd unshare tini setsid; do
		command -v "$t" >/dev/null || die "$t not found (scripts/deps.sh installs what is needed)"
	done
	# cgroup v1: libvirt puts domains under cpuset/machine. Made by libvirt while
	# several domains start at once, a new machine cpuset can still have no CPUs
	# or memory nodes when a domain's task is written into it (ENOSPC, "No space
	# left on device"): make it, filled from the root, before libvirtd starts.
	local cs=/sys/fs/cgroup/cpuset
	if [ -f "$cs/cpuset.cpus" ] && mkdir -p "$cs/machine" 2>/dev/null; then
		[ -n "$(cat "$cs/machine/cpuset.cpus")" ] || cat "$cs/cpuset.cpus" > "$cs/machine/cpuset.cpus" 2>/dev/null || true
		[ -n "$(cat "$cs/machine/cpuset.mems")" ] || cat "$cs/cpuset.mems" > "$cs/machine/cpuset.mems" 2>/dev/null || true
	fi
	local b
	for b in "${binds[@]}"; do
		mkdir -p "$dir/${b%%:*}" "${b#*:}"
	done
	rm -f "$sock" "$dir/run/libvirt/libvirt-sock-ro" "$dir/run/libvirt/libvirt-admin-sock"

	cat >"$dir/etc/libvirt/qemu.conf" <<-'EOF'
		# Written by scripts/libvirtd.sh: QEMU as root, no security driver, no virtlogd.
		user = "root"
		group = "root"
		dynamic_ownership = 0
		remember_owner = 0
		security_driver = "none"
		stdio_handler = "file"
	EOF
	cat >"$dir/etc/libvirt/libvirtd.conf" <<-'EOF'
		# Written by scripts/libvirtd.sh: root-only sockets, no polkit, logs to a file.
		unix_sock_group = "root"
		unix_sock_ro_perms = "0700"
		unix_sock_rw_perms = "0700"
		auth_unix_ro = "none"
		auth_unix_rw = "none"
		log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
	EOF

	# libvirtd looks up the user libvirt-qemu before it reads qemu.conf. When the host
	# lacks it, give the namespace a private passwd/group that has it.
	local pw=""
	if ! getent passwd libvirt-qemu >/dev/null; then
		cp /etc/passwd "$dir/passwd"
		cp /etc/group "$dir/group"
		echo "libvirt-qemu:x:64055:64055:libvirt qemu:/nonexistent:/usr/sbin/nologin" >>"$dir/passwd"
		echo "libvirt-qemu:x:64055:" >>"$dir/group"
		pw=1
	fi

	rm -f "$dir/libvirtd.pid" "$dir/tini.pid"
	# setsid does not fork here (a background job is not a group leader) and unshare
	# execs in place: $! is the PID of tini, the session leader.
	setsid unshare -m --propagation private -- /bin/sh -ec '
		dir=$1; pw=$2; shift 2
		for b in "$@"; do mount --bind "$dir/${b%%:*}" "${b#*:}"; done
		if [ -n "$pw" ]; then
			mount --bind "$dir/passwd" /etc/passwd
			mount --bind "$dir/group" /etc/group
		fi
		cd /
		exec tini -s -- libvirtd --pid-file "$dir/libvirtd.pid"
	' sh "$dir" "$pw" "${binds[@]}" </dev/null >>"$dir/libvirtd.out" 2>&1 &
	local tpid=$!
	echo "$tpid" >"$dir/tini.pid"

	local i
	for i in $(seq 1 300); do
		if [ -S "$sock" ] && [ -n "$(pid_of "$dir/libvirtd.pid")" ]; then
			echo "$sock"
			return 0
		fi
		kill -0 "$tpid" 2>/dev/null || break
		sleep 0.1
	done
	log "libvirtd did not come up; last lines of $dir/libvirtd.out and libvirtd.log:"
	tail -n 20 "$dir/libvirtd.out" >&2 || true
	tail -n 20 "$dir/log/libvirt/libvirtd.log" >&2 2>/dev/null || true
	kill "$tpid" 2>/dev/null || true
	exit 1
}

stop() {
	local p t i d
	p=$(pid_of "$dir/libvirtd.pid")
	t=$(pid_of "$dir/tini.pid")
	if [ -n "$p" ] && [ -S "$sock" ] && command -v virsh >/dev/null; then
		# Running domains would outlive libvirtd: destroy them first.
		for d in $(timeout 20 virsh -q -c "$uri" list --name 2>/dev/null || true); do
			timeout 20 virsh -q -c "$uri" destroy "$d" >/dev/null 2>&1 || log "could not destroy domain $d"
		done
	fi
	for p in $p $t; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for i in $(seq 1 100); do
		[ -z "$(pid_of "$dir/libvirtd.pid")" ] && [ -z "$(pid_of "$dir/tini.pid")" ] && break
		sleep 0.1
	done
	for f in libvirtd.pid tini.pid; do
		p=$(pid_of "$dir/$f")
		if [ -n "$p" ]; then
			log "PID $p did not stop on SIGTERM; killing it"
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
	rm -f "$dir/libvirtd.pid" "$dir/tini.pid" "$sock"
	# libvirt creates machine cgroups (cgroup v1) and leaves them behind. rmdir only
	# removes empty ones: those of another libvirtd's running domains stay. The
	# machine directories themselves stay too (another libvirtd may be starting a
	# domain in them; see start).
	for d in /sys/fs/cgroup/*/machine /sys/fs/cgroup/*/machine.slice; do
		[ -d "$d" ] || continue
		find "$d" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
	done
	return 0
}

status() {
	if running; then
		echo "$sock"
		echo "pid $(pid_of "$dir/libvirtd.pid")"
		return 0
	fi
	echo "not running" >&2
	return 1
}

case "$cmd" in
start) start ;;
stop) stop ;;
status) status ;;
*) usage ;;
esac
