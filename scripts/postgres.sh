#!/usr/bin/env bash
# A private PostgreSQL cluster for cvd's benchmarks and for trying a store on
# PostgreSQL by hand (the Go tests start their own, see internal/testutil).
#
#   scripts/postgres.sh start DIR      initdb (once) and start it; print the URL of database cvd
#   scripts/postgres.sh createdb DIR N create database N; print its URL
#   scripts/postgres.sh stop DIR       stop it (immediate)
#
# It listens on a unix socket in DIR/sock only (no TCP), runs as the postgres user
# when started by root (PostgreSQL refuses to run as root), with fsync on.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR | createdb DIR NAME" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "postgres.sh: PostgreSQL is not installed (make deps)" >&2; exit 1; }
as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case $cmd in
start)
  chmod 755 "$dir"
  mkdir -p "$dir/data" "$dir/sock"
  mkdir -p "$dir/log"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/data" "$dir/sock" "$dir/log"
  [ -f "$dir/data/PG_VERSION" ] || as "$bin/initdb" -D "$dir/data" -A trust -U cvd >"$dir/initdb.log" 2>&1
  if ! as "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as "$bin/pg_ctl" -D "$dir/data" -o "-k $dir/sock -c listen_addresses=" -l "$dir/log/postgres.log" -w start >/dev/null
    as "$bin/createdb" -h "$dir/sock" -U cvd cvd 2>/dev/null || true
  fi
  echo "postgres://cvd@/cvd?host=$dir/sock"
  ;;
createdb)
  [ $# -eq 3 ] || usage
  as "$bin/createdb" -h "$dir/sock" -U cvd "$3"
  echo "postgres://cvd@/$3?host=$dir/sock"
  ;;
stop)
  as "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  ;;
*) usage ;;
esac
