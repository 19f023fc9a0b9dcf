#!/usr/bin/env bash
# make bench, the file-level rows, cvd and the kernel side by side in one run:
#
#  1. The manifest of an ext4 layer (FILES files, about SIZE_MIB MiB of data, in a
#     qcow2 file): `cvd desktop files --json` (cvd's chain reader and go-diskfs, in
#     process, nothing mounted; a fresh store each run, so nothing is cached) vs the
#     kernel: qemu-storage-daemon exports the qcow2 file over FUSE, a read-only loop
#     mount, `find` and `sha256sum` over every file. Best of RUNS each; both list the
#     same files with the same SHA-256 (the script fails otherwise).
#  2. A recompose by files (cvd recompose --policy merge) of a desktop that changed
#     CHANGED files over a new app layer: its plan and its apply, with the bytes it
#     wrote, against the same desktop's block move being refused (the manifest of the
#     desktop's chain is the plan's main cost; it is listed for scale, no peer).
#
# Needs root (the kernel's loop mount). Environment: CVD (default bin/cvd), BENCH
# (default .cache/bench; works in $BENCH/files, wiped at the start), BENCH_RUNS
# (default 3), FILES (default 20000), SIZE_MIB (default 256), CHANGED (default 200).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CVD=${CVD:-$ROOT/bin/cvd}
BENCH=${BENCH:-${BENCH_DIR:-$ROOT/.cache/bench}}
RUNS=${BENCH_RUNS:-3}
FILES=${FILES:-20000}
SIZE_MIB=${SIZE_MIB:-256}
CHANGED=${CHANGED:-200}
W="$BENCH/files"
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf 'bench-files: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
[ -x "$CVD" ] || fail "$CVD missing: run make build"
[ "$(id -u)" = 0 ] || fail "the kernel's side loop-mounts: run as root"
for t in qemu-img qemu-storage-daemon mkfs.ext4 losetup mount python3 sha256sum; do
  command -v "$t" >/dev/null || fail "$t missing (scripts/deps.sh installs it)"
done
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
mnt="" qsd=""
cleanup() {
  [ -n "$mnt" ] && mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$qsd" ] && kill "$qsd" 2>/dev/null && wait "$qsd" 2>/dev/null
  true
}
trap cleanup EXIT
rm -rf "$W"
mkdir -p "$W/tree" "$W/mnt"
cd "$W"
mnt="$W/mnt"

