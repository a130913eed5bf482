#!/usr/bin/env bash
# One device-machine call: build pdserve (with CUDA kernels), run the GPU tests, run every GPU benchmark,
# print a short table last. Logs and JSON land under $OUT (or ./gpu-out when $OUT is unset).
#   bash bench/gpu_suite.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=python3
MODE="${1:-full}"
declare -a SUMMARY

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember its last line
  local name="$1"; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local last
  last="$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)"
  SUMMARY+=("$(printf '%-18s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$last")")
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/device.txt" 2>&1
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' >>"$OUT/device.txt" 2>&1
git rev-parse --short HEAD >>"$OUT/device.txt" 2>/dev/null || true

step build $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$OUT/build.log" | tail -40; }
$PY -c 'import pdserve._cuda' >>"$OUT/build.log" 2>&1 && echo "pdserve._cuda built" >>"$OUT/device.txt"

step gpu_tests $PY -m pytest -q -m gpu tests -x --timeout 300
[ -f bench/bench_kernels.py ] && step bench_kernels $PY bench/bench_kernels.py --json "$OUT/kernels.json"
[ -f bench/bench_paged_decode.py ] && step bench_decode_attn $PY bench/bench_paged_decode.py --json "$OUT/paged_decode.json"
if [ "$MODE" = full ] && [ -f bench/bench_engine.py ]; then
  step bench_engine $PY bench/bench_engine.py --device cuda --json "$OUT/engine.json"
fi

echo
cat "$OUT/device.txt"
echo "---- gpu suite ($MODE) ----"
printf '%s\n' "${SUMMARY[@]}"
