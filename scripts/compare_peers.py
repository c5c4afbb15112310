#!/usr/bin/env python3
"""alloy's optimizer-step benchmark beside the PyTorch / bitsandbytes pipelines timed in the
same run: one markdown table of medians, effective bandwidth against the floor's bytes, the
fraction of the copy ceiling measured in the same run, and the speed-up over each peer.
Usage: compare_peers.py ALLOY_OPTIMIZER_JSON PEERS_JSON [ALLOY_BACKEND_JSON]"""
import json
import sys

# alloy benchmark -> (what it is, the peer pipeline doing the same work)
PAIRS = {
    "BM_StepBf16MasterAdamW": ("bf16 + fp32 master + clip 1.0 + AdamW", "torch_bf16_master"),
    "BM_StepFp16MasterDynamicAdamW": ("fp16 + fp32 master + dynamic scale + clip + AdamW", "torch_amp_fp16"),
    "BM_StepBf16MasterAdamWq8": ("bf16 + fp32 master + clip + AdamW, q8 state", "bnb_adamw8bit_bf16_master"),
}
SHAPES = ["124M", "1.56B"]


def alloy_medians(path):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        parts = b["run_name"].split("/")
        name, arg = parts[0], int(parts[1])
        scale = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
        out[(name, SHAPES[arg])] = {"ms": b["real_time"] * scale, "bytes": b.get("bytes")}
    return out


def copy_ceiling(backend_path):
    if not backend_path:
        return None
    with open(backend_path) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        if b.get("aggregate_name") == "median" and b["run_name"].startswith("BM_MemcpyDeviceToDevice"):
            ms = b["real_time"] * {"ms": 1.0, "us": 1e-3}[b["time_unit"]]
            return b["bytes"] / ms / 1e9
    return None


def main(alloy_path, peers_path, backend_path=None):
    alloy = alloy_medians(alloy_path)
    with open(peers_path) as f:
        peers = json.load(f)
    peer = {(r["pipeline"], r["shape"]): r for r in peers["results"]}
    ceiling = copy_ceiling(backend_path)
    print(f"device: {peers.get('device')}, torch {peers.get('torch')}, bitsandbytes {peers.get('bitsandbytes')}; "
          f"copy ceiling {ceiling:.2f} TB/s" if ceiling else "")
    print()
    print("| alloy configuration | shape | alloy ms | TB/s at floor bytes | of copy ceiling | peer | peer ms | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (what, peer_name) in PAIRS.items():
        for shape in SHAPES:
            a = alloy.get((name, shape))
            if not a:
                continue
            tbs = a["bytes"] / a["ms"] / 1e9 if a["bytes"] else None
            frac = f"{tbs / ceiling:.0%}" if tbs and ceiling else "-"
            p = peer.get((peer_name, shape))
            if p and p.get("median_ms") and not p.get("skipped"):
                pm, speed = f"{p['median_ms']:.2f}", f"{p['median_ms'] / a['ms']:.2f}x"
            else:
                pm, speed = (p or {}).get("skipped", "not run"), "-"
            print(f"| {what} | {shape} | {a['ms']:.3f} | {tbs:.2f} | {frac} | {peer_name} | {pm} | {speed} |")
    # q8 against fp32 state, same run.
    for shape in SHAPES:
        q, f = alloy.get(("BM_StepBf16MasterAdamWq8", shape)), alloy.get(("BM_StepBf16MasterAdamW", shape))
        if q and f:
            print(f"\nq8 state vs fp32 state, {shape}: {q['ms']:.3f} ms vs {f['ms']:.3f} ms ({f['ms'] / q['ms']:.2f}x)")
    for shape in SHAPES:
        r = peer.get(("torch_fp32_fused_adamw", shape))
        if r and r.get("median_ms"):
            print(f"\nreference, torch fp32 fused AdamW step alone, {shape}: {r['median_ms']:.2f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:])
