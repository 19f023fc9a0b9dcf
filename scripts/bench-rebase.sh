#!/usr/bin/env bash
# make bench, the rebase and recompose rows, cvd and QEMU side by side in one run:
#
#  1. Safe rebase of a top on a 16 GiB virtual disk whose old and new backing
#     layers differ in 64 MiB (32 MiB rewritten, 32 MiB added where the old
#     chain reads base data or zeros), on a base holding 1 GiB: `cvd disk rebase`
#     vs `qemu-img rebase` on copies of the same top. Time (best of RUNS), ratio,
#     and how much each top grew. Both results are checked with qemu-img compare
#     against the original guest view and with qemu-img check.
#  2. Recompose of N desktops (default 100, each with 4 MiB of its own) onto a
#     new app layer: `cvd recompose --using` once, vs `qemu-img rebase` once per
#     desktop (safe, and -u), on copies of the same tops. Total time and bytes
#     written. (A safe qemu-img rebase keeps the old guest view: it copies every
#     changed cluster into each top; recompose puts the desktop's delta over the
#     new layers, which is what -u does, without checking for conflicts.)
#
# Environment: CVD (default bin/cvd), BENCH (default .cache/bench; works in
# $BENCH/rebase, wiped at the start), BENCH_RUNS (default 3), N (default 100),
# QN (desktops qemu-img rebases, default 20: a safe qemu-img rebase takes seconds
# per desktop; its totals are scaled to N and say so).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-${BENCH_DIR:-$ROOT/.cache/bench}}
RUNS=${BENCH_RUNS:-3}
N=${N:-100}
QN=${QN:-20}
[ "$QN" -le "$N" ] || QN=$N
W="$BENCH/rebase"
[ -x "$CVD" ] || { echo "bench-rebase: $CVD missing: run make build" >&2; exit 1; }
for t in qemu-img qemu-io awk; do
  command -v "$t" >/dev/null || { echo "bench-rebase: $t missing (make deps installs QEMU)" >&2; exit 1; }
