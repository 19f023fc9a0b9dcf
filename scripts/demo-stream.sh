#!/usr/bin/env bash
# make demo, the streaming part (called by scripts/demo.sh with CVD and DEMO set; runs
# on its own too: CVD=bin/cvd DEMO=.cache/demo scripts/demo-stream.sh).
#
# A desktop whose base holds 256 MiB is checked out to stream: the command returns
# at once and a stream process serves the read-only chain as an NBD export. QEMU
# reads the export identical to the server's chain while most of it is still
# missing; with the server stopped a local cluster still reads and a missing one
# fails with an I/O error; pinned, every layer arrives and the desktop switches to
# its local files, where a write made through the export is kept and checks in. A
# second store, with a cache budget, stays within it while reading the whole disk.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
S="$DEMO/stream"
SERVER="$S/server"
LAP="$S/laptop"
LAP2="$S/laptop2"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
run() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "demo-stream: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-stream: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

srv_pid=""
stop_server() { [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null; srv_pid=""; true; }
cleanup() {
  stop_server
  for s in "$LAP" "$LAP2"; do [ -d "$s" ] && "$CVD" --store "$s" stream stop alice >/dev/null 2>&1; done
  true
}
trap cleanup EXIT

rm -rf "$S"
mkdir -p "$S"
cd "$S"

PORT=$((20000 + RANDOM % 20000))
start_server() {
  "$CVD" --store "$SERVER" serve --listen "127.0.0.1:$PORT" > serve.out 2> serve.log &
  srv_pid=$!
  for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
  grep -q 'cvd serve:' serve.out || fail "server did not start: $(cat serve.log)"
  : > serve.out
}

step "A server store: a 2 GiB base holding 256 MiB, an app layer, a desktop"
"$CVD" disk create base.qcow2 2G >/dev/null
head -c 128M /dev/urandom > os.bin
"$CVD" disk write base.qcow2 0 os.bin >/dev/null
head -c 128M < <(yes "cvd demo: streamed operating system") > os2.bin
"$CVD" disk write base.qcow2 1G os2.bin >/dev/null
"$CVD" disk create -b base.qcow2 app.qcow2 >/dev/null
head -c 16M /dev/urandom > app.bin
"$CVD" disk write app.qcow2 512M app.bin >/dev/null
rm -f os.bin os2.bin app.bin
"$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name base:1 >/dev/null
"$CVD" --store "$SERVER" layer import app.qcow2 --kind app --parent base:1 --name office:1 >/dev/null
cvd --store "$SERVER" desktop create alice --base base:1 --app office:1 --user-size 64M >/dev/null
T1=$("$CVD" --store "$SERVER" device add lap1 --desktop alice 2>/dev/null)
T2=$("$CVD" --store "$SERVER" device add lap2 --desktop alice 2>/dev/null)
start_server
URL="http://127.0.0.1:$PORT"
HEAD=$("$CVD" --store "$SERVER" --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')

step "Check it out to stream, with a cache budget larger than the desktop (nothing is fetched ahead of use)"
cvd --store "$LAP" checkout alice --server "$URL" --token "$T1" --stream --cache-size 1G --read-timeout 3s
cvd --store "$LAP" status alice
EXPORT=$("$CVD" --store "$LAP" --json status alice | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stream"]["disks"]["system"]["nbd"])')
TOP=$("$CVD" --store "$LAP" --json status alice | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stream"]["disks"]["system"]["top"])')

step "QEMU reads the export: the first MiB, then the server goes away"
run qemu-io -r -f raw -c "read 0 1M" "$EXPORT"
stop_server
run qemu-io -r -f raw -c "read 0 1M" "$EXPORT"
echo "a cluster not fetched yet fails after the read timeout (3 s here; 20 s by default):"
t0=$(date +%s.%N)
printf '$ %s\n' "qemu-io -r -f raw -c 'read 1G 64k' $EXPORT"
if qemu-io -r -f raw -c "read 1G 64k" "$EXPORT" > io.txt 2>&1 && ! grep -q "Input/output error" io.txt; then fail "a missing cluster read with the server down"; fi
cat io.txt
echo "(failed after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s; the stream retries in the background)"
start_server
step "The server is back: the whole export against the server's chain, fetched on demand"
run qemu-img compare -f raw -F qcow2 "$EXPORT" "$HEAD"
cvd --store "$LAP" status alice

step "The guest writes through its top (qcow2 over the export); a check-in waits for the switch"
run qemu-io -f qcow2 -c "write -P 0x5c 100M 64k" "$TOP"
if "$CVD" --store "$LAP" checkin alice 2>err.txt; then fail "a check-in while streaming was accepted"; fi
echo "refused: $(cat err.txt)"

step "Pin it: everything arrives, each layer is adopted by the store, the desktop switches to local files"
cvd --store "$LAP" pin alice --wait
cvd --store "$LAP" status alice
cvd --store "$LAP" checkin alice --release
for f in "$LAP"/layers/*.qcow2; do qemu-img check -q "$f" || fail "qemu-img check $f"; done

step "A second laptop with a 32 MiB cache: the working set first, then the whole disk read within the budget"
cvd --store "$LAP2" checkout alice --server "$URL" --token "$T2" --stream --cache-size 32M
EXPORT2=$("$CVD" --store "$LAP2" --json status alice | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stream"]["disks"]["system"]["nbd"])')
HEAD=$("$CVD" --store "$SERVER" --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')
run qemu-img compare -f raw -F qcow2 "$EXPORT2" "$HEAD"
sleep 1.2
cvd --store "$LAP2" status alice
used=$(du -cB1 "$LAP2"/sync/stream/alice/layers/*.qcow2 | tail -1 | cut -f1)
echo "partial layers on disk: $used bytes (budget 32 MiB plus metadata)"
[ "$used" -le $((34 << 20)) ] || fail "the cache holds $used bytes"
"$CVD" --store "$LAP2" stream stop alice
cvd --store "$LAP2" release alice --discard
