#!/usr/bin/env bash
# make demo, the encryption part (called by scripts/demo.sh with CVD and DEMO set; runs
# on its own too: CVD=bin/cvd DEMO=.cache/demo scripts/demo-crypt.sh).
#
# A server on HTTPS (plain HTTP off loopback is refused); a laptop checks a desktop out
# encrypted: every file it holds is LUKS qcow2 (qemu-img info says so), the guest's
# plaintext is in none of them, the check-in moves the clusters as usual and the
# server's head reads as the laptop's chain (QEMU, with the escrowed key). A second
# laptop's copy with a 3 s lease is purged offline: its key and key slots are gone. A
# wipe of the first laptop shreds its copy at its next contact.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
S="$DEMO/crypt"
SERVER="$S/server"
LAP="$S/laptop"
LAP2="$S/laptop2"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
run() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "demo-crypt: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-crypt: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

srv_pid=""
cleanup() { [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null; true; }
trap cleanup EXIT

rm -rf "$S"
mkdir -p "$S"
cd "$S"

step "A server store: a desktop on a 1 GiB base holding 32 MiB; a certificate for the server"
"$CVD" disk create base.qcow2 1G >/dev/null
head -c 32M /dev/urandom > os.bin
"$CVD" disk write base.qcow2 0 os.bin >/dev/null
"$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name os:1 >/dev/null
"$CVD" --store "$SERVER" desktop create alice --base os:1 >/dev/null
T1=$("$CVD" --store "$SERVER" device add alice-laptop --desktop alice 2>/dev/null)
T2=$("$CVD" --store "$SERVER" device add alice-spare --desktop alice 2>/dev/null)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=cvd-demo \
  -addext subjectAltName=IP:127.0.0.1 -keyout server.key -out server.crt 2>/dev/null

step "Plain HTTP off loopback is refused; HTTPS is served"
if "$CVD" --store "$SERVER" serve --listen 0.0.0.0:0 2>err.txt; then fail "plain HTTP on 0.0.0.0 was served"; fi
echo "refused: $(cat err.txt)"
PORT=$((20000 + RANDOM % 20000))
"$CVD" --store "$SERVER" serve --listen "127.0.0.1:$PORT" --tls-cert server.crt --tls-key server.key > serve.out 2> serve.log &
srv_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
grep -q 'cvd serve:' serve.out || fail "server did not start: $(cat serve.log)"
URL="https://127.0.0.1:$PORT"

step "An encrypted check-out: every file on the laptop is LUKS qcow2"
cvd --store "$LAP" checkout alice --server "$URL" --token "$T1" --ca-cert server.crt --encrypt
for f in "$LAP"/layers/*.qcow2 "$LAP"/desktops/*.qcow2; do
  printf '%-40s ' "${f#$S/}"
  qemu-img info --output=json "$f" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("encrypted:", d["encrypted"], d["format-specific"]["data"]["encrypt"]["format"])'
  qemu-img info --output=json "$f" | grep -q '"encrypted": true' || fail "$f is not encrypted"
done

step "The guest writes 8 MiB of text; no laptop file holds it"
KEY=$("$CVD" --store "$SERVER" device key alice-laptop --desktop alice)
printf '%s' "$KEY" > laptop.key
{ yes "alice's quarterly report, confidential" 2>/dev/null || true; } | head -c 8M > report.txt
cvd disk --key-file laptop.key write "$LAP/desktops/alice.system.qcow2" 512M report.txt
run grep -rl "quarterly report" "$LAP" && fail "plaintext found on the laptop" || echo "grep: no file holds the guest's text"

step "Check-in: the clusters travel as from a plain copy; the server's head reads as the laptop's chain"
cvd --store "$LAP" checkin alice
HEAD=$("$CVD" --store "$SERVER" --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')
# spec FILE: QEMU's --image-opts for FILE's chain, every layer opened with the key.
spec() {
  local s="driver=qcow2,file.filename=$1" p="" n
  n=$(qemu-img info -U --backing-chain --output=json "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  for ((i = 0; i < n; i++)); do s+=",${p}encrypt.key-secret=k"; p+="backing."; done
  echo "$s"
}
TOP="$LAP/desktops/alice.system.qcow2"
run qemu-img compare --object "secret,id=k,data=$KEY" --image-opts "$(spec "$TOP")" "driver=qcow2,file.filename=$HEAD"
for f in "$LAP"/layers/*.qcow2 "$LAP"/desktops/*.qcow2; do
  qemu-img check -q --object "secret,id=k,data=$KEY" --image-opts "$(spec "$f")" || fail "qemu-img check $f"
done
echo "qemu-img check (with the key): every laptop file clean"

step "A spare laptop's copy with a 3 s lease, offline past its expiry: the purge shreds it"
"$CVD" --store "$SERVER" device break-lease alice >/dev/null
cvd --store "$LAP2" checkout alice --server "$URL" --token "$T2" --ca-cert server.crt --encrypt --ttl 3s
mkdir -p kept
for f in "$LAP2"/layers/*.qcow2; do ln "$f" "kept/$(basename "$f")"; done
sleep 3.5
cvd --store "$LAP2" status
KEY2=$("$CVD" --store "$SERVER" device key alice-spare --desktop alice)
ls "$LAP2/sync/keys" | grep -q . && fail "key files left"
echo "key files left on the spare laptop: none"
for f in kept/*.qcow2; do
  if qemu-img convert --object "secret,id=k,data=$KEY2" -O raw \
    "json:{\"driver\":\"qcow2\",\"encrypt.key-secret\":\"k\",\"backing\":null,\"file\":{\"driver\":\"file\",\"filename\":\"$f\"}}" out.raw 2>err.txt; then
    fail "a kept file still opens with the escrowed key"
  fi
done
echo "a second name kept of each layer file: QEMU with the escrowed key says: $(head -1 err.txt)"

step "The first laptop is wiped at its next contact"
cvd --store "$SERVER" device wipe alice-laptop
"$CVD" --store "$LAP" agent --once >/dev/null 2>agent.err || true
echo "agent: $(head -1 agent.err)"
[ -z "$(ls "$LAP"/desktops/ 2>/dev/null)" ] || fail "the wiped laptop still holds the desktop"
ls "$LAP/sync/keys" | grep -q . && fail "key files left after the wipe"
echo "the laptop holds no desktop and no key"
