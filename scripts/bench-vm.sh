#!/usr/bin/env bash
# make bench, the libvirt rows: seconds from `cvd provision` to all clones running, for
# 1, 10 and 50 clones (tops, seed images, define, start: everything), and clones per
# second; then how long `cvd vm rm --force --clone` takes to destroy, undefine and
# remove them. Printed as a table.
#
# "Running" is libvirt's state: QEMU started and the guest's CPUs run. What the guest
# then does is not measured; it must not eat the two CPUs while the next clones start,
# so by default the clones boot from their disk (BIOS), as real desktops do, and the
# bench base holds no boot loader: SeaBIOS stops at "No bootable device" and idles.
# VM_GUEST=tiny boots the tiny guest instead (scripts/build-guest.sh) with cvd.hold=-1;
# its kernel boot costs ~2.5 s of TCG CPU per clone, which the later starts compete with.
#
# A fresh libvirtd probes QEMU's capabilities at its first define (1-2 s): one clone is
# provisioned and removed first, not counted. Each count is measured once (50 TCG
# guests on 2 cores take a while); the whole script stays under ~3 minutes.
#
# libvirtd: $CVD_CONNECT (else $LIBVIRT_DEFAULT_URI, else qemu:///system) when it
# answers, else a private one in $BENCH/vm/libvirtd (scripts/libvirtd.sh), stopped by
# its PID at exit. Works in $BENCH/vm (default .cache/bench/vm), wiped at the start.
#
# Environment: CVD (default bin/cvd), BENCH, VM_COUNTS (default "1 10 50"),
# VM_GUEST (disk or tiny), VM_MEMORY (MiB per clone, default 128), VM_PARALLEL
# (provision --parallel, default 4).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-$ROOT/.cache/bench}
COUNTS=${VM_COUNTS:-1 10 50}
MODE=${VM_GUEST:-disk}
MEM=${VM_MEMORY:-128}
PAR=${VM_PARALLEL:-4}
W="$BENCH/vm"
die() { echo "bench-vm: $*" >&2; exit 1; }
[ -x "$CVD" ] || die "$CVD missing: run make build"
for t in qemu-img qemu-io libvirtd qemu-system-x86_64; do
  command -v "$t" >/dev/null || die "$t not found: run make deps"
done

# Stop a private libvirtd of an earlier, interrupted run before wiping its directory.
[ -d "$W/libvirtd" ] && "$ROOT/scripts/libvirtd.sh" stop "$W/libvirtd" >/dev/null 2>&1 || true
rm -rf "$W"
mkdir -p "$W"
export CVD_STORE="$W/store"

now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
# field FILE KEY: a number from cvd's indented JSON output
field() { sed -n "s/^ *\"$2\": \([0-9.e+-]*\),\{0,1\}$/\1/p" "$1" | head -n1; }
# names PREFIX N: the clone names cvd provision gives
names() {
  if [ "$2" -eq 1 ]; then echo "$1"; else seq -f "$1-%0${#2}g" 1 "$2"; fi
}

URI=${CVD_CONNECT:-${LIBVIRT_DEFAULT_URI:-qemu:///system}}
LVDIR=
cleanup() {
  if [ -n "$LVDIR" ]; then "$ROOT/scripts/libvirtd.sh" stop "$LVDIR" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
if ! "$CVD" vm ls --connect "$URI" >/dev/null 2>&1; then
  LVDIR="$W/libvirtd"
  URI="qemu:///system?socket=$("$ROOT/scripts/libvirtd.sh" start "$LVDIR")"
fi
export CVD_CONNECT=$URI

# A 1 GiB base with 64 MiB of data and no boot loader, and a desktop on it.
qemu-img create -q -f qcow2 "$W/base.qcow2" 1G
qemu-io -c 'write -P 0x5a 1M 64M' "$W/base.qcow2" >/dev/null
"$CVD" layer import "$W/base.qcow2" --kind base --name bench-vm:1 >/dev/null
rm -f "$W/base.qcow2"
"$CVD" desktop create benchvm --base bench-vm:1 >/dev/null

boot=()
case "$MODE" in
disk) what="boot from disk (BIOS, idles: no boot loader)" ;;
tiny)
  G=${CVD_GUEST_DIR:-$ROOT/.cache/guest}
  "$ROOT/scripts/build-guest.sh" >/dev/null
  boot=(--kernel "$G/kernel" --initrd "$G/initramfs.cpio.gz" --append "$(cat "$G/cmdline") cvd.hold=-1")
  what="tiny guest, cvd.hold=-1"
  ;;
*) die "VM_GUEST=$MODE: want disk or tiny" ;;
esac

provision() { # provision PREFIX N OUT.json: prints the wall seconds
  local t0 t1
  t0=$(now)
  "$CVD" --json provision benchvm --count "$2" --name "$1" --memory "$MEM" --parallel "$PAR" ${boot[@]+"${boot[@]}"} >"$3" ||
    die "cvd provision --count $2 failed: $(cat "$3")"
  t1=$(now)
  calc "$t1 - $t0"
}
teardown() { # teardown PREFIX N: prints the wall seconds of vm rm --force --clone
  local t0 t1
  t0=$(now)
  # shellcheck disable=SC2046
  "$CVD" vm rm --force --clone $(names "$1" "$2") >/dev/null || die "vm rm of $1 failed"
  t1=$(now)
  calc "$t1 - $t0"
}

provision warm 1 "$W/warm.json" >/dev/null
teardown warm 1 >/dev/null

rows=()
for n in $COUNTS; do
  out="$W/p$n.json"
  wall=$(provision "c$n" "$n" "$out")
  running=$(grep -c '"state": "running"' "$out" || true)
  [ "$running" -eq "$n" ] || die "$running of $n clones running after provision --count $n"
  # Every clone still running (none died right after its start).
  live=$("$CVD" vm ls | awk 'NR > 1 && $2 == "running"' | wc -l)
  rm_s=$(teardown "c$n" "$n")
  rows+=("$n $wall $(field "$out" total_s) $(field "$out" clone_s) $(field "$out" define_s) $(field "$out" start_s) $rm_s $live")
done
"$CVD" store check >/dev/null || die "store check failed"

echo "cvd provision to running, $what, $MEM MiB, --parallel $PAR, $(nproc) cores, libvirt $(libvirtd --version | awk '{ print $NF }'), $(qemu-system-x86_64 --version | head -1 | awk '{ print $4 }') ($(date -u +%Y-%m-%d))"
printf '%7s %12s %12s %10s %10s %11s %10s %12s\n' clones "wall s" "running s" "clones/s" "clone s" "define s*" "start s*" "vm rm s"
for r in "${rows[@]}"; do
  set -- $r
  printf '%7d %12.2f %12.2f %10.2f %10.3f %11.2f %10.2f %12.2f\n' "$1" "$2" "$3" "$(calc "$1 / $2")" "$4" "$5" "$6" "$7"
  [ "$8" -eq "$1" ] || echo "        (only $8 of $1 still running when listed)"
done
echo "wall: the whole cvd provision command (process start to exit); running: from its start to the"
echo "last clone running; clones/s = clones / wall; clone: tops + seed images written and recorded;"
echo "*define, start: sums over clones of libvirt's calls ($PAR at a time); vm rm: destroy, undefine, remove"
