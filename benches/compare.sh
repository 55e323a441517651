#!/usr/bin/env bash
# Side-by-side read benchmark of vdiskfs against the peers in PEERS.md, in ONE run.
#
#   benches/compare.sh [WORKDIR]        (root; needs qemu-utils, fio, libvhdi-utils, libvmdk-utils)
#
# Builds one 2 GiB disk (about half allocated: 1 MiB of data, 1 MiB hole, repeated) as VHD, VHDX
# and VMDK (qemu-img), plus a 1-layer, a 16-layer VHD chain holding the same bytes
# and a 64-layer one (vdiskfs-fixture, 1 MiB stripes round-robin over the layers). Mounts them with vdiskfs,
# qemu-storage-daemon's FUSE export, vmdkmount and vhdimount, and a minimal fuser passthrough of
# the raw file (the FUSE ceiling). Then measures, with the source files warm in the page cache
# and the mounted file's cache dropped before each measure:
#   seq-buf   dd bs=1M, buffered                      (GB/s)
#   seq-dio   dd bs=1M iflag=direct                   (GB/s)
#   rand4k    fio 4 KiB random reads, 4 jobs, direct  (IOPS)
#   convert   qemu-img convert -f raw -O raw of the mounted file to tmpfs (s);
#             "native" rows convert the image file itself with its qemu driver
# and prints absolute numbers and the ratios the targets are stated in.
# Each number is the median of REPS runs (default 3); before each run the page cache is dropped
# and only the files behind the measured mount are read back in (warming everything at once
# makes this VM's page cache churn and slows every FUSE reader alike).
# Environment: SIZE_MB (default 2048), FIO_SECS (default 8), SLOW_MB (default 256: how much of a
# slow peer (vhdimount) dd reads), REPS (3), THREADS/READAHEAD_KB (vdiskfs mount knobs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-bench}
SIZE_MB=${SIZE_MB:-2048}
FIO_SECS=${FIO_SECS:-8}
SLOW_MB=${SLOW_MB:-256}
REPS=${REPS:-3}
THREADS=${THREADS:-4}
READAHEAD_KB=${READAHEAD_KB:-1024}
OUT=/dev/shm/vdiskfs-bench-out.raw

[ "$(id -u)" = 0 ] || { echo "compare.sh: run as root (drop_caches, mounts)" >&2; exit 1; }
for t in qemu-img qemu-storage-daemon fio vhdimount vmdkmount fusermount3; do
  command -v $t >/dev/null || { echo "compare.sh: $t is missing" >&2; exit 1; }
done
(cd "$root" && cargo build --release -q --bins --example passthrough && cargo build --release -q -p vdiskfs-testkit)
V=$root/target/release/vdiskfs
FX=$root/target/release/vdiskfs-fixture
PT=$root/target/release/examples/passthrough

mkdir -p "$W"
cd "$W"
pids=()
mnts=()
cleanup() {
  set +e
  for m in "${mnts[@]}"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -f "$OUT"
}
trap cleanup EXIT

# ---- images -------------------------------------------------------------------------------
if [ ! -f disk.raw ] || [ "$(stat -c %s disk.raw)" != $((SIZE_MB << 20)) ]; then
  echo "building a ${SIZE_MB} MiB disk, half allocated ..." >&2
  rm -rf disk.* chain1 chain16 chain64
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
  "$FX" chain --layers 1 --from disk.raw chain1 >/dev/null
  "$FX" chain --layers 16 --from disk.raw chain16 >/dev/null
  "$FX" chain --layers 64 --from disk.raw chain64 >/dev/null
fi
# The files behind each row (warmed before each of its measures).
declare -A SRC=([passthrough-raw]=disk.raw [vdiskfs-vhd]=disk.vhd [vdiskfs-vhdx]=disk.vhdx [vdiskfs-vmdk]=disk.vmdk
  [vdiskfs-chain1]="chain1/*.vhd" [vdiskfs-chain16]="chain16/*.vhd" [vdiskfs-chain64]="chain64/*.vhd"
  [qsd-vhd]=disk.vhd [qsd-vhdx]=disk.vhdx [qsd-vmdk]=disk.vmdk [vmdkmount-vmdk]=disk.vmdk [vhdimount-vhd]=disk.vhd
  [native-vhd]=disk.vhd [native-vhdx]=disk.vhdx [native-vmdk]=disk.vmdk)
sources=

# ---- mounts -------------------------------------------------------------------------------
wait_file() { for _ in $(seq 100); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; return 1; }
declare -A FILE
mk() { mkdir -p "$1"; mnts+=("$W/$1"); }

