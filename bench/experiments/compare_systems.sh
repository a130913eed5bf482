#!/usr/bin/env bash
# Compare deployments (e.g. colocated vs disaggregated vs disaggregated + caching) on one workload:
# runs sweep_rates.sh once per LABEL=URL into one folder, so `pdserve plot` draws one curve each.
#
# Usage: compare_systems.sh [-r "RATES"] [-o DIR] LABEL=URL [LABEL=URL...] [-- EXTRA BENCH FLAGS...]
# Example (the SPEC §5 end-to-end comparison, each system started beforehand on its own port):
#   compare_systems.sh -r "1 2 4" colocated=http://127.0.0.1:9081 disagg=http://127.0.0.1:8081 \
#     -- --dataset sharegpt --multi-turn --max-turns 6 --num-requests 64 --slo-ttft-ms 1000 --slo-tpot-ms 100
# Writes DIR/<LABEL>_rate<R>.json, DIR/summary.txt and DIR/plots/*.png.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
rates="1 2 4 8"
out_dir="results/compare_$(date -u +%Y%m%dT%H%M%SZ)"
while getopts "r:o:h" opt; do
  case "$opt" in
    r) rates="$OPTARG" ;;
    o) out_dir="$OPTARG" ;;
    h) sed -n '2,10p' "$0"; exit 0 ;;
    *) sed -n '2,10p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
systems=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  [[ "$1" == *=* ]] || { echo "compare_systems.sh: expected LABEL=URL, got '$1'" >&2; exit 2; }
  systems+=("$1")
  shift
done
[[ "${1:-}" == "--" ]] && shift
[[ ${#systems[@]} -gt 0 ]] || { echo "compare_systems.sh: give at least one LABEL=URL" >&2; exit 2; }

status=0
for system in "${systems[@]}"; do
  "$here/sweep_rates.sh" -l "${system%%=*}" -u "${system#*=}" -r "$rates" -o "$out_dir" -- "$@" || status=1
done
exit "$status"
