#!/usr/bin/env bash
# Minimises the corpora (cargo fuzz cmin) at low priority, with run.sh's input size limits, so
# the committed corpora keep only inputs that add coverage. Inputs named crash-* (a fixed crash,
# kept as a regression input) survive whatever cmin decides.
# Usage: fuzz/cmin.sh [TARGET...]   (all targets without arguments)
set -euo pipefail
cd "$(dirname "$0")"
eval "$(sed -n '/^declare -A MAX_LEN/,/^)/p' run.sh)"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cargo fuzz list))
keep=$(mktemp -d)
trap 'rm -rf "$keep"' EXIT
for t in "${targets[@]}"; do
    before=$(ls "corpus/$t" | wc -l)
    mkdir -p "$keep/$t"
    find "corpus/$t" -maxdepth 1 -name 'crash-*' -exec cp {} "$keep/$t/" \;
    nice -n 19 cargo fuzz cmin -s none "$t" -- -max_len="${MAX_LEN[$t]}" -timeout=30 \
        -rss_limit_mb=4096 > "logs/cmin-$t.log" 2>&1
    for f in "$keep/$t"/*; do
        [ -e "$f" ] || continue
        # The merged copy is named by its SHA-1; keep the named one only.
        rm -f "corpus/$t/$(sha1sum < "$f" | cut -d' ' -f1)"
        cp "$f" "corpus/$t/"
    done
    echo "$t: $before -> $(ls "corpus/$t" | wc -l) files"
done
