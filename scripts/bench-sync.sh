#!/usr/bin/env bash
# make bench, the sync rows: a check-in of a 16 GiB virtual disk with 64 MiB changed
# (64 random 1 MiB writes scattered over the disk), side by side in one run with
# `rsync --inplace --no-whole-file` of the laptop's disk image to the server's copy
# of it, both over loopback (cvd serve; an rsync daemon). Prints time, bytes on the
# wire and throughput of changed data for both, and the ratios.
#
# The disk image rsync moves is the laptop's desktop flattened to one file: raw (16
# GiB, sparse) and qcow2 (only what is allocated); the server holds the same file as
# it was before the changes. cvd bytes are the HTTP bodies both ways (cluster stream
# + entry and missing lists + JSON); rsync bytes are its "Total bytes sent" +
# "received". Each figure is the best of BENCH_RUNS rounds (default 3), each round
# with new data; the raw rsync (16 GiB read on both sides) runs in the first round
# only. Works in $BENCH/sync (default .cache/bench/sync), wiped at the start.
#
# Environment: CVD (default bin/cvd), BENCH, BENCH_RUNS, DATA_MIB (data in the base,
# default 512), STORE_CATALOG (the server store's catalog: a postgres:// URL),
# NO_RSYNC=1 (cvd's rows only).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-$ROOT/.cache/bench}
RUNS=${BENCH_RUNS:-3}
DATA_MIB=${DATA_MIB:-512}
W="$BENCH/sync"
[ -x "$CVD" ] || { echo "bench-sync: $CVD missing: run make build" >&2; exit 1; }
for t in qemu-img rsync python3; do
  command -v "$t" >/dev/null || { echo "bench-sync: $t missing (make deps)" >&2; exit 1; }
done

rm -rf "$W"
mkdir -p "$W"
cd "$W"
log() { printf 'bench-sync: %s\n' "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
json() { python3 -c "import json,sys; d=json.load(open('$1')); print(d$2)"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

SERVER="$W/server"
# STORE_CATALOG: the server store's catalog (postgres://…) instead of its SQLite file.
[ -z "${STORE_CATALOG:-}" ] || "$CVD" --store "$SERVER" --catalog "$STORE_CATALOG" gc >/dev/null
LAPTOP="$W/laptop"
GiB=$((1 << 30))
MiB=$((1 << 20))

log "a 16 GiB base holding $DATA_MIB MiB (half random, half text), an app layer, a desktop"
"$CVD" disk create base.qcow2 16G >/dev/null
half=$((DATA_MIB / 2))
head -c "${half}M" /dev/urandom > r.bin
head -c "${half}M" < <(yes "cvd bench: a line of text that compresses well, like most of a system disk" 2>/dev/null || true) > t.bin
"$CVD" disk write base.qcow2 0 r.bin >/dev/null
"$CVD" disk write base.qcow2 $((8 * GiB)) t.bin >/dev/null
rm -f r.bin t.bin
"$CVD" disk create -b base.qcow2 app.qcow2 >/dev/null
head -c 32M /dev/urandom > a.bin
"$CVD" disk write app.qcow2 $((4 * GiB)) a.bin >/dev/null
rm -f a.bin
"$CVD" --store "$SERVER" layer import base.qcow2 --kind base --name bench-base:1 >/dev/null
"$CVD" --store "$SERVER" layer import app.qcow2 --kind app --parent bench-base:1 --name bench-app:1 >/dev/null
rm -f base.qcow2 app.qcow2
"$CVD" --store "$SERVER" desktop create bench --base bench-base:1 --app bench-app:1 >/dev/null
TOKEN=$("$CVD" --store "$SERVER" device add bench-laptop --desktop bench 2>/dev/null)

"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve.out 2> serve.log &
pids+=($!)
for _ in $(seq 100); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.* on \(http[^ ]*\).*/\1/p' serve.out)
[ -n "$URL" ] || { echo "bench-sync: the server did not start: $(cat serve.log)" >&2; exit 1; }

# The rsync daemon on loopback, its module is the server's copies.
mkdir -p rsync-srv
port=$((20000 + RANDOM % 20000))
cat > rsyncd.conf <<EOF
pid file = $W/rsyncd.pid
use chroot = no
uid = $(id -u)
gid = $(id -g)
[srv]
  path = $W/rsync-srv
  read only = no
EOF
rsync --daemon --no-detach --config="$W/rsyncd.conf" --address=127.0.0.1 --port=$port 2> rsyncd.log &
pids+=($!)
sleep 0.5

log "check-out to the laptop"
t0=$(now)
"$CVD" --store "$LAPTOP" --json checkout bench --server "$URL" --token "$TOKEN" > checkout.json
t1=$(now)
co_bytes=$(json checkout.json '["bytes"]')
co_data=$(json checkout.json '["data_bytes"]')
co_s=$(calc "$t1 - $t0")
top="$LAPTOP/desktops/bench.system.qcow2"

best() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == "" || a < b) print a; else print b }'; }
c_s="" c_up="" c_b="" r_s="" r_b="" q_s="" q_b="" c_all="" q_all=""
for ((round = 0; round < RUNS; round++)); do
  log "round $((round + 1))/$RUNS: the server's copies (raw, qcow2) of the laptop's disk before the changes"
  rm -f rsync-srv/disk.raw rsync-srv/disk.qcow2 after.raw after.qcow2
  if [ "${NO_RSYNC:-}" != 1 ]; then
  [ "$round" -gt 0 ] || qemu-img convert -O raw "$top" rsync-srv/disk.raw
  qemu-img convert -O qcow2 "$top" rsync-srv/disk.qcow2
  fi

  log "round $((round + 1)): 64 MiB of new data, 64 writes of 1 MiB scattered over the 16 GiB"
  head -c 64M /dev/urandom > new.bin
  python3 - "$round" <<'PY' > offsets
