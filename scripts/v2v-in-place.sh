#!/usr/bin/env bash
# Manual end-to-end check (too slow for CI: debootstrap + two TCG appliance runs, ~10 minutes):
# a small Debian guest built with debootstrap, stored as a VHD, mounted by vdiskfs with an
# overlay, converted by `virt-v2v-in-place`, then exported; the sources must be unchanged.
#   scripts/v2v-in-place.sh [WORKDIR]     (root; needs debootstrap, guestfish, virt-v2v)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-v2v}
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
V=$root/target/release/vdiskfs
FX=$root/target/release/vdiskfs-fixture
(cd "$root" && cargo build --release -q --bins && cargo build --release -q -p vdiskfs-testkit)
mkdir -p "$W"; cd "$W"
if [ ! -f guest.raw ]; then
  echo "== debootstrap a minimal Debian guest"
  rm -rf rootfs; mkdir rootfs
  debootstrap --variant=minbase --include=linux-image-amd64,grub-pc,initramfs-tools,systemd-sysv,udev,kmod \
    bookworm rootfs "$("$root/scripts/debian-mirror.sh" bookworm)" >/dev/null
  echo "guest" > rootfs/etc/hostname
  printf '/dev/xvda1 / ext4 defaults 0 1\n' > rootfs/etc/fstab   # as under Xen
  truncate -s 2G guest.raw
  echo 'start=2048, type=83, bootable' | sfdisk -q --label dos guest.raw
  mkfs.ext4 -q -F -d rootfs fs.img 2093056k
  dd if=fs.img of=guest.raw bs=1M seek=1 conv=notrunc status=none
  rm -f fs.img
  echo "== install the bootloader with libguestfs"
  guestfish -a guest.raw -i <<'GF'
command "grub-install --target=i386-pc /dev/sda"
command "update-grub"
GF
fi
"$FX" vhd --from guest.raw guest.vhd
sha1sum guest.vhd > sources.sha1
rm -f fixups.ovl; mkdir -p mnt
"$V" mount --daemon --overlay fixups.ovl --log-file vdiskfs.log guest.vhd "$W/mnt"
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || true' EXIT
echo "== virt-v2v-in-place on the mounted, overlaid disk"
time virt-v2v-in-place -i disk "$W/mnt/guest.raw"
fusermount3 -u "$W/mnt"; sleep 1
echo "== the fixes are in the overlay; the source is unchanged"
sha1sum -c sources.sha1
"$V" export --verify --overlay fixups.ovl guest.vhd converted.raw
fstab=$(guestfish --ro -a converted.raw -i cat /etc/fstab)
echo "$fstab"
# virt-v2v renames Xen disks (xvda) to virtio (vda): the conversion really was written.
echo "$fstab" | grep -q '^/dev/vda1 ' || { echo "FAIL: fstab was not converted" >&2; exit 1; }
ls -ls fixups.ovl
echo "OK: virt-v2v-in-place converted the guest through the overlay; the source is unchanged"
