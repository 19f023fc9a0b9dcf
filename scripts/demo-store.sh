#!/usr/bin/env bash
# make demo, the layer store part (called by scripts/demo.sh with CVD and DEMO set;
# it reuses base.qcow2 and app.qcow2 that the first part made in $DEMO).
#
# Import a base and an app layer into a store (content IDs), show that the same
# content keeps its ID (re-import, qemu-img convert), create a desktop on them, make
# 100 linked clones with their identities and seed images, seal a clone's changes as
# a new layer, show what depends on what, and verify, check and collect garbage.
# QEMU and isoinfo confirm the results.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
export CVD_STORE="$DEMO/store"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
fail() { echo "demo-store: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-store: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$DEMO"
rm -rf "$CVD_STORE"
[ -f base.qcow2 ] && [ -f app.qcow2 ] || fail "base.qcow2 and app.qcow2 are made by the first part of the demo"

step "Import the base into the store (CVD_STORE=$CVD_STORE): its ID is a digest of its content"
base=$(cvd layer import base.qcow2 --kind base --name win11:2026-11 | tail -1)
echo "base layer: $base"

step "Import the app layer on it (app.qcow2's backing file is outside the store: name the parent)"
app=$(cvd layer import app.qcow2 --kind app --parent win11:2026-11 --name office:2026 | tail -1)
echo "app layer: $app"

step "Same content, same ID: a re-import copies nothing, and so does a qemu-img convert of the base"
again=$(cvd layer import base.qcow2 --kind base | tail -1)
[ "$again" = "$base" ] || fail "re-import gave $again"
if command -v qemu-img >/dev/null; then
  run qemu-img convert -O qcow2 -c base.qcow2 base-converted.qcow2
  conv=$(cvd layer import base-converted.qcow2 --kind base | tail -1)
  [ "$conv" = "$base" ] || fail "converted base gave $conv"
  echo "converted (compressed) base: same ID $conv"
fi
cvd layer ls

step "A desktop: base + app, its own delta, and a blank 20 GiB user disk"
cvd desktop create alice --base win11:2026-11 --app office:2026 --user-size 20G

step "100 linked clones of the desktop: a small top each, plus a UUID, a MAC, a hostname and a seed image"
cvd clone alice --name alice-vm --count 100
cvd clone ls 'alice-vm-00*'
cvd clone show alice-vm-042

step "Each clone stands on the whole sealed chain, with relative backing names and formats recorded"
top="$CVD_STORE/clones/alice-vm-042.qcow2"
if command -v qemu-img >/dev/null; then
  run qemu-img info --backing-chain "$top" | grep -E '^(image|file format|backing file|backing file format):'
  run qemu-img check -q "$top" && echo "qemu-img check: clean"
  run qemu-img compare "$top" "$CVD_STORE/layers/$app.qcow2"
fi
if command -v isoinfo >/dev/null; then
  seed="$CVD_STORE/clones/alice-vm-042.seed.iso"
  run isoinfo -d -i "$seed" | grep -E 'Volume id|Rock Ridge|Joliet'
  run isoinfo -R -f -i "$seed"
  run isoinfo -R -i "$seed" -x /meta-data
  run isoinfo -R -i "$seed" -x /user-data
fi
run du -sh "$CVD_STORE/layers" "$CVD_STORE/clones"

step "Patch one clone and seal its changes as a new version layer on the app layer"
printf 'patched by the administrator' | cvd disk write --allow-root "$CVD_STORE" "$top" 200M -
patched=$(cvd layer seal alice-vm-042 --name office:2026-patched | tail -1)
cvd layer show office:2026-patched

step "A layer that something depends on cannot be removed: cvd names the dependents"
if "$CVD" layer rm win11:2026-11; then fail "the base was removed"; fi

step "Verify recomputes every ID from the files; the store check compares records and files"
cvd layer verify
cvd store check
cvd store info

step "cvd never writes a sealed layer, also as root; tampering behind its back (QEMU here, on a copy of the store) is caught"
if printf 'tampered' | "$CVD" disk write "$CVD_STORE/layers/$app.qcow2" 33M -; then fail "cvd wrote a sealed layer"; fi
cp -a "$CVD_STORE" "$DEMO/store-tampered"
chmod u+w "$DEMO/store-tampered/layers/$app.qcow2"
run qemu-io -f qcow2 -c "write -P 0x55 33M 64k" "$DEMO/store-tampered/layers/$app.qcow2"
if "$CVD" --store "$DEMO/store-tampered" layer verify; then fail "tampering not caught"; fi
rm -rf "$DEMO/store-tampered"

step "Remove clones alice-vm-001 … 089 and the sealed patch's name; gc removes only what nothing keeps"
cvd clone rm 'alice-vm-0[0-8]*'
cvd layer untag office:2026-patched
cvd gc --dry-run
cvd gc
cvd layer ls
cvd store check
