#!/usr/bin/env bash
# Builds cvd's tiny test guest into .cache/guest/ (or $CVD_GUEST_DIR): a Debian 12 kernel
# and a busybox initramfs whose /init is guest/init (read it for the kernel command line
# the guest understands). Nothing is installed on the host: the two Debian packages are
# fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
#
# Outputs:
#   vmlinux or bzImage   the kernel: the uncompressed ELF (boots about twice as fast
#                        under TCG) when the xz payload of the bzImage could be
#                        extracted, else the bzImage itself
#   kernel               symlink to whichever of the two exists: boot this
#   initramfs.cpio.gz    busybox, /init and the modules listed below
#   cmdline              a base kernel command line (serial console on ttyS0)
#   versions             the Debian packages used
#
# Idempotent: when the outputs exist and were built from the same guest/init, this
# script and the same packages, it does nothing (and needs no network). The downloaded
# packages are kept in debs/; delete the directory to start over. Set
# CVD_GUEST_KERNEL=linux-image-6.1.0-N-amd64 to choose the kernel package.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${CVD_GUEST_DIR:-$root/.cache/guest}
init=$root/guest/init
# Modules the guest loads, in load order (dependencies first): virtio block devices,
# ISO9660 for the seed, evdev and the ACPI button for the cvd.acpi=1 mode, ext4 (with
# its checksums) for the cvd.fs=1 mode.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
	cdrom isofs evdev button crc16 crc32c_generic mbcache jbd2 ext4)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for t in apt-get apt-cache dpkg-deb cpio gzip xz sha256sum; do
	command -v "$t" >/dev/null || die "$t not found (scripts/deps.sh installs what is needed)"
done
[ -f "$init" ] || die "$init not found"

mkdir -p "$out/debs"
exec 9>"$out/.lock"
flock 9

# The packages: reuse those already downloaded, else pick the newest installable ones.
kdeb=
if [ -n "${CVD_GUEST_KERNEL:-}" ]; then
	kdeb=$(ls "$out/debs/${CVD_GUEST_KERNEL}"_*.deb 2>/dev/null | head -n1 || true)
else
	kdeb=$(ls "$out"/debs/linux-image-6.1.0-*-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
fi
bdeb=$(ls "$out"/debs/busybox-static_*.deb 2>/dev/null | sort -V | tail -n1 || true)

stamp_of() {
	{
		sha256sum <"$0"
		sha256sum <"$init"
		basename "$1"
		basename "$2"
	} | sha256sum | cut -d' ' -f1
}

if [ -n "$kdeb" ] && [ -n "$bdeb" ] && [ -f "$out/stamp" ] && [ -e "$out/kernel" ] &&
	[ -f "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/stamp")" = "$(stamp_of "$kdeb" "$bdeb")" ]; then
	exit 0
fi

candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p'; }

if [ -z "$kdeb" ] || [ -z "$bdeb" ]; then
	kpkg=${CVD_GUEST_KERNEL:-}
	if [ -z "$kpkg" ]; then
		names() { apt-cache pkgnames linux-image-6.1.0- | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -rV; }
		if [ -z "$(names)" ] || [ -z "$(candidate busybox-static)" ] || [ "$(candidate busybox-static)" = "(none)" ]; then
			[ "$(id -u)" = 0 ] || die "no linux-image-6.1.0-*-amd64 in the apt lists; run apt-get update as root"
			log "apt-get update"
			apt-get update -qq
		fi
		for p in $(names); do
			c=$(candidate "$p")
			if [ -n "$c" ] && [ "$c" != "(none)" ]; then
				kpkg=$p
				break
			fi
		done
		[ -n "$kpkg" ] || die "no installable linux-image-6.1.0-*-amd64 package"
	fi
	log "downloading $kpkg busybox-static"
	dl=$(mktemp -d "$out/debs/.dl.XXXXXX")
	(cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static) ||
		{ rm -rf "$dl"; die "apt-get download $kpkg busybox-static failed"; }
	[ -n "$kdeb" ] || mv "$dl"/linux-image-*.deb "$out/debs/"
	[ -n "$bdeb" ] || mv "$dl"/busybox-static_*.deb "$out/debs/"
	rm -rf "$dl"
	kdeb=$(ls "$out/debs/${kpkg}"_*.deb | head -n1)
	bdeb=$(ls "$out"/debs/busybox-static_*.deb | sort -V | tail -n1)
fi

log "building from $(basename "$kdeb") and $(basename "$bdeb")"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/b"

bz=$(ls "$work"/k/boot/vmlinuz-* | head -n1)
[ -f "$bz" ] || die "no /boot/vmlinuz-* in $kdeb"
kver=${bz##*/vmlinuz-}
mods=$work/k/lib/modules/$kver/kernel

# The kernel: decompress the xz payload that follows the \xfd7zXZ magic in the bzImage.
mkdir -p "$work/out"
off=$(LC_ALL=C grep -obUa $'\xfd7zXZ' "$bz" 2>/dev/null | head -n1 | cut -d: -f1 || true)
# (xz stops at the end of its stream: a pipe from tail would die of SIGPIPE.)
if [ -n "$off" ] && xz -dc --single-stream < <(tail -c +$((off + 1)) "$bz") >"$work/out/vmlinux" 2>/dev/null &&
	[ "$(head -c 4 "$work/out/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
	ln -s vmlinux "$work/out/kernel"
else
	log "could not extract an uncompressed vmlinux; using the bzImage (slower boot under TCG)"
	rm -f "$work/out/vmlinux"
	cp "$bz" "$work/out/bzImage"
	ln -s bzImage "$work/out/kernel"
fi

# The initramfs: busybox with a link per applet, /init, the modules.
ir=$work/initramfs
mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,etc,seed,lib/modules}
cp "$work/b/bin/busybox" "$ir/bin/busybox"
for a in $("$ir/bin/busybox" --list); do
	[ "$a" = busybox ] || ln -s busybox "$ir/bin/$a"
done
for m in "${modules[@]}"; do
	f=$(find "$mods" -name "$m.ko" -print -quit)
	[ -n "$f" ] || die "module $m.ko not found in $kdeb"
	cp "$f" "$ir/lib/modules/"
done
install -m 0755 "$init" "$ir/init"
# A console node for the kernel to open before /init mounts devtmpfs.
mknod -m 600 "$ir/dev/console" c 5 1 2>/dev/null || true
(cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) | gzip -9 -n >"$work/out/initramfs.cpio.gz"

echo "console=ttyS0 quiet" >"$work/out/cmdline"
printf '%s\n%s\nkernel %s\n' "$(basename "$kdeb")" "$(basename "$bdeb")" "$kver" >"$work/out/versions"

# Move into place; the stamp last, so an interrupted build is redone.
rm -f "$out/stamp" "$out/kernel" "$out/vmlinux" "$out/bzImage"
for f in "$work"/out/*; do
	mv -f "$f" "$out/"
done
stamp_of "$kdeb" "$bdeb" >"$out/stamp"
log "done: $out/$(readlink "$out/kernel") $(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs"