mk m-pt; "$PT" disk.raw "$W/m-pt" "$THREADS" & pids+=($!); FILE[passthrough-raw]=$W/m-pt/disk.raw
wait_file "$W/m-pt/disk.raw"
# The ceiling gets the same bdi readahead vdiskfs sets for its own mounts.
echo "$READAHEAD_KB" > "/sys/class/bdi/$(awk -v m="$W/m-pt" '$5 == m { print $3 }' /proc/self/mountinfo)/read_ahead_kb"
vmount() { # name image
  mk "m-$1"
  if "$V" mount --daemon --threads "$THREADS" --readahead-kb "$READAHEAD_KB" "$2" "$W/m-$1" >/dev/null; then
    FILE[vdiskfs-$1]=$W/m-$1/$(basename "${2%.*}").raw
  else
    echo "vdiskfs cannot open $2 yet: row skipped" >&2
  fi
}
vmount vhd disk.vhd; vmount vhdx disk.vhdx; vmount vmdk disk.vmdk
vmount chain1 chain1/layer-00.vhd; vmount chain16 chain16/layer-15.vhd; vmount chain64 chain64/layer-63.vhd
qsd() { # name driver image
  local f=$W/q-$1.raw; : > "$f"; mnts+=("$f")
  qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$W/$3",read-only=on \
    --blockdev driver="$2",node-name=d0,file=f0,read-only=on \
    --export type=fuse,id=e0,node-name=d0,mountpoint="$f",writable=off & pids+=($!)
  for _ in $(seq 100); do [ "$(stat -c %s "$f")" -gt 0 ] && break; sleep 0.1; done
  FILE[qsd-$1]=$f
}
qsd vhd vpc disk.vhd; qsd vhdx vhdx disk.vhdx; qsd vmdk vmdk disk.vmdk
mk m-vmdkmount; vmdkmount disk.vmdk "$W/m-vmdkmount" >/dev/null; FILE[vmdkmount-vmdk]=$W/m-vmdkmount/vmdk1
mk m-vhdimount; vhdimount disk.vhd "$W/m-vhdimount" >/dev/null; FILE[vhdimount-vhd]=$W/m-vhdimount/vhdi1
for k in "${!FILE[@]}"; do wait_file "${FILE[$k]}"; done

