#!/usr/bin/env bash
# On the GPU machine: PyTorch's side of issue 12 (GPT-2 124M), each part under its own timeout so
# that one slow compile cannot take the rest with it:
#   $OUT/attention_peers.json             causal SDPA per backend, q, k, v strided out of one QKV
#   $OUT/attention_peers_contiguous.json  the same on contiguous [batch, heads, seq, head_dim]
#   $OUT/gpt2_peers_eager.json            the nanoGPT-style model, eager: fp32 tf32 bf16 fp16 bf16_checkpoint
#   $OUT/gpt2_peers_compile.json          the same under torch.compile
#   $OUT/gpt2_peers_hf.json               transformers' GPT2LMHeadModel, bf16 eager and compiled
#   $OUT/gpt2_peers_block.json            one block forward and forward + backward, eager and compiled
#   $OUT/gpt2_block_bench.json            alloy's block, the same shape (alloy_bench_gpt2_block; built
#                                         under build/gpu when missing)
# GPT2_PEERS_PARTS (default "attention eager compile hf block alloy_block") picks parts; GPT2_PEER_TIMEOUT (default
# 540) is each part's limit in seconds.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
limit=${GPT2_PEER_TIMEOUT:-540}
parts=${GPT2_PEERS_PARTS:-attention eager compile hf block alloy_block}
run() {  # run NAME COMMAND...
  local name=$1
  shift
  echo "== $name"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | grep -vE "^\s*$|UserWarning|warnings.warn" | tail -14
}
for part in $parts; do
  case $part in
    attention)
      run attention python3 benchmarks/peers/attention.py --out "$OUT/attention_peers.json"
      run attention_contiguous python3 benchmarks/peers/attention.py --layout contiguous \
        --out "$OUT/attention_peers_contiguous.json" ;;
    eager)
      run gpt2_eager python3 benchmarks/peers/gpt2.py --configs fp32,tf32,bf16,fp16,bf16_checkpoint \
        --out "$OUT/gpt2_peers_eager.json" ;;
    compile)
      run gpt2_compile python3 benchmarks/peers/gpt2.py \
        --configs bf16_compile,bf16_checkpoint_compile,fp16_compile,tf32_compile,fp32_compile \
        --out "$OUT/gpt2_peers_compile.json" ;;
    hf)
      run gpt2_hf python3 benchmarks/peers/gpt2.py --impl hf --configs bf16,bf16_compile,bf16_checkpoint \
        --out "$OUT/gpt2_peers_hf.json" ;;
    block)
      run gpt2_block python3 benchmarks/peers/gpt2.py --part block --out "$OUT/gpt2_peers_block.json" ;;
    alloy_block)
      bench=build/gpu/benchmarks/alloy_bench_gpt2_block
      if [ ! -x "$bench" ]; then
        { cmake --preset gpu >/dev/null && cmake --build --preset gpu --target alloy_bench_gpt2_block -j "$(nproc)"; } \
          >"$OUT/build_gpt2_block_bench.txt" 2>&1 || { tail -20 "$OUT/build_gpt2_block_bench.txt"; continue; }
      fi
      run alloy_block "$bench" --benchmark_out="$OUT/gpt2_block_bench.json" --benchmark_out_format=json ;;
    *) echo "unknown part $part (attention, eager, compile, hf, block, alloy_block)"; exit 2 ;;
  esac
done 2>&1 | tee "$OUT/gpt2_peers.txt"