done
rm -rf "$W"
mkdir -p "$W"
cd "$W"
log() { printf 'bench-rebase: %s\n' "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
fsize() { stat -c %s "$1"; }
dub() { du -sB1 "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
qio() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -t writeback "${a[@]}" "$img" >/dev/null; }

# ---- data: base 16 GiB (1 GiB of data), old and new app layers -------------------
log "making a 16 GiB base with 1 GiB of data and two app layers that differ in 64 MiB"
qemu-img create -q -f qcow2 base.qcow2 16G
qio base.qcow2 "write -P 0x11 0 1G"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 old.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 new.qcow2
oldc=() newc=()
for ((i = 0; i < 64; i++)); do
  off=$((i * 256 * 1048576))
  oldc+=("write -P 0x21 $off 512K")
  newc+=("write -P 0x31 $off 512K")                          # rewritten: 32 MiB
  newc+=("write -P 0x32 $((off + 128 * 1048576)) 512K")      # added: 32 MiB (base data or zeros below)
done
qio old.qcow2 "${oldc[@]}"
qio new.qcow2 "${newc[@]}"
# The top: 16 MiB of its own, part of it over clusters the layers change.
qemu-img create -q -f qcow2 -b old.qcow2 -F qcow2 top.qcow2
qio top.qcow2 "write -P 0x41 0 256K" "write -P 0x42 100M 8M" "write -P 0x43 2G 7936K"
qemu-img convert -O qcow2 top.qcow2 view.qcow2 # the guest view to keep
sync

best_c="" best_q="" grow_c=0 grow_q=0 rep=""
for ((r = 0; r < RUNS; r++)); do
  rm -f tc.qcow2 tq.qcow2
  cp top.qcow2 tc.qcow2
  cp top.qcow2 tq.qcow2
  sync
  t0=$(now); rep=$("$CVD" --json disk rebase tc.qcow2 --onto new.qcow2); t1=$(now)
  c=$(calc "$t1 - $t0")
  sync
  t0=$(now); qemu-img rebase -b new.qcow2 -F qcow2 tq.qcow2; t1=$(now)
  q=$(calc "$t1 - $t0")
  best_c=$(awk -v t="$c" -v b="$best_c" 'BEGIN { if (b == "" || t < b) b = t; print b }')
  best_q=$(awk -v t="$q" -v b="$best_q" 'BEGIN { if (b == "" || t < b) b = t; print b }')
  grow_c=$(($(fsize tc.qcow2) - $(fsize top.qcow2)))
  grow_q=$(($(fsize tq.qcow2) - $(fsize top.qcow2)))
done
for f in tc.qcow2 tq.qcow2; do
  qemu-img compare -q "$f" view.qcow2 || { echo "bench-rebase: $f does not show the original guest view" >&2; exit 1; }
  qemu-img check -q "$f" || { echo "bench-rebase: qemu-img check $f failed" >&2; exit 1; }
done
copied=$(printf '%s' "$rep" | awk -F': ' '/"clusters-copied"/ { gsub(",", "", $2); print $2 }')
zeroed=$(printf '%s' "$rep" | awk -F': ' '/"clusters-zeroed"/ { gsub(",", "", $2); print $2 }')
compared=$(printf '%s' "$rep" | awk -F': ' '/"clusters-compared"/ { gsub(",", "", $2); print $2 }')
# The clusters that really differ and that the top does not hold, and how many of
# them hold data in the old view.
diffc=$("$CVD" --json disk diff old.qcow2 new.qcow2 | awk -F': ' '/"clusters"/ { gsub(",", "", $2); print $2 }' || true)

# ---- recompose of N desktops ------------------------------------------------------
log "recompose: a store with the base, office:1, office:2 and $N desktops with 4 MiB each"
export CVD_STORE="$W/store"
# STORE_CATALOG: the store's catalog (postgres://…) instead of its own SQLite file.
[ -z "${STORE_CATALOG:-}" ] || "$CVD" --catalog "$STORE_CATALOG" gc >/dev/null
"$CVD" layer import base.qcow2 --kind base --name os:1 >/dev/null
"$CVD" layer import old.qcow2 --kind app --parent os:1 --name office:1 >/dev/null
"$CVD" layer import new.qcow2 --kind app --parent os:1 --name office:2 >/dev/null
o1=$("$CVD" layer ls --json 2>/dev/null | awk -F'"' '/"id"/ { id = $4 } /"office:1"/ { print id; exit }' || true)
for ((i = 0; i < N; i++)); do
  "$CVD" desktop create "$(printf 'd%03d' $i)" --app office:1 >/dev/null
done
mkdir -p q
for ((i = 0; i < N; i++)); do
  d=$(printf 'd%03d' $i)
  # 4 MiB of its own, clear of the clusters the app layers change (multiples of 128 MiB)
  qio "$CVD_STORE/desktops/$d.system.qcow2" "write -P $((i % 200 + 1)) $((3 * 1024 + 16 + i % 100))M 4M"
  if [ "$i" -lt "$QN" ]; then
    cp "$CVD_STORE/desktops/$d.system.qcow2" "q/$d.qcow2"
    qemu-img rebase -u -b "$CVD_STORE/layers/$o1.qcow2" -F qcow2 "q/$d.qcow2" 2>/dev/null || true
  fi
done
cp -a q qu
sync

t0=$(now); "$CVD" recompose --using office:1 --app office:2 --dry-run > plan.txt || true; t1=$(now)
tplan=$(calc "$t1 - $t0")
b0=$(dub "$CVD_STORE/desktops")
t0=$(now); rc=0; "$CVD" --json recompose --using office:1 --app office:2 > apply.json 2> apply.err || rc=$?; t1=$(now)
tapply=$(calc "$t1 - $t0")
b1=$(dub "$CVD_STORE/desktops")
moved=$(awk -F': ' '/"moved"/ { gsub(",", "", $2); print $2 }' apply.json)
# bytes cvd wrote: the total cost of the report (the last "write-bytes"); the
# store's net growth is small because the old tops are removed
cvdw=$(awk -F': ' '/"write-bytes"/ { gsub(",", "", $2); w = $2 } END { print w + 0 }' apply.json)
sync
new=$("$CVD" layer ls --json 2>/dev/null | awk -F'"' '/"id"/ { id = $4 } /"office:2"/ { print id; exit }' || true)
qb0=$(dub q)
t0=$(now); for f in q/*.qcow2; do qemu-img rebase -b "$CVD_STORE/layers/$new.qcow2" -F qcow2 "$f"; done; t1=$(now)
tq=$(calc "($t1 - $t0) * $N / $QN")
qb1=$(dub q)
qgrow=$(calc "int(($qb1 - $qb0) * $N / $QN)")
t0=$(now); for f in qu/*.qcow2; do qemu-img rebase -u -b "$CVD_STORE/layers/$new.qcow2" -F qcow2 "$f"; done; t1=$(now)
tqu=$(calc "($t1 - $t0) * $N / $QN")
qnote=""
[ "$QN" -eq "$N" ] || qnote=" (QEMU measured on $QN desktops, scaled to $N)"

# ---- report -----------------------------------------------------------------------
echo
echo "rebase and recompose, cvd vs QEMU $(qemu-img --version | head -1 | awk '{ print $3 }'), $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '%-52s %10s %10s %9s %14s %14s\n' "operation" "cvd s" "QEMU s" "QEMU/cvd" "cvd written" "QEMU written"
printf '%-52s %10s %10s %9s %14s %14s\n' "---------" "-----" "------" "--------" "----------" "-----------"
printf '%-52s %10.3f %10.3f %8.1fx %14s %14s\n' "safe rebase, 16 GiB disk, backings differ in 64 MiB" \
  "$best_c" "$best_q" "$(calc "$best_q / $best_c")" "$(mib $grow_c)" "$(mib $grow_q)"
echo "  cvd compared $compared clusters (those the two app layers hold), copied $copied as data and wrote $zeroed as zero clusters;"
echo "  the app layers differ in $diffc clusters of 64 KiB; both tops read as the original guest view (qemu-img compare) and check clean"
if [ "$rc" -eq 0 ] && [ -n "$moved" ] && [ "$moved" -gt 0 ]; then
  printf '%-52s %10.3f %10.3f %8.1fx %14s %14s\n' "recompose $N desktops onto a new app layer (safe)" \
    "$tapply" "$tq" "$(calc "$tq / $tapply")" "$(mib "$cvdw")" "$(mib "$qgrow")"
  printf '%-52s %10.3f %10.3f %8.1fx\n' "  the same vs qemu-img rebase -u per desktop" "$tapply" "$tqu" "$(calc "$tqu / $tapply")"
  echo "  cvd moved $moved desktops (new tops beside the old, one transaction each); its plan alone took ${tplan}s$qnote"
  echo "  (rebase row: written = growth of the top; recompose row: cvd's bytes written, QEMU's growth of the tops;"
  echo "   the desktops directory grew by $(mib $((b1 - b0))) net, the old tops being removed)"
else
  printf '%-52s %10s %10.3f %9s %14s %14s\n' "recompose $N desktops onto a new app layer (safe)" "n/a" "$tq" "-" "-" "$(mib "$qgrow")"
  printf '%-52s %10s %10.3f\n' "  qemu-img rebase -u per desktop" "n/a" "$tqu"
  why=$(awk -F'"' '/"error"/ { print $4; exit }' apply.json)
  echo "  cvd recompose could not apply: ${why:-$(head -c 300 apply.err)}$qnote"
  echo "  its plan (dry run: $N conflict sets and costs) took ${tplan}s:"
  tail -3 plan.txt | sed 's/^/    /'
fi