import random, sys
random.seed(int(sys.argv[1]) + 7)
for o in sorted(random.sample(range(16 * 1024), 64)):
    print(o)
PY
  i=0
  while read -r mb; do
    dd if=new.bin of=chunk.bin bs=1M skip=$i count=1 status=none
    "$CVD" disk write --allow-root "$LAPTOP" "$top" $((mb * MiB)) chunk.bin >/dev/null
    i=$((i + 1))
  done < offsets
  rm -f chunk.bin new.bin
  if [ "${NO_RSYNC:-}" != 1 ]; then
  [ "$round" -gt 0 ] || qemu-img convert -O raw "$top" after.raw
  qemu-img convert -O qcow2 "$top" after.qcow2
  fi
  sync

  log "round $((round + 1)): cvd checkin"
  t0=$(now)
  "$CVD" --store "$LAPTOP" --json checkin bench > checkin.json
  t1=$(now)
  s=$(calc "$t1 - $t0")
  b=$(calc "$(json checkin.json '["payload_bytes"]') + $(json checkin.json '["metadata_bytes"]')")
  c_s=$(best "$s" "$c_s"); c_b=$(best "$b" "$c_b"); c_up=$(best "$(json checkin.json '["upload_seconds"]')" "$c_up")
  c_all="$c_all $(printf '%.3f' "$s")"
  [ "$(json checkin.json '["sent_clusters"]')" = 1024 ] || { echo "bench-sync: the check-in sent $(json checkin.json '["sent_clusters"]') clusters" >&2; exit 1; }

  [ "${NO_RSYNC:-}" != 1 ] || continue
  # The raw image is 16 GiB to read on both sides: its rsync runs in one round.
  if [ "$round" -eq 0 ]; then
  log "round $((round + 1)): rsync of the raw image"
  t0=$(now)
  rsync --inplace --no-whole-file --stats after.raw "rsync://127.0.0.1:$port/srv/disk.raw" > rsync-raw.txt
  t1=$(now)
  s=$(calc "$t1 - $t0")
  b=$(awk -F': ' '/^Total bytes (sent|received)/ { gsub(",", "", $2); n += $2 } END { print n }' rsync-raw.txt)
  r_s=$(best "$s" "$r_s"); r_b=$(best "$b" "$r_b")
  cmp -s after.raw rsync-srv/disk.raw || { echo "bench-sync: rsync's copy differs" >&2; exit 1; }
  fi

  log "round $((round + 1)): rsync of the qcow2 image"
  t0=$(now)
  rsync --inplace --no-whole-file --stats after.qcow2 "rsync://127.0.0.1:$port/srv/disk.qcow2" > rsync-qcow2.txt
  t1=$(now)
  s=$(calc "$t1 - $t0")
  b=$(awk -F': ' '/^Total bytes (sent|received)/ { gsub(",", "", $2); n += $2 } END { print n }' rsync-qcow2.txt)
  q_s=$(best "$s" "$q_s"); q_b=$(best "$b" "$q_b")
  q_all="$q_all $(printf '%.3f' "$s")"
done

# The server's head reads as the laptop's disk.
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
head_sys=$("$CVD" --store "$SERVER" --json desktop versions bench | python3 -c 'import json,sys; d=json.load(sys.stdin); print([v for v in d["versions"] if v["n"]==d["head"]][0]["system"])')
qemu-img compare -q "$SERVER/layers/$head_sys.qcow2" "$top" || { echo "bench-sync: the server's head differs from the laptop's disk" >&2; exit 1; }

changed=$((64 * MiB))
echo
echo "sync: check-in of a 16 GiB disk with 64 MiB changed (64 x 1 MiB random), loopback, best of $RUNS, $(nproc) cores ($(date -u +%Y-%m-%d))"
{
  printf '%-44s %10s %14s %12s %10s %10s\n' "operation" "seconds" "bytes moved" "MB/s changed" "time x" "bytes x"
  printf '%-44s %10s %14s %12s %10s %10s\n' "---------" "-------" "-----------" "------------" "------" "-------"
  row() { printf '%-44s %10.3f %14d %12.0f %10s %10s\n' "$1" "$2" "$3" "$(calc "$changed / $2 / 1000000")" "$4" "$5"; }
  row "cvd checkin (whole command)" "$c_s" "$c_b" "1.00" "1.00"
  row "cvd checkin: transfer and commit only" "$c_up" "$c_b" "-" "-"
  if [ "${NO_RSYNC:-}" != 1 ]; then
  row "rsync --inplace --no-whole-file, raw 16 GiB" "$r_s" "$r_b" "$(calc "$r_s / $c_s")" "$(calc "$r_b / $c_b")"
  row "rsync --inplace --no-whole-file, qcow2" "$q_s" "$q_b" "$(calc "$q_s / $c_s")" "$(calc "$q_b / $c_b")"
  fi
  echo "(time x, bytes x: rsync's over cvd's; above 1 means cvd is faster / moves less)"
  echo "every round, seconds: cvd checkin$c_all; rsync of the qcow2 image$q_all"
  printf 'check-out of the desktop to an empty laptop: %.3f s, %d bytes on the wire for %d bytes of clusters\n' "$co_s" "$co_bytes" "$co_data"
} | tee "$W/results.txt"
