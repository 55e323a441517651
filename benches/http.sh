#!/usr/bin/env bash
# Remote reads over HTTPS on a shaped link, vdiskfs against its peers, in ONE run.
#
#   benches/http.sh [WORKDIR]      (root; needs nginx, openssl, curl, qemu-utils, iproute2, python3)
#
# The link is the one benches/ssh.sh measures over: two network namespaces made here (vdh-srv,
# vdh-cli) joined by a veth pair (10.213.7.1 and .2). nginx serves WORKDIR over TLS on the server
# namespace's loopback; benches/delay_proxy.py forwards 10.213.7.1:8443 to it with DELAY_MS each
# way (this kernel has no netem), and tc tbf shapes both veth ends to RATE. Clients run with
# `nsenter --net` so the FUSE mount stays visible to the dd outside.
#
# One dynamic VHD of SIZE_MB (default 128) random data on the server, read by:
#   curl          the whole file, one GET                              – the yardstick
#   dd            dd bs=1M of the file vdiskfs mounts over https        (cold cache)
#   export        vdiskfs export to a local file                        (cold cache)
#   qemu-curl     qemu-img convert through qemu's curl driver (vpc on https)
# and random 4 KiB reads (RAND of them) through the mount: cold, then warm (a remount with the
# same chunk cache). Every copy is compared with qemu-img's local conversion. Traffic goes only
# to the namespaces made here; everything is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-http-bench}
SIZE_MB=${SIZE_MB:-128}
RATE=${RATE:-200mbit}
DELAY_MS=${DELAY_MS:-10}
RAND=${RAND:-100}
SRV=vdh-srv CLI=vdh-cli
SADDR=10.213.7.1 CADDR=10.213.7.2 PORT=8443

[ "$(id -u)" = 0 ] || { echo "http.sh: run as root (namespaces, tc, mounts)" >&2; exit 1; }
for t in nginx openssl curl qemu-img ip tc nsenter python3 fusermount3; do
  command -v $t >/dev/null || { echo "http.sh: $t is missing" >&2; exit 1; }
done
(cd "$root" && cargo build --release -q --bins && cargo build --release -q -p vdiskfs-testkit)
V=$root/target/release/vdiskfs
FX=$root/target/release/vdiskfs-fixture
IN_CLI=(nsenter --net=/run/netns/$CLI)
IN_SRV=(nsenter --net=/run/netns/$SRV)

pids=()
cleanup() {
  set +e
  for m in "$W"/mnt*; do mountpoint -q "$m" 2>/dev/null && fusermount3 -u "$m"; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null
  ip netns del $SRV 2>/dev/null
  ip netns del $CLI 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W" && mkdir -p "$W/www" "$W/tmp"

# --- the server: a CA, a certificate for its address, nginx, the image ---------------------
(cd "$W" &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj /CN=vdiskfs-bench-CA 2>/dev/null &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr \
    -subj /CN=$SADDR 2>/dev/null &&
  printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' $SADDR > ext &&
  openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null)
cat > "$W/nginx.conf" <<CFG
user root;
worker_processes 2;
pid $W/nginx.pid;
error_log $W/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $W/tmp/body;
    proxy_temp_path $W/tmp/proxy;
    fastcgi_temp_path $W/tmp/fastcgi;
    uwsgi_temp_path $W/tmp/uwsgi;
    scgi_temp_path $W/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:8443 ssl;
        ssl_certificate $W/srv.pem;
        ssl_certificate_key $W/srv.key;
        root $W/www;
    }
}
CFG
head -c $((SIZE_MB << 20)) /dev/urandom > "$W/data.raw"
"$FX" vhd --from "$W/data.raw" "$W/www/base.vhd" >/dev/null
rm "$W/data.raw"
qemu-img convert -f vpc -O raw "$W/www/base.vhd" "$W/want.raw"
BYTES=$(stat -c %s "$W/www/base.vhd")

# --- the link ------------------------------------------------------------------------------
ip netns del $SRV 2>/dev/null || true
ip netns del $CLI 2>/dev/null || true
ip netns add $SRV
ip netns add $CLI
ip link add vdh0 type veth peer name vdh1
ip link set vdh0 netns $SRV
ip link set vdh1 netns $CLI
ip -n $SRV addr add $SADDR/30 dev vdh0
ip -n $CLI addr add $CADDR/30 dev vdh1
for ns in $SRV $CLI; do ip -n $ns link set lo up; done
ip -n $SRV link set vdh0 up
ip -n $CLI link set vdh1 up
tc -n $SRV qdisc add dev vdh0 root tbf rate "$RATE" burst 64kb latency 100ms
tc -n $CLI qdisc add dev vdh1 root tbf rate "$RATE" burst 64kb latency 100ms
"${IN_SRV[@]}" nginx -p "$W" -c "$W/nginx.conf"
"${IN_SRV[@]}" python3 "$root/benches/delay_proxy.py" $SADDR $PORT 127.0.0.1 8443 "$DELAY_MS" & pids+=($!)
sleep 1

