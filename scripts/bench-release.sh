#!/usr/bin/env bash
# make bench, the release rows: this build against the previous release (the last
# one whose store kept its records in bbolt files), side by side in one run on the
# same machine: clones per second (bench-clone.sh), the 64 MiB check-in and the
# check-out (bench-sync.sh, cvd's rows only), and the recompose of N desktops
# (bench-rebase.sh). This build runs twice: with the store's SQLite catalog, and
# with the catalog on a private PostgreSQL cluster (scripts/postgres.sh).
#
# The previous release is built from this repository's history (git archive of
# PREV, go build). Works in $BENCH/release (default .cache/bench/release), wiped at
# the start. Each part's own output is kept there (prev/, sqlite/, postgres/).
#
# Part by part, the three variants run back to back, ROUNDS times (default 2), and
# each figure is the best of its rounds: on a small shared machine one run's noise
# is larger than the differences measured.
#
# Environment: CVD (default bin/cvd), BENCH, BENCH_RUNS, PREV (a commit; default the
# bbolt release), N (desktops recomposed; default 100), CLONES (default 3000),
# ROUNDS (default 2), PARTS (default "clone sync rebase": the parts to run; a
# row of a part not run shows n/a).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-$ROOT/.cache/bench}
PREV=${PREV:-d620107e734a598064ba50a09d6ac03b9a1b6132}
N=${N:-100}
CLONES=${CLONES:-3000}
ROUNDS=${ROUNDS:-2}
PARTS=${PARTS:-clone sync rebase}
W="$BENCH/release"
export PATH="/usr/local/go/bin:$PATH"
log() { printf 'bench-release: %s\n' "$*" >&2; }
calc() { awk "BEGIN { print $1 }"; }

[ -x "$CVD" ] || { echo "bench-release: $CVD missing: run make build" >&2; exit 1; }
git -C "$ROOT" cat-file -e "$PREV^{commit}" 2>/dev/null ||
  { echo "bench-release: commit $PREV is not in this checkout's history" >&2; exit 1; }

rm -rf "$W"
mkdir -p "$W/src"
log "building the previous release (${PREV:0:12}) from the repository's history"
git -C "$ROOT" archive "$PREV" | tar -x -C "$W/src"
(cd "$W/src" && CGO_ENABLED=0 go build -o "$W/cvd-prev" ./cmd/cvd)

pg="$W/pg"
cleanup() { "$ROOT/scripts/postgres.sh" stop "$pg" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"$ROOT/scripts/postgres.sh" start "$pg" >/dev/null

run() { # run PART VARIANT BINARY ROUND: one part with that binary (and catalog)
  local p=$1 v=$2 bin=$3 r=$4 cat="" o="$W/$2/r$4"
  mkdir -p "$o"
  [ "$v" != postgres ] || cat=$("$ROOT/scripts/postgres.sh" createdb "$pg" "$p$r")
  case $p in
  clone)
    log "round $r, $v: clones"
    CVD=$bin BENCH="$o" N=$CLONES STORE_CATALOG=$cat bash "$ROOT/scripts/bench-clone.sh" > "$o/clone.txt" ;;
  sync)
    log "round $r, $v: check-out and check-in"
    CVD=$bin BENCH="$o" NO_RSYNC=1 STORE_CATALOG=$cat bash "$ROOT/scripts/bench-sync.sh" > "$o/sync.txt" 2>"$o/sync.log" ;;
  rebase)
    log "round $r, $v: recompose of $N desktops"
    CVD=$bin BENCH="$o" N=$N QN=1 STORE_CATALOG=$cat bash "$ROOT/scripts/bench-rebase.sh" > "$o/rebase.txt" 2>"$o/rebase.log" ;;
  esac
  rm -rf "${o:?}/$p" # the store: only the reports are kept
}
# Part by part, the variants back to back in each round: what is compared runs
# minutes apart at most, not a whole round apart.
for p in $PARTS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    run "$p" prev "$W/cvd-prev" "$r"
    run "$p" sqlite "$CVD" "$r"
    run "$p" postgres "$CVD" "$r"
  done
done

# Figures out of each part's reports: the best of the rounds.
each() { for f in "$W/$1"/r*/"$2"; do "$3" "$f"; done; }
most() { awk 'NF { if (b == "" || $1 > b) b = $1 } END { print b }'; }
least() { awk 'NF { if (b == "" || $1 < b) b = $1 } END { print b }'; }
clones1() { grep "^cvd clone --no-seed" "$1" | awk '{ print $NF }'; }
seeded1() { grep "^cvd clone (tops + seed images)" "$1" | awk '{ print $NF }'; }
checkin1() { grep "^cvd checkin (whole command)" "$1" | awk '{ print $(NF-2) }'; }
checkout1() { sed -n 's/^check-out of the desktop to an empty laptop: \([0-9.]*\) s.*/\1/p' "$1"; }
recompose1() { grep "^recompose $N desktops onto a new app layer (safe)" "$1" | cut -c53- | awk '{ print $1 }'; }
clones() { each "$1" clone.txt clones1 | most; }
seeded() { each "$1" clone.txt seeded1 | most; }
checkin() { each "$1" sync.txt checkin1 | most; }
checkout() { each "$1" sync.txt checkout1 | least; }
recompose() { each "$1" rebase.txt recompose1 | least; }

echo
echo "this build ($("$CVD" version | awk '{ print $2 }')) vs the previous release (${PREV:0:12}, bbolt), best of $ROUNDS rounds, $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '%-40s %12s %12s %9s %12s %9s\n' "operation" "previous" "SQLite" "ratio" "PostgreSQL" "ratio"
printf '%-40s %12s %12s %9s %12s %9s\n' "---------" "--------" "------" "-----" "----------" "-----"
# line NAME UNIT HIGHER_IS_BETTER FN: ratio is this build over the previous in the
# direction where above 1 is better.
line() {
  local p s q rs rq
  p=$($4 prev) s=$($4 sqlite) q=$($4 postgres)
  if [ -z "$p" ] || [ -z "$s" ] || [ -z "$q" ]; then
    printf '%-40s %12s %12s %9s %12s %9s\n' "$1 ($2)" "${p:-n/a}" "${s:-n/a}" "-" "${q:-n/a}" "-"
    return
  fi
  if [ "$3" = 1 ]; then rs=$(calc "$s / $p"); rq=$(calc "$q / $p"); else rs=$(calc "$p / $s"); rq=$(calc "$p / $q"); fi
  printf '%-40s %12s %12s %8.2fx %12s %8.2fx\n' "$1 ($2)" "$p" "$s" "$rs" "$q" "$rq"
}
line "clones, disk tops only" "per s" 1 clones
line "clones with seed images" "per s" 1 seeded
line "check-in, 64 MiB changed" "MB/s" 1 checkin
line "check-out to an empty laptop" "s" 0 checkout
line "recompose $N desktops (safe)" "s" 0 recompose
echo "(ratio: this build over the previous release; above 1 is faster)"
