#!/usr/bin/env bash
# Write-side benchmark, in ONE run (root; needs qemu-utils and fio):
#   writes through the mount  vdiskfs --overlay  vs  qemu-storage-daemon FUSE export of a qcow2
#                             overlay backed by the same VHD (PEERS.md's writable peer)
#     seq-write   dd bs=1M oflag=direct of 1 GiB over half-allocated data, then fsync (GB/s)
#     rand-write  fio 4 KiB random writes, 4 jobs, direct, fsync at the end (IOPS)
#   export        vdiskfs export  vs  qemu-img convert -O raw of the same VHD, target on tmpfs (s)
#
#   benches/write.sh [WORKDIR]      env: SIZE_MB (2048), FIO_SECS (8), REPS (3: medians; the
#   peers alternate run by run, since the final fsync's disk speed varies a lot on a shared VM)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-wbench}
SIZE_MB=${SIZE_MB:-2048}
FIO_SECS=${FIO_SECS:-8}
REPS=${REPS:-3}
[ "$(id -u)" = 0 ] || { echo "write.sh: run as root" >&2; exit 1; }
(cd "$root" && cargo build --release -q --bins)
V=$root/target/release/vdiskfs
mkdir -p "$W"; cd "$W"
pids=(); mnts=()
cleanup() {
  set +e
  for m in "${mnts[@]}"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null; rm -f /dev/shm/vdiskfs-wbench-*.raw
}
trap cleanup EXIT
if [ ! -f disk.vhd ]; then
  python3 - "$SIZE_MB" <<'EOF'
import os, sys
n = int(sys.argv[1]); blk = os.urandom(1 << 20)
with open("disk.raw", "wb") as f:
    f.truncate(n << 20)
    for i in range(0, n, 2):
        f.seek(i << 20); f.write(blk[i % 4093:] + blk[:i % 4093])
EOF
  qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on disk.raw disk.vhd
fi
fresh() { sync; echo 3 > /proc/sys/vm/drop_caches; cat disk.vhd > /dev/null; }

setup() { # name -> sets F
  case $1 in
    vdiskfs)
      rm -f ovl.vdk; mkdir -p m-v; mnts+=("$W/m-v")
      "$V" mount --daemon --overlay ovl.vdk disk.vhd "$W/m-v" >/dev/null
      F=$W/m-v/disk.raw ;;
    qsd-qcow2)
      rm -f ovl.qcow2; qemu-img create -q -f qcow2 -b "$W/disk.vhd" -F vpc ovl.qcow2
      F=$W/q.raw; : > "$F"; mnts+=("$F")
      qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$W/ovl.qcow2" \
        --blockdev driver=qcow2,node-name=d0,file=f0 \
        --export type=fuse,id=e0,node-name=d0,mountpoint="$F",writable=on & pids+=($!)
      for _ in $(seq 100); do [ "$(stat -c %s "$F")" -gt 0 ] && break; sleep 0.1; done ;;
  esac
}
teardown() {
  local m=${mnts[-1]}; unset 'mnts[-1]'
  fusermount3 -u "$m" 2>/dev/null || true
  if [ "${#pids[@]}" -gt 0 ]; then kill "${pids[-1]}" 2>/dev/null; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; fi
  sleep 0.5
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A S
for _ in $(seq "$REPS"); do
  for p in vdiskfs qsd-qcow2; do
    setup $p; fresh
    t0=$(date +%s.%N)
    dd if=disk.raw of="$F" bs=1M count=1024 oflag=direct conv=notrunc,fsync status=none
    t1=$(date +%s.%N)
    S[$p,seq]+="$(echo "1.073741824 / ($t1 - $t0)" | bc -l | xargs printf '%.2f') "
    teardown
    setup $p; fresh
    S[$p,rand]+="$(fio --name=w --filename="$F" --rw=randwrite --bs=4k --direct=1 --numjobs=4 --ioengine=psync \
        --runtime="$FIO_SECS" --time_based --end_fsync=1 --group_reporting --output-format=json 2>/dev/null |
      python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))') "
    teardown
  done
  tm() { local t0 t1; fresh; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l | xargs printf '%.2f'; }
  S[export]+="$(tm "$V" export --quiet --no-state disk.vhd /dev/shm/vdiskfs-wbench-e.raw) "; rm -f /dev/shm/vdiskfs-wbench-e.raw
  S[convert]+="$(tm qemu-img convert -f vpc -O raw disk.vhd /dev/shm/vdiskfs-wbench-c.raw) "; rm -f /dev/shm/vdiskfs-wbench-c.raw
done
declare -A R
for k in "${!S[@]}"; do R[$k]=$(echo "${S[$k]}" | tr ' ' '\n' | grep . | median); done

echo
echo "vdiskfs write benchmark: ${SIZE_MB} MiB VHD, half allocated; $(nproc) cores; $(uname -r); $(date -u +%F); medians of $REPS"
for k in vdiskfs,seq qsd-qcow2,seq vdiskfs,rand qsd-qcow2,rand export convert; do echo "  runs $k: ${S[$k]}"; done
printf '%-12s %12s %12s\n' "" "seq GB/s" "rand4k IOPS"
for p in vdiskfs qsd-qcow2; do printf '%-12s %12s %12s\n' "$p" "${R[$p,seq]}" "${R[$p,rand]}"; done
echo "ratios vdiskfs / qsd-qcow2: seq $(echo "${R[vdiskfs,seq]} / ${R[qsd-qcow2,seq]}" | bc -l | xargs printf '%.2f'), rand4k $(echo "${R[vdiskfs,rand]} / ${R[qsd-qcow2,rand]}" | bc -l | xargs printf '%.2f')"
echo "export: vdiskfs export ${R[export]} s, qemu-img convert ${R[convert]} s (ratio $(echo "${R[export]} / ${R[convert]}" | bc -l | xargs printf '%.2f'))"
