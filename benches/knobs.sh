#!/usr/bin/env bash
# Sweep of vdiskfs mount knobs (FUSE threads x readahead) on one image: buffered and O_DIRECT
# sequential reads and qemu-img convert time. Run after benches/compare.sh (uses its images).
#   benches/knobs.sh [WORKDIR] [IMAGE]     (root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-bench}
IMG=${2:-$W/disk.vhd}
V=$root/target/release/vdiskfs
M=$W/m-knobs; mkdir -p "$M"
name=$(basename "${IMG%.*}").raw
fresh() { sync; echo 3 > /proc/sys/vm/drop_caches; cat "$IMG" > /dev/null; }
gbps() { awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i+1); printf "%.2f\n", $1 / s / 1e9 }'; }
printf '%-8s %-12s %8s %8s %9s\n' threads readahead seq-buf seq-dio convert
for th in 2 4 8; do
  for ra in 128 1024 4096; do
    "$V" mount --daemon --threads "$th" --readahead-kb "$ra" "$IMG" "$M" >/dev/null
    fresh; b=$(dd if="$M/$name" of=/dev/null bs=1M 2>&1 | gbps)
    fresh; d=$(dd if="$M/$name" of=/dev/null bs=1M iflag=direct 2>&1 | gbps)
    fresh; t0=$(date +%s.%N); qemu-img convert -f raw -O raw "$M/$name" /dev/shm/knobs.raw; t1=$(date +%s.%N)
    rm -f /dev/shm/knobs.raw
    printf '%-8s %-12s %8s %8s %9.2f\n' "$th" "${ra}KiB" "$b" "$d" "$(echo "$t1 - $t0" | bc -l)"
    fusermount3 -u "$M"; sleep 0.3
  done
done
