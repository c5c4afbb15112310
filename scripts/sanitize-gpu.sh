#!/usr/bin/env bash
# On the GPU machine, after a gpu-preset build: the GPU test suite under each compute-sanitizer
# tool (memcheck with leak checking, racecheck, initcheck, synccheck). Each tool's log goes to
# $OUT/sanitize_<tool>.txt; the summary gives its error count and exit status. A tool that finds
# anything, or runs past SANITIZE_TIMEOUT seconds (default 900), makes the script fail.
#   SANITIZE_FILTER   gtest filter (default: every GPU test; the fault soak runs 60 steps here)
# CUDA API errors are not reported: some tests provoke them on purpose (out of memory, a sticky
# error), and alloy turns each into an exception the tests check.
#   SANITIZE_TOOLS    the tools to run (default: "memcheck racecheck initcheck synccheck")
#   SANITIZE_INITCHECK_FILTER  initcheck's (default: the slow filter without the fused-MLP block,
#                     whose kernels read what cuBLASLt wrote: initcheck does not see cuBLASLt's
#                     stores at all, scripts/probes/initcheck_cublaslt.cu shows it)
#   SANITIZE_RACECHECK_FILTER  racecheck's gtest filter (default: the slow filter without the tests
#                     whose products run in cuBLASLt: racecheck's reports there are in NVIDIA's
#                     nvjet kernels, not alloy's, and take most of its time; docs/reliability.md.
#                     Leaving those kernels out with --kernel-name-exclude kns=nvjet instead made
#                     compute-sanitizer 2025 fail on the first product: "Internal Sanitizer Error:
#                     The Sanitizer failed to handle a hardware exception", on the H200, 2026-12-02)
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
# without FILTER PATTERNS: FILTER with PATTERNS added to its negative part.
without() { case "$1" in *-*) echo "$1:$2" ;; *) echo "$1-$2" ;; esac; }
export ALLOY_SOAK_STEPS=${ALLOY_SOAK_STEPS:-60} ALLOY_REQUIRE_GPU=1
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
  extra=() f=$filter
  [ "$tool" = memcheck ] && extra=(--leak-check full)
  case "$tool" in
    racecheck) f=${SANITIZE_RACECHECK_FILTER:-$(without "$slow_filter" "CudaGemm*:GpuFusedMlp*")} ;;
    initcheck) f=${SANITIZE_INITCHECK_FILTER:-$(without "$slow_filter" "GpuFusedMlp*")} ;;
  esac
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
