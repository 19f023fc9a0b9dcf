#!/usr/bin/env bash
# make bench: cvd and QEMU side by side, in one run, on the same files. Prints a table:
# operation, cvd time, QEMU time, ratio (cvd/QEMU: below 1 means cvd is faster) and the
# throughput of both. Each time is the best of BENCH_RUNS runs (default 3) of the whole
# command, process start included for both sides. Works in .cache/bench (wiped at the
# start). About 3 minutes on a 2-core machine.
#
# Data set: 1 GiB, half random, half text (so compression has something to do), in
#   - base1.qcow2: one layer;
#   - chain4 l0..l3.qcow2: four layers, each holding every fourth 1 MiB stripe, so a
#     sequential read walks the whole chain;
#   - sparse1t: a 1 TiB chain of four layers with 1,000 scattered 4 KiB writes each.
# The layers are written by qemu-img, so neither side reads files it wrote itself.
#
# Later capabilities add rows: scripts/bench-<name>.sh run at the end when they exist.
# BENCH_ONLY="disk clone" runs only the parts named (disk is this script's own rows;
# the others are the <name> of scripts/bench-<name>.sh); empty runs everything.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD="$ROOT/bin/cvd"
B="$ROOT/.cache/bench"
RUNS=${BENCH_RUNS:-3}
export PATH="/usr/local/go/bin:$PATH"
[ -x "$CVD" ] || { echo "bench: $CVD missing: run make build (make bench does)" >&2; exit 1; }
for t in qemu-img qemu-io awk dd; do
  command -v "$t" >/dev/null || { echo "bench: $t missing (make bench installs QEMU)" >&2; exit 1; }
done

