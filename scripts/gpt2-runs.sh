#!/usr/bin/env bash
# On the GPU machine: alloy's GPT-2 124M training step (examples/gpt2, 16 x 1024 random tokens per
# step) in fp32, tf32, bf16, fp16 and bf16 + Checkpointing, then PyTorch's (benchmarks/peers/gpt2.py,
# the nanoGPT-style model, eager and torch.compile) in the same run, and the table of both with their
# ratios (scripts/gpt2_table.py). Builds alloy_gpt2 when build/gpu lacks it.
# Writes $OUT/gpt2.txt (alloy's summaries), $OUT/gpt2_peers_eager.json, $OUT/gpt2_peers_compile.json
# and $OUT/gpt2_table.md.
#   GPT2_STEPS (default 30) steps per alloy run; the first two are warm-up and not timed.
#   GPT2_PARTS (default "alloy eager compile") picks parts; GPT2_PEER_TIMEOUT (default 540) is each
#   PyTorch part's limit in seconds.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
steps=${GPT2_STEPS:-30}
parts=${GPT2_PARTS:-alloy eager compile}
limit=${GPT2_PEER_TIMEOUT:-540}
bin=build/gpu/examples/alloy_gpt2
for part in $parts; do
  case $part in
    alloy)
      if [ ! -x "$bin" ]; then
        cmake --preset gpu >/dev/null && cmake --build --preset gpu --target alloy_gpt2 -j "$(nproc)" \
          >"$OUT/build_gpt2.txt" 2>&1 || { tail -30 "$OUT/build_gpt2.txt"; exit 1; }
      fi
      run() {  # run NAME ARGS...
        local name=$1
        shift
        echo "== $name"
        "$bin" --backend cuda --size 124M --batch 16 --seq 1024 --random --sample 0 --steps "$steps" \
          --csv "/tmp/gpt2_$name.csv" "$@" | grep -E "^GPT-2|^loss [0-9.-]+ ->|^memory" | tail -3
      }
      {
        run fp32 --precision fp32
        run tf32 --precision tf32
        run bf16 --precision bf16
        run fp16 --precision fp16
        run bf16_checkpoint --precision bf16 --checkpointing
      } 2>&1 | tee "$OUT/gpt2.txt" ;;
    eager)
      PYTHONUNBUFFERED=1 timeout "$limit" python3 benchmarks/peers/gpt2.py \
        --configs fp32,tf32,bf16,fp16,bf16_checkpoint --out "$OUT/gpt2_peers_eager.json" 2>&1 | tail -8 ;;
    compile)
      PYTHONUNBUFFERED=1 timeout "$limit" python3 benchmarks/peers/gpt2.py \
        --configs bf16_compile,bf16_checkpoint_compile,fp16_compile,tf32_compile,fp32_compile \
        --out "$OUT/gpt2_peers_compile.json" 2>&1 | grep -vE "UserWarning|warnings.warn" | tail -8 ;;
    *) echo "unknown part $part (alloy, eager, compile)"; exit 2 ;;
  esac
done
python3 scripts/gpt2_table.py "$OUT/gpt2.txt" "$OUT/gpt2_peers_eager.json" "$OUT/gpt2_peers_compile.json" \
  | tee "$OUT/gpt2_table.md"
