#!/usr/bin/env bash
# A/B read benchmark of two vdiskfs binaries on the same images, interleaved in one run, so a
# refactor can show that no read path got slower (this VM's speed varies ±30% between runs; the
# ratio of interleaved medians does not).
#
#   benches/ab.sh OLD_VDISKFS NEW_VDISKFS [WORKDIR]      (root; needs qemu-img, fio)
#
# Images: the 2 GiB half-allocated disk of compare.sh as VHD, VHDX and VMDK (qemu-img) and a
# 16-layer VHD chain (vdiskfs-fixture). For each image and each binary, REPS times, interleaved:
#   seq-buf  dd bs=1M buffered (GB/s)     seq-dio  dd bs=1M iflag=direct (GB/s)
#   rand4k   fio 4 KiB random reads, 4 jobs, direct, FIO_SECS seconds (IOPS)
# Prints the medians and NEW/OLD.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: benches/ab.sh OLD_VDISKFS NEW_VDISKFS [WORKDIR]" >&2; exit 2; }
OLD=$(realpath "$1")
NEW=$(realpath "$2")
root=$(cd "$(dirname "$0")/.." && pwd)
W=${3:-/tmp/vdiskfs-bench}
SIZE_MB=${SIZE_MB:-2048}
REPS=${REPS:-5}
FIO_SECS=${FIO_SECS:-5}
[ "$(id -u)" = 0 ] || { echo "ab.sh: run as root (drop_caches, mounts)" >&2; exit 1; }
for t in qemu-img fio fusermount3; do command -v $t >/dev/null || { echo "ab.sh: $t is missing" >&2; exit 1; }; done
(cd "$root" && cargo build --release -q -p vdiskfs-testkit)
FX=$root/target/release/vdiskfs-fixture

mkdir -p "$W"
cd "$W"
mnts=()
cleanup() {
  set +e
  for m in "${mnts[@]}"; do fusermount3 -u "$m" 2>/dev/null; done
}
trap cleanup EXIT

if [ ! -f disk.raw ] || [ "$(stat -c %s disk.raw)" != $((SIZE_MB << 20)) ]; then
  echo "building a ${SIZE_MB} MiB disk, half allocated ..." >&2
  rm -rf disk.* chain16
  python3 - "$SIZE_MB" <<'EOF'
import os, sys
n = int(sys.argv[1])
blk = os.urandom(1 << 20)
with open("disk.raw", "wb") as f:
    f.truncate(n << 20)
    for i in range(0, n, 2):
        f.seek(i << 20)
        f.write(blk[i % 4093:] + blk[:i % 4093])
EOF
  qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on disk.raw disk.vhd
  qemu-img convert -f raw -O vhdx -o subformat=dynamic disk.raw disk.vhdx
  qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse disk.raw disk.vmdk
fi
[ -d chain16 ] || "$FX" chain --layers 16 --from disk.raw chain16 >/dev/null
top16=$(ls chain16/*.vhd | sort | tail -1)

declare -A IMG=([vhd]=disk.vhd [vhdx]=disk.vhdx [vmdk]=disk.vmdk [chain16]="$top16")
declare -A R
warm() { cat $1 >/dev/null; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

measure() { # BIN NAME IMAGE
  local bin=$1 name=$2 img=$3
  local m=$W/ab-$name
  mkdir -p "$m"
  "$bin" mount --daemon "$img" "$m" >/dev/null
  mnts+=("$m")
  local f
  f=$(ls "$m"/*.raw)
  drop
  if [[ $img == */* ]]; then warm "${img%/*}/*.vhd"; else warm "$img"; fi
  local t0 t1
  t0=$(date +%s.%N); dd if="$f" of=/dev/null bs=1M status=none; t1=$(date +%s.%N)
  R[$name,buf]+="$(echo "$SIZE_MB/1024/($t1-$t0)" | bc -l) "
  t0=$(date +%s.%N); dd if="$f" of=/dev/null bs=1M iflag=direct status=none; t1=$(date +%s.%N)
  R[$name,dio]+="$(echo "$SIZE_MB/1024/($t1-$t0)" | bc -l) "
  local iops
  iops=$(fio --name=r --filename="$f" --rw=randread --bs=4k --direct=1 --numjobs=4 --time_based \
    --runtime="$FIO_SECS" --group_reporting --readonly --output-format=json | python3 -c \
    'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  R[$name,r4k]+="$iops "
  fusermount3 -u "$m"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for rep in $(seq "$REPS"); do
  for k in "${!IMG[@]}"; do
    for side in old new; do
      bin=$OLD; [ $side = new ] && bin=$NEW
      measure "$bin" "$k-$side" "${IMG[$k]}"
    done
  done
  echo "rep $rep done" >&2
done

printf '%-9s %-8s %10s %10s %8s\n' image measure old new new/old
for k in vhd vhdx vmdk chain16; do
  for m in buf dio r4k; do
    o=$(echo "${R[$k-old,$m]}" | median)
    n=$(echo "${R[$k-new,$m]}" | median)
    printf '%-9s %-8s %10.2f %10.2f %8.2f\n' "$k" "$m" "$o" "$n" "$(echo "$n/$o" | bc -l)"
  done
done
