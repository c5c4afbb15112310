#!/usr/bin/env python3
"""The residual-MLP table of scripts/mlp-runs.sh: alloy's configurations (alloy_mlp's summary
lines) beside PyTorch's (benchmarks/peers/residual_mlp.py's JSON), with ms per step, rows/s and
peak memory both ways, and the ratios. alloy's time is the wall time of the steps after two
warm-up steps, to a final synchronization, per step (host work and input uploads included); PyTorch's is the median of CUDA-event timed
steps on inputs already on the device. alloy's memory is everything it allocated (its peak);
PyTorch's is torch.cuda.max_memory_allocated()."""
import json
import re
import sys

LINE = re.compile(r"loss [0-9.e+-]+ -> [0-9.e+-]+; ([0-9.]+) ms per step, ([0-9]+) rows/s; activations peak "
                  r"([0-9.]+) MiB, all memory peak ([0-9.]+) MiB")

# alloy config -> the PyTorch configs it is compared with (eager, compiled)
PAIRS = {"fp32": ("fp32", None), "tf32": ("tf32", None), "bf16": ("bf16", "bf16_compile"),
         "fp16": ("fp16", None), "bf16_checkpoint": ("bf16_checkpoint", "bf16_checkpoint_compile"),
         "bf16_4x2048": ("bf16", "bf16_compile"), "bf16_keep_gelu6": ("bf16", "bf16_compile")}


def main(alloy_txt, peers_json=None):
    alloy = {}
    name = None
    for line in open(alloy_txt):
        if line.startswith("== "):
            name = line[3:].strip()
        m = LINE.search(line)
        if m and name:
            alloy[name] = {"ms": float(m[1]), "rows_s": float(m[2]), "act_mib": float(m[3]), "peak_gib": float(m[4]) / 1024}
    peers = {}
    if peers_json:
        try:
            for r in json.load(open(peers_json))["results"]:
                peers[r["config"]] = r
        except (OSError, KeyError, ValueError):
            pass
    print("| config | alloy ms | alloy rows/s | alloy peak GiB | torch eager ms | torch.compile ms | "
          "torch peak GiB (eager / compiled) | speed vs eager | speed vs compile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg, a in alloy.items():
        eager, comp = PAIRS.get(cfg, (None, None))
        e = peers.get(eager) if eager else None
        c = peers.get(comp) if comp else None
        fmt = lambda r: f"{r['median_ms']:.2f}" if r else "-"
        mem = " / ".join(f"{r['peak_allocated_gib']:.2f}" if r else "-" for r in (e, c))
        ratio = lambda r: f"{r['median_ms'] / a['ms']:.2f}x" if r else "-"
        print(f"| {cfg} | {a['ms']:.2f} | {a['rows_s'] / 1e3:.0f} K | {a['peak_gib']:.2f} | {fmt(e)} | {fmt(c)} | {mem} | "
              f"{ratio(e)} | {ratio(c)} |")
    if "bf16" in alloy and "bf16_checkpoint" in alloy:
        print(f"\nbf16 + Checkpointing costs {alloy['bf16_checkpoint']['ms'] / alloy['bf16']['ms']:.3f}x alloy's bf16 step;"
              f" 4 x 2048 rows take {alloy.get('bf16_4x2048', {}).get('ms', float('nan')) / alloy['bf16']['ms']:.3f}x"
              " one batch of 8192.")


if __name__ == "__main__":
    main(*sys.argv[1:3])
