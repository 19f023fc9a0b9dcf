#!/usr/bin/env bash
# make demo: cvd end to end on local files, narrated. Works in .cache/demo (wiped at
# the start) and stops at the first failure.
#
# First part (the disk engine): a base image, a three-deep chain over it, writes
# through the chain, the chain flattened into one image, and what info, map and check
# show. QEMU confirms every result.
#
# Later parts hook in below ("later steps"): each is a script of its own, called only
# when it exists, with CVD (the binary) and DEMO (this directory) in its environment.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CVD="$ROOT/bin/cvd"
export DEMO="$ROOT/.cache/demo"
[ -x "$CVD" ] || { echo "demo: $CVD missing: run make build (make demo does)" >&2; exit 1; }

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }
trap 'echo "demo: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

rm -rf "$DEMO"
mkdir -p "$DEMO"
cd "$DEMO"

cvd version
step "Build a base image: 4 GiB virtual, 64 MiB of an 'operating system' written into it"
cvd disk create base.qcow2 4G
head -c 64M < <(yes "cvd demo: base operating system block") > os.bin
cvd disk write base.qcow2 0 os.bin

step "Stack a three-deep chain on it: base <- app <- user (overlays hold only what changes)"
cvd disk create -b base.qcow2 app.qcow2
head -c 8M /dev/urandom > app.bin
cvd disk write app.qcow2 32M app.bin
cvd disk create -b app.qcow2 user.qcow2
head -c 1M /dev/urandom > doc.bin
cvd disk write user.qcow2 3G doc.bin

step "Write through the top of the chain: a partial cluster (copy-on-write from below), zeroes, a discard"
printf 'hello from the user layer' | cvd disk write user.qcow2 100000 -
cvd disk zero user.qcow2 36M 2M
cvd disk discard user.qcow2 48M 1M
got=$("$CVD" disk read user.qcow2 100000 25)
[ "$got" = "hello from the user layer" ] || fail "read back '$got'"
echo "read back through the chain: '$got'"

step "The chain, layer by layer"
cvd disk info --chain user.qcow2

step "Which layer serves each range of the disk (depth 0 = user, 1 = app, 2 = base)"
cvd disk map user.qcow2

step "Check every layer (refcounts against references, as qemu-img check)"
for l in user app base; do
  cvd disk check "$l.qcow2"
done

step "Flatten the chain into one image, and into a zstd-compressed one"
cvd disk convert user.qcow2 flat.qcow2
cvd disk convert -c zstd user.qcow2 flat-zstd.qcow2
cvd disk compare user.qcow2 flat.qcow2
cvd disk compare user.qcow2 flat-zstd.qcow2
cvd disk info flat-zstd.qcow2
run ls -ls --block-size=K base.qcow2 app.qcow2 user.qcow2 flat.qcow2 flat-zstd.qcow2

step "QEMU agrees: qemu-img check on every image cvd wrote, qemu-img compare of the chain and the flat image"
if command -v qemu-img >/dev/null; then
  for f in base app user flat flat-zstd; do
    qemu-img check -q "$f.qcow2" || fail "qemu-img check $f.qcow2"
    echo "qemu-img check $f.qcow2: clean"
  done
  run qemu-img compare user.qcow2 flat.qcow2
  run qemu-img compare flat.qcow2 flat-zstd.qcow2
  run qemu-io -c 'read -P 0 36M 2M' -c 'read -P 0 48M 1M' user.qcow2 | grep -v '^[0-9]'
else
  echo "(qemu-img not installed: skipped; make demo installs it)"
fi

# ---- later steps ------------------------------------------------------------------
# Each capability adds its part as scripts/demo-<name>.sh, run here (with CVD and DEMO
# in its environment) when present: the known ones in order, then any other.
ran=" "
part() {
  local f="$ROOT/scripts/demo-$1.sh"
  [ -f "$f" ] || return 0
  case "$ran" in *" $1 "*) return 0 ;; esac
  ran+="$1 "
  step "$2 (scripts/demo-$1.sh)"
  bash "$f"
}
part store "The layer store: content IDs, a desktop, linked clones, seal, gc"
part sync "Check-out to a laptop and check-in: only the changed clusters travel"
part devices "One desktop on several devices: policies, a hardware-class base, the active role, staged updates"
part stream "A streamed check-out: start before the download ends, fetch on demand, a cache budget"
part crypt "An encrypted offline copy: LUKS layers, the key tied to the lease, shred at expiry and on a wipe; HTTPS pinned"
part recompose "Recompose desktops onto a new app layer"
part files "File-level composition: a desktop that ran recomposed by files; two devices' user files merged (Table 1)"
part vm "Linked clones of the desktop booted under libvirt"
for f in "$ROOT"/scripts/demo-*.sh; do
  [ -e "$f" ] || continue
  n=${f##*/demo-}
  part "${n%.sh}" "More: ${n%.sh}"
done

step "Demo done: the images are in $DEMO"
