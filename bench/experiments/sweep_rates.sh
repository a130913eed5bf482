#!/usr/bin/env bash
# Sweep request rates against one running pdserve endpoint (the seed's batch test script):
# one `pdserve bench` per rate, each writing a result JSON, then `pdserve plot` over all of them.
#
# Usage: sweep_rates.sh [-u URL] [-r "RATES"] [-o DIR] [-l LABEL] [-- EXTRA BENCH FLAGS...]
#   -u URL    server base URL (default: the scheduler, http://127.0.0.1:8081)
#   -r RATES  space-separated request rates (default: "1.6 3.2 6.4 12.8 25.6")
#   -o DIR    output folder (default: results/sweep_<UTC time>)
#   -l LABEL  series label stored in each result (default: "default"); plots group by it
#   after --  flags passed to every `pdserve bench` run (default: the seed's client,
#             --input-len 32 --output-len 32 --num-requests 64)
# Writes DIR/<LABEL>_rate<R>.json per rate, DIR/summary.txt (one line per rate) and DIR/plots/*.png.
# Set PDSERVE to call another launcher (e.g. PDSERVE="python -m pdserve").
# Example: sweep_rates.sh -l disagg -r "2 4 8" -- --dataset sharegpt --multi-turn --max-turns 4
set -euo pipefail

url="http://127.0.0.1:8081"
rates="1.6 3.2 6.4 12.8 25.6"
out_dir="results/sweep_$(date -u +%Y%m%dT%H%M%SZ)"
label="default"
while getopts "u:r:o:l:h" opt; do
  case "$opt" in
    u) url="$OPTARG" ;;
    r) rates="$OPTARG" ;;
    o) out_dir="$OPTARG" ;;
    l) label="$OPTARG" ;;
    h) sed -n '2,16p' "$0"; exit 0 ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
extra=("$@")
[[ ${#extra[@]} -eq 0 ]] && extra=(--input-len 32 --output-len 32 --num-requests 64)
read -r -a pdserve <<< "${PDSERVE:-pdserve}"

mkdir -p "$out_dir"
status=0
for rate in $rates; do
  result="$out_dir/${label}_rate${rate}.json"
  echo "== $label: rate $rate -> $result"
  # A run with failed requests still writes its result (exit 1); keep sweeping, report at the end.
  "${pdserve[@]}" bench --url "$url" --request-rate "$rate" --label "$label" --no-progress \
    --result-json "$result" "${extra[@]}" | tee "$out_dir/${label}_rate${rate}.txt" || status=1
  tail -n 2 "$out_dir/${label}_rate${rate}.txt" | grep -m1 "rate=" >> "$out_dir/summary.txt" || true
done
"${pdserve[@]}" plot "$out_dir"/*.json -o "$out_dir/plots"
echo "summary: $out_dir/summary.txt; plots: $out_dir/plots"
exit "$status"
