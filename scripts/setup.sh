#!/usr/bin/env bash
# Installs everything vdiskfs's tests, demo and benchmarks use (as root, on Debian 12 or
# Ubuntu 22.04+). The README's set-up line and .ci/run both call this, so a newcomer's first
# test run has every tool CI has.
#
# Package sources: only the ones this machine already has. Where qemu-utils comes from
# bookworm-backports (qemu 10), guestfish needs the matching qemu-system from the same suite;
# when no backports source is configured, one is derived from the machine's own Debian source
# (same mirror, suite <release>-backports). No mirror host is ever written here.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# shellcheck disable=SC1091
. /etc/os-release
release=${VERSION_CODENAME:-}

apt_sources() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true
}

# A backports source derived from the configured main Debian source, if none is configured.
add_backports() {
  [ "$ID" = debian ] && [ -n "$release" ] || return 0
  local all
  all=$(apt_sources)
  # (No `cmd | grep -q` under pipefail: grep's early exit would fail the pipeline.)
  if grep -Eq "^[^#]*${release}-backports" <<<"$all"; then
    return 0
  fi
  local uri
  if ! uri=$("$(dirname "$0")/debian-mirror.sh" "$release"); then
    echo "setup: skipping backports" >&2
    return 0
  fi
  echo "deb $uri ${release}-backports main" > /etc/apt/sources.list.d/vdiskfs-backports.list
  echo "setup: added ${release}-backports from $uri" >&2
}

add_backports
apt-get update -q

# Tools the tests run, and the independent readers they compare with. openssh-server: the
# remote tests start their own sshd on 127.0.0.1 (the system's own sshd service is not used);
# gdisk and parted read composed disks' partition tables; debootstrap builds the guests of the
# manual boot scripts; ansible runs mount-helpers/ansible in its test; systemd provides
# systemd-analyze, which verifies the vdiskfs@.service unit. nginx and openssl: the HTTP tests
# start their own nginx on 127.0.0.1 with a certificate made at test time (not the system
# service); curl is the HTTP benchmark's yardstick.
apt-get install -y -q --no-install-recommends \
  fuse3 kpartx fdisk e2fsprogs util-linux mount xz-utils gzip zstd xxhash tar \
  libvhdi-utils libvmdk-utils qemu-utils xva-img python3-pip \
  fio bc openssh-server openssh-client openssh-sftp-server gdisk parted debootstrap \
  ansible systemd nginx openssl curl iproute2

# guestfish (libguestfs, a TCG appliance) for the overlay tests. Its qemu-system must match
# qemu-utils: take it from backports when qemu-utils came from there. grub-pc-bin (GRUB's BIOS
# modules, for grub-install on composed disks) must match the grub-common libguestfs brings, so
# it comes from the same suite.
kernel=linux-image-amd64
[ "$ID" = ubuntu ] && kernel=linux-image-generic
policy=$(apt-cache policy qemu-utils)
if [ -n "$release" ] && grep -q "${release}-backports" <<<"$policy"; then
  apt-get install -y -q -t "${release}-backports" guestfish "$kernel" qemu-system-x86 grub-pc-bin
else
  apt-get install -y -q guestfish "$kernel" grub-pc-bin
fi

# dissect.hypervisor: a third independent reader for SESparse and COWD. Pinned: the tests
# assert the defects of these versions. boto3: the standard S3 client, which the S3 tests upload
# and presign with.
pip_pkgs=(dissect.hypervisor==3.21 dissect.cstruct==4.7 dissect.util==3.24 boto3==1.43.11)
# The interpreter itself, not a version-manager shim: a shim's post-install hook (pyenv rehash)
# can fail on a lock some other process left behind and fail the install with it.
py=$(python3 -c 'import sys; print(sys.executable)')
if "$py" - "${pip_pkgs[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = all(version(n) == v for n, v in (p.split("==") for p in sys.argv[1:]))
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
then
  echo "setup: ${pip_pkgs[*]} already installed"
else
  "$py" -m pip install -q "${pip_pkgs[@]}" 2>/dev/null ||
    "$py" -m pip install -q --break-system-packages "${pip_pkgs[@]}"
fi

# The S3 tests: s3s-fs, an S3 server that checks SigV4 signatures and presigned-URL expiry (moto
# does not). It builds from crates.io (minutes); an installed one is kept.
if ! command -v s3s-fs >/dev/null; then
  target=$(mktemp -d)
  cargo install -q --locked s3s-fs@0.14.1 --features binary --root /usr/local --target-dir "$target"
  rm -rf "$target"
fi

echo "setup: done"
