#!/usr/bin/env bash
# A/B CPU cost of two vdiskfs binaries' read paths, in instructions, not seconds: each daemon runs
# under `valgrind --tool=callgrind` while dd reads the mounted raw file once, and the daemon's
# user-space instruction total is compared. Unlike timings (benches/ab.sh), the count does not
# move with the machine's load, so it can show "no read path got more expensive" on a busy host.
# It does not see the kernel's FUSE work or I/O waits; read both scripts' results together.
#
#   benches/ab-instr.sh OLD_VDISKFS NEW_VDISKFS [WORKDIR]   (root; needs valgrind, qemu-img)
#
# Images: the first MB_READ MiB (default 256) of ab.sh's disk.{vhd,vhdx,vmdk} and chain16 (run
# ab.sh once first, or point WORKDIR at its directory). dd bs=1M iflag=direct, so every byte is
# a FUSE read.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: benches/ab-instr.sh OLD_VDISKFS NEW_VDISKFS [WORKDIR]" >&2; exit 2; }
OLD=$(realpath "$1")
NEW=$(realpath "$2")
W=${3:-/tmp/vdiskfs-bench}
MB_READ=${MB_READ:-256}
command -v valgrind >/dev/null || { echo "ab-instr.sh: valgrind is missing" >&2; exit 1; }
cd "$W"
[ -f disk.vhd ] || { echo "ab-instr.sh: no images in $W; run benches/ab.sh first" >&2; exit 1; }
top16=$(ls chain16/*.vhd | sort | tail -1)
declare -A IMG=([vhd]=disk.vhd [vhdx]=disk.vhdx [vmdk]=disk.vmdk [chain16]="$top16")

# count BIN IMAGE -> the daemon's total instructions for one read of the first MB_READ MiB
count() {
  local bin=$1 img=$2 mnt out
  mnt=$(mktemp -d "$W/instr-mnt.XXXX")
  out=$(mktemp "$W/instr-out.XXXX")
  valgrind --tool=callgrind --callgrind-out-file="$out" -q "$bin" mount "$img" "$mnt" >/dev/null 2>&1 &
  local pid=$!
  local stem
  stem=$(basename "${img%.*}")
  for _ in $(seq 600); do [ -e "$mnt/$stem.raw" ] && break; sleep 0.1; done
  [ -e "$mnt/$stem.raw" ] || { echo "ab-instr.sh: $bin did not mount $img" >&2; kill $pid; exit 1; }
  dd if="$mnt/$stem.raw" of=/dev/null bs=1M count="$MB_READ" iflag=direct status=none
  fusermount3 -u "$mnt"
  wait $pid || true
  rmdir "$mnt"
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
  rm -f "$out"
}

printf '%-8s %16s %16s %9s\n' image old_instr new_instr new/old
for k in ${ONLY:-vhd vhdx vmdk chain16}; do
  o=$(count "$OLD" "${IMG[$k]}")
  n=$(count "$NEW" "${IMG[$k]}")
  printf '%-8s %16s %16s %9s\n' "$k" "$o" "$n" "$(echo "scale=3; $n / $o" | bc)"
done
