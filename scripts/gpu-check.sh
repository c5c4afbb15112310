#!/usr/bin/env bash
# The GPU workflow, run on the GPU machine from the repository root:
#   configure with the gpu preset, build with every core, run the whole test suite with GPU
#   tests required (ALLOY_REQUIRE_GPU=1: a missing device fails instead of skipping), run the
#   benchmarks, and write logs and a summary table under $OUT (default: ./gpu-out).
#   With PyTorch on the machine it also checks weights files both ways against PyTorch
#   (scripts/torch_weights_roundtrip.py), times the peers (benchmarks/peers/) and writes the
#   side-by-side table; bitsandbytes comes from a wheel carried in .whl/ when present.
# Usage: scripts/gpu-check.sh [--no-bench] [--no-peers] [--bench-only] [--bench-filter REGEX]
set -uo pipefail

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
run_tests=1 run_bench=1 run_peers=1 bench_filter=.
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) run_bench=0 ;;
    --no-peers) run_peers=0 ;;
    --bench-only) run_tests=0 ;;
    --bench-filter) bench_filter=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

log=$OUT/log.txt
status=0
{
  echo "== machine"; date -u; echo "commit ${ALLOY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  nvcc --version | tail -1; cmake --version | head -1; g++ --version | head -1
} >"$log" 2>&1

step() {  # step NAME COMMAND...: runs, logs, remembers the first failure
  echo "== $1" | tee -a "$log"
  shift
  local t0=$SECONDS
  "$@" >>"$log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ $rc -eq 0 ] || status=$rc
  return $rc
}

step configure cmake --preset gpu || { tail -40 "$log"; exit 1; }
step build cmake --build --preset gpu -j "$(nproc)" || { grep -E "error|FAILED" "$log" | head -40; exit 1; }

if [ $run_tests -eq 1 ]; then
  step tests ctest --preset gpu -j 4
  grep -E "tests passed|tests failed|Skipped|\(Failed\)" "$log" | tail -20
  # Weights to and from PyTorch, both ways, where PyTorch and safetensors are installed.
  if python3 -c "import torch, safetensors" 2>/dev/null; then
    step torch-weights python3 scripts/torch_weights_roundtrip.py --build build/gpu
    grep -E "^  (ok|FAIL) |all checks passed|check\(s\) failed" "$log" | tail -20
  fi
fi

if [ $run_bench -eq 1 ]; then
  for b in build/gpu/benchmarks/alloy_bench_*; do
    [ -x "$b" ] || continue
    name=$(basename "$b")
    step "$name" "$b" --benchmark_filter="$bench_filter" --benchmark_out="$OUT/$name.json" --benchmark_out_format=json
  done
  if ls "$OUT"/alloy_bench_*.json >/dev/null 2>&1; then
    python3 scripts/bench_table.py "$OUT"/alloy_bench_*.json | tee "$OUT/summary.md"
  fi
  # The PyTorch / bitsandbytes side, in the same run: wheels carried in .whl/ are installed
  # into a private directory first (the GPU machine has no network).
  if [ $run_peers -eq 1 ] && python3 -c "import torch" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/alloy-site \
        .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/alloy-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    step pytorch-reference sh -c "python3 tests/optim/pytorch_reference.py > '$OUT/pytorch_reference_values.inc'"
    step peers env PYTHONUNBUFFERED=1 python3 benchmarks/peers/optimizer_step.py --out "$OUT/peers.json"
    if [ -f "$OUT/alloy_bench_optimizer.json" ] && [ -f "$OUT/peers.json" ]; then
      { echo; python3 scripts/compare_peers.py "$OUT/alloy_bench_optimizer.json" "$OUT/peers.json" \
          "$OUT/alloy_bench_backend.json"; } | tee -a "$OUT/summary.md"
    fi
  fi
fi
exit $status
