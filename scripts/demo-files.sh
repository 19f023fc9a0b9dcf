#!/usr/bin/env bash
# make demo, the file-level part (called by scripts/demo.sh with CVD and DEMO set; runs
# on its own too, as root: CVD=bin/cvd DEMO=.cache/demo scripts/demo-files.sh).
#
# A desktop that has run always collides with a new app layer at block level: every
# boot writes the ext4 superblock, bitmaps and journal. Here such a desktop (its files
# written through the kernel's ext4, as a guest writes them) meets a new app layer:
# --policy force is refused with the metadata named; --policy merge moves it by files
# (the rules decide where both changed a path) and e2fsck -fn is clean. Then two
# devices change the same user disk from one version: the second check-in is merged by
# the seed's Table 1, a conflicting file kept as a conflicted copy.
set -euo pipefail

: "${CVD:?set CVD to the cvd binary}" "${DEMO:?set DEMO to the demo directory}"
F="$DEMO/files"
SERVER="$F/server"
export PATH="$PATH:/usr/sbin:/sbin"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cvd() { printf '$ cvd %s\n' "$*"; "$CVD" "$@"; }
run() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "demo-files: FAILED: $*" >&2; exit 1; }
trap 'echo "demo-files: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
[ "$(id -u)" = 0 ] || fail "the file-level part loop-mounts: run it as root"
for t in mkfs.ext4 e2fsck losetup mount qemu-storage-daemon qemu-img; do
  command -v "$t" >/dev/null || fail "$t is needed (scripts/deps.sh installs it)"
done

srv_pid=""
mnt=""
cleanup() {
  [ -n "$mnt" ] && mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null
  true
}
trap cleanup EXIT

rm -rf "$F"
mkdir -p "$F/tree/etc" "$F/tree/home/user" "$F/mnt"
cd "$F"
mnt="$F/mnt"

# edit RAW FILE=CONTENT... -PATH...: files written and removed through a loop mount.
edit() {
  local raw=$1
  shift
  mount -o loop "$raw" "$mnt"
  for a in "$@"; do
    case "$a" in
    -*) rm -f "$mnt${a#-}" ;;
    *) mkdir -p "$(dirname "$mnt${a%%=*}")" && printf '%s\n' "${a#*=}" > "$mnt${a%%=*}" ;;
    esac
  done
  umount "$mnt"
}
# onto RAW TOP: the top holds what RAW differs in from the top's backing file.
onto() {
  local back
  back=$(qemu-img info --output=json "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backing-filename"])')
  qemu-img convert -q -f raw -O qcow2 -B "$(dirname "$2")/$back" -F qcow2 "$1" "$2.new"
  qemu-img rebase -q -u -b "$back" -F qcow2 "$2.new"
  mv "$2.new" "$2"
}

step "os:1 (ext4), and app:1 and app:2 built on it by the administrator"
echo desk > tree/etc/hostname
mkfs.ext4 -q -F -d tree os.raw 128M >/dev/null
qemu-img convert -f raw -O qcow2 os.raw os.qcow2
for v in 1 2; do
  cp --sparse=always os.raw app$v.raw
done
edit app1.raw "/opt/office/bin=office 1" "/etc/office.conf=office 1 settings" "/opt/office/legacy.txt=legacy"
edit app2.raw "/opt/office/bin=office 2" "/etc/office.conf=office 2 settings" "/opt/office/legacy.txt=legacy" \
  "/opt/office/new-in-2.txt=new" "/home/user/.officerc=office 2 defaults"
for v in 1 2; do qemu-img convert -f raw -O qcow2 -B os.qcow2 -F qcow2 app$v.raw app$v.qcow2; done
"$CVD" --store "$SERVER" layer import os.qcow2 --kind base --name os:1 >/dev/null
"$CVD" --store "$SERVER" layer import app1.qcow2 --kind app --parent os:1 --name office:1 >/dev/null
"$CVD" --store "$SERVER" layer import app2.qcow2 --kind app --parent os:1 --name office:2 >/dev/null
cvd --store "$SERVER" layer ls

