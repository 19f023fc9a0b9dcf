#!/usr/bin/env bash
# make demo, the device-group part (called by scripts/demo.sh with CVD and DEMO set;
# runs on its own too: CVD=bin/cvd DEMO=.cache/demo scripts/demo-devices.sh).
#
# One desktop, two devices with their own stores: laptop A (policy full) and PC B
# (policy apps, hardware class hw2, whose base variant is the common base plus a
# driver layer). A is active and pushes; B stages the head while it "runs" and
# applies it at its next start, on hw2's variant; B's system push is refused, its
# user push lands; B opens the desktop (its state kept as a snapshot, A syncs up
# through its agent and steps down); A takes it back while B does not answer, and
# B's late check-in becomes a conflict version. Every layer passes qemu-img check.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
S="$DEMO/devices"
SERVER="$S/server"
A="$S/laptop-a"
B="$S/pc-b"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
fail() { echo "demo-devices: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-devices: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

srv_pid=""
cleanup() { [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null; true; }
trap cleanup EXIT

rm -rf "$S"
mkdir -p "$S"
cd "$S"

step "A server store: a 512 MiB base, an app layer, a driver layer for hardware class hw2 (the class's base variant), a desktop with a user disk"
"$CVD" disk create base.qcow2 512M >/dev/null
head -c 32M < <(yes "cvd demo: common base") > os.bin
"$CVD" disk write base.qcow2 0 os.bin
"$CVD" disk create -b base.qcow2 app.qcow2 >/dev/null
head -c 8M /dev/urandom > app.bin
"$CVD" disk write app.qcow2 128M app.bin
"$CVD" disk create -b base.qcow2 drv.qcow2 >/dev/null
head -c 2M < <(yes "hw2 driver") > drv.bin
"$CVD" disk write drv.qcow2 200M drv.bin
"$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name base:1 >/dev/null
"$CVD" --store "$SERVER" layer import app.qcow2 --kind app --parent base:1 --name office:1 >/dev/null
"$CVD" --store "$SERVER" layer import drv.qcow2 --kind app --parent base:1 --name drv:hw2 >/dev/null
cvd --store "$SERVER" variant add hw2 drv:hw2
cvd --store "$SERVER" desktop create alice --base base:1 --app office:1 --user-size 128M >/dev/null
cvd --store "$SERVER" desktop boot alice --memory 1024 --vcpus 2 --nics 1   # part of its record: every device gets it

step "Two devices in alice's group: laptop A (full), PC B (apps, class hw2)"
TA=$("$CVD" --store "$SERVER" device add lap-a --desktop alice --class hw1 2>/dev/null)
TB=$("$CVD" --store "$SERVER" device add pc-b --desktop alice --policy apps --class hw2 2>/dev/null)
cvd --store "$SERVER" device ls

"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 --min-role-interval 2s > serve.out 2> serve.log &
srv_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve.out)
[ -n "$URL" ] || fail "server did not start: $(cat serve.log)"

step "A opens alice: nobody is active, A checks it out and becomes the active device"
cvd --store "$A" open alice --server "$URL" --token "$TA"

step "B was provisioned with its class's base (base + driver); it follows alice: the desktop's layers come recomposed onto hw2's variant, the common base is not sent"
"$CVD" --store "$B" layer import base.qcow2 --kind base >/dev/null
"$CVD" --store "$B" layer import drv.qcow2 --kind app --parent "$("$CVD" --store "$B" layer ls --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')" >/dev/null
cvd --store "$B" follow alice --server "$URL" --token "$TB"
cvd --store "$B" desktop show alice | grep -E '^desktop alice boots'

step "A installs an app (system disk) and writes a file (user disk), then pushes"
head -c 4M /dev/urandom > app2.bin
head -c 1M < <(yes "alice's document") > doc.bin
"$CVD" disk write --allow-root "$A" "$A/desktops/alice.system.qcow2" 300M app2.bin
"$CVD" disk write --allow-root "$A" "$A/desktops/alice.user.qcow2" 0 doc.bin
cvd --store "$A" checkin alice

step "B stages the new head while its desktop runs: its chain is untouched, the update waits for the next start"
cvd --store "$B" follow alice --server "$URL" --token "$TB"
cvd --store "$B" status alice
cvd --store "$SERVER" desktop devices alice

step "B's next start applies it: hw2's base + driver + alice's layers; B reads A's app, A's document and its own driver"
cvd --store "$B" follow alice --server "$URL" --token "$TB" --apply
cmp <("$CVD" disk read --allow-root "$B" "$B/desktops/alice.system.qcow2" 300M 4M) app2.bin && echo "B reads A's app"
cmp <("$CVD" disk read --allow-root "$B" "$B/desktops/alice.user.qcow2" 0 1M) doc.bin && echo "B reads A's document"
cmp <("$CVD" disk read --allow-root "$B" "$B/desktops/alice.system.qcow2" 200M 2M) drv.bin && echo "B reads its hw2 driver"

step "B, inactive, pushes: its system disk is refused (naming the active device), its user disk lands"
head -c 512K /dev/urandom > bsys.bin
head -c 512K < <(yes "B's notes") > bnotes.bin
"$CVD" disk write --allow-root "$B" "$B/desktops/alice.system.qcow2" 310M bsys.bin
"$CVD" disk write --allow-root "$B" "$B/desktops/alice.user.qcow2" 4M bnotes.bin
if "$CVD" --store "$B" checkin alice 2> refused.err; then fail "an inactive device pushed its system disk"; fi
cat refused.err
cvd --store "$B" checkin alice --user-only

step "B opens alice: its state is kept as a snapshot version, A's agent syncs A up and steps down, B becomes active"
sleep 2   # the server's minimum interval between changes of the role
( for _ in $(seq 60); do "$CVD" --store "$A" agent --once --checkin-every 0 >> agent-a.log 2>&1; grep -q handed-over agent-a.log && break; sleep 0.5; done ) &
agent_pid=$!
cvd --store "$B" open alice --wait 1m
wait "$agent_pid"
grep handed-over agent-a.log
cvd --store "$SERVER" desktop devices alice

step "A takes alice back while B does not answer: after the wait B's lease is broken; B's late check-in is kept as a conflict version"
sleep 2
cvd --store "$A" open alice --wait 3s
"$CVD" disk write --allow-root "$B" "$B/desktops/alice.user.qcow2" 8M bnotes.bin
cvd --store "$B" checkin alice
cvd --store "$SERVER" desktop versions alice

step "Every layer of every store passes qemu-img check"
n=0
for f in "$SERVER"/layers/*.qcow2 "$A"/layers/*.qcow2 "$B"/layers/*.qcow2; do
  qemu-img check -q "$f" || fail "qemu-img check $f"
  n=$((n + 1))
done
echo "$n layers checked"

kill "$srv_pid"; wait "$srv_pid" 2>/dev/null || true; srv_pid=""
echo
echo "demo-devices: done (files in $S)"