ONLY=" ${BENCH_ONLY:-} "
want() { [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $1 "* ]]; }

rm -rf "$B"
mkdir -p "$B"
cd "$B"
log() { printf 'bench: %s\n' "$*" >&2; }
now() { date +%s.%N; }

GiB=$((1 << 30))
RESULTS="$B/results.tsv"
: > "$RESULTS"

# best PREP CMD: the best wall time of CMD over RUNS runs, PREP (untimed) before each.
best() {
  local prep=$1 cmd=$2 b="" t0 t1 i
  for ((i = 0; i < RUNS; i++)); do
    eval "$prep" || { log "FAILED: $prep"; exit 1; }
    t0=$(now)
    eval "$cmd" > /dev/null || { log "FAILED: $cmd"; exit 1; }
    t1=$(now)
    b=$(awk -v a="$t0" -v z="$t1" -v b="$b" 'BEGIN { t = z - a; if (b == "" || t < b) b = t; printf "%.4f", b }')
  done
  echo "$b"
}

# row NAME BYTES CVD_PREP CVD_CMD QEMU_PREP QEMU_CMD: time both sides, record a row.
row() {
  local name=$1 bytes=$2 c q
  log "$name"
  c=$(best "$3" "$4")
  q=$(best "$5" "$6")
  printf '%s\t%s\t%s\t%s\n' "$name" "$c" "$q" "$bytes" >> "$RESULTS"
}

# record NAME CVD_SECONDS QEMU_SECONDS BYTES: a row timed elsewhere.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"; }

disk_part() {
# ---- data set ------------------------------------------------------------------
log "making the 1 GiB data set and the images"
text() { yes "cvd bench: a line of text that compresses well, like most of a system disk" 2>/dev/null || true; }
{
  for ((i = 0; i < 32; i++)); do
    head -c 1M /dev/urandom
    head -c 1M < <(text)
  done
} > mix64m.bin
for ((i = 0; i < 16; i++)); do cat mix64m.bin; done > data.raw
rm mix64m.bin

qemu-img convert -O qcow2 data.raw base1.qcow2

# chain4: layer k holds the 1 MiB stripes s with s mod 4 = k (holes elsewhere).
for k in 0 1 2 3; do
  truncate -s 1G "s$k.raw"
  for ((s = k; s < 1024; s += 4)); do
    dd if=data.raw of="s$k.raw" bs=1M skip=$s seek=$s count=1 conv=notrunc status=none
  done
  qemu-img convert -O qcow2 "s$k.raw" "l$k.qcow2"
  rm "s$k.raw"
  if [ "$k" -gt 0 ]; then
    qemu-img rebase -u -b "l$((k - 1)).qcow2" -F qcow2 "l$k.qcow2"
  fi
done
qemu-img compare -q l3.qcow2 data.raw || { echo "bench: chain4 does not read as the data set" >&2; exit 1; }
qemu-img convert -O qcow2 l3.qcow2 flat.qcow2

# sparse1t: 1 TiB, four layers, 1,000 scattered 4 KiB writes in each.
prev=""
for k in 0 1 2 3; do
  if [ -z "$prev" ]; then
    qemu-img create -q -f qcow2 "t$k.qcow2" 1T
  else
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "t$k.qcow2"
  fi
  awk -v k=$k 'BEGIN { srand(k + 1); for (i = 0; i < 1000; i++) printf "-c\nwrite -P %d %.0f 4096\n", k + 1, int(rand() * 16777216) * 65536 }' \
    | { mapfile -t args; qemu-io -t writeback "${args[@]}" "t$k.qcow2" > /dev/null; }
  prev="t$k.qcow2"
done

# ---- rows ----------------------------------------------------------------------
row "sequential read 1 GiB, 1 layer" $GiB \
  "" "'$CVD' disk read base1.qcow2 0 1G" \
  "" "qemu-img bench -f qcow2 -t writeback -c 1024 -s 1M -S 1M base1.qcow2"
row "sequential read 1 GiB, 4-deep chain" $GiB \
  "" "'$CVD' disk read l3.qcow2 0 1G" \
  "" "qemu-img bench -f qcow2 -t writeback -c 1024 -s 1M -S 1M l3.qcow2"

# Random 4 KiB reads: 20,000 reads at i*STEP mod 1 GiB (every 4 KiB slot once at most),
# queue depth 1. cvd through the engine (go test -bench), QEMU through qemu-img bench;
# both report the time of the reads alone.
STEP=$((4096 * 100003))
COUNT=20000
if command -v go >/dev/null; then
  log "random 4 KiB reads (compiling the disk benchmarks)"
  (cd "$ROOT" && go test -c -o "$B/disk.test" ./disk)
  c="" q=""
  for ((i = 0; i < RUNS; i++)); do
    ns=$(CVD_BENCH_IMAGE="$B/l3.qcow2" CVD_BENCH_STEP=$STEP "$B/disk.test" -test.run '^$' \
      -test.bench '^BenchmarkImageStrided4K$' -test.benchtime ${COUNT}x | awk '/^BenchmarkImageStrided4K/ { print $3 }')
    t=$(awk -v ns="$ns" -v n=$COUNT 'BEGIN { printf "%.4f", ns * n / 1e9 }')
    c=$(awk -v t="$t" -v b="$c" 'BEGIN { if (b == "" || t < b) b = t; print b }')
    t=$(qemu-img bench -f qcow2 -t writeback -d 1 -c $COUNT -s 4K -S $STEP l3.qcow2 | awk '/Run completed/ { print $4 }')
    q=$(awk -v t="$t" -v b="$q" 'BEGIN { if (b == "" || t < b) b = t; print b }')
  done
  record "random 4 KiB reads x20000, 4-deep, qd 1" "$c" "$q" $((COUNT * 4096))
else
  log "go not found: random 4 KiB read row skipped"
fi

# cvd's convert syncs its output before it returns; qemu-img convert defaults to
# cache=unsafe (no flush at all), so QEMU runs with -t writeback, which flushes at
# the end: both rows then measure a durable copy.
row "convert 4-deep chain to raw" $GiB \
  "rm -f c.raw" "'$CVD' disk convert -q -O raw l3.qcow2 c.raw" \
  "rm -f q.raw" "qemu-img convert -t writeback -O raw l3.qcow2 q.raw"
row "convert 4-deep chain to qcow2 (flatten)" $GiB \
  "rm -f c.qcow2" "'$CVD' disk convert -q l3.qcow2 c.qcow2" \
  "rm -f q.qcow2" "qemu-img convert -t writeback -O qcow2 l3.qcow2 q.qcow2"
row "convert 4-deep chain to qcow2, zstd" $GiB \
  "rm -f cz.qcow2" "'$CVD' disk convert -q -c zstd l3.qcow2 cz.qcow2" \
  "rm -f qz.qcow2" "qemu-img convert -t writeback -c -O qcow2 -o compression_type=zstd l3.qcow2 qz.qcow2"
row "sequential write 1 GiB into a new qcow2" $GiB \
  "rm -f cw.qcow2; '$CVD' disk create cw.qcow2 1G >/dev/null" "'$CVD' disk write cw.qcow2 0 data.raw" \
  "rm -f qw.qcow2; qemu-img create -q -f qcow2 qw.qcow2 1G" "qemu-io -t writeback -c 'write -s data.raw 0 1G' qw.qcow2"
row "check a 1 GiB image" "" \
  "" "'$CVD' disk check base1.qcow2" \
  "" "qemu-img check base1.qcow2"
row "map 1 TiB sparse, 4-deep, 4,000 clusters" "" \
  "" "'$CVD' disk map --json t3.qcow2" \
  "" "qemu-img map --output=json t3.qcow2"
row "compare 4-deep chain with its flat copy" $GiB \
  "" "'$CVD' disk compare l3.qcow2 flat.qcow2" \
  "" "qemu-img compare l3.qcow2 flat.qcow2"

# The results must be right, not only fast.
"$CVD" disk compare l3.qcow2 cz.qcow2 > /dev/null
qemu-img compare -q data.raw c.raw
qemu-img compare -q data.raw cz.qcow2
qemu-img compare -q data.raw cw.qcow2
for f in c.qcow2 cz.qcow2 cw.qcow2; do qemu-img check -q "$f"; done

# ---- table -----------------------------------------------------------------------
table() {
  awk -F '\t' '
    function mbs(b, t) { return (b == "" || t <= 0) ? "-" : sprintf("%.0f", b / t / 1048576) }
    BEGIN {
      printf "%-44s %10s %10s %8s %12s %12s\n", "operation", "cvd s", "QEMU s", "cvd/QEMU", "cvd MiB/s", "QEMU MiB/s"
      printf "%-44s %10s %10s %8s %12s %12s\n", "---------", "-----", "------", "--------", "---------", "----------"
    }
    {
      r = ($3 > 0) ? sprintf("%.2f", $2 / $3) : "-"
      printf "%-44s %10.3f %10.3f %8s %12s %12s\n", $1, $2, $3, r, mbs($4, $2), mbs($4, $3)
    }' "$RESULTS"
}
echo
echo "cvd vs QEMU $(qemu-img --version | head -1 | awk '{ print $3 }'), best of $RUNS runs, $(nproc) cores ($(date -u +%Y-%m-%d))"
table | tee "$B/results.txt"
}
if want disk; then
  disk_part
fi

# ---- later rows ------------------------------------------------------------------
# Each capability adds its rows as scripts/bench-<name>.sh, run here (with CVD, BENCH
# and BENCH_RUNS in its environment) when present: clone first, then any other.
export CVD BENCH="$B" BENCH_RUNS="$RUNS"
ran=" "
for f in "$ROOT/scripts/bench-clone.sh" "$ROOT"/scripts/bench-*.sh; do
  [ -f "$f" ] || continue
  n=${f##*/bench-}
  want "${n%.sh}" || continue
  case "$ran" in *" $f "*) continue ;; esac
  ran+="$f "
  echo
  bash "$f"
done
