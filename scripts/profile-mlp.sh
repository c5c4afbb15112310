#!/usr/bin/env bash
# On the GPU machine: builds alloy_mlp (gpu preset) and breaks one residual-MLP step into its
# kernels with Nsight Compute (each kernel's gpu__time_duration, grouped by kernel and by kind).
# Writes $OUT/profile_<config>.csv (ncu's raw rows) and prints the tables.
#   scripts/profile-mlp.sh [alloy_mlp options...]   (default: --precision bf16)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
bin=build/gpu/examples/alloy_mlp
if [ ! -x "$bin" ] || [ "${REBUILD:-1}" = 1 ]; then
  cmake --preset gpu >/dev/null && cmake --build --preset gpu --target alloy_mlp -j "$(nproc)" >"$OUT/build_mlp.txt" 2>&1 \
    || { tail -30 "$OUT/build_mlp.txt"; exit 1; }
fi
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--precision bf16)
tag=$(echo "${args[*]}" | tr -c 'A-Za-z0-9' '_')
# Three steps, each launching the same kernels; the table shows the last.
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  "$bin" "${args[@]}" --steps 3 --csv /tmp/profile_loss.csv >"$OUT/profile_$tag.csv" 2>"$OUT/profile_$tag.err"
python3 scripts/profile_table.py "$OUT/profile_$tag.csv"
