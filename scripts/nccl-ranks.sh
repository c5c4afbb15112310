#!/usr/bin/env bash
# Runs alloy_nccl_tests' NcclTwoRanks.* as N processes, one per GPU (N = $1, default 2), the way a
# launcher would: RANK / WORLD_SIZE / LOCAL_RANK in each environment, the NCCL id exchanged
# through a fresh directory, NVLink multicast off. Run from the repository root after building
# alloy_nccl_tests (cmake --build --preset gpu --target alloy_nccl_tests).
#   scripts/nccl-ranks.sh [N] [extra gtest arguments]
set -uo pipefail
n=${1:-2}
shift || true
bin=${BIN:-build/gpu/tests/alloy_nccl_tests}
[ -x "$bin" ] || { echo "no $bin: build alloy_nccl_tests first (or set BIN)" >&2; exit 2; }
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on shared machines
export ALLOY_NCCL_ID_DIR=$(mktemp -d "${TMPDIR:-/tmp}/alloy-nccl-XXXXXX")
pids=()
for ((r = 0; r < n; r++)); do
  RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r "$bin" --gtest_filter='NcclTwoRanks.*' "$@" >"$ALLOY_NCCL_ID_DIR/rank$r.log" 2>&1 &
  pids+=($!)
done
status=0
for ((r = 0; r < n; r++)); do
  wait "${pids[$r]}" || status=1
  echo "== rank $r"
  cat "$ALLOY_NCCL_ID_DIR/rank$r.log"
done
rm -rf "$ALLOY_NCCL_ID_DIR"
exit $status