URL="https://$SADDR:$PORT/base.vhd"
# The TLS handshake as curl times it (the proxy adds 2 x DELAY_MS to each round trip).
rtt=$("${IN_CLI[@]}" curl -sS --cacert "$W/ca.pem" -o /dev/null -r 0-0 \
  -w '%{time_connect} %{time_appconnect}' "https://$SADDR:$PORT/base.vhd" |
  python3 -c "import sys; c, a = map(float, sys.stdin.read().split()); print('%.1f' % ((a - c) * 1000))" || echo '?')
echo "link: $RATE, $((2 * DELAY_MS)) ms added per round trip; TLS handshake ${rtt} ms; image $(numfmt --to=iec "$BYTES") ($BYTES bytes)"

secs() { python3 -c "import time; print(time.time())"; }
declare -A T
measure() { # name, command...
  local name=$1; shift
  local t0 t1
  t0=$(secs); "$@"; t1=$(secs)
  T[$name]=$(python3 -c "print($t1 - $t0)")
}

# curl: the whole file in one GET.
measure curl "${IN_CLI[@]}" curl -sS --fail --cacert "$W/ca.pem" -o "$W/curl.vhd" "$URL"
cmp -s "$W/curl.vhd" "$W/www/base.vhd" || { echo "curl copy differs" >&2; exit 1; }
rm -f "$W/curl.vhd"

# dd of the mounted raw file (cold chunk cache).
mkdir -p "$W/mnt"
"${IN_CLI[@]}" "$V" mount --daemon --cache-dir "$W/c-dd" --ca-cert "$W/ca.pem" "$URL" "$W/mnt" >/dev/null
measure dd dd if="$W/mnt/base.raw" of="$W/dd.raw" bs=1M status=none
fusermount3 -u "$W/mnt"
cmp -s "$W/dd.raw" "$W/want.raw" || { echo "dd through the mount differs" >&2; exit 1; }
rm -f "$W/dd.raw"

# vdiskfs export (cold chunk cache).
measure export "${IN_CLI[@]}" "$V" export --quiet --cache-dir "$W/c-export" --ca-cert "$W/ca.pem" "$URL" "$W/export.raw"
cmp -s "$W/export.raw" "$W/want.raw" || { echo "export differs" >&2; exit 1; }
rm -f "$W/export.raw"

# qemu-img convert through qemu's curl driver (it cannot take a CA file: verification off).
qjson="json:{\"driver\":\"vpc\",\"file\":{\"driver\":\"https\",\"url\":\"$URL\",\"sslverify\":false}}"
if measure qemu "${IN_CLI[@]}" qemu-img convert -O raw "$qjson" "$W/qemu.raw"; then
  cmp -s "$W/qemu.raw" "$W/want.raw" || echo "note: qemu's curl read differs" >&2
else
  T[qemu]=
fi
rm -f "$W/qemu.raw"

# Random 4 KiB reads: cold (empty cache), then warm (remount, same cache).
cat > "$W/rand.py" <<'PY'
import os, random, statistics, sys, time
path, n = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
rnd = random.Random(7)
offs = [rnd.randrange(0, size // 4096) * 4096 for _ in range(n)]
fd = os.open(path, os.O_RDONLY)
lat = []
for o in offs:
    t = time.perf_counter(); os.pread(fd, 4096, o); lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print("median %.2f ms, p90 %.2f ms, max %.2f ms" % (statistics.median(lat), lat[int(0.9 * len(lat))], lat[-1]))
PY
for pass in cold warm; do
  "${IN_CLI[@]}" "$V" mount --daemon --readahead-kb 4 --cache-dir "$W/c-rand" --ca-cert "$W/ca.pem" "$URL" "$W/mnt" >/dev/null
  eval "rand_$pass=\"\$(python3 \"$W/rand.py\" \"$W/mnt/base.raw\" $RAND)\""
  fusermount3 -u "$W/mnt"
done

mbs() { python3 -c "print('%.1f' % ($BYTES / $1 / 1e6))"; }
ratio() { python3 -c "print('%.2f' % ($2 / $1))"; }
printf '\n%-44s %8s %8s %10s\n' "read of the whole image" "seconds" "MB/s" "vs curl"
for k in curl dd export qemu; do
  t=${T[$k]:-}
  case $k in
    curl) what="curl, one GET (the yardstick)";;
    dd) what="vdiskfs mount, dd bs=1M (cold cache)";;
    export) what="vdiskfs export (cold cache)";;
    qemu) what="qemu-img convert, qemu curl driver";;
  esac
  if [ -z "$t" ]; then printf '%-44s %8s\n' "$what" "failed"; continue; fi
  printf '%-44s %8.2f %8s %9sx\n' "$what" "$t" "$(mbs "$t")" "$(ratio "$t" "${T[curl]}")"
done
echo
echo "random 4 KiB reads through the mount ($RAND reads):"
echo "  cold (empty chunk cache): $rand_cold"
echo "  warm (remount, same cache): $rand_warm"
