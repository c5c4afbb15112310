#!/usr/bin/env bash
# On the GPU machine, after a gpu-preset build: the GPU test suite under each compute-sanitizer
# tool (memcheck with leak checking, racecheck, initcheck, synccheck). Each tool's log goes to
# $OUT/sanitize_<tool>.txt; the summary gives its error count and exit status. A tool that finds
# anything, or runs past SANITIZE_TIMEOUT seconds (default 900), makes the script fail.
#   SANITIZE_FILTER   gtest filter (default: every GPU test; the fault soak runs 60 steps here)
# CUDA API errors are not reported: some tests provoke them on purpose (out of memory, a sticky
# error), and alloy turns each into an exception the tests check.
#   SANITIZE_TOOLS    the tools to run (default: "memcheck racecheck initcheck synccheck")
#   SANITIZE_RACECHECK_EXCLUDE  kernels racecheck leaves alone, compute-sanitizer's
#                     --kernel-name-exclude syntax (default: kns=nvjet, cuBLASLt's product kernels:
#                     racecheck's reports there are in NVIDIA's code, not alloy's, and take most
#                     of its time; docs/reliability.md); set it empty to check them too
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
bin=${SANITIZE_BIN:-build/gpu/tests/alloy_gpu_tests}
[ -x "$bin" ] || { echo "no $bin: build the gpu preset first" >&2; exit 2; }
filter=${SANITIZE_FILTER:-*}
# racecheck and initcheck run kernels far slower: by default they take alloy's own kernels (the
# element-wise and reduction paths, row kernels, products with their epilogues, accumulation, the
# optimizer steps, conversion, the loss, uploads), not the trainer-level tests built from them.
slow_filter=${SANITIZE_SLOW_FILTER:-Cuda*:GpuGradAccumulation*:GpuOptimizerStep*:GpuAdafactor*:GpuSoftmaxCrossEntropy*:GpuConversion*:GpuInputUploads*:GpuParamStore*:GpuFusedMlp.ResidualBlockMatchesHost-*OutOfMemory*:*ANonStickyError*}
export ALLOY_SOAK_STEPS=${ALLOY_SOAK_STEPS:-60} ALLOY_REQUIRE_GPU=1
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
  extra=() f=$filter
  [ "$tool" = memcheck ] && extra=(--leak-check full)
  exclude=${SANITIZE_RACECHECK_EXCLUDE-kns=nvjet}
  [ "$tool" = racecheck ] && [ -n "$exclude" ] && extra=(--kernel-name-exclude "$exclude")
  case "$tool" in racecheck | initcheck) f=$slow_filter ;; esac
  t0=$SECONDS
  # Line-buffered, so a run stopped by the timeout still shows how far it got.
  timeout "${SANITIZE_TIMEOUT:-900}" stdbuf -oL -eL compute-sanitizer --tool "$tool" "${extra[@]}" --report-api-errors no --error-exitcode 86 \
    "$bin" --gtest_filter="$f" >"$OUT/sanitize_$tool.txt" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY" "$OUT/sanitize_$tool.txt" | tail -2 | tr '\n' ' ')
  tests=$(grep -E "^\[  PASSED  \]|tests? ran|FAILED TEST" "$OUT/sanitize_$tool.txt" | head -3 | tr '\n' ' ')
  echo "$tool: exit $rc after $((SECONDS - t0)) s; $summary; $tests"
  [ $rc -eq 0 ] || status=1
done
exit $status
