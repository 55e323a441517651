#!/usr/bin/env bash
# Remote reads over a shaped link, vdiskfs against its peers, in ONE run.
#
#   benches/ssh.sh [WORKDIR]       (root; needs openssh-server, qemu-utils, iproute2, python3)
#
# The link: two network namespaces made here (vdb-srv, vdb-cli) joined by a veth pair with
# addresses of their own (10.213.0.1 and .2). sshd listens on the server namespace's loopback;
# benches/delay_proxy.py forwards 10.213.0.1:2200 to it with 10 ms each way (20 ms round trip:
# this kernel has no netem), and tc tbf shapes both veth ends to RATE (200 Mbit/s): only the
# hop being measured is shaped. Clients run with `nsenter --net` (not `ip netns exec`, whose
# private mount namespace would hide the FUSE mount from the dd outside).
#
# One dynamic VHD of SIZE_MB (default 128; qemu's driver needs minutes for it) random data on the "host", read by:
#   scp           the whole file (OpenSSH, SFTP protocol)            – the yardstick
#   dd            dd bs=1M of the file vdiskfs mounts over ssh        (cold cache)
#   export        vdiskfs export to a local file                      (cold cache)
#   qemu-ssh      qemu-img convert through qemu's own ssh driver      (libssh, SFTP)
# and random 4 KiB reads (RAND reads at random offsets) through the mount: cold (empty chunk
# cache), then warm (a remount with the same cache). Prints MB/s, the ratio to scp, and the
# latencies. Traffic goes only to the namespaces made here; everything is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/vdiskfs-ssh-bench}
SIZE_MB=${SIZE_MB:-128}
RATE=${RATE:-200mbit}
DELAY_MS=${DELAY_MS:-10}
RAND=${RAND:-100}
SRV=vdb-srv CLI=vdb-cli
SADDR=10.213.0.1 CADDR=10.213.0.2 PORT=2200

[ "$(id -u)" = 0 ] || { echo "ssh.sh: run as root (namespaces, tc, mounts)" >&2; exit 1; }
for t in sshd ssh scp ssh-agent ssh-add qemu-img ip tc nsenter python3 fusermount3; do
  command -v $t >/dev/null || { echo "ssh.sh: $t is missing" >&2; exit 1; }
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
  [ -n "${SSH_AGENT_PID:-}" ] && kill "$SSH_AGENT_PID" 2>/dev/null
  ip netns del $SRV 2>/dev/null
  ip netns del $CLI 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W" && mkdir -p "$W"

# --- the host: keys, sshd, the image -------------------------------------------------------
ssh-keygen -q -t ed25519 -N '' -f "$W/host"
ssh-keygen -q -t ed25519 -N '' -f "$W/key"
cp "$W/key.pub" "$W/authorized_keys"
echo "[$SADDR]:$PORT $(cat "$W/host.pub")" > "$W/known_hosts"
mkdir -p /run/sshd
cat > "$W/sshd_config" <<CFG
Port 2222
ListenAddress 127.0.0.1
HostKey $W/host
AuthorizedKeysFile $W/authorized_keys
PidFile none
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin yes
Subsystem sftp internal-sftp
LogLevel ERROR
CFG
head -c $((SIZE_MB << 20)) /dev/urandom > "$W/data.raw"
"$FX" vhd --from "$W/data.raw" "$W/base.vhd" >/dev/null
rm "$W/data.raw"
qemu-img convert -f vpc -O raw "$W/base.vhd" "$W/want.raw"
BYTES=$(stat -c %s "$W/base.vhd")

# --- the link ------------------------------------------------------------------------------
ip netns del $SRV 2>/dev/null || true
ip netns del $CLI 2>/dev/null || true
ip netns add $SRV
ip netns add $CLI
ip link add vdb0 type veth peer name vdb1
ip link set vdb0 netns $SRV
ip link set vdb1 netns $CLI
ip -n $SRV addr add $SADDR/30 dev vdb0
ip -n $CLI addr add $CADDR/30 dev vdb1
for ns in $SRV $CLI; do ip -n $ns link set lo up; done
ip -n $SRV link set vdb0 up
ip -n $CLI link set vdb1 up
tc -n $SRV qdisc add dev vdb0 root tbf rate "$RATE" burst 64kb latency 100ms
tc -n $CLI qdisc add dev vdb1 root tbf rate "$RATE" burst 64kb latency 100ms
"${IN_SRV[@]}" /usr/sbin/sshd -D -f "$W/sshd_config" -E "$W/sshd.log" & pids+=($!)
"${IN_SRV[@]}" python3 "$root/benches/delay_proxy.py" $SADDR $PORT 127.0.0.1 2222 "$DELAY_MS" & pids+=($!)
sleep 1

