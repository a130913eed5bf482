#!/usr/bin/env bash
# Multi-turn ShareGPT sweep against one endpoint: conversation arrival rates, each turn sent after the
# previous answer with the whole history, so prefix caching (and dcache back-transfer) shows in TTFT.
#
# Usage: sharegpt_multiturn.sh [-u URL] [-r "RATES"] [-o DIR] [-l LABEL] [-- EXTRA BENCH FLAGS...]
# Defaults: 32 conversations of at most 4 turns, answers capped at 128 tokens, prompts capped at
# 2000 characters (raise --max-input-chars for models with a long context), SLOs TTFT 2 s, TPOT 200 ms.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do args+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
exec "$here/sweep_rates.sh" -r "0.5 1 2 4" "${args[@]}" -- \
  --dataset sharegpt --multi-turn --max-turns 4 --num-requests 32 --output-len 128 \
  --max-input-chars 2000 --slo-ttft-ms 2000 --slo-tpot-ms 200 "$@"
