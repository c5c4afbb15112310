#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-check.sh built build/gpu: the residual MLP at full size
# (PEERS.md's shape) for each precision, and PyTorch's same model in the same run. Writes
# $OUT/mlp.txt (alloy's summaries) and $OUT/mlp_peers.json.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
steps=${MLP_STEPS:-300}
bin=build/gpu/examples/alloy_mlp
{
  for p in fp32 tf32 bf16 fp16; do
    echo "== $p"
    $bin --precision "$p" --steps "$steps" --csv "/tmp/mlp_$p.csv" | grep -E "^residual|^loss|skipped [0-9]+$" | tail -3
  done
  echo "== bf16 + checkpointing"
  $bin --precision bf16 --checkpointing --steps 30 --csv /tmp/mlp_ckpt.csv | grep -E "^residual|^loss"
  echo "== bf16, 4 micro-batches of 2048 rows"
  $bin --precision bf16 --accumulate 4 --rows 2048 --steps 30 --csv /tmp/mlp_acc.csv | grep -E "^residual|^loss"
} 2>&1 | tee "$OUT/mlp.txt"
if python3 -c "import torch" 2>/dev/null; then
  PYTHONUNBUFFERED=1 python3 benchmarks/peers/residual_mlp.py --out "$OUT/mlp_peers.json" 2>&1 | tee -a "$OUT/mlp.txt"
fi
