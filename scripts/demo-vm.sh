#!/usr/bin/env bash
# make demo, the libvirt part: provision linked clones of a desktop, boot them under
# libvirt, and show what each guest wrote into its own top.
#
#   scripts/demo-vm.sh [STORE [DESKTOP]]
#
# STORE defaults to $VM_DEMO_STORE, else $DEMO/store (made by scripts/demo-store.sh);
# DESKTOP to $VM_DEMO_DESKTOP, else alice (CVD_STORE is not read: make demo never
# touches a store of yours). When the store has no such desktop, a small one
# is made (a 256 MiB base imported as demo-vm:1). The clones boot the tiny guest
# (scripts/build-guest.sh; guest/init says what it does): it reads its hostname from
# its cloud-init seed, writes a pattern block at 1 MiB and its hostname at 2 MiB of
# its system disk, and powers off.
#
# libvirtd: $CVD_CONNECT (else $LIBVIRT_DEFAULT_URI, else qemu:///system) when it
# answers; otherwise a private one is started in $DEMO/libvirtd with
# scripts/libvirtd.sh and stopped, by its PID, when the script exits.
#
# Environment: CVD (the binary; default bin/cvd), DEMO (default .cache/demo),
# CVD_GUEST_DIR (default .cache/guest).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
DEMO=${DEMO:-$ROOT/.cache/demo}
STORE=${1:-${VM_DEMO_STORE:-$DEMO/store}}
DESKTOP=${2:-${VM_DEMO_DESKTOP:-alice}}
GUEST=${CVD_GUEST_DIR:-$ROOT/.cache/guest}
PREFIX=vm-demo
export CVD_STORE=$STORE

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cvd() { # prints the command line (arguments with spaces quoted), then runs it
  printf '$ cvd'
  local a
  for a in "$@"; do case $a in *' '*) printf " '%s'" "$a" ;; *) printf ' %s' "$a" ;; esac; done
  echo
  "$CVD" "$@"
}
fail() { echo "demo-vm: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-vm: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ -x "$CVD" ] || fail "$CVD missing: run make build"
for t in qemu-img qemu-io virsh libvirtd qemu-system-x86_64; do
  command -v "$t" >/dev/null || fail "$t not found: run make deps"
done
mkdir -p "$DEMO"

step "The tiny guest: a Debian kernel and a busybox initramfs (scripts/build-guest.sh)"
"$ROOT/scripts/build-guest.sh"
kernel="$GUEST/kernel" initrd="$GUEST/initramfs.cpio.gz"
ls -lL "$kernel" "$initrd" | awk '{ print $5, $9 }'

if ! "$CVD" desktop show "$DESKTOP" >/dev/null 2>&1; then
  step "No desktop $DESKTOP in $STORE: make a small one"
  qemu-img create -q -f qcow2 "$DEMO/vm-base.qcow2" 256M
  qemu-io -c 'write -P 0x11 0 64k' "$DEMO/vm-base.qcow2" >/dev/null
  cvd layer import "$DEMO/vm-base.qcow2" --kind base --name demo-vm:1
  cvd desktop create "$DESKTOP" --base demo-vm:1
fi

URI=${CVD_CONNECT:-${LIBVIRT_DEFAULT_URI:-qemu:///system}}
LVDIR=
stop_libvirtd() {
  if [ -n "$LVDIR" ]; then
    echo "demo-vm: stopping the private libvirtd (PID $(cat "$LVDIR/libvirtd.pid" 2>/dev/null || echo '?'))"
    "$ROOT/scripts/libvirtd.sh" stop "$LVDIR" || true
  fi
}
trap stop_libvirtd EXIT
if "$CVD" vm ls --connect "$URI" >/dev/null 2>&1; then
  step "libvirtd answers at $URI"
else
  step "No libvirtd at $URI: start a private one (scripts/libvirtd.sh, stopped at exit)"
  LVDIR="$DEMO/libvirtd"
  sock=$("$ROOT/scripts/libvirtd.sh" start "$LVDIR")
  URI="qemu:///system?socket=$sock"
  echo "libvirtd PID $(cat "$LVDIR/libvirtd.pid"), $URI"
fi
export CVD_CONNECT=$URI
names=("$PREFIX-1" "$PREFIX-2" "$PREFIX-3")
# Leftovers of an earlier run (domains and clones of the same names).
"$CVD" vm rm --force --clone "${names[@]}" >/dev/null 2>&1 || true
for n in "${names[@]}"; do "$CVD" clone rm "$n" >/dev/null 2>&1 || true; done

# The seed is the virtio disk after the clone's disks: vdc when the desktop has a
# user disk (vdb), else vdb. The guest is told where to look.
seed=/dev/vdb
if "$CVD" --json desktop show "$DESKTOP" | grep -q '"user_disk"'; then seed=/dev/vdc; fi
append="$(cat "$GUEST/cmdline") cvd.seed=$seed cvd.pattern=0xa7"

step "Provision 3 clones of $DESKTOP in one step: tops, seeds, domains declaring the whole chain, started"
cvd provision "$DESKTOP" --count 3 --name "$PREFIX" --memory 128 \
  --kernel "$kernel" --initrd "$initrd" --append "$append"
cvd vm ls
cvd vm status "$PREFIX-1"

step "libvirt's own view (virsh dumpxml): every layer declared, each with its format"
run virsh -c "$URI" dumpxml "$PREFIX-1" | sed -n '/<disk /,/<\/disk>/p' | grep -E '<disk|<driver|<source|<format|backingStore|<target|<readonly'

step "Each guest reads its hostname from its seed, writes, and powers off"
cvd vm wait --timeout 3m "${names[@]}"
grep -h 'cvd-guest: \(hostname\|pattern\|poweroff\)' "$STORE/logs/$PREFIX-1.serial.log" | tr -d '\r'

step "What each clone wrote, read back from its own top"
for n in "${names[@]}"; do
  top="$STORE/clones/$n.qcow2"
  host=$("$CVD" disk read --allow-root "$STORE" "$top" 2M 512 | tr -d '\0')
  bytes=$("$CVD" disk read --allow-root "$STORE" "$top" 1M 4K | od -An -v -tx1 | tr -s ' \n' '\n' | grep . | sort -u | tr '\n' ' ')
  printf '%s: hostname at 2 MiB "%s"; the 4 KiB at 1 MiB hold only the byte(s) %s\n' "$n" "$host" "$bytes"
  [ "$host" = "$n" ] || fail "$n wrote hostname '$host'"
  qemu-io -r -c 'read -P 0xa7 1M 4k' "$top" >/dev/null || fail "$n: pattern missing"
done
echo "the clusters each top holds (all else still comes from the shared layers):"
"$CVD" disk map --allow-root "$STORE" --layer "$STORE/clones/$PREFIX-1.qcow2"

step "The shared layers did not change: content IDs verified, every image checks clean"
cvd layer verify
cvd store check
for n in "${names[@]}"; do qemu-img check -q "$STORE/clones/$n.qcow2" || fail "qemu-img check $n"; done
echo "qemu-img check: the 3 tops are clean"

step "Undefine the domains (the clones stay in the store; cvd vm rm --clone would remove them)"
cvd vm rm "${names[@]}"
cvd vm ls
