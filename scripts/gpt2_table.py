#!/usr/bin/env python3
"""The GPT-2 124M table of scripts/gpt2-runs.sh: alloy's configurations (alloy_gpt2's summary lines)
beside PyTorch's (benchmarks/peers/gpt2.py's JSON files, eager and compiled), with ms per step,
tokens/s and peak memory both ways, and the ratios (PyTorch's time / alloy's: above 1 is alloy
faster). alloy's time is the wall time of the steps after two warm-up steps, to a final
synchronization, per step (host work and input uploads included); PyTorch's is the median of
CUDA-event timed steps on inputs already on the device. alloy's memory is everything it allocated
(its peak after warm-up); PyTorch's is torch.cuda.max_memory_allocated().

    gpt2_table.py ALLOY_TXT [PEERS_JSON ...]
"""
import json
import re
import sys

LINE = re.compile(r"loss ([0-9.e+-]+) -> ([0-9.e+-]+); ([0-9.]+) ms per step, ([0-9]+) tokens/s; activations peak "
                  r"([0-9.]+) MiB, all memory peak ([0-9.]+) MiB")

# alloy config -> the PyTorch configs it is compared with (eager, compiled)
PAIRS = {c: (c, c + "_compile") for c in ("fp32", "tf32", "bf16", "fp16", "bf16_checkpoint")}


def parse_alloy(path):
    alloy, name = {}, None
    for line in open(path):
        if line.startswith("== "):
            name = line[3:].strip()
        m = LINE.search(line)
        if m and name:
            alloy[name] = {"first": float(m[1]), "last": float(m[2]), "ms": float(m[3]), "tokens_s": float(m[4]),
                           "act_mib": float(m[5]), "peak_gib": float(m[6]) / 1024}
    return alloy


def parse_peers(paths):
    peers = {}
    for p in paths:
        try:
            for r in json.load(open(p))["results"]:
                peers[r["config"]] = r
        except (OSError, KeyError, ValueError):
            pass
    return peers


def main(alloy_txt, *peers_json):
    alloy, peers = parse_alloy(alloy_txt), parse_peers(peers_json)
    print("| config | alloy ms | alloy tokens/s | alloy peak GiB | torch eager ms | torch.compile ms | "
          "torch tokens/s (eager / compiled) | torch peak GiB (eager / compiled) | speed vs eager | speed vs compile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg, a in alloy.items():
        eager, comp = PAIRS.get(cfg, (None, None))
        e, c = peers.get(eager), peers.get(comp)
        ms = lambda r: f"{r['median_ms']:.1f}" if r else "-"
        tok = " / ".join(f"{r['tokens_per_s'] / 1e3:.0f} K" if r and "tokens_per_s" in r else "-" for r in (e, c))
        mem = " / ".join(f"{r['peak_allocated_gib']:.2f}" if r else "-" for r in (e, c))
        ratio = lambda r: f"{r['median_ms'] / a['ms']:.2f}x" if r else "-"
        print(f"| {cfg} | {a['ms']:.1f} | {a['tokens_s'] / 1e3:.0f} K | {a['peak_gib']:.2f} | {ms(e)} | {ms(c)} | "
              f"{tok} | {mem} | {ratio(e)} | {ratio(c)} |")
    if "bf16" in alloy and "bf16_checkpoint" in alloy:
        print(f"\nbf16 + Checkpointing costs {alloy['bf16_checkpoint']['ms'] / alloy['bf16']['ms']:.3f}x alloy's bf16 "
              f"step and peaks at {alloy['bf16_checkpoint']['peak_gib']:.2f} GiB against {alloy['bf16']['peak_gib']:.2f}.")
    for cfg, a in alloy.items():
        print(f"- {cfg}: loss {a['first']:.4f} -> {a['last']:.4f} (random tokens: ln 50257 = 10.825 is the floor)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
