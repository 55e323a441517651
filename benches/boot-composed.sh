#!/usr/bin/env bash
# Manual end-to-end boot check of a composed disk (too slow for CI: debootstrap and two boots
# under TCG, 10-20 minutes). It follows seed 000 (xen-tools guests):
#   1. a small Debian guest as a xen-tools host keeps it: one volume per partition, root (ext4)
#      and swap, no partition table, no bootloader on any disk; prepared "while still on Xen"
#      with a kernel, grub-pc, an fstab by UUID and a serial console;
#   2. vdiskfs composes the volumes into one MBR disk (root bootable, swap type 82) with an
#      overlay, and qemu boots the guest's own kernel and initrd (-kernel/-initrd/-append) on
#      it once, to run `grub-install /dev/vda && update-grub` inside the guest: the bootloader
#      goes to the MBR and its gap, and /boot/grub into partition 1, all through the overlay;
#   3. qemu boots the composed disk from its MBR (SeaBIOS, GRUB) to a login prompt;
#   4. the source volumes are unchanged, and `vdiskfs export --overlay` writes the bootable
#      disk out.
#   benches/boot-composed.sh [WORKDIR]   (root; needs debootstrap, qemu-system-x86, fuse3)
# Environment: BOOT_TIMEOUT (seconds per boot, default 1200), MEM (MiB, default 1024), ACCEL
# (tcg by default; kvm where nested virtualisation really works).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-boot}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1200}
MEM=${MEM:-1024}
V=$root/target/release/vdiskfs
(cd "$root" && cargo build --release -q --bins)
mkdir -p "$W"; cd "$W"
accel=${ACCEL:-tcg}
cpu=max
[ "$accel" = kvm ] && cpu=host

if [ ! -f root.img ]; then
  echo "== debootstrap a minimal Debian guest"
  rm -rf rootfs; mkdir rootfs
  debootstrap --variant=minbase \
    --include=linux-image-amd64,grub-pc,initramfs-tools,systemd-sysv,udev,kmod,e2fsprogs \
    bookworm rootfs "$("$root/scripts/debian-mirror.sh" bookworm)" >/dev/null
  echo guest > rootfs/etc/hostname
  echo 'root:vdiskfs' | chroot rootfs chpasswd
  root_uuid=$(cat /proc/sys/kernel/random/uuid)
  swap_uuid=$(cat /proc/sys/kernel/random/uuid)
  # As the seed prepares the guest on Xen: fstab by UUID, a serial console for GRUB and Linux.
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\nUUID=%s none swap sw 0 0\n' "$root_uuid" "$swap_uuid" \
    > rootfs/etc/fstab
  cat >> rootfs/etc/default/grub <<'EOF'
GRUB_CMDLINE_LINUX="console=ttyS0,115200"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_TIMEOUT=1
EOF
  # The first boot's init: install GRUB on the disk the guest now sees whole, then power off.
  cat > rootfs/usr/local/sbin/vdiskfs-firstboot <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
grub-install --target=i386-pc /dev/vda && update-grub
echo "FIRSTBOOT-RESULT: $?"
sync; echo o > /proc/sysrq-trigger; sleep 60
EOF
  chmod +x rootfs/usr/local/sbin/vdiskfs-firstboot
  cp rootfs/boot/vmlinuz-* vmlinuz; cp rootfs/boot/initrd.img-* initrd.img
  mkfs.ext4 -q -F -U "$root_uuid" -d rootfs root.img 1536M
  truncate -s 256M swap.img; mkswap -q -U "$swap_uuid" swap.img
  rm -rf rootfs
fi
sha1sum root.img swap.img > sources.sha1

compose=(--compose mbr --bootable 1 --part-type 2=swap raw:"$W/root.img" raw:"$W/swap.img")
rm -f boot.ovl; mkdir -p mnt
"$V" mount --daemon --overlay "$W/boot.ovl" --log-file "$W/vdiskfs.log" "${compose[@]}" "$W/mnt"
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || true' EXIT
sfdisk -l mnt/disk.raw

qemu=(timeout "$BOOT_TIMEOUT" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m "$MEM" -nographic -no-reboot
  -drive file="$W/mnt/disk.raw",format=raw,if=virtio)

echo "== boot 1: the guest's own kernel and initrd, grub-install inside the guest (accel $accel)"
t0=$(date +%s)
"${qemu[@]}" -kernel vmlinuz -initrd initrd.img \
  -append "root=/dev/vda1 rw console=ttyS0 init=/usr/local/sbin/vdiskfs-firstboot" </dev/null | tee boot1.log |
  grep --line-buffered -E 'FIRSTBOOT|Installation finished|error' || true
grep -q 'FIRSTBOOT-RESULT: 0' boot1.log || { echo "FAIL: grub-install in the guest failed (boot1.log)" >&2; exit 1; }
echo "   $(( $(date +%s) - t0 )) s"
head -c 440 mnt/disk.raw | grep -qa GRUB || { echo "FAIL: no GRUB in the MBR" >&2; exit 1; }

echo "== boot 2: from the MBR (SeaBIOS → GRUB → Linux) to a login prompt"
t0=$(date +%s)
# Watches the serial console for the login prompt (a line without its newline), then ends qemu.
"${qemu[@]}" </dev/null >boot2.log 2>&1 &
qpid=$!
while kill -0 "$qpid" 2>/dev/null; do
  if grep -q 'guest login:' boot2.log; then
    echo "   login prompt after $(( $(date +%s) - t0 )) s"
    kill "$qpid"
    break
  fi
  sleep 2
done
wait "$qpid" 2>/dev/null || true
grep -q 'guest login:' boot2.log || { echo "FAIL: no login prompt (boot2.log)" >&2; exit 1; }

fusermount3 -u "$W/mnt"; sleep 1
echo "== the sources are unchanged; the bootloader lives in the overlay"
sha1sum -c sources.sha1
ls -ls boot.ovl
rm -f kvm-disk.raw
"$V" export --quiet --verify --overlay "$W/boot.ovl" "${compose[@]}" "$W/kvm-disk.raw"
echo "OK: the composed disk booted to a login prompt after grub-install through the overlay;"
echo "    $W/kvm-disk.raw is the bootable disk, the volumes are untouched"
