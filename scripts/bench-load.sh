#!/usr/bin/env bash
# make bench, the site rows: the load test (cmd/cvd/loadtest_test.go) for LOAD_TIME
# (default 60s) with LOAD_LAPTOPS simulated laptops (default 20), each doing
# check-out → write 8 MiB → check-in rounds, side by side in one run: three
# `cvd serve` on one PostgreSQL catalog and store behind haproxy (one of them
# SIGKILLed and restarted midway), and one server behind the same proxy. Prints
# rounds per second, check-in latency p50/p99, bytes moved per round over bytes
# changed, versions lost, unexpected conflicts and the servers' largest RSS, and
# the ratio of the rounds per second (three servers over one).
#
# Environment: BENCH (default .cache/bench), LOAD_TIME, LOAD_LAPTOPS.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/.cache/bench}
LOAD_TIME=${LOAD_TIME:-60s}
LOAD_LAPTOPS=${LOAD_LAPTOPS:-20}
W="$BENCH/load"
rm -rf "$W"
mkdir -p "$W"
log() { printf 'bench-load: %s\n' "$*" >&2; }
for t in haproxy python3; do
  command -v "$t" >/dev/null || { echo "bench-load: $t missing (make deps)" >&2; exit 1; }
done

run() { # run SERVERS: one load test, its figures in $W/load-SERVERS.json
  log "$1 server(s), $LOAD_LAPTOPS laptops, $LOAD_TIME"
  (cd "$ROOT" && CVD_TEST_REQUIRE=all CVD_LOADTEST="$LOAD_TIME" CVD_LOADTEST_LAPTOPS="$LOAD_LAPTOPS" \
    CVD_LOADTEST_SERVERS="$1" CVD_LOADTEST_DIR="$W" CVD_LOADTEST_JSON="$W/load-$1.json" \
    go test -count=1 -run '^TestLoad$' -timeout 30m ./cmd/cvd >"$W/load-$1.log" 2>&1) ||
    { tail -40 "$W/load-$1.log" >&2; exit 1; }
}
run 3
run 1
python3 - "$W/load-3.json" "$W/load-1.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print("site load: %d laptops, check-out -> write 8 MiB -> check-in rounds, %.0f s" % (a["laptops"], a["seconds"]))
print("%-34s %10s %10s %10s %9s %8s %6s %9s %9s" % ("servers behind haproxy", "rounds/s", "p50 s", "p99 s", "moved/chg", "retries", "lost", "conflicts", "max RSS"))
for r, name in ((a, "3 (one SIGKILLed midway)"), (b, "1")):
    print("%-34s %10.2f %10.2f %10.2f %9.3f %8d %6d %9d %8.0fM" % (name, r["rounds_per_s"], r["checkin_p50_s"], r["checkin_p99_s"],
          r["moved_over_changed"], r["retries"], r["versions_lost"], r["unexpected_conflicts"], r["max_server_rss_bytes"] / 2**20))
print("rounds/s, 3 servers over 1: %.2fx" % (a["rounds_per_s"] / b["rounds_per_s"] if b["rounds_per_s"] else 0))
PY
