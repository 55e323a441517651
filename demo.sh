#!/usr/bin/env bash
# The main job on a sample this script makes itself: a XenServer-style VHD chain (a base disk and
# a snapshot child holding one new file), mounted as one raw file, attached to a loop device, and
# the file read from the guest filesystem inside it. Needs root (loop devices, mount).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q
cargo build --release -q -p vdiskfs-testkit   # vdiskfs-fixture, the test-image writer
bin=$PWD/target/release
work=$(mktemp -d /tmp/vdiskfs-demo.XXXXXX)
state=$work/loop-state
fsmnt=$work/guest
mnt=$work/mnt
mkdir -p "$work/root" "$fsmnt" "$mnt"

cleanup() {
  set +e
  mountpoint -q "$fsmnt" && umount "$fsmnt"
  [ -e "$mnt/child.raw" ] && VDISKFS_LOOP_STATE=$state mount-helpers/vdiskfs-loop detach "$mnt/child.raw" >/dev/null 2>&1
  mountpoint -q "$mnt" && fusermount3 -u "$mnt"
  rm -rf "$work"
}
trap cleanup EXIT

echo "== 1. A guest disk (MBR + ext4 at 1 MiB), before and after a file was written in the guest"
echo "base file from the original disk" > "$work/root/README.base"
mkfs.ext4 -q -F -b 4096 -d "$work/root" "$work/fs.img" 30M
cp "$work/fs.img" "$work/fs2.img"
echo "Hello from the snapshot layer: written after the base was taken ($(date -u +%FT%TZ))." > "$work/hello.txt"
debugfs -w -R "write $work/hello.txt hello.txt" "$work/fs2.img" >/dev/null 2>&1
truncate -s 32M "$work/base.raw"
echo 'start=2048, size=61440, type=83' | sfdisk -q --label dos "$work/base.raw"
cp "$work/base.raw" "$work/child.raw"
dd if="$work/fs.img" of="$work/base.raw" bs=1M seek=1 conv=notrunc status=none
dd if="$work/fs2.img" of="$work/child.raw" bs=1M seek=1 conv=notrunc status=none

echo "== 2. As XenServer keeps it: base.vhd + child.vhd (a differencing VHD holding only the changes)"
"$bin/vdiskfs-fixture" vhd --from "$work/base.raw" "$work/base.vhd"
"$bin/vdiskfs-fixture" diff --parent "$work/base.vhd" --old "$work/base.raw" --new "$work/child.raw" "$work/child.vhd"
ls -l "$work"/*.vhd
"$bin/vdiskfs" info "$work/child.vhd"

echo "== 3. vdiskfs mount: the whole chain as one raw file"
"$bin/vdiskfs" mount --daemon "$work/child.vhd" "$mnt"
ls -l "$mnt"

echo "== 4. Loop devices for the disk and its partition, then the guest filesystem"
VDISKFS_LOOP_STATE=$state mount-helpers/vdiskfs-loop attach "$mnt/child.raw"
part=$(VDISKFS_LOOP_STATE=$state mount-helpers/vdiskfs-loop list "$mnt/child.raw" | awk '$1=="part1"{print $2}')
mount -t ext4 -o ro,noload "$part" "$fsmnt"
ls -l "$fsmnt"
echo "--- $fsmnt/hello.txt (exists only in the child layer):"
cat "$fsmnt/hello.txt"

echo "== 5. The mounted file is byte-identical to the guest's disk"
cmp "$mnt/child.raw" "$work/child.raw" && echo "cmp: identical"
