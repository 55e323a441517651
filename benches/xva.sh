#!/usr/bin/env bash
# XVA read speed through vdiskfs against the raw disk the export was made from, for a plain,
# a gzip (xe vm-export compress=true), a single-frame zstd (compress=zstd) and a multi-frame
# (pzstd) export, all measured in one run; and the time to index a compressed export against
# `gzip -d` / `zstd -d` of the same file. Not a test: it prints a table.
#
#   benches/xva.sh [SIZE_MIB]      default 1024 (a 1 GiB disk, half of it allocated)
#
# Needs root (FUSE), xva-img, gzip, zstd, pzstd, fio. Source files are warm in the page cache;
# each mount is read once right after mounting (vdiskfs keeps the kernel page cache across opens,
# so a second pass would measure the page cache, not vdiskfs).
set -euo pipefail

SIZE_MIB=${1:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VDISKFS:-$ROOT/target/release/vdiskfs}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release -q)
for t in xva-img gzip zstd pzstd fio fusermount3; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
W=$(mktemp -d /tmp/vdiskfs-xva-bench.XXXXXX)
MNT=$W/mnt
mkdir -p "$MNT"
cleanup() { fusermount3 -u "$MNT" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

echo "building a ${SIZE_MIB} MiB disk, half allocated (alternate MiBs: text-like, random, zero)..."
python3 - "$W/disk.raw" "$SIZE_MIB" <<'EOF'
import os, sys, base64
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(0, mib, 2):           # every other MiB holds data
        f.seek(i << 20)
        raw = os.urandom(1 << 20)
        # 3 of 4 data MiBs compress like text (base64), 1 of 4 is incompressible
        f.write(raw if i % 8 == 0 else base64.b64encode(raw)[: 1 << 20])
EOF
mkdir -p "$W/x/Ref:12"
(cd "$W/x" && xva-img disk-import Ref:12 ../disk.raw >/dev/null)
cat > "$W/x/ova.xml" <<EOF
<?xml version="1.0"?><value><struct><member><name>version</name><value><struct><member><name>export_vsn</name><value>2</value></member></struct></value></member><member><name>objects</name><value><array><data><value><struct><member><name>class</name><value>VDI</value></member><member><name>id</name><value>Ref:12</value></member><member><name>snapshot</name><value><struct><member><name>name_label</name><value>disk</value></member><member><name>virtual_size</name><value>$((SIZE_MIB << 20))</value></member></struct></value></member></struct></value></data></array></value></member></struct></value>
EOF
(cd "$W/x" && { echo ova.xml; ls -1 Ref:12/* | sort; } > ../list && tar -H ustar -cf ../plain.xva -T ../list)
rm -rf "$W/x"
echo "compressing (gzip -6, zstd -3, pzstd -3)..."
gzip -c "$W/plain.xva" > "$W/gzip.xva"
zstd -q -c "$W/plain.xva" > "$W/zstd.xva"
pzstd -q -p 2 -c "$W/plain.xva" > "$W/pzstd.xva"
ls -l "$W"/*.xva | awk '{printf "  %-12s %6d MiB\n", $9, $5/1048576}' | sed "s#$W/##"
cat "$W"/*.xva "$W/disk.raw" > /dev/null    # warm the page cache

# dd bs=1M of FILE: MB/s
seq_mbs() { dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {for(i=1;i<=NF;i++) if($i ~ /s,$/) t=$(i-1); print int('"$((SIZE_MIB << 20))"'/t/1e6)}'; }
# fio 4 KiB random reads, 1 job, 20 s or 4000 reads: IOPS
rand_iops() {
    fio --name=r --filename="$1" --rw=randread --bs=4k --direct=1 --ioengine=psync --numjobs=1 \
        --size="$((SIZE_MIB << 20))" --number_ios=4000 --runtime=20 --output-format=terse \
        --randrepeat=0 2>/dev/null | awk -F';' '{print $8}'
}

echo
echo "index time (first open, fresh cache dir) vs decompressing the file to /dev/null"
printf '  %-10s %12s %12s %8s\n' export vdiskfs "gzip/zstd -d" ratio
for kind in gzip zstd pzstd; do
    t0=$(now); "$BIN" info --cache-dir "$W/cache-time" "$W/$kind.xva" > /dev/null; t1=$(now)
    case $kind in gzip) gzip -dc "$W/$kind.xva" > /dev/null ;; *) zstd -qdc "$W/$kind.xva" > /dev/null ;; esac
    t2=$(now)
    a=$(secs "$t0" "$t1"); b=$(secs "$t1" "$t2")
    printf '  %-10s %11ss %11ss %8s\n' "$kind" "$a" "$b" "$(python3 -c "print(f'{$a/$b:.2f}x')")"
done
t0=$(now); "$BIN" info --cache-dir "$W/cache-time" "$W/gzip.xva" > /dev/null; t1=$(now)
echo "  second open of gzip.xva (index read from the cache): $(secs "$t0" "$t1")s"

echo
echo "reads (each mount read once, right after mounting; raw = the source disk file, page cache)"
raw_seq=$(seq_mbs "$W/disk.raw")
raw_iops=$(rand_iops "$W/disk.raw")
printf '  %-10s %10s %8s %12s %8s\n' export "dd MB/s" "vs raw" "4k rand IOPS" "vs raw"
printf '  %-10s %10s %8s %12s %8s\n' raw "$raw_seq" 1.00 "$raw_iops" 1.00
for kind in plain gzip zstd pzstd; do
    "$BIN" info --cache-dir "$W/cache" "$W/$kind.xva" > /dev/null          # index first
    "$BIN" mount --daemon --cache-dir "$W/cache" "$W/$kind.xva" "$MNT" > /dev/null
    s=$(seq_mbs "$MNT/disk.raw")
    fusermount3 -u "$MNT"
    "$BIN" mount --daemon --cache-dir "$W/cache" "$W/$kind.xva" "$MNT" > /dev/null
    r=$(rand_iops "$MNT/disk.raw")
    fusermount3 -u "$MNT"
    printf '  %-10s %10s %8s %12s %8s\n' "$kind" "$s" "$(python3 -c "print(f'{$s/$raw_seq:.2f}')")" "$r" \
        "$(python3 -c "print(f'{$r/$raw_iops:.3f}')")"
done
echo
echo "(random reads on single-frame zstd go through the block cache: the first misses decode from"
echo " the start of the stream, later ones hit the cache; see README 'XVA details')"