SSHC="ssh -F /dev/null -i $W/key -o UserKnownHostsFile=$W/known_hosts -o StrictHostKeyChecking=yes"
URL="ssh://root@$SADDR:$PORT$W/base.vhd"
rtt=$("${IN_CLI[@]}" python3 -c "
import socket,time
s=socket.create_connection(('$SADDR',$PORT)); s.recv(100)
t=time.time(); s.send(b'x\r\n'); s.recv(100); print('%.1f'%((time.time()-t)*1000))" || echo '?')
echo "link: $RATE, round trip through the proxy ${rtt} ms; image $(numfmt --to=iec "$BYTES") ($BYTES bytes)"

secs() { python3 -c "import time; print(time.time())"; }
declare -A T
measure() { # name, command...
  local name=$1; shift
  local t0 t1
  t0=$(secs); "$@"; t1=$(secs)
  T[$name]=$(python3 -c "print($t1 - $t0)")
}

# scp: the whole file.
measure scp "${IN_CLI[@]}" scp -q -F /dev/null -i "$W/key" -o UserKnownHostsFile="$W/known_hosts" \
  -P $PORT "root@$SADDR:$W/base.vhd" "$W/scp.vhd"
cmp -s "$W/scp.vhd" "$W/base.vhd" || { echo "scp copy differs" >&2; exit 1; }
rm -f "$W/scp.vhd"

# dd of the mounted raw file (cold chunk cache).
mkdir -p "$W/mnt"
"${IN_CLI[@]}" "$V" mount --daemon --cache-dir "$W/c-dd" --ssh-command "$SSHC" "$URL" "$W/mnt" >/dev/null
measure dd dd if="$W/mnt/base.raw" of="$W/dd.raw" bs=1M status=none
fusermount3 -u "$W/mnt"
cmp -s "$W/dd.raw" "$W/want.raw" || { echo "dd through the mount differs" >&2; exit 1; }
rm -f "$W/dd.raw"

# vdiskfs export (cold chunk cache).
measure export "${IN_CLI[@]}" "$V" export --quiet --cache-dir "$W/c-export" --ssh-command "$SSHC" "$URL" "$W/export.raw"
cmp -s "$W/export.raw" "$W/want.raw" || { echo "export differs" >&2; exit 1; }
rm -f "$W/export.raw"

# qemu-img convert through qemu's ssh driver (libssh; authenticates through the agent).
eval "$(ssh-agent -s)" >/dev/null
ssh-add -q "$W/key"
cp "$W/known_hosts" "$W/qemu_known_hosts"
qjson="json:{\"driver\":\"vpc\",\"file\":{\"driver\":\"ssh\",\"server\":{\"host\":\"$SADDR\",\"port\":\"$PORT\"},\"user\":\"root\",\"path\":\"$W/base.vhd\",\"host-key-check\":{\"mode\":\"none\"}}}"
if measure qemu "${IN_CLI[@]}" qemu-img convert -O raw "$qjson" "$W/qemu.raw"; then
  cmp -s "$W/qemu.raw" "$W/want.raw" || echo "note: qemu's ssh read differs (VHD size rounding?)" >&2
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
  "${IN_CLI[@]}" "$V" mount --daemon --readahead-kb 4 --cache-dir "$W/c-rand" --ssh-command "$SSHC" "$URL" "$W/mnt" >/dev/null

  eval "rand_$pass=\"\$(python3 \"$W/rand.py\" \"$W/mnt/base.raw\" $RAND)\""
  fusermount3 -u "$W/mnt"
done

mbs() { python3 -c "print('%.1f' % ($BYTES / $1 / 1e6))"; }
ratio() { python3 -c "print('%.2f' % ($2 / $1))"; }
printf '\n%-44s %8s %8s %10s\n' "read of the whole image" "seconds" "MB/s" "vs scp"
for k in scp dd export qemu; do
  t=${T[$k]:-}
  case $k in
    scp) what="scp (OpenSSH, the yardstick)";;
    dd) what="vdiskfs mount, dd bs=1M (cold cache)";;
    export) what="vdiskfs export (cold cache)";;
    qemu) what="qemu-img convert, qemu ssh driver";;
  esac
  if [ -z "$t" ]; then printf '%-44s %8s\n' "$what" "failed"; continue; fi
  printf '%-44s %8.2f %8s %9sx\n' "$what" "$t" "$(mbs "$t")" "$(ratio "$t" "${T[scp]}")"
done
echo
echo "random 4 KiB reads through the mount ($RAND reads):"
echo "  cold (empty chunk cache): $rand_cold"
echo "  warm (remount, same cache): $rand_warm"
