#!/usr/bin/env bash
# On the GPU machine: GPT-2 (examples/gpt2) trained on the same text with the same seed and steps in
# fp32, bf16 and fp16; the mean loss of the last CONV_LAST steps of each 16-bit run must be within
# CONV_TOLERANCE (default 2%) of fp32's (issue 12's convergence target). Builds alloy_gpt2 when
# build/gpu lacks it. Writes $OUT/convergence_<precision>.csv and $OUT/convergence.txt.
#   CONV_SIZE (124M) CONV_STEPS (300) CONV_BATCH (8) CONV_SEQ (256) CONV_LAST (20)
#   CONV_DATA (a text file; default alloy's own docs, as the example's default)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
bin=build/gpu/examples/alloy_gpt2
if [ ! -x "$bin" ]; then
  cmake --preset gpu >/dev/null && cmake --build --preset gpu --target alloy_gpt2 -j "$(nproc)" \
    >"$OUT/build_gpt2.txt" 2>&1 || { tail -30 "$OUT/build_gpt2.txt"; exit 1; }
fi
data=()
[ -n "${CONV_DATA:-}" ] && data=(--data "$CONV_DATA")
{
  for p in fp32 bf16 fp16; do
    echo "== $p"
    "$bin" --backend cuda --size "${CONV_SIZE:-124M}" --precision $p --steps "${CONV_STEPS:-300}" \
      --batch "${CONV_BATCH:-8}" --seq "${CONV_SEQ:-256}" --sample 0 "${data[@]}" \
      --csv "$OUT/convergence_$p.csv" | grep -E "^GPT-2|^loss [0-9.-]+ ->"
  done
} 2>&1 | tee "$OUT/convergence.txt"
python3 - "$OUT" "${CONV_LAST:-20}" "${CONV_TOLERANCE:-0.02}" <<'PY' | tee -a "$OUT/convergence.txt"
import csv, sys
out, last, tol = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def tail_mean(p):
    rows = list(csv.DictReader(open(f"{out}/convergence_{p}.csv")))
    losses = [float(r["loss"]) for r in rows if r["skipped"] in ("0", "false")]
    skipped = sum(1 for r in rows if r["skipped"] not in ("0", "false"))
    return sum(losses[-last:]) / len(losses[-last:]), len(rows), skipped
ref, steps, _ = tail_mean("fp32")
print(f"mean loss of the last {last} of {steps} steps: fp32 {ref:.4f}")
ok = True
for p in ("bf16", "fp16"):
    m, _, skipped = tail_mean(p)
    rel = (m - ref) / ref
    good = abs(rel) <= tol
    ok &= good
    print(f"  {p} {m:.4f} ({100 * rel:+.2f}% of fp32; {skipped} steps skipped): {'within' if good else 'NOT within'} {100 * tol:g}%")
sys.exit(0 if ok else 1)
PY