step "alice on office:1 ran: its files written through the kernel's ext4, as its guest did"
"$CVD" --store "$SERVER" desktop create alice --app office:1 >/dev/null
TOP=$("$CVD" --store "$SERVER" --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')
qemu-img convert -O raw "$TOP" alice.raw
edit alice.raw "/home/user/thesis.txt=chapter one" "/etc/office.conf=alice's settings" \
  "/home/user/.officerc=alice's own settings" -/opt/office/legacy.txt
onto alice.raw "$TOP"

step "force is refused: the collisions hold ext4 metadata"
if "$CVD" --store "$SERVER" recompose alice --app office:2 --policy force --dry-run > force.out; then
  fail "policy force was not refused"
fi
grep -E 'of which file-system metadata|force refused' force.out

step "merge: alice's own file changes onto office:2 (the rules: /home is the user's, the rest the system's)"
cvd --store "$SERVER" recompose alice --app office:2 --policy merge --dry-run
cvd --store "$SERVER" recompose alice --app office:2 --policy merge
TOP=$("$CVD" --store "$SERVER" --json desktop show alice | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_path"])')
qemu-img convert -O raw "$TOP" merged.raw
run e2fsck -fn merged.raw
cvd --store "$SERVER" desktop files alice | grep -E '/opt/office|/home/user|office.conf'
"$CVD" --store "$SERVER" desktop files alice --json | python3 -c '
import json, sys, hashlib
files = {e["path"]: e.get("sha256", "") for e in json.load(sys.stdin)[0]["files"]}
want = {"/opt/office/bin": "office 2", "/opt/office/new-in-2.txt": "new", "/etc/office.conf": "office 2 settings",
        "/home/user/thesis.txt": "chapter one", "/home/user/.officerc": "alice'"'"'s own settings"}
for p, s in want.items():
    assert files.get(p) == hashlib.sha256((s + "\n").encode()).hexdigest(), p
assert "/opt/office/legacy.txt" not in files
print("the new app'"'"'s files, alice'"'"'s own, the layer'"'"'s /etc and alice'"'"'s /home where both changed: as the rules say")'

step "Two devices change alice's user disk from one version"
mkdir -p utree/home/user
for n in report plan notes; do echo "v1 of $n" > "utree/home/user/$n.txt"; done
mkfs.ext4 -q -F -d utree user.raw 64M >/dev/null
qemu-img convert -f raw -O qcow2 user.raw user.qcow2
"$CVD" --store "$SERVER" layer import user.qcow2 --kind base --name alice-home:1 >/dev/null
"$CVD" --store "$SERVER" desktop create bob --app office:2 --user-layer alice-home:1 >/dev/null
TA=$("$CVD" --store "$SERVER" device add bob-laptop --desktop bob 2>/dev/null)
TB=$("$CVD" --store "$SERVER" device add bob-pc --desktop bob 2>/dev/null)
"$CVD" --store "$SERVER" serve --listen 127.0.0.1:0 > serve.out 2> serve.log &
srv_pid=$!
for _ in $(seq 50); do grep -q 'cvd serve:' serve.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.*\(http:\/\/[0-9.:]*\).*/\1/p' serve.out | head -n1)
[ -n "$URL" ] || fail "cvd serve did not start: $(cat serve.log)"
cvd --store "$F/a" open bob --server "$URL" --token "$TA" >/dev/null
cvd --store "$F/b" follow bob --server "$URL" --token "$TB" >/dev/null
for dev in a b; do
  qemu-img convert -O raw "$F/$dev/desktops/bob.user.qcow2" "user-$dev.raw"
done
echo "the laptop changes report and plan and adds slides; the PC changes report otherwise and removes notes"
edit user-a.raw "/home/user/report.txt=the laptop's report" "/home/user/plan.txt=the laptop's plan" "/home/user/slides.txt=slides"
edit user-b.raw "/home/user/report.txt=the PC's report" -/home/user/notes.txt
onto user-a.raw "$F/a/desktops/bob.user.qcow2"
onto user-b.raw "$F/b/desktops/bob.user.qcow2"
cvd --store "$F/a" checkin bob >/dev/null
echo '$ cvd --store b checkin bob --user-only --json'
"$CVD" --store "$F/b" --json checkin bob --user-only > merge.json
python3 -c '
import json
r = json.load(open("merge.json"))["merge"]
for x in r["resolutions"]:
    print("  %-26s %-36s %s %s" % (x["path"], x["case"], x["action"], x.get("copy", "")))
print("  merged version", r["version"], "- e2fsck:", r["fsck"][0])'
cvd --store "$SERVER" desktop files bob --disk user | grep /home/user/
qemu-img convert -O raw "$("$CVD" --store "$SERVER" --json desktop show bob | python3 -c 'import json,sys; print(json.load(sys.stdin)["user_path"])')" umerged.raw
run e2fsck -fn umerged.raw
cvd --store "$SERVER" desktop versions bob
