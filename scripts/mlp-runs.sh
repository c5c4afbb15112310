#!/usr/bin/env bash
# On the GPU machine: the residual MLP at full size (PEERS.md's shape) in every configuration
# issue 10 tracks, alloy and PyTorch (eager and torch.compile) in the same run, and the table of
# both with their ratio (scripts/mlp_table.py). bf16_keep_gelu6 keeps GELU's output in 6 of the 8
# blocks (under the 2.34 GiB) instead of recomputing it in their backward. Builds alloy_mlp when build/gpu lacks it.
# Writes $OUT/mlp.txt (alloy's summaries), $OUT/mlp_peers.json and $OUT/mlp_table.md.
#   MLP_STEPS (default 60) steps per alloy run; the first two are warm-up and not timed.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
steps=${MLP_STEPS:-60}
bin=build/gpu/examples/alloy_mlp
if [ ! -x "$bin" ]; then
  cmake --preset gpu >/dev/null && cmake --build --preset gpu --target alloy_mlp -j "$(nproc)" >"$OUT/build_mlp.txt" 2>&1 \
    || { tail -30 "$OUT/build_mlp.txt"; exit 1; }
fi
run() {  # run NAME ARGS...
  local name=$1
  shift
  echo "== $name"
  "$bin" "$@" --steps "$steps" --csv "/tmp/mlp_$name.csv" | grep -E "^residual|^loss [0-9.-]+ ->" | tail -2
}
{
  run fp32 --precision fp32
  run tf32 --precision tf32
  run bf16 --precision bf16
  run bf16_keep_gelu6 --precision bf16 --keep-gelu 6
  run fp16 --precision fp16
  run bf16_checkpoint --precision bf16 --checkpointing
  run bf16_4x2048 --precision bf16 --accumulate 4 --rows 2048
} 2>&1 | tee "$OUT/mlp.txt"
if python3 -c "import torch" 2>/dev/null; then
  PYTHONUNBUFFERED=1 timeout "${MLP_PEER_TIMEOUT:-900}" python3 benchmarks/peers/residual_mlp.py --out "$OUT/mlp_peers.json" ${MLP_PEER_CONFIGS:+--configs "$MLP_PEER_CONFIGS"} 2>&1 | tail -12
fi
python3 scripts/mlp_table.py "$OUT/mlp.txt" "$OUT/mlp_peers.json" | tee "$OUT/mlp_table.md"
