#!/usr/bin/env bash
# On the GPU machine, after a gpu-preset build: the GPU test suite under each compute-sanitizer
# tool (memcheck with leak checking, racecheck, initcheck, synccheck). Each tool's log goes to
# $OUT/sanitize_<tool>.txt; the summary gives its error count and exit status. A tool that finds
# anything, or runs past SANITIZE_TIMEOUT seconds (default 900), makes the script fail.
#   SANITIZE_FILTER   gtest filter (default: every GPU test; the fault soak runs 60 steps here)
# CUDA API errors are not reported: some tests provoke them on purpose (out of memory, a sticky
# error), and alloy turns each into an exception the tests check.
#   SANITIZE_TOOLS    the tools to run (default: "memcheck racecheck initcheck synccheck")
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
bin=${SANITIZE_BIN:-build/gpu/tests/alloy_gpu_tests}
[ -x "$bin" ] || { echo "no $bin: build the gpu preset first" >&2; exit 2; }
filter=${SANITIZE_FILTER:-*}
export ALLOY_SOAK_STEPS=${ALLOY_SOAK_STEPS:-60} ALLOY_REQUIRE_GPU=1
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check full)
  t0=$SECONDS
  timeout "${SANITIZE_TIMEOUT:-900}" compute-sanitizer --tool "$tool" "${extra[@]}" --report-api-errors no --error-exitcode 86 \
    "$bin" --gtest_filter="$filter" --gtest_brief=1 >"$OUT/sanitize_$tool.txt" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY" "$OUT/sanitize_$tool.txt" | tail -2 | tr '\n' ' ')
  tests=$(grep -E "^\[  PASSED  \]|tests? ran|FAILED TEST" "$OUT/sanitize_$tool.txt" | head -3 | tr '\n' ' ')
  echo "$tool: exit $rc after $((SECONDS - t0)) s; $summary; $tests"
  [ $rc -eq 0 ] || status=1
done
exit $status
