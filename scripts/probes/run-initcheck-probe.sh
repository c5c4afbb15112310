#!/usr/bin/env bash
# Builds scripts/probes/initcheck_cublaslt.cu and runs it under initcheck twice (fresh output,
# output memset first); logs to $OUT/initcheck_probe_*.txt. On the GPU machine.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" build/probes
nvcc -std=c++20 -O2 -arch=sm_90 -Iinclude scripts/probes/initcheck_cublaslt.cu -lcublasLt -o build/probes/initcheck_cublaslt || exit 2
for mode in fresh memset; do
  compute-sanitizer --tool initcheck --print-limit 4 build/probes/initcheck_cublaslt "$mode" >"$OUT/initcheck_probe_$mode.txt" 2>&1
  echo "initcheck, $mode: exit $?; $(grep -E 'ERROR SUMMARY|elements differ' "$OUT/initcheck_probe_$mode.txt" | tr '\n' ' ')"
  grep -m2 -E 'Uninitialized|at .*copy_out|nvjet|by thread' "$OUT/initcheck_probe_$mode.txt" | head -4
done