log "a tree of $FILES files, about $SIZE_MIB MiB"
python3 - "$W/tree" "$FILES" "$SIZE_MIB" <<'EOF'
import os, random, sys
root, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(15)
avg = mib * 1048576 // n
block = rng.randbytes(1 << 20)
for i in range(n):
    d = os.path.join(root, "usr", "share", "d%03d" % (i % 400), "s%02d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    size = rng.randint(0, 2 * avg)
    off = rng.randint(0, len(block) - 1)
    data = (block[off:] + block)[:size] if size <= len(block) else (block * (size // len(block) + 1))[:size]
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(data)
os.makedirs(os.path.join(root, "etc"), exist_ok=True)
os.makedirs(os.path.join(root, "home", "user"), exist_ok=True)
EOF
mkfs.ext4 -q -F -d tree os.raw $((SIZE_MIB * 3 + 256))M >/dev/null
qemu-img convert -f raw -O qcow2 os.raw os.qcow2

# The kernel's manifest: export, mount read-only, find + sha256sum.
kernel_manifest() {
  touch export
  qemu-storage-daemon --blockdev driver=file,node-name=f,filename=os.qcow2,read-only=on \
    --blockdev driver=qcow2,node-name=q,file=f,read-only=on \
    --export type=fuse,id=e,node-name=q,mountpoint=export,writable=off &
  qsd=$!
  for _ in $(seq 100); do [ "$(stat -c %d export)" != "$(stat -c %d .)" ] && break; sleep 0.05; done
  mount -o loop,ro export "$mnt"
  (cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > kernel.sums
  umount "$mnt"
  kill "$qsd"; wait "$qsd" 2>/dev/null || true
  qsd=""
}
cvd_manifest() {
  rm -rf store
  "$CVD" --store store layer import os.qcow2 --kind base --name os:1 >/dev/null
  "$CVD" --store store desktop create d --base os:1 >/dev/null
  local t0 t1
  t0=$(now)
  "$CVD" --store store --json desktop files d > cvd.json
  t1=$(now)
  calc "$t1 - $t0"
}
best_c="" best_k=""
for _ in $(seq "$RUNS"); do
  t=$(cvd_manifest)
  [ -z "$best_c" ] || [ "$(calc "$t < $best_c")" = 1 ] && best_c=$t
  t0=$(now); kernel_manifest; t1=$(now)
  t=$(calc "$t1 - $t0")
  [ -z "$best_k" ] || [ "$(calc "$t < $best_k")" = 1 ] && best_k=$t
done
python3 - <<'EOF' || fail "cvd's manifest and the kernel's differ"
import json
cvd = {e["path"]: e["sha256"] for e in json.load(open("cvd.json"))[0]["files"] if e["type"] == "file"}
kern = {}
for line in open("kernel.sums"):
    h, p = line.rstrip("\n").split("  ", 1)
    kern[p[1:]] = h
assert cvd == kern, (len(cvd), len(kern))
EOF
nfiles=$(wc -l < kernel.sums)
bytes=$(python3 -c 'import json; print(sum(e["size"] for e in json.load(open("cvd.json"))[0]["files"] if e["type"] == "file"))')

log "a desktop that changed $CHANGED files over office:1; office:2 published"
edit() {
  local raw=$1 what=$2 n=$3
  mount -o loop "$raw" "$mnt"
  for i in $(seq "$n"); do
    mkdir -p "$mnt/$what"
    head -c $((i * 512)) /dev/urandom > "$mnt/$what/file$i"
  done
  umount "$mnt"
}
cp --sparse=always os.raw app1.raw; edit app1.raw opt/office1 20
cp --sparse=always os.raw app2.raw; edit app2.raw opt/office2 20
for v in 1 2; do qemu-img convert -f raw -O qcow2 -B os.qcow2 -F qcow2 app$v.raw app$v.qcow2; done
"$CVD" --store store layer import app1.qcow2 --kind app --parent os:1 --name office:1 >/dev/null
"$CVD" --store store layer import app2.qcow2 --kind app --parent os:1 --name office:2 >/dev/null
"$CVD" --store store desktop create alice --app office:1 >/dev/null
top=$("$CVD" --store store --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')
qemu-img convert -O raw "$top" alice.raw
edit alice.raw home/user "$CHANGED"
back=$(qemu-img info --output=json "$top" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backing-filename"])')
qemu-img convert -q -f raw -O qcow2 -B "$(dirname "$top")/$back" -F qcow2 alice.raw "$top.new"
qemu-img rebase -q -u -b "$back" -F qcow2 "$top.new"
mv "$top.new" "$top"
t0=$(now)
"$CVD" --store store --json recompose alice --app office:2 --policy merge --dry-run > plan.json
t1=$(now)
"$CVD" --store store --json recompose alice --app office:2 --policy merge > merge.json
t2=$(now)
read -r merged written wbytes fsck < <(python3 -c '
import json
r = json.load(open("merge.json")); d = r["desktops"][0]; f = d["files"][0]
print(r["merged"], f["writes"], f["bytes"], f["applied"]["fsck"])')
[ "$merged" = 1 ] || fail "the merge did not apply: $(head -c 400 merge.json)"

echo
echo "file level, cvd vs the kernel (QEMU $(qemu-img --version | head -1 | awk '{ print $3 }'), Linux $(uname -r)), best of $RUNS, $(nproc) cores ($(date -u +%Y-%m-%d))"
printf '%-58s %10s %10s %10s\n' "operation" "cvd s" "kernel s" "kernel/cvd"
printf '%-58s %10s %10s %10s\n' "---------" "-----" "--------" "----------"
printf '%-58s %10.3f %10.3f %9.2fx\n' "manifest of $nfiles files ($(calc "int($bytes / 1048576)") MiB) with SHA-256" "$best_c" "$best_k" "$(calc "$best_k / $best_c")"
echo "  kernel: qemu-storage-daemon FUSE export + loop mount (ro) + find | sha256sum; the same files and sums"
printf '%-58s %10.3f\n' "recompose --policy merge: plan (dry run, manifests)" "$(calc "$t1 - $t0")"
printf '%-58s %10.3f\n' "recompose --policy merge: apply ($written files, $wbytes bytes)" "$(calc "$t2 - $t1")"
echo "  the apply plans again, writes through the kernel's ext4, runs e2fsck -fn ($fsck) and seals the layer"
