#!/usr/bin/env bash
# make bench, the clone rows: linked clones per second made by `cvd clone --count N`
# (disk tops only, and with cloud-init seed images), side by side with a loop that
# runs `qemu-img create -b … -F qcow2` once per clone, and the ratio; and how much
# the store grows per clone.
#
# Each figure is the wall time of the whole command (process start, store open,
# journal, writes, sync, commit), measured in one run on the same store. Works in
# $BENCH/clone (default .cache/bench/clone), wiped at the start.
#
# Each cvd row is the best of REPS runs (default 3), each on a desktop of its own
# (a run takes a fraction of a second: one run's noise on a shared machine is
# larger than the differences measured); the growth is the first run's.
#
# Environment: CVD (the binary; default bin/cvd), N (clones per cvd run; default
# 1000), REPS (runs per row; default 3), QN (qemu-img runs; default 200), DATA
# (data in the base; default 1G),
# STORE_CATALOG (the store's catalog: a postgres:// URL; default its SQLite file).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-$ROOT/.cache/bench}
N=${N:-1000}
REPS=${REPS:-3}
QN=${QN:-200}
DATA=${DATA:-1G}
W="$BENCH/clone"
[ -x "$CVD" ] || { echo "bench-clone: $CVD missing: run make build" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "bench-clone: qemu-img missing: run make deps" >&2; exit 1; }

rm -rf "$W"
mkdir -p "$W"
export CVD_STORE="$W/store"
# STORE_CATALOG: the store's catalog (postgres://…) instead of its own SQLite file.
[ -z "${STORE_CATALOG:-}" ] || "$CVD" --catalog "$STORE_CATALOG" gc >/dev/null

now() { date +%s.%N; }
# du in bytes of the files under a directory (space taken, not apparent size)
dub() { du -sB1 "$1" | cut -f1; }

# A base holding $DATA of data, an app layer, a desktop.
qemu-img create -q -f qcow2 "$W/base.qcow2" 8G
qemu-io -c "write -P 0x5a 0 $DATA" "$W/base.qcow2" >/dev/null
"$CVD" layer import "$W/base.qcow2" --kind base --name bench:base >/dev/null
rm -f "$W/base.qcow2"
base=$("$CVD" --json layer show bench:base | sed -n 's/^  "id": "\(.*\)",$/\1/p')
"$CVD" desktop create bench --base bench:base >/dev/null
for ((r = 2; r <= REPS; r++)); do "$CVD" desktop create "bench$r" --base bench:base >/dev/null; done
layer="$CVD_STORE/layers/$base.qcow2"

calc() { awk "BEGIN { print $1 }"; }
timed() { # timed OUTVAR cmd...: runs cmd, stores the elapsed seconds
  local t0 t1 v=$1; shift
  t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
  printf -v "$v" '%s' "$(calc "$t1 - $t0")"
}

best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }
clones="$CVD_STORE/clones"
# The import just wrote the base: its writeback is not the clones' cost.
sync
b0=$(dub "$clones")
timed tdisk "$CVD" clone bench --name d --count "$N" --no-seed
b1=$(dub "$clones")
timed tseed "$CVD" clone bench --name s --count "$N"
b2=$(dub "$clones")
for ((r = 2; r <= REPS; r++)); do
  sync
  timed t "$CVD" clone "bench$r" --name "d$r" --count "$N" --no-seed
  tdisk=$(best "$tdisk" "$t")
  timed t "$CVD" clone "bench$r" --name "s$r" --count "$N"
  tseed=$(best "$tseed" "$t")
done

mkdir -p "$W/qloop"
timed tq bash -c "for i in \$(seq $QN); do qemu-img create -q -f qcow2 -b '$layer' -F qcow2 '$W/qloop/q-'\$i.qcow2; done"

rate() { calc "$1 / $2"; }
rdisk=$(rate "$N" "$tdisk")
rseed=$(rate "$N" "$tseed")
rq=$(rate "$QN" "$tq")
printf '%-44s %7s %9s %12s\n' "clone benchmark" "count" "seconds" "per second"
printf '%-44s %7d %9.3f %12.0f\n' "cvd clone --no-seed (disk tops only)" "$N" "$tdisk" "$rdisk"
printf '%-44s %7d %9.3f %12.0f\n' "cvd clone (tops + seed images)" "$N" "$tseed" "$rseed"
printf '%-44s %7d %9.3f %12.0f\n' "qemu-img create -b … -F qcow2, once per clone" "$QN" "$tq" "$rq"
printf '%-44s %7s %9s %11.1fx\n' "ratio: cvd disk clones / qemu-img loop" "" "" "$(calc "$rdisk / $rq")"
printf '%-44s %7s %9s %11.1fx\n' "ratio: cvd clones with seed / qemu-img loop" "" "" "$(calc "$rseed / $rq")"
printf '%-44s %7s %9s %9.1f KiB\n' "store growth per clone, disk top only" "" "" "$(calc "($b1 - $b0) / $N / 1024")"
printf '%-44s %7s %9s %9.1f KiB\n' "store growth per clone, top + seed image" "" "" "$(calc "($b2 - $b1) / $N / 1024")"
printf '%-44s %7s %9s %9.1f KiB\n' "qemu-img create: disk space per image" "" "" "$(calc "$(dub "$W/qloop") / $QN / 1024")"
"$CVD" store check >/dev/null || { echo "bench-clone: store check failed" >&2; exit 1; }
