#!/usr/bin/env bash
# Prints the URI of this machine's own Debian source for RELEASE (default: this machine's
# release), from /etc/apt: the one-line format or deb822 .sources. setup.sh derives a backports
# source from it, and the scripts that debootstrap a guest fetch from it, so no mirror host is
# ever written into this repository. Exits 1, saying so, when there is none.
#   scripts/debian-mirror.sh [RELEASE]
set -euo pipefail
# shellcheck disable=SC1091
. /etc/os-release
release=${1:-${VERSION_CODENAME:-}}
[ -n "$release" ] || { echo "debian-mirror.sh: no release given and none in /etc/os-release" >&2; exit 1; }
# deb822 (.sources): the URIs line of the stanza whose Suites has the release itself.
uri=$(awk -v r="$release" '
    /^URIs:/ { u = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == r && !found) found = u }
    /^$/ { u = "" }
    END { print found }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$uri" ]; then
  # One-line format: deb [opts] URI release component...
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v r="$release" '$1 == "deb" && !u { for (i = 2; i < NF; i++) if ($(i+1) == r && $i !~ /^\[/) u = $i } END { print u }')
fi
[ -n "$uri" ] || { echo "debian-mirror.sh: no Debian source for $release in /etc/apt" >&2; exit 1; }
echo "$uri"
