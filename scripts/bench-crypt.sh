#!/usr/bin/env bash
# make bench, the encryption rows, side by side in one run:
#   - sequential read of a 1 GiB LUKS qcow2 (QEMU made it: encrypt.format=luks,
#     aes-256-xts) into a raw file: cvd disk convert against qemu-img convert with
#     the secret;
#   - the same data written into a new LUKS qcow2: cvd disk convert --encrypt
#     against qemu-img convert -o encrypt.format=luks;
#   - a check-in of CHANGED_MIB (default 256) MiB of random writes from an encrypted
#     laptop copy against the same check-in from a plain copy (both over loopback,
#     same server, same data): what encryption costs a check-in, and the bytes each
#     moved (they must be equal).
# Each time is the best of BENCH_RUNS runs (default 3). Works in $BENCH/crypt.
# Environment: CVD, BENCH, BENCH_RUNS, CHANGED_MIB.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-$ROOT/.cache/bench}
RUNS=${BENCH_RUNS:-3}
CHANGED_MIB=${CHANGED_MIB:-256}
W="$BENCH/crypt"
die() { echo "bench-crypt: $*" >&2; exit 1; }
[ -x "$CVD" ] || die "$CVD missing: run make build"
for t in qemu-img python3; do command -v "$t" >/dev/null || die "$t missing (make deps)"; done
rm -rf "$W"
mkdir -p "$W"
cd "$W"
log() { printf 'bench-crypt: %s\n' "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
json() { python3 -c "import json,sys; d=json.load(open('$1')); print(d$2)"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# best PREP CMD: the best wall time of CMD over RUNS runs, PREP (untimed) before each.
best() {
  local prep=$1 cmd=$2 b="" t0 t1 i
  for ((i = 0; i < RUNS; i++)); do
    eval "$prep" || die "FAILED: $prep"
    t0=$(now)
    eval "$cmd" > /dev/null || die "FAILED: $cmd"
    t1=$(now)
    b=$(awk -v a="$t0" -v z="$t1" -v b="$b" 'BEGIN { t = z - a; if (b == "" || t < b) b = t; printf "%.4f", b }')
  done
  echo "$b"
}

KEY=bench-key-3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e
printf '%s' "$KEY" > key
SECRET="--object secret,id=s0,data=$KEY"

# QEMU calibrates PBKDF2 by its thread's CPU time and now and then gives up with
# "Unable to get accurate CPU usage": such a run is repeated (and not counted).
# qemu_luks SRC DST: qemu-img convert of raw SRC into a LUKS qcow2 DST.
qemu_luks() {
  local i
  for ((i = 0; i < 5; i++)); do
    rm -f "$2"
    qemu-img convert -f raw -O qcow2 $SECRET -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 "$1" "$2" 2> qerr && return 0
    grep -q "accurate CPU usage" qerr || { cat qerr >&2; return 1; }
  done
  return 1
}
log "1 GiB of data (half random, half text), encrypted by qemu-img"
text() { yes "cvd bench: a line of text that compresses well, like most of a system disk" 2>/dev/null || true; }
{ for ((i = 0; i < 256; i++)); do head -c 2M /dev/urandom; head -c 2M < <(text); done; } > data.raw
qemu_luks data.raw enc.qcow2 || die "qemu-img could not encrypt the data"
BYTES=$(stat -c %s data.raw)
ENC_SPEC="driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"

log "LUKS sequential read"
read_c=$(best "rm -f out.raw" "$CVD disk --key-file key convert -q -O raw enc.qcow2 out.raw")
cmp -s out.raw data.raw || die "cvd read the encrypted image differently"
read_q=$(best "rm -f out.raw" "qemu-img convert $SECRET --image-opts $ENC_SPEC -O raw out.raw")
log "LUKS write"
write_c=$(best "rm -f w.qcow2" "$CVD disk --key-file key convert -q --encrypt data.raw w.qcow2")
qemu-img compare $SECRET --image-opts "driver=qcow2,file.filename=w.qcow2,encrypt.key-secret=s0" "driver=raw,file.filename=data.raw" >/dev/null \
  || die "QEMU reads cvd's encrypted image differently"
write_q=$(best "rm -f w.qcow2" "qemu_luks data.raw w.qcow2")
rm -f out.raw w.qcow2

log "a server, a desktop, a plain and an encrypted laptop copy"
SERVER="$W/server"
"$CVD" disk create base.qcow2 4G >/dev/null
"$CVD" disk write base.qcow2 0 data.raw >/dev/null
"$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name base:1 >/dev/null
for d in plain enc; do "$CVD" --store "$SERVER" desktop create "$d" --base base:1 >/dev/null; done
TP=$("$CVD" --store "$SERVER" device add lp --desktop plain 2>/dev/null)
TE=$("$CVD" --store "$SERVER" device add le --desktop enc 2>/dev/null)
"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve.out 2> serve.log &
pids+=($!)
for _ in $(seq 100); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve.out)
[ -n "$URL" ] || die "the server did not start: $(cat serve.log)"
"$CVD" --store "$W/lp" checkout plain --server "$URL" --token "$TP" >/dev/null
"$CVD" --store "$W/le" checkout enc --server "$URL" --token "$TE" --encrypt >/dev/null
"$CVD" --store "$SERVER" device key le --desktop enc > kek
for f in "$W/le/layers/"*.qcow2 "$W/le/desktops/"*.qcow2; do
  qemu-img info --output=json "$f" | grep -q '"encrypted": true' || die "$f is not encrypted"
done

# Each round writes the same fresh data at the same places of both copies.
changes() {
  head -c "${CHANGED_MIB}M" /dev/urandom > chg.bin
  "$CVD" disk write "$W/lp/desktops/plain.system.qcow2" 1G chg.bin >/dev/null
  "$CVD" disk --key-file kek write "$W/le/desktops/enc.system.qcow2" 1G chg.bin >/dev/null
}
ci_e="" ci_p=""
for ((i = 0; i < RUNS; i++)); do
  changes
  t0=$(now); "$CVD" --store "$W/le" --json checkin enc > ce.json; t1=$(now)
  e=$(calc "$t1 - $t0")
  t0=$(now); "$CVD" --store "$W/lp" --json checkin plain > cp.json; t1=$(now)
  p=$(calc "$t1 - $t0")
  ci_e=$(awk -v a="$e" -v b="$ci_e" 'BEGIN { if (b == "" || a < b) b = a; print b }')
  ci_p=$(awk -v a="$p" -v b="$ci_p" 'BEGIN { if (b == "" || a < b) b = a; print b }')
done
pe=$(json ce.json '["payload_bytes"]')
pp=$(json cp.json '["payload_bytes"]')
changed=$((CHANGED_MIB << 20))

mbs() { calc "$1 / 1048576 / $2"; }
echo "cvd encryption (LUKS qcow2, aes-256-xts-plain64), 1 GiB, $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '%-52s %10s %10s %8s %12s %12s\n' operation "cvd s" "peer s" ratio "cvd MB/s" "peer MB/s"
printf '%-52s %10.3f %10.3f %8.2f %12.0f %12.0f\n' "LUKS read → raw vs qemu-img convert (secret)" "$read_c" "$read_q" \
  "$(calc "$read_c / $read_q")" "$(mbs "$BYTES" "$read_c")" "$(mbs "$BYTES" "$read_q")"
printf '%-52s %10.3f %10.3f %8.2f %12.0f %12.0f\n' "raw → LUKS qcow2 vs qemu-img convert -o encrypt" "$write_c" "$write_q" \
  "$(calc "$write_c / $write_q")" "$(mbs "$BYTES" "$write_c")" "$(mbs "$BYTES" "$write_q")"
printf '%-52s %10.3f %10.3f %8.2f %12.0f %12.0f\n' "check-in ${CHANGED_MIB} MiB: encrypted vs plain copy" "$ci_e" "$ci_p" \
  "$(calc "$ci_e / $ci_p")" "$(mbs "$changed" "$ci_e")" "$(mbs "$changed" "$ci_p")"
echo "ratio below 1: cvd (or the encrypted copy) is faster. check-in payload bytes: encrypted $pe, plain $pp"
[ "$pe" = "$pp" ] || die "the encrypted check-in moved $pe payload bytes, the plain one $pp"
