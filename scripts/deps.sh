#!/usr/bin/env bash
# Installs what cvd's tests, demo and benchmarks need on a fresh Debian machine, with
# apt-get, only when something is missing. Idempotent; prints nothing when all is there.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img            || need+=(qemu-utils)
have qemu-system-x86_64  || need+=(qemu-system-x86)
have libvirtd            || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
have virsh               || need+=(libvirt-clients)
have isoinfo             || need+=(genisoimage)
have tini                || need+=(tini)
have rsync               || need+=(rsync)
have cpio                || need+=(cpio)
have xz                  || need+=(xz-utils)
# File-level reading is checked against mkfs.ext4 -d, e2fsck and a loop mount.
PATH="$PATH:/usr/sbin:/sbin" have mkfs.ext4 || need+=(e2fsprogs)
PATH="$PATH:/usr/sbin:/sbin" have mount     || need+=(mount)
PATH="$PATH:/usr/sbin:/sbin" have losetup   || need+=(mount)
# FAT32 (EFI system partitions) is checked against mkfs.vfat and mtools' mcopy.
PATH="$PATH:/usr/sbin:/sbin" have mkfs.vfat || need+=(dosfstools)
have mcopy               || need+=(mtools)
# File-level merges write through qemu-storage-daemon's FUSE export and a loop mount.
have qemu-storage-daemon || need+=(qemu-system-common)
# The load test puts its servers behind a real round-robin proxy.
have haproxy             || need+=(haproxy)
# The catalog tests run against a private PostgreSQL cluster (initdb, postgres).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# libvirtd looks this user up before it reads qemu.conf.
id libvirt-qemu >/dev/null 2>&1 || useradd -r -M -s /usr/sbin/nologin libvirt-qemu 2>/dev/null || true
