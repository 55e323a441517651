#!/usr/bin/env bash
# Runs fuzz targets at low priority, each for RUNS executions (default 10 million) with the
# input size limit that fits its structure, keeping what they find in corpus/<target>/.
# Usage: fuzz/run.sh [TARGET...]   (all targets without arguments; RUNS=N to change the count,
# SECONDS_EACH=N to stop each target after N seconds whatever its count)
# Each run's libFuzzer output goes to logs/<target>.log, and one line per run (UTC date, target,
# executions, exec/s, new units, exit status) to logs/summary.tsv, for the README's table.
set -euo pipefail
cd "$(dirname "$0")"
declare -A MAX_LEN=(
    [vhd_footer]=600 [vhd_header]=2048 [vhd_bat]=65536
    [vhdx_header]=4200 [vhdx_regions]=65600 [vhdx_metadata]=131072 [vhdx_log]=262144 [vhdx_bat]=65536
    [vmdk_descriptor]=8192 [vmdk_sparse]=131072 [vmdk_stream]=131072 [vmdk_cowd]=65536 [vmdk_sesparse]=65536
    [xva_tar]=65536 [xva_ovaxml]=32768 [xva_gzip]=65536 [xva_zstd]=65536 [image]=262144
)
# glibc's allocator, per target. Targets that build a whole file from a sparse description
# (decode_sparse: up to 64 MiB of zeros per input) want every large buffer freshly mapped, whose
# pages the kernel zeroes only where touched: a fixed mmap threshold (glibc otherwise raises it
# to the last freed size, then clears each buffer with memset, 96% of vmdk_sesparse's time).
# The VHDX targets read megabyte buffers they fill whole: keep them on the heap, never trimmed.
FRESH="MALLOC_MMAP_THRESHOLD_=131072"
HEAP="MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456"
declare -A MALLOC=(
    [vmdk_sparse]=$FRESH [vmdk_stream]=$FRESH [vmdk_cowd]=$FRESH [vmdk_sesparse]=$FRESH [image]=$FRESH
    [vhd_bat]=$FRESH
    [vhdx_header]=$HEAP [vhdx_regions]=$HEAP [vhdx_metadata]=$HEAP [vhdx_log]=$HEAP [vhdx_bat]=$HEAP
)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cargo fuzz list))
mkdir -p logs
for t in "${targets[@]}"; do
    [ -n "${MAX_LEN[$t]:-}" ] || { echo "unknown target $t" >&2; exit 2; }
    echo "== $t"
    log="logs/$t.log"
    start=0; [ -f "$log" ] && start=$(wc -l < "$log")
    status=0
    # shellcheck disable=SC2086 # the settings are words
    env ${MALLOC[$t]:-} nice -n 19 cargo fuzz run -s none "$t" -- -max_len="${MAX_LEN[$t]}" -runs="${RUNS:-10000000}" \
        -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 -max_total_time="${SECONDS_EACH:-0}" \
        >> "$log" 2>&1 || status=$?
    stat() { tail -n +"$((start + 1))" "$log" | sed -n "s/^stat::$1: *//p" | tail -1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$(stat number_of_executed_units)" \
        "$(stat average_exec_per_sec)" "$(stat new_units_added)" "$status" | tee -a logs/summary.tsv
done