# ---- measures -----------------------------------------------------------------------------
fresh() { sync; echo 3 > /proc/sys/vm/drop_caches; cat $sources > /dev/null; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
reps() { for _ in $(seq "$REPS"); do "$@"; done | median; }
gbps() { awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i+1); print $1 / s / 1e9 }'; }
seq_read() { # file [iflag] [count]
  fresh
  dd if="$1" of=/dev/null bs=1M ${2:+iflag=$2} ${3:+count=$3} 2>&1 | gbps | xargs printf "%.2f\n"
}
rand4k() {
  fresh
  fio --name=r --filename="$1" --rw=randread --bs=4k --direct=1 --numjobs=4 --ioengine=psync \
      --runtime="$FIO_SECS" --time_based --group_reporting --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
convert() { # fmt file
  fresh
  local t0 t1
  t0=$(date +%s.%N)
  qemu-img convert -f "$1" -O raw "$2" "$OUT"
  t1=$(date +%s.%N)
  rm -f "$OUT"
  echo "$t1 - $t0" | bc -l | xargs printf '%.2f\n'
}

declare -A R
rows=(passthrough-raw vdiskfs-vhd vdiskfs-vhdx vdiskfs-vmdk vdiskfs-chain1 vdiskfs-chain16 vdiskfs-chain64
      qsd-vhd qsd-vhdx qsd-vmdk vmdkmount-vmdk vhdimount-vhd)
for r in "${rows[@]}"; do
  f=${FILE[$r]:-}
  [ -n "$f" ] || continue
  echo "measuring $r ..." >&2
  sources=${SRC[$r]}
  count=
  [ "$r" = vhdimount-vhd ] && count=$SLOW_MB
  R[$r,buf]=$(reps seq_read "$f" "" "$count")
  R[$r,dio]=$(reps seq_read "$f" direct "$count")
  R[$r,rand]=$(rand4k "$f")
  if [ "$r" = vhdimount-vhd ]; then R[$r,conv]=skipped; else R[$r,conv]=$(reps convert raw "$f"); fi
done
for fmt in vhd:vpc vhdx:vhdx vmdk:vmdk; do
  sources=${SRC[native-${fmt%%:*}]}
  R[native-${fmt%%:*},conv]=$(reps convert "${fmt#*:}" "disk.${fmt%%:*}")
done

# ---- report -------------------------------------------------------------------------------
ratio() { if [ -n "${1:-}" ] && [ -n "${2:-}" ] && [ "$1" != skipped ] && [ "$2" != skipped ]; then echo "$1 / $2" | bc -l | xargs printf '%.2f'; else echo -n "-"; fi; }
echo
echo "vdiskfs read benchmark: ${SIZE_MB} MiB disk, half allocated; $(nproc) cores; $(uname -r); $(date -u +%F); medians of $REPS"
echo "vdiskfs knobs: --threads $THREADS --readahead-kb $READAHEAD_KB (bdi read_ahead_kb set to match)"
printf '\n%-18s %10s %10s %10s %10s\n' "mount" "seq-buf" "seq-dio" "rand4k" "convert"
printf '%-18s %10s %10s %10s %10s\n' "" "GB/s" "GB/s" "IOPS" "s"
for r in "${rows[@]}" native-vhd native-vhdx native-vmdk; do
  printf '%-18s %10s %10s %10s %10s\n' "$r" "${R[$r,buf]:--}" "${R[$r,dio]:--}" "${R[$r,rand]:--}" "${R[$r,conv]:--}"
done
[ -n "${FILE[vhdimount-vhd]:-}" ] && echo "(vhdimount: dd reads only the first ${SLOW_MB} MiB; convert skipped, it takes about a minute)"
echo
echo "ratios (target in brackets)"
for fmt in vhd vhdx vmdk; do
  [ -n "${R[vdiskfs-$fmt,dio]:-}" ] || continue
  echo "  $fmt: seq-dio vs passthrough $(ratio "${R[vdiskfs-$fmt,dio]}" "${R[passthrough-raw,dio]}") [>=0.9]," \
       "vs qsd $(ratio "${R[vdiskfs-$fmt,dio]}" "${R[qsd-$fmt,dio]}") [>=3];" \
       "seq-buf vs passthrough $(ratio "${R[vdiskfs-$fmt,buf]}" "${R[passthrough-raw,buf]}") [>=0.9];" \
       "rand4k vs qsd $(ratio "${R[vdiskfs-$fmt,rand]}" "${R[qsd-$fmt,rand]}") [>=1.5];" \
       "convert vs native $(ratio "${R[vdiskfs-$fmt,conv]}" "${R[native-$fmt,conv]}") [<=1.2]"
done
[ -n "${R[vdiskfs-vmdk,dio]:-}" ] && echo "  vmdk vs vmdkmount: seq-buf $(ratio "${R[vdiskfs-vmdk,buf]}" "${R[vmdkmount-vmdk,buf]}")," \
  "seq-dio $(ratio "${R[vdiskfs-vmdk,dio]}" "${R[vmdkmount-vmdk,dio]}"), rand4k $(ratio "${R[vdiskfs-vmdk,rand]}" "${R[vmdkmount-vmdk,rand]}") [>=1]"
[ -n "${R[vdiskfs-vhd,buf]:-}" ] && echo "  vhd vs vhdimount: seq-buf $(ratio "${R[vdiskfs-vhd,buf]}" "${R[vhdimount-vhd,buf]}")"
echo "  16-layer chain vs 1 layer: seq-buf $(ratio "${R[vdiskfs-chain16,buf]}" "${R[vdiskfs-chain1,buf]}")," \
     "seq-dio $(ratio "${R[vdiskfs-chain16,dio]}" "${R[vdiskfs-chain1,dio]}")," \
     "rand4k $(ratio "${R[vdiskfs-chain16,rand]}" "${R[vdiskfs-chain1,rand]}")," \
     "convert $(ratio "${R[vdiskfs-chain1,conv]}" "${R[vdiskfs-chain16,conv]}") [all >=0.9]"
echo "  64-layer chain vs 1 layer: seq-buf $(ratio "${R[vdiskfs-chain64,buf]}" "${R[vdiskfs-chain1,buf]}")," \
     "seq-dio $(ratio "${R[vdiskfs-chain64,dio]}" "${R[vdiskfs-chain1,dio]}")," \
     "rand4k $(ratio "${R[vdiskfs-chain64,rand]}" "${R[vdiskfs-chain1,rand]}")," \
     "convert $(ratio "${R[vdiskfs-chain1,conv]}" "${R[vdiskfs-chain64,conv]}") [all >=0.9]"
