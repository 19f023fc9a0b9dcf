#!/usr/bin/env bash
# make demo, the sync part (called by scripts/demo.sh with CVD and DEMO set; runs on
# its own too: CVD=bin/cvd DEMO=.cache/demo scripts/demo-sync.sh).
#
# A server store with a desktop (1 GiB base, an app layer, a user disk) is served on
# loopback; a device is registered; the desktop is checked out to a second store (a
# "laptop"), written to (new data, data copied from the base, zeroed ranges), and
# checked in: only the new clusters travel. The versions and the bytes moved are
# shown, a second laptop that already holds the base and app fetches only the
# versions, and QEMU confirms the server's new head reads as the laptop's chain.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
S="$DEMO/sync"
SERVER="$S/server"
LAPTOP="$S/laptop"
LAPTOP2="$S/laptop2"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
fail() { echo "demo-sync: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-sync: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

srv_pid=""
cleanup() { [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null; true; }
trap cleanup EXIT

rm -rf "$S"
mkdir -p "$S"
cd "$S"

step "A server store: a 1 GiB base (64 MiB of 'OS'), an app layer (8 MiB), a desktop with a 256 MiB user disk"
"$CVD" disk create base.qcow2 1G >/dev/null
head -c 64M < <(yes "cvd demo: base operating system block") > os.bin
head -c 32M /dev/urandom > os2.bin
"$CVD" disk write base.qcow2 0 os.bin
"$CVD" disk write base.qcow2 512M os2.bin
"$CVD" disk create -b base.qcow2 app.qcow2 >/dev/null
head -c 8M /dev/urandom > app.bin
"$CVD" disk write app.qcow2 128M app.bin
base=$("$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name demo-base:1 | tail -1)
app=$("$CVD" --store "$SERVER" layer import app.qcow2 --kind app --parent demo-base:1 --name demo-app:1 | tail -1)
cvd --store "$SERVER" desktop create alice --base demo-base:1 --app demo-app:1 --user-size 256M >/dev/null
echo "desktop alice on base ${base:0:12} and app ${app:0:12}"

step "The server-side desktop has been used: 4 MiB written on its system disk, 2 MiB on its user disk"
sys_top="$SERVER/desktops/alice.system.qcow2"
user_top="$SERVER/desktops/alice.user.qcow2"
head -c 4M /dev/urandom > srv.bin
head -c 2M /dev/urandom > srvu.bin
"$CVD" disk write --allow-root "$SERVER" "$sys_top" 300M srv.bin
"$CVD" disk write --allow-root "$SERVER" "$user_top" 0 srvu.bin

step "Register two laptops for alice: each token is printed once, the store keeps only its hash"
TOKEN=$("$CVD" --store "$SERVER" device add alice-laptop --desktop alice)
TOKEN2=$("$CVD" --store "$SERVER" device add alice-desk2 --desktop alice)
echo "token: ${TOKEN:0:22}… (${#TOKEN} characters)"
cvd --store "$SERVER" device ls

step "Serve the store on loopback"
"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve.out 2> serve.log &
srv_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve.out)
[ -n "$URL" ] || fail "server did not start: $(cat serve.log)"
echo "serving on $URL"

step "Check alice out to an empty laptop store: the server seals its changes as a version, the laptop fetches every layer"
cvd --store "$LAPTOP" checkout alice --server "$URL" --token "$TOKEN"
cvd --store "$LAPTOP" status

step "The lease is a row of the catalog: its epoch (the desktop's leases, numbered) fences the commit of a check-in made under it"
"$CVD" --store "$SERVER" --json device leases | python3 -c 'import json,sys
for l in json.load(sys.stdin): print("desktop %s  device %s  epoch %d  expires %s" % (l["desktop"], l["device_name"], l["epoch"], l["expires"]))'

step "Another device is refused while the lease is held (the holder is named), and so is a wrong token"
if "$CVD" --store "$LAPTOP2" checkout alice --server "$URL" --token "$TOKEN2"; then fail "a second device got the lease"; fi
if "$CVD" --store "$LAPTOP2" checkout alice --server "$URL" --token "${TOKEN%?}x"; then fail "a wrong token was accepted"; fi

step "Work offline on the laptop: 32 MiB of new data, 16 MiB copied from the base, 8 MiB zeroed"
lsys="$LAPTOP/desktops/alice.system.qcow2"
head -c 32M /dev/urandom > new.bin
"$CVD" disk write --allow-root "$LAPTOP" "$lsys" 700M new.bin
"$CVD" disk read --allow-root "$LAPTOP" "$lsys" 512M 16M > copy.bin
"$CVD" disk write --allow-root "$LAPTOP" "$lsys" 800M copy.bin
"$CVD" disk zero --allow-root "$LAPTOP" "$lsys" 0 8M

step "Check in: digests first, the server answers what it lacks (it holds the copied clusters), only the rest is sent"
cvd --store "$LAPTOP" checkin alice

step "While the server serves, the administrator works on the same store from another process: versions, devices, clones, a store check"
cvd --store "$SERVER" desktop versions alice
cvd --store "$SERVER" device add alice-tablet --desktop alice >/dev/null
cvd --store "$SERVER" device ls
cvd --store "$SERVER" clone alice --name alice-vm --count 3 >/dev/null
cvd --store "$SERVER" clone ls
cvd --store "$SERVER" store check

step "QEMU agrees: the server's new head reads as the laptop's chain"
head_sys=$("$CVD" --store "$SERVER" desktop versions alice --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([v for v in d["versions"] if v["n"]==d["head"]][0]["system"])')
run qemu-img compare "$SERVER/layers/$head_sys.qcow2" "$lsys"

step "A second laptop that already holds the base and app layers fetches only the versions (and reads the clusters copied from the base from its own copy)"
"$CVD" --store "$LAPTOP2" layer import base.qcow2 --kind base >/dev/null
"$CVD" --store "$LAPTOP2" layer import app.qcow2 --kind app --parent "$base" >/dev/null
cvd --store "$SERVER" device break-lease alice   # the server is still serving
kill "$srv_pid"; wait "$srv_pid" 2>/dev/null || true   # a restart, on another port
"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve.out 2> serve.log &
srv_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve.out)
cvd --store "$LAPTOP2" checkout alice --server "$URL" --token "$TOKEN2"
run qemu-img compare "$LAPTOP2/desktops/alice.system.qcow2" "$lsys"

step "The first laptop's lease was broken: its next check-in is kept as a conflict version, nothing is lost"
"$CVD" disk write --allow-root "$LAPTOP" "$lsys" 900M os2.bin >/dev/null
cvd --store "$LAPTOP" checkin alice --release --server "$URL"   # the server restarted on another port

step "A hostile device gets clear refusals: a lease of 10^10 seconds, a parent layer it may not read"
if command -v curl >/dev/null; then
  lease=$("$CVD" --store "$SERVER" --json device leases | python3 -c 'import json,sys; print([l["id"] for l in json.load(sys.stdin) if l["desktop"] == "alice"][0])')
  ask() { curl -s -w '  HTTP %{http_code}\n' -X POST -H "Authorization: Bearer $TOKEN2" -H 'Content-Type: application/json' -d "$2" "$URL$1"; }
  ask /v1/desktops/alice/checkout '{"ttl_seconds":10000000000}' | tr -d '\n' | sed 's/  */ /g'; echo
  ask /v1/checkins "{\"id\":\"$(printf 'e%.0s' $(seq 32))\",\"desktop\":\"alice\",\"lease\":\"$lease\",\"base\":1,\"disks\":[{\"name\":\"system\",\"parent\":\"$(printf 'ab%.0s' $(seq 32))\",\"size\":1073741824,\"cluster_size\":65536,\"entries\":0,\"data_entries\":0}]}" | tr -d '\n' | sed 's/  */ /g'; echo
fi

step "A second server on the same store: with the first, one site (locks and leases in the catalog; PostgreSQL when the servers are on several machines)"
"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve2.out 2> serve2.log &
srv2_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve2.out 2>/dev/null && break; sleep 0.1; done
URL2=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve2.out)
TOKEN3=$("$CVD" --store "$SERVER" device add alice-phone --desktop alice 2>/dev/null)
echo "the lease taken through $URL is refused through $URL2:"
if "$CVD" --store "$S/laptop3" checkout alice --server "$URL2" --token "$TOKEN3"; then fail "the second server gave away a held lease"; fi

step "A hypervisor host pulls the desktop's sealed layers by ID with a host token (no lease) and clones it on its own store; a second pull moves nothing"
HOST_TOKEN=$("$CVD" --store "$SERVER" device add hv1 --host 2>/dev/null)
export CVD_TOKEN="$HOST_TOKEN"   # the host's token, out of the command lines below
cvd --store "$S/host" pull alice --server "$URL2"
cvd --store "$S/host" clone alice --name hv-vm --count 5 >/dev/null
cvd --store "$S/host" clone ls
cvd --store "$S/host" pull alice --server "$URL"
unset CVD_TOKEN
head_sys=$("$CVD" --store "$SERVER" desktop versions alice --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([v for v in d["versions"] if v["n"]==d["head"]][0]["system"])')
run qemu-img compare "$SERVER/layers/$head_sys.qcow2" "$S/host/clones/hv-vm-1.qcow2"
kill "$srv2_pid"; wait "$srv2_pid" 2>/dev/null || true

step "Metrics (through the Prometheus client library) at /metrics"
if command -v curl >/dev/null; then
  curl -s "$URL/metrics" | grep -E '^cvd_sync_(sent|received)_bytes_total|^cvd_sync_checkins_total|^cvd_sync_(deduplicated|auth)|^cvd_sync_dedup_ratio' || true
fi
kill "$srv_pid"; wait "$srv_pid" 2>/dev/null || true; srv_pid=""
cvd --store "$SERVER" desktop versions alice

echo
echo "demo-sync: done (files in $S)"
